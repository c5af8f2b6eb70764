"""Atomic file writes shared by the jobs: write a temporary sibling, fsync it, then rename it into place, so
that an interrupted run never leaves a half-written file behind (``os.replace`` is atomic on one file system);
and the lock files that keep two writers out of one output folder (:class:`FolderLock`)."""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import socket
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)


def write_text_atomic(path: Path, text: str, mode: int = 0o644) -> Path:
    """Write a UTF-8 text file atomically (temporary sibling, fsync, rename), with permissions ``mode``
    (default 0644, not mkstemp's 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _tmp_name(path: Path) -> Path:
    """``.NAME.tmp-PID-RANDOM.SUFFIXES`` beside ``path`` (the suffixes kept, for writers that choose the format
    by the file name, e.g. ``.nii.gz``)."""
    suffixes = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}{suffixes}")


def remove_stale_tmp(path: Path) -> None:
    """Delete the temporary siblings of ``path`` that a killed writer left (only those of dead processes)."""
    path = Path(path)
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.tmp-*"):
        pid = tmp.name[len(path.name) + 6:].split("-")[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: Path, mode: int = 0o644):
    """Yield a temporary sibling path to write ``path`` through (any writer, e.g. ``sitk.WriteImage``); on
    success it is fsynced, given ``mode`` and renamed onto ``path``; on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(path)
    tmp = _tmp_name(path)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def open_atomic(path: Path, mode: int = 0o644, **open_kwargs):
    """``open(path, "w", **open_kwargs)`` that writes a temporary sibling and renames it into place when the block
    ends without an error: a killed or failed writer never leaves a partial file at ``path``."""
    with atomic_path(path, mode) as tmp:
        with open(tmp, "w", **open_kwargs) as f:
            yield f


# ------------------------------------------------------------------------------------------------ locks


@contextlib.contextmanager
def folder_flock(folder: Path):
    """A short critical section between the processes of one host that work in ``folder`` (``fcntl.flock`` on
    the folder; released when the block ends or the process dies)."""
    import fcntl

    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class FolderLocked(FileExistsError):
    """Another live process holds the lock; the message names it (pid, host, since) and what to do."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class FolderLock:
    """An exclusive lock file (``O_CREAT | O_EXCL``) holding the owner's pid, host and start time as JSON.

    :meth:`acquire` refuses (:class:`FolderLocked`) while another live process holds it; a lock left by a dead
    process on this host is taken over with a warning (on another host the pid cannot be checked: the message
    says to delete the file once that run is known to be gone). Acquiring and taking over are serialised
    between processes of one host by an ``fcntl.flock`` on the lock's folder. Use as a context manager.
    """

    def __init__(self, path: Path, what: str) -> None:
        self.path = Path(path)
        self.what = what
        self.held = False

    def _holder(self) -> dict:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def acquire(self) -> "FolderLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
              "what": self.what}
        with folder_flock(self.path.parent):
            for _ in range(2):
                try:
                    fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                except FileExistsError:
                    holder = self._holder()
                    pid, host = holder.get("pid"), holder.get("host")
                    if host == me["host"] and isinstance(pid, int) and not _pid_alive(pid):
                        log.warning("%s: taking over a stale lock of process %d on %s (no longer running, since %s)",
                                    self.path, pid, host, holder.get("since", "?"))
                        self.path.unlink(missing_ok=True)
                        continue
                    who = f"process {pid} on {host}" if pid else "another process (lock file unreadable)"
                    raise FolderLocked(
                        f"{self.path.parent} is in use by {who} since {holder.get('since', '?')} "
                        f"({holder.get('what', '?')}); wait for it to finish or choose another folder. If that "
                        f"process is gone (e.g. on another machine), delete {self.path}") from None
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(json.dumps(me) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
                self.held = True
                return self
            raise FolderLocked(f"{self.path}: could not take the lock; try again")

    def release(self) -> None:
        if self.held and self._holder().get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def live_locks(folder: Path, pattern: str = ".lock*") -> list[dict]:
    """The lock files under ``folder`` matching ``pattern`` whose holder may be alive (another host's, or a
    live pid on this one), each as its JSON plus ``file``."""
    host = socket.gethostname()
    out = []
    for p in sorted(Path(folder).glob(pattern)):
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict):
            continue
        pid = data.get("pid")
        if data.get("host") != host or (isinstance(pid, int) and _pid_alive(pid)):
            out.append({**data, "file": p.name})
    return out


def create_exclusive(path: Path, text: str, mode: int = 0o600) -> bool:
    """Create ``path`` with ``text`` only if it does not exist, atomically and whole (written to a temporary
    sibling, then hard-linked into place, which fails if ``path`` exists). Returns True if this call created it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        return True
    finally:
        Path(tmp).unlink(missing_ok=True)
