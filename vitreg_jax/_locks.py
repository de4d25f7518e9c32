"""Locks on the file system that a killed process cannot leave behind: both are ``flock`` locks, which the
kernel drops when their holder exits, however it exits (SIGKILL, a lost machine).

- :class:`FolderLock`: one run at a time per output folder. ``with FolderLock(folder, what="embed"):`` holds
  ``folder/.vitreg-jax-<what>.lock`` for the duration; the file also records the holder's host and pid, for
  the message a second run prints (``UserError``: the folder is in use by another run). Where the file system
  does not support ``flock`` (some network mounts), the recorded pid decides instead: a lock left by a process
  that no longer runs on this host is taken over, one held on another host blocks.
- Hidden work entries beside an output (``.NAME.XXXXXXXX.partial``): a writer that builds ``DIR`` (or
  ``FILE``) in such an entry and renames it into place at the end holds the entry (:func:`hold`) while it
  works, and the next writer of the same output removes every entry that nobody holds (:func:`remove_stale`).
  Entries younger than ``GRACE_S`` are left alone: they may belong to a writer between creating the entry
  and taking its lock.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import time
from pathlib import Path
from types import TracebackType
from typing import Self

from vitreg_jax.errors import UserError

try:  # POSIX; elsewhere stale entries are simply not removed and folder locks go by the recorded pid
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["GRACE_S", "SUFFIX", "FolderLock", "hold", "release", "remove_stale"]


def _lock(fd: int) -> bool:
    """Take an exclusive ``flock`` on ``fd`` without waiting: True when taken, False when another process
    holds it. Any other ``OSError`` (no ``flock`` on this file system) is raised."""
    if fcntl is None:  # pragma: no cover - Windows
        raise OSError(errno.ENOSYS, "flock is not available")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


# partial entries -----------------------------------------------------------------------------------------
SUFFIX = ".partial"
GRACE_S = 10.0
_RANDOM = r"[A-Za-z0-9_]{8}"  # tempfile.mkdtemp / mkstemp's random part


def hold(path: str | os.PathLike[str]) -> int | None:
    """Take an exclusive lock on the entry ``path`` (a folder or a file); returns the descriptor to
    release."""
    if fcntl is None:  # pragma: no cover - Windows
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        if not _lock(fd):
            raise BlockingIOError(errno.EWOULDBLOCK, "held by another process", os.fspath(path))
    except BaseException:
        os.close(fd)
        raise
    return fd


def release(fd: int | None) -> None:
    """Release a lock taken by :func:`hold` (``None`` is accepted and ignored)."""
    if fd is not None:
        os.close(fd)


def remove_stale(out: str | os.PathLike[str], *, grace_s: float = GRACE_S) -> list[Path]:
    """Remove the ``.OUT.XXXXXXXX.partial`` entries beside ``out`` that no live process holds; returns
    them."""
    if fcntl is None:  # pragma: no cover - Windows
        return []
    out = Path(out)
    pattern = re.compile(rf"\.{re.escape(out.name)}\.{_RANDOM}{re.escape(SUFFIX)}")
    removed = []
    try:
        candidates = [p for p in out.parent.iterdir() if pattern.fullmatch(p.name)]
    except OSError:
        return []
    now = time.time()
    for path in candidates:
        try:
            if now - path.lstat().st_mtime < grace_s or path.is_symlink():
                continue
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            try:
                if not _lock(fd):  # held: a live writer
                    continue
            except OSError:  # no flock here: leave it
                continue
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            removed.append(path)
        finally:
            os.close(fd)
    return removed


# folder locks ------------------------------------------------------------------------------------------
def lock_file_name(what: str) -> str:
    """The name of the lock file a ``what`` run keeps in its folder (a killed run may leave it behind)."""
    return f".vitreg-jax-{what}.lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


class FolderLock:
    """An exclusive, non-blocking lock on a folder (see the module docstring); the folder must exist."""

    def __init__(self, folder: str | os.PathLike[str], what: str) -> None:
        self.folder = Path(folder)
        self.what = what
        self.path = self.folder / lock_file_name(what)
        self._fd: int | None = None

    def _holder(self) -> dict[str, object]:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def _busy(self, holder: dict[str, object]) -> UserError:
        who = f" (pid {holder.get('pid')} on {holder.get('host')})" if holder.get("pid") else ""
        return UserError(
            f"{self.folder} is in use by another {self.what} run{who}; wait for it to finish or choose "
            "another output folder"
        )

    def acquire(self) -> None:
        me = {"host": socket.gethostname(), "pid": os.getpid()}
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as e:
                raise UserError(f"{self.folder}: cannot create a lock file ({e.strerror})") from None
            try:
                if not _lock(fd):
                    os.close(fd)
                    raise self._busy(self._holder())
            except OSError as e:
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    os.close(fd)
                    raise
                holder = self._holder()  # no flock here: trust the recorded pid
                stale = holder.get("host") == me["host"] and not _pid_alive(int(holder.get("pid") or 0))
                if holder and not stale and holder.get("pid") != me["pid"]:
                    os.close(fd)
                    raise self._busy(holder) from None
            # the file may have been removed by the run that held it, after we opened it: lock the new one
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(me).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)  # while still holding it, so no one locks the old file after this
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
