"""Multi-head self-attention, birder's layout: one implementation for every block of every model family."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vitreg_jax.model._kernels import matmul, softmax
from vitreg_jax.model.layers import Linear


class Attention(nnx.Module):
    """Multi-head self-attention with birder's fused ``qkv`` projection (rows ordered [q; k; v],
    head-major)."""

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
