"""Where ../shared/data is missing, the tests that need it skip saying what it is and how to get it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NEEDS_DATA = "tests/model/test_tokenizer.py::test_whitespace_runs_are_single_tokens"


def test_a_skip_for_missing_shared_data_says_what_it_is_and_how_to_get_it(tmp_path):
    env = {**os.environ, "CODEGEN_DEPLOY_SHARED_DATA": str(tmp_path / "none"), "COLUMNS": "2000"}
    argv = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", NEEDS_DATA]
    out = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300).stdout
    (reason,) = [line for line in out.splitlines() if line.startswith("SKIPPED")]
    what = ("real CodeGen-350M-mono tokenizer", "codegen-350M-mono-tokenizer/", "HumanEval.jsonl.gz", "../shared/data")
    how = ("hf download Salesforce/codegen-350M-mono", "github.com/openai/human-eval", "CODEGEN_DEPLOY_SHARED_DATA=DIR")
    for words in (*what, *how):
        assert words in reason, words
