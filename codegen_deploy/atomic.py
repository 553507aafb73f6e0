"""The one way this toolkit writes outputs: into a temporary sibling, renamed into place when complete.

A crash, a full disk, Ctrl-C or SIGTERM never leaves a half-written file or folder under the final
name, and an existing output is replaced only after the new one is complete, and only when the caller
allowed it (`replace`, i.e. --force). One run at a time writes a given output: a lock file beside it
makes a second run fail at once instead of silently replacing the first one's result. Temporary
folders of runs that were killed (SIGKILL, a power cut) are removed by the next run into that output.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import ArtifactError, CodegenDeployError

# errno values that only writing produces: a full disk, a quota, a read-only file system, a too-large file.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}
# What other libraries (safetensors, onnx, protobuf) put in their messages for the same failures.
_WRITE_MESSAGES = (
    "No space left on device",
    "Read-only file system",
    "Disk quota exceeded",
    "File too large",
    "StorageFull",
    "ReadOnlyFilesystem",
)
# numpy's tofile (onnx_ir writes weights with it) reports a failed fwrite without its errno.
_NUMPY_WRITE = "problem writing element"


def absolute(path: str | Path) -> Path:
    """`path` made absolute with `.` and `..` removed (without following symlinks), so `--output .` has a
    name and a parent."""
    return Path(os.path.abspath(os.fspath(path)))


def write_error(error: BaseException, where: Path | None = None) -> str | None:
    """The reason (e.g. "No space left on device") if `error` is a failed write, else None.

    Libraries report a full or read-only disk as OSError or as their own exception types (with the
    OS message inside), sometimes chained: the chain is searched. where: a folder on the disk written
    to, to name the reason when the library did not (numpy).
    """
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _WRITE_ERRNOS:
            return error.strerror or os.strerror(error.errno)
        text = str(error)
        for message in _WRITE_MESSAGES:
            if message in text:
                return message
        if _NUMPY_WRITE in text:
            return os.strerror(errno.ENOSPC) if where is not None and _nearly_full(where) else "a write failed"
        error = error.__cause__ or error.__context__
    return None


def _nearly_full(folder: Path) -> bool:
    try:
        return shutil.disk_usage(folder).free < 1 << 20
    except OSError:
        return False


def _disk_error(where: Path, error: BaseException) -> ArtifactError | None:
    reason = write_error(error, where.parent)
    if reason is None and not isinstance(error, CodegenDeployError) and _nearly_full(where.parent):
        # Some writers (torch.save's zip writer) report a short write only as an inconsistency of their own.
        reason = os.strerror(errno.ENOSPC)
    if reason is None:
        return None
    return ArtifactError(f"could not write {where} ({reason}): free some disk space or choose another output")


@contextmanager
def replaced(path: str | Path) -> Iterator[Path]:
    """Yield a temporary name beside `path` to write the new file to; when the block ends without an error
    it is renamed to `path` (replacing what was there), otherwise removed. The one temporary-file write:
    a reader of `path` sees the old file or the whole new one, never part of it. A failed write becomes
    one ArtifactError."""
    path = absolute(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        raise ArtifactError(f"could not write {path} ({e.strerror or e}): check free disk space and permissions") from e
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomic(path: Path, data) -> None:
    """Write bytes (or any buffer, e.g. TensorRT's IHostMemory) to a temporary name, then rename."""
    with replaced(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def write_text_atomic(path: Path, text: str) -> None:
    """write_bytes_atomic for UTF-8 text."""
    write_bytes_atomic(path, text.encode())


FORCE_HINT = "pass --force to replace it, or choose another output"


def check_output(
    output: str | Path, replace: bool = False, protect: Iterable[str | Path] = (), hint: str = FORCE_HINT
) -> Path:
    """Refuse an output folder that cannot be written or must not be replaced; return it absolute.

    replace: an existing non-empty folder may be replaced (--force); an empty one always may. protect:
    paths (e.g. the source checkpoint) that the output must neither be nor contain. hint: what to do
    about an existing output.
    """
    output = absolute(output)
    for parent in [output, *output.parents]:
        if parent.exists() and not parent.is_dir():
            raise ArtifactError(f"{parent} is a file, not a folder: choose another output")
        if parent.exists():
            break
    for p in protect:
        p = absolute(p).resolve()
        if p == output.resolve() or output.resolve() in p.parents:
            raise ArtifactError(f"{output} would replace {p}, which this command reads: choose another output")
    cwd = Path.cwd().resolve()
    if output.exists() and (cwd == output.resolve() or output.resolve() in cwd.parents):
        raise ArtifactError(f"{output} holds the current folder, which cannot be replaced: choose another output")
    if output.is_dir() and not replace and any(output.iterdir()):
        raise ArtifactError(f"{output} already exists and is not empty: {hint}")
    return output


@contextmanager
def staging_folder(
    output: str | Path, *, replace: bool = False, protect: Iterable[str | Path] = (), hint: str = FORCE_HINT
) -> Iterator[Path]:
    """Yield an empty hidden folder beside `output`; on success rename it to `output`, on any failure
    (including KeyboardInterrupt and SystemExit) remove it.

    replace: an existing non-empty `output` may be replaced (checked again at the rename, so an output
    that appeared meanwhile is not silently overwritten). protect, hint: see check_output. Holds a lock beside
    `output` for the whole write: a second run into the same output fails at once. A full or read-only
    disk while writing becomes one ArtifactError.
    """
    protect = tuple(protect)
    output = check_output(output, replace, protect, hint)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ArtifactError(f"cannot create {output.parent} ({e.strerror or e}): choose another output") from e
    with _output_lock(output):
        remove_stale(output)
        tmp = output.parent / f".{output.name}.partial-{os.getpid()}"
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        except OSError as e:
            raise ArtifactError(f"cannot write to {output.parent} ({e.strerror or e}): choose another output") from e
        try:
            yield tmp
            open_to_umask(tmp)
            check_output(output, replace, protect, hint)  # something may have appeared there meanwhile
            _replace(tmp, output)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            error = _disk_error(output, e) if isinstance(e, Exception) else None
            if error is not None:
                raise error from e
            raise


def current_umask() -> int:
    """This process's umask, read without changing it where Linux shows it (os.umask sets it to read it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def open_to_umask(folder: Path) -> None:
    """Give every file in `folder` at least the permissions the umask gives a new file (0644 under the usual
    022): some writers (safetensors' temporary file) make theirs private (0600), so other users of a shared
    machine could not read the weights. Nothing is made more open than the umask allows."""
    mode = 0o666 & ~current_umask()
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            current = path.stat().st_mode & 0o7777
            if current | mode != current:
                path.chmod(current | mode)


@contextmanager
def _output_lock(output: Path) -> Iterator[None]:
    """An exclusive, non-blocking lock on `.<name>.lock` beside `output`, released when the process ends
    however it ends (flock), and its file removed when released."""
    path = output.parent / f".{output.name}.lock"
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ArtifactError(f"cannot write to {output.parent} ({e.strerror or e}): choose another output") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise ArtifactError(
                f"{output} is being written by another run (pid {holder}): wait for it to finish, "
                "or choose another output"
            ) from None
        # The file may have been removed by the previous holder between our open and our lock: then
        # this lock guards nothing, so start again on the file now at that path.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)


_STALE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|old|tmp)-(?P<pid>\d+)$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def remove_stale(output: str | Path) -> list[Path]:
    """Remove the hidden temporary folders and files that killed runs left beside `output`
    (`.<name>.partial-<pid>`, `.<name>.tmp-<pid>` of a pid no longer running); return them.

    A `.<name>.old-<pid>` is the previous output moved aside just before a killed run's final rename:
    it is put back when `output` is missing (nothing is lost), removed otherwise.
    """
    output = absolute(output)
    removed = []
    try:
        entries = list(output.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = _STALE.match(entry.name)
        if not m or m["name"] != output.name or _alive(int(m["pid"])):
            continue
        if m["kind"] == "old" and not output.exists():
            entry.rename(output)
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def _replace(tmp: Path, output: Path) -> None:
    """Move the finished folder into place; an existing output is removed only afterwards."""
    old = None
    if output.exists():
        old = output.parent / f".{output.name}.old-{os.getpid()}"
        output.rename(old)
    try:
        tmp.rename(output)
    except BaseException:
        if old is not None:
            old.rename(output)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
