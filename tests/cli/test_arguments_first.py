"""Argument mistakes are one `error:` line and exit 2 at once: every command checks its arguments before torch,
onnxruntime or a model is loaded (each case runs in a fresh interpreter, which then says what it imported)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "onnxruntime", "onnx", "transformers", "tensorrt")
# In a fresh clone nothing is exported yet: the README's paths then name a folder that does not exist.
README_PATH = "exports/codegen-350M-mono"
NO_SUCH_FOLDER = f"error: no such folder: {README_PATH}: check the path"

_SCRIPT = """
import json, sys
from codegen_deploy.cli.{module} import main
try:
    code = main(json.loads(sys.argv[1]))
except SystemExit as e:  # argparse's errors
    code = e.code
print(json.dumps({{"code": code, "heavy": [m for m in {heavy!r} if m in sys.modules]}}))
"""


def run_command(module: str, args: list[str], cwd: Path) -> tuple[int, list[str], list[str]]:
    """(exit code, stderr lines, heavy modules imported) of codegen_deploy.cli.<module>.main(args) in a fresh
    Python whose working folder is `cwd`."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "HF_HUB_OFFLINE": "1"}
    script = _SCRIPT.format(module=module, heavy=HEAVY)
    proc = subprocess.run(
        [sys.executable, "-c", script, json.dumps(args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )
    result = json.loads(proc.stdout.splitlines()[-1])
    return result["code"], proc.stderr.splitlines(), result["heavy"]


def one_error(module: str, args: list[str], cwd: Path) -> str:
    """The one error line of a command that must refuse `args` with exit 2 before importing anything heavy."""
    code, err, heavy = run_command(module, args, cwd)
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert heavy == [], f"{module} imported {heavy} before refusing its arguments"
    return err[0]


# The arguments each command needs besides the one under test; PATH first.
COMMANDS = {
    "generate": ["PATH", "def f():"],
    "parity": ["PATH"],
    "bench": ["PATH"],
    "serve": ["PATH"],
}


def argv(module: str, path: str, *extra: str) -> list[str]:
    return [path if a == "PATH" else a for a in COMMANDS[module]] + list(extra)


@pytest.mark.parametrize("module", COMMANDS)
def test_threads_beyond_the_cores_are_refused_at_once(module, tmp_path):
    line = one_error(module, argv(module, str(tmp_path), "--threads", "100000"), tmp_path)
    assert "--threads" in line and "must be at most" in line and "100000" in line


@pytest.mark.parametrize("module", [*COMMANDS, "export"])
def test_a_missing_folder_is_one_line_in_the_same_words_everywhere(module, tmp_path):
    args = ["--model", README_PATH, "--no-validate"] if module == "export" else argv(module, README_PATH)
    line = one_error(module, args, tmp_path)
    option = " (given to --model)" if module == "export" else ""
    assert line.startswith(f"error: no such folder: {README_PATH}{option}: check the path"), line


@pytest.mark.parametrize(
    ("module", "option"), [("generate", "--reference"), ("generate", "--tokenizer"), ("parity", "--reference")]
)
def test_a_missing_folder_given_to_an_option_names_it(module, option, tmp_path):
    line = one_error(module, argv(module, str(tmp_path), option, "./elsewhere/model"), tmp_path)
    assert line.startswith(f"error: no such folder: ./elsewhere/model (given to {option}): check the path"), line


@pytest.mark.parametrize("module", ["generate", "bench", "serve"])
def test_a_draft_that_would_not_be_used_is_refused_even_when_missing(module, tmp_path):
    for mode in ("off", "lookup"):
        line = one_error(module, argv(module, str(tmp_path), "--speculate", mode, "--draft", "no/such/draft"), tmp_path)
        assert f"--draft is used by --speculate draft or auto, not {mode}" in line


@pytest.mark.parametrize("module", ["generate", "bench", "serve"])
def test_a_missing_draft_is_no_such_folder(module, tmp_path):
    line = one_error(module, argv(module, str(tmp_path), "--speculate", "draft", "--draft", "gone"), tmp_path)
    assert line.startswith("error: no such folder: gone (given to --draft): check the path"), line


def test_a_missing_prompt_file_is_refused_before_torch(tmp_path):
    line = one_error("generate", [str(tmp_path), "--file", str(tmp_path / "prompt.py")], tmp_path)
    assert "cannot read the prompt file" in line


def test_an_existing_output_is_refused_before_torch(tiny_checkpoint, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("x")
    line = one_error("export", ["--model", str(tiny_checkpoint), "--output", str(tmp_path / "out")], tmp_path)
    assert "already exists" in line
