"""Helpers shared by the benchmark scripts: run a child process and read its own peak RSS."""

from __future__ import annotations

import json
import subprocess
import sys
import time

# Appended to every child: its own peak RSS. rusage's ru_maxrss is not used because Linux carries the
# parent's peak into a child across fork + exec.
_REPORT_PEAK = """
import json as _json
print(_json.dumps({"__vmhwm_kib": int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])}))
"""


def run_child(code: str, *args: str) -> tuple[dict, float, int]:
    """Run `python -c code args...`; return (the JSON it prints before the end, wall seconds, its peak RSS in bytes)."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code + _REPORT_PEAK, *args], stdout=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"child failed with exit code {proc.returncode}:\n{proc.stdout}")
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    peak = lines.pop()["__vmhwm_kib"] * 1024
    return (lines[-1] if lines else {}), wall, peak


def table(rows: list[dict], columns: list[str]) -> str:
    """A plain aligned text table."""
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)
