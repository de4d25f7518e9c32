"""birder's ``ViT`` (``vit_reg4_b16`` and its family) in flax.nnx, NHWC.

Parameter paths copy birder's state_dict names (``conv_proj``, ``class_token``, ``reg_tokens``,
``pos_embedding``, ``encoder.block[i].{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}``, ``norm``), so
the converter's table (``convert/mapping.py``) is the identity plus a few transposes.

Token order is birder's: ``[REG_0 .. REG_{r-1}, CLS, PATCH_0 ..]`` with patches in row-major order. Any input
size divisible by the patch size works (birder's ``set_dynamic_size(True)``): the patch rows of the position
embedding are resampled with torch's non-antialiased bicubic on the fly.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from vitreg_jax.errors import UserError
from vitreg_jax.model._kernels import dense
from vitreg_jax.model.blocks import encoder_block
from vitreg_jax.model.config import ViTConfig
from vitreg_jax.model.layers import LayerNorm, Linear, trunc_normal
from vitreg_jax.model.position_embedding import resample_pos_embed


class PatchProjection(nnx.Module):
    """birder's ``conv_proj`` (a stride-p conv), computed as patchify + one matmul (faster on CPU).

    ``kernel`` is HWIO, (p, p, C_in, D): birder's (D, C_in, p, p) weight transposed (2, 3, 1, 0).
    """

    def __init__(self, patch_size: int, in_channels: int, dim: int, *, use_bias: bool, rngs: nnx.Rngs):
        self.patch_size = patch_size
        fan_in = in_channels * patch_size * patch_size
        self.kernel = nnx.Param(
            trunc_normal(rngs.params(), (patch_size, patch_size, in_channels, dim), (1.0 / fan_in) ** 0.5)
        )
        self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32)) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, H, W, C) -> (B, h * w, D) tokens in row-major patch order."""
        b, hh, ww, c = x.shape
        p = self.patch_size
        h, w = hh // p, ww // p
        x = x.reshape(b, h, p, w, p, c).transpose(0, 1, 3, 2, 4, 5)  # (B, h, w, p, p, C)
        x = x.reshape(b, h * w, p * p * c)  # (B, h*w, p*p*C): matches the HWIO kernel's (kh, kw, c) order
        kernel = self.kernel[...]
        return dense(x, kernel.reshape(p * p * c, -1), None if self.bias is None else self.bias[...])


class Encoder(nnx.Module):
    """birder's ``Encoder``: optional pre-norm, then the blocks."""

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        self.pre_norm = LayerNorm(cfg.hidden_dim, eps=cfg.norm_layer_eps) if cfg.pre_norm else None
        self.block = nnx.List([encoder_block(cfg, rate, rngs) for rate in cfg.drop_path_rates()])

    def __call__(
        self,
        x: jax.Array,
        *,
        dropout_key: jax.Array | None = None,
        return_indices: tuple[int, ...] | None = None,
    ) -> jax.Array | list[jax.Array]:
        """(B, N, D) -> (B, N, D); with ``return_indices``, the outputs of those blocks as a list."""
        if self.pre_norm is not None:
            x = self.pre_norm(x)
        keys = (
            [None] * len(self.block)
            if dropout_key is None
            else list(jax.random.split(dropout_key, len(self.block)))
        )
        outs = []
        for i, (blk, key) in enumerate(zip(self.block, keys, strict=True)):
            x = blk(x, key)
            if return_indices is not None and i in return_indices:
                outs.append(x)
        return x if return_indices is None else outs


class ViT(nnx.Module):
    """birder's ``ViT`` with its methods, on NHWC float inputs."""

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d = cfg.hidden_dim
        self.conv_proj = PatchProjection(
            cfg.patch_size, cfg.in_channels, d, use_bias=not cfg.pre_norm, rngs=rngs
        )
        self.class_token = nnx.Param(jnp.zeros((1, 1, d), jnp.float32)) if cfg.class_token else None
        self.reg_tokens = (
            nnx.Param(jnp.zeros((1, cfg.num_reg_tokens, d), jnp.float32)) if cfg.num_reg_tokens > 0 else None
        )
        self.pos_embedding = (
            nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, cfg.pos_embed_len, d)))
            if cfg.abs_pos_embed
            else None
        )
        self.encoder = Encoder(cfg, rngs=rngs)
        self.norm = (
            LayerNorm(d, eps=cfg.norm_layer_eps) if cfg.post_norm and not cfg.norm_after_pool else None
        )
        self.embedding_norm = (
            LayerNorm(d, eps=cfg.norm_layer_eps) if cfg.post_norm and cfg.norm_after_pool else None
        )
        self.classifier = Linear(d, cfg.num_classes, init="zeros", rngs=rngs) if cfg.num_classes > 0 else None

    # pieces ------------------------------------------------------------------------------------------------
    def _grid(self, x: jax.Array) -> tuple[int, int]:
        if x.ndim != 4 or x.shape[-1] != self.cfg.in_channels:
            raise UserError(
                f"expected NHWC input (B, H, W, {self.cfg.in_channels}), got shape {tuple(x.shape)}"
            )
        p = self.cfg.patch_size
        if x.shape[1] % p or x.shape[2] % p:
            raise UserError(f"input size {x.shape[1]}x{x.shape[2]} is not divisible by the patch size {p}")
        return x.shape[1] // p, x.shape[2] // p

    def _pos_embed(self, grid: tuple[int, int]) -> jax.Array | None:
        """(1, L, D) for this grid: the stored rows, resampled when the grid differs (dynamic size)."""
        if self.pos_embedding is None:
            return None
        prefix = self.cfg.num_special_tokens if self.cfg.pos_embed_special_tokens else 0
        return resample_pos_embed(
            self.pos_embedding[...], self.cfg.grid_size, grid, prefix, antialias=self.cfg.pos_embed_antialias
        )

    def _special_tokens(self, batch: int, pos: jax.Array | None) -> list[jax.Array]:
        """[REG..., CLS] each (B, n, D), with their position rows added when the embedding covers them."""
        cfg = self.cfg
        with_pos = pos is not None and cfg.pos_embed_special_tokens
        out = []
        if self.reg_tokens is not None:
            reg = self.reg_tokens[...]
            if with_pos:
                reg = reg + pos[:, : cfg.num_reg_tokens]
            out.append(jnp.broadcast_to(reg, (batch, cfg.num_reg_tokens, cfg.hidden_dim)))
        if self.class_token is not None:
            cls = self.class_token[...]
            if with_pos:
                cls = cls + pos[:, cfg.num_reg_tokens : cfg.num_reg_tokens + 1]
            out.append(jnp.broadcast_to(cls, (batch, 1, cfg.hidden_dim)))
        return out

    def _patch_tokens(self, x: jax.Array, pos: jax.Array | None) -> jax.Array:
        """(B, H, W, C) -> (B, h*w, D) patch tokens with their position rows added."""
        t = self.conv_proj(x)
        if pos is not None:
            t = t + pos[:, self.cfg.num_special_tokens :] if self.cfg.pos_embed_special_tokens else t + pos
        return t

    def _tokens(self, x: jax.Array) -> jax.Array:
        """The encoder input: (B, S + h*w, D), S special tokens first."""
        pos = self._pos_embed(self._grid(x))
        return jnp.concatenate([*self._special_tokens(x.shape[0], pos), self._patch_tokens(x, pos)], axis=1)

    def _final_norm(self, x: jax.Array) -> jax.Array:
        return x if self.norm is None else self.norm(x)

    # birder's methods ------------------------------------------------------------------------------------
    def forward_features(self, x: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
        """All tokens after the final norm: (B, S + h*w, D), ``[REG..., CLS, PATCH...]``."""
        return self._final_norm(self.encoder(self._tokens(x), dropout_key=dropout_key))

    def flatten_features(self, features: jax.Array, include_special_tokens: bool = True) -> jax.Array:
        return features if include_special_tokens else features[:, self.cfg.num_special_tokens :]

    def embedding_from_features(self, features: jax.Array) -> jax.Array:
        """The pooled embedding: the CLS token, or the mean of the patch tokens without a class token."""
        if self.cfg.class_token:
            pooled = features[:, self.cfg.num_reg_tokens]
        else:
            pooled = jnp.mean(features[:, self.cfg.num_special_tokens :], axis=1)
        return pooled if self.embedding_norm is None else self.embedding_norm(pooled)

    def embedding(self, x: jax.Array) -> jax.Array:
        """(B, H, W, C) -> (B, D): birder's ``net.embedding``."""
        return self.embedding_from_features(self.forward_features(x))

    def classify(self, embedding: jax.Array) -> jax.Array:
        return embedding if self.classifier is None else self.classifier(embedding)

    def __call__(self, x: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
        """birder's ``forward``: the classifier logits, or the embedding when there is no classifier."""
        return self.classify(self.embedding_from_features(self.forward_features(x, dropout_key=dropout_key)))

    def detection_features(self, x: jax.Array) -> dict[str, jax.Array]:
        """Patch tokens of the encoder output (no final norm) as NHWC maps: ``{"stage1": (B, h, w, D)}``.

        birder returns NCHW; with ``out_indices`` there is one stage per listed block.
        """
        h, w = self._grid(x)
        tokens = self._tokens(x)
        if self.cfg.out_indices is None:
            stages = [self.encoder(tokens)]
        else:
            stages = self.encoder(tokens, return_indices=self.cfg.out_indices)
        s = self.cfg.num_special_tokens
        return {
            f"stage{i + 1}": t[:, s:].reshape(t.shape[0], h, w, t.shape[-1])  # (B, h, w, D)
            for i, t in enumerate(stages)
        }

    def masked_encoding_omission(
        self,
        x: jax.Array,
        ids_keep: jax.Array | None = None,
        return_all_features: bool = False,
        return_keys: Literal["all", "tokens", "embedding"] = "tokens",
        *,
        dropout_key: jax.Array | None = None,
    ) -> dict[str, jax.Array]:
        """Encode only the patches in ``ids_keep`` (B, n_keep) (MAE's encoder pass).

        ``tokens`` is (B, S + n_keep, D) after the final norm; with ``return_all_features`` every block's
        output is stacked on a last axis (the norm applied to the last one only), as birder does.
        """
        pos = self._pos_embed(self._grid(x))
        patches = self._patch_tokens(x, pos)  # (B, h*w, D)
        if ids_keep is not None:
            patches = jnp.take_along_axis(patches, ids_keep[:, :, None], axis=1)  # (B, n_keep, D)
        tokens = jnp.concatenate([*self._special_tokens(x.shape[0], pos), patches], axis=1)
        if return_all_features:
            xs = self.encoder(
                tokens, dropout_key=dropout_key, return_indices=tuple(range(self.cfg.num_layers))
            )
            xs[-1] = self._final_norm(xs[-1])
            out = jnp.stack(xs, axis=-1)  # (B, N, D, num_layers)
            last = out[..., -1]
        else:
            out = last = self._final_norm(self.encoder(tokens, dropout_key=dropout_key))
        result: dict[str, jax.Array] = {}
        if return_keys in ("all", "tokens"):
            result["tokens"] = out
        if return_keys in ("all", "embedding"):
            result["embedding"] = self.embedding_from_features(last)
        return result

    def adjust_size(self, new_size: tuple[int, int]) -> None:
        """Resize the stored position embedding permanently (birder's ``adjust_size``: antialiased
        bicubic)."""
        new_size = (int(new_size[0]), int(new_size[1]))
        if new_size == self.cfg.image_size:
            return
        p = self.cfg.patch_size
        if new_size[0] % p or new_size[1] % p:
            raise UserError(f"size {new_size[0]}x{new_size[1]} is not divisible by the patch size {p}")
        new_cfg = self.cfg.replace(image_size=new_size)
        if self.pos_embedding is not None:
            prefix = self.cfg.num_special_tokens if self.cfg.pos_embed_special_tokens else 0
            self.pos_embedding = nnx.Param(
                resample_pos_embed(
                    self.pos_embedding[...], self.cfg.grid_size, new_cfg.grid_size, prefix, antialias=True
                )
            )
        self.cfg = new_cfg


def num_params(net: nnx.Module) -> int:
    return sum(int(v.size) for v in jax.tree_util.tree_leaves(nnx.state(net, nnx.Param)))
