"""Every Python block of the README runs as written, in a fresh interpreter, in a folder that holds what the
README says a block needs (demo/checkpoint, as scripts/demo.sh makes it; here of the tiny shape).

A block that needs what a test cannot have (a running server, a GPU, the network) is preceded in the README by
`<!-- readme-test: skip: REASON -->`, and is skipped here with that reason.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SKIP = re.compile(r"<!-- readme-test: skip: (?P<reason>.+?) -->\s*$")


def python_blocks(text: str) -> list[tuple[int, str, str | None]]:
    """(line number, code, skip reason or None) of each ```python block."""
    lines, blocks = text.splitlines(), []
    i = 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start = i + 1
            end = next(j for j in range(start, len(lines)) if lines[j].strip() == "```")
            marker = SKIP.match(lines[i - 1].strip()) if i else None
            blocks.append((start + 1, "\n".join(lines[start:end]) + "\n", marker["reason"] if marker else None))
            i = end
        i += 1
    return blocks


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))


def test_the_readme_has_python_blocks_and_few_skips():
    assert len(BLOCKS) >= 2
    assert sum(reason is not None for _, _, reason in BLOCKS) <= 1  # skipping is the exception: keep it so


def test_blocks_are_found_with_their_markers():
    text = "x\n```python\nprint(1)\n```\n<!-- readme-test: skip: no GPU here -->\n```python\nimport cuda\n```\n"
    assert python_blocks(text) == [(3, "print(1)\n", None), (7, "import cuda\n", "no GPU here")]


@pytest.mark.slow
@pytest.mark.parametrize(("line", "code", "skip"), BLOCKS, ids=[f"README.md:{line}" for line, _, _ in BLOCKS])
def test_python_block_runs_as_written(line, code, skip, tiny_checkpoint, tmp_path):
    if skip:
        pytest.skip(f"README.md:{line}: {skip}")
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "checkpoint").symlink_to(tiny_checkpoint, target_is_directory=True)
    script = tmp_path / "block.py"
    script.write_text(code)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"README.md:{line} failed:\n{result.stderr[-3000:]}"
