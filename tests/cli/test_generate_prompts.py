"""codegen-generate's prompt: read with a bound (the context's worth of text), refused in one line when it is
not UTF-8, and a stream that is interrupted still ends its line."""

from __future__ import annotations

import importlib
import io

import pytest

from codegen_deploy.cli import generate as generate_cli


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if a command opens a session (these checks come before the model loads)."""
    monkeypatch.setattr(
        "codegen_deploy.runtime.backends.open_session",
        lambda *a, **k: pytest.fail("a session was opened before the prompt was checked"),
    )


def error_line(capsys, argv) -> tuple[int, str]:
    code = generate_cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return code, err[0]


class Stdin(io.BufferedReader):
    """Standard input from a file, not a terminal."""

    def __init__(self, path):
        super().__init__(io.FileIO(path, "rb"))
        self.buffer = self

    def isatty(self):
        return False


@pytest.mark.parametrize("source", ["/dev/zero", "/dev/urandom"])
def test_an_endless_prompt_file_is_refused_at_once(tiny_export, capsys, no_model_load, source):
    code, line = error_line(capsys, [str(tiny_export), "--file", source])
    limit = 256 * generate_cli.PROMPT_BYTES_PER_TOKEN  # the tiny export's context of 256 tokens
    assert code == 2 and f"the prompt file {source} has more than {limit} bytes, more than a 256-token" in line


def test_an_endless_standard_input_is_refused_at_once(tiny_export, capsys, monkeypatch, no_model_load):
    monkeypatch.setattr("sys.stdin", Stdin("/dev/zero"))
    code, line = error_line(capsys, [str(tiny_export)])
    assert code == 2 and "standard input has more than" in line


def test_a_prompt_as_long_as_the_bound_is_read_whole(tiny_export, tmp_path, capsys, no_model_load):
    limit = 256 * generate_cli.PROMPT_BYTES_PER_TOKEN
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("x" * limit)  # within the bound: tokenized, then refused by its token count
    code, line = error_line(capsys, [str(tiny_export), "--file", str(prompt)])
    assert code == 2 and "exceeds the context of 256 tokens" in line


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("def f():\udcff", "invalid start byte at byte 8"),  # byte 0xff on the command line (surrogateescape)
        ("x = '\ud800'", "a lone surrogate at character 5"),
    ],
)
def test_a_prompt_argument_that_is_not_utf8_is_one_line(tiny_export, capsys, no_model_load, prompt, message):
    code, line = error_line(capsys, [str(tiny_export), prompt])
    assert code == 2 and "the prompt argument is not UTF-8 text" in line and message in line


def test_an_interrupted_stream_ends_its_line(tiny_export, capsys, monkeypatch):
    def stream(*args, **kwargs):
        yield "def f"
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib.import_module("codegen_deploy.runtime.generate"), "stream", stream)
    assert generate_cli.main([str(tiny_export), "def", "--verify", "size"]) == 130
    out, err = capsys.readouterr()
    assert out == "def f\n" and err.strip().splitlines()[-1] == "error: interrupted"


PREFIX, SUFFIX = "def add(a, b):\n    ", "\n\nprint(add(1, 2))\n"


def test_a_suffix_fills_in_the_middle(codegen2_export, tmp_path, capsys):
    import json

    from codegen_deploy.model.tokenizer import load_tokenizer

    argv = [str(codegen2_export), PREFIX, "--max-new-tokens", "4", "--json"]
    assert generate_cli.main([*argv, "--suffix", SUFFIX]) == 0
    body = json.loads(capsys.readouterr().out)
    assert body["suffix"] == SUFFIX and body["prompt_ids"] == load_tokenizer(codegen2_export).infill(PREFIX, SUFFIX)
    suffix_file = tmp_path / "after.py"
    suffix_file.write_text(SUFFIX)
    assert generate_cli.main([*argv, "--suffix-file", str(suffix_file)]) == 0
    assert json.loads(capsys.readouterr().out)["ids"] == body["ids"]
    # --echo prints the whole file: before the gap, the middle, after it.
    assert generate_cli.main([str(codegen2_export), PREFIX, "--max-new-tokens", "4", "--suffix", SUFFIX, "--echo"]) == 0
    assert capsys.readouterr().out == PREFIX + body["text"] + SUFFIX + "\n"


def test_a_suffix_that_cannot_be_used_is_one_line(tiny_export, codegen2_export, tmp_path, capsys, no_model_load):
    code, line = error_line(capsys, [str(tiny_export), PREFIX, "--suffix", SUFFIX])
    assert code == 2 and "cannot fill in the middle" in line and "CodeGen2" in line
    code, line = error_line(capsys, [str(codegen2_export), PREFIX, "--suffix", SUFFIX, "--suffix-file", "x"])
    assert code == 2 and "not both" in line
    code, line = error_line(capsys, [str(codegen2_export), PREFIX, "--suffix-file", str(tmp_path / "missing")])
    assert code == 2 and "cannot read the suffix file" in line
