"""``vitreg-jax pretrain --data DIR --out RUN``: MAE pre-training of a ViT encoder, birder's ``mae_vit``
recipe.

The command parses, loads ``--init`` weights, and calls :mod:`vitreg_jax.pretraining.run`, which documents the
run folder. Each option that shapes the run has the ``dest`` of its setting: a :class:`PretrainSettings` field
or a :class:`TrainConfig` field (saved as ``train.<field>``), so options given on the command line map onto
the settings by name, and defaults and help come from those classes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from vitreg_jax.cli import _distributed as distributed
from vitreg_jax.data.rgb_stats import RGB_STATS, TRAIN_DEFAULT
from vitreg_jax.errors import UserError
from vitreg_jax.model.precision import DTYPE_CHOICES, DTYPE_HELP
from vitreg_jax.pretraining.config import WARMUP_FRACTION, MAEConfig, TrainConfig
from vitreg_jax.pretraining.run import TRAIN_PREFIX, PretrainSettings

EPILOG = """\
examples:
  # a laptop-sized run: a tiny ViT at 64 px for 2000 steps, then embed with the result
  vitreg-jax pretrain --data photos/ --out runs/tiny --network vit_t16 --size 64 --steps 2000 \\
      --batch-size 32 --lr 1e-3
  vitreg-jax embed --checkpoint runs/tiny/encoder photos/ --out emb/

  # birder's vit_reg4_b16 recipe (800 epochs, batch 512, 40 warm-up epochs), in bf16
  vitreg-jax pretrain --data /datasets/images --out runs/b16 --epochs 800 --batch-size 512 --bf16

  # continue from the latest checkpoint after an interruption (same --out; nothing else needed)
  vitreg-jax pretrain --out runs/b16 --resume

  # fine-tune start from converted birder weights
  vitreg-jax pretrain --data photos/ --out runs/ft --init vit_reg4_b16_mim_200 --epochs 20 --batch-size 64

  # export the encoder of the latest checkpoint now (also: `kill -USR1 <pid>` of a running pretrain)
  vitreg-jax pretrain --out runs/b16 --export-only

  # log the k-NN accuracy on a labelled set (one sub-folder per class) every 500 steps
  vitreg-jax pretrain --data photos/ --out runs/tiny --network vit_t16 --size 64 --steps 2000 \\
      --eval-train labelled/train --eval-val labelled/val --eval-every 500
"""
DESCRIPTION = """\
Masked-autoencoder (MAE) pre-training of a ViT encoder on folders of images, reproducing birder's
mae_vit recipe: 75% of the patches masked, a 512-wide 8-block decoder, pixel MSE on the masked
patches, AdamW (0.9, 0.95) with weight decay 0.05, linear warm-up then cosine, birder's level-1
augmentation. Give the run length with --steps or --epochs; everything else has the recipe's default.

The run folder RUN (new, empty, or a run of ours) gets run.json (every option that shapes the run),
files.txt (the images), checkpoints/ (resume with --resume; options given again must agree with
run.json), metrics.jsonl (+ tensorboard/), and at the end encoder/: a vitreg-jax checkpoint that
`vitreg-jax embed`, `export` (to a birder .pt) and `info` accept."""


# value types
# -------------------------------------------------------------------------------------------------
def _size(text: str) -> tuple[int, int]:
    parts = text.lower().replace(",", "x").split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected H or HxW with positive integers, got {text!r}") from None
    if len(values) not in (1, 2) or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected H or HxW with positive integers, got {text!r}")
    return (values[0], values[-1])


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _percent(fraction: float) -> str:
    return f"{fraction:.0%}".replace("%", "%%")  # argparse formats help strings with %


def _key_value(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE items, got {text!r}")
    try:
        parsed = json.loads(value.strip())
    except json.JSONDecodeError:
        parsed = {"true": True, "false": False, "none": None, "null": None}.get(
            value.strip().lower(), value.strip()
        )
    return key.strip(), parsed


# the parser
# ----------------------------------------------------------------------------------------------------
def register(subparsers: Any) -> None:
    S, T = PretrainSettings(), TrainConfig()  # the defaults the help text quotes
    p = subparsers.add_parser(
        "pretrain",
        help="MAE pre-training of a ViT encoder (birder's mae_vit recipe), resumable; exports the encoder",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("data and output")
    g.add_argument(
        "--data",
        nargs="+",
        metavar="DIR",
        default=None,
        help="image folders (searched recursively), image files or .txt lists of paths; not needed "
        "with --resume",
    )
    g.add_argument(
        "--out", required=True, metavar="RUN", help="run folder (new, empty, or a run to --resume)"
    )
    g.add_argument(
        "--size",
        type=_size,
        default=None,
        metavar="H[xW]",
        help="training resolution, a multiple of the patch size (default 224, or the --init weights')",
    )
    g.add_argument(
        "--rgb-stats",
        choices=sorted(RGB_STATS),
        default=None,
        help=f"normalisation (default {TRAIN_DEFAULT!r}; with --init, the weights' own)",
    )
    g.add_argument(
        "--aug-level",
        type=int,
        choices=(0, 1),
        default=None,
        help=f"birder augmentation level (default {S.aug_level}): 1 = random resized crop 0.3-1, two of "
        "{identity, rotate, brightness, contrast}, flip; 0 = resize only",
    )
    g.add_argument(
        "--workers", type=int, default=None, help="image decode threads (default: CPU count, max 8)"
    )
    g = p.add_argument_group("model")
    g.add_argument(
        "--network",
        default=None,
        metavar="NAME",
        help=f"birder ViT name (default {S.network}); small ones: vit_t16, vit_s16, vit_reg4_m16...",
    )
    g.add_argument(
        "--model-config",
        nargs="+",
        type=_key_value,
        default=None,
        metavar="KEY=VALUE",
        help="overrides of the network's birder config, e.g. num_layers=4 hidden_dim=128 mlp_dim=512 "
        "num_heads=4 (drop_path_rate is 0.0 unless given, as in birder's recipe)",
    )
    g.add_argument(
        "--init",
        default=None,
        metavar="CKPT",
        help="start the encoder from these weights (vitreg-jax checkpoint, birder .pt/.safetensors or a "
        "published name such as vit_reg4_b16_mim_200); the architecture comes from them",
    )
    g.add_argument(
        "--mae",
        default=None,
        metavar="NAME",
        help=f"birder MAE head (default {S.mae}; also mae_vit_dec512d12, ..._npl, ..._npl_lpe)",
    )
    g.add_argument(
        "--mae-config",
        nargs="+",
        type=_key_value,
        default=None,
        metavar="KEY=VALUE",
        help="overrides of the MAE head, e.g. decoder_depth=2 decoder_embed_dim=128 decoder_num_heads=4",
    )
    g.add_argument(
        "--mask-ratio",
        type=float,
        default=None,
        help=f"fraction of patches masked (default {MAEConfig().mask_ratio})",
    )
    g.add_argument(
        "--norm-pix-loss",
        action="store_true",
        default=None,
        help="normalise each target patch (birder's _npl variants)",
    )
    g.add_argument(
        "--frequency-endpoint",
        action="store_true",
        default=None,
        help="the decoder sin-cos frequencies of birder <= 0.6.2 (dim/4 - 1), which trained the "
        "published weights; default: 0.8.4's (dim/4)",
    )
    _training_arguments(p, T)
    g = p.add_argument_group("checkpoints, logs and export")
    g.add_argument(
        "--resume",
        action="store_true",
        help="continue RUN from its latest checkpoint (starts a new run when RUN has none)",
    )
    g.add_argument(
        "--checkpoint-every",
        type=_positive_int,
        default=None,
        help=f"optimizer steps between checkpoints (default {T.checkpoint_every}; one is always "
        "written at the end)",
    )
    g.add_argument(
        "--keep-checkpoints",
        type=_positive_int,
        default=None,
        help=f"how many to keep (default {T.keep_checkpoints})",
    )
    g.add_argument(
        "--log-every",
        type=_positive_int,
        default=None,
        help=f"steps per metrics line (default {T.log_every})",
    )
    g.add_argument(
        "--export-every",
        type=_positive_int,
        default=None,
        help="also export RUN/encoder every N steps (it is always exported at the end)",
    )
    g.add_argument(
        "--export-only",
        action="store_true",
        help="export RUN/encoder from the latest checkpoint and exit (no training)",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("k-NN evaluation during training (logged as knn/top1, knn/top5 beside the loss)")
    g.add_argument(
        "--eval-train",
        default=None,
        metavar="DIR",
        help="labelled images whose embeddings vote (one sub-folder per class, as for `eval`)",
    )
    g.add_argument(
        "--eval-val", default=None, metavar="DIR", help="labelled images to classify (same classes)"
    )
    g.add_argument(
        "--eval-every",
        type=_positive_int,
        default=None,
        metavar="N",
        help="evaluate every N steps (default: only after the last step)",
    )
    g.add_argument(
        "--eval-k",
        type=_positive_int,
        default=None,
        metavar="K",
        help=f"neighbours of the weighted k-NN (default {S.eval_k})",
    )
    distributed.add_arguments(p)
    names = {a.dest: a.option_strings[0] for a in p._actions if a.option_strings}
    p.set_defaults(func=run, option_names=names)  # cli.OneLineParser keeps argparse's errors to one line


def _training_arguments(p: argparse.ArgumentParser, T: TrainConfig) -> None:
    """Options whose ``dest`` is a TrainConfig field; defaults quoted from ``T``."""
    g = p.add_argument_group("length, batch and optimizer")
    length = g.add_mutually_exclusive_group()
    length.add_argument(
        "--steps",
        type=_positive_int,
        default=None,
        help="optimizer steps; the learning rate then changes every step",
    )
    length.add_argument(
        "--epochs",
        type=_positive_int,
        default=None,
        help="passes over the data (birder's unit; the learning rate changes once per epoch)",
    )
    g.add_argument(
        "--batch-size",
        type=_positive_int,
        default=None,
        help=f"images per forward pass over all devices (default {T.batch_size}; birder's recipe used "
        "2 x 256)",
    )
    g.add_argument(
        "--grad-accum-steps",
        type=_positive_int,
        default=None,
        help=f"forward passes per optimizer step (default {T.grad_accum_steps})",
    )
    g.add_argument(
        "--lr", type=float, default=None, help=f"peak learning rate (default {T.lr:g}, not batch-scaled)"
    )
    g.add_argument(
        "--wd",
        dest="weight_decay",
        type=float,
        default=None,
        metavar="WD",
        help=f"AdamW weight decay (default {T.weight_decay:g}, on every parameter)",
    )
    g.add_argument(
        "--betas",
        type=float,
        nargs=2,
        default=None,
        metavar=("B1", "B2"),
        help=f"default {T.betas[0]:g} {T.betas[1]:g}",
    )
    g.add_argument(
        "--no-decay-bias-norm",
        dest="decay_bias_and_norm",
        action="store_const",
        const=False,
        default=None,
        help="no weight decay on biases, norms, tokens and position embeddings (birder decays all)",
    )
    g.add_argument("--clip-grad-norm", type=float, default=None, help="clip the gradient norm (default: no)")
    g.add_argument(
        "--warmup-epochs",
        type=int,
        default=None,
        help=f"linear warm-up from {_percent(T.warmup_start_factor)} of the LR (default "
        f"{_percent(WARMUP_FRACTION)} of --epochs, rounded: birder's {T.warmup_epochs} of {T.epochs})",
    )
    g.add_argument(
        "--warmup-steps",
        type=int,
        default=None,
        help=f"warm-up with --steps (default {_percent(WARMUP_FRACTION)} of them, rounded)",
    )
    g.add_argument(
        "--lr-per-step",
        dest="schedule_per_step",
        action="store_const",
        const=True,
        default=None,
        help="with --epochs, change the learning rate every step instead of every epoch",
    )
    dtypes = g.add_mutually_exclusive_group()
    dtypes.add_argument(
        "--dtype",
        dest="compute_dtype",
        choices=DTYPE_CHOICES,
        default=None,
        help=f"{DTYPE_HELP}; bfloat16 keeps float32 accumulation and float32 master weights "
        f"(default {T.compute_dtype}: birder's fp32 recipe)",
    )
    dtypes.add_argument(
        "--bf16",
        "--amp",
        dest="compute_dtype",
        action="store_const",
        const="bfloat16",
        default=None,
        help="the same as --dtype bfloat16",
    )
    g.add_argument(
        "--seed", type=int, default=None, help=f"data order, augmentation, masks and init (default {T.seed})"
    )


# running
# -------------------------------------------------------------------------------------------------------
def _options(args: argparse.Namespace) -> dict[str, Any]:
    """{setting path: value} of the settings given on this command line (argparse default None = not
    given)."""
    top = [f.name for f in dataclasses.fields(PretrainSettings) if f.name != "train"]
    options = {name: getattr(args, name) for name in top if getattr(args, name, None) is not None}
    options.update(
        {
            TRAIN_PREFIX + f.name: getattr(args, f.name)
            for f in dataclasses.fields(TrainConfig)
            if getattr(args, f.name, None) is not None
        }
    )
    return options


def run(args: argparse.Namespace) -> int:
    from vitreg_jax.pretraining import run as pretrain_run

    names: dict[str, str] = args.option_names

    def name(path: str) -> str:  # a setting's option, e.g. train.weight_decay -> --wd
        return names.get(path.removeprefix(TRAIN_PREFIX), path)

    if args.workers is not None and args.workers < 0:
        raise UserError(f"--workers must be 0 or more, got {args.workers}")
    distributed.check(args)
    the_run = pretrain_run.open_run(
        args.out, _options(args), resume=args.resume, export_only=args.export_only, name=name
    )
    # (XLA flags stay the user's: --xla_cpu_experimental_ynn_fusion_type=, which speeds up float32 inference
    # on CPU, slows this train step down; BENCHMARKS.md "MAE train step")
    distributed.initialize(args)
    echo = pretrain_run.stderr_echo("vitreg-jax pretrain")
    if args.export_only:
        pretrain_run.export_latest(the_run, echo=echo)
        return 0
    encoder = rgb_stats = None
    if the_run.needs_init_weights:
        from vitreg_jax import load_model_with_cfg

        encoder, init_cfg = load_model_with_cfg(None, the_run.settings.init)
        rgb_stats = init_cfg["rgb_stats"]  # the weights were trained with these
    result = pretrain_run.train(
        the_run,
        encoder=encoder,
        encoder_rgb_stats=rgb_stats,
        workers=args.workers,
        progress=not args.no_progress,
        echo=echo,
    )
    if result.loss is None:
        echo(f"the run was already complete ({result.step} steps)")
    else:
        resumed = "" if result.resumed_from is None else f" (resumed from step {result.resumed_from})"
        echo(f"done, {result.step} steps{resumed}, last loss {result.loss:.4f}")
    return 0
