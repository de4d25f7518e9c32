"""The layers of birder's ViT, written for parity first: linear, LayerNorm, layer scale, drop-path, and
birder's init distributions.

Every matmul goes through :mod:`vitreg_jax.model._kernels`, whose matmul dtype follows the weight's: the
compute policy (:mod:`vitreg_jax.model.precision`) decides it by casting the kernels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vitreg_jax.model._kernels import dense


def trunc_normal(key: jax.Array, shape: tuple[int, ...], std: float) -> jax.Array:
    """torch's ``trunc_normal_(std=std)``: bounds are absolute (-2, 2), so it is a plain normal in
    practice."""
    return jnp.clip(std * jax.random.normal(key, shape, jnp.float32), -2.0, 2.0)


def torch_linear_default(key: jax.Array, fan_in: int, shape: tuple[int, ...]) -> jax.Array:
    """torch ``nn.Linear``'s default init for weight and bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / fan_in**0.5
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


class Linear(nnx.Module):
    """A dense layer with a ``(in, out)`` kernel (birder's ``weight.T``)."""

    def __init__(
        self, in_dim: int, out_dim: int, *, use_bias: bool = True, init: str = "torch", rngs: nnx.Rngs
    ):
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
