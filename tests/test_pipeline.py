"""The exported decoder: I/O contract, ONNX Runtime vs the reference, fp16 dtypes, external data, folder."""

from __future__ import annotations

import json
import logging

import numpy as np
import onnx
import pytest
import torch

from codegen_deploy.artifacts import io_spec
from codegen_deploy.artifacts.manifest import read_manifest, write_manifest
from codegen_deploy.config import ModelConfig
from codegen_deploy.errors import ExportError, ValidationError
from codegen_deploy.export.graph import IR_VERSION
from codegen_deploy.model.reference import CodeGen
from codegen_deploy.model.weights import load_checkpoint
from codegen_deploy.pipeline import add_fused_graph, export_model

ort = pytest.importorskip("onnxruntime")

ONNX_TYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.INT64: "int64"}


def graph_io(path) -> list[tuple[str, str, list]]:
    """(name, dtype, dims) of every graph input then output; dims are ints or symbolic names."""
    graph = onnx.load(str(path), load_external_data=False).graph
    out = []
    for v in [*graph.input, *graph.output]:
        t = v.type.tensor_type
        dims = [d.dim_param or d.dim_value for d in t.shape.dim]
        out.append((v.name, ONNX_TYPES[t.elem_type], dims))
    return out


def spec_io(config: ModelConfig, cache_dtype: str) -> list[tuple[str, str, list]]:
    args = (config.n_layer, config.n_head, config.head_dim)
    specs = [
        *io_spec.decoder_inputs(*args, cache_dtype),
        *io_spec.decoder_outputs(*args, config.vocab_size, cache_dtype),
    ]
    return [(s.name, s.dtype, list(s.shape)) for s in specs]


def run_both(folder, model: CodeGen, batch: int, seq: int, past: int, pad: int = 0):
    """ORT and reference outputs for random ids after a random cache of `past`; row 0 has `pad` left pads."""
    config = model.config
    g = torch.Generator().manual_seed(batch * 100 + seq * 10 + past)
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=g)  # [B, T]
    mask = torch.ones(batch, past + seq, dtype=torch.int64)  # [B, total]
    mask[0, :pad] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, past:]  # [B, T]
    cache = [
        torch.randn(batch, config.n_head, past, config.head_dim, generator=g).to(model.dtype)
        for _ in range(2 * config.n_layer)
    ]
    with torch.no_grad():
        logits, present = model(ids, mask, pos, tuple(zip(cache[::2], cache[1::2], strict=True)))
    session = ort.InferenceSession(str(folder / io_spec.GRAPH_FILE), providers=["CPUExecutionProvider"])
    feed = {io_spec.INPUT_IDS: ids.numpy(), io_spec.ATTENTION_MASK: mask.numpy(), io_spec.POSITION_IDS: pos.numpy()}
    feed.update(zip(io_spec.past_names(config.n_layer), (t.numpy() for t in cache), strict=True))
    ours = session.run(None, feed)
    ref = [logits.numpy(), *(t.numpy() for kv in present for t in kv)]
    return ours, ref, mask[:, past:].bool().numpy()


def test_io_names_dtypes_and_dims_follow_io_spec(fp32_export):
    config = ModelConfig.from_file(fp32_export)
    assert graph_io(fp32_export / io_spec.GRAPH_FILE) == spec_io(config, "float32")


def test_folder_holds_a_complete_checked_export(fp32_export, export_progress):
    names = {p.name for p in fp32_export.iterdir()}
    assert {
        io_spec.GRAPH_FILE,
        "config.json",
        "tokenizer.json",
        io_spec.GENAI_CONFIG_FILE,
        io_spec.MANIFEST_FILE,
    } <= names
    assert io_spec.DATA_FILE not in names  # small graphs get their weights inline by default
    from codegen_deploy.verify.validate import check_graph

    check_graph(fp32_export / io_spec.GRAPH_FILE)  # the streamed inline file is a valid model
    manifest = read_manifest(fp32_export, verify="sha256")
    config = ModelConfig.from_file(fp32_export)
    assert manifest["model_config"] == config.to_dict()
    assert manifest["fill_in_the_middle"] is None  # CodeGen1's tokenizer has no fill-in-the-middle tokens
    assert manifest["dtype"] == manifest["cache_dtype"] == manifest["logits_dtype"] == "float32"
    assert [(s["name"], s["dtype"], s["shape"]) for s in manifest["inputs"] + manifest["outputs"]] == spec_io(
        config, "float32"
    )
    assert manifest["validation"]["passed"] and manifest["versions"]["torch"] == torch.__version__
    assert not [p for p in fp32_export.parent.iterdir() if p.name.startswith(".")]  # no temp folder left
    stages = [line.split()[0] for line in export_progress if line[:1].isalpha()]
    for stage in ("resolve", "load", "build", "fused", "validate", "write"):
        assert stage in stages
    assert manifest["method"] == "built" and manifest["ir_version"] == IR_VERSION


def test_the_fused_check_names_its_reference_once(fp32_export, export_progress):
    titles = [table.splitlines()[0] for table in export_progress if table.startswith("parity:")]
    assert titles == ["parity: onnxruntime-fused against the reference torch (recorded), 4 new tokens, teacher-forced"]


def test_the_library_prints_nothing_and_logs_its_progress(tiny_checkpoint, tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO, logger="codegen_deploy.pipeline")
    export_model(tiny_checkpoint, tmp_path / "out", validate=False, fused=False)
    assert capsys.readouterr().out == ""  # stdout belongs to the program that called export_model
    stages = {r.getMessage().split()[0] for r in caplog.records if r.name == "codegen_deploy.pipeline"}
    assert {"resolve", "load", "build", "write"} <= stages


@pytest.mark.parametrize(("batch", "seq", "past", "pad"), [(1, 1, 0, 0), (3, 2, 6, 2), (2, 5, 0, 3), (1, 1, 9, 4)])
def test_onnxruntime_equals_reference_fp32(fp32_export, tiny_checkpoint, batch, seq, past, pad):
    """Several batch, seq and past dims, past 0 included, with left padding."""
    model = load_checkpoint(tiny_checkpoint)
    ours, ref, real = run_both(fp32_export, model, batch, seq, past, pad)
    np.testing.assert_allclose(ours[0][real], ref[0][real], atol=1e-4, rtol=0)
    for a, b in zip(ours[1:], ref[1:], strict=True):
        assert a.shape == (batch, model.config.n_head, past + seq, model.config.head_dim)
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)


def test_validation_report_prompt_and_decode_steps(fp32_export, tiny_checkpoint):
    from codegen_deploy.verify.validate import validate_export

    report = validate_export(fp32_export / io_spec.GRAPH_FILE, load_checkpoint(tiny_checkpoint))
    assert report.passed and report.top1 == 1.0 and report.rows[0].max_abs < 1e-4
    steps = report.info["steps"]
    assert steps[0].startswith("past 0 + ") and len(steps) >= 3
    assert all(not s.startswith("past 0 ") for s in steps[1:])
    assert [r.name for r in report.rows] == ["logits", *io_spec.present_names(report_layers(tiny_checkpoint))]
    assert report.rows[0].top1_total > 0 and all(r.top1_total == 0 for r in report.rows[1:])
    assert "PASSED" in report.table() and report.to_dict()["passed"] is True


def report_layers(checkpoint) -> int:
    return ModelConfig.from_file(checkpoint).n_layer


def test_validation_fails_for_a_different_model(fp32_export, tiny_checkpoint):
    """Not a vacuous check: other weights of the same shape exceed the tolerance, with exit code 3."""
    from codegen_deploy.verify.validate import validate_export

    other = CodeGen.random(ModelConfig.from_file(tiny_checkpoint), seed=1, std=0.1)
    with pytest.raises(ValidationError) as info:
        validate_export(fp32_export / io_spec.GRAPH_FILE, other)
    assert info.value.exit_code == 3 and "\n" not in str(info.value)
    assert not info.value.report.passed and "FAILED" in info.value.report.table()


def test_fp16_graph_dtypes_and_float32_islands(fp16_export):
    config = ModelConfig.from_file(fp16_export)
    assert graph_io(fp16_export / io_spec.GRAPH_FILE) == spec_io(config, "float16")
    graph = onnx.shape_inference.infer_shapes(
        onnx.load(str(fp16_export / io_spec.GRAPH_FILE), load_external_data=False)
    ).graph
    ops = {n.op_type for n in graph.node}
    assert "Cast" in ops
    # The float32 islands: LayerNorm and softmax take float32 inputs (Cast nodes from the model's .float()).
    types = {v.name: v.type.tensor_type.elem_type for v in graph.value_info}
    islands = [n for n in graph.node if n.op_type in ("Softmax", "LayerNormalization")]
    assert len(islands) == 2 * config.n_layer + 1  # softmax and ln_1 per layer, ln_f
    assert all(types[n.input[0]] == onnx.TensorProto.FLOAT for n in islands)
    # Weight matrices are float16 (qkv, out_proj, fc_in, fc_out per layer, embedding, lm_head); only the
    # rotary tables stay float32.
    matrices = [t for t in graph.initializer if len(t.dims) == 2]
    assert sum(t.data_type == onnx.TensorProto.FLOAT16 for t in matrices) >= 4 * config.n_layer + 2
    for t in matrices:
        if t.data_type != onnx.TensorProto.FLOAT16:
            assert t.dims[0] == config.n_positions and t.dims[1] in (config.rotary_dim // 2, config.rotary_dim)


def test_fp16_runs_in_onnxruntime_within_its_tolerance(fp16_export):
    manifest = read_manifest(fp16_export)
    report = manifest["validation"]
    assert manifest["dtype"] == manifest["cache_dtype"] == "float16" and manifest["logits_dtype"] == "float32"
    assert report["passed"] and report["dtype"] == "float16"
    logits = next(row for row in report["rows"] if row["name"] == "logits")
    assert 0 < logits["max_rel"] <= report["tolerance"]["rtol"] and logits["within_tolerance"]
    assert report["cpu_float32_ops"] and "MatMul" in report["cpu_float32_ops"]  # said, not hidden


def test_external_data_forced_on_a_small_model(fp16_export):
    from codegen_deploy.verify.validate import check_graph

    data = fp16_export / io_spec.DATA_FILE
    assert data.is_file() and data.stat().st_size > (fp16_export / io_spec.GRAPH_FILE).stat().st_size
    assert read_manifest(fp16_export, verify="sha256")["data_file"] == io_spec.DATA_FILE
    graph = onnx.load(str(fp16_export / io_spec.GRAPH_FILE), load_external_data=False).graph
    locations = {
        e.value
        for t in graph.initializer
        if t.data_location == onnx.TensorProto.EXTERNAL
        for e in t.external_data
        if e.key == "location"
    }
    assert locations == {io_spec.DATA_FILE}  # one data file, beside the graph
    check_graph(fp16_export / io_spec.GRAPH_FILE)


@pytest.mark.parametrize("which", ["fp32", "fp16"])
def test_every_export_writes_and_checks_the_fused_graph(fp32_export, fp16_export, which):
    folder = fp32_export if which == "fp32" else fp16_export
    manifest = read_manifest(folder, verify="sha256")
    assert manifest["fused_graph_file"] == io_spec.FUSED_GRAPH_FILE and (folder / io_spec.FUSED_GRAPH_FILE).is_file()
    assert manifest["fused_dtype"] == ("float32" if which == "fp32" else "float16")
    validation = manifest["fused_validation"]
    assert validation["passed"] and validation["greedy_agreement"] == 1.0
    # The fused graph reads its weights from the plain graph's file (decoder.onnx itself once inlined).
    shared = io_spec.DATA_FILE if which == "fp16" else io_spec.GRAPH_FILE
    assert manifest["fused_shared_data_file"] == shared
    graph = onnx.load(str(folder / io_spec.FUSED_GRAPH_FILE), load_external_data=False).graph
    external = [t for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    locations = {e.value for t in external for e in t.external_data if e.key == "location"}
    assert shared in locations and len(external) >= 4 * manifest["model_config"]["n_layer"]
    assert (folder / io_spec.FUSED_DATA_FILE).stat().st_size < (folder / shared).stat().st_size / 20  # rotary


@pytest.mark.parametrize(
    "weights, cache, want", [("int8", "auto", "float16"), ("float", "float16", "float16"), ("int4", "int8", "int8")]
)
def test_kv_cache_dtype_is_checked_and_recorded(tiny_checkpoint, tmp_path, weights, cache, want):
    """The cache asked for (auto: float16 under quantized weights) passes the export's check within the
    tolerance of what makes the graph lossy and is what the manifest's fused inputs and FusedGraph say."""
    from codegen_deploy.artifacts.manifest import FusedGraph

    folder = export_model(
        tiny_checkpoint, tmp_path / "out", fused_weights=weights, fused_cache=cache, progress=lambda line: None
    )
    manifest = read_manifest(folder, verify="size")
    fused = FusedGraph.of(manifest)
    check_dtype = "float16" if want == "float16" else "float32"
    assert (fused.dtype, fused.cache_dtype, fused.check_dtype) == ("float32", want, check_dtype)
    assert {i["dtype"] for i in manifest["fused_inputs"] if i["name"].startswith("past_key_values.")} == {want}
    assert manifest["fused_validation"]["passed"]
    if weights == "float":  # float16's tolerance, still a tight check
        assert manifest["fused_validation"]["tolerance"]["atol"] == 2e-2


@pytest.mark.parametrize("dtype, rotary", [("float16", "auto"), ("float32", "graph")])
def test_an_int8_cache_where_it_cannot_run_is_refused_before_any_work(tiny_checkpoint, tmp_path, dtype, rotary):
    with pytest.raises(ExportError, match="int8 KV cache runs on ONNX Runtime's CPU provider"):
        export_model(tiny_checkpoint, tmp_path / "out", dtype=dtype, fused_cache="int8", fused_rotary=rotary)
    assert not (tmp_path / "out").exists()


# head_dim 24 passes a multiple-of-8 check, but GroupQueryAttention on CPU refuses it at run time;
# head_dim 20 (odd-head) is not a multiple of 8 either.
ODD_SHAPES = {
    "head_dim 24": ModelConfig(
        n_layer=1, n_embd=96, n_head=4, rotary_dim=8, n_positions=64, n_inner=96, vocab_size=100
    ),
    "head_dim 20": ModelConfig(
        n_layer=1, n_embd=60, n_head=3, rotary_dim=6, n_positions=64, n_inner=96, vocab_size=100
    ),
}


@pytest.mark.parametrize("shape", list(ODD_SHAPES))
def test_shapes_gqa_cannot_run_export_the_plain_graph_with_a_note(tmp_path, capsys, shape):
    from codegen_deploy.cli.export import main
    from codegen_deploy.model.weights import save_checkpoint

    save_checkpoint(CodeGen.random(ODD_SHAPES[shape], seed=0, std=0.1), tmp_path / "ckpt")
    assert main(["--model", str(tmp_path / "ckpt"), "--output", str(tmp_path / "out")]) == 0  # validated
    assert "note: no fused graph (GroupQueryAttention on CPU needs a head_dim" in capsys.readouterr().err
    manifest = read_manifest(tmp_path / "out")
    assert "multiple of 16" in manifest["fused_skipped"] and manifest["validation"]["passed"]
    assert "fused_graph_file" not in manifest and not (tmp_path / "out" / io_spec.FUSED_GRAPH_FILE).exists()


@pytest.mark.slow
def test_trace_method_exports_the_dynamo_trace_validated_and_recorded(tiny_checkpoint, tmp_path):
    from codegen_deploy.pipeline import export_model

    lines: list[str] = []
    out = export_model(tiny_checkpoint, tmp_path / "out", method="trace", fused=False, progress=lines.append)
    manifest = read_manifest(out, verify="sha256")
    assert manifest["method"] == "trace" and manifest["trace_dims"] == {"batch": 2, "seq": 3, "past": 5}
    assert manifest["validation"]["passed"] and manifest["ir_version"] == IR_VERSION
    assert onnx.load(str(out / io_spec.GRAPH_FILE), load_external_data=False).ir_version == IR_VERSION
    assert "trace" in [line.split()[0] for line in lines if line[:1].isalpha()]


def test_unknown_method_and_too_old_opset_are_one_line_errors(tiny_checkpoint, tmp_path):
    from codegen_deploy.errors import ExportError
    from codegen_deploy.pipeline import export_model

    with pytest.raises(ExportError, match="unknown export method 'jit'"):
        export_model(tiny_checkpoint, tmp_path / "a", method="jit")
    with pytest.raises(ExportError, match="opset 16 is too old: --method built needs 17"):
        export_model(tiny_checkpoint, tmp_path / "b", opset=16)
    with pytest.raises(ExportError, match="opset 17 is too old: --method trace needs 18"):
        export_model(tiny_checkpoint, tmp_path / "c", method="trace", opset=17)
    assert not list(tmp_path.iterdir())


@pytest.fixture
def providers(monkeypatch):
    """Set the providers this onnxruntime offers: providers(["CUDAExecutionProvider", ...])."""
    return lambda names: monkeypatch.setattr(ort, "get_available_providers", lambda: list(names))


def test_fused_rotary_auto_applies_it_before_gqa_for_cuda_in_half_precision(providers):
    from codegen_deploy.errors import ExportError
    from codegen_deploy.pipeline import fused_rotary_for

    providers(["CPUExecutionProvider"])
    assert [fused_rotary_for("auto", d) for d in ("float32", "float16", "bfloat16")] == ["gqa"] * 3
    providers(["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert [fused_rotary_for("auto", d) for d in ("float32", "float16", "bfloat16")] == ["gqa", "graph", "graph"]
    assert fused_rotary_for("gqa", "float16") == "gqa" and fused_rotary_for("graph", "float32") == "graph"
    with pytest.raises(ExportError, match="unknown fused rotary 'cuda': choose one of auto, gqa, graph"):
        fused_rotary_for("cuda", "float16")


def test_bfloat16_validation_says_what_is_missing(tiny_checkpoint, tmp_path, providers, monkeypatch):
    from codegen_deploy.errors import ExportError
    from codegen_deploy.pipeline import export_model

    providers(["CPUExecutionProvider"])
    with pytest.raises(ExportError, match="this onnxruntime has no CUDAExecutionProvider.*: add --no-validate"):
        export_model(tiny_checkpoint, tmp_path / "a", dtype="bfloat16")
    providers(["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ExportError, match="CUDA provider, and no CUDA GPU is visible: add --no-validate"):
        export_model(tiny_checkpoint, tmp_path / "b", dtype="bfloat16")
    assert not list(tmp_path.iterdir())


def test_bfloat16_exports_without_validation(tiny_checkpoint, tmp_path):
    from codegen_deploy.pipeline import export_model
    from codegen_deploy.verify.validate import check_graph

    out = export_model(tiny_checkpoint, tmp_path / "bf16", dtype="bfloat16", validate=False, progress=lambda line: None)
    manifest = read_manifest(out, verify="sha256")
    assert manifest["cache_dtype"] == "bfloat16" and manifest["validation"] is None
    assert "bfloat16" in manifest["fused_skipped"]  # the fused graph takes float32 and float16 only
    check_graph(out / io_spec.GRAPH_FILE)


@pytest.mark.gpu("onnxruntime")
def test_bfloat16_export_is_validated_on_cuda(tiny_checkpoint, tmp_path):
    from codegen_deploy.pipeline import export_model
    from codegen_deploy.verify.validate import cuda_bfloat16_missing

    if missing := cuda_bfloat16_missing():
        pytest.skip(f"GPU test: {missing}")
    out = export_model(tiny_checkpoint, tmp_path / "bf16", dtype="bfloat16", progress=lambda line: None)
    manifest = read_manifest(out, verify="sha256")
    validation = manifest["validation"]
    assert validation["passed"] and validation["providers"][0] == "CUDAExecutionProvider"
    assert "cpu_float32_ops" not in validation and manifest["cache_dtype"] == "bfloat16"
    assert "bfloat16" in manifest["fused_skipped"]  # the fused graph takes float32 and float16 only


FUSED_CONFIG = ModelConfig(n_layer=2, n_embd=64, n_head=4, rotary_dim=8, n_positions=40, n_inner=128, vocab_size=96)


def test_add_fused_graph_records_it_in_the_manifest(tmp_path):
    from codegen_deploy.model.weights import save_checkpoint

    checkpoint = tmp_path / "checkpoint"
    save_checkpoint(CodeGen.random(FUSED_CONFIG, seed=5, std=0.1), checkpoint)
    export = tmp_path / "export"
    export.mkdir()
    (export / "config.json").write_text(json.dumps(FUSED_CONFIG.to_hf_config()))
    write_manifest(export, {"model_config": FUSED_CONFIG.to_dict(), "source": str(checkpoint), "dtype": "float32"})

    add_fused_graph(export)  # loads the model from the manifest's source
    manifest = read_manifest(export, verify="sha256")
    assert manifest["fused_graph_file"] == io_spec.FUSED_GRAPH_FILE
    assert io_spec.GENAI_GRAPH_FILE in manifest["files"]  # onnxruntime-genai runs the new fused graph
    genai = json.loads((export / io_spec.GENAI_CONFIG_FILE).read_text())["model"]["decoder"]
    assert genai["filename"] == io_spec.GENAI_GRAPH_FILE
    assert {io_spec.FUSED_GRAPH_FILE, io_spec.FUSED_DATA_FILE} <= set(manifest["files"])
    assert manifest["source"] == str(checkpoint)  # the rest of the manifest is kept
    assert [i["name"] for i in manifest["fused_inputs"]][:3] == [
        io_spec.INPUT_IDS,
        io_spec.SEQLENS_K,
        io_spec.TOTAL_SEQUENCE_LENGTH,
    ]


def test_add_fused_graph_that_fails_its_check_leaves_no_fused_graph(
    fp32_export, tiny_checkpoint, tmp_path, monkeypatch
):
    """The fused graph is checked against the reference: one checked against another model's logits fails, and
    the export is left as a working plain export (no fused files, no fused entries, checksums intact)."""
    import shutil

    from codegen_deploy.verify import fused as fused_check

    export = tmp_path / "export"
    shutil.copytree(fp32_export, export)
    model = load_checkpoint(tiny_checkpoint)
    other = CodeGen.random(model.config, seed=99, std=0.1)
    from codegen_deploy import pipeline

    monkeypatch.setattr(pipeline, "record_reference", lambda m, **kw: fused_check.record_reference(other, **kw))
    with pytest.raises(ValidationError):
        add_fused_graph(export, model, progress=lambda line: None)
    manifest = read_manifest(export, verify="sha256")
    assert not any(key.startswith("fused_") for key in manifest)
    assert not (export / io_spec.FUSED_GRAPH_FILE).exists()
    # onnxruntime-genai is pointed back at the plain graph: its fused wrapper would read files that are gone
    assert not (export / io_spec.GENAI_GRAPH_FILE).exists() and io_spec.GENAI_GRAPH_FILE not in manifest["files"]
    genai = json.loads((export / io_spec.GENAI_CONFIG_FILE).read_text())["model"]["decoder"]
    assert genai["filename"] == io_spec.GRAPH_FILE
