"""Output paths of ``convert`` / ``export``: refuse what cannot or must not be written before any work, create
missing parent folders (so a failure can remove exactly those), and turn OS errors into one line."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from vitreg_jax.errors import UserError
from vitreg_jax.fileio import first_line


def check_new_path(path: Path, force: bool, what: str) -> None:
    """Refuse ``path`` (a "directory" or "file" to create) if it exists without ``force`` or cannot be
    made."""
    if path.exists() or path.is_symlink():
        if not force:
            raise UserError(f"{path}: already exists (pass --force to replace it)")
        if what == "directory" and not path.is_dir():
            raise UserError(f"{path}: exists and is not a directory; refusing to replace it")
        if what == "file" and path.is_dir():
            raise UserError(f"{path}: is a directory, expected a file name")
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"{path}: cannot be created: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"{path}: cannot be created: {ancestor} is not writable")


def make_parents(path: Path) -> list[Path]:
    """Create the missing parents of ``path``; return them (deepest last) so a failure can remove them."""
    missing = []
    p = path.parent
    while not p.exists():
        missing.append(p)
        p = p.parent
    missing.reverse()
    for d in missing:
        try:
            d.mkdir()
        except OSError as e:
            remove_empty(missing)
            raise UserError(f"{d}: cannot create it ({e.strerror or first_line(e)})") from None
    return missing


def remove_empty(dirs: list[Path]) -> None:
    """Remove the folders ``make_parents`` created, deepest first, where they are still empty."""
    for d in reversed(dirs):
        with contextlib.suppress(OSError):
            d.rmdir()


def os_error(e: OSError, where: Path) -> UserError:
    """An OS failure while writing ``where`` as one line."""
    return UserError(f"{getattr(e, 'filename', None) or where}: {e.strerror or first_line(e)}")


@contextlib.contextmanager
def parents_made_for(*paths: Path) -> Iterator[list[Path]]:
    """Create the missing parents of ``paths`` for the body that writes them, yielding the folders made; if
    the body raises, remove those folders again (where still empty), an OSError becoming one line."""
    made = [d for path in paths for d in make_parents(path)]
    try:
        yield made
    except OSError as e:
        remove_empty(made)
        raise os_error(e, paths[0]) from None
    except BaseException:
        remove_empty(made)
        raise
