"""The C++ consumer (examples/cpp), built once per test session by scripts/build_cpp.sh into build/cpp.

Where no compiler, CMake or ONNX Runtime headers can be had (the script exits with 77), every C++ test skips
with the script's reason; a compile error fails them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SKIP = 77  # scripts/build_cpp.sh: a prerequisite cannot be had here


@pytest.fixture(scope="session")
def cpp_bin() -> Path:
    """The folder holding codegen_generate and codegen_tokenize, built (or brought up to date) once."""
    venv_python = REPO / ".venv" / "bin" / "python"
    env = {**os.environ, "PYTHON": str(venv_python if venv_python.exists() else sys.executable)}
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "build_cpp.sh")], capture_output=True, text=True, env=env, timeout=900
    )
    if result.returncode == SKIP:
        reason = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "prerequisites missing"
        pytest.skip(f"C++ consumer not built: {reason}")
    if result.returncode != 0:
        pytest.fail(
            f"scripts/build_cpp.sh failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        )
    return Path(os.environ.get("CODEGEN_CPP_BUILD", REPO / "build" / "cpp")) / "bin"


def run_tokenizer(cpp_bin: Path, folder: Path, mode: str, lines: list[str]) -> list[str]:
    """codegen_tokenize FOLDER MODE over `lines` (one input each); its output lines."""
    result = subprocess.run(
        [str(cpp_bin / "codegen_tokenize"), str(folder), mode],
        input="".join(line + "\n" for line in lines),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout.split("\n")
    assert out[-1] == "" and len(out) == len(lines) + 1, result.stderr
    return out[:-1]


def run_generate(cpp_bin: Path, folder: Path, *args: str, check: bool = True) -> dict | subprocess.CompletedProcess:
    """codegen_generate FOLDER ARGS --json: its JSON (check) or the finished process (check=False)."""
    argv = [str(cpp_bin / "codegen_generate"), str(folder), *args]
    result = subprocess.run(argv + (["--json"] if check else []), capture_output=True, text=True, timeout=300)
    if not check:
        return result
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)
