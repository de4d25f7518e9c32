"""k-NN classification of frozen embeddings: DINO's weighted k-NN classifier.

:func:`knn_classify`: each validation embedding's ``k`` most cosine-similar training embeddings vote for
their class with weight ``exp(s / T)`` (``s`` their cosine similarity, ``T`` the temperature), computed as
``exp((s - s_max) / T)`` with ``s_max`` the query's nearest similarity: the same ranking without overflow at
a small ``T``. ``temperature=None`` gives every vote weight 1 (plain majority, which for ``k=1`` is the
nearest neighbour's class). The neighbours come from :func:`vitreg_jax.evaluation.search.cosine_topk`, which
streams the training set through the device in fixed-size blocks, so it need not fit in memory.
The linear probe is :mod:`vitreg_jax.evaluation.probe`; both on one train / val pair, as ``vitreg-jax
eval`` reports them, is :mod:`vitreg_jax.evaluation.report`.

Ties, defined so that results never depend on block sizes or sort stability: among training rows of equal
similarity the lower row (in the order given) is the nearer neighbour (``cosine_topk``'s rule); among classes
of equal score the lower class id ranks first. :func:`vitreg_jax.evaluation.report.evaluate_embeddings` sorts
both sets by (class, key)
first, so the rows' order is that of the class names and keys, whatever order they were read in.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from vitreg_jax.errors import UserError
from vitreg_jax.evaluation.probe import TOP_K, ranking, topk_accuracy
from vitreg_jax.evaluation.search import cosine_topk
from vitreg_jax.evaluation.settings import (
    DEFAULT_INDEX_BLOCK,
    DEFAULT_K,
    DEFAULT_TEMPERATURE,
    check_temperature,
)


@dataclass(frozen=True)
class KNNResult:
    """``scores`` (Q, C) summed vote weights per class (relative to the nearest neighbour's vote);
    ``predictions`` (Q, min(5, C)) class ids, best first; ``neighbours`` (Q, k) training rows, nearest first,
    and ``similarities`` (Q, k) their cosines."""

    scores: np.ndarray
    predictions: np.ndarray
    neighbours: np.ndarray
    similarities: np.ndarray

    def accuracy(self, labels: np.ndarray, top: int = 1) -> float:
        """Share of rows whose label is among the first ``top`` predictions."""
        return topk_accuracy(self.predictions, labels, top)


def knn_classify(
    train_emb: np.ndarray | Iterable[np.ndarray],
    train_labels: np.ndarray,
    val_emb: np.ndarray,
    *,
    k: int = DEFAULT_K,
    temperature: float | None = DEFAULT_TEMPERATURE,
    num_classes: int,
    block_rows: int = DEFAULT_INDEX_BLOCK,
) -> KNNResult:
    """Weighted k-NN class scores of ``val_emb`` (Q, D) against the labelled training embeddings.

    ``train_emb`` is an (N, D) array or an iterable of (n_i, D) blocks (rows numbered in order; e.g.
    ``EmbeddingSet.blocks``), ``train_labels`` (N,) class ids in ``[0, num_classes)``. Vote weights are
    ``exp(similarity / temperature)``, or 1 when ``temperature`` is None. ``k`` larger than the training set
    is a :class:`UserError`.
    """
    train_labels = np.asarray(train_labels, np.int64)
    check_temperature(temperature)
    if num_classes < 1 or (
        len(train_labels) and not 0 <= train_labels.min() <= train_labels.max() < num_classes
    ):
        raise UserError(f"training labels must be class ids in [0, {num_classes})")
    if isinstance(train_emb, np.ndarray) or hasattr(train_emb, "shape"):
        train = np.asarray(train_emb)
        if train.ndim != 2 or len(train) != len(train_labels):
            raise UserError(
                f"expected (N, D) training embeddings with N = {len(train_labels)} labels, "
                f"got shape {train.shape}"
            )
        blocks: Iterable[np.ndarray] = (train[i : i + block_rows] for i in range(0, len(train), block_rows))
    else:
        blocks = train_emb
    sims, rows = cosine_topk(val_emb, blocks, k, index_block=block_rows)  # (Q, k), (Q, k)
    if rows.size and rows.max() >= len(train_labels):
        raise UserError(f"more training embeddings than the {len(train_labels)} labels given")
    # exp(s / T) scaled by exp(-s_max / T) per query (s_max: its nearest neighbour's similarity): the same
    # ranking of classes, and no overflow at a small T (exp(1 / 0.001) is inf in float64)
    weights = (
        np.ones_like(sims, np.float64)
        if temperature is None
        else np.exp((sims.astype(np.float64) - sims[:, :1]) / temperature)
    )
    scores = np.zeros((len(sims), num_classes), np.float64)  # (Q, C)
    np.add.at(scores, (np.arange(len(sims))[:, None], train_labels[rows]), weights)
    return KNNResult(scores=scores, predictions=ranking(scores, TOP_K), neighbours=rows, similarities=sims)
