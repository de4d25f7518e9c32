"""``knn`` throughput: exact cosine top-k of Q queries over N x D random embeddings, in queries/s.

    .venv/bin/python benchmarks/knn.py                                 # 200k x 768 index, 1000 queries, k=10
    .venv/bin/python benchmarks/knn.py --rows 1000000 --queries 10000  # 1 M x 768 (about 3 GB of rows)
    .venv/bin/python benchmarks/knn.py --rows 20000 --via npy          # the command's path: files on disk

``--via memory`` (the default) streams the index to :func:`vitreg_jax.evaluation.cosine_topk` from two
pre-generated chunks of 65536 random rows used in turn (seeded; never all N rows in memory, generation not
timed): the search alone. ``--via npy`` / ``--via parquet`` first write an ``embed``-format folder for the
index and one for the queries (not timed), then time :func:`vitreg_jax.evaluation.knn_to_parquet`, i.e. the
``vitreg-jax knn`` command without its process start: reading the blocks from disk, the search and writing the
result table. Each measurement is preceded by a small run with the same block shapes, so compilation is not
counted. Runs on the default JAX backend (CPU, GPU, TPU).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GENERATE_ROWS = 65536  # rows generated per chunk of the index stream
POOL_CHUNKS = 2  # --via memory cycles over this many pre-generated chunks, so generating is not timed


def random_blocks(rows: int, dim: int, seed: int) -> Iterator[np.ndarray]:
    """(n, dim) float32 standard-normal chunks, ``rows`` in all, reproducible from ``seed``."""
    rng = np.random.default_rng(seed)
    for start in range(0, rows, GENERATE_ROWS):
        yield rng.standard_normal((min(GENERATE_ROWS, rows - start), dim), dtype=np.float32)


def pooled_blocks(rows: int, dim: int, seed: int) -> Iterator[np.ndarray]:
    """``rows`` rows streamed from a few pre-generated chunks (generated before the first is handed out)."""
    pool = [block for _, block in zip(range(POOL_CHUNKS), random_blocks(rows, dim, seed), strict=False)]
    sent = 0
    while sent < rows:
        block = pool[(sent // GENERATE_ROWS) % len(pool)][: rows - sent]
        yield block
        sent += len(block)


def write_folder(out: Path, rows: int, dim: int, seed: int, fmt: str) -> Path:
    """An ``embed`` output folder of random rows in either format (keys "row-000000"...)."""
    # the embed output format written directly, without images: no public writer takes ready-made rows
    from vitreg_jax.embedding import outputs as embed_outputs

    out.mkdir(parents=True)
    keys = [f"row-{i:09d}" for i in range(rows)]
    meta = {"status": "complete", "embedding_shape": [dim]}
    if fmt == "npy":
        values = np.concatenate(list(random_blocks(rows, dim, seed)))  # (rows, dim)
        np.save(out / "embeddings.npy", values)
        (out / "paths.txt").write_text("".join(k + "\n" for k in keys))
        (out / "meta.json").write_text(
            json.dumps({**meta, "format": embed_outputs.NPY_FORMAT, "names": "escaped"})
        )
        return out
    records, start = [], 0
    for index, block in enumerate(random_blocks(rows, dim, seed)):
        n = len(block)
        part = embed_outputs.PartData(index, "random", keys[start : start + n], ["random"] * n, [block], [])
        records.append(embed_outputs.write_part(out / embed_outputs.part_name(index), part, (dim,), "bench"))
        start += n
    embed_outputs.write_manifest(out, records, {**meta, "format": embed_outputs.PARQUET_FORMAT})
    return out


def time_memory(args: argparse.Namespace) -> float:
    from vitreg_jax.evaluation import cosine_topk

    queries = next(random_blocks(args.queries, args.dim, seed=1))
    warm_rows = min(args.rows, 2 * args.block_rows)
    cosine_topk(queries, random_blocks(warm_rows, args.dim, 2), args.k, index_block=args.block_rows)
    blocks = pooled_blocks(args.rows, args.dim, 0)
    first = next(blocks)  # the pool is generated here, before the clock starts
    start = time.perf_counter()
    cosine_topk(queries, itertools.chain([first], blocks), args.k, index_block=args.block_rows)
    return time.perf_counter() - start


def time_files(args: argparse.Namespace) -> float:
    from vitreg_jax.evaluation import knn_to_parquet

    with tempfile.TemporaryDirectory(prefix="vitreg-knn-bench-") as tmp:
        tmp_path = Path(tmp)
        index = write_folder(tmp_path / "index", args.rows, args.dim, 0, args.via)
        queries = write_folder(tmp_path / "queries", args.queries, args.dim, 1, args.via)
        warm = write_folder(tmp_path / "warm", min(args.rows, 2 * args.block_rows), args.dim, 2, args.via)
        knn_to_parquet(warm, queries, args.k, tmp_path / "warm.parquet", block_rows=args.block_rows)
        start = time.perf_counter()
        knn_to_parquet(index, queries, args.k, tmp_path / "nn.parquet", block_rows=args.block_rows)
        return time.perf_counter() - start


def main() -> None:
    from vitreg_jax.evaluation import DEFAULT_INDEX_BLOCK

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000, help="index rows N (default 200000)")
    parser.add_argument("--dim", type=int, default=768, help="embedding dimension D (default 768)")
    parser.add_argument("--queries", type=int, default=1000, help="queries Q (default 1000)")
    parser.add_argument("-k", type=int, default=10, help="neighbours per query (default 10)")
    parser.add_argument(
        "--block-rows", type=int, default=DEFAULT_INDEX_BLOCK, help="index rows per device step"
    )
    parser.add_argument(
        "--via",
        choices=("memory", "npy", "parquet"),
        default="memory",
        help="index generated in memory (search only) or read from an embed folder (default memory)",
    )
    args = parser.parse_args()
    import jax

    seconds = time_memory(args) if args.via == "memory" else time_files(args)
    device = jax.devices()[0].device_kind
    print(
        f"knn {args.via}: {args.queries} queries x {args.rows} x {args.dim} index, k={args.k}, "
        f"block {args.block_rows}, {device}: {seconds:.2f} s = {args.queries / seconds:.1f} queries/s "
        f"({2 * args.dim * args.rows * args.queries / seconds / 1e9:.1f} GFLOP/s in the similarity matmul)"
    )


if __name__ == "__main__":
    main()
