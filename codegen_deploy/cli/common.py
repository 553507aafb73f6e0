"""What every command shares: one-line errors with an exit code, signals, number options, GPU device options."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import signal
import sys
import threading
from collections.abc import Callable

from ..artifacts.manifest import VERIFY_MODES
from ..config import max_threads
from ..errors import CodegenDeployError


def add_device_options(p, torch_device: bool = True) -> None:
    """The GPU options every runtime command takes: ONNX Runtime's CUDA provider options and the torch device."""
    p.add_argument("--device-id", type=int, help="GPU index for ONNX Runtime's CUDA provider (default 0)")
    p.add_argument(
        "--tf32",
        action="store_true",
        help="let ONNX Runtime's CUDA provider use TF32 for float32 MatMul (faster, ~1e-3 less exact; off by default)",
    )
    p.add_argument(
        "--cuda-graph",
        action="store_true",
        help="replay each decode step as a CUDA graph (fused float16 graph on the CUDA provider)",
    )
    if torch_device:
        p.add_argument("--device", help="torch device for the torch backend, e.g. cuda, cuda:1 (default: cpu)")


def check_paths(args) -> None:
    """Refuse in one line, before anything heavy is imported or loaded, a model path that names nothing: PATH,
    --model, --reference and --tokenizer (each a local folder or a hub id: hub.is_hub_id's rule), where a
    command has them. (--draft: runtime.speculate.check_draft.)"""
    from ..model.hub import check_model_path

    for name in ("path", "model", "reference", "tokenizer"):
        check_model_path(getattr(args, name, None), None if name == "path" else f"--{name}")


def device_options(args) -> dict:
    """The backend_options() keywords of add_device_options' arguments (unset ones as None)."""
    return {
        "device_id": args.device_id,
        "tf32": args.tf32 or None,
        "cuda_graph": args.cuda_graph or None,
        "device": getattr(args, "device", None),
    }


def session_options(args, backend: str, dtype=None) -> dict:
    """backend_options() for `backend` from the session arguments the runtime commands share (threads,
    providers, graph, verify and the device options); arguments a command lacks count as unset."""
    from ..runtime.backends import backend_options

    return backend_options(
        backend,
        threads=getattr(args, "threads", None),
        providers=getattr(args, "providers", None),
        graph=getattr(args, "graph", None),
        verify=getattr(args, "verify", None),
        dtype=dtype,
        **device_options(args),
    )


class Terminated(BaseException):
    """SIGTERM, turned into an exception so `finally` blocks and the atomic writes' cleanup run."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated


def run(command: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Run a command's body; expected failures print `error: ...` on one line and exit non-zero.

    SIGTERM ends the command like Ctrl-C does (temporary outputs removed, exit 143); output piped into
    a reader that stops early (`| head`) ends it quietly.
    """
    main_thread = threading.current_thread() is threading.main_thread()  # only it may set handlers
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
    try:
        code = _run(command, argv)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    if main_thread and argv is None:  # the process's own command line: it ends when this returns
        signal.signal(signal.SIGINT, _exit_with(code))
    return code


def _run(command: Callable[[list[str] | None], int | None], argv: list[str] | None) -> int:
    try:
        return command(argv) or 0
    except CodegenDeployError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("error: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except BrokenPipeError:
        # The reader went away: send what is still buffered nowhere, so the exit does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 0


def _exit_with(code: int):
    """A SIGINT handler for after the command is done, while Python shuts down (threads joined, atexit hooks,
    a model freed): Ctrl-C then ends the process at once with the command's exit code, not a traceback."""

    def handler(signum, frame) -> None:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):  # a closed pipe, a closed file
                stream.flush()
        os._exit(code)

    return handler


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its errors on one line like every other error (its usage block is what --help shows)."""

    def error(self, message: str):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def progress_line(line: str, stderr: bool = False) -> None:
    """Print a progress line: notes and warnings to stderr (where a user looks for them, and out of any
    output that is parsed), the rest to stdout unless `stderr` (a command whose stdout is its results)."""
    warning = stderr or line.startswith(("note:", "warning:"))
    print(line, file=sys.stderr if warning else sys.stdout, flush=True)


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: a whole number >= low."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


_SIZE_UNITS = {
    "": 1,
    "k": 10**3,
    "m": 10**6,
    "g": 10**9,
    "t": 10**12,
    "ki": 2**10,
    "mi": 2**20,
    "gi": 2**30,
    "ti": 2**40,
}


def memory_size(text: str) -> int | None:
    """An argparse type: a memory size such as 512MiB, 4GiB, 2G or 0 (bytes), at most this machine's memory;
    "auto" gives None (the default)."""
    from ..memory import machine_memory_bytes

    if text.strip().lower() == "auto":
        return None
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([kmgt]i?)?b?\s*", text.lower())
    if match is None:
        raise argparse.ArgumentTypeError(f"expected a size such as 4GiB, 512MiB or 0, or auto; got {text!r}")
    value = int(float(match[1]) * _SIZE_UNITS[match[2] or ""])
    have = machine_memory_bytes()
    if value > have:
        raise argparse.ArgumentTypeError(f"{text} is more than this machine's memory ({have / 2**30:.1f} GiB)")
    return value


def threads_type(text: str) -> int:
    """An argparse type: intra-op threads, from 1 to the cores this machine has."""
    high = max_threads()
    value = int_at_least(1)(text)
    if value > high:
        raise argparse.ArgumentTypeError(f"must be at most {high} (the cores this machine has), got {value}")
    return value


def float_in(low: float, high: float = math.inf) -> Callable[[str], float]:
    """An argparse type: a finite number in [low, high]."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or not low <= value <= high:
            where = f"at least {low:g}" if high == math.inf else f"between {low:g} and {high:g}"
            raise argparse.ArgumentTypeError(f"must be {where}, got {text}")
        return value

    return parse


VERIFY_CHOICES = tuple(mode for mode in VERIFY_MODES if mode != "none")  # opening unverified is for tests
VERIFY_HELP = (
    "how to check an export's files against its manifest when opening it: sha256 (default; every byte, "
    "hashed while the session loads) or size (faster for very large exports; catches truncation only)"
)
