"""The building blocks of birder's ViT, written for parity first.

Every matmul goes through :func:`vitreg_jax.model._kernels.dense` or :func:`vitreg_jax.model._kernels.matmul`, whose input dtype
follows the weight's dtype: store the kernels in bfloat16 and the matmuls take bfloat16 inputs with float32
accumulation, while LayerNorm, softmax, GELU, biases and the residual stream stay float32 (the mixed path that
is fast on CPU and GPU alike). :meth:`vitreg_jax.model.precision.ComputePolicy.cast_params` stores them so, the same
way for the Embedder and the trainer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vitreg_jax.model._kernels import dense, gelu, matmul, residual_grad_boundary, softmax
from vitreg_jax.model.config import ViTConfig


def trunc_normal(key: jax.Array, shape: tuple[int, ...], std: float) -> jax.Array:
    """torch's ``trunc_normal_(std=std)``: bounds are absolute (-2, 2), so it is a plain normal in practice."""
    return jnp.clip(std * jax.random.normal(key, shape, jnp.float32), -2.0, 2.0)


def torch_linear_default(key: jax.Array, fan_in: int, shape: tuple[int, ...]) -> jax.Array:
    """torch ``nn.Linear``'s default init for weight and bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / fan_in**0.5
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


class Linear(nnx.Module):
    """A dense layer with a ``(in, out)`` kernel (birder's ``weight.T``)."""

    def __init__(self, in_dim: int, out_dim: int, *, use_bias: bool = True, init: str = "torch",
                 rngs: nnx.Rngs):
        k_w, k_b = jax.random.split(rngs.params())
        if init == "trunc_normal":  # birder 0.8.4 attention: trunc_normal_(std=0.02), zero bias
            kernel = trunc_normal(k_w, (in_dim, out_dim), 0.02)
            bias = jnp.zeros((out_dim,), jnp.float32)
        elif init == "xavier":  # birder's MAE decoder: xavier_uniform_, zero bias
            bound = (6.0 / (in_dim + out_dim)) ** 0.5
            kernel = jax.random.uniform(k_w, (in_dim, out_dim), jnp.float32, -bound, bound)
            bias = jnp.zeros((out_dim,), jnp.float32)
        elif init == "zeros":  # birder's classifier head
            kernel = jnp.zeros((in_dim, out_dim), jnp.float32)
            bias = jnp.zeros((out_dim,), jnp.float32)
        else:  # torch nn.Linear default
            kernel = torch_linear_default(k_w, in_dim, (in_dim, out_dim))
            bias = torch_linear_default(k_b, in_dim, (out_dim,))
        self.kernel = nnx.Param(kernel)
        self.bias = nnx.Param(bias) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        return dense(x, self.kernel[...], None if self.bias is None else self.bias[...])


class LayerNorm(nnx.Module):
    """torch ``nn.LayerNorm``: biased two-pass variance (not E[x^2] - E[x]^2), computed in float32."""

    def __init__(self, dim: int, *, eps: float):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        mean = jnp.mean(x, axis=-1, keepdims=True)
        centred = x - mean
        var = jnp.mean(jnp.square(centred), axis=-1, keepdims=True)  # two-pass: parity at large means
        y = centred * jax.lax.rsqrt(var + self.eps)
        return y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)


class Attention(nnx.Module):
    """Multi-head self-attention with birder's fused ``qkv`` projection (rows ordered [q; k; v], head-major)."""

    def __init__(self, dim: int, num_heads: int, *, qkv_bias: bool, init: str, rngs: nnx.Rngs):
        if dim % num_heads:
            raise ValueError(f"hidden dim {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = Linear(dim, 3 * dim, use_bias=qkv_bias, init=init, rngs=rngs)
        self.proj = Linear(dim, dim, init=init, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, c = x.shape
        h = self.num_heads
        d = c // h
        qkv = self.qkv(x).reshape(b, n, 3, h, d)  # (B, N, 3, H, Dh)
        q, k, v = jnp.transpose(qkv, (2, 0, 3, 1, 4))  # each (B, H, N, Dh)
        cdt = self.qkv.kernel[...].dtype  # bf16 weights -> bf16 attention matmuls, fp32 accumulation
        # the scale goes on q (B, H, N, Dh), not on the (B, H, N, N) logits: XLA:CPU would materialise a
        # broadcast of it the logits' size in every block, forward and backward
        logits = matmul(q * d**-0.5, jnp.swapaxes(k, -1, -2), cdt)  # (B, H, N, N)
        probs = softmax(logits)  # float32
        out = matmul(probs, v, cdt)  # (B, H, N, Dh)
        out = jnp.transpose(out, (0, 2, 1, 3)).reshape(b, n, c)  # (B, N, C)
        return self.proj(out)


class MLP(nnx.Module):
    """torchvision ``MLP(dim, [mlp_dim, dim], GELU)``: birder keys ``mlp.0`` (fc1) and ``mlp.3`` (fc2)."""

    def __init__(self, dim: int, mlp_dim: int, *, init: str = "torch", rngs: nnx.Rngs):
        self.fc1 = Linear(dim, mlp_dim, init=init, rngs=rngs)
        self.fc2 = Linear(mlp_dim, dim, init=init, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(gelu(self.fc1(x)))


class LayerScale(nnx.Module):
    def __init__(self, dim: int, init_value: float):
        self.gamma = nnx.Param(jnp.full((dim,), init_value, jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x * self.gamma[...].astype(jnp.float32)


def drop_path(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """torchvision ``StochasticDepth(rate, mode="row")``: drop whole samples, rescale the survivors."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(keep, x / (1.0 - rate), 0.0)


class EncoderBlock(nnx.Module):
    """Pre-norm transformer block: ``x + DP(LS1(attn(norm1(x))))`` then ``x + DP(LS2(mlp(norm2(x))))``."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, *, eps: float, qkv_bias: bool = True,
                 layer_scale: float | None = None, drop_path_rate: float = 0.0, attn_init: str = "trunc_normal",
                 mlp_init: str = "torch", rngs: nnx.Rngs):
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
    return EncoderBlock(cfg.hidden_dim, cfg.num_heads, cfg.mlp_dim, eps=cfg.norm_layer_eps, qkv_bias=cfg.qkv_bias,
                        layer_scale=cfg.layer_scale_init_value, drop_path_rate=drop_path_rate, rngs=rngs)
