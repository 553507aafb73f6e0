"""codegen-generate and codegen-parity through main(argv) on the tiny checkpoint and its export."""

from __future__ import annotations

import io
import json

import pytest

from codegen_deploy.cli import generate as generate_cli
from codegen_deploy.cli import parity as parity_cli
from codegen_deploy.runtime.backends import open_session
from codegen_deploy.runtime.generate import generate

PROMPT = "def add(a, b):\n    return"


def test_generate_streams_the_same_text_as_the_api(tiny_export, tiny_tokenizer, capsys):
    assert generate_cli.main([str(tiny_export), PROMPT, "--max-new-tokens", "12", "--threads", "1"]) == 0
    out, err = capsys.readouterr()
    expected = generate(open_session("onnxruntime", tiny_export), tiny_tokenizer, PROMPT, max_new_tokens=12).text
    assert out == expected + "\n"
    assert "[onnxruntime]" in err and "tokens/s" in err


def test_generate_json_on_a_checkpoint_from_stdin(tiny_checkpoint, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO(PROMPT))
    argv = [str(tiny_checkpoint), "--json", "--max-new-tokens", "6", "--temperature", "0.7", "--seed", "3"]
    assert generate_cli.main(argv) == 0
    body = json.loads(capsys.readouterr().out)
    assert body["backend"] == "torch" and len(body["ids"]) == 6 and body["finish_reason"] == "length"
    assert body["sampling"]["seed"] == 3 and body["timings"]["decode_steps"] == 5
    monkeypatch.setattr("sys.stdin", io.StringIO(PROMPT))
    assert generate_cli.main(argv) == 0
    assert json.loads(capsys.readouterr().out)["ids"] == body["ids"]  # same seed, same tokens


def test_generate_from_a_file_with_a_stop(tiny_export, tmp_path, capsys):
    prompt_file = tmp_path / "prompt.py"
    prompt_file.write_text(PROMPT)
    assert generate_cli.main([str(tiny_export), "--file", str(prompt_file), "--json", "--max-new-tokens", "12"]) == 0
    text = json.loads(capsys.readouterr().out)["text"]
    stop = text[4:6]
    argv = [str(tiny_export), "--file", str(prompt_file), "--json", "--max-new-tokens", "12", "--stop", stop]
    assert generate_cli.main(argv) == 0
    body = json.loads(capsys.readouterr().out)
    assert body["text"] == text[: text.index(stop)] and body["finish_reason"] == "stop"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--temperature", "-1"], "temperature must be >= 0"),
        (["--top-p", "0"], "top_p must be in (0, 1]"),
        (["--max-new-tokens", "5000"], "exceeds the context of 256"),
        (["--backend", "onnxruntime", "--providers", "nope"], "not available"),
    ],
)
def test_generate_bad_input_is_one_line(tiny_export, capsys, extra, message):
    assert generate_cli.main([str(tiny_export), PROMPT, *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]


def test_stop_strings_take_the_escapes_a_shell_passes_through(tiny_export, capsys):
    """--stop "\\ndef " as the README writes it reaches us as a backslash and an n: it must mean a newline."""
    args = generate_cli.parse_args([str(tiny_export), PROMPT, "--stop", "\\ndef ", "--stop", "a\\tb\\\\n\\x"])
    assert args.stop == ["\ndef ", "a\tb\\n\\x"]  # \\ is one backslash; other escapes stay as written
    assert generate_cli.main([str(tiny_export), PROMPT, "--json", "--max-new-tokens", "24"]) == 0
    text = json.loads(capsys.readouterr().out)["text"]
    assert len(text) >= 3
    cut = next((i for i, c in enumerate(text) if c in "\n\t" and i > 0), None)
    if cut is None:  # the random model wrote no newline or tab: make the text stop at its third character
        cut = 2
    stop = text[cut - 1 : cut + 1]
    escaped = stop.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t")
    argv = [str(tiny_export), PROMPT, "--json", "--max-new-tokens", "24", "--stop", escaped]
    assert generate_cli.main(argv) == 0
    body = json.loads(capsys.readouterr().out)
    assert body["finish_reason"] == "stop" and body["text"] == text[: text.index(stop)]


def test_a_bfloat16_export_on_the_cpu_says_what_runs_it(tiny_checkpoint, tmp_path, capsys):
    from codegen_deploy.pipeline import export_model

    notes = []
    out = export_model(tiny_checkpoint, tmp_path / "bf16", dtype="bfloat16", validate=False, progress=notes.append)
    assert any(line.startswith("note:") and "onnxruntime-gpu" in line and "--fp16" in line for line in notes)
    assert generate_cli.main([str(out), PROMPT, "--providers", "cpu", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "export again" not in err
    assert "bfloat16" in err and "CUDA provider" in err and "[gpu]" in err and "float16 (--fp16)" in err


def test_generate_empty_prompt(tiny_export, capsys):
    assert generate_cli.main([str(tiny_export), ""]) == 2
    assert "empty" in capsys.readouterr().err


def test_parity_passes_with_json(tiny_export, capsys):
    assert parity_cli.main([str(tiny_export), "--new-tokens", "6", "--num-prompts", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] and report["backend_a"] == "torch" and report["backend_b"] == "onnxruntime"
    assert report["identical"] == 2 and len(report["rows"][0]["steps"]) == 6
    assert report["tolerance"] == {"atol": 1e-4, "rtol": 1e-4, "min_top1": 0.99}  # the float32 entry


def test_parity_humaneval_prompts_and_exit_3_over_tolerance(tiny_export, tiny_checkpoint, shared_data, capsys):
    prompts = str(shared_data / "HumanEval.jsonl.gz")
    argv = [str(tiny_export), "--reference", str(tiny_checkpoint), "--prompts", prompts, "--num-prompts", "2"]
    argv += ["--new-tokens", "4"]
    assert parity_cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "PASSED" in out and "greedy" in out
    assert parity_cli.main([*argv, "--atol", "0", "--rtol", "0"]) == 3
    captured = capsys.readouterr()
    assert "FAILED" in captured.out and captured.err.startswith("error: onnxruntime differs from torch")
    assert len(captured.err.splitlines()) == 1


def test_parity_bad_backends(tiny_export, capsys):
    assert parity_cli.main([str(tiny_export), "--backends", "torch"]) == 2
    assert "two of torch, onnxruntime, tensorrt" in capsys.readouterr().err


# -- bad input: one line, exit 2, before any model loads -------------------------------------------------


def error_line(capsys, main, argv) -> tuple[int, str]:
    """(exit code, the one stderr line) of a command that must fail; argparse's usage line is left out."""
    try:
        code = main(argv)
    except SystemExit as e:  # argparse: usage line + "prog: error: ..."
        code = e.code
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("usage:")]
    assert len(err) == 1 and "error: " in err[0], err
    return code, err[0]


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if a command opens a session (these checks must come before the model loads)."""

    def refuse(*args, **kwargs):
        raise AssertionError("a session was opened before the input was checked")

    monkeypatch.setattr("codegen_deploy.runtime.backends.open_session", refuse)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--seed", "-1", "--temperature", "0.8"], "--seed: must be at least 0"),
        (["--threads", "-3"], "--threads: must be at least 1"),
        (["--threads", "0"], "--threads: must be at least 1"),
        (["--max-new-tokens", "0"], "--max-new-tokens: must be at least 1"),
    ],
)
def test_generate_refuses_bad_numbers(tiny_export, capsys, argv, message):
    code, line = error_line(capsys, generate_cli.main, [str(tiny_export), PROMPT, *argv])
    assert code == 2 and message in line


def test_generate_refuses_non_utf8_prompts(tiny_export, tmp_path, monkeypatch, capsys, no_model_load):
    bad = tmp_path / "prompt.txt"
    bad.write_bytes(b"\xff\xfe def f():")
    code, line = error_line(capsys, generate_cli.main, [str(tiny_export), "--file", str(bad)])
    assert code == 2 and "is not UTF-8 text" in line

    class BinaryStdin(io.TextIOWrapper):
        def isatty(self):
            return False

    monkeypatch.setattr("sys.stdin", BinaryStdin(io.BytesIO(b"\xff bad")))
    code, line = error_line(capsys, generate_cli.main, [str(tiny_export)])
    assert code == 2 and "standard input is not UTF-8 text" in line


def test_generate_refuses_empty_and_long_prompts_before_loading(tiny_checkpoint, tiny_export, capsys, no_model_load):
    for path in (tiny_checkpoint, tiny_export):
        code, line = error_line(capsys, generate_cli.main, [str(path), ""])
        assert code == 2 and "prompt 0 is empty" in line
        code, line = error_line(capsys, generate_cli.main, [str(path), "x = 1\n" * 400])
        assert code == 2 and "exceeds the context of 256 tokens" in line


def test_generate_on_a_folder_that_is_not_a_model(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hi")
    code, line = error_line(capsys, generate_cli.main, [str(tmp_path), PROMPT])
    assert code == 2 and "is not a model folder" in line and "copy" not in line


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--num-prompts", "-1"], "--num-prompts: must be at least 0"),
        (["--atol", "-1"], "--atol: must be at least 0"),
        (["--rtol", "nan"], "--rtol: must be at least 0"),
        (["--min-top1", "2"], "--min-top1: must be between 0 and 1"),
        (["--threads", "-3"], "--threads: must be at least 1"),
    ],
)
def test_parity_refuses_bad_numbers(tiny_export, capsys, argv, message):
    code, line = error_line(capsys, parity_cli.main, [str(tiny_export), *argv])
    assert code == 2 and message in line


def test_parity_refuses_unreadable_prompt_files(tiny_export, tmp_path, capsys, no_model_load):
    (tmp_path / "bad.jsonl.gz").write_bytes(b"not gzip")
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe")
    for name in ("bad.jsonl.gz", "bad.txt"):
        code, line = error_line(capsys, parity_cli.main, [str(tiny_export), "--prompts", str(tmp_path / name)])
        assert code == 2 and f"cannot read prompt file {tmp_path / name}" in line
