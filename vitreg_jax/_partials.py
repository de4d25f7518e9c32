"""Hidden work entries beside an output (``.NAME.XXXXXXXX.partial``), held while in use, removed once stale.

A writer that builds ``DIR`` (or ``FILE``) in a hidden ``.DIR.XXXXXXXX.partial`` next to it and renames it into
place at the end leaves that entry behind when it is killed (SIGKILL, a lost machine) before it can clean up.
So the writer holds an ``flock`` on the entry for as long as it works on it (:func:`hold`; the kernel drops it
when the process dies, however it dies), and the next writer of the same output removes every such entry that
nobody holds (:func:`remove_stale`). Entries younger than ``GRACE_S`` are left alone: they may belong to a
writer between creating the entry and taking its lock.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
from pathlib import Path

try:  # POSIX; elsewhere stale entries are simply not removed
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["GRACE_S", "SUFFIX", "hold", "release", "remove_stale"]

SUFFIX = ".partial"
GRACE_S = 10.0
_RANDOM = r"[A-Za-z0-9_]{8}"  # tempfile.mkdtemp / mkstemp's random part


def hold(path: str | os.PathLike[str]) -> int | None:
    """Take an exclusive lock on the entry ``path`` (a folder or a file); returns the descriptor to release."""
    if fcntl is None:  # pragma: no cover - Windows
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException:
        os.close(fd)
        raise
    return fd


def release(fd: int | None) -> None:
    """Release a lock taken by :func:`hold` (``None`` is accepted and ignored)."""
    if fd is not None:
        os.close(fd)


def remove_stale(out: str | os.PathLike[str], *, grace_s: float = GRACE_S) -> list[Path]:
    """Remove the ``.OUT.XXXXXXXX.partial`` entries beside ``out`` that no live process holds; returns them."""
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
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # held: a live writer
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
