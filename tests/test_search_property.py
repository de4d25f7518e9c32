"""search.cosine_topk against the float64 brute force on random shapes, block sizes and tie-heavy data."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support.search_reference import blocks_of, check_against_reference
from vitreg_jax.evaluation.search import cosine_topk


@st.composite
def problems(draw):
    n = draw(st.integers(1, 40))
    dim = draw(st.integers(1, 6))
    q = draw(st.integers(1, 7))
    k = draw(st.integers(1, n))
    # small integers: many exact ties and zero vectors
    values = st.integers(-2, 2)
    index = np.array(draw(st.lists(values, min_size=n * dim, max_size=n * dim)), np.float32).reshape(n, dim)
    queries = np.array(draw(st.lists(values, min_size=q * dim, max_size=q * dim)), np.float32).reshape(q, dim)
    cuts = sorted(draw(st.lists(st.integers(0, n), max_size=4)))
    sizes = np.diff([0, *cuts, n]).tolist()  # how the stream is cut: any sizes, empty arrays included
    return queries, index, k, sizes, draw(st.sampled_from([8, 16])), draw(st.sampled_from([1, 4]))


@settings(max_examples=30, deadline=None)
@given(problems())
def test_equals_the_brute_force(problem):
    queries, index, k, sizes, index_block, query_block = problem
    scores, rows = cosine_topk(
        queries, blocks_of(index, sizes), k, index_block=index_block, query_block=query_block
    )
    check_against_reference(queries, index, k, scores, rows, report=False)
    assert all(len(set(r)) == k for r in rows.tolist())  # k distinct rows per query
    equal = scores[:, 1:] == scores[:, :-1]  # (Q, k - 1): bit-equal neighbours in the ranking
    assert np.all(rows[:, 1:][equal] > rows[:, :-1][equal])  # ties: the lower row first
