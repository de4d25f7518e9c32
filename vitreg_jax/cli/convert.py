"""``vitreg-jax convert``, ``export`` and ``info``: move ViTReg weights between birder (PyTorch) and JAX.

- ``convert SRC --out DIR``: a birder ``.pt`` / ``.safetensors`` (any key layout birder has published) or a
  published weight name -> a vitreg-jax (Orbax) checkpoint directory with ``metadata.json``.
- ``export CKPT --out FILE.pt|FILE.safetensors``: back to a birder file plus its json config, which
  ``birder.load_model_with_cfg`` loads strictly; weights round-trip bit for bit.
- ``info CKPT``: architecture, parameter count, dtypes, input size, rgb_stats and provenance.

Each command parses its arguments, calls one library function
(``convert.to_checkpoint.convert_to_checkpoint``, ``convert.to_birder.export_to_birder``, ``convert.info``)
and prints. Nothing here imports jax, orbax or torch at import time (``vitreg-jax --help`` stays fast).
``.pt`` files are read and written without torch (``convert/pt_reader.py``, ``convert/pt_writer.py``), as are
``.safetensors``. birder is needed only for ``--verify``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from vitreg_jax.convert.info import birder_file_info, checkpoint_info, info_text
from vitreg_jax.errors import UserError

KNOWN_NAMES = "vit_reg4_b16_mim_200, vit_reg4_b16_mim_300, vitreg4_b16_mim_200 (legacy)"
CACHE_HELP = (
    "Published names are downloaded once (with progress) through huggingface_hub, checked against "
    "their published sha256 and kept in the Hugging Face cache ($HF_HUB_CACHE, default "
    "~/.cache/huggingface/hub; $VITREG_JAX_CACHE replaces it for vitreg-jax). $HF_ENDPOINT picks a "
    "mirror, HF_HUB_OFFLINE=1 uses cached files only, $HF_TOKEN is sent when set."
)
EXIT_VERIFY_FAILED = 1
EXIT_HELP = (
    "Exit status: 0 done, 1 --verify found a difference above --tolerance (nothing written), 2 a usage "
    "or input error (one line on stderr, nothing written)."
)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``convert``, ``export`` and ``info`` parsers (the cli calls this lazily)."""
    from vitreg_jax.convert.verify import VERIFY_ATOL

    fmt = argparse.RawDescriptionHelpFormatter
    p = subparsers.add_parser(
        "convert",
        formatter_class=fmt,
        help="birder .pt/.safetensors (or a published name) -> Orbax checkpoint",
        description=_paras(
            "Convert birder weights into a vitreg-jax checkpoint directory (Orbax weights + "
            "metadata.json with the config, signature, rgb_stats and provenance).\n\n"
            "SRC is a birder .pt or .safetensors file (current key names, the pre-0.4 ln1/self_attention "
            "names, or "
            "the oldest layout with the final norm in encoder.block.<depth>), or a published weight name: "
            f"{KNOWN_NAMES}.\n\n"
            "The architecture comes from --config when given (birder's json; old files with 'alias' work "
            "too), "
            "else from the file itself: its signature and rgb_stats, and the tensor shapes (layers, width, "
            "registers, patch size, MLP width, classifier; heads from birder's standard count for the "
            "width). "
            ""
            "What was inferred is printed. --network names a birder architecture instead. Tensors keep their "
            "stored dtype (bf16/fp16 too); the model casts to float32 when it loads them."
        ),
        epilog="examples:\n"
        "  # a file birder saved (its json is optional)\n"
        "  vitreg-jax convert models/vit_reg4_b16_mim_200.pt --out ckpt/vit_reg4_b16_mim_200\n"
        "  # a published weight, downloaded once and sha256-checked; then compare with birder\n"
        "  vitreg-jax convert vit_reg4_b16_mim_200 --out ckpt/mim_200 --verify\n"
        "  # a bare state dict (no rgb_stats inside): give its json\n"
        "  vitreg-jax convert weights.safetensors --config models/vit_reg4_b16_mim.json --out ckpt/w\n"
        "  # replace an earlier conversion, naming the architecture\n"
        "  vitreg-jax convert old.pt --network vit_reg4_b16 --out ckpt/old --force\n\n"
        "then:\n  vitreg-jax info ckpt/mim_200\n"
        '  python -c "import vitreg_jax; net, cfg = vitreg_jax.load_model_with_cfg(None, '
        "'ckpt/mim_200')\"\n\n" + _paras(CACHE_HELP + "\n\n" + EXIT_HELP),
    )
    p.add_argument("src", metavar="SRC", help="birder .pt/.safetensors file, or a published weight name")
    p.add_argument("--out", required=True, metavar="DIR", help="checkpoint directory to create")
    _architecture_args(p)
    p.add_argument(
        "--force", action="store_true", help="replace DIR if it exists (only once the new one is whole)"
    )
    _verify_args(p, VERIFY_ATOL, "before anything is written")
    p.set_defaults(func=cmd_convert)

    p = subparsers.add_parser(
        "export",
        formatter_class=fmt,
        help="Orbax checkpoint -> birder .pt/.safetensors + json",
        description=_paras(
            "Write a vitreg-jax checkpoint back as a birder weights file (birder 0.8.4's key names) and "
            "its json config beside it (FILE with .json, or --json). birder.load_model_with_cfg(json, FILE) "
            "loads "
            "them strictly; the weights are the checkpoint's, bit for bit, in their stored dtype.\n\n"
            "CKPT may also be a birder file or a published name: that re-exports it with today's key names "
            "(a "
            ""
            "pre-0.4 file then loads in birder 0.8.4)."
        ),
        epilog="examples:\n"
        "  vitreg-jax export ckpt/mim_200 --out models/vit_reg4_b16_mim_200.pt\n"
        "      -> models/vit_reg4_b16_mim_200.pt and models/vit_reg4_b16_mim_200.json\n"
        "  vitreg-jax export ckpt/mim_200 --out out/mim_200.safetensors --json out/vit_reg4_b16_mim.json "
        "--verify\n"
        "  vitreg-jax export vitreg4_b16_mim_200 --out models/vit_reg4_b16_mim_200.pt   # legacy keys -> "
        "current\n\n"
        "then, in PyTorch:\n  net, cfg = birder.load_model_with_cfg('models/vit_reg4_b16_mim_200.json', "
        "'models/vit_reg4_b16_mim_200.pt')\n\n" + _paras(CACHE_HELP + "\n\n" + EXIT_HELP),
    )
    p.add_argument(
        "ckpt", metavar="CKPT", help="vitreg-jax checkpoint directory (or a birder file / published name)"
    )
    p.add_argument("--out", required=True, metavar="FILE", help="FILE.pt or FILE.safetensors to write")
    p.add_argument("--json", metavar="PATH", help="where the json config goes (default: FILE with .json)")
    p.add_argument("--force", action="store_true", help="replace FILE and its json if they exist")
    _architecture_args(p, only_for_birder=True)
    _verify_args(p, VERIFY_ATOL, "before anything is moved into place")
    p.set_defaults(func=cmd_export)

    p = subparsers.add_parser(
        "info",
        formatter_class=fmt,
        help="what a checkpoint, birder file or published weight holds",
        description=_paras(
            "Show the architecture, parameter count, dtypes, input size, rgb_stats and provenance of "
            "a vitreg-jax checkpoint directory, a birder .pt/.safetensors file or a published weight name. "
            "For a "
            "birder file without a json the architecture is inferred as `convert` would."
        ),
        epilog="examples:\n"
        "  vitreg-jax info ckpt/mim_200\n"
        "  vitreg-jax info models/vit_reg4_b16_mim_200.pt\n"
        "  vitreg-jax info vit_reg4_b16_mim_200 --json | python -m json.tool\n\n" + _paras(CACHE_HELP),
    )
    p.add_argument("ckpt", metavar="CKPT", help="checkpoint directory, birder file, or published weight name")
    _architecture_args(p, only_for_birder=True)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=cmd_info)


def _paras(text: str) -> str:
    """Fill each blank-line-separated paragraph (the help formatter keeps our own line breaks)."""
    import textwrap

    return "\n\n".join(textwrap.fill(p, 100) for p in text.split("\n\n"))


def _architecture_args(p: argparse.ArgumentParser, only_for_birder: bool = False) -> None:
    extra = " (for a birder file)" if only_for_birder else ""
    p.add_argument("--config", metavar="JSON", help=f"birder's json config for the weights{extra}")
    p.add_argument(
        "--network",
        metavar="NAME",
        help=f"birder network name, e.g. vit_reg4_b16: overrides the inferred architecture{extra}",
    )


def _verify_args(p: argparse.ArgumentParser, default: float, when: str) -> None:
    p.add_argument(
        "--verify",
        action="store_true",
        help="needs birder: run birder and vitreg-jax on a fixed input and print the max |difference| of "
        f"the embeddings, {when}; exit 1 above --tolerance",
    )
    p.add_argument(
        "--tolerance",
        type=float,
        default=default,
        metavar="ATOL",
        help=f"largest accepted max |difference| for --verify (default {default:g})",
    )


# convert ---------------------------------------------------------------------------------------------------
def cmd_convert(args: argparse.Namespace) -> int:
    from vitreg_jax.convert.to_checkpoint import convert_to_checkpoint

    t0 = time.perf_counter()
    done = convert_to_checkpoint(
        args.src,
        args.out,
        config=args.config,
        network=args.network,
        force=args.force,
        verify_with_birder=args.verify,
        tolerance=args.tolerance,
    )
    if done.out is None:
        print("vitreg-jax convert: verification failed; nothing was written", file=sys.stderr)
        return EXIT_VERIFY_FAILED
    print(
        f"wrote        {done.out}/ ({done.parameters:,} parameters in {done.tensors} tensors, {done.dtype}, "
        f"{done.nbytes / 2**20:.1f} MiB) in {time.perf_counter() - t0:.1f} s"
    )
    return 0


# export ----------------------------------------------------------------------------------------------------
def cmd_export(args: argparse.Namespace) -> int:
    from vitreg_jax.convert.to_birder import export_to_birder

    t0 = time.perf_counter()
    done = export_to_birder(
        args.ckpt,
        args.out,
        json_out=args.json,
        config=args.config,
        network=args.network,
        force=args.force,
        verify_with_birder=args.verify,
        tolerance=args.tolerance,
    )
    if done.out is None:
        print("vitreg-jax export: verification failed; nothing was written", file=sys.stderr)
        return EXIT_VERIFY_FAILED
    print(
        f"wrote        {done.out} ({done.parameters:,} parameters in {done.tensors} tensors, "
        f"{'/'.join(done.dtypes)}) and {done.json} in {time.perf_counter() - t0:.1f} s"
    )
    return 0


# info ------------------------------------------------------------------------------------------------------
def cmd_info(args: argparse.Namespace) -> int:
    from vitreg_jax.model.checkpoint import is_checkpoint

    path = Path(args.ckpt)
    if is_checkpoint(path):
        if args.config or args.network:
            raise UserError(
                "--config and --network describe birder files; a checkpoint carries its own config"
            )
        info = checkpoint_info(path)
    elif path.is_dir():
        raise UserError(
            f"{path}: a directory but not a vitreg-jax checkpoint (expected metadata.json and params/)"
        )
    else:
        info = birder_file_info(args.ckpt, args.config, args.network)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(info_text(info))
    return 0
