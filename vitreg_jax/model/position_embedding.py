"""Position-embedding resampling that reproduces torch's ``F.interpolate(mode="bicubic")`` both ways.

birder resizes the patch part of the learned position embedding in two ways:

* dynamic size (every forward at a size other than the stored one): ``antialias=False``: Keys cubic with
  a = -0.75, source coordinate ``(dst + 0.5) * in / out - 0.5``, taps clamped to the border, no renormalising.
  ``jax.image.resize`` has no such mode.
* ``adjust_size`` (once, permanently): ``antialias=True``: a = -0.5, support widened by the scale when
  downsampling, out-of-range taps dropped and the weights renormalised.

Both are separable, so each becomes a small (out, in) matrix built in float64 with numpy at trace time and
applied with two float32 contractions at full precision.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel with parameter ``a``."""
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
    return np.where(x <= 1.0, near, np.where(x < 2.0, far, 0.0))


@functools.lru_cache(maxsize=64)
def bicubic_matrix(in_size: int, out_size: int, antialias: bool) -> np.ndarray:
    """The (out_size, in_size) matrix of torch's 1-D bicubic resize (align_corners=False)."""
    scale = in_size / out_size
    m = np.zeros((out_size, in_size), np.float64)
    if not antialias:
        for i in range(out_size):
            src = (i + 0.5) * scale - 0.5  # no clamp of negative coordinates for cubic
            base = math.floor(src)
            t = src - base
            for k, w in zip(
                range(-1, 3), _cubic(np.array([t + 1.0, t, 1.0 - t, 2.0 - t]), -0.75), strict=True
            ):
                m[i, min(max(base + k, 0), in_size - 1)] += w  # taps clamped to the border
        return m
    support = 2.0 * max(scale, 1.0)
    inv = 1.0 / max(scale, 1.0)
    for i in range(out_size):
        centre = scale * (i + 0.5)
        lo = max(int(centre - support + 0.5), 0)
        hi = min(int(centre + support + 0.5), in_size)
        j = np.arange(lo, hi)
        w = _cubic((j - centre + 0.5) * inv, -0.5)
        m[i, lo:hi] = w / w.sum()  # out-of-range taps dropped, weights renormalised
    return m


def resize_grid(grid: jax.Array, new_hw: tuple[int, int], *, antialias: bool) -> jax.Array:
    """Resize a (gh, gw, C) grid to (new_h, new_w, C) exactly as torch's bicubic interpolate."""
    gh, gw, _ = grid.shape
    mh = jnp.asarray(bicubic_matrix(gh, new_hw[0], antialias), jnp.float32)  # (new_h, gh)
    mw = jnp.asarray(bicubic_matrix(gw, new_hw[1], antialias), jnp.float32)  # (new_w, gw)
    hi = jax.lax.Precision.HIGHEST
    out = jnp.einsum("ih,hwc->iwc", mh, grid.astype(jnp.float32), precision=hi)  # (new_h, gw, C)
    return jnp.einsum("jw,iwc->ijc", mw, out, precision=hi)  # (new_h, new_w, C)


def resample_pos_embed(
    pos: jax.Array,
    old_grid: tuple[int, int],
    new_grid: tuple[int, int],
    num_prefix_tokens: int,
    *,
    antialias: bool,
) -> jax.Array:
    """birder's ``adjust_position_embedding``: keep the prefix rows, resize the patch rows.

    ``pos`` is (1, num_prefix_tokens + gh * gw, C); the result is (1, num_prefix_tokens + nh * nw, C).
    """
    if tuple(old_grid) == tuple(new_grid):
        return pos
    c = pos.shape[-1]
    prefix, patches = pos[:, :num_prefix_tokens], pos[:, num_prefix_tokens:]
    grid = patches.reshape(old_grid[0], old_grid[1], c)  # (gh, gw, C), row-major patch order
    grid = resize_grid(grid, new_grid, antialias=antialias).astype(pos.dtype)
    return jnp.concatenate([prefix, grid.reshape(1, new_grid[0] * new_grid[1], c)], axis=1)
