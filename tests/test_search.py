"""search.cosine_topk: exact blockwise cosine top-k against a float64 numpy brute force."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from tests.support.search_reference import blocks_of, check_against_reference
from tests.support.tolerances import SEARCH_SCORE_ATOL
from vitreg_jax.errors import UserError
from vitreg_jax.evaluation.search import cosine_topk


@pytest.mark.parametrize("dim", [8, 768])
def test_matches_brute_force(dim):
    rng = np.random.default_rng(dim)
    index = rng.standard_normal((300, dim)).astype(np.float32)
    queries = rng.standard_normal((37, dim)).astype(np.float32)
    scores, rows = cosine_topk(queries, [index], 10, index_block=64, query_block=16)
    check_against_reference(queries, index, 10, scores, rows)


def test_index_equal_to_queries_gives_each_query_itself_first_with_score_one():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((200, 768)).astype(np.float32) * rng.uniform(0.1, 50, (200, 1)).astype(np.float32)
    scores, rows = cosine_topk(x, [x[:70], x[70:]], 5, index_block=32, query_block=64)
    np.testing.assert_array_equal(rows[:, 0], np.arange(200))
    np.testing.assert_allclose(scores[:, 0], 1.0, rtol=0, atol=SEARCH_SCORE_ATOL)
    assert np.all(scores[:, 1] < scores[:, 0])


def test_block_layout_does_not_change_the_result():
    rng = np.random.default_rng(2)
    index = rng.standard_normal((257, 16)).astype(np.float32)
    queries = rng.standard_normal((19, 16)).astype(np.float32)
    one = cosine_topk(queries, [index], 7, index_block=4096)
    many = cosine_topk(queries, blocks_of(index, [0, 1, 100, 3, 0, 153]), 7, index_block=16, query_block=4)
    jax_blocks = cosine_topk(jnp.asarray(queries), [jnp.asarray(index[:128]), index[128:]], 7, index_block=50)
    for other in (many, jax_blocks):
        np.testing.assert_array_equal(other[1], one[1])
        np.testing.assert_allclose(other[0], one[0], rtol=0, atol=SEARCH_SCORE_ATOL)


def test_ties_lower_row_first_across_blocks():
    rng = np.random.default_rng(3)
    base = rng.standard_normal((5, 12)).astype(np.float32)
    # rows i, i+5, i+10, i+15 point the same way
    index = np.concatenate([base, base * 2.0, base * 0.5, base])
    queries = base[[0, 3]]
    for block in (3, 7, 64):
        scores, rows = cosine_topk(queries, [index], 4, index_block=block)
        np.testing.assert_array_equal(rows, [[0, 5, 10, 15], [3, 8, 13, 18]])
        np.testing.assert_allclose(scores, 1.0, rtol=0, atol=SEARCH_SCORE_ATOL)


def test_zero_vectors_score_zero():
    index = np.array([[1.0, 0.0], [0.0, 0.0], [-1.0, 0.0], [0.0, 2.0]], np.float32)
    scores, rows = cosine_topk(np.array([[3.0, 0.0], [0.0, 0.0]], np.float32), [index], 4)
    np.testing.assert_array_equal(rows, [[0, 1, 3, 2], [0, 1, 2, 3]])  # zero query: all 0, by row number
    np.testing.assert_allclose(scores, [[1, 0, 0, -1], [0, 0, 0, 0]], rtol=0, atol=SEARCH_SCORE_ATOL)


def test_k_equal_to_index_size_and_dtypes():
    rng = np.random.default_rng(4)
    index = rng.standard_normal((9, 6))
    queries = rng.standard_normal((3, 6)).astype(np.float16)
    scores, rows = cosine_topk(queries, [index], 9)
    check_against_reference(queries.astype(np.float32), index.astype(np.float32), 9, scores, rows)
    assert sorted(rows[0].tolist()) == list(range(9))


def test_no_queries():
    scores, rows = cosine_topk(np.zeros((0, 4), np.float32), [np.ones((3, 4))], 2)
    assert scores.shape == rows.shape == (0, 2)


@pytest.mark.parametrize(
    "queries, blocks, k, match",
    [
        (np.ones((2, 4)), [np.ones((3, 4))], 4, r"k=4 is larger than the index \(3 rows\)"),
        (np.ones((2, 4)), [], 1, "the index is empty"),
        (np.ones((2, 4)), [np.ones((0, 4))], 1, "the index is empty"),
        (np.ones((2, 4)), [np.ones((3, 5))], 1, "index block 0 has dimension 5, the queries have 4"),
        (np.ones((2, 4)), [np.ones((3, 4))], 0, "k must be a positive integer"),
        (np.ones((2, 4)), [np.ones((3, 4))], True, "k must be a positive integer"),
        (np.ones(4), [np.ones((3, 4))], 1, "queries must be a 2-D"),
        (np.ones((2, 4)), [np.full((3, 4), np.nan)], 1, "index block 0 holds NaN"),
    ],
)
def test_user_errors(queries, blocks, k, match):
    with pytest.raises(UserError, match=match):
        cosine_topk(queries, blocks, k)


def test_one_compilation_per_shape():
    from vitreg_jax.evaluation import search

    rng = np.random.default_rng(5)
    queries = rng.standard_normal((8, 4)).astype(np.float32)
    search._step.clear_cache()
    cosine_topk(queries, blocks_of(rng.standard_normal((103, 4)), [10, 31, 62]), 3, index_block=16)
    assert search._step._cache_size() == 1


def test_a_zero_score_ties_with_minus_zero_lower_row_first() -> None:
    """A zero query scores -0.0 against a negative row and +0.0 against a zero row: equal, so row 0 first."""
    scores, rows = cosine_topk(np.zeros((1, 1), np.float32), [np.array([[-1.0], [0.0]], np.float32)], 2)
    assert rows.tolist() == [[0, 1]] and scores.tolist() == [[0.0, 0.0]]
