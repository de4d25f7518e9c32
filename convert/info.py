"""What ``vitreg-jax info`` reports: the architecture, parameter count, dtypes, input size, rgb_stats and
provenance of a checkpoint directory (without reading its weights) or of a birder file / published name (whose
architecture may stay unknown: the reason is reported instead). ``info_text`` formats it for people."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitreg_jax.convert.architecture import Architecture, read_source, source_architecture
from vitreg_jax.errors import UserError
from vitreg_jax.fileio import first_line

if TYPE_CHECKING:
    from vitreg_jax.model.config import ViTConfig


def checkpoint_info(path: Path) -> dict[str, Any]:
    """What ``info`` reports for a checkpoint directory; the weights themselves are not read."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    from vitreg_jax.convert.infer import birder_network_name, describe
    from vitreg_jax.model.checkpoint import PARAMS_DIR, read_metadata
    from vitreg_jax.model.config import ViTConfig

    meta = read_metadata(path)
    try:
        tree = ocp.PyTreeCheckpointer().metadata((path / PARAMS_DIR).absolute()).item_metadata.tree
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise UserError(
            f"{path}: the weights' metadata could not be read (damaged checkpoint?): {first_line(e)}"
        ) from None
    leaves = jax.tree_util.tree_leaves(tree)
    try:
        vit_cfg = ViTConfig.from_dict(meta["vit_config"])
    except (KeyError, TypeError) as e:
        raise UserError(f"{path}: metadata.json lacks {e}") from None
    cfg = meta.get("birder_config", {})
    return _info_dict(
        path=str(path),
        kind="vitreg-jax checkpoint",
        vit_cfg=vit_cfg,
        describe=describe,
        network=birder_network_name(cfg.get("registered_name"), vit_cfg),
        source="metadata.json",
        notes=(),
        counts=[int(np.prod(leaf.shape, dtype=np.int64)) for leaf in leaves],
        nbytes=sum(
            int(np.prod(leaf.shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize for leaf in leaves
        ),
        dtypes=sorted({str(np.dtype(leaf.dtype)) for leaf in leaves}),
        signature=meta.get("signature"),
        rgb_stats=meta.get("rgb_stats"),
        provenance=meta.get("provenance", {}),
        error=None,
    )


def birder_file_info(src: str, config: str | None, network: str | None) -> dict[str, Any]:
    """What ``info`` reports for a birder file or published name (the architecture may stay unknown)."""
    from vitreg_jax.convert.infer import describe
    from vitreg_jax.convert.mapping import normalize_keys

    resolved, bfile = read_source(src)
    arch: Architecture | None = None
    error = None
    try:
        arch = source_architecture(resolved, bfile, config, network)
    except UserError as e:
        error = str(e)
    provenance = {
        "file": bfile.path.name,
        "format": bfile.format,
        "sha256": bfile.sha256,
        "birder_version": bfile.meta.get("birder_version"),
        "key_layout": arch.layout if arch else normalize_keys(bfile.state)[1],
    }
    if resolved.name:
        provenance["published_name"] = resolved.name
    return _info_dict(
        path=str(bfile.path),
        kind=f"birder .{bfile.format}",
        vit_cfg=arch.vit_cfg if arch else None,
        describe=describe,
        network=arch.cfg["registered_name"] if arch else None,
        source=arch.source if arch else None,
        notes=arch.notes if arch else (),
        counts=[int(a.size) for a in bfile.state.values()],
        nbytes=sum(int(a.nbytes) for a in bfile.state.values()),
        dtypes=bfile.dtypes,
        signature=arch.cfg["signature"] if arch else bfile.meta.get("signature"),
        rgb_stats=arch.cfg["rgb_stats"] if arch else bfile.meta.get("rgb_stats"),
        provenance=provenance,
        error=error,
    )


def _info_dict(
    *,
    path: str,
    kind: str,
    vit_cfg: ViTConfig | None,
    describe: Callable[[ViTConfig], str],
    network: str | None,
    source: str | None,
    notes: Sequence[str],
    counts: list[int],
    nbytes: int,
    dtypes: list[str],
    signature: Any,
    rgb_stats: Any,
    provenance: Mapping[str, Any],
    error: str | None,
) -> dict[str, Any]:
    info: dict[str, Any] = {"path": path, "kind": kind, "network": network, "architecture_source": source}
    if vit_cfg is not None:
        info.update(
            summary=describe(vit_cfg),
            architecture=vit_cfg.to_dict(),
            input_size=list(vit_cfg.image_size),
            in_channels=vit_cfg.in_channels,
            num_classes=vit_cfg.num_classes,
            embedding_dim=vit_cfg.hidden_dim,
        )
    else:
        info.update(summary=None, architecture=None, architecture_error=error)
        if signature is not None:
            with contextlib.suppress(UserError):
                from vitreg_jax.convert.infer import signature_info

                size, classes, channels = signature_info(signature)
                info.update(input_size=list(size), in_channels=channels, num_classes=classes)
    info.update(
        notes=list(notes),
        parameters=sum(counts),
        tensors=len(counts),
        bytes=nbytes,
        dtypes=dtypes,
        signature=signature,
        rgb_stats=rgb_stats,
        provenance=dict(provenance),
    )
    return info


def info_text(info: Mapping[str, Any]) -> str:
    lines = [f"{info['path']} ({info['kind']})"]
    if info.get("architecture") is not None:
        lines.append(f"network       {info['network']} (from {info['architecture_source']})")
        lines.append(f"architecture  {info['summary']}")
        lines += [f"              {n}" for n in info["notes"]]
    else:
        lines.append(f"architecture  unknown: {info.get('architecture_error')}")
    lines.append(
        f"parameters    {info['parameters']:,} in {info['tensors']} tensors ({info['bytes'] / 2**20:.1f} MiB)"
    )
    lines.append(f"dtypes        {', '.join(info['dtypes'])}")
    if "input_size" in info:
        h, w = info["input_size"]
        lines.append(
            f"input size    {h}x{w}, {info['in_channels']} channels"
            + (f"; {info['num_classes']} classes" if info.get("num_classes") else "")
        )
    rgb = info.get("rgb_stats")
    if rgb:
        lines.append(f"rgb_stats     mean {_floats(rgb.get('mean'))}, std {_floats(rgb.get('std'))}")
    else:
        lines.append("rgb_stats     not recorded")
    prov = info.get("provenance") or {}
    lines.append(
        "provenance    "
        + (", ".join(f"{k} {v}" for k, v in prov.items() if v not in (None, "", [])) or "not recorded")
    )
    return "\n".join(lines)


def _floats(values: Any) -> str:
    try:
        return "(" + ", ".join(f"{float(v):.4g}" for v in values) + ")"
    except (TypeError, ValueError):
        return repr(values)
