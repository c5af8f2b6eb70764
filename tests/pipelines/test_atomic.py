"""Atomic writes and folder locks (issue 17 items 3 and 5)."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.atomic import FolderLock, FolderLocked, create_exclusive, live_locks, write_text_atomic


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _write_lock(path: Path, pid: int, host: str | None = None) -> None:
    path.write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), "since": "earlier",
                                "what": "test"}))


def test_second_writer_is_refused_naming_the_holder(tmp_path: Path) -> None:
    with FolderLock(tmp_path / ".lock", "first"):
        holder = json.loads((tmp_path / ".lock").read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(FolderLocked, match=rf"in use by process {os.getpid()} on .* \(first\).*delete"):
            FolderLock(tmp_path / ".lock", "second").acquire()
    assert not (tmp_path / ".lock").exists()  # released
    FolderLock(tmp_path / ".lock", "again").acquire().release()


def test_a_live_process_elsewhere_or_here_keeps_its_lock(tmp_path: Path) -> None:
    _write_lock(tmp_path / ".lock", _dead_pid(), host="another-host.example")
    with pytest.raises(FolderLocked, match="another-host.example"):
        FolderLock(tmp_path / ".lock", "x").acquire()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_lock(tmp_path / ".lock", sleeper.pid)
        with pytest.raises(FolderLocked, match=f"process {sleeper.pid}"):
            FolderLock(tmp_path / ".lock", "x").acquire()
        assert [h["pid"] for h in live_locks(tmp_path)] == [sleeper.pid]
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_stale_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path: Path, caplog) -> None:
    dead = _dead_pid()
    _write_lock(tmp_path / ".lock", dead)
    assert live_locks(tmp_path) == []
    with caplog.at_level(logging.WARNING):
        lock = FolderLock(tmp_path / ".lock", "x").acquire()
    assert f"stale lock of process {dead}" in caplog.text
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    lock.release()


def _race(args) -> str:
    path, token = args
    create_exclusive(Path(path), token + "\n")
    return Path(path).read_text().strip()


def test_create_exclusive_gives_every_racer_the_same_whole_content(tmp_path: Path) -> None:
    path = tmp_path / ".salt"
    with mp.get_context("spawn").Pool(4) as pool:
        seen = pool.map(_race, [(str(path), f"{k:032x}") for k in range(16)])
    assert len(set(seen)) == 1 and len(seen[0]) == 32
    assert (path.stat().st_mode & 0o777) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == [".salt"]  # no temporary left


def test_write_text_atomic_mode_and_no_leftovers(tmp_path: Path) -> None:
    write_text_atomic(tmp_path / "a.csv", "x\n", mode=0o600)
    assert (tmp_path / "a.csv").stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["a.csv"]
