"""``vitreg-jax demo``: the whole project in one minute on the bundled sample images.

The command parses its options and calls :func:`vitreg_jax.cli._demo_job.run_demo`, which documents the steps.
Heavy imports (jax, torch, birder) happen only when it runs, so ``vitreg-jax --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from vitreg_jax.cli._demo_job import DEFAULT_OUT, PARITY_TOLERANCE, TIMED_CALLS, TOP_K

DESCRIPTION = f"""\
The project in one command, on the sample photos in examples/images:
  1. weights: the published vit_reg4_b16_mim when it is on this machine (--weights, or already in
     the weights cache); otherwise a STAND-IN: birder's own vit_reg4_b16 with birder's random init
     from a fixed seed, saved with birder's save functions. The output says which; a stand-in's
     neighbours are not the published model's.
  2. convert that birder file to a vitreg-jax (Orbax) checkpoint and load the model from it;
  3. embed all images in one compiled batch and print the throughput;
  4. run birder itself on the same images and print the max |difference| of the embeddings
     (fp32, tolerance {PARITY_TOLERANCE:.0e}; skipped, with the reason, when birder is not installed)
     and both throughputs, each the best of {TIMED_CALLS} calls after a warm-up call;
  5. print each image's nearest neighbours (cosine similarity of the embeddings).
Nothing is downloaded unless --weights names a published weight that is not cached yet.
The exit status is 1 when the embeddings differ from birder's beyond the tolerance."""
EPILOG = """\
examples:
  vitreg-jax demo                                   # sample images, cached published weights or stand-in
  vitreg-jax demo --weights vit_reg4_b16_mim_300    # the published weights (downloaded once, 343 MB)
  vitreg-jax demo --weights models/vit_reg4_b16_mim_200.pt --images ~/photos --out /tmp/demo

outputs in --out: birder/ (the stand-in's .pt and .json), checkpoint/ (the Orbax checkpoint; try
`vitreg-jax info OUT/checkpoint`), embeddings.npy + paths.txt (row i is line i), neighbours.tsv,
demo.json (what ran and the measured figures)."""


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "demo",
        help=(
            "convert, check against birder, embed and search the bundled sample images (about a minute "
            "on CPU)"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=DESCRIPTION,
        epilog=EPILOG,
    )
    p.add_argument(
        "--weights",
        metavar="W",
        help="a birder .pt/.safetensors file, a vitreg-jax checkpoint directory, or a published name "
        "(vit_reg4_b16_mim_300, vit_reg4_b16_mim_200, vitreg4_b16_mim_200). Default: a published "
        "file already in the weights cache (the Hugging Face cache, or $VITREG_JAX_CACHE), else the "
        "stand-in. If a published name cannot be downloaded, the demo says so and uses the "
        "stand-in.",
    )
    p.add_argument(
        "--config",
        metavar="JSON",
        help="birder's json config for a --weights file (optional: "
        "read from the file or inferred from its shapes otherwise)",
    )
    p.add_argument(
        "--images",
        metavar="DIR",
        type=Path,
        default=None,
        help="folder of images (searched recursively) to embed (default: the bundled examples/images)",
    )
    p.add_argument(
        "--out",
        metavar="DIR",
        type=Path,
        default=DEFAULT_OUT,
        help=f"where the checkpoint, embeddings and report go (default: {DEFAULT_OUT}; a previous "
        "demo's output there is replaced, any other non-empty folder is refused)",
    )
    p.add_argument(
        "--top", metavar="K", type=int, default=TOP_K, help=f"neighbours shown per image (default {TOP_K})"
    )
    p.add_argument("--no-parity", action="store_true", help="skip the comparison with birder")
    p.add_argument(
        "--quick",
        action="store_true",
        help="a tiny 2-layer stand-in instead of the full-size model (for tests; a few seconds)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vitreg_jax.cli._demo_job import DemoOptions, run_demo

    report = run_demo(
        DemoOptions(
            weights=args.weights,
            config=args.config,
            images=args.images,
            out=args.out,
            top=args.top,
            parity=not args.no_parity,
            quick=args.quick,
        )
    )
    if report["parity_ok"] is False:
        print("vitreg-jax demo: the embeddings differ from birder's beyond the tolerance", file=sys.stderr)
        return 1
    return 0
