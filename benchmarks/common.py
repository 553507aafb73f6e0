"""Helpers shared by the benchmark scripts: run a child process and read its own peak RSS."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time


def run_child(code: str, *args: str) -> tuple[dict, float, int]:
    """Run `python -c code args...`; return (the JSON it prints last, wall seconds, its peak RSS in bytes).

    os.wait4 gives the child's own rusage, so each measurement's peak RSS is its own process only.
    """
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"child failed with exit code {proc.returncode}:\n{out}")
    lines = [line for line in out.splitlines() if line.startswith("{")]
    return (json.loads(lines[-1]) if lines else {}), wall, usage.ru_maxrss * 1024  # ru_maxrss is in KiB


def table(rows: list[dict], columns: list[str]) -> str:
    """A plain aligned text table."""
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)
