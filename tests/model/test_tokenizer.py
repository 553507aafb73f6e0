"""The tokenizers-based tokenizer gives transformers' CodeGenTokenizer ids on all HumanEval prompts."""

from __future__ import annotations

import gzip
import json
import shutil

import pytest

from codegen_deploy.errors import TokenizerError
from codegen_deploy.model.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def humaneval_prompts(shared_data) -> list[str]:
    with gzip.open(shared_data / "HumanEval.jsonl.gz", "rt") as f:
        return [json.loads(line)["prompt"] for line in f]


@pytest.fixture(scope="module")
def vocab_merges_dir(real_tokenizer_dir, tmp_path_factory):
    """The real tokenizer without tokenizer.json: vocab.json + merges.txt + added_tokens.json only."""
    folder = tmp_path_factory.mktemp("vocab-merges")
    for name in ("vocab.json", "merges.txt", "added_tokens.json"):
        shutil.copy(real_tokenizer_dir / name, folder / name)
    return folder


@pytest.mark.parametrize("source", ["tokenizer.json", "vocab+merges"])
def test_ids_equal_transformers_on_humaneval(real_tokenizer_dir, vocab_merges_dir, humaneval_prompts, source):
    transformers = pytest.importorskip("transformers", reason="transformers is the tokenizer oracle")
    oracle = transformers.CodeGenTokenizer.from_pretrained(str(real_tokenizer_dir))
    ours = load_tokenizer(real_tokenizer_dir if source == "tokenizer.json" else vocab_merges_dir)
    assert len(humaneval_prompts) == 164
    mismatched = [i for i, p in enumerate(humaneval_prompts) if ours.encode(p) != oracle(p)["input_ids"]]
    assert mismatched == []
    assert ours.eos_token_id == 50256 and ours.vocab_size == 50295


def test_whitespace_runs_are_single_tokens(real_tokenizer_dir):
    tok = load_tokenizer(real_tokenizer_dir)
    ids = tok.encode("def f():\n        return 1\n")
    # Runs of 31..2 spaces are ids 50257..50286: 8 spaces are one token, 50257 + (31 - 8).
    assert ids[4] == 50257 + 31 - 8


def test_decode_round_trips_multibyte_text(real_tokenizer_dir, humaneval_prompts):
    tok = load_tokenizer(real_tokenizer_dir)
    for text in [*humaneval_prompts[:20], "# naïve café: ünïcödé ✓ 数据 🙂\n\tx = 1\n"]:
        assert tok.decode(tok.encode(text)) == text


def test_trained_tokenizer_of_the_default_checkpoint(tiny_checkpoint):
    tok = load_tokenizer(tiny_checkpoint)
    text = "def add(a, b):\n    return a + b  # ü\n"
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode([tok.eos_token_id]) == "<|endoftext|>"


def test_missing_tokenizer_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(TokenizerError, match="no tokenizer.json and no vocab.json"):
        load_tokenizer(tmp_path)


def test_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(TokenizerError, match="is not a model folder"):
        load_tokenizer(tmp_path)


def test_corrupted_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="not a readable tokenizer.json"):
        load_tokenizer(tmp_path)


def test_added_tokens_with_wrong_ids_are_refused(vocab_merges_dir, tmp_path):
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(vocab_merges_dir / name, tmp_path / name)
    (tmp_path / "added_tokens.json").write_text(json.dumps({"  ": 60000}))
    with pytest.raises(TokenizerError, match="should have id 60000"):
        load_tokenizer(tmp_path)
