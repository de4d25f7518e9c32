"""``vitreg-jax knn --index DIR --queries DIR -k K --out FILE.parquet``: exact cosine nearest neighbours.

Thin: parse, call :func:`vitreg_jax.evaluation.neighbours.knn_to_parquet` with a progress bar, print a
summary.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from vitreg_jax.evaluation.settings import DEFAULT_INDEX_BLOCK, DEFAULT_NEIGHBOURS


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "knn",
        help="exact cosine nearest neighbours between two embed outputs, to a parquet table",
        description="For every query embedding, find the K index embeddings of highest cosine similarity "
        "(exact, computed blockwise on the accelerator; the index is streamed from its files, so it need not "
        "fit in memory, the queries must). Both folders are `vitreg-jax embed` outputs of either format "
        "(npy or parquet) made with --features cls by the same model. Writes FILE.parquet with columns query "
        "(the query's path or tar key), rank (1 = nearest), key (the neighbour's path or tar key) and score "
        "(cosine similarity); ties go to the earlier index row.",
        epilog=(
            "example: vitreg-jax knn --index emb/catalogue --queries emb/photos -k 5 --out neighbours.parquet"
        ),
    )
    p.add_argument("--index", required=True, metavar="DIR", help="embed output to search in")
    p.add_argument("--queries", required=True, metavar="DIR", help="embed output whose rows are the queries")
    p.add_argument(
        "-k",
        "--k",
        type=int,
        default=DEFAULT_NEIGHBOURS,
        help=f"neighbours per query (default {DEFAULT_NEIGHBOURS})",
    )
    p.add_argument("--out", required=True, metavar="FILE.parquet", help="the table to write")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument(
        "--block-rows",
        type=int,
        default=DEFAULT_INDEX_BLOCK,
        metavar="N",
        help=f"index rows per device step (default {DEFAULT_INDEX_BLOCK}; lower it if the device "
        "runs out of memory with many queries)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from vitreg_jax.errors import UserError
    from vitreg_jax.evaluation.neighbours import knn_to_parquet

    if args.block_rows < 1:
        raise UserError(f"--block-rows must be a positive integer, got {args.block_rows}")
    start = time.perf_counter()
    with tqdm(unit="row", desc="knn", disable=args.quiet, file=sys.stderr, dynamic_ncols=True) as bar:

        def show(rows: int, total: int) -> None:
            bar.total = total
            bar.update(rows)

        summary = knn_to_parquet(
            args.index,
            args.queries,
            args.k,
            args.out,
            block_rows=args.block_rows,
            progress=show,
            force=args.force,
        )
    seconds = time.perf_counter() - start
    print(
        f"{summary.queries} queries x {summary.index} index rows, k={summary.k}: wrote {summary.out} "
        f"({seconds:.1f} s)"
    )
    return 0
