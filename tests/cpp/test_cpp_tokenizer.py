"""The C++ tokenizer (examples/cpp/src/tokenizer.cpp) computes the `tokenizers` library's ids and decoded text:
on HumanEval, on the strings of the tokenizer tests and edge cases, on random byte strings (invalid UTF-8,
emoji, long whitespace runs), for the real CodeGen tokenizer (tokenizer.json and vocab.json + merges.txt) and the
trained one of the test checkpoints; and the regex's Unicode classes split text as tokenizers' regex engine does.
"""

from __future__ import annotations

import gzip
import json
import random
import re
import shutil
from pathlib import Path

import pytest
from tokenizers import pre_tokenizers

from codegen_deploy.model.tokenizer import load_tokenizer
from tests.cpp.conftest import REPO, run_tokenizer

# The strings of tests/model/test_tokenizer.py, then edge cases of the regex, the added tokens and UTF-8.
EDGE_CASES = [
    "def f():\n        return 1\n",
    "# naïve café: ünïcödé ✓ 数据 🙂\n\tx = 1\n",
    "def add(a, b):\n    return a + b  # ü\n",
    "<|endoftext|>",
    "x<|endoftext|>y <|endoftext|>\n<|endoftext|><|endoftext|>",
    "<|endoftext",
    "",
    " ",
    "  ",
    " " * 31,
    " " * 32,
    " " * 100 + "x",
    "\t" * 9 + "\t" * 9 + "\t",
    "\t \t  \t   \t",
    "a \n b\n\n\n  c   \r\n\td",
    "x   ",
    "   x",
    "I'm here, it's done, we're ok, they've gone, I'll go, he'd say, 'S 'T 's't",
    "don't'll''s",
    "3.14159 2e10 0x1F ½ Ⅻ ١٢٣ 一二三",
    "αβγ ΑΒΓ ÀÉÎ ß ﬁ",
    "\u00a0\u2009x\u3000y\u0085z\u2028w\u180e\u200bv\ufeff",
    "e\u0301 a\u0308 \u0915\u094d\u0937",
    "👍🏽 🇩🇪 👨‍👩‍👧 \U0001f600\U0001f600",
    "\x00\x01\x1f\x7f",
    "if x:\n\tif y:\n\t\treturn [i for i in range(10) if i % 2]\n",
]

INVALID_UTF8 = [
    b"\xff",
    b"\xc0\x80",
    b"\xed\xa0\x80",
    b"\xe2\x82",
    b"\xf0\x9f\x99",
    b"\x80\x80",
    b"\xf4\x90\x80\x80",
    b"\xfe",
]
PIECES = [
    *"abcXYZ_019.,;:!?()[]{}<>=+-*/%#@'\"\\",
    "def",
    " return",
    "'s",
    "'ll",
    "'re",
    "\n",
    "\r\n",
    "\t",
    " ",
    "é",
    "数据",
    "١٢",
    "Ⅻ",
    "\u0301",
    "🙂",
    "👍🏽",
    "\u00a0",
    "\u3000",
    "\u2028",
    "<|endoftext|>",
]


def random_texts(count: int, seed: int = 0) -> list[bytes]:
    """Byte strings of four kinds, in turn: random bytes; code pieces with whitespace runs of up to 100;
    pieces with invalid UTF-8 between them; random code points of all planes."""
    rng = random.Random(seed)
    texts = []
    for i in range(count):
        kind = i % 4
        if kind == 0:
            texts.append(rng.randbytes(rng.randint(0, 64)))
            continue
        parts: list[bytes] = []
        for _ in range(rng.randint(1, 24)):
            r = rng.random()
            if kind == 3:
                cp = rng.randrange(0x110000)
                parts.append(b" " if 0xD800 <= cp < 0xE000 else chr(cp).encode())
            elif r < 0.15:
                parts.append(rng.choice([" ", "\t", "\n", " \t"]).encode() * rng.randint(1, 100))
            elif kind == 2 and r < 0.35:
                parts.append(rng.choice(INVALID_UTF8))
            else:
                parts.append(rng.choice(PIECES).encode())
        texts.append(b"".join(parts))
    return texts


def compare(cpp_bin: Path, folder: Path, oracle_folder: Path, texts: list[bytes]) -> list[str]:
    """What differs between the C++ tokenizer of `folder` and the Python one of `oracle_folder` on `texts`:
    ids, and the text decoded from them (empty: all equal)."""
    oracle = load_tokenizer(oracle_folder)
    got_ids = run_tokenizer(cpp_bin, folder, "encode", [t.hex() for t in texts])
    problems = []
    want_ids = []
    for text, line in zip(texts, got_ids, strict=True):
        want = oracle.encode(text.decode("utf-8", "replace"))
        want_ids.append(want)
        got = [int(x) for x in line.split()]
        if got != want:
            problems.append(f"ids of {text!r}: C++ {got[:12]}..., tokenizers {want[:12]}...")
    decoded = run_tokenizer(cpp_bin, folder, "decode", [" ".join(map(str, ids)) for ids in want_ids])
    for ids, line in zip(want_ids, decoded, strict=True):
        if bytes.fromhex(line).decode("utf-8") != oracle.decode(ids):
            problems.append(f"decode of {ids[:12]}...")
    return problems


@pytest.fixture(scope="module")
def humaneval(shared_data) -> list[str]:
    with gzip.open(shared_data / "HumanEval.jsonl.gz", "rt") as f:
        return [json.loads(line)["prompt"] for line in f]


@pytest.fixture(scope="module")
def vocab_merges_dir(real_tokenizer_dir, tmp_path_factory) -> Path:
    """The real tokenizer without tokenizer.json: vocab.json + merges.txt + added_tokens.json only."""
    folder = tmp_path_factory.mktemp("cpp-vocab-merges")
    for name in ("vocab.json", "merges.txt", "added_tokens.json"):
        shutil.copy(real_tokenizer_dir / name, folder / name)
    return folder


@pytest.mark.parametrize("source", ["tokenizer.json", "vocab+merges"])
def test_real_tokenizer_equals_tokenizers(cpp_bin, real_tokenizer_dir, vocab_merges_dir, humaneval, source):
    folder = real_tokenizer_dir if source == "tokenizer.json" else vocab_merges_dir
    texts = [p.encode() for p in humaneval] + [t.encode() for t in EDGE_CASES] + random_texts(1600)
    assert len(humaneval) == 164
    assert compare(cpp_bin, folder, folder, texts) == []


def test_trained_tokenizer_equals_tokenizers(cpp_bin, tiny_checkpoint, shared_data):
    """The tokenizer of the test checkpoints (another vocab, merges written as pairs, eos id 0)."""
    with gzip.open(shared_data / "HumanEval.jsonl.gz", "rt") as f:
        prompts = [json.loads(line)["prompt"].encode() for line in f]
    texts = prompts + [t.encode() for t in EDGE_CASES] + random_texts(800, seed=1)
    assert compare(cpp_bin, tiny_checkpoint, tiny_checkpoint, texts) == []


def test_trained_tokenizer_without_shared_data(cpp_bin, tiny_checkpoint):
    """What a fresh clone (no ../shared) still checks."""
    texts = [t.encode() for t in EDGE_CASES] + random_texts(400, seed=2)
    assert compare(cpp_bin, tiny_checkpoint, tiny_checkpoint, texts) == []


def test_decoding_any_ids(cpp_bin, tiny_checkpoint):
    """Random id sequences (bytes of split characters, ids beyond the vocabulary, which are skipped) decode to
    the same text, invalid UTF-8 replaced alike."""
    oracle = load_tokenizer(tiny_checkpoint)
    rng = random.Random(3)
    rows = [[rng.randrange(oracle.vocab_size + 50) for _ in range(rng.randint(0, 40))] for _ in range(400)]
    got = run_tokenizer(cpp_bin, tiny_checkpoint, "decode", [" ".join(map(str, r)) for r in rows])
    assert [bytes.fromhex(line).decode() for line in got] == [oracle.decode(r) for r in rows]


def _table_edges() -> list[int]:
    """Each range of the generated Unicode tables, one code point either side of both its ends."""
    text = (REPO / "examples" / "cpp" / "src" / "unicode_tables.inc").read_text()
    edges = set()
    for first, last in re.findall(r"\{0x([0-9A-F]+), 0x([0-9A-F]+)\}", text):
        for cp in (int(first, 16), int(last, 16)):
            edges.update((cp - 1, cp, cp + 1))
    return sorted(edges)


def test_pre_tokenizer_splits_as_tokenizers_regex(cpp_bin, tiny_checkpoint):
    """GPT-2's regex with the C++ Unicode tables against tokenizers' own (Oniguruma's): each code point probed
    after a letter, a digit, punctuation and a space. Probed: the first 0x800, both sides of every table edge,
    and 20,000 random ones (all 1,112,064 agreed when the tables were generated: examples/cpp/tools)."""
    rng = random.Random(4)
    cps = set(range(0x800)) | set(_table_edges()) | {rng.randrange(0x110000) for _ in range(20000)}
    cps = sorted(c for c in cps if 0 <= c < 0x110000 and not 0xD800 <= c < 0xE000 and chr(c) not in " \t")
    lines = [
        "".join(f"a{chr(c)}1{chr(c)}!{chr(c)} {chr(c)}\n" for c in cps[i : i + 256]) for i in range(0, len(cps), 256)
    ]
    regex = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    got = run_tokenizer(cpp_bin, tiny_checkpoint, "pretokenize", [line.encode().hex() for line in lines])
    for line, out in zip(lines, got, strict=True):
        want = [line[a:b] for _, (a, b) in regex.pre_tokenize_str(line)]
        assert [bytes.fromhex(p).decode() for p in out.split()] == want


def test_a_broken_tokenizer_is_caught(cpp_bin, tiny_checkpoint, tmp_path):
    """The comparison has power: the same tokenizer less one merge gives other ids on ordinary code."""
    spec = json.loads((tiny_checkpoint / "tokenizer.json").read_text())
    spec["model"]["merges"] = [m for m in spec["model"]["merges"] if m not in (["i", "n"], "i n")]
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    texts = [t.encode() for t in EDGE_CASES]
    assert any(p.startswith("ids of") for p in compare(cpp_bin, tmp_path, tiny_checkpoint, texts))


def test_unsupported_or_missing_files_are_one_line_errors(cpp_bin, tmp_path):
    import subprocess

    def error(folder: Path) -> str:
        result = subprocess.run(
            [str(cpp_bin / "codegen_tokenize"), str(folder), "encode"], input="", capture_output=True, text=True
        )
        assert result.returncode == 2
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
        return result.stderr

    assert "has no tokenizer.json and no vocab.json + merges.txt" in error(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    assert "is not readable JSON" in error(tmp_path)
    (tmp_path / "tokenizer.json").write_text(
        json.dumps({"normalizer": {"type": "NFC"}, "pre_tokenizer": None, "decoder": None, "model": {}})
    )
    assert "uses a normalizer, which this C++ tokenizer does not implement" in error(tmp_path)
