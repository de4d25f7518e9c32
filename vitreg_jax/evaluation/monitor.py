"""k-NN accuracy of an encoder that changes (one being pre-trained), on a fixed labelled train / val pair.

:class:`KNNMonitor` reads two labelled folders (the ImageFolder layout of
:mod:`vitreg_jax.evaluation.labelled_embeddings`) once,
decodes and preprocesses every image once (kept in memory: meant for evaluation sets of a few thousand
images at most), and then, for each encoder it is given, embeds both sets with one compiled
:class:`~vitreg_jax.embedding.embedder.Embedder` and returns DINO's weighted k-NN top-1 / top-5 accuracy
(:func:`vitreg_jax.evaluation.knn.knn_classify`). The Embedder is compiled on the first call; later calls only
load the new weights into it (same structure, same devices), so periodic evaluation does not recompile.

Inside ``pretrain`` it runs on the training devices (the trainer's mesh and compute policy) as a
:class:`~vitreg_jax.pretraining.loop.Periodic` measurement: see :func:`vitreg_jax.pretraining.run.train`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from vitreg_jax.data.labelled import check_two_classes, iter_labelled_batches, read_labelled_folder
from vitreg_jax.errors import UserError
from vitreg_jax.evaluation.knn import knn_classify
from vitreg_jax.evaluation.labelled_embeddings import LabelledEmbeddings
from vitreg_jax.evaluation.probe import TOP_K
from vitreg_jax.evaluation.settings import (
    DEFAULT_K,
    DEFAULT_TEMPERATURE,
    check_k,
    check_same_classes,
    check_temperature,
)

if TYPE_CHECKING:
    from jax.sharding import Mesh

    from vitreg_jax.embedding.embedder import Embedder
    from vitreg_jax.model.precision import ComputePolicy
    from vitreg_jax.model.vit import ViT

DEFAULT_BATCH_SIZE = 64


class _Pixels:
    """One labelled folder decoded once: images (N, H, W, 3) float32 in (class, path) order, labels,
    failures."""

    def __init__(self, root: str, what: str, transform: Any, workers: int | None):
        folder = read_labelled_folder(root, what).sorted()
        images: list[np.ndarray] = []
        self.names: list[str] = []
        self.keys: list[str] = []
        self.failures: list[tuple[str, str]] = []
        for batch in iter_labelled_batches(folder, transform, DEFAULT_BATCH_SIZE, workers):
            images.append(batch.images)
            self.names += batch.names
            self.keys += batch.paths
            self.failures += batch.failures
        if not self.keys:
            raise UserError(f"{what} folder {root}: no image could be read")
        self.images = np.concatenate(images)  # (N, H, W, 3)

    def labelled(self, embeddings: np.ndarray) -> LabelledEmbeddings:
        return LabelledEmbeddings(embeddings, self.names, self.keys, self.failures)


class KNNMonitor:
    """Weighted k-NN accuracy of successive encoders on the images of ``train_dir`` and ``val_dir``.

    >>> monitor = KNNMonitor("digits/train", "digits/val", size=(32, 32), rgb_stats=cfg["rgb_stats"], k=20)
    >>> monitor(encoder)   # {"top1": 0.83, "top5": 0.99}

    ``size`` and ``rgb_stats`` preprocess the images as the encoder expects them; ``mesh`` and ``policy``
    (default: every device, float32) are the Embedder's. Unreadable images are left out and listed in
    ``failures``; a class folder without images, one class only, or train and val classes that differ are
    :class:`UserError`s, raised here, before any training starts.
    """

    def __init__(
        self,
        train_dir: str | os.PathLike[str],
        val_dir: str | os.PathLike[str],
        *,
        size: tuple[int, int],
        rgb_stats: Mapping[str, Any],
        k: int = DEFAULT_K,
        temperature: float = DEFAULT_TEMPERATURE,
        batch_size: int = DEFAULT_BATCH_SIZE,
        mesh: Mesh | None = None,
        policy: ComputePolicy | None = None,
        workers: int | None = None,
    ):
        from vitreg_jax.data.preprocess import classification_transform

        transform = classification_transform(tuple(size), rgb_stats)
        self.train = _Pixels(os.fspath(train_dir), "eval train", transform, workers)
        self.val = _Pixels(os.fspath(val_dir), "eval val", transform, workers)
        check_same_classes(self.train.names, self.val.names)
        check_two_classes(self.train.names, f"eval train folder {train_dir}: ")
        check_k(k, len(self.train.keys), what="eval training images")
        check_temperature(temperature)
        self.k, self.temperature, self.batch_size = k, temperature, batch_size
        self.mesh, self.policy = mesh, policy
        self.failures = self.train.failures + self.val.failures
        self.classes = sorted(set(self.train.names))
        self._embedder: Embedder | None = None

    def embed(self, encoder: ViT) -> tuple[LabelledEmbeddings, LabelledEmbeddings]:
        """Both sets embedded by ``encoder``."""
        if self._embedder is None:
            from vitreg_jax.embedding.embedder import Embedder

            self._embedder = Embedder(encoder, batch_size=self.batch_size, mesh=self.mesh, policy=self.policy)
        else:
            self._embedder.load_weights(encoder)
        return (
            self.train.labelled(self._embedder(self.train.images, full_batches=True)),
            self.val.labelled(self._embedder(self.val.images, full_batches=True)),
        )

    def __call__(self, encoder: ViT) -> dict[str, float | None]:
        train, val = self.embed(encoder)
        result = knn_classify(
            train.embeddings,
            train.labels,
            val.embeddings,
            k=self.k,
            temperature=self.temperature,
            num_classes=len(self.classes),
        )
        top5 = result.accuracy(val.labels, TOP_K) if len(self.classes) >= TOP_K else None  # null: < 5 classes
        return {"top1": result.accuracy(val.labels, 1), "top5": top5}
