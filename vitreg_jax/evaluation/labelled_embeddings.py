"""Labelled sets for evaluation: image folders in the ImageFolder layout, or ``embed`` outputs of them.

An image folder holds one sub-folder per class, named after the class; every image under a class folder
(recursively, hidden names skipped, the extensions of :data:`vitreg_jax.data.loader.IMAGE_EXTENSIONS`) belongs to
that class. For an ``embed`` output, each row's class is the name of the folder its path (or tar key)
sits in, so embedding such a folder with ``vitreg-jax embed`` keeps the labels.

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

from vitreg_jax.data.loader import IMAGE_EXTENSIONS, iter_batches, list_inputs
from vitreg_jax.errors import UserError

if TYPE_CHECKING:
    from vitreg_jax.data.loader import Transform
    from vitreg_jax.embedding.embedder import Embedder
    from vitreg_jax.model.vit import ViT


@dataclass(frozen=True)
class LabelledFolder:
    """The images of an ImageFolder-layout folder: ``paths[i]`` belongs to class ``names[i]``."""

    root: str
    paths: list[str]
    names: list[str]


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


def read_labelled_folder(root: str | os.PathLike[str], what: str = "folder") -> LabelledFolder:
    """The images of ``root`` (one sub-folder per class) with their class names; ``what`` names the folder
    in error messages (e.g. "train")."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise UserError(f"{what} folder {root}: not found or not a folder (expected one sub-folder per class)")
    entries = sorted(e for e in os.listdir(root) if not e.startswith("."))
    loose = [e for e in entries if os.path.isfile(os.path.join(root, e))
             and os.path.splitext(e)[1].lower() in IMAGE_EXTENSIONS]
    if loose:
        raise UserError(f"{what} folder {root}: images directly in it (e.g. {loose[0]}); expected one "
                        "sub-folder per class")
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
    if len(classes) < 2:
        raise UserError(f"{what} folder {root}: only one class ({classes[0]}); at least two are needed")
    return LabelledFolder(root, paths, names)


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
    kept: list[int] = []
    failures: list[tuple[str, str]] = []
    batches = iter_batches(folder.paths, transform, embedder.batch_size, workers)
    for batch in batches:
        failures.extend((f.path, f.reason) for f in batch.failed)
        if len(batch.indices):
            rows.append(embed_full_batches(embedder, batch.images))  # (b, D)
            kept.extend(int(i) for i in batch.indices)
        if progress is not None:
            progress(batch.end)
    dim = embedder.cfg.hidden_dim
    emb = np.concatenate(rows) if rows else np.zeros((0, dim), np.float32)
    return LabelledEmbeddings(emb, [folder.names[i] for i in kept], [folder.paths[i] for i in kept], failures)


def embed_full_batches(embedder: Embedder, images: np.ndarray) -> np.ndarray:
    """``embedder(images)``, the last chunk zero-padded to a full batch so that a short last batch does not
    compile another bucket (each image is embedded on its own: padding changes no real row)."""
    n, batch = len(images), embedder.batch_size
    short = -n % batch
    if short == 0:
        return embedder(images)
    padded = np.concatenate([images, np.zeros((short, *images.shape[1:]), images.dtype)])  # (n + short, H, W, C)
    return embedder(padded)[:n]


def class_of_key(key: str) -> str:
    """The class of an ``embed`` output row: the name of the folder its path or tar key sits in."""
    return posixpath.basename(posixpath.dirname(key.replace(os.sep, "/")))


def load_labelled_embeddings(directory: str | os.PathLike[str], what: str = "embeddings") -> LabelledEmbeddings:
    """An ``embed`` output folder (either format) with each row's class taken from its path's folder."""
    from vitreg_jax.embedding.reader import open_embeddings

    directory = os.fspath(directory)
    emb_set = open_embeddings(directory)
    if len(emb_set.shape) != 1:
        raise UserError(f"{what} {directory}: holds per-token features {emb_set.shape}; evaluation needs one "
                        "vector per image (embed with --features cls)")
    keys, emb = emb_set.load()
    emb = np.asarray(emb, np.float32)
    names = [class_of_key(k) for k in keys]
    if any(not n for n in names):
        bad = keys[names.index("")]
        raise UserError(f"{what} {directory}: cannot tell the class of {bad!r} (expected paths like "
                        "CLASS/IMAGE, as embedding a folder with one sub-folder per class gives)")
    failures = [(str(p), str(r)) for p, r in emb_set.failures]
    found = sorted(set(names))
    if len(found) < 2:
        raise UserError(f"{what} {directory}: only one class ({found[0] if found else 'none'}); at least "
                        "two are needed")
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
    """Embed several labelled folders with one compiled :class:`~vitreg_jax.embedding.embedder.Embedder` of ``net``
    (default size: the model's). ``progress(root, done, total)`` follows each folder."""
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
