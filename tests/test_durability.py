"""Crash-safe writes: the data is fsynced before the rename, the directory after it,
and a write that fails midway leaves the previous file byte-identical and no temporary.

The real ``os.fsync``/``os.replace`` still run; the tests only record what each call
was made on, and in which order (``atomic_write`` is used for checkpoints, client
state, run files and keys).
"""

from __future__ import annotations

import errno
import os
import stat

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from fedcore.core.config import Config
from fedcore.serverside.checkpoint import (
    CHECKPOINT_FILE,
    ServerState,
    load_checkpoint,
    save_checkpoint,
)
from fedcore.storage.files import atomic_write


def _state(round_, value):
    arrays = ArrayRecord({"w": Array(np.full((64, 64), value, np.float32))})
    return ServerState(round_, arrays, {}, [{"round": r} for r in range(1, round_ + 1)], Config())


@pytest.fixture
def calls(monkeypatch):
    """Record every ``os.fsync`` (what it syncs) and ``os.replace`` in order."""
    events: list[tuple] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        st = os.fstat(fd)
        kind = "dir" if stat.S_ISDIR(st.st_mode) else "file"
        events.append(("fsync", kind, st.st_ino, st.st_size))
        return real_fsync(fd)

    def replace(src, dst, *args, **kwargs):
        events.append(("replace", os.stat(src).st_ino, os.fspath(dst)))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def _assert_durable_order(events, target, size):
    """fsync(temp file, all bytes written) -> replace(temp -> target) -> fsync(its dir)."""
    steps = [e[0] if e[0] == "replace" else f"fsync {e[1]}" for e in events]
    assert steps == ["fsync file", "replace", "fsync dir"], events
    (_, _, file_ino, synced_size), (_, renamed_ino, dst), (_, _, dir_ino, _) = events
    assert synced_size == size  # the fsync came after the last byte, not before it
    assert renamed_ino == file_ino  # the file fsynced is the one renamed into place
    assert dst == str(target)
    assert dir_ino == os.stat(target.parent).st_ino  # the directory holding the new name
    assert os.stat(target).st_ino == file_ino


def test_atomic_write_fsyncs_the_file_before_the_rename_and_the_directory_after(tmp_path, calls):
    target = tmp_path / "sub" / "out.bin"
    data = os.urandom(300_000)
    atomic_write(target, data)
    _assert_durable_order(calls, target, len(data))
    assert target.read_bytes() == data
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.bin"]


def test_checkpoints_are_written_the_same_way(tmp_path, calls):
    save_checkpoint(tmp_path, _state(2, 1.0))
    target = tmp_path / CHECKPOINT_FILE
    _assert_durable_order(calls, target, target.stat().st_size)
    assert load_checkpoint(tmp_path).round == 2


class _FailingWrites:
    """A file object that writes its first ``budget`` bytes, then raises ``exc``."""

    def __init__(self, f, exc, budget=1000):
        self._f, self._exc, self._budget = f, exc, budget

    def write(self, b):
        if len(b) > self._budget:
            self._f.write(b[: self._budget])
            self._budget = 0
            raise self._exc
        self._budget -= len(b)
        return self._f.write(b)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def _inject(monkeypatch, where, exc):
    """Make the write, the file's fsync or the rename raise ``exc`` (once)."""
    if where == "write":
        real_fdopen = os.fdopen
        monkeypatch.setattr(
            os, "fdopen", lambda fd, *a, **k: _FailingWrites(real_fdopen(fd, *a, **k), exc)
        )
        return
    name = {"fsync": "fsync", "rename": "replace"}[where]
    real_call = getattr(os, name)
    fired = []

    def failing(*args, **kwargs):
        if not fired:
            fired.append(args)
            raise exc
        return real_call(*args, **kwargs)

    monkeypatch.setattr(os, name, failing)


@pytest.mark.parametrize("where", ["write", "fsync", "rename"])
@pytest.mark.parametrize(
    "exc",
    [OSError(errno.EIO, "Input/output error (injected)"), KeyboardInterrupt()],
    ids=["OSError", "KeyboardInterrupt"],
)
def test_a_checkpoint_write_failing_midway_keeps_the_old_one_and_no_temporary(
    tmp_path, monkeypatch, where, exc
):
    save_checkpoint(tmp_path, _state(3, 1.0))
    target = tmp_path / CHECKPOINT_FILE
    before = target.read_bytes()
    _inject(monkeypatch, where, exc)
    with pytest.raises(type(exc)):
        save_checkpoint(tmp_path, _state(4, 2.0))
    monkeypatch.undo()
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_FILE]
    back = load_checkpoint(tmp_path)
    assert back.round == 3 and back.arrays["w"].numpy()[0, 0] == 1.0


def test_a_failed_first_write_leaves_nothing(tmp_path, monkeypatch):
    _inject(monkeypatch, "write", OSError(errno.ENOSPC, "No space left on device (injected)"))
    with pytest.raises(OSError, match="No space left"):
        atomic_write(tmp_path / "new.bin", b"x" * 5000)
    assert list(tmp_path.iterdir()) == []
