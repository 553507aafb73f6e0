"""codegen-export's one-line errors, and exports that fail or are interrupted leave nothing complete-looking."""

from __future__ import annotations

import json
import shutil

import pytest

from codegen_deploy import pipeline
from codegen_deploy.cli.export import main
from codegen_deploy.errors import ArtifactError


def one_error_line(capsys, argv) -> str:
    code = main(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code != 0 and len(lines) == 1 and lines[0].startswith("error: "), captured.err
    return lines[0]


def test_unknown_size(capsys, tmp_path):
    line = one_error_line(capsys, ["--size", "7B", "--output", str(tmp_path / "out")])
    assert "unknown size '7B'" in line and "350M" in line


def test_unknown_data(capsys, tmp_path):
    assert "unknown data 'python'" in one_error_line(capsys, ["--size", "2B", "--data", "python"])


def test_missing_model_folder(capsys, tmp_path):
    line = one_error_line(capsys, ["--model", str(tmp_path / "no-such-folder"), "--output", str(tmp_path / "o")])
    assert line.startswith(f"error: no such folder: {tmp_path / 'no-such-folder'} (given to --model): check the path")


def test_size_and_model_together(capsys, tmp_path):
    assert "not both" in one_error_line(capsys, ["--size", "350M", "--model", str(tmp_path)])


def test_non_codegen_model(capsys, tmp_path):
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    line = one_error_line(capsys, ["--model", str(tmp_path / "gpt2"), "--output", str(tmp_path / "out")])
    assert "not 'codegen'" in line
    assert not (tmp_path / "out").exists()


def test_existing_output_is_refused_without_force(capsys, tiny_checkpoint, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "kept.txt").write_text("x")  # an empty folder may be replaced: nothing is lost
    line = one_error_line(capsys, ["--model", str(tiny_checkpoint), "--output", str(tmp_path / "out")])
    assert "already exists" in line and "--force" in line


def test_unwritable_output(capsys, tiny_checkpoint, tmp_path):
    (tmp_path / "a-file").write_text("x")  # a folder cannot be made under a file, even as root
    line = one_error_line(capsys, ["--model", str(tiny_checkpoint), "--output", str(tmp_path / "a-file" / "out")])
    assert "a-file is a file, not a folder" in line


def test_conflicting_dtype_options(capsys, tiny_checkpoint):
    assert "disagree" in one_error_line(capsys, ["--model", str(tiny_checkpoint), "--fp16", "--dtype", "float32"])


def test_engine_without_tensorrt_is_one_line(capsys, tiny_checkpoint, tmp_path):
    pytest.importorskip("codegen_deploy.export.tensorrt")
    try:
        import tensorrt  # noqa: F401

        pytest.skip("tensorrt is installed here: --engine would build an engine")
    except ImportError:
        pass
    line = one_error_line(capsys, ["--model", str(tiny_checkpoint), "--output", str(tmp_path / "o"), "--engine"])
    assert "tensorrt is not installed" in line
    assert not (tmp_path / "o").exists()


def test_default_output_names():
    assert str(pipeline.default_output(size="350M", dtype="float16")) == "exports/codegen-350M-mono-fp16"
    assert str(pipeline.default_output("Salesforce/codegen-2B-multi")) == "exports/codegen-2B-multi"


def test_interrupted_export_leaves_nothing_and_keeps_the_old_output(
    fp32_export, tiny_checkpoint, tmp_path, monkeypatch
):
    """Ctrl-C after the graph was saved and validated: no output, no temp folder; a --force target is kept."""
    import onnx_ir

    from codegen_deploy.artifacts import io_spec
    from codegen_deploy.export import trace as onnx_export

    # Re-use the session's traced graph instead of tracing again (tracing is the slow part).
    monkeypatch.setattr(onnx_export, "trace", lambda *a, **k: onnx_ir.load(fp32_export / io_spec.GRAPH_FILE))
    saved = []

    def interrupt(folder, config, fused):
        saved.append(sorted(p.name for p in folder.iterdir()))
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "write_genai_files", interrupt)
    with pytest.raises(KeyboardInterrupt):
        pipeline.export_model(tiny_checkpoint, tmp_path / "new", progress=lambda line: None)
    assert io_spec.GRAPH_FILE in saved[0]  # the interrupt came after files were written
    assert sorted(p.name for p in tmp_path.iterdir()) == []

    old = tmp_path / "old"
    shutil.copytree(tiny_checkpoint, old)
    before = sorted(p.name for p in old.iterdir())
    with pytest.raises(KeyboardInterrupt):
        pipeline.export_model(tiny_checkpoint, old, force=True, validate=False, progress=lambda line: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]
    assert sorted(p.name for p in old.iterdir()) == before


def test_bfloat16_needs_no_validate(capsys, tiny_checkpoint, tmp_path, monkeypatch):
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    line = one_error_line(
        capsys, ["--model", str(tiny_checkpoint), "--output", str(tmp_path / "o"), "--dtype", "bfloat16"]
    )
    assert "--no-validate" in line and "bfloat16" in line


def test_too_old_opset(capsys, tiny_checkpoint, tmp_path):
    assert "opset 13 is too old" in one_error_line(capsys, ["--model", str(tiny_checkpoint), "--opset", "13"])


def test_output_may_not_replace_the_source(capsys, tiny_checkpoint, monkeypatch):
    before = sorted(p.name for p in tiny_checkpoint.iterdir())
    line = one_error_line(capsys, ["--model", str(tiny_checkpoint), "--output", str(tiny_checkpoint), "--force"])
    assert "which this command reads" in line
    monkeypatch.chdir(tiny_checkpoint.parent)
    line = one_error_line(capsys, ["--model", tiny_checkpoint.name, "--output", ".", "--force"])
    assert "which this command reads" in line
    assert sorted(p.name for p in tiny_checkpoint.iterdir()) == before


def test_second_export_into_one_output_fails_at_once(capsys, tiny_checkpoint, tmp_path):
    from codegen_deploy.atomic import staging_folder

    with staging_folder(tmp_path / "out"):  # another run is writing out
        line = one_error_line(capsys, ["--model", str(tiny_checkpoint), "--output", str(tmp_path / "out")])
    assert "is being written by another run" in line


def fast_trace(monkeypatch, fp32_export):
    """Re-use the session's traced graph instead of tracing again (tracing is the slow part)."""
    import onnx_ir

    from codegen_deploy.artifacts import io_spec
    from codegen_deploy.export import trace

    monkeypatch.setattr(trace, "trace", lambda *a, **k: onnx_ir.load(fp32_export / io_spec.GRAPH_FILE))


def test_relative_model_is_recorded_absolute(fp32_export, tiny_checkpoint, tmp_path, monkeypatch):
    from codegen_deploy.artifacts.manifest import read_manifest

    fast_trace(monkeypatch, fp32_export)
    monkeypatch.chdir(tiny_checkpoint.parent)
    quiet = {"validate": False, "fused": False, "progress": lambda line: None}
    out = pipeline.export_model(tiny_checkpoint.name, tmp_path / "o", **quiet)
    assert read_manifest(out)["source"] == str(tiny_checkpoint)


def test_full_disk_while_writing_the_fused_graph_is_an_error(tiny_model, tmp_path, tmpfs):
    notes = []
    with tmpfs(tmp_path / "small", "512k") as disk, pytest.raises(ArtifactError, match="No space left on device"):
        options = pipeline._Options("built", None, False, None, True, "float", "gqa", "float32")
        pipeline._build_fused(tiny_model, disk, options, None, notes.append)
    assert notes == []  # not a note and a graph-less export


def test_fused_rotary_graph_is_checked_on_cpu_and_recorded(tiny_checkpoint, tmp_path):
    import onnx

    from codegen_deploy.artifacts import io_spec
    from codegen_deploy.artifacts.manifest import read_manifest

    out = tmp_path / "graph"
    assert main(["--model", str(tiny_checkpoint), "--output", str(out), "--fp16", "--fused-rotary", "graph"]) == 0
    manifest = read_manifest(out)
    assert manifest["fused_rotary"] == "graph" and manifest["fused_validation"]["passed"]
    assert manifest["fused_validation"]["greedy_agreement"] == 1.0
    props = {
        p.key: p.value for p in onnx.load(str(out / io_spec.FUSED_GRAPH_FILE), load_external_data=False).metadata_props
    }
    assert props["rotary"] == "graph"


def checkpoint_copy(tiny_checkpoint, tmp_path, config_change=None):
    """A copy of the tiny checkpoint with config.json's entries changed."""
    out = tmp_path / "checkpoint"
    shutil.copytree(tiny_checkpoint, out)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, **(config_change or {})}))
    return out


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"n_layer": 1e9}, "n_layer 1000000000 is out of range"),  # was: killed for memory
        ({"n_positions": 1e12}, "n_positions 1000000000000 is out of range"),  # was: an 8 TB allocation
        ({"n_head": 0}, "n_head 0 is out of range"),  # was: ZeroDivisionError
    ],
)
def test_config_numbers_are_one_line(capsys, tiny_checkpoint, tmp_path, monkeypatch, change, message):
    model = checkpoint_copy(tiny_checkpoint, tmp_path, change)
    monkeypatch.setattr(pipeline, "load_checkpoint", lambda *a, **k: pytest.fail("the model was loaded"))
    line = one_error_line(capsys, ["--model", str(model), "--output", str(tmp_path / "out")])
    assert message in line and not (tmp_path / "out").exists()


def test_a_model_larger_than_the_machine_is_one_line(capsys, tiny_checkpoint, tmp_path, monkeypatch):
    import codegen_deploy.memory

    # A machine of 100 kB (raising=False: without the check there is no such function).
    monkeypatch.setattr(codegen_deploy.memory, "machine_memory_bytes", lambda: 100_000, raising=False)
    line = one_error_line(capsys, ["--model", str(tiny_checkpoint), "--output", str(tmp_path / "out")])
    assert "GB of memory, this machine has 0.0 GB" in line and "n_layer" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", ["truncated", "zeros"])
def test_a_broken_tokenizer_is_refused_before_the_export(capsys, tiny_checkpoint, tmp_path, monkeypatch, damage):
    model = checkpoint_copy(tiny_checkpoint, tmp_path)
    tokenizer = model / "tokenizer.json"
    data = tokenizer.read_bytes()
    tokenizer.write_bytes(data[: len(data) // 2] if damage == "truncated" else bytes(1 << 20))
    monkeypatch.setattr(pipeline, "load_checkpoint", lambda *a, **k: pytest.fail("the model was loaded"))
    line = one_error_line(capsys, ["--model", str(model), "--output", str(tmp_path / "out")])
    assert f"{tokenizer} is not a readable tokenizer.json" in line and "re-download it" in line
    assert not (tmp_path / "out").exists()
