"""Prompts for checks and benchmarks: a few built-in code prompts, or a prompt file (HumanEval's layout)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from ..errors import InputError

# Used when no prompt file is given: short code prompts in CodeGen's usual style.
BUILTIN_PROMPTS = (
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
    "import numpy as np\n\n\ndef moving_average(values, window):\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n",
    "# read a CSV file and print the sum of the second column\nimport csv\n\n",
)


def load_prompts(path: str | Path | None = None, limit: int | None = None) -> list[str]:
    """Prompts from a .jsonl or .jsonl.gz file (HumanEval's layout: a "prompt" field per line), a text file
    (one prompt), or BUILTIN_PROMPTS when path is None; at most `limit` of them, in file order."""
    if path is None:
        prompts = list(BUILTIN_PROMPTS)
    else:
        path = Path(path)
        if not path.is_file():
            raise InputError(f"prompt file {path} does not exist: give a .jsonl[.gz] file with a 'prompt' field")
        opener = gzip.open if path.suffix == ".gz" else open
        try:
            with opener(path, "rt", encoding="utf-8") as f:
                text = f.read()
        except (OSError, EOFError, UnicodeDecodeError) as e:  # gzip.BadGzipFile is an OSError
            raise InputError(f"cannot read prompt file {path} ({e}): give UTF-8 text, .jsonl or .jsonl.gz") from e
        if path.name.endswith((".jsonl", ".jsonl.gz")):
            try:
                rows = [json.loads(line) for line in text.splitlines() if line.strip()]
                prompts = [row["prompt"] for row in rows]
            except (ValueError, KeyError, TypeError) as e:
                raise InputError(f"{path} is not JSON lines with a 'prompt' field on each line ({e})") from e
        else:
            prompts = [text]
    prompts = prompts[:limit] if limit else prompts
    if not prompts:
        raise InputError(f"{path} holds no prompts: give a file with at least one")
    return prompts
