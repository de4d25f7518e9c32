"""Small shared helpers for writing files safely and reporting errors on one line."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from vitreg_jax.errors import UserError


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def atomic_write(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """Write to a temporary file beside ``path``, then rename: no half-written file is ever left."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except FileNotFoundError:
        raise UserError(f"{path.parent}: no such directory") from None
    except PermissionError:
        raise UserError(f"{path.parent}: not writable") from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would make the result private to its writer
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
