"""One run at a time per output folder: an exclusive lock file that a killed run cannot leave behind.

``with FolderLock(folder, what="embed"):`` holds ``folder/.vitreg-jax-<what>.lock`` for the duration. The lock
is a ``flock`` on that file, which the kernel drops when its holder exits, however it exits, so a run killed
with SIGKILL never blocks the next one. The file also records the holder's host and pid, for the message a
second run prints (``UserError``: the folder is in use by another run). Where the file system does not
support ``flock`` (some network mounts), the recorded pid decides instead: a lock left by a process that no
longer runs on this host is taken over, one held on another host blocks.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
from pathlib import Path
from types import TracebackType
from typing import Self

from vitreg_jax.errors import UserError


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
        self.path = self.folder / f".vitreg-jax-{what}.lock"
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
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise self._busy(self._holder()) from None
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
