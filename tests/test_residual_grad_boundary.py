"""``vitreg_jax.model._kernels.residual_grad_boundary``: an identity in value and gradient whose conditionals
survive XLA:CPU.

The boundary exists for speed (BENCHMARKS.md, "MAE train step"): it makes XLA:CPU materialise each
residual-stream gradient instead of re-fusing the running sum into every consumer. These tests fail if it ever
changes a number, or if a future XLA folds the conditionals away (then the speed-up is gone silently).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tests.support.tiny_models import TINY_NARROW_THREE_BLOCKS, tiny_vit
from vitreg_jax.model._kernels import residual_grad_boundary

jax.config.update("jax_default_matmul_precision", "highest")


def test_identity_in_value_and_gradient() -> None:
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 5, 3)), jnp.float32)
    w = jnp.asarray(np.random.default_rng(1).standard_normal((3, 3)), jnp.float32)

    def f(x: jax.Array, boundary: bool) -> jax.Array:
        y = residual_grad_boundary(x) if boundary else x
        return jnp.sum(jnp.tanh(y @ w) * y)

    np.testing.assert_array_equal(f(x, True), f(x, False))
    # both branches of the conditional (its predicate is the cotangent's first entry)
    for sign in (1.0, -1.0):
        g_with = jax.grad(lambda v, s=sign: s * f(v, True))(x)
        g_without = jax.grad(lambda v, s=sign: s * f(v, False))(x)
        np.testing.assert_array_equal(g_with, g_without)


def test_encoder_gradient_keeps_one_conditional_per_residual_add() -> None:
    model = tiny_vit(TINY_NARROW_THREE_BLOCKS, size=(16, 16))
    graphdef, params = nnx.split(model)
    x = jnp.zeros((2, 16, 16, 3), jnp.float32)

    def loss(p: nnx.State, images: jax.Array) -> jax.Array:
        return jnp.sum(nnx.merge(graphdef, p).embedding(images) ** 2)

    hlo = jax.jit(jax.grad(loss)).lower(params, x).compile().as_text()
    conditionals = len(re.findall(r" conditional\(", hlo))
    # CPU: one per residual add (two per block); other backends take the plain identity
    expected = 2 * TINY_NARROW_THREE_BLOCKS["num_layers"] if jax.default_backend() == "cpu" else 0
    assert conditionals == expected
