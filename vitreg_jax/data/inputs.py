"""Command-line inputs to an ordered list of local image paths: image files, folders (recursive), path lists.

``list_inputs`` is what ``eval`` and the labelled folders read; :mod:`vitreg_jax.data.shards` builds on it for
``embed``'s wider inputs (tar shards, patterns, URLs). Nothing is opened here but folders and list files.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from vitreg_jax.errors import UserError

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)


# A file input with one of these extensions is a list of paths, one per line; any other file is an image.
LIST_EXTENSIONS = frozenset({".txt", ".lst", ".list"})


LIST_COMMENT = "#"


def list_inputs(inputs: Sequence[str | os.PathLike[str]]) -> list[str]:
    """Expand inputs (image files, folders, path-list files) into an ordered list of image paths.

    - A folder is searched recursively for files whose extension (any case) is in IMAGE_EXTENSIONS,
      sorted by path within it; names starting with "." (hidden files and folders) are skipped.
    - A file ending in .txt, .lst or .list lists image paths, one per line; blank lines and lines starting
      with "#" are ignored, relative paths are taken relative to the list file's folder. Entries are not
      checked here: a missing one becomes a failure record when it is read.
    - Any other file is an image, whatever its extension.
    Inputs keep their order; duplicates are kept. Raises `UserError` for an input that does not exist, a
    list file that is not UTF-8 text, or when no image is found at all.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    paths: list[str] = []
    for item in inputs:
        name = os.fspath(item)
        if os.path.isdir(name):
            paths.extend(walk_images(name))
        elif os.path.isfile(name):
            if os.path.splitext(name)[1].lower() in LIST_EXTENSIONS:
                paths.extend(read_list_file(name))
            else:
                paths.append(name)
        elif os.path.exists(name):
            raise UserError(f"input {name} is neither a file nor a folder")
        else:
            raise UserError(
                f"input not found: {name} (expected an image file, a folder or a .txt list of paths)"
            )
    if not paths:
        shown = ", ".join(os.fspath(i) for i in inputs) or "(no inputs)"
        raise UserError(
            f"no images found in {shown} (image extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    return paths


def walk_images(folder: str) -> list[str]:
    """Image files under `folder`, recursively, sorted by their path components; hidden names skipped."""
    found: list[tuple[tuple[str, ...], str]] = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for file in files:
            if file.startswith(".") or os.path.splitext(file)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            path = os.path.join(root, file)
            found.append((tuple(os.path.relpath(path, folder).split(os.sep)), path))
    found.sort()
    return [path for _, path in found]


def read_list_file(list_path: str) -> list[str]:
    """The paths a list file names, relative ones resolved against its folder."""
    try:
        with open(list_path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read the path list {list_path}: {e}") from None
    base = os.path.dirname(list_path)
    paths = []
    for line in lines:
        entry = line.strip()
        if entry and not entry.startswith(LIST_COMMENT):
            paths.append(entry if os.path.isabs(entry) else os.path.join(base, entry))
    return paths
