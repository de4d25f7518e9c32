"""The one table of named RGB statistics: birder's own modes, read from birder 0.8.4 itself."""

from __future__ import annotations

import os

import pytest

from vitreg_jax.data.rgb_stats import BIRDER_MODES, RGB_STATS, TRAIN_DEFAULT, named_rgb_stats
from vitreg_jax.errors import UserError

REQUIRE_BIRDER = os.environ.get("VITREG_JAX_REQUIRE_BIRDER") == "1"


@pytest.mark.parametrize("mode", BIRDER_MODES)
def test_birder_modes_are_birders(mode: str) -> None:
    if not REQUIRE_BIRDER:
        pytest.importorskip("birder")
    from birder.data.transforms.classification import get_rgb_stats

    theirs = get_rgb_stats(mode)
    assert RGB_STATS[mode] == {"mean": tuple(theirs["mean"]), "std": tuple(theirs["std"])}


def test_named_stats_are_fresh_json_shaped_copies() -> None:
    a = named_rgb_stats(TRAIN_DEFAULT)
    a["mean"][0] = -1.0
    assert named_rgb_stats(TRAIN_DEFAULT)["mean"][0] == RGB_STATS[TRAIN_DEFAULT]["mean"][0]
    assert set(named_rgb_stats("vit_reg4_b16_mim")) == {"mean", "std"}
    with pytest.raises(UserError, match="unknown rgb stats 'nope'"):
        named_rgb_stats("nope")


def test_the_standin_carries_the_published_models_stats() -> None:
    from vitreg_jax.convert import standin

    assert standin.MIM_RGB_STATS == named_rgb_stats("vit_reg4_b16_mim")
