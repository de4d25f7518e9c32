"""How good is an encoder: k-NN and linear-probe accuracy of its frozen embeddings on a labelled set.

- :func:`knn_classify`: DINO's weighted k-NN classifier. Each validation embedding's ``k`` most
  cosine-similar training embeddings vote for their class with weight ``exp(s / T)`` (``s`` their cosine
  similarity, ``T`` the temperature); ``temperature=None`` gives every vote weight 1 (plain majority, which for
  ``k=1`` is the nearest neighbour's class). The neighbours come from :func:`vitreg_jax.evaluation.search.cosine_topk`,
  which streams the training set through the device in fixed-size blocks, so it need not fit in memory.
- :func:`vitreg_jax.evaluation.linear_probe.linear_probe`: logistic regression on the standardised embeddings.
- :func:`evaluate_embeddings`: both on a labelled train / val pair, as the JSON-ready report of
  ``vitreg-jax eval``.

Ties, defined so that results never depend on block sizes or sort stability: among training rows of equal
similarity the lower row (in the order given) is the nearer neighbour (``cosine_topk``'s rule); among classes
of equal score the lower class id ranks first. :func:`evaluate_embeddings` sorts both sets by (class, key)
first, so the rows' order is that of the class names and keys, whatever order they were read in.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from vitreg_jax.errors import UserError
from vitreg_jax.evaluation.linear_probe import L2_GRID, TOP_K, linear_probe, ranking, topk_accuracy
from vitreg_jax.evaluation.search import cosine_topk

if TYPE_CHECKING:
    from vitreg_jax.evaluation.labelled_embeddings import LabelledEmbeddings

# DINO's k-NN settings
DEFAULT_K = 20
DEFAULT_TEMPERATURE = 0.07
# training rows per device step of the neighbour search
KNN_BLOCK_ROWS = 16384


@dataclass(frozen=True)
class KNNResult:
    """``scores`` (Q, C) summed vote weights per class; ``predictions`` (Q, min(5, C)) class ids, best
    first; ``neighbours`` (Q, k) training rows, nearest first, and ``similarities`` (Q, k) their cosines."""

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
    block_rows: int = KNN_BLOCK_ROWS,
) -> KNNResult:
    """Weighted k-NN class scores of ``val_emb`` (Q, D) against the labelled training embeddings.

    ``train_emb`` is an (N, D) array or an iterable of (n_i, D) blocks (rows numbered in order; e.g.
    ``EmbeddingSet.blocks``), ``train_labels`` (N,) class ids in ``[0, num_classes)``. Vote weights are
    ``exp(similarity / temperature)``, or 1 when ``temperature`` is None. ``k`` larger than the training set
    is a :class:`UserError`.
    """
    train_labels = np.asarray(train_labels, np.int64)
    if temperature is not None and not temperature > 0:
        raise UserError(f"temperature must be positive, got {temperature!r}")
    if num_classes < 1 or (len(train_labels) and not 0 <= train_labels.min() <= train_labels.max() < num_classes):
        raise UserError(f"training labels must be class ids in [0, {num_classes})")
    if isinstance(train_emb, np.ndarray) or hasattr(train_emb, "shape"):
        train = np.asarray(train_emb)
        if train.ndim != 2 or len(train) != len(train_labels):
            raise UserError(f"expected (N, D) training embeddings with N = {len(train_labels)} labels, "
                            f"got shape {train.shape}")
        blocks: Iterable[np.ndarray] = (train[i : i + block_rows] for i in range(0, len(train), block_rows))
    else:
        blocks = train_emb
    sims, rows = cosine_topk(val_emb, blocks, k, index_block=block_rows)  # (Q, k), (Q, k)
    if rows.size and rows.max() >= len(train_labels):
        raise UserError(f"more training embeddings than the {len(train_labels)} labels given")
    weights = np.ones_like(sims, np.float64) if temperature is None else np.exp(sims.astype(np.float64) / temperature)
    scores = np.zeros((len(sims), num_classes), np.float64)  # (Q, C)
    np.add.at(scores, (np.arange(len(sims))[:, None], train_labels[rows]), weights)
    return KNNResult(scores=scores, predictions=ranking(scores, TOP_K), neighbours=rows, similarities=sims)


def check_same_classes(train: LabelledEmbeddings, val: LabelledEmbeddings) -> None:
    """A :class:`UserError` naming the classes found on one side only."""
    only_train = sorted(set(train.classes) - set(val.classes))
    only_val = sorted(set(val.classes) - set(train.classes))
    if only_train or only_val:
        parts = [f"only in train: {_names(only_train)}" if only_train else "",
                 f"only in val: {_names(only_val)}" if only_val else ""]
        raise UserError("train and val have different classes (" + "; ".join(p for p in parts if p) + ")")


def _names(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def evaluate_embeddings(
    train: LabelledEmbeddings,
    val: LabelledEmbeddings,
    *,
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
    seed: int = 0,
    linear: bool = True,
    l2_grid: tuple[float, ...] = L2_GRID,
) -> dict[str, Any]:
    """k-NN (weighted ``k``, and ``k = 1``) and linear-probe accuracy of ``val`` against ``train``.

    Returns a JSON-ready dict: ``knn_top1``, ``knn_top5``, ``knn1_top1``, ``linear_top1``, ``linear_top5``
    (fractions; the linear ones None when ``linear=False``), ``linear_l2`` (the chosen strength),
    ``classes`` and ``counts``.
    """
    check_same_classes(train, val)
    classes = sorted(train.classes)
    if len(classes) < 2:
        raise UserError(f"only one class ({classes[0] if classes else 'none'}): at least two are needed")
    train, val = train.sorted(), val.sorted()
    if k > len(train.labels):
        raise UserError(f"-k {k} is more than the {len(train.labels)} training embeddings")
    c = len(classes)
    weighted = knn_classify(train.embeddings, train.labels, val.embeddings, k=k, temperature=temperature,
                            num_classes=c)
    nearest = knn_classify(train.embeddings, train.labels, val.embeddings, k=1, temperature=None,
                           num_classes=c)
    report: dict[str, Any] = {
        "knn_top1": weighted.accuracy(val.labels, 1),
        "knn_top5": weighted.accuracy(val.labels, TOP_K),
        "knn1_top1": nearest.accuracy(val.labels, 1),
        "linear_top1": None,
        "linear_top5": None,
        "linear_l2": None,
    }
    if linear:
        probe = linear_probe(train.embeddings, train.labels, val.embeddings, val.labels, seed=seed,
                             num_classes=c, l2_grid=l2_grid)
        report.update(linear_top1=probe.top1, linear_top5=probe.top5, linear_l2=probe.l2,
                      linear_holdout_top1={str(key): v for key, v in probe.holdout.items()})
    report["classes"] = classes
    report["counts"] = {"classes": c, "train": len(train.labels), "val": len(val.labels)}
    return report


def format_report(report: dict[str, Any]) -> str:
    """The accuracies of :func:`evaluate_embeddings` as a small table (percentages)."""
    counts = report["counts"]
    k = report.get("settings", {}).get("k", DEFAULT_K)

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:6.2f}"

    lines = [
        f"{counts['train']} train / {counts['val']} val embeddings, {counts['classes']} classes"
        + (f", {counts['failed']} unreadable inputs skipped" if counts.get("failed") else ""),
        f"{'method':<22}{'top-1 %':>8}{'top-5 %':>9}",
        f"{f'k-NN (k={k}, weighted)':<22}{pct(report['knn_top1']):>8}{pct(report['knn_top5']):>9}",
        f"{'k-NN (k=1)':<22}{pct(report['knn1_top1']):>8}{'-':>9}",
        f"{'linear probe':<22}{pct(report['linear_top1']):>8}{pct(report['linear_top5']):>9}",
    ]
    return "\n".join(lines)
