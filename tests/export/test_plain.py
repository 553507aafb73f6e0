"""The plain decoder built from the weights: equal to the reference on every test shape, standard ONNX only."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from codegen_deploy.artifacts import io_spec
from codegen_deploy.export.graph import IR_VERSION, OPSET
from codegen_deploy.export.plain import write_plain_graph
from codegen_deploy.model.reference import CodeGen
from tests.conftest import TEST_CONFIGS

ort = pytest.importorskip("onnxruntime")

# (batch, seq, past, left padding of row 0): a prompt, decode steps, past 0 and past > 0, padded rows.
CASES = [(1, 1, 0, 0), (3, 2, 6, 2), (2, 5, 0, 3), (1, 1, 9, 4), (2, 4, 3, 5)]

# Ops TensorRT 10's ONNX parser supports, which are all the plain graph may use.
TENSORRT_OPS = {
    "Add",
    "Cast",
    "Concat",
    "Div",
    "Equal",
    "Erf",
    "Gather",
    "Greater",
    "Identity",
    "LayerNormalization",
    "MatMul",
    "Mul",
    "Or",
    "Range",
    "Relu",
    "Reshape",
    "Shape",
    "Slice",
    "Softmax",
    "Sub",
    "Tanh",
    "Transpose",
    "Unsqueeze",
    "Where",
}


def random_case(config, dtype: torch.dtype, batch: int, seq: int, past: int, pad: int):
    """Inputs of one run: ids [B, S], mask [B, past + S] (row 0 left-padded), positions [B, S], cache."""
    g = torch.Generator().manual_seed(batch * 100 + seq * 10 + past)
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=g)  # [B, S]
    mask = torch.ones(batch, past + seq, dtype=torch.int64)  # [B, total]
    mask[0, :pad] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, past:]  # [B, S]
    kv_shape = (batch, config.n_head, past, config.head_dim)
    cache = [torch.randn(kv_shape, generator=g).to(dtype) for _ in range(2 * config.n_layer)]
    return ids, mask, positions, cache


def run_graph(session, config, ids, mask, positions, cache) -> list[np.ndarray]:
    """The graph's outputs: logits, then present.{i}.key/value."""
    feed = {
        io_spec.INPUT_IDS: ids.numpy(),
        io_spec.ATTENTION_MASK: mask.numpy(),
        io_spec.POSITION_IDS: positions.numpy(),
    }
    feed.update(zip(io_spec.past_names(config.n_layer), (t.numpy() for t in cache), strict=True))
    return session.run(None, feed)


def run_reference(model: CodeGen, ids, mask, positions, cache) -> list[np.ndarray]:
    with torch.no_grad():
        logits, present = model(ids, mask, positions, tuple(zip(cache[::2], cache[1::2], strict=True)))
    return [logits.numpy(), *(t.numpy() for kv in present for t in kv)]


def max_differences(ours: list[np.ndarray], ref: list[np.ndarray], real: np.ndarray) -> tuple[float, float]:
    """(max abs difference of the logits of real tokens, of the present cache)."""
    logits = float(np.abs(ours[0][real] - ref[0][real]).max())
    pairs = zip(ours[1:], ref[1:], strict=True)
    present = max(float(np.abs(a.astype(np.float32) - b.astype(np.float32)).max()) for a, b in pairs)
    return logits, present


def session(graph_path):
    return ort.InferenceSession(str(graph_path), providers=["CPUExecutionProvider"])


@pytest.fixture(
    scope="module",
    params=[(c, d) for c in TEST_CONFIGS for d in ("float32", "float16")],
    ids=lambda p: f"{p[0]}-{p[1]}",
)
def built(request, tmp_path_factory):
    """(model, built graph path) of a random model for each test shape and dtype."""
    name, dtype = request.param
    model = CodeGen.random(TEST_CONFIGS[name], seed=3, std=0.1, dtype=getattr(torch, dtype))
    graph_path, _ = write_plain_graph(model, tmp_path_factory.mktemp(f"plain-{name}-{dtype}"))
    return model, graph_path


def test_built_graph_equals_the_reference(built):
    """fp32 within 1e-5 of the reference logits; fp16 within its rounding (the same float32 islands)."""
    model, graph_path = built
    sess = session(graph_path)
    for case in CASES:
        inputs = random_case(model.config, model.dtype, *case)
        ours, ref = run_graph(sess, model.config, *inputs), run_reference(model, *inputs)
        real = inputs[1][:, case[2] :].bool().numpy()  # [B, S]: padding queries attend to nothing
        assert ours[0].dtype == np.float32 and ours[1].shape == (
            case[0],
            model.config.n_head,
            case[2] + case[1],
            model.config.head_dim,
        )
        logits, present = max_differences(ours, ref, real)
        scale = float(np.abs(ref[0][real]).max())
        if model.dtype == torch.float32:
            assert logits < 1e-5 and present < 1e-5, case
        else:
            assert logits < 1e-2 * scale and present < 1e-2, case


def test_built_graph_is_standard_onnx_with_the_pinned_versions(built):
    model, graph_path = built
    onnx.checker.check_model(str(graph_path))
    proto = onnx.load(str(graph_path), load_external_data=False)
    assert proto.ir_version == IR_VERSION
    assert [(o.domain, o.version) for o in proto.opset_import] == [("", OPSET)]
    assert {n.domain for n in proto.graph.node} == {""}  # no com.microsoft: TensorRT and genai read it
    assert {n.op_type for n in proto.graph.node} <= TENSORRT_OPS
    inputs = io_spec.decoder_inputs(
        model.config.n_layer, model.config.n_head, model.config.head_dim, str(model.dtype).removeprefix("torch.")
    )
    assert [v.name for v in proto.graph.input] == [s.name for s in inputs]


def test_float16_graph_keeps_the_float32_islands(built):
    """fp16: LayerNorm, rotary, scores and softmax in float32; matrices and cache in float16; logits float32.
    fp32: no Cast at all."""
    model, graph_path = built
    graph = onnx.shape_inference.infer_shapes(onnx.load(str(graph_path), load_external_data=False)).graph
    by_op = {}
    for n in graph.node:
        by_op.setdefault(n.op_type, []).append(n)
    if model.dtype == torch.float32:
        assert "Cast" not in by_op
        return
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}
    types.update({t.name: t.data_type for t in graph.initializer})
    f32, f16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    assert all(types[n.input[0]] == f32 for n in by_op["LayerNormalization"] + by_op["Softmax"])
    rotary = [n for n in by_op["Mul"] if "/rot/" in n.name]
    assert len(rotary) == 2 * model.config.n_layer and all(types[n.output[0]] == f32 for n in rotary)
    scores = [n for n in by_op["MatMul"] if n.name.endswith("/scores")]
    assert len(scores) == model.config.n_layer and all(types[n.input[1]] == f32 for n in scores)
    projections = [n for n in by_op["MatMul"] if "/scores" not in n.name and "/context" not in n.name]
    assert len(projections) == 4 * model.config.n_layer + 1 and all(types[n.input[1]] == f16 for n in projections)
    assert types[io_spec.LOGITS] == f32 and types[io_spec.present_name(0, "key")] == f16
