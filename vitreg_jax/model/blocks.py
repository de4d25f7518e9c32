"""Transformer blocks: the pre-norm encoder block (attention, MLP, layer scale, drop-path) and its MLP."""

from __future__ import annotations

import jax
from flax import nnx

from vitreg_jax.model._kernels import gelu, residual_grad_boundary
from vitreg_jax.model.attention import Attention
from vitreg_jax.model.config import ViTConfig
from vitreg_jax.model.layers import LayerNorm, LayerScale, Linear, drop_path


class MLP(nnx.Module):
    """torchvision ``MLP(dim, [mlp_dim, dim], GELU)``: birder keys ``mlp.0`` (fc1) and ``mlp.3`` (fc2)."""

    def __init__(self, dim: int, mlp_dim: int, *, init: str = "torch", rngs: nnx.Rngs):
        self.fc1 = Linear(dim, mlp_dim, init=init, rngs=rngs)
        self.fc2 = Linear(mlp_dim, dim, init=init, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(gelu(self.fc1(x)))


class EncoderBlock(nnx.Module):
    """Pre-norm transformer block: ``x + DP(LS1(attn(norm1(x))))`` then ``x + DP(LS2(mlp(norm2(x))))``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_dim: int,
        *,
        eps: float,
        qkv_bias: bool = True,
        layer_scale: float | None = None,
        drop_path_rate: float = 0.0,
        attn_init: str = "trunc_normal",
        mlp_init: str = "torch",
        rngs: nnx.Rngs,
    ):
        self.norm1 = LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, init=attn_init, rngs=rngs)
        self.norm2 = LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, mlp_dim, init=mlp_init, rngs=rngs)
        self.ls1 = LayerScale(dim, layer_scale) if layer_scale is not None else None
        self.ls2 = LayerScale(dim, layer_scale) if layer_scale is not None else None
        self.drop_path_rate = drop_path_rate

    def __call__(self, x: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        k1 = k2 = None
        if dropout_key is not None and self.drop_path_rate > 0.0:
            k1, k2 = jax.random.split(dropout_key)
        x = residual_grad_boundary(x)
        y = self.attn(self.norm1(x))
        if self.ls1 is not None:
            y = self.ls1(y)
        x = residual_grad_boundary(x + drop_path(y, self.drop_path_rate, k1))
        y = self.mlp(self.norm2(x))
        if self.ls2 is not None:
            y = self.ls2(y)
        return x + drop_path(y, self.drop_path_rate, k2)


def encoder_block(cfg: ViTConfig, drop_path_rate: float, rngs: nnx.Rngs) -> EncoderBlock:
    return EncoderBlock(
        cfg.hidden_dim,
        cfg.num_heads,
        cfg.mlp_dim,
        eps=cfg.norm_layer_eps,
        qkv_bias=cfg.qkv_bias,
        layer_scale=cfg.layer_scale_init_value,
        drop_path_rate=drop_path_rate,
        rngs=rngs,
    )
