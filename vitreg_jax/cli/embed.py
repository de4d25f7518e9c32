"""``vitreg-jax embed --checkpoint CKPT INPUT... --out DIR``: images to embeddings, resumable, multi-process.

The command parses its arguments, loads the model and calls
:func:`vitreg_jax.embedding.dataset.embed_dataset`, whose docstring (and :mod:`vitreg_jax.embedding.outputs`
for the files) says how a run works: shards and parts, resuming after a kill, several processes, the folder
lock, never overwriting files it did not write.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from vitreg_jax.cli import _distributed as distributed
from vitreg_jax.embedding.options import FEATURES, FILES_PER_PART, FORMATS
from vitreg_jax.errors import UserError
from vitreg_jax.model.precision import DTYPE_CHOICES, DTYPE_HELP


def _size(text: str) -> tuple[int, int]:
    parts = re.split(r"[x,]", text.strip().lower())
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected H, HxW or H,W with positive integers, got {text!r}")
    return (values[0], values[-1])


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "embed",
        help="images (files, folders, lists, .tar shards, URLs) to embeddings, resumable",
        description="Embed images with a vitreg-jax checkpoint, a birder .pt/.safetensors file or a "
        "published "
        "weight name. --format npy writes DIR/embeddings.npy, paths.txt, failed.txt and meta.json; --format "
        "parquet writes DIR/part-NNNNN.parquet (one per input shard) and DIR/manifest.json. Rerun the same "
        "command to resume an interrupted run (also with another number of processes).",
    )
    p.add_argument(
        "inputs",
        nargs="*",
        metavar="INPUT",
        help="image files, folders (recursive), .txt lists, webdataset .tar shards, brace patterns "
        "(part-{0000..0099}.tar), globs, fsspec URLs (file://, gs://, s3://, https://)",
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        metavar="CKPT",
        help="Orbax checkpoint dir, birder .pt/.safetensors, or a published weight name",
    )
    p.add_argument(
        "--config", default=None, metavar="JSON", help="birder json config for a birder weights file"
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (locked while the run lasts)")
    p.add_argument(
        "--format",
        choices=FORMATS,
        default="npy",
        help="npy: one embeddings.npy (small runs); parquet: one part per shard plus manifest.json",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="global batch (all devices); default 32 per CPU device, 256 per GPU/TPU device",
    )
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help=f"{DTYPE_HELP} (default: auto)")
    p.add_argument(
        "--size",
        type=_size,
        default=None,
        metavar="H[xW]",
        help="input size (default: the checkpoint's signature); a multiple of the patch size",
    )
    p.add_argument(
        "--features",
        choices=FEATURES,
        default="cls",
        help="cls: net.embedding (N x D); tokens: all tokens (N x T x D); patches: patch tokens only",
    )
    p.add_argument(
        "--files-per-part",
        type=int,
        default=FILES_PER_PART,
        metavar="N",
        help=f"image files per output part and unit of resuming (default {FILES_PER_PART}); each "
        ".tar shard is one part. A part is held in memory until written: lower it for --features "
        "tokens|patches (1000 x 201 x 768 float32 is 600 MB)",
    )
    p.add_argument("--workers", type=int, default=None, help="decode threads (default: CPU count, at most 8)")
    p.add_argument(
        "--shard-weights",
        action="store_true",
        help="split the large weights over the devices instead of copying them to each (for models "
        "too large for one device; same results)",
    )
    distributed.add_arguments(p)
    p.set_defaults(func=run)


def _check_args(args: argparse.Namespace) -> None:
    """Every check that needs no JAX and no file reads beyond stat: fail before anything is written."""
    if not args.inputs:
        raise UserError("no inputs given: pass image files, folders, .tar shards or .txt lists of paths")
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch-size must be a positive integer, got {args.batch_size}")
    if args.workers is not None and args.workers < 0:
        raise UserError(f"--workers must be 0 or more, got {args.workers}")
    if args.files_per_part < 1:
        raise UserError(f"--files-per-part must be a positive integer, got {args.files_per_part}")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UserError(f"--out {args.out} exists and is not a folder")
    distributed.check(args)


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    from vitreg_jax.embedding.embedder import configure_xla_flags

    configure_xla_flags(args.dtype)  # before JAX starts: flags are read once per process
    distributed.initialize(args)

    from vitreg_jax.convert.load import load_model_with_cfg
    from vitreg_jax.data.shards import list_shards
    from vitreg_jax.embedding.dataset import embed_dataset
    from vitreg_jax.parallel import on_every_process

    # a missing input fails before the model loads, on every process at once
    shards = on_every_process(lambda: list_shards(args.inputs, args.files_per_part), "read its inputs")
    net, cfg = load_model_with_cfg(args.config, args.checkpoint)
    result = embed_dataset(
        net,
        shards,
        args.out,
        cfg=cfg,
        format=args.format,
        checkpoint=args.checkpoint,
        size=args.size,
        dtype=args.dtype,
        features=args.features,
        batch_size=args.batch_size,
        shard_weights=args.shard_weights,
        files_per_part=args.files_per_part,
        workers=args.workers,
    )
    import jax

    if jax.process_index() != 0:
        return 0
    if result.embedded == 0 and result.failed > 0:
        listed = "failed.txt" if result.format == "npy" else "manifest.json"
        raise UserError(
            f"none of the {result.failed} inputs could be read as an image; each one and why is listed in "
            f"{result.out / listed}"
        )
    if result.already_complete:
        print(
            f"{result.out}: already complete ({result.embedded} embeddings, {result.failed} failed); "
            "nothing to do"
        )
    else:
        rate = f" at {result.images_per_second:.2f} img/s" if result.images_per_second else ""
        print(
            f"embedded {result.embedded} images ({result.failed} failed) into {result.out}; "
            f"{result.computed} read this run{rate}"
        )
    return 0
