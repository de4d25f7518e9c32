"""Exact cosine nearest neighbours, computed blockwise on the default JAX device (CPU, GPU or TPU).

``cosine_topk(queries, index_blocks, k)`` returns, for each query, the ``k`` index rows of highest cosine
similarity: ``scores`` (Q, k) float32, best first, and ``rows`` (Q, k) int64, the global row numbers of the
index (rows numbered in iteration order over ``index_blocks``, from 0).

How: the index is consumed once, as a stream. Its rows are regrouped on the host into blocks of a fixed
number of rows (the last one padded with zero rows), each block goes to the device, and one jitted step
scores every query against it (one fp32 matmul at "highest" precision) and merges the result into the
running top-k: ``lax.top_k`` over ``[current top-k, block scores]``. Padded rows score ``-inf`` and are never
chosen. The step is compiled once per (query block, index block, k) shape, so a long stream never
recompiles. The index need not fit in host or device memory; the queries and the running (Q, k) results do.

Definitions:
- Both sides are L2-normalised in float32 (inputs of any float dtype are cast to float32 first). A zero
  vector stays zero after normalisation: its cosine with anything is 0 (so a zero query ranks the index
  by row number, and a zero index row scores 0 for every query).
- Ties: among equal scores the lower row comes first (``lax.top_k`` keeps the lower position first, and
  the running top-k always sits before the newer, higher-numbered rows in the merge), so the result is
  deterministic whatever the block sizes.
- ``k`` larger than the index is a ``UserError`` (no clamping: a silent short answer would shift every
  rank-based consumer); so are an empty index, non-finite values and mismatched dimensions.
- Rows are counted in int32 on the device: an index may hold up to 2**31 - 1 rows.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from vitreg_jax.errors import UserError
from vitreg_jax.evaluation.settings import DEFAULT_INDEX_BLOCK

if TYPE_CHECKING:
    from numpy.typing import ArrayLike

# Query rows per device step: a (query_block, index_block) float32 score tile per step (64 MiB at 1024 x
# 16384).
DEFAULT_QUERY_BLOCK = 1024
MAX_ROWS = 2**31 - 1
# A stream shorter than one block gets a smaller block: its row count rounded up to a power of two, at least:
MIN_BLOCK = 8


def cosine_topk(
    queries: ArrayLike,
    index_blocks: Iterable[ArrayLike],
    k: int,
    *,
    index_block: int = DEFAULT_INDEX_BLOCK,
    query_block: int = DEFAULT_QUERY_BLOCK,
    progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most cosine-similar index rows of each query: (scores (Q, k) float32, rows (Q, k) int64).

    ``queries`` is (Q, D); ``index_blocks`` yields (n_i, D) arrays (numpy or jax, any n_i >= 0), numbered
    globally in order. ``index_block`` / ``query_block`` set the fixed device step shape; ``progress`` is
    called with the number of index rows consumed after each step. See the module docstring for zero
    vectors, ties and errors.
    """
    _check_positive("k", k)
    _check_positive("index_block", index_block)
    _check_positive("query_block", query_block)
    q = _as_matrix(queries, "queries")
    if q.shape[0] == 0:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    qb = min(query_block, q.shape[0])
    padded = -(-q.shape[0] // qb) * qb
    q_pad = np.pad(q, ((0, padded - q.shape[0]), (0, 0)))  # (nb * qb, D), zero rows at the end
    q_dev = _normalise_jit(jnp.asarray(q_pad).reshape(padded // qb, qb, -1))  # (nb, qb, D)
    top_scores = jnp.full((padded // qb, qb, k), -jnp.inf, jnp.float32)  # (nb, qb, k)
    top_rows = jnp.full((padded // qb, qb, k), -1, jnp.int32)
    total = 0
    for block, valid in _fixed_blocks(index_blocks, q.shape[1], index_block):
        if total + valid > MAX_ROWS:
            raise UserError(f"the index has more than {MAX_ROWS} rows, more than cosine_topk supports")
        top_scores, top_rows = _step(top_scores, top_rows, q_dev, jnp.asarray(block), total, valid, k=k)
        total += valid
        if progress is not None:
            progress(valid)
    if total == 0:
        raise UserError("the index is empty: no rows to search")
    if k > total:
        raise UserError(f"k={k} is larger than the index ({total} rows)")
    scores = np.asarray(top_scores).reshape(padded, k)[: q.shape[0]]  # (Q, k)
    rows = np.asarray(top_rows).reshape(padded, k)[: q.shape[0]].astype(np.int64)
    return scores, rows


def _check_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise UserError(f"{name} must be a positive integer, got {value!r}")


def _as_matrix(x: ArrayLike, what: str, dim: int | None = None) -> np.ndarray:
    """``x`` as a finite (n, D) float32 numpy array, or a UserError naming ``what``."""
    a = np.asarray(x)
    if a.ndim != 2:
        raise UserError(f"{what} must be a 2-D (rows, dim) array, got shape {a.shape}")
    if not (np.issubdtype(a.dtype, np.floating) or a.dtype.kind in "iu" or a.dtype.name == "bfloat16"):
        raise UserError(f"{what} must hold numbers, got dtype {a.dtype}")
    if dim is not None and a.shape[1] != dim:
        raise UserError(f"{what} has dimension {a.shape[1]}, the queries have {dim}")
    a = a.astype(np.float32, copy=False)
    if not np.isfinite(a).all():
        raise UserError(f"{what} holds NaN or infinite values")
    return a


def _fixed_blocks(blocks: Iterable[ArrayLike], dim: int, size: int) -> Iterator[tuple[np.ndarray, int]]:
    """Regroup a stream of (n_i, D) arrays into (size, D) float32 blocks, the last zero-padded: (block,
    valid).

    When the whole stream is shorter than ``size``, the one block is smaller: the row count rounded up to a
    power of two (at least MIN_BLOCK), so small indexes do not pay for a full block.
    """
    pending: list[np.ndarray] = []  # pieces of the block being filled (views of the inputs)
    filled = 0
    first = True
    for i, raw in enumerate(blocks):
        part = _as_matrix(raw, f"index block {i}", dim)
        while len(part):
            piece, part = part[: size - filled], part[size - filled :]
            pending.append(piece)
            filled += len(piece)
            if filled == size:
                yield (pending[0] if len(pending) == 1 else np.concatenate(pending)), size  # (size, D)
                pending, filled, first = [], 0, False
    if filled:
        rows = np.concatenate(pending)  # (filled, D)
        if first:
            size = max(MIN_BLOCK, 1 << (filled - 1).bit_length())
        yield np.pad(rows, ((0, size - filled), (0, 0))), filled


def _normalise(x: jax.Array) -> jax.Array:
    """Rows scaled to unit L2 norm; zero rows stay zero."""
    norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
    return x / jnp.where(norm > 0, norm, 1.0)


_normalise_jit = jax.jit(_normalise)


@functools.partial(jax.jit, static_argnames=("k",))
def _step(
    top_scores: jax.Array,  # (nb, qb, k)
    top_rows: jax.Array,  # (nb, qb, k) int32
    queries: jax.Array,  # (nb, qb, D), unit rows
    block: jax.Array,  # (B, D)
    offset: jax.Array | int,
    valid: jax.Array | int,
    *,
    k: int,
) -> tuple[jax.Array, jax.Array]:
    """Merge one index block into the running top-k of every query block."""
    index = _normalise(block)  # (B, D)
    cols = jnp.arange(block.shape[0], dtype=jnp.int32)  # (B,)
    block_rows = jnp.asarray(offset, jnp.int32) + cols

    def one(args: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        scores_k, rows_k, q = args  # (qb, k), (qb, k), (qb, D)
        scores = jnp.dot(q, index.T, precision=jax.lax.Precision.HIGHEST)  # (qb, B)
        # -0.0 (a zero query against a negative row) would rank below +0.0 in top_k's total order, breaking
        # the lower-row-first rule for equal scores: make every zero +0.0
        scores = jnp.where(cols[None, :] < valid, jnp.where(scores == 0, 0.0, scores), -jnp.inf)
        merged = jnp.concatenate([scores_k, scores], axis=1)  # (qb, k + B): older (lower) rows first
        merged_rows = jnp.concatenate([rows_k, jnp.broadcast_to(block_rows, scores.shape)], axis=1)
        best, where = jax.lax.top_k(merged, k)  # ties: lower position first
        return best, jnp.take_along_axis(merged_rows, where, axis=1)

    return jax.lax.map(one, (top_scores, top_rows, queries))
