"""A float64 numpy brute force for the exact cosine top-k, and the check of a search result against it."""

from __future__ import annotations

import numpy as np

from tests.support.report import record
from tests.support.tolerances import SEARCH_SCORE_ATOL


def unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit norm in float64; zero rows stay zero."""
    x = np.asarray(x, np.float64)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(n > 0, n, 1.0)


def all_scores(queries: np.ndarray, index: np.ndarray) -> np.ndarray:
    return unit(queries) @ unit(index).T  # (Q, N) float64


def reference(queries: np.ndarray, index: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """float64 brute force: the k best scores per query, ordered by (-score, row)."""
    scores = all_scores(queries, index)
    order = np.stack([np.lexsort((np.arange(len(s)), -s)) for s in scores])[:, :k]  # (Q, k)
    return np.take_along_axis(scores, order, axis=1), order


def check_against_reference(queries, index, k, scores, rows, *, report: bool = True) -> None:
    ref_scores, ref_rows = reference(queries, index, k)
    assert scores.dtype == np.float32 and rows.dtype == np.int64
    assert scores.shape == rows.shape == (len(queries), k)
    np.testing.assert_allclose(scores, ref_scores, rtol=0, atol=SEARCH_SCORE_ATOL)
    # rows must match exactly wherever no other index row scores within rounding of the reference score
    full = all_scores(queries, index)  # (Q, N)
    for qi in range(len(queries)):
        for r in range(k):
            others = np.delete(full[qi], ref_rows[qi, r])
            if others.size == 0 or np.min(np.abs(others - ref_scores[qi, r])) > 4 * SEARCH_SCORE_ATOL:
                assert rows[qi, r] == ref_rows[qi, r], (qi, r)
    # the returned rows really have the returned scores (also where ties allowed another row)
    np.testing.assert_allclose(scores, np.take_along_axis(full, rows, axis=1), rtol=0, atol=SEARCH_SCORE_ATOL)
    if report:
        record(
            f"cosine_topk {scores.shape} D={queries.shape[1]}",
            "score vs float64",
            np.abs(scores - ref_scores).max(),
        )


def blocks_of(x: np.ndarray, sizes: list[int]):
    start = 0
    for s in sizes:
        yield x[start : start + s]
        start += s
    assert start == len(x)
