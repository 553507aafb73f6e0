"""The one atomic write: lock, stale temporary folders, --force at rename time, protected sources, full and
read-only disks (on a small tmpfs where this machine lets the test mount one)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from codegen_deploy.atomic import check_output, remove_stale, staging_folder, write_error
from codegen_deploy.errors import ArtifactError


def dead_pid() -> int:
    """The pid of a process that has ended."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_success_renames_and_leaves_nothing_else(tmp_path):
    with staging_folder(tmp_path / "out") as tmp:
        (tmp / "a.txt").write_text("a")
    assert (tmp_path / "out" / "a.txt").read_text() == "a"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no lock, no temp folder


def test_failure_leaves_nothing_and_keeps_the_old_output(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), staging_folder(tmp_path / "out", replace=True) as tmp:
        (tmp / "new.txt").write_text("new")
        raise RuntimeError("boom")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["old.txt"]


def test_second_run_into_one_output_fails_at_once(tmp_path):
    busy = f"being written by another run \\(pid {os.getpid()}\\)"
    with staging_folder(tmp_path / "out"), pytest.raises(ArtifactError, match=busy), staging_folder(tmp_path / "out"):
        pass
    with staging_folder(tmp_path / "out") as tmp:  # released: the next run may write
        (tmp / "x").write_text("x")


def test_rename_refuses_an_output_that_appeared_meanwhile(tmp_path):
    out = tmp_path / "out"
    refused = pytest.raises(ArtifactError, match="already exists and is not empty: pass --force")
    with refused, staging_folder(out) as tmp:
        (tmp / "mine.txt").write_text("mine")
        out.mkdir()
        (out / "theirs.txt").write_text("theirs")  # another writer's result must survive
    assert [p.name for p in out.iterdir()] == ["theirs.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_empty_existing_folder_may_be_replaced(tmp_path):
    (tmp_path / "out").mkdir()
    with staging_folder(tmp_path / "out") as tmp:
        (tmp / "a").write_text("a")
    assert (tmp_path / "out" / "a").is_file()


def test_stale_partial_folders_of_dead_runs_are_removed(tmp_path):
    pid = dead_pid()
    stale = tmp_path / f".out.partial-{pid}"
    stale.mkdir()
    (stale / "half.onnx").write_text("half")
    stale_tmp = tmp_path / f".out.tmp-{pid}"
    stale_tmp.write_text("half")
    live = tmp_path / f".out.partial-{os.getpid()}x"  # not ours to touch: not the pattern
    live.mkdir()
    other = tmp_path / f".other.partial-{pid}"  # another output's leftovers: its own run cleans them
    other.mkdir()
    with staging_folder(tmp_path / "out"):
        pass
    assert not stale.exists() and not stale_tmp.exists()
    assert live.exists() and other.exists()


def test_old_output_moved_aside_by_a_killed_run_is_put_back(tmp_path):
    old = tmp_path / f".out.old-{dead_pid()}"
    old.mkdir()
    (old / "model.onnx").write_text("previous export")
    remove_stale(tmp_path / "out")
    assert (tmp_path / "out" / "model.onnx").read_text() == "previous export"


def test_source_and_current_folder_are_protected(tmp_path, monkeypatch):
    source = tmp_path / "ck"
    source.mkdir()
    (source / "config.json").write_text("{}")
    with pytest.raises(ArtifactError, match="which this command reads"):
        check_output(source, replace=True, protect=[source])
    with pytest.raises(ArtifactError, match="which this command reads"):
        check_output(tmp_path, replace=True, protect=[source])
    monkeypatch.chdir(source)
    with pytest.raises(ArtifactError, match="holds the current folder"):
        check_output(".", replace=True)
    assert check_output(source / "sub", protect=[source]) == source / "sub"  # inside the source is fine


def test_a_file_on_the_output_path(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ArtifactError, match="file is a file, not a folder"):
        check_output(tmp_path / "file" / "sub")


def test_write_error_reads_library_messages():
    assert write_error(OSError(28, "No space left on device")) == "No space left on device"
    assert write_error(RuntimeError("IoError(Os { code: 30, kind: ReadOnlyFilesystem })")) == "ReadOnlyFilesystem"
    wrapped = RuntimeError("could not save")
    wrapped.__cause__ = OSError(122, "Disk quota exceeded")
    assert write_error(wrapped) == "Disk quota exceeded"
    assert write_error(ValueError("bad value")) is None


def test_full_disk_is_one_error_and_nothing_left(tmp_path, tmpfs):
    full = pytest.raises(ArtifactError, match=r"could not write .*out \(No space left on device\)")
    with tmpfs(tmp_path / "small", "256k") as disk:
        with full, staging_folder(disk / "out") as tmp:
            (tmp / "big.bin").write_bytes(b"\0" * (1 << 20))
        assert list(disk.iterdir()) == []


def test_read_only_disk_is_one_error(tmp_path, tmpfs):
    refused = pytest.raises(ArtifactError, match="cannot write to .*Read-only file system")
    with tmpfs(tmp_path / "ro", "64k", read_only=True) as disk, refused, staging_folder(disk / "out"):
        pass


def test_outputs_get_the_umasks_permissions_even_where_a_writer_made_its_file_private(tmp_path):
    """Other users of a shared machine read what we write, as the umask says (safetensors writes 0600)."""
    from codegen_deploy.model.make_checkpoint import make_checkpoint

    previous = os.umask(0o022)
    try:
        with staging_folder(tmp_path / "out") as tmp:
            (tmp / "private.bin").write_bytes(b"x")
            (tmp / "private.bin").chmod(0o600)
            (tmp / "tool").write_bytes(b"#!/bin/sh\n")
            (tmp / "tool").chmod(0o700)
        assert (tmp_path / "out" / "private.bin").stat().st_mode & 0o777 == 0o644
        assert (tmp_path / "out" / "tool").stat().st_mode & 0o777 == 0o744  # nothing made executable
        checkpoint = make_checkpoint(tmp_path / "checkpoint", shape="tiny", layout="safetensors")
        assert {p.name: p.stat().st_mode & 0o777 for p in checkpoint.iterdir()} == {
            "config.json": 0o644,
            "model.safetensors": 0o644,
            "tokenizer.json": 0o644,
        }
        os.umask(0o077)  # a private umask keeps everything private
        with staging_folder(tmp_path / "private") as tmp:
            (tmp / "weights.bin").write_bytes(b"x")
            (tmp / "weights.bin").chmod(0o600)
        assert (tmp_path / "private" / "weights.bin").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(previous)
