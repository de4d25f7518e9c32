"""Which birder ViT a weights file holds, when no json config comes with it.

birder's files record the input signature (size, classes, channels), ``rgb_stats`` and, only when training was
given one, an external ``config`` (partial ``model_config`` overrides); they never name the network. So the
architecture is read from the tensor shapes, and what shapes cannot tell comes from the file's ``config``,
else from the birder preset with exactly these shapes, else from birder's conventions:

=========================  ===============================================================================
from the shapes            patch size, width, layers, MLP width, registers, class token, classifier, layer
                           scale, pre-norm, final norm (per token / after pooling / none), qkv bias, input
                           channels, and the input size from the position-embedding length (or signature)
``num_heads``              birder's standard head count for the width (``standard_heads()``, taken from
                           birder's presets: 768 -> 12, 1024 -> 16, ...)
``norm_layer_eps``         1e-6, or 1e-5 with pre-norm (as in every birder ``_pn`` preset)
``layer_scale_init_value`` 1e-5 (only used to initialise; the stored gammas are loaded)
=========================  ===============================================================================

``infer_birder_config(bfile)`` returns birder's json config dict for the file (what
``vitreg_jax.convert.load`` uses when no config is given); ``infer(...)`` also says where each choice came
from.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np

from vitreg_jax.convert import mapping
from vitreg_jax.data import preprocess
from vitreg_jax.errors import UserError
from vitreg_jax.model.birder_json import DEFAULT_BIRDER_VERSION, birder_config
from vitreg_jax.model.config import ViTConfig, canonical_name, preset
from vitreg_jax.model.presets import PRESETS

if TYPE_CHECKING:
    from vitreg_jax.convert.formats.birder_file import BirderFile

# ((H, W), num_classes, in_channels) read from birder's signature
SignatureInfo: TypeAlias = tuple[tuple[int, int], int, int]

DEFAULT_EPS = 1e-6  # birder ViT's default norm_layer_eps
PRE_NORM_EPS = 1e-5  # every birder preset with pre_norm=True uses this
DEFAULT_LAYER_SCALE = 1e-5  # every birder preset with layer scale uses this
# fields the tensor shapes determine (the rest of ViTConfig's architecture needs metadata or a convention)
SHAPE_FIELDS = (
    "patch_size",
    "num_layers",
    "hidden_dim",
    "mlp_dim",
    "num_reg_tokens",
    "class_token",
    "abs_pos_embed",
    "pos_embed_special_tokens",
    "pre_norm",
    "post_norm",
    "norm_after_pool",
    "qkv_bias",
)
# architecture fields compared when naming a preset (drop path, sizes, classes and out_indices do not count)
ARCH_FIELDS = (*SHAPE_FIELDS, "num_heads", "norm_layer_eps", "layer_scale_init_value")
SOURCE_FILE_CONFIG = "the file's own config and tensor shapes"
SOURCE_SHAPES = "tensor shapes"
_BLOCK = re.compile(r"^encoder\.block\.(\d+)\.norm1\.weight$")


@dataclass(frozen=True)
class Inference:
    """A file's architecture, its birder config dict, and how each part was decided."""

    birder_config: dict[str, Any]
    vit_config: ViTConfig
    network: str  # birder's registered name for it
    exact: bool  # the preset ``network`` has exactly this architecture (else: the nearest one)
    source: str  # SOURCE_FILE_CONFIG | SOURCE_SHAPES | "--network"
    layout: str  # state_dict key layout (see mapping.normalize_keys)
    notes: tuple[str, ...] = field(default_factory=tuple)


@cache
def standard_heads() -> dict[int, int]:
    """width -> num_heads, as birder's ViT presets pair them (192 -> 3, 384 -> 6, ..., 1536 -> 24)."""
    table: dict[int, int] = {}
    for name, mc in PRESETS.items():
        if name.startswith("vit_"):
            table.setdefault(int(mc["hidden_dim"]), int(mc["num_heads"]))
    return dict(sorted(table.items()))


@cache
def _vit_presets() -> dict[str, ViTConfig]:
    return {name: preset(name) for name in PRESETS if name.startswith("vit_")}


def _arch(cfg: ViTConfig) -> dict[str, Any]:
    d = {k: getattr(cfg, k) for k in ARCH_FIELDS}
    if not cfg.abs_pos_embed:
        d["pos_embed_special_tokens"] = None  # meaningless without a position embedding
    return d


def nearest_preset(vit_cfg: ViTConfig, *, fields: tuple[str, ...] = ARCH_FIELDS) -> tuple[str, bool]:
    """(birder name, exact): the first ``vit_*`` preset equal on ``fields``, else the one equal on most."""
    want = _arch(vit_cfg)
    best, best_score = "vit_b16", -1
    for name, cfg in _vit_presets().items():
        have = _arch(cfg)
        score = (
            sum(have[k] == want[k] for k in fields)
            + (have["patch_size"] == want["patch_size"])
            + (have["hidden_dim"] == want["hidden_dim"])
        )  # size first: the closest sibling, not a stranger
        if all(have[k] == want[k] for k in fields):
            return name, True
        if score > best_score:
            best, best_score = name, score
    return best, False


def birder_network_name(registered_name: str | None, vit_cfg: ViTConfig) -> str:
    """A name birder 0.8.4 registers for this architecture: the given one when birder knows it."""
    name = canonical_name(registered_name) if registered_name else None
    if name in PRESETS and name.startswith("vit_"):
        return name
    return nearest_preset(vit_cfg)[0]


def describe(vit_cfg: ViTConfig) -> str:
    """One line: ``patch 16, 12 layers, width 768, 12 heads, MLP 3072, 4 registers + class token, ...``."""
    c = vit_cfg
    tokens = [f"{c.num_reg_tokens} register{'s' * (c.num_reg_tokens != 1)}"] if c.num_reg_tokens else []
    tokens += ["class token"] if c.class_token else ["no class token (mean-pooled)"]
    parts = [
        f"patch {c.patch_size}",
        f"{c.num_layers} layers",
        f"width {c.hidden_dim}",
        f"{c.num_heads} heads",
        f"MLP {c.mlp_dim}",
        " + ".join(tokens),
        f"input {c.image_size[0]}x{c.image_size[1]}x{c.in_channels}",
    ]
    parts.append(f"classifier {c.num_classes}" if c.num_classes else "no classifier")
    if c.layer_scale_init_value is not None:
        parts.append("layer scale")
    if c.pre_norm:
        parts.append("pre-norm")
    if not c.post_norm:
        parts.append("no final norm")
    elif c.norm_after_pool:
        parts.append("norm after pooling")
    if not c.qkv_bias:
        parts.append("no qkv bias")
    if not c.abs_pos_embed:
        parts.append("no position embedding")
    elif not c.pos_embed_special_tokens:
        parts.append("position embedding on patches only")
    if c.norm_layer_eps != DEFAULT_EPS:
        parts.append(f"norm eps {c.norm_layer_eps:g}")
    return ", ".join(parts)


# metadata ------------------------------------------------------------------------------------------------
def signature_info(signature: Any, where: str = "") -> SignatureInfo:
    """((H, W), num_classes, in_channels) from birder's signature dict; refuses a malformed one."""
    try:
        shape = signature["inputs"][0]["data_shape"]
        outputs = signature["outputs"][0]["data_shape"]
        classes = signature.get("num_labels", outputs[1] if len(outputs) > 1 else 0)
        h, w, c, n = int(shape[2]), int(shape[3]), int(shape[1]), int(classes)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError):
        raise UserError(
            f"{where}the signature {signature!r:.120} is not birder's "
            "{'inputs': [{'data_shape': [0, C, H, W]}], 'outputs': [...]}"
        ) from None
    return (h, w), n, c


def check_rgb_stats(rgb_stats: Any, where: str = "") -> dict[str, list[float]]:
    """``vitreg_jax.data.preprocess.check_rgb_stats``: what ``embed`` would refuse later is refused at
    conversion."""
    return preprocess.check_rgb_stats(rgb_stats, where)


# inference -----------------------------------------------------------------------------------------------
def infer(
    state: Mapping[str, Any],
    meta: Mapping[str, Any],
    *,
    network: str | None = None,
    path: str | Path | None = None,
) -> Inference:
    """The architecture and birder config of a state dict with birder's file metadata (``signature``,
    ``rgb_stats``, optional ``config``); ``network`` names the architecture instead of inferring it."""
    where = f"{path}: " if path is not None else ""
    if meta.get("rgb_stats") is None:
        raise UserError(
            f"{where}the file records no rgb_stats (a bare state dict?); pass birder's json config "
            "for it with --config"
        )
    rgb_stats = check_rgb_stats(meta["rgb_stats"], where)
    signature = meta.get("signature")
    sig = signature_info(signature, where) if signature is not None else None
    file_cfg = meta.get("config") if isinstance(meta.get("config"), Mapping) else {}
    state, layout = mapping.normalize_keys(state)
    shapes = {k: tuple(np.shape(v)) for k, v in state.items()}

    notes: list[str] = []
    if network is not None:
        vit_cfg, name, exact = _from_network(network, shapes, sig, where), canonical_name(network), True
        source = "--network"
    else:
        vit_cfg, name, exact, source = _from_shapes(shapes, sig, dict(file_cfg), where, notes)
    if sig is not None and sig[1] != vit_cfg.num_classes:
        raise UserError(
            f"{where}the signature says {sig[1]} classes but the weights have "
            f"{vit_cfg.num_classes} (classifier.weight)"
        )
    cfg = birder_config(
        vit_cfg, rgb_stats, name, birder_version=str(meta.get("birder_version") or DEFAULT_BIRDER_VERSION)
    )
    if signature is not None:
        cfg["signature"] = signature
    if meta.get("task") not in (None, cfg["task"]):
        raise UserError(f"{where}a birder {meta['task']!r} checkpoint, not an image-classification ViT")
    return Inference(
        birder_config=cfg,
        vit_config=vit_cfg,
        network=name,
        exact=exact,
        source=source,
        layout=layout,
        notes=tuple(notes),
    )


def infer_birder_config(bfile: BirderFile, network: str | None = None) -> dict[str, Any]:
    """birder's config dict for a ``BirderFile`` given without its json."""
    return infer(bfile.state, bfile.meta, network=network, path=bfile.path).birder_config


def _image_size(
    shapes: Mapping[str, tuple[int, ...]],
    patch: int,
    special: int,
    sig_size: tuple[int, int] | None,
    special_rows: bool | None,
    where: str,
) -> tuple[tuple[int, int], bool]:
    """(input size, pos_embed_special_tokens) from the position-embedding length and/or the signature."""
    if "pos_embedding" not in shapes:
        if sig_size is None:
            raise UserError(
                f"{where}no position embedding and no signature: the input size is unknown; pass --config"
            )
        return sig_size, True if special_rows is None else special_rows
    rows = shapes["pos_embedding"][1]
    options = [True, False] if special_rows is None else [special_rows]
    if special == 0:
        options = options[:1]
    if sig_size is not None:
        h, w = sig_size
        for opt in options:
            if rows == (h // patch) * (w // patch) + (special if opt else 0):
                return sig_size, opt
        raise UserError(
            f"{where}pos_embedding has {rows} rows, which fits neither {h}x{w} inputs with patch "
            f"{patch} nor {special} special tokens"
        )
    for opt in options:
        n = rows - (special if opt else 0)
        side = math.isqrt(max(n, 0))
        if n > 0 and side * side == n:
            return (side * patch, side * patch), opt
    raise UserError(
        f"{where}pos_embedding has {rows} rows, not a square grid (plus {special} special tokens), "
        "and the file has no signature: pass --config"
    )


def _from_network(
    network: str, shapes: Mapping[str, tuple[int, ...]], sig: SignatureInfo | None, where: str
) -> ViTConfig:
    base = preset(network)  # refuses unknown names
    num_classes = shapes["classifier.weight"][0] if "classifier.weight" in shapes else 0
    in_channels = shapes["conv_proj.weight"][1] if "conv_proj.weight" in shapes else base.in_channels
    if sig is not None:
        size = sig[0]
    elif base.abs_pos_embed:
        size, _ = _image_size(
            shapes, base.patch_size, base.num_special_tokens, None, base.pos_embed_special_tokens, where
        )
    else:
        size = base.image_size
    return base.replace(image_size=size, num_classes=num_classes, in_channels=in_channels)


def _from_shapes(
    shapes: Mapping[str, tuple[int, ...]],
    sig: SignatureInfo | None,
    file_cfg: dict[str, Any],
    where: str,
    notes: list[str],
) -> tuple[ViTConfig, str, bool, str]:
    conv = shapes.get("conv_proj.weight")
    if conv is None or len(conv) != 4 or conv[2] != conv[3]:
        found = ", ".join(list(shapes)[:6])
        raise UserError(
            f"{where}no square conv_proj.weight (D, C, p, p): not a birder ViT state dict "
            f"(keys: {found}{', ...' if len(shapes) > 6 else ''})"
        )
    hidden, in_ch, patch = conv[0], conv[1], conv[2]
    layers = sorted(int(m.group(1)) for k in shapes if (m := _BLOCK.match(k)))
    if not layers or layers != list(range(len(layers))):
        raise UserError(f"{where}encoder blocks are not numbered 0..n-1 (found {layers[:8]})")
    fc1 = shapes.get("encoder.block.0.mlp.0.weight")
    if fc1 is None or len(fc1) != 2:
        raise UserError(f"{where}no encoder.block.0.mlp.0.weight: not a birder ViT state dict")
    reg = shapes["reg_tokens"][1] if len(shapes.get("reg_tokens", ())) == 3 else 0
    mc: dict[str, Any] = {
        "patch_size": patch,
        "num_layers": len(layers),
        "hidden_dim": hidden,
        "mlp_dim": fc1[0],
        "num_reg_tokens": reg,
        "class_token": "class_token" in shapes,
        "abs_pos_embed": "pos_embedding" in shapes,
        "pre_norm": "encoder.pre_block.0.weight" in shapes,
        "post_norm": "norm.weight" in shapes or "embedding_norm.weight" in shapes,
        "norm_after_pool": "embedding_norm.weight" in shapes,
        "qkv_bias": "encoder.block.0.attn.qkv.bias" in shapes,
    }
    special = reg + int(mc["class_token"])
    size, mc["pos_embed_special_tokens"] = _image_size(
        shapes, patch, special, sig[0] if sig else None, file_cfg.get("pos_embed_special_tokens"), where
    )
    if sig is None:
        notes.append(f"input size {size[0]}x{size[1]} from the position-embedding length")
    layer_scale = "encoder.block.0.layer_scale_1.gamma" in shapes
    conflicts = [
        f"{k}={file_cfg[k]!r} (the tensors say {v!r})"
        for k, v in mc.items()
        if k in file_cfg and file_cfg[k] != v
    ]
    if conflicts:
        raise UserError(f"{where}the file's own config disagrees with its tensors: {', '.join(conflicts)}")
    num_classes = shapes["classifier.weight"][0] if "classifier.weight" in shapes else 0

    # what the shapes cannot tell: the file's config, else the preset with these shapes, else convention
    probe = ViTConfig(
        **{**mc, "num_heads": 1},
        layer_scale_init_value=DEFAULT_LAYER_SCALE if layer_scale else None,
        image_size=size,
    )
    probe_fields = SHAPE_FIELDS + (("num_heads",) if "num_heads" in file_cfg else ())
    if "num_heads" in file_cfg:
        probe = probe.replace(num_heads=int(file_cfg["num_heads"]))
    name, exact = _shape_match(probe, layer_scale, probe_fields)
    known = dict(file_cfg)
    if exact:
        p = _vit_presets()[name]
        conventions = {
            "num_heads": p.num_heads,
            "norm_layer_eps": p.norm_layer_eps,
            "layer_scale_init_value": p.layer_scale_init_value,
            "drop_path_rate": p.drop_path_rate,
        }
        origin = f"from the preset {name}, which has these shapes"
    else:
        heads = standard_heads().get(hidden)
        if heads is None and "num_heads" not in known:
            widths = ", ".join(map(str, standard_heads()))
            raise UserError(
                f"{where}cannot infer num_heads for width {hidden}: birder's presets define head "
                f"counts only for widths {widths}; pass --config JSON or --network NAME"
            )
        conventions = {
            "num_heads": heads,
            "norm_layer_eps": PRE_NORM_EPS if mc["pre_norm"] else DEFAULT_EPS,
            "layer_scale_init_value": DEFAULT_LAYER_SCALE if layer_scale else None,
            "drop_path_rate": 0.0,
        }
        origin = "birder's conventions" + (
            f" (num_heads: its standard for width {hidden})" if "num_heads" not in known else ""
        )
    filled = {k: v for k, v in conventions.items() if k not in known}
    known.update(filled)
    shown = [
        f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
        for k, v in filled.items()
        if k != "drop_path_rate" and v is not None
    ]
    if shown:
        notes.append(f"not in the weights: {', '.join(shown)}: {origin}")
    if layer_scale != (known.get("layer_scale_init_value") is not None):
        raise UserError(
            f"{where}the file's config sets layer_scale_init_value="
            f"{known.get('layer_scale_init_value')!r} but the tensors "
            f"{'have' if layer_scale else 'lack'} layer-scale gammas"
        )
    vit_cfg = ViTConfig.from_birder(
        {**known, **mc}, image_size=size, num_classes=num_classes, in_channels=in_ch
    )
    name, exact = nearest_preset(vit_cfg)
    if not exact:
        notes.append(
            f"no birder preset has this architecture; named after the nearest, {name} (the json's "
            "model_config carries the exact values)"
        )
    return vit_cfg, name, exact, SOURCE_FILE_CONFIG if file_cfg else SOURCE_SHAPES


def _shape_match(probe: ViTConfig, layer_scale: bool, fields: tuple[str, ...]) -> tuple[str, bool]:
    """The first vit preset with these shapes (and layer-scale presence)."""
    want = _arch(probe)
    for name, cfg in _vit_presets().items():
        have = _arch(cfg)
        if (
            all(have[k] == want[k] for k in fields)
            and (cfg.layer_scale_init_value is not None) == layer_scale
        ):
            return name, True
    return "", False
