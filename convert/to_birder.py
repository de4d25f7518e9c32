"""A vitreg-jax checkpoint (or a birder file / published name) -> a birder weights file plus its json config:
the library behind ``export``.

``export_to_birder(src, out)`` writes ``out`` (``.pt`` or ``.safetensors``, birder 0.8.4's key names) and the
json beside it, which ``birder.load_model_with_cfg(json, out)`` loads strictly; the weights are the source's,
bit for bit, in their stored dtype. With ``verify_with_birder`` birder loads the pair from a temporary folder
first and nothing is moved into place when its embedding differs from ours by more than ``tolerance``.
Progress lines go to ``report`` as they happen.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitreg_jax.convert import infer, mapping, verify
from vitreg_jax.convert.architecture import load_source
from vitreg_jax.convert.formats.birder_file import write_birder_file
from vitreg_jax.convert.output_paths import check_new_path, parents_made_for, remove_empty
from vitreg_jax.errors import UserError
from vitreg_jax.fileio import atomic_write_json
from vitreg_jax.model.birder_json import DEFAULT_BIRDER_VERSION, birder_config
from vitreg_jax.model.build import abstract_model, set_params
from vitreg_jax.model.checkpoint import is_checkpoint, load_checkpoint
from vitreg_jax.model.config import ViTConfig
from vitreg_jax.tree import check_fit, flatten, int_keys

if TYPE_CHECKING:
    import numpy as np

    from vitreg_jax.tree import ParamPath

WEIGHT_SUFFIXES = (".pt", ".safetensors")


@dataclass(frozen=True)
class Exported:
    """What ``export_to_birder`` did: ``out`` and ``json`` are None when the verification failed."""

    out: Path | None
    json: Path | None
    network: str
    verification: verify.Verification | None
    parameters: int
    tensors: int
    dtypes: tuple[str, ...]


def export_to_birder(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    json_out: str | os.PathLike[str] | None = None,
    config: str | os.PathLike[str] | None = None,
    network: str | None = None,
    force: bool = False,
    verify_with_birder: bool = False,
    tolerance: float = verify.VERIFY_ATOL,
    report: Callable[[str], object] = print,
) -> Exported:
    """Export the checkpoint (or birder file / published name) ``src`` to the birder file ``out`` and its json
    (``json_out``, default: ``out`` with ``.json``). ``config`` / ``network`` describe a birder ``src``
    only."""
    out = Path(out)
    if out.suffix not in WEIGHT_SUFFIXES:
        raise UserError(f"{out}: expected a .pt or .safetensors file name")
    json_path = Path(json_out) if json_out is not None else out.with_suffix(".json")
    if json_path.resolve() == out.resolve():
        raise UserError(f"{json_path}: the json config cannot overwrite the weights file")
    check_new_path(out, force, "file")
    check_new_path(json_path, force, "file")

    if is_checkpoint(src):
        if config is not None or network is not None:
            raise UserError(
                "--config and --network describe birder files; a checkpoint carries its own config"
            )
        params, vit_cfg, cfg, birder_meta = read_checkpoint(Path(src))
        report(f"source       {src} (vitreg-jax checkpoint)")
    else:
        _, bfile, arch = load_source(str(src), None if config is None else str(config), network)
        params = mapping.to_nnx(bfile.state, arch.vit_cfg, consume=True)
        vit_cfg, cfg = arch.vit_cfg, arch.cfg
        birder_meta = {k: v for k, v in bfile.meta.items() if k not in ("signature", "rgb_stats")}
        report(f"source       {bfile.path} (birder .{bfile.format}, key layout {arch.layout})")
    name = infer.birder_network_name(cfg.get("registered_name"), vit_cfg)
    json_cfg = birder_config(vit_cfg, cfg["rgb_stats"], name)
    x = ours = None
    if verify_with_birder:  # our side first, so that the parameters can be handed over to the birder layout
        x = verify.fixed_input(vit_cfg.image_size, vit_cfg.in_channels)
        ours = verify.our_embedding(set_params(abstract_model(vit_cfg), params), x)
    state = mapping.to_birder(params, vit_cfg, consume=True)
    del params
    report(f"architecture {name}: {infer.describe(vit_cfg)}")
    done = Exported(
        out=out,
        json=json_path,
        network=name,
        verification=None,
        parameters=sum(int(a.size) for a in state.values()),
        tensors=len(state),
        dtypes=tuple(sorted({str(a.dtype) for a in state.values()})),
    )

    with parents_made_for(out, json_path) as made:
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
        try:
            tmp_weights = tmp_dir / out.name
            write_birder_file(tmp_weights, state, _file_meta(json_cfg, birder_meta, vit_cfg))
            if (
                verify_with_birder
            ):  # birder loads the pair from the temporary folder, before anything is placed
                atomic_write_json(tmp_weights.with_suffix(".json"), json_cfg)
                theirs = verify.birder_embedding_from_files(tmp_weights.with_suffix(".json"), tmp_weights, x)
                result = verify.compare(ours, theirs, x, tolerance)
                report(result.line())
                done = dataclasses.replace(done, verification=result)
                if not result.ok:
                    shutil.rmtree(tmp_dir, ignore_errors=True)
                    remove_empty(made)
                    return dataclasses.replace(done, out=None, json=None)
            atomic_write_json(json_path, json_cfg)
            os.replace(tmp_weights, out)
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return done


def _file_meta(json_cfg: dict[str, Any], birder_meta: dict[str, Any], vit_cfg: ViTConfig) -> dict[str, Any]:
    """What birder stores beside the state dict in its files (``fs_ops.checkpoint_model``)."""
    return {
        "birder_version": DEFAULT_BIRDER_VERSION,  # the key layout written is 0.8.4's
        "task": birder_meta.get("task", json_cfg["task"]),
        "signature": json_cfg["signature"],
        "class_to_idx": birder_meta.get("class_to_idx") or {},
        "rgb_stats": json_cfg["rgb_stats"],
        # birder's own `config` entry (merged into the net's config by birder.load_model); a full model_config
        # here makes the file self-describing for `vitreg-jax convert` without its json
        "config": birder_meta.get("config") or vit_cfg.to_birder(),
    }


def read_checkpoint(
    path: Path,
) -> tuple[dict[ParamPath, np.ndarray], ViTConfig, dict[str, Any], dict[str, Any]]:
    """(flat params with int list indices, ViTConfig, birder config, birder file metadata) of a checkpoint;
    refuses parameters a birder ViT does not have (never drops weights silently)."""
    params, meta = load_checkpoint(path)
    try:
        vit_cfg = ViTConfig.from_dict(meta["vit_config"])
        cfg = dict(meta["birder_config"])
        cfg["rgb_stats"] = meta.get("rgb_stats", cfg.get("rgb_stats"))
    except (KeyError, TypeError) as e:
        raise UserError(f"{path}: metadata.json lacks {e} (not written by vitreg-jax?)") from None
    flat = int_keys(flatten(params))
    extra = sorted(".".join(map(str, k)) for k in set(flat) - {r.path for r in mapping.table(vit_cfg)})
    if extra:
        raise UserError(
            f"{path}: holds {len(extra)} parameter(s) a birder ViT does not have: "
            f"{', '.join(extra[:6])}{', ...' if len(extra) > 6 else ''}"
        )
    # a metadata.json that claims another width than its arrays would give a pair birder refuses
    check_fit(
        flat, mapping.our_shapes(vit_cfg), f"{path}: its arrays do not fit the architecture in its metadata"
    )
    return flat, vit_cfg, cfg, dict(meta.get("birder_meta") or {})
