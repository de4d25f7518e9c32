"""birder's ``MAE_ViT`` (masked autoencoder pre-training of a ViT) in flax.nnx, NHWC.

The pieces follow ``birder/net/mim/mae_vit.py`` and ``birder/common/masking.py`` (0.8.4):

* :func:`random_masking`: per-sample uniform masking from a JAX key (argsort of uniform noise), returning
  the kept indices, the restore indices and the mask (1 = masked). Masks are inputs to :class:`MAE`, so a
  test can inject birder's.
* :func:`patchify` / :func:`unpatchify`: birder's patch vector order ``(p, q, c)``, channel fastest.
* :class:`MAE`: the encoder (a :class:`~vitreg_jax.model.vit.ViT`, run on the kept patches only), the decoder
  (``decoder_embed``, ``mask_token``, a fixed 2-D sin-cos ``decoder_pos_embed`` with zero rows for the special
  tokens, ``decoder`` = blocks + LayerNorm + prediction ``Linear``) and the loss on masked patches only.

Parameter paths copy birder's MAE state_dict (``decoder.{i}`` is block ``i``, then the norm, then the
prediction layer), so birder's MAE keys map to ours by the encoder table plus a few rows.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vitreg_jax.errors import UserError
from vitreg_jax.model.blocks import EncoderBlock
from vitreg_jax.model.layers import LayerNorm, Linear, trunc_normal
from vitreg_jax.model.vit import ViT
from vitreg_jax.pretraining.config import MAEConfig

# birder: nn.LayerNorm(decoder_embed_dim, eps=1e-6) after the decoder blocks (the blocks use the encoder's
# eps)
DECODER_NORM_EPS = 1e-6
# birder's norm_pix_loss: (target - mean) / (var + 1e-6) ** 0.5, var unbiased
NORM_PIX_EPS = 1e-6
SINCOS_TEMPERATURE = 10000


class Buffer(nnx.Variable):
    """A non-trainable array that belongs to the model (torch ``nn.Buffer``): not optimised, not decayed."""


# what an MAE's weights are (parameters and buffers): ``get_params(mae, MAE_STATE)`` / ``set_params(...,
# kinds=MAE_STATE)``
MAE_STATE = (nnx.Param, Buffer)


class Masks(NamedTuple):
    """One MAE mask per sample: ``ids_keep`` (B, K) int32, ``ids_restore`` (B, L) int32, ``mask`` (B, L)
    f32."""

    ids_keep: jax.Array
    ids_restore: jax.Array
    mask: jax.Array


def num_kept(seq_len: int, mask_ratio: float) -> int:
    """birder's ``len_keep = int(seq_len * (1 - mask_ratio))``."""
    return int(seq_len * (1 - mask_ratio))


def masks_from_noise(
    noise: jax.Array, mask_ratio: float, *, grid: tuple[int, int] | None = None, min_mask_size: int = 1
) -> Masks:
    """birder's ``uniform_mask`` for given noise: the patches (or blocks) with the smallest noise are kept.

    ``min_mask_size`` = 1: ``noise`` is (B, L), one value per patch. ``min_mask_size`` = m > 1: whole m x m
    blocks of patches are kept or masked; ``noise`` is (B, (h/m) * (w/m)), one value per block of the
    ``grid`` (h, w), and the kept patches are ordered by their block's noise as birder orders them.
    """
    b, n = noise.shape
    keep = num_kept(n, mask_ratio)  # patches, or blocks
    ids_shuffle = jnp.argsort(noise, axis=1).astype(jnp.int32)  # (B, n) ascending: first `keep` are kept
    ids_restore = jnp.argsort(ids_shuffle, axis=1).astype(jnp.int32)  # (B, n) rank of each patch / block
    mask = (ids_restore >= keep).astype(
        jnp.float32
    )  # (B, n) 1 = masked, the same as gathering [0]*keep+[1]*rest
    if min_mask_size == 1:
        return Masks(ids_keep=ids_shuffle[:, :keep], ids_restore=ids_restore, mask=mask)
    if grid is None:
        raise UserError("masks_from_noise: min_mask_size > 1 needs the patch grid")
    m = min_mask_size
    h, w = grid
    if h % m or w % m or n != (h // m) * (w // m):
        raise UserError(
            f"masks_from_noise: a {h}x{w} patch grid does not split into {m}x{m} blocks for {n} noise values"
        )

    def fine(
        coarse: jax.Array,
    ) -> jax.Array:  # (B, h/m * w/m) -> (B, h * w), each block's value on its patches
        x = coarse.reshape(b, h // m, 1, w // m, 1)  # (B, h/m, 1, w/m, 1)
        return jnp.broadcast_to(x, (b, h // m, m, w // m, m)).reshape(b, h * w)

    mask = fine(mask)  # (B, L)
    # birder: argsort(mask * 2 + noise per patch): the kept blocks first, ordered by their noise
    ids_shuffle = jnp.argsort(mask * 2 + fine(noise), axis=1).astype(jnp.int32)  # (B, L)
    ids_restore = jnp.argsort(ids_shuffle, axis=1).astype(jnp.int32)  # (B, L)
    return Masks(ids_keep=ids_shuffle[:, : keep * m * m], ids_restore=ids_restore, mask=mask)


def random_masking(
    key: jax.Array,
    batch: int,
    seq_len: int,
    mask_ratio: float,
    *,
    grid: tuple[int, int] | None = None,
    min_mask_size: int = 1,
) -> Masks:
    """Per-sample uniform random masking: ``int(seq_len * (1 - mask_ratio))`` patches kept per sample (with
    ``min_mask_size`` m > 1, that many m x m blocks of the ``grid`` instead, ``seq_len`` / m^2 of them)."""
    n = seq_len // (min_mask_size * min_mask_size)
    noise = jax.random.uniform(key, (batch, n), jnp.float32)  # (B, n)
    return masks_from_noise(noise, mask_ratio, grid=grid, min_mask_size=min_mask_size)


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
    """(B, H, W, C) -> (B, h*w, p*p*C), patches row-major, each vector in birder's (p, q, c) order."""
    b, hh, ww, c = images.shape
    p = patch_size
    if hh % p or ww % p:
        raise UserError(f"image size {hh}x{ww} is not divisible by the patch size {p}")
    h, w = hh // p, ww // p
    x = images.reshape(b, h, p, w, p, c)  # (B, h, p, w, q, C)
    x = x.transpose(0, 1, 3, 2, 4, 5)  # (B, h, w, p, q, C): birder's einsum "nchpwq->nhwpqc" in NHWC terms
    return x.reshape(b, h * w, p * p * c)  # (B, L, p*p*C)


def unpatchify(patches: jax.Array, patch_size: int, grid: tuple[int, int], channels: int = 3) -> jax.Array:
    """(B, h*w, p*p*C) -> (B, H, W, C), the inverse of :func:`patchify`."""
    b = patches.shape[0]
    h, w = grid
    p = patch_size
    x = patches.reshape(b, h, w, p, p, channels)  # (B, h, w, p, q, C)
    x = x.transpose(0, 1, 3, 2, 4, 5)  # (B, h, p, w, q, C)
    return x.reshape(b, h * p, w * p, channels)  # (B, H, W, C)


def sincos_pos_embed_2d(
    grid: tuple[int, int],
    dim: int,
    num_special_tokens: int,
    *,
    include_frequency_endpoint: bool = False,
    temperature: int = SINCOS_TEMPERATURE,
) -> np.ndarray:
    """birder's ``pos_embedding_sin_cos_2d``: (S + h*w, dim) float32, zero rows for the S special tokens.

    Each patch row is ``[sin(x w), cos(x w), sin(y w), cos(y w)]`` with x the column, y the row (row-major
    patches) and ``w_i = 1 / temperature ** (i / den)``, ``den = dim//4`` (0.8.4) or ``dim//4 - 1`` (the
    older code, ``include_frequency_endpoint``). Computed in float32 like torch's.
    """
    h, w = grid
    pos_dim = dim // 4
    den = pos_dim - 1 if include_frequency_endpoint else pos_dim
    exponent = np.arange(pos_dim, dtype=np.float32) / np.float32(den)  # (dim/4,)
    # torch rounds temperature ** exponent to float32 (correctly, unlike numpy's float32 pow), then divides
    omega = np.float32(1.0) / (float(temperature) ** exponent.astype(np.float64)).astype(np.float32)
    y, x = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")  # (h, w) each: row, column
    y = y.reshape(-1, 1).astype(np.float32) * omega[None, :]  # (h*w, dim/4)
    x = x.reshape(-1, 1).astype(np.float32) * omega[None, :]  # (h*w, dim/4)
    pe = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)  # (h*w, dim): column first
    return np.concatenate([np.zeros((num_special_tokens, dim), np.float32), pe], axis=0).astype(np.float32)


class MAE(nnx.Module):
    """birder's ``MAE_ViT`` around a :class:`ViT` encoder (NHWC inputs at the encoder's ``image_size``)."""

    def __init__(self, encoder: ViT, cfg: MAEConfig, *, rngs: nnx.Rngs):
        vcfg = encoder.cfg
        self.encoder = encoder
        self.cfg = cfg
        self.patch_size = vcfg.patch_size
        self.in_channels = vcfg.in_channels
        self.image_size = vcfg.image_size
        d = cfg.decoder_embed_dim
        s = vcfg.num_special_tokens
        grid = vcfg.grid_size
        if grid[0] % cfg.min_mask_size or grid[1] % cfg.min_mask_size:
            raise UserError(
                f"MAE: min_mask_size {cfg.min_mask_size} does not divide the {grid[0]}x{grid[1]} patch grid"
            )
        self.decoder_embed = Linear(
            vcfg.hidden_dim, d, init="xavier", rngs=rngs
        )  # xavier_uniform_, zero bias
        self.mask_token = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, 1, d), jnp.float32))
        if cfg.learnable_pos_embed:
            self.decoder_pos_embed = nnx.Param(
                trunc_normal(rngs.params(), (1, s + grid[0] * grid[1], d), 0.02)
            )
        else:  # a buffer in birder (in its state_dict, never trained); shape (S + L, D) as birder's
            self.decoder_pos_embed = Buffer(
                jnp.asarray(
                    sincos_pos_embed_2d(grid, d, s, include_frequency_endpoint=cfg.include_frequency_endpoint)
                )
            )
        # birder's decoder_block: 16 heads, mlp 4x, the encoder's norm eps, exact GELU; MAE re-inits every
        # Linear with xavier_uniform_ and zero bias
        layers: list[nnx.Module] = [
            EncoderBlock(
                d,
                cfg.decoder_num_heads,
                4 * d,
                eps=vcfg.norm_layer_eps,
                attn_init="xavier",
                mlp_init="xavier",
                rngs=rngs,
            )
            for _ in range(cfg.decoder_depth)
        ]
        layers.append(LayerNorm(d, eps=DECODER_NORM_EPS))
        layers.append(Linear(d, self.patch_size**2 * self.in_channels, init="xavier", rngs=rngs))
        self.decoder = nnx.List(layers)

    @property
    def grid(self) -> tuple[int, int]:
        return (self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size)

    @property
    def seq_len(self) -> int:
        h, w = self.grid
        return h * w

    def random_masks(self, key: jax.Array, batch: int) -> Masks:
        return random_masking(
            key,
            batch,
            self.seq_len,
            self.cfg.mask_ratio,
            grid=self.grid,
            min_mask_size=self.cfg.min_mask_size,
        )

    def forward_decoder(self, latent: jax.Array, ids_restore: jax.Array) -> jax.Array:
        """(B, S + K, E) encoder tokens -> (B, L, p*p*C) pixel predictions for every patch."""
        s = self.encoder.cfg.num_special_tokens
        x = self.decoder_embed(latent)  # (B, S + K, D)
        b, _, d = x.shape
        n_mask = ids_restore.shape[1] - (x.shape[1] - s)
        mask_tokens = jnp.broadcast_to(self.mask_token[...].astype(x.dtype), (b, n_mask, d))  # (B, L - K, D)
        patches = jnp.concatenate([x[:, s:], mask_tokens], axis=1)  # (B, L, D) in shuffled order
        patches = jnp.take_along_axis(patches, ids_restore[:, :, None], axis=1)  # (B, L, D) un-shuffled
        x = jnp.concatenate([x[:, :s], patches], axis=1)  # (B, S + L, D)
        x = x + self.decoder_pos_embed[...].astype(jnp.float32).reshape(1, -1, d)
        for layer in self.decoder:
            x = layer(x)
        return x[:, s:]  # (B, L, p*p*C)

    def forward_loss(self, images: jax.Array, pred: jax.Array, mask: jax.Array) -> jax.Array:
        """Mean squared error over the masked patches only (optionally on per-patch normalised targets)."""
        target = patchify(images.astype(jnp.float32), self.patch_size)  # (B, L, p*p*C)
        if self.cfg.norm_pix_loss:
            mean = jnp.mean(target, axis=-1, keepdims=True)
            var = jnp.var(target, axis=-1, keepdims=True, ddof=1)  # torch's .var(): unbiased
            target = (target - mean) / jnp.sqrt(var + NORM_PIX_EPS)
        per_patch = jnp.mean(jnp.square(pred - target), axis=-1)  # (B, L)
        return jnp.sum(per_patch * mask) / jnp.sum(mask)

    def __call__(
        self,
        images: jax.Array,
        masks: Masks | None = None,
        *,
        key: jax.Array | None = None,
        dropout_key: jax.Array | None = None,
    ) -> dict[str, jax.Array]:
        """birder's ``forward``: ``{"loss", "pred", "mask"}`` for NHWC images at the encoder's size.

        Pass ``masks`` (e.g. birder's, or from :func:`random_masking`) or a ``key`` to draw them from.
        """
        if images.ndim != 4 or tuple(images.shape[1:3]) != tuple(self.image_size):
            raise UserError(
                f"MAE expects (B, {self.image_size[0]}, {self.image_size[1]}, {self.in_channels}) "
                f"inputs, got {tuple(images.shape)}"
            )
        if masks is None:
            if key is None:
                raise UserError("MAE needs masks or a PRNG key to draw them")
            masks = self.random_masks(key, images.shape[0])
        latent = self.encoder.masked_encoding_omission(images, masks.ids_keep, dropout_key=dropout_key)[
            "tokens"
        ]
        pred = self.forward_decoder(latent, masks.ids_restore)
        loss = self.forward_loss(images, pred, masks.mask)
        return {"loss": loss, "pred": pred, "mask": masks.mask}
