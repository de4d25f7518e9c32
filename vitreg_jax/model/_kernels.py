"""The numerical kernels of the encoder, with the gradients written out where XLA:CPU needs help.

Each function's value is the plain JAX expression (what the parity tests hold against birder); the custom
gradients only change how the backward pass is computed, for speed (BENCHMARKS.md, "MAE train step"):

- :func:`dense` and :func:`matmul`: the matmul dtype follows the weights (bf16 inputs with float32
  accumulation, or float32: :class:`vitreg_jax.model.precision.ComputePolicy` casts the kernels); in bf16 the
  gradient
  matmuls are bf16 too, as under torch's autocast.
- :func:`softmax`, :func:`gelu`: single-pass gradients from the saved output / input.
- :func:`residual_grad_boundary`: one buffer per residual-stream gradient on CPU.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp


def dense(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """``x @ kernel + bias`` with the matmul in the kernel's dtype and a float32 result."""
    y = matmul(x, kernel, kernel.dtype, shared_rhs=True)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y


def matmul(a: jax.Array, b: jax.Array, dtype: jnp.dtype, *, shared_rhs: bool = False) -> jax.Array:
    """``a @ b`` with both inputs cast to ``dtype`` and a float32 result (float32 accumulation).

    ``a`` is (..., m, k); ``b`` is (k, n) when ``shared_rhs`` (a weight), else (..., k, n) batched like ``a``.
    """
    dtype = jnp.dtype(dtype)
    if dtype == jnp.float32:
        return jnp.matmul(a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)
    return _low_precision_matmul(a, b, dtype, shared_rhs)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _low_precision_matmul(a: jax.Array, b: jax.Array, dtype: jnp.dtype, shared_rhs: bool) -> jax.Array:
    """The low-precision ``matmul``; its gradient also multiplies in ``dtype``.

    JAX's own transpose would multiply the float32 cotangent by the bf16 operands (a float32 matmul on
    CPU, half the speed, plus casts of the operands back to float32); casting the cotangent first, as
    torch's autocast backward does, keeps both gradient matmuls on the bf16 units with float32 accumulation.
    """
    return jnp.matmul(a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


def _low_precision_matmul_fwd(
    a: jax.Array, b: jax.Array, dtype: jnp.dtype, shared_rhs: bool
) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    ac, bc = a.astype(dtype), b.astype(dtype)
    y = jnp.matmul(ac, bc, preferred_element_type=jnp.float32)
    # zero-size arrays carry the input dtypes (residuals must be arrays)
    return y, (ac, bc, jnp.zeros((0,), a.dtype), jnp.zeros((0,), b.dtype))


def _low_precision_matmul_bwd(
    dtype: jnp.dtype, shared_rhs: bool, res: tuple[jax.Array, ...], g: jax.Array
) -> tuple[jax.Array, jax.Array]:
    ac, bc, a_dtype, b_dtype = res
    gc = g.astype(dtype)
    da = jnp.matmul(gc, jnp.swapaxes(bc, -1, -2), preferred_element_type=jnp.float32)  # (..., m, k)
    if shared_rhs:  # sum over every leading dimension of a
        db = jnp.einsum("...i,...o->io", ac, gc, preferred_element_type=jnp.float32)  # (k, n)
    else:
        db = jnp.matmul(jnp.swapaxes(ac, -1, -2), gc, preferred_element_type=jnp.float32)  # (..., k, n)
    return da.astype(a_dtype.dtype), db.astype(b_dtype.dtype)


_low_precision_matmul.defvjp(_low_precision_matmul_fwd, _low_precision_matmul_bwd)


@jax.custom_vjp
def residual_grad_boundary(x: jax.Array) -> jax.Array:
    """Identity whose cotangent XLA:CPU must materialise: one buffer per residual-stream gradient.

    Without it, XLA:CPU fuses the running sum of the residual stream's gradient (one term per LayerNorm
    below) into every consumer and recomputes it there: quadratic in depth, a fifth of an MAE train step on
    ``vit_reg4_b16`` (BENCHMARKS.md, "MAE train step"). ``lax.optimization_barrier`` does not help on CPU
    (XLA:CPU strips it before fusion); a conditional is a fusion boundary that survives. Other backends
    get the plain identity (a conditional would wait for its predicate on the host there). Forward: free.
    """
    return x


def _residual_grad_boundary_fwd(x: jax.Array) -> tuple[jax.Array, None]:
    return x, None


def _materialize(g: jax.Array) -> jax.Array:
    # Both branches return g. XLA folds a conditional away when its predicate is constant or its branches are
    # the same computation, hence a data-dependent predicate and a second branch spelled differently.
    # (tests/test_residual_grad_boundary.py checks that the conditionals survive compilation.)
    return jax.lax.cond(g.reshape(-1)[0] > 0, lambda t: t, lambda t: jax.lax.neg(jax.lax.neg(t)), g)


def _residual_grad_boundary_bwd(_: None, g: jax.Array) -> tuple[jax.Array]:
    return (jax.lax.platform_dependent(g, cpu=_materialize, default=lambda t: t),)


residual_grad_boundary.defvjp(_residual_grad_boundary_fwd, _residual_grad_boundary_bwd)


@jax.custom_vjp
def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU, as birder's ``nn.GELU()``; the value is ``jax.nn.gelu(x, approximate=False)``.

    The gradient is written out, ``g * (Phi(x) + x * phi(x))`` from the saved input in one pass: autodiff's
    version evaluates erf in several fusions (BENCHMARKS.md, "MAE train step").
    """
    return jax.nn.gelu(x, approximate=False)


def _gelu_fwd(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    return jax.nn.gelu(x, approximate=False), x


def _gelu_bwd(x: jax.Array, g: jax.Array) -> tuple[jax.Array]:
    cdf = 0.5 * (1.0 + jax.lax.erf(x * (2.0**-0.5)))
    pdf = jnp.exp(-0.5 * jnp.square(x)) * (2.0 * jnp.pi) ** -0.5
    return (g * (cdf + x * pdf),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


@jax.custom_vjp
def softmax(x: jax.Array) -> jax.Array:
    """Softmax over the last axis; the value is ``jax.nn.softmax(x, axis=-1)``.

    The gradient is ``p * (g - sum(g * p))`` from the saved output: JAX's default derivation goes through
    the unnormalised exponentials and makes XLA:CPU materialise an (..., N, N) broadcast per attention layer.
    """
    return jax.nn.softmax(x, axis=-1)


def _softmax_fwd(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    p = jax.nn.softmax(x, axis=-1)
    return p, p


def _softmax_bwd(p: jax.Array, g: jax.Array) -> tuple[jax.Array]:
    return (p * (g - jnp.sum(g * p, axis=-1, keepdims=True)),)


softmax.defvjp(_softmax_fwd, _softmax_bwd)
