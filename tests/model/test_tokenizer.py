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


def test_the_fingerprint_is_the_mapping_not_the_files(real_tokenizer_dir, vocab_merges_dir, tmp_path):
    """tokenizer.json and vocab.json + merges.txt of one tokenizer: one fingerprint; one merge fewer (the same
    size): another."""
    ours = load_tokenizer(real_tokenizer_dir)
    assert load_tokenizer(vocab_merges_dir).fingerprint == ours.fingerprint
    body = json.loads((real_tokenizer_dir / "tokenizer.json").read_text())
    body["model"]["merges"] = body["model"]["merges"][:-1]
    (tmp_path / "tokenizer.json").write_text(json.dumps(body))
    other = load_tokenizer(tmp_path)
    assert other.vocab_size == ours.vocab_size and other.fingerprint != ours.fingerprint


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


# CodeGen2's fill-in-the-middle prompt as its model card writes it, around HumanEval-like gaps.
FIM_GAPS = [
    ("def hello_world():\n    ", "    return name", ""),
    ('def add(a, b):\n    """Add two numbers."""\n', "\n\nprint(add(1, 2))\n", "    return"),
    ("", "x = 1\n", ""),  # at the start of a file
    ("import os\n\n", "", "def "),  # at its end, part of the line typed
    ("s = 'héllo ✓'\n\tif s:\n", "\t\treturn s  # end\n", "\t\t"),
]


@pytest.fixture(scope="module")
def codegen2_tokenizer_dir(real_tokenizer_dir, tmp_path_factory):
    """CodeGen's real tokenizer with CodeGen2's fill-in-the-middle tokens added, as CodeGen2's has them."""
    from codegen_deploy.model.make_checkpoint import add_fim_tokens

    folder = tmp_path_factory.mktemp("codegen2-tokenizer")
    backend = load_tokenizer(real_tokenizer_dir)._tok
    add_fim_tokens(backend)
    backend.save(str(folder / "tokenizer.json"))
    return folder


@pytest.mark.parametrize(("prefix", "suffix", "middle"), FIM_GAPS)
def test_the_fim_prompt_is_the_model_cards_token_for_token(codegen2_tokenizer_dir, prefix, suffix, middle):
    """Tokenizer.infill against transformers' tokenizer with the same special tokens, on the model card's text."""
    transformers = pytest.importorskip("transformers", reason="transformers is the tokenizer oracle")
    oracle = transformers.AutoTokenizer.from_pretrained(str(codegen2_tokenizer_dir))
    oracle.add_special_tokens({"additional_special_tokens": ["<mask_1>", "<sep>", "<eom>"]})
    ours = load_tokenizer(codegen2_tokenizer_dir)
    text = prefix + "<mask_1>" + suffix + "<|endoftext|>" + "<sep>" + "<mask_1>" + middle
    ids = ours.infill(prefix, suffix, middle)
    assert ids == oracle(text)["input_ids"]
    assert ours.decode(ids) == text
    fim = ours.fim
    assert [ids.count(t) for t in (fim.mask, fim.sep, fim.eom, ours.eos_token_id)] == [2, 1, 0, 1]
    assert ours.end_ids == (ours.eos_token_id, fim.eom)


def test_codegen1_cannot_fill_in_the_middle(real_tokenizer_dir, codegen2_tokenizer_dir):
    from codegen_deploy.errors import InputError

    codegen1 = load_tokenizer(real_tokenizer_dir)
    assert codegen1.fim is None and codegen1.end_ids == (50256,)
    with pytest.raises(InputError, match="cannot fill in the middle.*CodeGen2"):
        codegen1.infill("def f():\n", "\n")
    codegen2 = load_tokenizer(codegen2_tokenizer_dir)
    assert codegen2.fim_for(51200) == codegen2.fim  # CodeGen's embedding has rows for them
    assert codegen2.fim_for(50295) is None  # a model without rows for the tokens cannot use them
