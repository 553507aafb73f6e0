"""Shared fixtures: tiny random checkpoints in the HF layout, and the one way to find ../shared/data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from codegen_deploy.config import ModelConfig

REPO = Path(__file__).resolve().parents[1]

# Shapes for parity tests: tiny, odd head dims, rotary_dim < head_dim, rotary_dim == head_dim.
TEST_CONFIGS = {
    "tiny": ModelConfig(n_layer=2, n_embd=64, n_head=4, rotary_dim=8, n_positions=128, n_inner=256, vocab_size=320),
    "odd-head": ModelConfig(n_layer=3, n_embd=60, n_head=3, rotary_dim=6, n_positions=64, n_inner=120,
                            vocab_size=257, layer_norm_epsilon=1e-6),
    "full-rotary": ModelConfig(n_layer=1, n_embd=48, n_head=2, rotary_dim=24, n_positions=64, n_inner=96,
                               vocab_size=100, activation="gelu"),
}  # fmt: skip


def _gpu_available() -> str | None:
    """None if a CUDA GPU and tensorrt are usable here, else the reason they are not."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "tensorrt is not installed (pip install '.[gpu]' on a machine with an NVIDIA GPU)"
    try:
        import torch

        if not torch.cuda.is_available():
            return "no CUDA GPU on this machine"
    except ImportError:
        return "torch is not installed"
    return None


def pytest_collection_modifyitems(config, items):
    reason = None
    for item in items:
        if "gpu" in item.keywords:
            reason = reason or _gpu_available() or ""
            if reason:
                item.add_marker(pytest.mark.skip(reason=f"GPU test: {reason}"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (or $CODEGEN_DEPLOY_SHARED_DATA); tests that need it skip where it is absent."""
    path = Path(os.environ.get("CODEGEN_DEPLOY_SHARED_DATA", REPO.parent / "shared" / "data"))
    if not path.is_dir():
        pytest.skip(f"shared test data not found at {path} (a fresh clone has none; set CODEGEN_DEPLOY_SHARED_DATA)")
    return path


@pytest.fixture(scope="session")
def real_tokenizer_dir(shared_data) -> Path:
    """The real CodeGen-350M-mono tokenizer files."""
    return shared_data / "codegen-350M-mono-tokenizer"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A random 'tiny' CodeGen checkpoint with a tokenizer trained here: config.json, model.safetensors."""
    from codegen_deploy.make_checkpoint import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", shape="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_export(tiny_checkpoint, tmp_path_factory) -> Path:
    """An fp32 ONNX export folder of the tiny checkpoint, not validated, with the plain graph only
    (runtime tests that want the fused graph add it to a copy)."""
    from codegen_deploy.export.pipeline import export_model

    return export_model(tiny_checkpoint, tmp_path_factory.mktemp("export") / "tiny", validate=False, fused=False,
                        progress=lambda line: None)  # fmt: skip
