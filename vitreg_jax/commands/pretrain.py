"""``vitreg-jax pretrain --data DIR --out RUN``: MAE pre-training of a ViT encoder, birder's ``mae_vit`` recipe.

The run folder holds everything needed to continue or use the run::

    RUN/run.json        the resolved configuration (network, MAE head, optimizer, data, rgb stats)
    RUN/files.txt       the training images, in the order the epochs permute (fixed at the start)
    RUN/checkpoints/    Orbax checkpoints of the full train state (every --checkpoint-every steps, last K kept)
    RUN/metrics.jsonl   one JSON line per --log-every steps: step, epoch, loss, lr, grad_norm, images_per_s
    RUN/tensorboard/    the same scalars as TensorBoard events (when the tensorboard package is installed)
    RUN/encoder/        the trained encoder as a vitreg-jax checkpoint (`embed`, `export`, `info` accept it)

``--resume`` continues from the latest checkpoint with the saved configuration (options given again must
agree with it); the data stream, learning rate and random masks continue exactly where they were.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from vitreg_jax.commands import distributed
from vitreg_jax.errors import UserError

RUN_FILE = "run.json"
FILES_FILE = "files.txt"
ENCODER_DIR = "encoder"
FORMAT = "vitreg-jax-pretrain/1"
# Test hook: "N" SIGKILLs the process when the loop asks for the batch of step N (0-based), i.e. after N steps.
# birder's get_rgb_stats (data/transforms/classification.py, 0.8.4); training default: "birder"
RGB_STATS: dict[str, dict[str, tuple[float, float, float]]] = {
    "birder": {"mean": (0.5191, 0.5306, 0.4877), "std": (0.2316, 0.2304, 0.2588)},
    "imagenet": {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)},
    "neutral": {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)},
    "centered": {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)},
}
# defaults of the options that define a run (None in argparse, so --resume can tell what was given again)
DEFAULTS: dict[str, Any] = {
    "network": "vit_reg4_b16", "model_config": [], "size": None, "mae": "mae_vit", "mae_config": [],
    "mask_ratio": 0.75,
    "norm_pix_loss": False, "frequency_endpoint": False, "epochs": None, "steps": None, "batch_size": 256,
    "grad_accum_steps": 1, "lr": 1.5e-4, "wd": 0.05, "betas": [0.9, 0.95], "no_decay_bias_norm": False,
    "clip_grad_norm": None, "warmup_epochs": None, "warmup_steps": None, "lr_per_step": False, "bf16": False,
    "seed": 0, "checkpoint_every": 500, "keep_checkpoints": 3, "rgb_stats": None, "init": None,
    "aug_level": 1,
}
RUN_OPTIONS = tuple(DEFAULTS)
WARMUP_FRACTION = 0.05  # birder's recipe: 40 warm-up epochs of 800

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
"""


# command line ---------------------------------------------------------------------------------------------
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


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "pretrain",
        help="MAE pre-training of a ViT encoder (birder's mae_vit recipe), resumable; exports the encoder",
        description="""\
Masked-autoencoder (MAE) pre-training of a ViT encoder on folders of images, reproducing birder's
mae_vit recipe: 75% of the patches masked, a 512-wide 8-block decoder, pixel MSE on the masked
patches, AdamW (0.9, 0.95) with weight decay 0.05, linear warm-up then cosine, birder's level-1
augmentation. Give the run length with --steps or --epochs; everything else has the recipe's default.

The run folder RUN gets run.json (settings), files.txt (the images), checkpoints/ (resume with
--resume), metrics.jsonl (+ tensorboard/), and at the end encoder/: a vitreg-jax checkpoint that
`vitreg-jax embed`, `export` (to a birder .pt) and `info` accept.""",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data and output")
    g.add_argument("--data", nargs="+", metavar="DIR", default=None,
                   help="image folders (searched recursively), image files or .txt lists of paths; not needed "
                   "with --resume")
    g.add_argument("--out", required=True, metavar="RUN", help="run folder (created; see the layout below)")
    g.add_argument("--size", type=_size, default=None, metavar="H[xW]",
                   help="training resolution, a multiple of the patch size (default 224, or the --init weights')")
    g.add_argument("--rgb-stats", choices=sorted(RGB_STATS), default=None,
                   help="normalisation (default birder's 'birder' stats; with --init, the weights' own)")
    g.add_argument("--aug-level", type=int, choices=(0, 1), default=None,
                   help="birder augmentation level: 1 (default: random resized crop 0.3-1, two of "
                   "{identity, rotate, brightness, contrast}, flip) or 0 (resize only)")
    g.add_argument("--workers", type=int, default=None, help="image decode threads (default: CPU count, max 8)")
    g = p.add_argument_group("model")
    g.add_argument("--network", default=None, metavar="NAME",
                   help="birder ViT name (default vit_reg4_b16); small ones: vit_t16, vit_s16, vit_reg4_m16...")
    g.add_argument("--model-config", nargs="+", default=None, metavar="KEY=VALUE",
                   help="overrides of the network's birder config, e.g. num_layers=4 hidden_dim=128 mlp_dim=512 "
                   "num_heads=4 (drop_path_rate is 0.0 unless given, as in birder's recipe)")
    g.add_argument("--init", default=None, metavar="CKPT",
                   help="start the encoder from these weights (vitreg-jax checkpoint, birder .pt/.safetensors or a "
                   "published name such as vit_reg4_b16_mim_200); the architecture comes from them")
    g.add_argument("--mae", default=None, metavar="NAME",
                   help="birder MAE head (default mae_vit; also mae_vit_dec512d12, ..._npl, ..._npl_lpe)")
    g.add_argument("--mae-config", nargs="+", default=None, metavar="KEY=VALUE",
                   help="overrides of the MAE head, e.g. decoder_depth=2 decoder_embed_dim=128 decoder_num_heads=4")
    g.add_argument("--mask-ratio", type=float, default=None, help="fraction of patches masked (default 0.75)")
    g.add_argument("--norm-pix-loss", action="store_true", default=None,
                   help="normalise each target patch (birder's _npl variants)")
    g.add_argument("--frequency-endpoint", action="store_true", default=None,
                   help="the decoder sin-cos frequencies of birder <= 0.6.2 (dim/4 - 1), which trained the "
                   "published weights; default: 0.8.4's (dim/4)")
    g = p.add_argument_group("length, batch and optimizer")
    length = g.add_mutually_exclusive_group()
    length.add_argument("--steps", type=_positive_int, default=None,
                        help="optimizer steps; the learning rate then changes every step")
    length.add_argument("--epochs", type=_positive_int, default=None,
                        help="passes over the data (birder's unit; the learning rate changes once per epoch)")
    g.add_argument("--batch-size", type=_positive_int, default=None,
                   help="images per forward pass over all devices (default 256; birder's recipe used 2 x 256)")
    g.add_argument("--grad-accum-steps", type=_positive_int, default=None,
                   help="forward passes per optimizer step (default 1)")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (default 1.5e-4, not batch-scaled)")
    g.add_argument("--wd", type=float, default=None, help="AdamW weight decay (default 0.05, on every parameter)")
    g.add_argument("--betas", type=float, nargs=2, default=None, metavar=("B1", "B2"), help="default 0.9 0.95")
    g.add_argument("--no-decay-bias-norm", action="store_true", default=None,
                   help="no weight decay on biases, norms, tokens and position embeddings (birder decays all)")
    g.add_argument("--clip-grad-norm", type=float, default=None, help="clip the gradient norm (default: no)")
    g.add_argument("--warmup-epochs", type=int, default=None,
                   help="linear warm-up from 1%% of the LR (default 5%% of --epochs: birder's 40 of 800)")
    g.add_argument("--warmup-steps", type=int, default=None, help="warm-up with --steps (default 5%% of them)")
    g.add_argument("--lr-per-step", action="store_true", default=None,
                   help="with --epochs, change the learning rate every step instead of every epoch")
    g.add_argument("--bf16", "--amp", action="store_true", default=None,
                   help="bfloat16 matmuls with float32 accumulation and float32 master weights")
    g.add_argument("--seed", type=int, default=None, help="data order, augmentation, masks and init (default 0)")
    g = p.add_argument_group("checkpoints and export")
    g.add_argument("--resume", action="store_true",
                   help="continue RUN from its latest checkpoint (starts a new run when RUN has none)")
    g.add_argument("--checkpoint-every", type=_positive_int, default=None,
                   help="optimizer steps between checkpoints (default 500; one is always written at the end)")
    g.add_argument("--keep-checkpoints", type=_positive_int, default=None, help="how many to keep (default 3)")
    g.add_argument("--export-every", type=_positive_int, default=None,
                   help="also export RUN/encoder every N steps (it is always exported at the end)")
    g.add_argument("--export-only", action="store_true",
                   help="export RUN/encoder from the latest checkpoint and exit (no training)")
    g.add_argument("--log-every", type=_positive_int, default=10, help="steps per metrics line (default 10)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    distributed.add_arguments(p)
    p.set_defaults(func=run)  # cli.OneLineParser keeps argparse's errors to one line


# configuration ---------------------------------------------------------------------------------------------
def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return {"true": True, "false": False, "none": None, "null": None}.get(text.lower(), text)


def _model_overrides(items: list[str], option: str = "--model-config") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"{option} expects KEY=VALUE items, got {item!r}")
        out[key.strip()] = _parse_value(value.strip())
    return out


def _given(args: argparse.Namespace) -> dict[str, Any]:
    """The run-defining options given on this command line (argparse default None = not given)."""
    return {k: getattr(args, k) for k in RUN_OPTIONS if getattr(args, k, None) is not None}


def _normalise(options: dict[str, Any]) -> dict[str, Any]:
    """JSON-shaped values (tuples as lists) so that saved and given options compare equal."""
    return json.loads(json.dumps(options))


def _resolve(given: dict[str, Any]) -> dict[str, Any]:
    options = {**DEFAULTS, **given}
    if options["epochs"] is None and options["steps"] is None:
        raise UserError("give the run length: --steps N (optimizer steps) or --epochs N (passes over the data)")
    if options["epochs"] is not None and options["warmup_epochs"] is None:
        options["warmup_epochs"] = round(options["epochs"] * WARMUP_FRACTION)
    if options["steps"] is not None and options["warmup_steps"] is None:
        options["warmup_steps"] = round(options["steps"] * WARMUP_FRACTION)
    return _normalise(options)


def _build_configs(options: dict[str, Any]) -> tuple[Any, Any, Any]:
    from vitreg_jax.config import TrainConfig, mae_preset, preset

    overrides = _model_overrides(options["model_config"])
    size = tuple(options["size"]) if options["size"] else (224, 224)
    vit_cfg = None
    if options["init"] is None:
        overrides.setdefault("drop_path_rate", 0.0)  # birder's recipe: --encoder-model-config drop_path_rate=0.0
        vit_cfg = preset(options["network"], model_config=overrides, image_size=size)
    mae_cfg = mae_preset(options["mae"], mask_ratio=options["mask_ratio"])
    mae_overrides = _model_overrides(options["mae_config"], "--mae-config")
    if mae_overrides:
        from vitreg_jax.config import MAEConfig

        mae_cfg = MAEConfig.from_dict({**mae_cfg.to_dict(), **mae_overrides})
    if options["norm_pix_loss"]:
        mae_cfg = mae_cfg.replace(norm_pix_loss=True)
    if options["frequency_endpoint"]:
        mae_cfg = mae_cfg.replace(include_frequency_endpoint=True)
    train_cfg = TrainConfig(
        batch_size=options["batch_size"], lr=options["lr"], weight_decay=options["wd"], betas=tuple(options["betas"]),
        decay_bias_and_norm=not options["no_decay_bias_norm"], epochs=options["epochs"], steps=options["steps"],
        warmup_epochs=options["warmup_epochs"] or 0, warmup_steps=options["warmup_steps"] or 0,
        schedule_per_step=bool(options["lr_per_step"]), clip_grad_norm=options["clip_grad_norm"],
        grad_accum_steps=options["grad_accum_steps"], compute_dtype="bfloat16" if options["bf16"] else "float32",
        seed=options["seed"], checkpoint_every=options["checkpoint_every"],
        keep_checkpoints=options["keep_checkpoints"])
    return vit_cfg, mae_cfg, train_cfg


def _load_run(out: Path) -> dict[str, Any] | None:
    path = out / RUN_FILE
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: unreadable run file ({e})") from None
    if saved.get("format") != FORMAT:
        raise UserError(f"{path}: not a vitreg-jax pretrain run (format {saved.get('format')!r})")
    return saved


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text)
    os.replace(tmp, path)


# running -----------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    saved = _load_run(out)
    given = _given(args)
    if args.export_only:
        if saved is None:
            raise UserError(f"{out}: no run to export from (expected {out / RUN_FILE})")
        options = saved["options"]
    elif saved is not None:
        if not args.resume:
            raise UserError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
        options = saved["options"]
        clash = {k: v for k, v in _normalise(given).items() if options.get(k) != v}
        if clash:
            shown = ", ".join(f"--{k.replace('_', '-')} {v} (run has {options.get(k)})" for k, v in clash.items())
            raise UserError(f"--resume continues {out} with its saved settings; these differ: {shown}")
    else:
        if args.data is None:
            raise UserError("--data is required to start a run (folders of images, image files or .txt lists)")
        options = _resolve(given)
    if args.workers is not None and args.workers < 0:
        raise UserError(f"--workers must be 0 or more, got {args.workers}")
    distributed.check(args)
    vit_cfg, mae_cfg, train_cfg = _build_configs(options)  # UserError for bad networks / values, before JAX
    if saved is None and not args.export_only:
        from vitreg_jax.data import list_inputs

        paths = list_inputs(args.data)
    else:
        try:
            paths = [ln for ln in (out / FILES_FILE).read_text().splitlines() if ln]
        except OSError as e:
            raise UserError(f"{out / FILES_FILE}: cannot read the run's file list ({e})") from None

    # (XLA flags stay the user's: --xla_cpu_experimental_ynn_fusion_type=, which speeds up float32 inference on
    # CPU, slows this train step down; BENCHMARKS.md "MAE train step")
    distributed.initialize(args)
    return _train(args, out, saved, options, paths, vit_cfg, mae_cfg, train_cfg)


def _train(args: argparse.Namespace, out: Path, saved: dict[str, Any] | None, options: dict[str, Any],
           paths: list[str], vit_cfg: Any, mae_cfg: Any, train_cfg: Any) -> int:
    import jax
    from flax import nnx

    from vitreg_jax import __version__
    from vitreg_jax.augment import TrainTransform
    from vitreg_jax.convert.load import load_model_with_cfg
    from vitreg_jax.loading import birder_config, save_model
    from vitreg_jax.mae import MAE
    from vitreg_jax.optim import lr_schedule, total_steps
    from vitreg_jax.train import MAETrainer
    from vitreg_jax.train_data import TrainData
    from vitreg_jax.train_loop import fit
    from vitreg_jax.vit import ViT

    main = jax.process_index() == 0
    rgb_stats = saved["rgb_stats"] if saved is not None else None
    # the encoder: random (birder's init) or from --init weights
    if options["init"] is not None:
        encoder, init_cfg = load_model_with_cfg(None, options["init"])
        overrides = _model_overrides(options["model_config"])
        arch = sorted(set(overrides) - {"drop_path_rate"})
        if arch:
            raise UserError(f"--model-config {', '.join(arch)} cannot change the architecture of --init weights")
        encoder.cfg = encoder.cfg.replace(drop_path_rate=float(overrides.get("drop_path_rate", 0.0)))
        if options["size"]:
            encoder.adjust_size(tuple(options["size"]))
        vit_cfg = encoder.cfg
        if rgb_stats is None and options["rgb_stats"] is None:
            rgb_stats = init_cfg["rgb_stats"]  # the weights were trained with these
    else:
        encoder = ViT(vit_cfg, rngs=nnx.Rngs(options["seed"]))
    if rgb_stats is None:
        rgb_stats = RGB_STATS[options["rgb_stats"] or "birder"]
    rgb_stats = {"mean": list(rgb_stats["mean"]), "std": list(rgb_stats["std"])}
    model = MAE(encoder, mae_cfg, rngs=nnx.Rngs(options["seed"] + 1))

    # data: the file list is fixed when the run starts (RUN/files.txt)
    transform = TrainTransform(vit_cfg.image_size, rgb_stats, level=options["aug_level"])
    data = TrainData(paths, transform, batch_size=train_cfg.batch_size, grad_accum_steps=train_cfg.grad_accum_steps,
                     seed=train_cfg.seed, workers=args.workers, process_index=jax.process_index(),
                     process_count=jax.process_count())
    if train_cfg.batch_size % jax.device_count():
        raise UserError(f"--batch-size {train_cfg.batch_size} is not divisible by the {jax.device_count()} devices")
    spe = data.steps_per_epoch
    total = total_steps(train_cfg, spe)
    network = options["network"] if options["init"] is None else f"vit (from {options['init']})"
    if saved is None and main:
        out.mkdir(parents=True, exist_ok=True)
        _write_atomic(out / FILES_FILE, "".join(p + "\n" for p in paths))
        record = {"format": FORMAT, "vitreg_jax_version": __version__, "options": options,
                  "vit_config": vit_cfg.to_dict(), "mae_config": mae_cfg.to_dict(), "train_config": train_cfg.to_dict(),
                  "rgb_stats": rgb_stats, "data": [os.path.abspath(d) for d in args.data], "num_images": len(paths),
                  "steps_per_epoch": spe, "total_steps": total, "devices": jax.device_count()}
        _write_atomic(out / RUN_FILE, json.dumps(record, indent=2) + "\n")

    trainer = MAETrainer(model, train_cfg)
    registered = options["network"] if options["init"] is None and not options["model_config"] else None
    encoder_birder_cfg = birder_config(vit_cfg, rgb_stats, registered_name=registered)

    def export(state: Any, step: int) -> None:
        if not main:
            return
        mae = trainer.model(state)
        save_model(out / ENCODER_DIR, mae.encoder, encoder_birder_cfg, force=True,
                   extra={"trained_by": "vitreg-jax pretrain", "run": str(out.absolute()), "step": step,
                          "mae_config": mae_cfg.to_dict(), "init": options["init"]})
        print(f"vitreg-jax pretrain: exported the encoder at step {step} to {out / ENCODER_DIR}", file=sys.stderr)

    if args.export_only:
        from vitreg_jax.train_loop import CHECKPOINT_DIR, Checkpoints

        ckpt = Checkpoints(out / CHECKPOINT_DIR, keep=train_cfg.keep_checkpoints, asynchronous=False)
        try:
            step = ckpt.latest_step()
            if step is None:
                raise UserError(f"{out / CHECKPOINT_DIR}: no checkpoint to export yet")
            state, _ = ckpt.restore(step, trainer.abstract_state())
        finally:
            ckpt.close()
        export(state, step)
        return 0

    if main:
        print(f"vitreg-jax pretrain: {network} + {options['mae']} at {vit_cfg.image_size[0]}x{vit_cfg.image_size[1]}, "
              f"{len(paths)} images, {spe} steps per epoch, {total} steps of {train_cfg.batch_size} x "
              f"{train_cfg.grad_accum_steps} images on {jax.device_count()} {jax.devices()[0].platform} device(s), "
              f"{train_cfg.compute_dtype}", file=sys.stderr)
    result = fit(trainer, data, out, total=total, schedule=lr_schedule(train_cfg, spe), resume=True,
                 log_every=args.log_every, export=export, export_every=args.export_every,
                 progress=main and not args.no_progress)
    if main and result.loss is None:
        print(f"vitreg-jax pretrain: the run was already complete ({result.step} steps)", file=sys.stderr)
    elif main:
        resumed = "" if result.resumed_from is None else f" (resumed from step {result.resumed_from})"
        print(f"vitreg-jax pretrain: done, {result.step} steps{resumed}, last loss {result.loss:.4f}", file=sys.stderr)
    return 0

