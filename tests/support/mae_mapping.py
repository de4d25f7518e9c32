"""birder ``MAE_ViT`` state_dict keys <-> vitreg-jax ``MAE`` paths: the encoder table plus the decoder rows.

birder's MAE state_dict holds ``encoder.<every encoder key>`` (the encoder table of ``mapping``, prefixed),
``mask_token``, ``decoder_pos_embed`` (a buffer for the fixed sin-cos embedding, a parameter for ``_lpe``),
``decoder_embed.*``, ``decoder.{i}.*`` for the blocks, ``decoder.{depth}`` (LayerNorm) and
``decoder.{depth + 1}`` (the pixel prediction Linear). Our paths have the same names, so each row is a
rename of the separator plus the same layouts as the encoder table. Pure numpy, both directions.

The tests use it to move weights between birder's ``MAE_ViT`` and ours; the package itself never needs it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from vitreg_jax.convert import mapping
from vitreg_jax.convert.mapping import Row, linear_rows, norm_rows, to_birder_layout, to_our_layout
from vitreg_jax.errors import UserError
from vitreg_jax.model.config import ViTConfig
from vitreg_jax.pretraining.config import MAEConfig
from vitreg_jax.tree import ParamPath, check_fit, short_list

ENCODER_PREFIX = "encoder."


def decoder_table(vit_cfg: ViTConfig, mae_cfg: MAEConfig) -> list[Row]:
    """The MAE's own tensors (everything but the encoder), in birder's state_dict order."""
    d, e = mae_cfg.decoder_embed_dim, vit_cfg.hidden_dim
    seq = vit_cfg.num_special_tokens + vit_cfg.grid_size[0] * vit_cfg.grid_size[1]
    pos_shape = (1, seq, d) if mae_cfg.learnable_pos_embed else (seq, d)
    rows = [
        Row("mask_token", ("mask_token",), "none", (1, 1, d)),
        Row("decoder_pos_embed", ("decoder_pos_embed",), "none", pos_shape),
    ]
    rows += linear_rows("decoder_embed", ("decoder_embed",), e, d)
    for i in range(mae_cfg.decoder_depth):
        k, pth = f"decoder.{i}", ("decoder", i)
        rows += norm_rows(f"{k}.norm1", (*pth, "norm1"), d)
        rows += linear_rows(f"{k}.attn.qkv", (*pth, "attn", "qkv"), d, 3 * d)
        rows += linear_rows(f"{k}.attn.proj", (*pth, "attn", "proj"), d, d)
        rows += norm_rows(f"{k}.norm2", (*pth, "norm2"), d)
        rows += linear_rows(f"{k}.mlp.0", (*pth, "mlp", "fc1"), d, 4 * d)
        rows += linear_rows(f"{k}.mlp.3", (*pth, "mlp", "fc2"), 4 * d, d)
    depth = mae_cfg.decoder_depth
    rows += norm_rows(f"decoder.{depth}", ("decoder", depth), d)
    rows += linear_rows(
        f"decoder.{depth + 1}", ("decoder", depth + 1), d, vit_cfg.patch_size**2 * vit_cfg.in_channels
    )
    return rows


def table(vit_cfg: ViTConfig, mae_cfg: MAEConfig) -> list[Row]:
    """Every tensor of a birder ``MAE_ViT`` with this encoder and decoder."""
    enc = [
        Row(ENCODER_PREFIX + r.birder_key, ("encoder", *r.path), r.layout, r.birder_shape)
        for r in mapping.table(vit_cfg)
    ]
    dec = decoder_table(vit_cfg, mae_cfg)
    return dec[:2] + enc + dec[2:]  # birder's order: own tensors, then encoder, decoder_embed, decoder


def split_encoder(state: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(encoder state_dict with the ``encoder.`` prefix removed, the rest): birder's encoder-only file."""
    enc = {k[len(ENCODER_PREFIX) :]: v for k, v in state.items() if k.startswith(ENCODER_PREFIX)}
    rest = {k: v for k, v in state.items() if not k.startswith(ENCODER_PREFIX)}
    return enc, rest


def to_nnx(state: Mapping[str, Any], vit_cfg: ViTConfig, mae_cfg: MAEConfig) -> dict[ParamPath, np.ndarray]:
    """birder MAE state_dict (numpy arrays) -> {our path: array}. The encoder part goes through the encoder
    table (so older encoder key layouts load too); refuses missing, extra and mis-shaped tensors."""
    enc_state, rest = split_encoder(state)
    out = {("encoder", *p): v for p, v in mapping.to_nnx(enc_state, vit_cfg).items()}
    rows = decoder_table(vit_cfg, mae_cfg)
    check_fit(rest, {r.birder_key: r.birder_shape for r in rows}, "MAE weights do not fit the architecture")
    out.update({r.path: to_our_layout(np.asarray(rest[r.birder_key]), r.layout) for r in rows})
    return out


def to_birder(
    params: Mapping[ParamPath, Any], vit_cfg: ViTConfig, mae_cfg: MAEConfig
) -> dict[str, np.ndarray]:
    """{our path: array} (including ``decoder_pos_embed``) -> birder MAE state_dict, birder's key order."""
    rows = table(vit_cfg, mae_cfg)
    missing = [".".join(map(str, r.path)) for r in rows if r.path not in params]
    if missing:
        raise UserError(f"MAE parameters lack {len(missing)} entr(ies): {short_list(missing)}")
    return {r.birder_key: to_birder_layout(np.asarray(params[r.path]), r.layout) for r in rows}
