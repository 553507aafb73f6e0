"""This process's memory: resident now and at its peak, as progress lines and benchmarks report it."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from .errors import ConfigError


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


def machine_memory_bytes() -> int:
    """The memory this process can have: the machine's physical memory, or its container's (cgroup) limit when
    that is lower."""
    import psutil

    total = psutil.virtual_memory().total
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit).read_text().strip()
        except OSError:
            continue
        if text.isdigit():  # cgroup v2 writes "max" when there is no limit
            total = min(total, int(text))
    return total


def available_memory_bytes() -> int:
    """The memory available to new allocations now (without swapping), at most this process's limit."""
    import psutil

    return min(psutil.virtual_memory().available, machine_memory_bytes())


def check_fits_in_memory(nbytes: int, what: str, fix: str) -> None:
    """Refuse, in one line, to allocate `nbytes` for `what` when the machine has less memory than that (it would
    be killed for memory, or fail in a traceback)."""
    have = machine_memory_bytes()
    if nbytes > have:
        raise ConfigError(
            f"{what} takes {nbytes / 1e9:,.1f} GB of memory, this machine has {have / 1e9:,.1f} GB: {fix}"
        )


def memory_line() -> str:
    """ "RSS 1.20 GB (peak 1.90 GB)": for progress lines."""
    rss = rss_bytes()
    return f"RSS {rss / 1e9:.2f} GB (peak {max(peak_rss_bytes(), rss) / 1e9:.2f} GB)"


def lazy_zeros(shape: tuple[int, ...], dtype) -> np.ndarray:
    """A zero array whose memory becomes resident 4 KB page by page as it is written.

    For caches sized for the worst case and filled a little at a time. np.zeros is lazy too, but numpy
    asks for transparent huge pages on large arrays, so one written byte makes 2 MB resident: a KV cache
    row that holds a few tokens per head would pull in its whole max_context region.
    """
    import mmap

    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if nbytes < mmap.PAGESIZE or not hasattr(mmap, "MAP_ANONYMOUS"):
        return np.zeros(shape, dtype)
    buffer = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        buffer.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(buffer, dtype).reshape(shape)  # the array keeps the mapping alive
