"""Prompt files: HumanEval-style JSON lines (optionally gzipped), a text file, or the built-in prompts."""

from __future__ import annotations

import gzip
import json

import pytest

from codegen_deploy.errors import InputError
from codegen_deploy.verify.prompts import BUILTIN_PROMPTS, load_prompts


def test_builtin_prompts_and_limit():
    assert load_prompts() == list(BUILTIN_PROMPTS)
    assert load_prompts(None, limit=2) == list(BUILTIN_PROMPTS[:2])


def test_jsonl_gz_and_text_files(tmp_path):
    rows = [{"task_id": i, "prompt": f"def f{i}():\n"} for i in range(3)]
    path = tmp_path / "p.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    assert load_prompts(path) == [r["prompt"] for r in rows]
    assert load_prompts(path, limit=1) == ["def f0():\n"]
    text = tmp_path / "one.py"
    text.write_text("import os\n")
    assert load_prompts(text) == ["import os\n"]


@pytest.mark.parametrize(
    ("content", "message"), [('{"text": "x"}\n', "'prompt' field"), ("not json\n", "JSON lines"), ("", "no prompts")]
)
def test_bad_prompt_files_are_one_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(InputError, match=message) as info:
        load_prompts(path)
    assert "\n" not in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_prompts(tmp_path / "none.jsonl")
