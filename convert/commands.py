"""``vitreg-jax convert``, ``export`` and ``info``: move ViTReg weights between birder (PyTorch) and JAX.

- ``convert SRC --out DIR``: a birder ``.pt`` / ``.safetensors`` (any key layout birder has published) or a
  published weight name -> a vitreg-jax (Orbax) checkpoint directory with ``metadata.json``.
- ``export CKPT --out FILE.pt|FILE.safetensors``: back to a birder file plus its json config, which
  ``birder.load_model_with_cfg`` loads strictly; weights round-trip bit for bit.
- ``info CKPT``: architecture, parameter count, dtypes, input size, rgb_stats and provenance.

Nothing here imports jax, orbax or torch at import time (``vitreg-jax --help`` stays fast). ``.pt`` files are
read and written without torch (``convert/pt_reader.py``, ``convert/pt_writer.py``), as are ``.safetensors``.
birder is needed only for ``--verify``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitreg_jax.convert.architecture import Architecture, load_source
from vitreg_jax.convert.info import birder_file_info, checkpoint_info, info_text
from vitreg_jax.convert.output_paths import check_new_path, make_parents, os_error, remove_empty
from vitreg_jax.errors import UserError
from vitreg_jax.fileio import atomic_write_json

if TYPE_CHECKING:
    import numpy as np

    from vitreg_jax.config import ViTConfig
    from vitreg_jax.convert.hub import Resolved
    from vitreg_jax.convert.readers import BirderFile
    from vitreg_jax.tree import Path as ParamPath

KNOWN_NAMES = "vit_reg4_b16_mim_200, vit_reg4_b16_mim_300, vitreg4_b16_mim_200 (legacy)"
CACHE_HELP = ("Published names are downloaded once (with progress) through huggingface_hub, checked against "
              "their published sha256 and kept in the Hugging Face cache ($HF_HUB_CACHE, default "
              "~/.cache/huggingface/hub; $VITREG_JAX_CACHE replaces it for vitreg-jax). $HF_ENDPOINT picks a "
              "mirror, HF_HUB_OFFLINE=1 uses cached files only, $HF_TOKEN is sent when set.")
EXIT_VERIFY_FAILED = 1
EXIT_HELP = ("Exit status: 0 done, 1 --verify found a difference above --tolerance (nothing written), 2 a usage "
             "or input error (one line on stderr, nothing written).")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``convert``, ``export`` and ``info`` parsers (the cli calls this lazily)."""
    from vitreg_jax.convert.verify import VERIFY_ATOL

    fmt = argparse.RawDescriptionHelpFormatter
    p = subparsers.add_parser(
        "convert", formatter_class=fmt, help="birder .pt/.safetensors (or a published name) -> Orbax checkpoint",
        description=_paras("Convert birder weights into a vitreg-jax checkpoint directory (Orbax weights + "
        "metadata.json with the config, signature, rgb_stats and provenance).\n\n"
        "SRC is a birder .pt or .safetensors file (current key names, the pre-0.4 ln1/self_attention names, or "
        "the oldest layout with the final norm in encoder.block.<depth>), or a published weight name: "
        f"{KNOWN_NAMES}.\n\n"
        "The architecture comes from --config when given (birder's json; old files with 'alias' work too), "
        "else from the file itself: its signature and rgb_stats, and the tensor shapes (layers, width, "
        "registers, patch size, MLP width, classifier; heads from birder's standard count for the width). "
        "What was inferred is printed. --network names a birder architecture instead. Tensors keep their "
        "stored dtype (bf16/fp16 too); the model casts to float32 when it loads them."),
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
        "  python -c \"import vitreg_jax; net, cfg = vitreg_jax.load_model_with_cfg(None, 'ckpt/mim_200')\"\n\n"
        + _paras(CACHE_HELP + "\n\n" + EXIT_HELP))
    p.add_argument("src", metavar="SRC", help="birder .pt/.safetensors file, or a published weight name")
    p.add_argument("--out", required=True, metavar="DIR", help="checkpoint directory to create")
    _architecture_args(p)
    p.add_argument("--force", action="store_true", help="replace DIR if it exists (only once the new one is whole)")
    _verify_args(p, VERIFY_ATOL, "before anything is written")
    p.set_defaults(func=cmd_convert)

    p = subparsers.add_parser(
        "export", formatter_class=fmt, help="Orbax checkpoint -> birder .pt/.safetensors + json",
        description=_paras("Write a vitreg-jax checkpoint back as a birder weights file (birder 0.8.4's key names) and "
        "its json config beside it (FILE with .json, or --json). birder.load_model_with_cfg(json, FILE) loads "
        "them strictly; the weights are the checkpoint's, bit for bit, in their stored dtype.\n\n"
        "CKPT may also be a birder file or a published name: that re-exports it with today's key names (a "
        "pre-0.4 file then loads in birder 0.8.4)."),
        epilog="examples:\n"
        "  vitreg-jax export ckpt/mim_200 --out models/vit_reg4_b16_mim_200.pt\n"
        "      -> models/vit_reg4_b16_mim_200.pt and models/vit_reg4_b16_mim_200.json\n"
        "  vitreg-jax export ckpt/mim_200 --out out/mim_200.safetensors --json out/vit_reg4_b16_mim.json --verify\n"
        "  vitreg-jax export vitreg4_b16_mim_200 --out models/vit_reg4_b16_mim_200.pt   # legacy keys -> current\n\n"
        "then, in PyTorch:\n  net, cfg = birder.load_model_with_cfg('models/vit_reg4_b16_mim_200.json', "
        "'models/vit_reg4_b16_mim_200.pt')\n\n"
        + _paras(CACHE_HELP + "\n\n" + EXIT_HELP))
    p.add_argument("ckpt", metavar="CKPT", help="vitreg-jax checkpoint directory (or a birder file / published name)")
    p.add_argument("--out", required=True, metavar="FILE", help="FILE.pt or FILE.safetensors to write")
    p.add_argument("--json", metavar="PATH", help="where the json config goes (default: FILE with .json)")
    p.add_argument("--force", action="store_true", help="replace FILE and its json if they exist")
    _architecture_args(p, only_for_birder=True)
    _verify_args(p, VERIFY_ATOL, "before anything is moved into place")
    p.set_defaults(func=cmd_export)

    p = subparsers.add_parser(
        "info", formatter_class=fmt, help="what a checkpoint, birder file or published weight holds",
        description=_paras("Show the architecture, parameter count, dtypes, input size, rgb_stats and provenance of "
        "a vitreg-jax checkpoint directory, a birder .pt/.safetensors file or a published weight name. For a "
        "birder file without a json the architecture is inferred as `convert` would."),
        epilog="examples:\n"
        "  vitreg-jax info ckpt/mim_200\n"
        "  vitreg-jax info models/vit_reg4_b16_mim_200.pt\n"
        "  vitreg-jax info vit_reg4_b16_mim_200 --json | python -m json.tool\n\n" + _paras(CACHE_HELP))
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
    p.add_argument("--network", metavar="NAME",
                   help=f"birder network name, e.g. vit_reg4_b16: overrides the inferred architecture{extra}")


def _verify_args(p: argparse.ArgumentParser, default: float, when: str) -> None:
    p.add_argument("--verify", action="store_true",
                   help="needs birder: run birder and vitreg-jax on a fixed input and print the max |difference| of "
                   f"the embeddings, {when}; exit 1 above --tolerance")
    p.add_argument("--tolerance", type=float, default=default, metavar="ATOL",
                   help=f"largest accepted max |difference| for --verify (default {default:g})")


# convert ---------------------------------------------------------------------------------------------------
def cmd_convert(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    out = Path(args.out)
    check_new_path(out, args.force, "directory")
    resolved, bfile, arch = load_source(args.src, args.config, args.network)
    _print_source(bfile, resolved, arch)
    _print_architecture(arch)

    from vitreg_jax.checkpoint import save_checkpoint
    from vitreg_jax.convert import mapping
    from vitreg_jax.convert.json_meta import json_safe
    from vitreg_jax.loading import checkpoint_metadata
    from vitreg_jax.tree import unflatten

    dtypes = bfile.dtypes
    extra = {"source_layout": arch.layout, "architecture_source": arch.source,
             "converted_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    if resolved.name is not None:
        extra["published_name"] = resolved.name
    meta = checkpoint_metadata(arch.vit_cfg, arch.cfg, source=bfile,
                               dtype=dtypes[0] if len(dtypes) == 1 else "mixed", extra=extra)
    birder_meta = {k: v for k, v in bfile.meta.items() if k not in ("signature", "rgb_stats")}
    meta["birder_meta"], changed = json_safe(birder_meta)
    for note in changed:  # extra entries of the file that JSON cannot hold as they are
        print(f"metadata     {note}")

    state, _ = mapping.normalize_keys(bfile.state, arch.vit_cfg.num_layers)
    bfile.state = {}  # hand the arrays over: to_nnx drops each source array once converted
    x = theirs = None
    if args.verify:
        from vitreg_jax.convert import verify

        mapping.to_nnx(state, arch.vit_cfg)  # a mismatch is a user error before birder gets to see it
        x = verify.fixed_input(arch.vit_cfg.image_size, arch.vit_cfg.in_channels)
        theirs = verify.birder_embedding_from_state(arch.cfg, arch.cfg["registered_name"], state, x)
    params = mapping.to_nnx(state, arch.vit_cfg, consume=True)
    del state
    if args.verify and not _verified(params, arch.vit_cfg, x, theirs, args.tolerance):
        print("vitreg-jax convert: verification failed; nothing was written", file=sys.stderr)
        return EXIT_VERIFY_FAILED

    created = make_parents(out)
    try:
        save_checkpoint(out, unflatten(params), meta, force=args.force)
    except OSError as e:
        remove_empty(created)
        raise os_error(e, out) from None
    except BaseException:
        remove_empty(created)
        raise
    n, nbytes = sum(a.size for a in params.values()), sum(a.nbytes for a in params.values())
    print(f"wrote        {out}/ ({n:,} parameters in {len(params)} tensors, {meta['dtype']}, "
          f"{nbytes / 2**20:.1f} MiB) in {time.perf_counter() - t0:.1f} s")
    return 0


def _verified(params: Mapping[ParamPath, np.ndarray], vit_cfg: ViTConfig, x: np.ndarray, theirs: np.ndarray,
              tolerance: float) -> bool:
    from vitreg_jax.convert import verify
    from vitreg_jax.loading import abstract_model, set_params

    net = set_params(abstract_model(vit_cfg), params)
    result = verify.compare(verify.our_embedding(net, x), theirs, x, tolerance)
    print(result.line())
    return result.ok


def _print_source(bfile: BirderFile, resolved: Resolved, arch: Architecture) -> None:
    what = f"published {resolved.name}, " if resolved.name else ""
    version = bfile.meta.get("birder_version")
    print(f"source       {bfile.path} ({what}birder .{bfile.format}{f' {version}' if version else ''}, "
          f"key layout {arch.layout}, {'/'.join(bfile.dtypes)}, sha256 {bfile.sha256[:12]}...)")


def _print_architecture(arch: Architecture) -> None:
    from vitreg_jax.convert.infer import describe

    print(f"architecture {arch.cfg['registered_name']} (from {arch.source}): {describe(arch.vit_cfg)}")
    for note in arch.notes:
        print(f"             {note}")


# export ----------------------------------------------------------------------------------------------------
def cmd_export(args: argparse.Namespace) -> int:
    from vitreg_jax.checkpoint import is_checkpoint
    from vitreg_jax.convert import infer, mapping
    from vitreg_jax.convert.readers import write_birder_file
    from vitreg_jax.loading import DEFAULT_BIRDER_VERSION, birder_config

    t0 = time.perf_counter()
    out = Path(args.out)
    if out.suffix not in (".pt", ".safetensors"):
        raise UserError(f"{out}: expected a .pt or .safetensors file name")
    json_out = Path(args.json) if args.json else out.with_suffix(".json")
    if json_out.resolve() == out.resolve():
        raise UserError(f"{json_out}: the json config cannot overwrite the weights file")
    check_new_path(out, args.force, "file")
    check_new_path(json_out, args.force, "file")

    if is_checkpoint(args.ckpt):
        if args.config or args.network:
            raise UserError("--config and --network describe birder files; a checkpoint carries its own config")
        params, vit_cfg, cfg, birder_meta = _read_checkpoint(Path(args.ckpt))
        print(f"source       {args.ckpt} (vitreg-jax checkpoint)")
    else:
        _, bfile, arch = load_source(args.ckpt, args.config, args.network)
        params = mapping.to_nnx(bfile.state, arch.vit_cfg, consume=True)
        vit_cfg, cfg = arch.vit_cfg, arch.cfg
        birder_meta = {k: v for k, v in bfile.meta.items() if k not in ("signature", "rgb_stats")}
        print(f"source       {bfile.path} (birder .{bfile.format}, key layout {arch.layout})")
    network = infer.birder_network_name(cfg.get("registered_name"), vit_cfg)
    json_cfg = birder_config(vit_cfg, cfg["rgb_stats"], network)
    x = ours = None
    if args.verify:  # our side first, so that the parameters can be handed over to the birder layout
        from vitreg_jax.convert import verify
        from vitreg_jax.loading import abstract_model, set_params

        x = verify.fixed_input(vit_cfg.image_size, vit_cfg.in_channels)
        ours = verify.our_embedding(set_params(abstract_model(vit_cfg), params), x)
    state = mapping.to_birder(params, vit_cfg, consume=True)
    del params
    file_meta = {
        "birder_version": DEFAULT_BIRDER_VERSION,  # the key layout written is 0.8.4's
        "task": birder_meta.get("task", json_cfg["task"]),
        "signature": json_cfg["signature"],
        "class_to_idx": birder_meta.get("class_to_idx") or {},
        "rgb_stats": json_cfg["rgb_stats"],
        # birder's own `config` entry (merged into the net's config by birder.load_model); a full model_config
        # here makes the file self-describing for `vitreg-jax convert` without its json
        "config": birder_meta.get("config") or vit_cfg.to_birder(),
    }
    print(f"architecture {network}: {infer.describe(vit_cfg)}")

    made = make_parents(out) + make_parents(json_out)
    tmp_dir: Path | None = None
    try:
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
        tmp_weights = tmp_dir / out.name
        write_birder_file(tmp_weights, state, file_meta)
        if args.verify:  # birder loads the pair from the temporary folder, before anything is in place
            atomic_write_json(tmp_weights.with_suffix(".json"), json_cfg)
            if not _verify_export(ours, x, tmp_weights.with_suffix(".json"), tmp_weights, args.tolerance):
                print("vitreg-jax export: verification failed; nothing was written", file=sys.stderr)
                remove_empty(made)
                return EXIT_VERIFY_FAILED
        atomic_write_json(json_out, json_cfg)
        os.replace(tmp_weights, out)
    except OSError as e:
        remove_empty(made)
        raise os_error(e, out) from None
    except BaseException:
        remove_empty(made)
        raise
    finally:
        if tmp_dir is not None:
            shutil.rmtree(tmp_dir, ignore_errors=True)
    n = sum(a.size for a in state.values())
    dtypes = "/".join(sorted({str(a.dtype) for a in state.values()}))
    print(f"wrote        {out} ({n:,} parameters in {len(state)} tensors, {dtypes}) and {json_out} "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0


def _read_checkpoint(path: Path) -> tuple[dict[ParamPath, np.ndarray], ViTConfig, dict[str, Any], dict[str, Any]]:
    """(flat params with int list indices, ViTConfig, birder config, birder file metadata) of a checkpoint."""
    from vitreg_jax.checkpoint import load_checkpoint
    from vitreg_jax.config import ViTConfig
    from vitreg_jax.convert import mapping
    from vitreg_jax.tree import flatten, int_keys

    params, meta = load_checkpoint(path)
    try:
        vit_cfg = ViTConfig.from_dict(meta["vit_config"])
        cfg = dict(meta["birder_config"])
        cfg["rgb_stats"] = meta.get("rgb_stats", cfg.get("rgb_stats"))
    except (KeyError, TypeError) as e:
        raise UserError(f"{path}: metadata.json lacks {e} (not written by vitreg-jax?)") from None
    flat = int_keys(flatten(params))
    extra = sorted(".".join(map(str, k)) for k in set(flat) - {r.path for r in mapping.table(vit_cfg)})
    if extra:  # never drop weights silently
        raise UserError(f"{path}: holds {len(extra)} parameter(s) a birder ViT does not have: "
                        f"{', '.join(extra[:6])}{', ...' if len(extra) > 6 else ''}")
    return flat, vit_cfg, cfg, dict(meta.get("birder_meta") or {})


def _verify_export(ours: np.ndarray, x: np.ndarray, json_path: Path, weights: Path, tolerance: float) -> bool:
    """birder.load_model_with_cfg(json, weights) (strict) on ``x`` against our embedding ``ours``."""
    from vitreg_jax.convert import verify

    result = verify.compare(ours, verify.birder_embedding_from_files(json_path, weights, x), x, tolerance)
    print(result.line())
    return result.ok


# info ------------------------------------------------------------------------------------------------------
def cmd_info(args: argparse.Namespace) -> int:
    from vitreg_jax.checkpoint import is_checkpoint

    path = Path(args.ckpt)
    if is_checkpoint(path):
        if args.config or args.network:
            raise UserError("--config and --network describe birder files; a checkpoint carries its own config")
        info = checkpoint_info(path)
    elif path.is_dir():
        raise UserError(f"{path}: a directory but not a vitreg-jax checkpoint (expected metadata.json and params/)")
    else:
        info = birder_file_info(args.ckpt, args.config, args.network)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(info_text(info))
    return 0


