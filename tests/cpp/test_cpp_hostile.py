"""A hostile manifest or command line against the C++ program (examples/cpp) gets what the Python commands give it:
one `error:` line, exit code 2, nothing on standard output, before anything outside the export is read and before
anything is allocated for a number it was handed. File names follow artifacts/manifest.py's rule, model sizes
config.py's LIMITS, --threads config.max_threads(), prompts cli/generate.py's bounded reader; the dimensions a
buffer is sized by come from the graph; a tiny temperature samples as greedy does.

Every program here runs with its address space capped (MEMORY), so a regression that allocates for a hostile
number fails the test with bad_alloc instead of taking the shared machine's memory.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.cpp.test_cpp_generate import _export

pytest.importorskip("onnxruntime")

MEMORY = 4 << 30
PROMPT_LIMIT = 256 * 128  # the test export's 256 positions x cli/generate.py's PROMPT_BYTES_PER_TOKEN


@pytest.fixture(scope="module")
def export(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny shape exported with both graphs (256 positions, 2,048 logits columns, eos 0)."""
    return _export("tiny", tiny_checkpoint, tmp_path_factory.mktemp("cpp-hostile"))


def _copy(export: Path, to: Path, edit: Callable[[dict], None] | None = None) -> Path:
    """A copy of the export at `to`, its manifest changed by `edit`."""
    shutil.copytree(export, to)
    if edit is not None:
        manifest = json.loads((to / "manifest.json").read_text())
        edit(manifest)
        (to / "manifest.json").write_text(json.dumps(manifest))
    return to


def _cap_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY, MEMORY))


def _run(cpp_bin: Path, program: str, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess:
    argv = [str(cpp_bin / program), *args]
    return subprocess.run(argv, input=stdin, capture_output=True, timeout=300, preexec_fn=_cap_memory)


def _refused(cpp_bin: Path, *args: str, program: str = "codegen_generate", stdin: bytes = b"") -> str:
    """The one error line of a run that must be refused (exit 2, nothing on standard output)."""
    result = _run(cpp_bin, program, *args, stdin=stdin)
    stderr = result.stderr.decode(errors="replace")
    assert result.returncode == 2, f"exit {result.returncode}: {stderr[-2000:]}"
    assert result.stdout == b""
    assert stderr.startswith("error: ") and stderr.count("\n") == 1, stderr[-2000:]
    return stderr


def _generate(cpp_bin: Path, folder: Path, *args: str) -> list[int]:
    result = _run(cpp_bin, "codegen_generate", str(folder), *args, "--json")
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return json.loads(result.stdout)["ids"]


def _listed(manifest: dict, name: str) -> None:
    """`name` added to the files the manifest lists."""
    manifest["files"][name] = {"bytes": 1, "sha256": "0" * 64}


@pytest.mark.parametrize("name", ["/secret", "../secret", "./tokenizer.json", "a//b", "C:secret", "a\\..\\secret", ""])
def test_file_names_outside_the_export_are_refused(cpp_bin, export, tmp_path, name):
    """A manifest cannot make the program report the size of a file elsewhere."""
    secret = tmp_path / "secret"
    secret.write_bytes(b"s" * 631)
    name = str(secret) if name == "/secret" else name
    folder = _copy(export, tmp_path / "export", lambda m: _listed(m, name))
    message = _refused(cpp_bin, str(folder), "x")
    assert f"a file entry names {json.dumps(name)}, not a plain file name inside the export folder" in message
    assert "631" not in message


ENTRIES = {
    "graph_file": "/other/decoder.onnx",
    "fused_graph_file": "../other/decoder_fused.onnx",
    "fused_shared_data_file": "/etc/passwd",
    "data_file": 5,
}


@pytest.mark.parametrize(("key", "value"), ENTRIES.items(), ids=ENTRIES.keys())
def test_graph_names_outside_the_export_are_refused(cpp_bin, export, tmp_path, key, value):
    """A manifest cannot make the program load another graph, or a graph read another file."""
    other = _copy(export, tmp_path / "other")
    value = str(other / "decoder.onnx") if value == "/other/decoder.onnx" else value
    folder = _copy(export, tmp_path / "export", lambda m: m.update({key: value}))
    message = _refused(cpp_bin, str(folder), "x", "--graph", "fused" if key.startswith("fused") else "plain")
    assert f"its {key} entry names {json.dumps(value)}, not a plain file name" in message


@pytest.mark.parametrize("name", ["decoder.onnx", "decoder_fused.onnx.data", "tokenizer.json", "manifest.json", "sub"])
def test_links_leaving_the_export_are_refused(cpp_bin, export, tmp_path, name):
    other = _copy(export, tmp_path / "other")
    if name == "sub":  # a folder inside that is a link out, and a file listed in it
        entry = {"bytes": (other / "tokenizer.json").stat().st_size, "sha256": "0" * 64}
        folder = _copy(export, tmp_path / "export", lambda m: m["files"].update({"sub/tokenizer.json": entry}))
        (folder / "sub").symlink_to(other)
    else:
        folder = _copy(export, tmp_path / "export")
        (folder / name).unlink()
        (folder / name).symlink_to(other / name)  # the same bytes: only the link is wrong
    message = _refused(cpp_bin, str(folder), "x")
    assert "is a symbolic link" in message and "out" in message and "export folder" in message


def test_links_inside_the_export_are_served(cpp_bin, export, tmp_path):
    folder = _copy(export, tmp_path / "export")
    (folder / "copy").mkdir()
    shutil.move(folder / "tokenizer.json", folder / "copy" / "tokenizer.json")
    (folder / "tokenizer.json").symlink_to(Path("copy") / "tokenizer.json")
    assert _generate(cpp_bin, folder, "x", "--max-new-tokens", "2")


UNLISTED = {
    "copy.onnx": "the plain graph",
    "decoder_fused.onnx.data": "the fused graph",
    "tokenizer.json": "the tokenizer",
}


@pytest.mark.parametrize(("name", "reader"), UNLISTED.items(), ids=UNLISTED.keys())
def test_every_file_a_graph_or_the_tokenizer_reads_is_listed(cpp_bin, export, tmp_path, name, reader):
    if name == "copy.onnx":  # a graph inside the folder that the manifest names but does not list
        folder = _copy(export, tmp_path / "export", lambda m: m.update({"graph_file": name}))
        shutil.copy(folder / "decoder.onnx", folder / name)
    else:
        folder = _copy(export, tmp_path / "export", lambda m: m["files"].pop(name))
    message = _refused(cpp_bin, str(folder), "x", "--graph", "plain" if name == "copy.onnx" else "fused")
    assert f"does not list {name}, which {reader} reads, so it cannot be checked" in message


@pytest.mark.parametrize("graph", ["plain", "fused"])
def test_dimensions_come_from_the_graph(cpp_bin, export, tmp_path, graph):
    """A manifest's vocab_size, n_head or n_embd other than the graph's: one line, not a read past the logits."""
    for i, (key, value) in enumerate((("vocab_size", 4096), ("vocab_size", 1024))):
        folder = _copy(
            export, tmp_path / f"vocab-{i}", lambda m, key=key, value=value: m["model_config"].update({key: value})
        )
        message = _refused(cpp_bin, str(folder), "def f(", "--graph", graph, "--max-new-tokens", "8")
        assert f", 2048], not the {value} columns (vocab_size) its manifest says" in message
    folder = _copy(export, tmp_path / "heads", lambda m: m["model_config"].update({"n_head": 8}))
    message = _refused(cpp_bin, str(folder), "x", "--graph", graph)
    assert "[batch, 4, " in message and ", 16], not the 8 heads of 8 (n_head, n_embd / n_head)" in message
    folder = _copy(export, tmp_path / "width", lambda m: m["model_config"].update({"n_embd": 128}))
    assert "not the 4 heads of 32" in _refused(cpp_bin, str(folder), "x", "--graph", graph)


DAMAGED = {
    "graph_file a number": (lambda m: m.update({"graph_file": 5}), "its graph_file entry names 5"),
    "a dtype a number": (lambda m: m["inputs"][3].update({"dtype": 7}), "decoder.onnx has a 7 cache"),
    "fused_weights a list": (lambda m: m.update({"fused_weights": [1]}), "'fused_weights' is [1], not a string"),
    "n_layer 2.5": (lambda m: m["model_config"].update({"n_layer": 2.5}), "(n_layer is 2.5, not a whole number)"),
    "n_layer true": (lambda m: m["model_config"].update({"n_layer": True}), "(n_layer is true, not a whole number)"),
    "n_layer 10^8": (
        lambda m: m["model_config"].update({"n_layer": 100_000_000}),
        "(n_layer 100000000 is out of range (1 to 1024))",
    ),
    "n_positions over the limit": (
        lambda m: m["model_config"].update({"n_positions": 262145}),
        "(n_positions 262145 is out of range (1 to 262144))",
    ),
    "vocab_size over the limit": (
        lambda m: m["model_config"].update({"vocab_size": 2**40}),
        f"(vocab_size {2**40} is out of range (1 to 1048576))",
    ),
    "eos_token_id negative": (
        lambda m: m["model_config"].update({"eos_token_id": -1}),
        "(eos_token_id -1 is out of range (>= 0))",
    ),
    "no sha256": (
        lambda m: m["files"]["decoder.onnx"].pop("sha256"),
        "the entry of decoder.onnx lacks bytes or sha256",
    ),
    "a file name too long": (lambda m: _listed(m, "a" * 5000), "(File name too long)"),
}


@pytest.mark.parametrize("damage", DAMAGED.values(), ids=DAMAGED.keys())
def test_damaged_manifests_are_one_line_errors(cpp_bin, export, tmp_path, damage):
    edit, expected = damage
    folder = _copy(export, tmp_path / "damaged", edit)
    message = _refused(cpp_bin, str(folder), "x", "--graph", "plain")
    assert "manifest.json" in message or "decoder.onnx" in message or "aaaa" in message
    assert expected in message


THREADS = "--threads must be a whole number from 1 to {cores} (the cores this machine has), not"
OPTIONS = {
    ("--seed", "-1"): "--seed must be a whole number >= 0, not '-1'",
    ("--seed", "1.5"): "--seed must be a whole number >= 0, not '1.5'",
    ("--threads", "-1"): THREADS,
    ("--threads", "0"): THREADS,
    ("--threads", "{cores + 1}"): THREADS,
    ("--threads", "100000"): THREADS,
    ("--max-context", "-5"): "--max-context must be a whole number from 1 to 262144, not '-5'",
    ("--max-new-tokens", "2.5"): "--max-new-tokens must be a whole number >= 1, not '2.5'",
    ("--max-new-tokens", "99999999999"): "--max-new-tokens must be a whole number >= 1, not '99999999999'",
    ("--top-k", "-1"): "--top-k must be a whole number >= 0, not '-1'",
    ("--file", "{folder}"): "cannot read the prompt file {folder} (Is a directory): check the path",
    ("--file", "/dev/zero"): f"the prompt file /dev/zero has more than {PROMPT_LIMIT} bytes, more than a 256-token",
}


@pytest.mark.parametrize(("args", "expected"), OPTIONS.items(), ids=[" ".join(a) for a in OPTIONS])
def test_bad_options_are_one_line_errors(cpp_bin, export, tmp_path, args, expected):
    cores = len(os.sched_getaffinity(0))
    args = [a.replace("{cores + 1}", str(cores + 1)).replace("{folder}", str(tmp_path)) for a in args]
    expected = expected.replace("{cores}", str(cores)).replace("{folder}", str(tmp_path))
    prompt = [] if args[0] == "--file" else ["x"]
    assert expected in _refused(cpp_bin, str(export), *prompt, *args)


def test_prompts_are_read_bounded(cpp_bin, export, tmp_path):
    # 64 MB on standard input: refused after PROMPT_LIMIT + 1 bytes read, not read whole.
    line = b"def f(x):\n    return x\n"
    stdin = (line * ((64 << 20) // len(line) + 1))[: 64 << 20]
    message = _refused(cpp_bin, str(export), stdin=stdin)
    assert f"standard input has more than {PROMPT_LIMIT} bytes, more than a 256-token context holds" in message
    # A prompt within the bound is read as before, and so are the options at their bounds.
    prompt = tmp_path / "prompt.py"
    prompt.write_text("def f(x):\n")
    cores = str(len(os.sched_getaffinity(0)))
    assert _generate(cpp_bin, export, "--file", str(prompt), "--max-new-tokens", "2", "--threads", cores, "--seed", "0")


def test_tokenize_refuses_lines_that_are_not_hex_or_ids(cpp_bin, export):
    assert "input line 2 is not hex" in _refused(cpp_bin, str(export), "encode", program="codegen_tokenize",
                                                 stdin=b"6162\nzz\n")  # fmt: skip
    assert "input line 1 has an odd number" in _refused(cpp_bin, str(export), "pretokenize",
                                                         program="codegen_tokenize", stdin=b"616\n")  # fmt: skip
    message = _refused(cpp_bin, str(export), "decode", program="codegen_tokenize", stdin=b"1 2\n1 x\n")
    assert "input line 2 has 'x', not a token id" in message


@pytest.mark.parametrize("graph", ["fused", "plain"])
def test_a_tiny_temperature_samples_as_greedy(cpp_bin, export, graph):
    """softmax(logits / T) puts all its mass on the largest logit as T -> 0: never NaN, never a constant eos."""
    args = ("def f(", "--graph", graph, "--max-new-tokens", "16")
    greedy = _generate(cpp_bin, export, *args)
    assert greedy[0] != 0  # not eos: the bug this catches answered eos at once
    for temperature in ("1e-320", "5e-324", "1e-300", "1e-30"):
        for seed in ("1", "2"):
            got = _generate(cpp_bin, export, *args, "--temperature", temperature, "--seed", seed)
            assert got == greedy, temperature
    assert _generate(cpp_bin, export, *args, "--temperature", "1e-320", "--top-p", "0.5", "--seed", "3") == greedy
