"""Time to open an export with onnxruntime, verify="size" vs "sha256" (hashed in a thread during the load).

    python benchmarks/verify_open_cost.py EXPORT_DIR [--repeats 3]

Alternates the modes so load drift on a shared machine hits both; prints each run and the best.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from codegen_deploy.runtime.backends import open_session


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("export_dir", type=Path)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    times: dict[str, list[float]] = {"size": [], "sha256": []}
    for _ in range(args.repeats):
        for verify in times:
            start = time.perf_counter()
            open_session("onnxruntime", args.export_dir, verify=verify).close()
            times[verify].append(time.perf_counter() - start)
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    for verify, runs in times.items():
        print(f"open with verify={verify}: best {min(runs):.2f} s ({', '.join(f'{t:.2f}' for t in runs)})")


if __name__ == "__main__":
    main()
