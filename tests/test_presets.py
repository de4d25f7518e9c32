"""Every registered preset, cheaply, as timm's test_models.py does over ``list_models()``: the model builds
abstractly, its forward gives one embedding per image at the preset's own image size, and the converter maps
each parameter to a birder state-dict name and back with the same paths and shapes.

Shapes only: no weight is made (some presets have over 400M parameters), and all presets take about 20 s.

- The full-depth build uses a stand-in for ``nnx.Rngs`` (``SameKey``): a real ``Rngs`` counts its draws in
  a traced counter, and under ``eval_shape`` each count update walks the whole trace built so far (jax
  composes an error message for the tracer's missing ``.sharding``), so ``abstract_model`` of the 56-block
  ``vit_e14`` takes 2 s instead of 0.2 s.
- ``abstract_model`` itself builds each preset cut to ``SHORT_DEPTH`` blocks, and the forward is traced on
  that: every block of a preset is built alike, and tracing 97 full-depth forwards would take as long again.
- The round trip through ``mapping.to_birder`` / ``mapping.to_nnx`` runs on arrays of a zero-byte dtype, so
  the converter's transposed copies cost nothing.

``test_each_check_fails_on_a_wrong_width`` shows that every check can fail.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vitreg_jax.convert import mapping
from vitreg_jax.model.build import abstract_model
from vitreg_jax.model.config import ViTConfig, preset
from vitreg_jax.model.presets import PRESETS
from vitreg_jax.model.vit import ViT
from vitreg_jax.tree import ParamPath, flatten

SHORT_DEPTH = 2
NO_BYTES = np.dtype([])  # a structured dtype without fields: an array of any shape holds zero bytes


class SameKey:
    """``nnx.Rngs`` for a shape-only build: every parameter is drawn from the same key, and nothing counts."""

    def params(self) -> jax.Array:
        return jax.random.key(0)


def full_depth_model(cfg: ViTConfig) -> ViT:
    return nnx.eval_shape(lambda: ViT(cfg, rngs=SameKey()))  # type: ignore[arg-type]


def param_shapes(net: nnx.Module) -> dict[ParamPath, tuple[int, ...]]:
    leaves = flatten(nnx.to_pure_dict(nnx.state(net, nnx.Param)))
    return {path: tuple(leaf.shape) for path, leaf in leaves.items()}


def birder_shape_in_our_layout(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    if layout == "linear":
        return shape[::-1]  # torch (out, in) -> our (in, out)
    if layout == "conv":
        return (shape[2], shape[3], shape[1], shape[0])  # torch (D, C, p, p) -> HWIO (p, p, C, D)
    return shape


# the checks: each takes a model and the config it should have -------------------------------------------
def check_built(net: ViT, cfg: ViTConfig) -> None:
    """Abstract (no array behind any parameter), ``num_layers`` blocks, patches embedded to ``hidden_dim``."""
    leaves = flatten(nnx.to_pure_dict(nnx.state(net, nnx.Param)))
    assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves.values())
    assert len(net.encoder.block) == cfg.num_layers
    p = cfg.patch_size
    assert leaves[("conv_proj", "kernel")].shape == (p, p, cfg.in_channels, cfg.hidden_dim)


def check_embedding(net: ViT, cfg: ViTConfig) -> None:
    """One image at the preset's size gives one float32 embedding of ``hidden_dim``."""
    graphdef, state = nnx.split(net)

    def embed(state: nnx.State, x: jax.Array) -> jax.Array:
        return nnx.merge(graphdef, state).embedding(x)

    h, w = cfg.image_size
    out = jax.eval_shape(embed, state, jax.ShapeDtypeStruct((1, h, w, cfg.in_channels), jnp.float32))
    assert (out.shape, out.dtype) == ((1, cfg.hidden_dim), jnp.float32)


def check_birder_names(net: ViT, cfg: ViTConfig) -> None:
    """The converter's table: one distinct birder name per parameter, every parameter, shapes consistent."""
    rows = mapping.table(cfg)
    ours = param_shapes(net)
    assert len({r.birder_key for r in rows}) == len({r.path for r in rows}) == len(rows) == len(ours)
    assert {r.path: birder_shape_in_our_layout(r.birder_shape, r.layout) for r in rows} == ours


def check_round_trip(net: ViT, cfg: ViTConfig) -> None:
    """``to_birder`` gives birder's names, order and shapes; ``to_nnx`` brings back our paths and shapes."""
    ours = param_shapes(net)
    birder = mapping.to_birder({path: np.empty(shape, NO_BYTES) for path, shape in ours.items()}, cfg)
    rows = mapping.table(cfg)
    assert [(key, a.shape) for key, a in birder.items()] == [(r.birder_key, r.birder_shape) for r in rows]
    assert {path: a.shape for path, a in mapping.to_nnx(birder, cfg).items()} == ours


# the tests --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_builds_embeds_and_maps_to_birder_names(name: str) -> None:
    cfg = preset(name)
    full = full_depth_model(cfg)
    check_built(full, cfg)
    check_birder_names(full, cfg)
    check_round_trip(full, cfg)
    short_cfg = cfg.replace(num_layers=min(cfg.num_layers, SHORT_DEPTH))
    short = abstract_model(short_cfg)
    check_built(short, short_cfg)
    check_embedding(short, short_cfg)


CHECKS: dict[str, Callable[[ViT, ViTConfig], None]] = {
    "built": check_built,
    "embedding": check_embedding,
    "birder names": check_birder_names,
    "round trip": check_round_trip,
}


@pytest.mark.parametrize("check", CHECKS.values(), ids=CHECKS.keys())
def test_each_check_fails_on_a_wrong_width(check: Callable[[ViT, ViTConfig], None]) -> None:
    cfg = preset("vit_s16").replace(num_layers=1)
    net = abstract_model(cfg)
    check(net, cfg)
    with pytest.raises(AssertionError):
        check(net, cfg.replace(hidden_dim=2 * cfg.hidden_dim))
