"""Nearest neighbours between two ``embed`` outputs, written as a parquet table (what ``vitreg-jax knn``
runs).

``knn_to_parquet(index_dir, queries_dir, k, out)`` reads the queries into memory, streams the index in blocks
from its files (:meth:`EmbeddingSet.blocks`, so the index need not fit in memory), finds each query's ``k``
most cosine-similar index rows with :func:`vitreg_jax.evaluation.search.cosine_topk` and writes ``out``
atomically with one row per (query, neighbour): ``query`` (string: the query's key), ``rank`` (int32, 1 =
nearest), ``key`` (string: the neighbour's key in the index), ``score`` (float32 cosine similarity). Rows come
in query order, then rank; ties go to the lower index row.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vitreg_jax.embedding.reader import EmbeddingSet, open_embeddings
from vitreg_jax.errors import UserError
from vitreg_jax.evaluation.search import cosine_topk
from vitreg_jax.evaluation.settings import DEFAULT_INDEX_BLOCK, check_k
from vitreg_jax.fileio import atomic_write, check_new_file


@dataclass(frozen=True)
class KnnSummary:
    queries: int
    index: int
    k: int
    out: Path


def knn_to_parquet(
    index_dir: str | os.PathLike[str],
    queries_dir: str | os.PathLike[str],
    k: int,
    out: str | os.PathLike[str],
    *,
    block_rows: int = DEFAULT_INDEX_BLOCK,
    progress: Callable[[int, int], None] | None = None,
    force: bool = False,
) -> KnnSummary:
    """Write the ``k`` nearest index rows of every query to ``out`` (see the module docstring).

    ``progress(rows, total)`` is called after each index block with its row count and the index size.
    ``UserError`` for a missing or unfinished folder, per-token embeddings, different dimensions, ``k < 1``,
    an empty index, ``k`` larger than the index, or an ``out`` that exists already (unless ``force``).
    """
    check_k(k)
    out = check_new_file(out, force=force)
    index = _vectors(open_embeddings(index_dir), "index")
    queries = _vectors(open_embeddings(queries_dir), "queries")
    if index.dim != queries.dim:
        raise UserError(
            f"the index holds {index.dim}-d embeddings, the queries {queries.dim}-d (another model?)"
        )
    if len(index) == 0:
        raise UserError(f"the index {index.directory} holds no embeddings")
    if k > len(index):
        raise UserError(f"k={k} is larger than the index ({len(index)} rows in {index.directory})")
    query_keys, query_values = queries.load()  # (Q, D)
    blocks = (values for _, values in index.blocks(block_rows))
    step = None if progress is None else lambda n: progress(n, len(index))
    scores, rows = cosine_topk(query_values, blocks, k, index_block=block_rows, progress=step)  # (Q, k)
    _write_table(out, query_keys, np.asarray(index.keys, dtype=object)[rows], scores)
    return KnnSummary(len(queries), len(index), k, out)


def _vectors(emb: EmbeddingSet, what: str) -> EmbeddingSet:
    if len(emb.shape) != 1:
        raise UserError(
            f"the {what} {emb.directory} hold per-token features {emb.shape}; knn needs one "
            "vector per image (embed with --features cls)"
        )
    return emb


def _write_table(out: Path, query_keys: list[str], neighbour_keys: np.ndarray, scores: np.ndarray) -> None:
    """One row per (query, rank): neighbour_keys and scores are (Q, k)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    q, k = scores.shape
    table = pa.table(
        {
            "query": pa.array(np.repeat(np.asarray(query_keys, dtype=object), k), pa.string()),  # (Q * k,)
            "rank": pa.array(np.tile(np.arange(1, k + 1, dtype=np.int32), q)),
            "key": pa.array(neighbour_keys.reshape(-1), pa.string()),  # (Q * k,)
            "score": pa.array(scores.reshape(-1).astype(np.float32)),
        }
    )
    atomic_write(out, lambda f: pq.write_table(table, f))
