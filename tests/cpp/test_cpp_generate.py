"""The C++ program (examples/cpp: codegen_generate) generates the Python runtime's greedy tokens, token for token,
over the fused graph (cache written in place) and the plain graph (past-key-value I/O), for several prompts and
shapes; its seeded sampling repeats itself; a missing, foreign or damaged export is one `error:` line."""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from codegen_deploy.config import ModelConfig
from codegen_deploy.model.reference import CodeGen
from codegen_deploy.model.tokenizer import load_tokenizer
from codegen_deploy.model.weights import save_checkpoint
from tests.conftest import TEST_CONFIGS
from tests.cpp.conftest import run_generate

pytest.importorskip("onnxruntime")

# (config, dtype, fused graph weights). tiny, also in fp16 and with int8 weights in the fused graph; odd-head:
# head_dim 20, which GroupQueryAttention refuses, so the export has the plain graph only; wide: head_dim 256 as in
# 6B and 16B. All with the test tokenizer (2,000 ids, eos 0) and 256 positions.
SHAPES = {
    "tiny": (TEST_CONFIGS["tiny"], "float32", "float"),
    "tiny-fp16": (TEST_CONFIGS["tiny"], "float16", "float"),
    "tiny-int8": (TEST_CONFIGS["tiny"], "float32", "int8"),
    "odd-head": (TEST_CONFIGS["odd-head"], "float32", "float"),
    "wide": (
        ModelConfig(n_layer=2, n_embd=512, n_head=2, rotary_dim=64, n_positions=64, n_inner=128, vocab_size=300),
        "float32",
        "float",
    ),
}
PROMPTS = [
    "def fibonacci(n):\n",
    "import numpy as np\n\n\nclass Model:\n    def __init__(self):\n        self.x = 1\n",
    "# café ✓ 数据 🙂\nx = 1",
    "x",
]
NEW_TOKENS = 32


def _export(name: str, tokenizer_dir: Path, root: Path) -> Path:
    from codegen_deploy.pipeline import export_model

    config, dtype, weights = SHAPES[name]
    config = replace(config, n_positions=256, vocab_size=2048, bos_token_id=0, eos_token_id=0)
    checkpoint = root / f"{name}-checkpoint"
    save_checkpoint(CodeGen.random(config, seed=5, std=0.1), checkpoint)
    shutil.copy(tokenizer_dir / "tokenizer.json", checkpoint / "tokenizer.json")
    return export_model(
        checkpoint, root / name, dtype=dtype, validate=False, fused_weights=weights, progress=lambda line: None
    )


@pytest.fixture(scope="module")
def exports(tiny_checkpoint, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cpp-exports")
    return {name: _export(name, tiny_checkpoint, root) for name in SHAPES}


def python_greedy(folder: Path, graph: str, prompts: list[str], new_tokens: int = NEW_TOKENS) -> list[dict]:
    """The Python runtime's greedy completions (codegen_deploy.runtime) of each prompt, one at a time."""
    from codegen_deploy.runtime import generate, open_session

    tokenizer = load_tokenizer(folder)
    with open_session("onnxruntime", folder, graph=graph, threads=1, verify="size") as session:
        return [
            generate(session, tokenizer, p, max_new_tokens=new_tokens, temperature=0).completions[0].to_dict()
            for p in prompts
        ]


CASES = [("tiny", "fused"), ("tiny", "plain"), ("tiny-fp16", "fused"), ("tiny-fp16", "plain"), ("tiny-int8", "fused")]
CASES += [("odd-head", "plain"), ("wide", "fused"), ("wide", "plain")]


@pytest.mark.parametrize(("shape", "graph"), CASES, ids=[f"{s}-{g}" for s, g in CASES])
def test_greedy_tokens_equal_the_python_runtime(cpp_bin, exports, shape, graph):
    folder = exports[shape]
    expected = python_greedy(folder, graph, PROMPTS)
    for prompt, want in zip(PROMPTS, expected, strict=True):
        got = run_generate(
            cpp_bin, folder, prompt, "--graph", graph, "--max-new-tokens", str(NEW_TOKENS), "--threads", "1"
        )
        assert got["backend"] == f"onnxruntime-{graph}"
        assert got["prompt_ids"] == want["prompt_ids"]
        assert got["ids"] == want["ids"], f"{shape} {graph} {prompt!r}"
        assert got["text"] == want["text"]
        assert got["finish_reason"] == want["finish_reason"]


def test_a_long_context(cpp_bin, exports):
    """A ~190-token prompt and 60 new tokens: the in-place cache is written and read far into its buffer."""
    rng = random.Random(6)
    words = ["def", "x", "return", "(", ")", ":", "\n", "    ", "for", "in", "range", "1", "+", "=", "self", "."]
    prompt = " ".join(rng.choice(words) for _ in range(150))
    folder = exports["tiny"]
    for graph in ("fused", "plain"):
        [want] = python_greedy(folder, graph, [prompt], new_tokens=60)
        assert 180 <= len(want["prompt_ids"]) <= 196
        got = run_generate(cpp_bin, folder, prompt, "--graph", graph, "--max-new-tokens", "60", "--threads", "1")
        assert got["ids"] == want["ids"]


def test_auto_picks_the_fused_graph_and_falls_back_to_the_plain_one(cpp_bin, exports):
    assert run_generate(cpp_bin, exports["tiny"], "x", "--max-new-tokens", "2")["backend"] == "onnxruntime-fused"
    assert run_generate(cpp_bin, exports["odd-head"], "x", "--max-new-tokens", "2")["backend"] == "onnxruntime-plain"


def test_seeded_sampling_repeats_itself(cpp_bin, exports):
    folder = exports["tiny"]
    args = ["def f(", "--max-new-tokens", "24", "--temperature", "1.0", "--top-p", "0.95"]
    first = run_generate(cpp_bin, folder, *args, "--seed", "7")
    assert first["sampling"]["seed"] == 7
    assert run_generate(cpp_bin, folder, *args, "--seed", "7")["ids"] == first["ids"]
    assert run_generate(cpp_bin, folder, *args, "--graph", "plain", "--seed", "7")["ids"] == first["ids"]
    assert run_generate(cpp_bin, folder, *args, "--seed", "8")["ids"] != first["ids"]
    greedy = run_generate(cpp_bin, folder, "def f(", "--max-new-tokens", "24")["ids"]
    assert first["ids"] != greedy  # it does sample
    # The filters: top-k 1, or a top-p below the first token's probability, keep only the most likely token.
    assert run_generate(cpp_bin, folder, *args, "--top-k", "1", "--seed", "9")["ids"] == greedy
    sampled = [*args[:-2], "--top-p", "1e-9", "--seed", "9"]
    assert run_generate(cpp_bin, folder, *sampled)["ids"] == greedy


def test_ids_in_and_out_without_a_tokenizer(cpp_bin, exports, tmp_path):
    folder = tmp_path / "no-tokenizer"
    shutil.copytree(exports["tiny"], folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "tokenizer.json").unlink()
    del manifest["files"]["tokenizer.json"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    [want] = python_greedy(exports["tiny"], "fused", ["def f(x):"], new_tokens=8)
    got = run_generate(cpp_bin, folder, "--ids", ",".join(map(str, want["prompt_ids"])), "--max-new-tokens", "8")
    assert got["ids"] == want["ids"] and got["text"] is None


def _error(cpp_bin: Path, folder: Path, *args: str) -> str:
    result = run_generate(cpp_bin, folder, *args, check=False)
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    return result.stderr


def test_missing_or_foreign_exports_are_one_line_errors(cpp_bin, exports, tiny_checkpoint, tmp_path):
    assert "is not a folder" in _error(cpp_bin, tmp_path / "nowhere", "x")
    assert "has no manifest.json: it is not a finished export" in _error(cpp_bin, tiny_checkpoint, "x")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "manifest.json").write_text(json.dumps({"name": "some other tool", "files": {}}))
    assert "is not a codegen-deploy export manifest of format version 1" in _error(cpp_bin, foreign, "x")
    (foreign / "manifest.json").write_text("{not json")
    assert "is not readable JSON" in _error(cpp_bin, foreign, "x")
    assert "has no fused graph (" in _error(cpp_bin, exports["odd-head"], "x", "--graph", "fused")
    assert "exceeds the context of 256 tokens" in _error(cpp_bin, exports["tiny"], "x", "--max-new-tokens", "400")
    assert "outside the vocabulary" in _error(cpp_bin, exports["tiny"], "--ids", "5,99999")
    assert "unknown option --nope" in _error(cpp_bin, exports["tiny"], "x", "--nope")


def test_damaged_exports_are_one_line_errors(cpp_bin, exports, tmp_path):
    folder = tmp_path / "damaged"
    shutil.copytree(exports["tiny"], folder)
    manifest = json.loads((folder / "manifest.json").read_text())

    # A truncated file.
    graph = folder / "decoder_fused.onnx"
    data = graph.read_bytes()
    graph.write_bytes(data[:-10])
    assert "decoder_fused.onnx has" in _error(cpp_bin, folder, "x") and "truncated" in _error(cpp_bin, folder, "x")
    graph.write_bytes(data)

    # Manifest names that are not the decoder's (an edited n_layer).
    edited = json.loads(json.dumps(manifest))
    edited["model_config"]["n_layer"] = 3
    (folder / "manifest.json").write_text(json.dumps(edited))
    assert "does not have the 3-layer decoder's inputs (missing past_key_values.2.key" in _error(cpp_bin, folder, "x")

    # A graph that is not the one its manifest lists: odd-head's plain graph (3 layers) copied in, sizes fixed.
    other = exports["odd-head"] / "decoder.onnx"
    shutil.copy(other, folder / "decoder.onnx")
    edited = json.loads(json.dumps(manifest))
    edited["files"]["decoder.onnx"]["bytes"] = other.stat().st_size
    (folder / "manifest.json").write_text(json.dumps(edited))
    message = _error(cpp_bin, folder, "x", "--graph", "plain")
    assert "does not have the inputs its manifest lists (unexpected past_key_values.2.key" in message
