"""scripts/setup.sh: the demo installs what it uses, the tests (CI) everything they import; long installs show
pip's progress. Run against a stand-in python that records its calls, so nothing is installed."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO

FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "$(dirname "$0")/calls.log"
if [ "$1" = "-c" ]; then exit 1; fi   # "is torch 2.13.0 installed?": no
case " $* " in *" -q "*) exit 0;; esac   # quiet, as pip is
echo "Requirement already satisfied: numpy in /somewhere"
echo "Collecting onnxruntime"
"""


def run_setup(tmp_path: Path, *args: str) -> tuple[list[str], str]:
    """scripts/setup.sh ARGS in a copy of the repository whose .venv/bin/python is the stand-in: its calls, output."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "setup.sh", repo / "scripts" / "setup.sh")
    python = repo / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    env = {**os.environ, "TORCH_INDEX_URL": ""}
    result = subprocess.run(["bash", "scripts/setup.sh", *args], cwd=repo, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return (python.parent / "calls.log").read_text().splitlines(), result.stdout


def installs(calls: list[str]) -> list[str]:
    return [call for call in calls if call.startswith("-m pip install") and "--upgrade pip" not in call]


def test_the_demo_installs_what_it_uses_and_the_tests_everything_they_import(tmp_path):
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    assert re.search(r"^bash scripts/setup.sh cpu\b", (REPO / "scripts" / "demo.sh").read_text(), re.M)
    assert "bash scripts/setup.sh\n" in (REPO / "scripts" / "test.sh").read_text()  # CI: the default set

    calls, _ = run_setup(tmp_path, "cpu")
    assert installs(calls) == ["-m pip install torch==2.13.0", "-m pip install -e .[cpu]"]
    calls, _ = run_setup(tmp_path / "ci")
    extras = installs(calls)[-1].removeprefix("-m pip install -e .[").removesuffix("]").split(",")
    optional = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    needed = {"pytest", "ruff", "transformers", "openai", "fastapi", "uvicorn", "ray", "onnxruntime-genai"}
    given = {req.split("[")[0].split(">")[0].split("=")[0] for extra in extras for req in optional[extra]}
    assert needed <= given, needed - given


def test_long_installs_show_progress_but_not_what_is_already_there(tmp_path):
    calls, out = run_setup(tmp_path, "cpu")
    assert not any(" -q" in call for call in installs(calls))  # pip's own progress lines
    assert "Collecting onnxruntime" in out and "Requirement already satisfied" not in out
