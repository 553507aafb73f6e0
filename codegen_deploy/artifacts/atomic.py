"""The one way this toolkit writes outputs: into a temporary sibling, renamed into place when complete.

A crash, a full disk or Ctrl-C never leaves a half-written file or folder under the final name, and an
existing output is replaced only after the new one is complete.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import ArtifactError


def write_bytes_atomic(path: Path, data) -> None:
    """Write bytes (or any buffer, e.g. TensorRT's IHostMemory) to a temporary name, then rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as e:
        raise ArtifactError(f"could not write {path} ({e.strerror or e}): check free disk space and permissions") from e
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    """write_bytes_atomic for UTF-8 text."""
    write_bytes_atomic(path, text.encode())


@contextmanager
def staging_folder(output: Path) -> Iterator[Path]:
    """Yield an empty hidden folder beside `output`; on success rename it to `output` (replacing an
    existing folder only then), on any failure remove it."""
    output = Path(output)
    tmp = output.parent / f".{output.name}.partial-{os.getpid()}"
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as e:
        raise ArtifactError(f"cannot write to {output.parent} ({e.strerror or e}): choose another output") from e
    try:
        yield tmp
        _replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace(tmp: Path, output: Path) -> None:
    """Move the finished folder into place; an existing output is removed only afterwards."""
    old = None
    if output.exists():
        old = output.parent / f".{output.name}.old-{os.getpid()}"
        output.rename(old)
    tmp.rename(output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
