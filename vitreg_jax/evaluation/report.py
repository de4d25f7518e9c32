"""k-NN and linear-probe accuracy of one train/val pair of labelled embeddings, as ``vitreg-jax eval``
reports them (a JSON-ready dict and a small table)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vitreg_jax.data.labelled import check_two_classes
from vitreg_jax.evaluation.knn import knn_classify
from vitreg_jax.evaluation.probe import L2_GRID, TOP_K, linear_probe
from vitreg_jax.evaluation.settings import (
    DEFAULT_K,
    DEFAULT_TEMPERATURE,
    check_k,
    check_same_classes,
    check_temperature,
)

if TYPE_CHECKING:
    from vitreg_jax.evaluation.labelled_embeddings import LabelledEmbeddings


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
    (fractions; the linear ones None when ``linear=False``, the top-5 ones None with fewer than five classes,
    where every label would be in the top five), ``linear_l2`` (the chosen strength), ``classes`` and
    ``counts``.
    """
    check_same_classes(train.classes, val.classes)
    check_two_classes(train.classes)
    check_temperature(temperature)
    classes = sorted(train.classes)
    train, val = train.sorted(), val.sorted()
    check_k(k, len(train.labels), name="-k")
    c = len(classes)
    weighted = knn_classify(
        train.embeddings, train.labels, val.embeddings, k=k, temperature=temperature, num_classes=c
    )
    nearest = knn_classify(
        train.embeddings, train.labels, val.embeddings, k=1, temperature=None, num_classes=c
    )
    report: dict[str, Any] = {
        "knn_top1": weighted.accuracy(val.labels, 1),
        "knn_top5": weighted.accuracy(val.labels, TOP_K) if c >= TOP_K else None,
        "knn1_top1": nearest.accuracy(val.labels, 1),
        "linear_top1": None,
        "linear_top5": None,
        "linear_l2": None,
    }
    if linear:
        probe = linear_probe(
            train.embeddings,
            train.labels,
            val.embeddings,
            val.labels,
            seed=seed,
            num_classes=c,
            l2_grid=l2_grid,
        )
        report.update(
            linear_top1=probe.top1,
            linear_top5=probe.top5 if c >= TOP_K else None,
            linear_l2=probe.l2,
            linear_holdout_top1={str(key): v for key, v in probe.holdout.items()},
        )
    report["classes"] = classes
    report["counts"] = {"classes": c, "train": len(train.labels), "val": len(val.labels)}
    return report


def format_report(report: dict[str, Any]) -> str:
    """The accuracies of :func:`evaluate_embeddings` as a small table (percentages)."""
    counts = report["counts"]
    k = report.get("settings", {}).get("k", DEFAULT_K)

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:6.2f}"

    def top5(value: float | None) -> str:  # None with fewer than five classes: not measured, not "-"
        return pct(value) if counts["classes"] >= TOP_K else "n/a"

    lines = [
        f"{counts['train']} train / {counts['val']} val embeddings, {counts['classes']} classes"
        + (f", {counts['failed']} unreadable inputs skipped" if counts.get("failed") else ""),
        f"{'method':<22}{'top-1 %':>8}{'top-5 %':>9}",
        f"{f'k-NN (k={k}, weighted)':<22}{pct(report['knn_top1']):>8}{top5(report['knn_top5']):>9}",
        f"{'k-NN (k=1)':<22}{pct(report['knn1_top1']):>8}{'-':>9}",
        f"{'linear probe':<22}{pct(report['linear_top1']):>8}{top5(report['linear_top5']):>9}",
    ]
    return "\n".join(lines)
