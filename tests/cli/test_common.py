"""What every command shares: number options, SIGTERM (a real process: the signal needs one), a closed pipe."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from codegen_deploy.cli.common import float_in, int_at_least, memory_size, progress_line, run
from codegen_deploy.memory import machine_memory_bytes

REPO = Path(__file__).resolve().parents[2]


def cli_process(module: str, *args: str, **kwargs) -> subprocess.Popen:
    """`python -m codegen_deploy.cli.<module> args...` with this checkout first on the path."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    argv = [sys.executable, "-m", f"codegen_deploy.cli.{module}", *args]
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def wait_for(condition, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError("timed out")
        time.sleep(0.05)


def test_memory_sizes():
    assert memory_size("auto") is None and memory_size("0") == 0
    assert memory_size("512MiB") == 512 * 2**20 and memory_size("2G") == 2 * 10**9
    assert memory_size("1.5gib") == 3 * 2**29
    assert memory_size("4096") == 4096 and memory_size("64 KB") == 64_000
    for bad in ("-1G", "lots", "4 GiBs", "1e3", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="expected a size"):
            memory_size(bad)
    with pytest.raises(argparse.ArgumentTypeError, match="more than this machine's memory"):
        memory_size(f"{machine_memory_bytes() + 1}")


def test_number_options():
    assert int_at_least(1)("3") == 3
    for bad in ("0", "-3", "x", "1.5"):
        with pytest.raises(argparse.ArgumentTypeError):
            int_at_least(1)(bad)
    assert float_in(0)("0") == 0.0 and float_in(0, 1)("1") == 1.0
    for bad in ("-1", "nan", "inf", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            float_in(0)(bad)
    with pytest.raises(argparse.ArgumentTypeError, match="between 0 and 1"):
        float_in(0, 1)("1.5")


def test_notes_and_warnings_go_to_stderr(capsys):
    progress_line("load  1.0 s")
    progress_line("note: no fused graph")
    progress_line("warning: no tokenizer")
    out, err = capsys.readouterr()
    assert out == "load  1.0 s\n" and err == "note: no fused graph\nwarning: no tokenizer\n"


def test_closed_pipe_ends_quietly(monkeypatch):
    def command(argv):
        raise BrokenPipeError

    saved = os.dup(sys.stdout.fileno())  # run() points stdout at /dev/null: restore it afterwards
    try:
        assert run(command, []) == 0
    finally:
        os.dup2(saved, sys.stdout.fileno())
        os.close(saved)


def test_generate_into_a_closed_pipe(tiny_export):
    proc = cli_process("generate", str(tiny_export), "def f():", "--max-new-tokens", "200", "--verify", "size")
    proc.stdout.close()  # the reader (e.g. `head`) went away
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 0, err
    assert "Traceback" not in err and "BrokenPipeError" not in err


def test_sigterm_during_export_cleans_up(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    proc = cli_process("export", "--model", str(tiny_checkpoint), "--output", str(out), "--no-validate")
    wait_for(lambda: any(p.name.startswith(".out.partial-") for p in tmp_path.iterdir()) or proc.poll() is not None)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert err.strip().splitlines()[-1] == "error: terminated"
    assert list(tmp_path.iterdir()) == []  # no output, no temporary folder, no lock


def test_ctrl_c_while_python_shuts_down_after_the_command_is_quiet(tmp_path):
    """Ctrl-C after the command printed its result (an atexit hook, a thread joined, a model freed) ends the
    process with the command's exit code, without a traceback."""
    script = (
        "import atexit, os, signal, sys, time\n"
        "from codegen_deploy.cli.common import run\n"
        "def command(argv):\n"
        "    print('exported to out')\n"
        "    atexit.register(lambda: (os.kill(os.getpid(), signal.SIGINT), time.sleep(5)))\n"
        "raise SystemExit(run(command))\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout == "exported to out\n"
    assert "Traceback" not in done.stderr and "KeyboardInterrupt" not in done.stderr, done.stderr
