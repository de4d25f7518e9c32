"""Labelled sets for evaluation: image folders in the ImageFolder layout, or ``embed`` outputs of them.

An image folder holds one sub-folder per class, named after the class; every image under a class folder
(recursively, hidden names skipped, the extensions of :data:`vitreg_jax.data.inputs.IMAGE_EXTENSIONS`) belongs
to that class. For an ``embed`` output, each row's class is the name of the folder its path (or tar key) sits
in, so embedding such a folder with ``vitreg-jax embed`` keeps the labels.

Mistakes are one-line :class:`UserError`s: a missing folder, a class folder without images, images lying
directly in the top folder, fewer than two classes. An image that cannot be decoded is not an error: it
becomes a failure record (path, reason), counted and listed in the report, and is left out.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from vitreg_jax.data.labelled import LabelledFolder, check_two_classes, iter_labelled_batches
from vitreg_jax.errors import UserError

if TYPE_CHECKING:
    from vitreg_jax.data.loader import Transform
    from vitreg_jax.embedding.embedder import Embedder
    from vitreg_jax.model.vit import ViT


@dataclass(frozen=True)
class LabelledEmbeddings:
    """Embeddings (N, D) float32 with each row's class name and key (path), plus the inputs that failed
    (``(path, reason)`` pairs, not among the rows). ``classes`` are the sorted class names and ``labels``
    each row's index in them."""

    embeddings: np.ndarray
    names: list[str]
    keys: list[str]
    failures: list[tuple[str, str]] = field(default_factory=list)

    @property
    def classes(self) -> list[str]:
        return sorted(set(self.names))

    @property
    def labels(self) -> np.ndarray:
        index = {name: i for i, name in enumerate(self.classes)}
        return np.asarray([index[n] for n in self.names], np.int64)

    def sorted(self) -> LabelledEmbeddings:
        """The rows ordered by (class name, key): the canonical order evaluation uses."""
        order = sorted(range(len(self.keys)), key=lambda i: (self.names[i], self.keys[i]))
        return LabelledEmbeddings(
            self.embeddings[np.asarray(order, np.int64)] if order else self.embeddings,
            [self.names[i] for i in order],
            [self.keys[i] for i in order],
            self.failures,
        )


def embed_labelled(
    folder: LabelledFolder,
    embedder: Embedder,
    transform: Transform,
    *,
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> LabelledEmbeddings:
    """Embed every image of ``folder``; unreadable ones become failure records. ``progress`` gets the
    number of inputs done after each batch."""
    rows: list[np.ndarray] = []
    names: list[str] = []
    keys: list[str] = []
    failures: list[tuple[str, str]] = []
    for batch in iter_labelled_batches(folder, transform, embedder.batch_size, workers):
        failures.extend(batch.failures)
        if batch.paths:
            rows.append(embedder(batch.images, full_batches=True))  # (b, D)
            names.extend(batch.names)
            keys.extend(batch.paths)
        if progress is not None:
            progress(batch.end)
    dim = embedder.cfg.hidden_dim
    emb = np.concatenate(rows) if rows else np.zeros((0, dim), np.float32)
    return LabelledEmbeddings(emb, names, keys, failures)


def class_of_key(key: str) -> str:
    """The class of an ``embed`` output row: the name of the folder its path or tar key sits in."""
    return posixpath.basename(posixpath.dirname(key.replace(os.sep, "/")))


def load_labelled_embeddings(
    directory: str | os.PathLike[str], what: str = "embeddings"
) -> LabelledEmbeddings:
    """An ``embed`` output folder (either format) with each row's class taken from its path's folder."""
    from vitreg_jax.embedding.reader import open_embeddings

    directory = os.fspath(directory)
    emb_set = open_embeddings(directory)
    if len(emb_set.shape) != 1:
        raise UserError(
            f"{what} {directory}: holds per-token features {emb_set.shape}; evaluation needs one "
            "vector per image (embed with --features cls)"
        )
    keys, emb = emb_set.load()
    emb = np.asarray(emb, np.float32)
    names = [class_of_key(k) for k in keys]
    if any(not n for n in names):
        bad = keys[names.index("")]
        raise UserError(
            f"{what} {directory}: cannot tell the class of {bad!r} (expected paths like "
            "CLASS/IMAGE, as embedding a folder with one sub-folder per class gives)"
        )
    failures = [(str(p), str(r)) for p, r in emb_set.failures]
    check_two_classes(names, f"{what} {directory}: ")
    return LabelledEmbeddings(emb, names, list(keys), failures)


def embed_folders(
    net: ViT,
    rgb_stats: Mapping[str, Any],
    folders: Sequence[LabelledFolder],
    *,
    size: tuple[int, int] | None = None,
    dtype: str = "float32",
    batch_size: int = 64,
    workers: int | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> list[LabelledEmbeddings]:
    """Embed several labelled folders with one compiled :class:`~vitreg_jax.embedding.embedder.Embedder` of
    ``net`` (default size: the model's). ``progress(root, done, total)`` follows each folder."""
    from vitreg_jax.data.preprocess import classification_transform
    from vitreg_jax.embedding.embedder import Embedder

    size = tuple(size or net.cfg.image_size)
    p = net.cfg.patch_size
    if size[0] % p or size[1] % p:
        raise UserError(f"size {size[0]}x{size[1]} is not a multiple of the model's patch size {p}")
    transform = classification_transform(size, rgb_stats)
    embedder = Embedder(net, dtype=dtype, batch_size=batch_size)
    out = []
    for folder in folders:
        report = None if progress is None else (lambda done, f=folder: progress(f.root, done, len(f.paths)))
        out.append(embed_labelled(folder, embedder, transform, workers=workers, progress=report))
    return out
