"""The export's check of a quantized fused graph tells a correct quantization from a broken one on random weights:
correct int8 and int4 graphs pass on every test shape, the same graphs with every scale doubled fail."""

from __future__ import annotations

import shutil

import pytest

from codegen_deploy.artifacts.manifest import read_manifest
from codegen_deploy.config import ModelConfig
from codegen_deploy.errors import ValidationError
from codegen_deploy.export import layers
from codegen_deploy.model.make_checkpoint import SMALL_SHAPES
from codegen_deploy.model.reference import CodeGen
from codegen_deploy.model.weights import save_checkpoint
from codegen_deploy.pipeline import add_fused_graph, export_model
from tests.conftest import TEST_CONFIGS

pytest.importorskip("onnxruntime")

# Every shape with a fused graph that the tests and the demo use (head_dim a multiple of 16), with the weight
# scale their checkpoints get (make_checkpoint: std 0.1 for small shapes).
SHAPES = {
    "tiny": TEST_CONFIGS["tiny"],
    "fused-test": ModelConfig(n_layer=2, n_embd=64, n_head=4, rotary_dim=8, n_positions=40, n_inner=128, vocab_size=96),
    "demo": SMALL_SHAPES["demo"],
}


@pytest.fixture(scope="module", params=list(SHAPES))
def plain_export(request, tmp_path_factory):
    """(model, a plain export of it) for each shape."""
    folder = tmp_path_factory.mktemp(request.param)
    model = CodeGen.random(SHAPES[request.param], seed=0, std=0.1)
    save_checkpoint(model, folder / "checkpoint")
    export = export_model(folder / "checkpoint", folder / "export", validate=False, fused=False, progress=print)
    return model, export


def doubled_scales(quantize):
    """A quantizer whose scales are twice what they should be: a broken quantization."""

    def broken(*args):
        q, scales = quantize(*args)
        return q, scales * 2

    return broken


def add_checked(model, export, weights: str, tmp_path) -> dict:
    """The fused graph with `weights` added to a copy of `export` and checked as an export checks it: its report."""
    folder = tmp_path / f"export-{weights}"
    shutil.copytree(export, folder)
    add_fused_graph(folder, model, weights=weights, progress=print)
    return read_manifest(folder)["fused_validation"]


@pytest.mark.slow
@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_correct_quantization_passes_and_doubled_scales_fail(plain_export, weights, tmp_path, monkeypatch):
    model, export = plain_export
    report = add_checked(model, export, weights, tmp_path / "ok")
    assert report["passed"], report["failures"]
    assert sum(row.get("top1_total", 0) for row in report["rows"]) == 32  # 4 prompts x 8 steps decide, not 2 x 4

    monkeypatch.setattr(layers, "quantize_blockwise", doubled_scales(layers.quantize_blockwise))
    monkeypatch.setattr(layers, "quantize_channels", doubled_scales(layers.quantize_channels))
    with pytest.raises(ValidationError) as info:
        add_checked(model, export, weights, tmp_path / "broken")
    message = str(info.value)
    assert "logits' error" in message and "of their spread" in message
    assert info.value.report.spread_error > 2 * report["spread_error"]
    # What to do names options that exist (codegen-export has no --atol/--rtol).
    assert "export without --quantize" in message and "loosen --atol" not in message


def test_a_float_fused_graph_keeps_its_quick_check(plain_export, tmp_path):
    model, export = plain_export
    report = add_checked(model, export, "float", tmp_path)
    assert report["passed"] and sum(row.get("top1_total", 0) for row in report["rows"]) == 8
    assert report["max_abs"] < 1e-4 and report["tolerance"]["min_top1"] == 0.99
