"""``vitreg-jax eval``: k-NN and linear-probe accuracy of an encoder on a labelled train / val pair.

Thin: parse, load the model (folders) or the ``embed`` outputs, call :mod:`vitreg_jax.evaluation.knn`, print a
table and write ``--out`` (JSON) atomically.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from vitreg_jax.errors import UserError
from vitreg_jax.evaluation.settings import DEFAULT_K, DEFAULT_TEMPERATURE, check_k, check_temperature
from vitreg_jax.model.precision import DTYPE_CHOICES, DTYPE_HELP

DEFAULT_BATCH_SIZE = 64
SHOWN_FAILURES = 5


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "eval",
        help="k-NN and linear-probe accuracy of an encoder on labelled image folders",
        description="Judge an encoder by its frozen embeddings: DINO's weighted k-NN (cosine, votes "
        "exp(s/T)), the nearest neighbour (k = 1), and a linear probe (logistic regression on standardised "
        "embeddings, L2 strength chosen on a held-out slice of train). TRAIN and VAL hold one sub-folder per "
        "class (the ImageFolder layout); with --train-embeddings/--val-embeddings, `vitreg-jax embed` "
        "outputs "
        ""
        "of such folders are read instead (each row's class is its path's folder).",
        epilog=(
            "example: vitreg-jax eval --checkpoint ckpt/ --train data/train --val data/val --out eval.json"
        ),
    )
    p.add_argument(
        "--checkpoint",
        metavar="CKPT",
        help="Orbax checkpoint dir, birder .pt/.safetensors, or a published weight name (with --train/--val)",
    )
    p.add_argument(
        "--config", default=None, metavar="JSON", help="birder json config for a birder weights file"
    )
    p.add_argument("--train", metavar="DIR", help="labelled training images (one sub-folder per class)")
    p.add_argument("--val", metavar="DIR", help="labelled validation images (the same class folders)")
    p.add_argument(
        "--train-embeddings", metavar="DIR", help="`vitreg-jax embed` output of the training images"
    )
    p.add_argument(
        "--val-embeddings", metavar="DIR", help="`vitreg-jax embed` output of the validation images"
    )
    p.add_argument(
        "-k", type=int, default=DEFAULT_K, help=f"neighbours of the weighted k-NN (default {DEFAULT_K})"
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=DEFAULT_TEMPERATURE,
        help=f"k-NN vote weight exp(s/T) (default {DEFAULT_TEMPERATURE})",
    )
    p.add_argument("--seed", type=int, default=0, help="draws the linear probe's held-out slice (default 0)")
    p.add_argument("--no-linear", action="store_true", help="skip the linear probe (k-NN only)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help=DTYPE_HELP + " (as for embed)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="images per embedding batch")
    p.add_argument("--workers", type=int, default=None, help="decode threads (default: CPU count, at most 8)")
    p.add_argument("--out", metavar="FILE.json", help="write the results and settings here as JSON")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=run)


def _check_args(args: argparse.Namespace) -> str:
    folders = args.train is not None or args.val is not None
    embeddings = args.train_embeddings is not None or args.val_embeddings is not None
    if folders == embeddings:
        raise UserError(
            "give either --train and --val (image folders) or --train-embeddings and "
            "--val-embeddings (embed outputs)"
        )
    if folders and (args.train is None or args.val is None or args.checkpoint is None):
        raise UserError("--train, --val and --checkpoint go together")
    if embeddings and (args.train_embeddings is None or args.val_embeddings is None):
        raise UserError("--train-embeddings and --val-embeddings go together")
    if embeddings and args.checkpoint is not None:
        raise UserError("--checkpoint is not used with --train-embeddings/--val-embeddings")
    check_k(args.k, name="-k")
    check_temperature(args.temperature, name="--temperature")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be a positive integer, got {args.batch_size}")
    if args.out is not None:
        from vitreg_jax.fileio import check_new_file

        check_new_file(args.out, force=args.force)
    return "folders" if folders else "embeddings"


def _progress(root: str, done: int, total: int) -> None:
    print(
        f"\rembedding {root}: {done}/{total}", end="\n" if done == total else "", file=sys.stderr, flush=True
    )


def run(args: argparse.Namespace) -> int:
    mode = _check_args(args)
    start = time.perf_counter()
    from vitreg_jax.data.labelled import read_labelled_folder
    from vitreg_jax.evaluation.labelled_embeddings import embed_folders, load_labelled_embeddings
    from vitreg_jax.evaluation.report import evaluate_embeddings, format_report

    settings: dict[str, Any] = {
        "k": args.k,
        "temperature": args.temperature,
        "seed": args.seed,
        "linear": not args.no_linear,
    }
    if mode == "folders":
        import vitreg_jax
        from vitreg_jax.model.precision import resolve_dtype

        folders = [read_labelled_folder(args.train, "train"), read_labelled_folder(args.val, "val")]
        net, cfg = vitreg_jax.load_model_with_cfg(args.config, args.checkpoint)
        dtype = resolve_dtype(args.dtype)
        train, val = embed_folders(
            net,
            cfg["rgb_stats"],
            folders,
            dtype=dtype,
            batch_size=args.batch_size,
            workers=args.workers,
            progress=_progress,
        )
        settings.update(
            checkpoint=args.checkpoint,
            train=args.train,
            val=args.val,
            dtype=dtype,
            batch_size=args.batch_size,
        )
    else:
        train = load_labelled_embeddings(args.train_embeddings, "--train-embeddings")
        val = load_labelled_embeddings(args.val_embeddings, "--val-embeddings")
        settings.update(train_embeddings=args.train_embeddings, val_embeddings=args.val_embeddings)
    report = evaluate_embeddings(
        train, val, k=args.k, temperature=args.temperature, seed=args.seed, linear=not args.no_linear
    )
    failures = [{"path": p, "reason": r} for p, r in train.failures + val.failures]
    report.update(settings=settings, failures=failures, seconds=round(time.perf_counter() - start, 3))
    report["counts"]["failed"] = len(failures)
    print(format_report(report))
    for f in failures[:SHOWN_FAILURES]:
        print(f"skipped {f['path']}: {f['reason']}", file=sys.stderr)
    if args.out is not None:
        from vitreg_jax.fileio import atomic_write_text

        atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0
