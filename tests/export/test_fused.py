"""The fused graph builder: structure, I/O contract, shapes GQA cannot express, fp16."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from codegen_deploy.artifacts import io_spec
from codegen_deploy.config import ModelConfig
from codegen_deploy.errors import ExportError
from codegen_deploy.export.fused import fused_support, rotary_table_width, write_fused_graph
from codegen_deploy.export.graph import IR_VERSION
from codegen_deploy.model.reference import CodeGen

pytest.importorskip("onnxruntime")

CONFIG = ModelConfig(n_layer=2, n_embd=64, n_head=4, rotary_dim=8, n_positions=40, n_inner=128, vocab_size=96)


@pytest.fixture(scope="module")
def model() -> CodeGen:
    return CodeGen.random(CONFIG, seed=5, std=0.1)


def test_graph_follows_the_io_spec_and_uses_one_gqa_per_layer(model, tmp_path):
    files = write_fused_graph(model, tmp_path)
    assert files == [io_spec.FUSED_GRAPH_FILE, io_spec.FUSED_DATA_FILE]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(files)  # no temporary files left
    onnx.checker.check_model(str(tmp_path / io_spec.FUSED_GRAPH_FILE))
    proto = onnx.load(str(tmp_path / io_spec.FUSED_GRAPH_FILE), load_external_data=False)
    assert proto.ir_version == IR_VERSION  # what the oldest supported onnxruntime reads
    graph = proto.graph

    def spec(values):
        return [
            (
                v.name,
                onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
                tuple(d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim),
            )
            for v in values
        ]

    args = (CONFIG.n_layer, CONFIG.n_head, CONFIG.head_dim)
    assert spec(graph.input) == [(s.name, s.dtype, s.shape) for s in io_spec.fused_decoder_inputs(*args, "float32")]
    assert spec(graph.output) == [
        (s.name, s.dtype, s.shape) for s in io_spec.fused_decoder_outputs(*args, CONFIG.vocab_size, "float32")
    ]
    gqa = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == CONFIG.n_layer
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in gqa[0].attribute}
    assert attrs["do_rotary"] == 1 and attrs["rotary_interleaved"] == 1
    assert attrs["num_heads"] == attrs["kv_num_heads"] == CONFIG.n_head
    assert list(gqa[0].output[1:]) == [io_spec.present_name(0, "key"), io_spec.present_name(0, "value")]
    assert not any(n.op_type == "Concat" for n in graph.node)  # nothing grows the cache
    cos = next(t for t in graph.initializer if t.name == "rotary.cos_cache")
    assert list(cos.dims) == [CONFIG.n_positions, 8]  # rotary_dim / 2 = 4, padded to GQA's multiple of 8


def test_rotary_table_width_and_shapes_gqa_cannot_express():
    assert rotary_table_width(CONFIG) == 8
    assert rotary_table_width(ModelConfig(20, 1024, 16, 32, 2048, 4096, 51200)) == 16  # the 350M shape
    assert rotary_table_width(ModelConfig(1, 64, 4, 2, 64, 96, 100)) == 8  # head_dim 16, rotary_dim 2
    assert rotary_table_width(ModelConfig(1, 96, 2, 48, 64, 96, 100)) == 24  # head_dim 48, full rotary
    # GroupQueryAttention's CPU kernel refuses these head_dims at run time: 8, 20 (odd-head), 24, 40.
    for n_embd, n_head, rotary_dim in ((32, 4, 8), (60, 3, 6), (96, 4, 8), (48, 2, 24), (80, 2, 16)):
        config = ModelConfig(1, n_embd, n_head, rotary_dim, 64, 96, 100)
        assert "multiple of 16" in fused_support(config)
        with pytest.raises(ExportError, match="plain decoder graph"):
            rotary_table_width(config)


def test_fp16_graph_stays_close_to_the_fp32_reference(model, tmp_path):
    from codegen_deploy.runtime.backends.onnxruntime_fused import FusedOrtSession

    half = CodeGen.random(CONFIG, seed=5, std=0.1, dtype=torch.float16)
    write_fused_graph(half, tmp_path)
    ids = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (1, 24))
    with torch.no_grad():
        expected = model(torch.tensor(ids))[0][0, 5:].numpy()  # [19, V]
    with FusedOrtSession(tmp_path, config=CONFIG) as session:
        assert session.cache_dtype == np.float16
        got = [session.prefill(ids[:, :6])] + [session.step(ids[:, t]) for t in range(6, 24)]
    assert np.concatenate(got).dtype == np.float32
    np.testing.assert_allclose(np.concatenate(got), expected, atol=1e-2)


@pytest.mark.parametrize("bits, block", [(8, 64), (4, 32)])
def test_quantized_weights_are_packed_as_matmulnbits_reads_them(bits, block):
    """accuracy_level 0 (float activations) makes MatMulNBits exactly x @ dequantized(W).T."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from codegen_deploy.export.quantize import quantize_blockwise

    rng = np.random.default_rng(0)
    n, k = 24, 72  # k not a multiple of the block: the last block is zero-padded
    weight = rng.normal(0, 0.05, (n, k)).astype(np.float32)
    x = rng.normal(0, 1, (2, k)).astype(np.float32)
    packed, scales = quantize_blockwise(weight, bits, block)
    values = np.stack([packed & 15, packed >> 4], -1).reshape(n, packed.shape[1], -1) if bits == 4 else packed
    dequantized = ((values.astype(np.float32) - 2 ** (bits - 1)) * scales[..., None]).reshape(n, -1)[:, :k]
    assert np.abs(dequantized - weight).max() <= scales.max() / 2 + 1e-7  # rounding error only
    node = helper.make_node(
        "MatMulNBits",
        ["x", "B", "scales"],
        ["y"],
        domain="com.microsoft",
        K=k,
        N=n,
        bits=bits,
        block_size=block,
        accuracy_level=0,
    )
    initializers = [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales, "scales")]
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializers,
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    proto = helper.make_model(graph, opset_imports=opsets)
    y = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, x @ dequantized.T, atol=1e-5)


@pytest.mark.parametrize("weights, op, bound", [("int8", "MatMulIntegerToFloat", 0.1), ("int4", "MatMulNBits", 0.3)])
def test_quantized_graph_runs_close_to_the_reference(model, tmp_path, weights, op, bound):
    from codegen_deploy.runtime.backends.onnxruntime_fused import FusedOrtSession

    write_fused_graph(model, tmp_path, weights=weights)
    graph = onnx.load(str(tmp_path / io_spec.FUSED_GRAPH_FILE), load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count(op) == 4 * CONFIG.n_layer + 1  # qkv_proj, out_proj, fc_in, fc_out; lm_head
    assert "MatMul" not in ops and ops.count("MatMulNBits") + ops.count("MatMulIntegerToFloat") == ops.count(op)
    if weights == "int8":  # ln_1's output is quantized once for qkv_proj and fc_in
        assert ops.count("QuantizeLinear") == 3 * CONFIG.n_layer + 1
    ids = np.random.default_rng(1).integers(0, CONFIG.vocab_size, (1, 12))
    with torch.no_grad():
        expected = model(torch.tensor(ids))[0][0, -1].numpy()
    with FusedOrtSession(tmp_path, config=CONFIG) as session:
        got = session.prefill(ids)[0]
    assert np.abs(got - expected).max() < bound * np.abs(expected).max()  # lossy, but the same model


def test_unknown_weight_format_is_refused(model, tmp_path):
    with pytest.raises(ExportError, match="weight format"):
        write_fused_graph(model, tmp_path, weights="int3")


@pytest.mark.parametrize("cache", ["float16", "int8"])
@pytest.mark.parametrize("weights", ["float", "int8", "int4"])
def test_a_narrower_cache_is_declared_and_stays_close_to_the_float32_cache(model, tmp_path, weights, cache):
    """A float16 or int8 KV cache under float32 (or quantized) weights: the graph declares that cache and
    reads as the float32-cache graph does, up to the cache's rounding of keys and values. float16: q|k|v cast
    to it around each GroupQueryAttention; int8: GQA quantizes per channel with scales fixed at export."""
    from codegen_deploy.runtime.backends.onnxruntime_fused import FusedOrtSession

    wide, narrow = tmp_path / "float32", tmp_path / cache
    write_fused_graph(model, wide, weights=weights, cache="float32")
    write_fused_graph(model, narrow, weights=weights, cache=cache)
    graph = onnx.load(str(narrow / io_spec.FUSED_GRAPH_FILE), load_external_data=False).graph
    args = (CONFIG.n_layer, CONFIG.n_head, CONFIG.head_dim)
    want = [(s.name, s.dtype) for s in io_spec.fused_decoder_inputs(*args, cache)]
    dtypes = [(v.name, onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name) for v in graph.input]
    assert dtypes == want
    gqa = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in gqa[0].attribute}
    casts = [n for n in graph.node if n.op_type == "Cast" and "qkv_to_cache_dtype" in n.name]
    if cache == "int8":
        assert attrs["k_quant_type"] == attrs["v_quant_type"] == b"PER_CHANNEL" and attrs["kv_cache_bit_width"] == 8
        assert gqa[0].input[12:] == ["blocks.0.attn.k_scale", "blocks.0.attn.v_scale"] and not casts
    else:
        assert "k_quant_type" not in attrs and len(casts) == CONFIG.n_layer
    ids = np.random.default_rng(2).integers(0, CONFIG.vocab_size, (1, 24))
    logits = {}
    for folder in (wide, narrow):
        with FusedOrtSession(folder, config=CONFIG) as session:
            logits[folder.name] = np.concatenate(
                [session.prefill(ids[:, :6])] + [session.step(ids[:, t]) for t in range(6, 24)]
            )
            kind, itemsize, per_token = (
                session.export_kind,
                np.dtype(session.cache_dtype).itemsize,
                session.kv_bytes_per_token,
            )
        weights_kind = "float32" if weights == "float" else weights  # what the weights compute in
        assert kind == weights_kind + ("-kv8" if folder.name == "int8" else "")
        assert np.dtype(session.cache_dtype) == np.dtype(folder.name)
        assert per_token == 2 * CONFIG.n_layer * CONFIG.n_embd * itemsize
    change = np.abs(logits[cache] - logits["float32"]).max()
    if weights == "float":
        assert 0 < change < {"float16": 5e-3, "int8": 2e-2}[cache] * np.abs(logits["float32"]).max()
    else:  # below what the quantized weights change
        with torch.no_grad():
            expected = model(torch.tensor(ids))[0][0, 5:].numpy()  # [19, V]
        assert 0 < change < np.abs(logits["float32"] - expected).max()


def test_int8_cache_scales_cover_each_channel_and_rotary_pairs_share_theirs(model):
    from codegen_deploy.export.fused import kv_cache_scales, random_calibration

    calibration = random_calibration(CONFIG)
    scales = kv_cache_scales(model, calibration)
    with torch.no_grad():
        _, present = model(torch.as_tensor(calibration[:1]))
    r, h, d = CONFIG.rotary_dim, CONFIG.n_head, CONFIG.head_dim
    for (k_scale, v_scale), (keys, values) in zip(scales, present, strict=True):
        assert k_scale.shape == v_scale.shape == (h * d,) and k_scale.dtype == np.float32
        k_scale, v_scale = k_scale.reshape(h, d), v_scale.reshape(h, d)
        # every calibration key and value is in range: no channel saturates on what it was measured on
        assert (keys[0].abs().amax(1).numpy() <= 127 * k_scale * (1 + 1e-6)).all()
        assert (values[0].abs().amax(1).numpy() <= 127 * v_scale * (1 + 1e-6)).all()
        np.testing.assert_array_equal(k_scale[:, 0:r:2], k_scale[:, 1:r:2])  # a rotary pair shares its scale


def test_cache_dtype_defaults_to_float16_under_quantized_weights_and_keeps_what_is_asked_for():
    from codegen_deploy.export.fused import cache_dtype_for

    assert cache_dtype_for("auto", "float32", "float") == "float32"
    assert cache_dtype_for("auto", "float16", "float") == "float16"
    assert cache_dtype_for(None, "float32", "int8") == cache_dtype_for("auto", "float32", "int4") == "float16"
    assert cache_dtype_for("float32", "float32", "int8") == "float32"  # asked for: kept
    assert cache_dtype_for("int8", "float32", "int4") == "int8"
    with pytest.raises(ExportError, match="KV cache dtype"):
        cache_dtype_for("int4", "float32", "float")
