"""The one table between birder state_dict keys and vitreg-jax parameter paths, both directions, pure numpy.

Each row says: birder key, our path (a tuple, list indices as ints), and a layout change: ``linear`` (torch
``(out, in)`` weight <-> ``(in, out)`` kernel), ``conv`` (torch ``(D, C, p, p)`` <-> HWIO ``(p, p, C, D)``) or
``none``. Loading refuses missing keys, extra keys and shape mismatches, listing them all. Older birder files
use other key names (see ``LEGACY_RENAMES``); ``normalize_keys`` maps them to today's.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from vitreg_jax.errors import UserError
from vitreg_jax.model.config import ViTConfig
from vitreg_jax.tree import ParamPath, check_fit, short_list

# birder < 0.4 (nn.MultiheadAttention blocks): key suffix -> today's suffix. in_proj packs rows [q; k; v],
# head-major inside each, which is exactly the layout of today's fused qkv, so a rename is enough.
LEGACY_RENAMES: dict[str, str] = {
    "ln1.weight": "norm1.weight",
    "ln1.bias": "norm1.bias",
    "ln2.weight": "norm2.weight",
    "ln2.bias": "norm2.bias",
    "self_attention.in_proj_weight": "attn.qkv.weight",
    "self_attention.in_proj_bias": "attn.qkv.bias",
    "self_attention.out_proj.weight": "attn.proj.weight",
    "self_attention.out_proj.bias": "attn.proj.bias",
}
_BLOCK_KEY = re.compile(r"^encoder\.block\.(\d+)\.(.+)$")


@dataclass(frozen=True, slots=True)
class Row:
    birder_key: str
    path: ParamPath
    layout: str  # "none" | "linear" | "conv"
    birder_shape: tuple[int, ...]


def norm_rows(key: str, path: ParamPath, dim: int) -> list[Row]:
    """A LayerNorm's two rows (``weight`` -> ``scale``, ``bias``)."""
    return [
        Row(f"{key}.weight", (*path, "scale"), "none", (dim,)),
        Row(f"{key}.bias", (*path, "bias"), "none", (dim,)),
    ]


def linear_rows(key: str, path: ParamPath, d_in: int, d_out: int, bias: bool = True) -> list[Row]:
    """A Linear's rows: torch ``(out, in)`` weight <-> ``(in, out)`` kernel, and its bias."""
    rows = [Row(f"{key}.weight", (*path, "kernel"), "linear", (d_out, d_in))]
    return rows + ([Row(f"{key}.bias", (*path, "bias"), "none", (d_out,))] if bias else [])


def table(cfg: ViTConfig) -> list[Row]:
    """Every tensor of a birder ``ViT`` with this config, in birder's state_dict order."""
    d, p = cfg.hidden_dim, cfg.patch_size
    rows: list[Row] = []
    if cfg.class_token:
        rows.append(Row("class_token", ("class_token",), "none", (1, 1, d)))
    if cfg.num_reg_tokens:
        rows.append(Row("reg_tokens", ("reg_tokens",), "none", (1, cfg.num_reg_tokens, d)))
    if cfg.abs_pos_embed:
        rows.append(Row("pos_embedding", ("pos_embedding",), "none", (1, cfg.pos_embed_len, d)))
    rows.append(Row("conv_proj.weight", ("conv_proj", "kernel"), "conv", (d, cfg.in_channels, p, p)))
    if not cfg.pre_norm:
        rows.append(Row("conv_proj.bias", ("conv_proj", "bias"), "none", (d,)))
    if cfg.pre_norm:
        rows += norm_rows("encoder.pre_block.0", ("encoder", "pre_norm"), d)
    for i in range(cfg.num_layers):
        k, pth = f"encoder.block.{i}", ("encoder", "block", i)
        rows += norm_rows(f"{k}.norm1", (*pth, "norm1"), d)
        rows += linear_rows(f"{k}.attn.qkv", (*pth, "attn", "qkv"), d, 3 * d, cfg.qkv_bias)
        rows += linear_rows(f"{k}.attn.proj", (*pth, "attn", "proj"), d, d)
        if cfg.layer_scale_init_value is not None:
            rows.append(Row(f"{k}.layer_scale_1.gamma", (*pth, "ls1", "gamma"), "none", (d,)))
        rows += norm_rows(f"{k}.norm2", (*pth, "norm2"), d)
        rows += linear_rows(f"{k}.mlp.0", (*pth, "mlp", "fc1"), d, cfg.mlp_dim)
        rows += linear_rows(f"{k}.mlp.3", (*pth, "mlp", "fc2"), cfg.mlp_dim, d)
        if cfg.layer_scale_init_value is not None:
            rows.append(Row(f"{k}.layer_scale_2.gamma", (*pth, "ls2", "gamma"), "none", (d,)))
    if cfg.post_norm and not cfg.norm_after_pool:
        rows += norm_rows("norm", ("norm",), d)
    if cfg.post_norm and cfg.norm_after_pool:
        rows += norm_rows("embedding_norm", ("embedding_norm",), d)
    if cfg.num_classes:
        rows += linear_rows("classifier", ("classifier",), d, cfg.num_classes)
    return rows


def our_shapes(cfg: ViTConfig) -> dict[ParamPath, tuple[int, ...]]:
    """{our path: shape} of every parameter of the architecture ``cfg``, from the table alone."""
    layouts = {"linear": lambda s: s[::-1], "conv": lambda s: (s[2], s[3], s[1], s[0])}
    return {r.path: tuple(layouts.get(r.layout, lambda s: s)(r.birder_shape)) for r in table(cfg)}


def to_our_layout(a: np.ndarray, layout: str) -> np.ndarray:
    """One birder tensor in our layout."""
    if layout == "linear":
        return np.ascontiguousarray(a.T)
    if layout == "conv":
        return np.ascontiguousarray(a.transpose(2, 3, 1, 0))  # (D, C, p, p) -> (p, p, C, D)
    return a


def to_birder_layout(a: np.ndarray, layout: str) -> np.ndarray:
    """One of our arrays in birder's layout."""
    if layout == "linear":
        return np.ascontiguousarray(a.T)
    if layout == "conv":
        return np.ascontiguousarray(a.transpose(3, 2, 0, 1))  # (p, p, C, D) -> (D, C, p, p)
    return a


def normalize_keys(state: Mapping[str, Any], num_layers: int | None = None) -> tuple[dict[str, Any], str]:
    """Rename the key layouts of older birder files to today's; returns (state, layout name).

    Layouts: ``current`` (birder >= 0.4), ``pre-0.4`` (``ln1``/``self_attention``/``ln2``) and
    ``pre-0.4-encoder-norm`` (the oldest files, which also kept the final norm as ``encoder.block.<depth>``).
    """
    out: dict[str, Any] = {}
    layout = "current"
    depth = num_layers
    if depth is None:
        idx = {
            int(m.group(1))
            for k in state
            if (m := _BLOCK_KEY.match(k)) and not m.group(2).startswith(("weight", "bias"))
        }
        depth = max(idx) + 1 if idx else 0
    for key, value in state.items():
        m = _BLOCK_KEY.match(key)
        if m and m.group(2) in LEGACY_RENAMES:
            key = f"encoder.block.{m.group(1)}.{LEGACY_RENAMES[m.group(2)]}"
            layout = "pre-0.4" if layout == "current" else layout
        elif (
            m and int(m.group(1)) == depth and m.group(2) in ("weight", "bias") and "norm.weight" not in state
        ):
            key = f"norm.{m.group(2)}"
            layout = "pre-0.4-encoder-norm"
        out[key] = value
    return out, layout


def to_nnx(state: Mapping[str, Any], cfg: ViTConfig, *, consume: bool = False) -> dict[ParamPath, np.ndarray]:
    """birder state_dict (numpy arrays, any key layout) -> {our path: array}. Refuses any mismatch.

    ``consume=True`` empties ``state`` (a mutable dict) and drops each source array as soon as it is
    converted, so a transposed copy never coexists with the whole source: peak memory stays near one copy.
    """
    source = state
    state, _ = normalize_keys(state, cfg.num_layers)
    rows = table(cfg)
    check_fit(state, {r.birder_key: r.birder_shape for r in rows}, "weights do not fit the architecture")
    if not consume:
        return {r.path: to_our_layout(np.asarray(state[r.birder_key]), r.layout) for r in rows}
    source.clear()  # type: ignore[attr-defined]
    return {r.path: to_our_layout(np.asarray(state.pop(r.birder_key)), r.layout) for r in rows}


def to_birder(
    params: Mapping[ParamPath, Any], cfg: ViTConfig, *, consume: bool = False
) -> dict[str, np.ndarray]:
    """{our path: array} -> birder state_dict (today's key names, birder's order).

    ``consume=True`` pops each entry from ``params`` (a mutable dict) as it is converted (see ``to_nnx``).
    """
    rows = table(cfg)
    missing = [".".join(map(str, r.path)) for r in rows if r.path not in params]
    if missing:
        raise UserError(f"parameters lack {len(missing)} entr(ies): {short_list(missing)}")
    if consume:
        return {
            # type: ignore[attr-defined]
            r.birder_key: to_birder_layout(np.asarray(params.pop(r.path)), r.layout)
            for r in rows
        }
    return {r.birder_key: to_birder_layout(np.asarray(params[r.path]), r.layout) for r in rows}
