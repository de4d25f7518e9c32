"""Every registered preset, cheaply (as timm's test_models.py does over list_models()): the model builds
abstractly, its forward traces to one embedding per image at the preset's size (with at most two blocks: every
block of a preset is the same, and tracing 24 of them 97 times would make this test slow), and the converter's
table maps each parameter to a birder state-dict name and back with consistent shapes. Shapes only: no weight
is made."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from vitreg_jax.convert import mapping
from vitreg_jax.model.build import abstract_model
from vitreg_jax.model.config import preset
from vitreg_jax.model.presets import PRESETS
from vitreg_jax.tree import flatten

TRACED_BLOCKS = 2


def our_shapes(net: nnx.Module) -> dict[tuple[str | int, ...], tuple[int, ...]]:
    return {
        path: tuple(leaf.shape) for path, leaf in flatten(nnx.to_pure_dict(nnx.state(net, nnx.Param))).items()
    }


def birder_to_ours(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    if layout == "linear":
        return shape[::-1]  # torch (out, in) -> our (in, out)
    if layout == "conv":
        return (shape[2], shape[3], shape[1], shape[0])  # torch (D, C, p, p) -> HWIO (p, p, C, D)
    return shape


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_builds_traces_and_maps_to_birder_names(name: str) -> None:
    cfg = preset(name)
    net = abstract_model(cfg)
    graphdef, state = nnx.split(abstract_model(cfg.replace(num_layers=min(cfg.num_layers, TRACED_BLOCKS))))
    h, w = cfg.image_size

    def embed(state: nnx.State, x: jax.Array) -> jax.Array:
        return nnx.merge(graphdef, state).embedding(x)

    out = jax.eval_shape(embed, state, jax.ShapeDtypeStruct((1, h, w, cfg.in_channels), jnp.float32))
    assert out.shape == (1, cfg.hidden_dim) and out.dtype == jnp.float32

    ours = our_shapes(net)
    rows = mapping.table(cfg)
    assert len({r.birder_key for r in rows}) == len(rows), "two parameters map to one birder name"
    assert {r.path: birder_to_ours(r.birder_shape, r.layout) for r in rows} == ours
    # and back: every birder name, renamed by the table, lands on a distinct parameter of the right shape
    back = {r.birder_key: ours[r.path] for r in rows}
    assert {k: birder_to_ours(r.birder_shape, r.layout) for k, r in zip(back, rows, strict=True)} == back


def test_a_wrong_width_is_caught() -> None:
    """The check above can fail: a table for another width does not fit the model."""
    cfg = preset("vit_s16")
    rows = mapping.table(cfg.replace(hidden_dim=cfg.hidden_dim * 2, mlp_dim=cfg.mlp_dim * 2))
    assert {r.path: birder_to_ours(r.birder_shape, r.layout) for r in rows} != our_shapes(abstract_model(cfg))
