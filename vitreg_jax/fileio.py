"""Writing files safely and reporting errors on one line: the one place the package does either.

Every file vitreg-jax writes for a user goes through :func:`atomic_write` (or its text / JSON forms): the
bytes go to a hidden temporary file beside the target, which is renamed over it only once complete, so a kill
never leaves a half-written file. Files get the usual ``0666 & ~umask`` permissions, like any other tool's
output, and :func:`make_dir` gives folders ``0777 & ~umask``.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from vitreg_jax.errors import UserError


def first_line(e: BaseException | object) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def umask() -> int:
    """The process's file-creation mask (read without changing it for longer than a moment)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], Any]) -> None:
    """Call ``write(f)`` on a temporary file beside ``path``, then rename it to ``path``.

    A missing or unwritable folder is a :class:`UserError`; any failure removes the temporary file.
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except FileNotFoundError:
        raise UserError(f"{path.parent}: no such directory") from None
    except PermissionError:
        raise UserError(f"{path.parent}: not writable") from None
    try:
        os.fchmod(fd, 0o666 & ~umask())  # mkstemp's 0600 would make the result private to its writer
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, sort_keys: bool = False) -> None:
    """``obj`` as indented JSON plus a newline (it must be JSON-serialisable: see :func:`json_safe`)."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n")


def read_json_object(path: str | os.PathLike[str], what: str) -> dict[str, Any]:
    """A file holding one JSON object (``what`` names it in errors), or one :class:`UserError` line.

    Unreadable files, non-UTF-8 bytes, invalid or too deeply nested JSON and a top level that is not an object
    are all user errors; nothing else escapes.
    """
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # ValueError: not JSON, not UTF-8
        raise UserError(f"{path}: cannot read it as {what} ({first_line(e)})") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: not {what} (expected a JSON object)")
    return value


def read_json_object_or_none(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """A file holding one JSON object, or None when it is missing or unreadable as one (a run's own record
    files, which a later step rewrites when they are damaged)."""
    try:
        return read_json_object(path, "a JSON object")
    except UserError:
        return None


class NotARegularFile(OSError):
    """A FIFO, a device or a socket where a file was expected: reading it could block forever or never end."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__(errno.EINVAL, "not a regular file (a FIFO, device or socket)", os.fspath(path))


def open_regular_file(path: str | os.PathLike[str]) -> BinaryIO:
    """Open a regular file for reading. A FIFO is opened without waiting for a writer and refused like a
    device or a socket (:class:`NotARegularFile`); a folder raises ``IsADirectoryError``."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), os.fspath(path))
        if not stat.S_ISREG(mode):
            raise NotARegularFile(path)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def check_new_file(path: str | os.PathLike[str], *, force: bool, option: str = "--out") -> Path:
    """The one rule of every command that writes one named file (``eval --out``, ``knn --out``, ``export
    --out``): an existing file is replaced only with ``force``; a folder or a missing parent folder is a
    :class:`UserError` naming ``option``."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{option} {path}: is a folder, expected a file name")
    if (path.exists() or path.is_symlink()) and not force:
        raise UserError(f"{option} {path}: already exists (pass --force to replace it)")
    if not path.absolute().parent.is_dir():
        raise UserError(f"{option} {path}: no such folder {path.absolute().parent}")
    return path


def make_dir(path: str | os.PathLike[str]) -> Path:
    """``mkdir -p`` with the user's umask; an OS failure is one :class:`UserError` line."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UserError(f"{path}: exists and is not a directory") from None
    except OSError as e:
        raise UserError(f"{path}: cannot create it ({e.strerror or first_line(e)})") from None
    return path
