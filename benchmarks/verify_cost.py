"""Cost of verifying an export on open: size checks vs sha256 of every file, warm and cold page cache.

    python benchmarks/verify_cost.py EXPORT_DIR [--cold]

--cold evicts each file from the page cache first (posix_fadvise DONTNEED; no root needed), so the
sha256 time includes reading from disk as a first open after a copy or a reboot would.
Prints one line per mode; numbers depend on the disk and the CPU's SHA extensions.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from codegen_deploy.artifacts.manifest import read_manifest


def evict(folder: Path) -> None:
    """Drop the folder's files from the page cache (a hint; the kernel may keep some pages)."""
    for p in folder.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("export_dir", type=Path)
    p.add_argument("--cold", action="store_true", help="evict the files from the page cache before each sha256 run")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    total = sum(f.stat().st_size for f in args.export_dir.rglob("*") if f.is_file())
    load = os.getloadavg()[0]
    print(f"{args.export_dir}: {total / 1e9:.2f} GB in files; {os.cpu_count()} CPUs; load average {load:.2f}")
    for verify in ("size", "sha256"):
        times = []
        for _ in range(args.repeats):
            if args.cold and verify == "sha256":
                evict(args.export_dir)
            start = time.perf_counter()
            read_manifest(args.export_dir, verify=verify)
            times.append(time.perf_counter() - start)
        best = min(times)
        rate = f", {total / best / 1e9:.2f} GB/s" if verify == "sha256" else ""
        cold = " (cold cache)" if args.cold and verify == "sha256" else ""
        runs = ", ".join(f"{t:.3f}" for t in times)
        print(f"verify={verify}{cold}: best {best:.3f} s of {args.repeats} ({runs}){rate}")


if __name__ == "__main__":
    main()
