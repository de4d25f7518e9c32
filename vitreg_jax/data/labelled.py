"""Labelled image folders (``ROOT/CLASS/.../image.jpg``): the images, their class names, and their decoded
batches, read without JAX.

Embedding them is :mod:`vitreg_jax.evaluation.labelled_embeddings`'s job.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from vitreg_jax.data.inputs import IMAGE_EXTENSIONS, list_inputs
from vitreg_jax.data.loader import Transform, iter_batches
from vitreg_jax.errors import UserError


@dataclass(frozen=True)
class LabelledFolder:
    """The images of an ImageFolder-layout folder: ``paths[i]`` belongs to class ``names[i]``."""

    root: str
    paths: list[str]
    names: list[str]

    def sorted(self) -> LabelledFolder:
        """The images ordered by (class name, path)."""
        order = sorted(range(len(self.paths)), key=lambda i: (self.names[i], self.paths[i]))
        return LabelledFolder(self.root, [self.paths[i] for i in order], [self.names[i] for i in order])


@dataclass(frozen=True)
class LabelledBatch:
    """Decoded images of a labelled folder, in its order, with the inputs that failed since the last batch;
    ``end`` counts the folder's inputs covered so far (for progress)."""

    images: np.ndarray  # (b, H, W, C) float32
    names: list[str]
    paths: list[str]
    failures: list[tuple[str, str]]  # (path, reason)
    end: int


def check_two_classes(classes: Iterable[str], where: str = "") -> None:
    """At least two classes: accuracy over one class means nothing. ``where`` prefixes the message."""
    found = sorted(set(classes))
    if len(found) < 2:
        raise UserError(f"{where}only one class ({found[0] if found else 'none'}); at least two are needed")


def iter_labelled_batches(
    folder: LabelledFolder, transform: Transform, batch_size: int, workers: int | None = None
) -> Iterator[LabelledBatch]:
    """The folder's images decoded by ``transform`` in batches (threaded, in order, see ``iter_batches``);
    an image that cannot be decoded becomes a failure record and is left out."""
    for batch in iter_batches(folder.paths, transform, batch_size, workers):
        kept = [int(i) for i in batch.indices]
        yield LabelledBatch(
            batch.images,
            [folder.names[i] for i in kept],
            [folder.paths[i] for i in kept],
            [(f.path, f.reason) for f in batch.failed],
            batch.end,
        )


def read_labelled_folder(root: str | os.PathLike[str], what: str = "folder") -> LabelledFolder:
    """The images of ``root`` (one sub-folder per class) with their class names; ``what`` names the folder
    in error messages (e.g. "train")."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise UserError(
            f"{what} folder {root}: not found or not a folder (expected one sub-folder per class)"
        )
    entries = sorted(e for e in os.listdir(root) if not e.startswith("."))
    loose = [
        e
        for e in entries
        if os.path.isfile(os.path.join(root, e)) and os.path.splitext(e)[1].lower() in IMAGE_EXTENSIONS
    ]
    if loose:
        raise UserError(
            f"{what} folder {root}: images directly in it (e.g. {loose[0]}); expected one "
            "sub-folder per class"
        )
    classes = [e for e in entries if os.path.isdir(os.path.join(root, e))]
    if not classes:
        raise UserError(f"{what} folder {root}: no class sub-folders (expected one sub-folder per class)")
    paths: list[str] = []
    names: list[str] = []
    for name in classes:
        try:
            found = list_inputs([os.path.join(root, name)])
        except UserError:
            raise UserError(f"{what} folder {root}: class folder {name!r} holds no images") from None
        paths.extend(found)
        names.extend([name] * len(found))
    check_two_classes(classes, f"{what} folder {root}: ")
    return LabelledFolder(root, paths, names)
