"""This process's memory: resident now and at its peak, as progress lines and benchmarks report it."""

from __future__ import annotations

import sys
from pathlib import Path


def peak_rss_bytes() -> int:
    """This process's own peak resident set size (VmHWM).

    Not getrusage's ru_maxrss: Linux carries a parent's peak across fork + exec into the child's
    ru_maxrss, so a child started by a large parent would report the parent's size.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    try:
        import resource
    except ImportError:  # Windows
        import psutil

        return psutil.Process().memory_info().peak_wset
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def rss_bytes() -> int:
    """This process's resident set size now."""
    import psutil

    return psutil.Process().memory_info().rss


def memory_line() -> str:
    """ "RSS 1.20 GB (peak 1.90 GB)": for progress lines."""
    rss = rss_bytes()
    return f"RSS {rss / 1e9:.2f} GB (peak {max(peak_rss_bytes(), rss) / 1e9:.2f} GB)"
