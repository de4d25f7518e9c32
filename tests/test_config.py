"""ViTConfig: presets equal birder's registry, unsupported options are refused by name, JSON round trips."""

from __future__ import annotations

import pytest

from vitreg_jax.errors import UserError
from vitreg_jax.model.config import ViTConfig, preset
from vitreg_jax.model.presets import PRESETS


def test_presets_equal_birders_registry() -> None:
    pytest.importorskip("birder")
    from birder.model_registry import registry

    for name, config in PRESETS.items():
        assert registry.exists(name), name
        assert registry._nets[name].config == config, name  # the registered config, key for key


def test_every_supported_registered_vit_is_a_preset() -> None:
    """Every plain birder ViT config whose options we implement is available by name."""
    pytest.importorskip("birder")
    from birder.model_registry import registry
    from birder.net.vit import ViT

    for name, cls in registry._nets.items():
        if isinstance(cls, type) and issubclass(cls, ViT) and cls is not ViT and cls.__mro__[1] is ViT:
            try:
                ViTConfig.from_birder(cls.config)
            except UserError:
                assert name not in PRESETS
                continue
            assert name in PRESETS, name


def test_legacy_name_and_sizes() -> None:
    cfg = preset("vitreg4_b16")
    assert cfg == preset("vit_reg4_b16")
    assert (cfg.num_reg_tokens, cfg.num_special_tokens, cfg.pos_embed_len) == (4, 5, 201)
    assert preset("vit_reg4_b16", image_size=(384, 384)).pos_embed_len == 5 + 24 * 24


@pytest.mark.parametrize(
    "option, value",
    [
        ("qk_norm", True),
        ("attn_pool_head", True),
        ("norm_layer_type", "RMSNorm"),
        ("mlp_layer_type", "SwiGLU_FFN"),
        ("stem_type", "hmlp"),
        ("soft_moe_num_experts", 4),
        ("act_layer_type", "quick_gelu"),
        ("pos_embed_interpolation_mode", "bilinear"),
        ("dropout", 0.1),
        ("rope_temperature", 10.0),
    ],
)
def test_unsupported_options_are_refused_by_name(option: str, value) -> None:
    with pytest.raises(UserError, match=option):
        ViTConfig.from_birder({**PRESETS["vit_reg4_b16"], option: value})


def test_unsupported_birder_variant_by_name() -> None:
    pytest.importorskip("birder")
    from birder.model_registry import registry

    with pytest.raises(UserError, match="attn_pool_head"):
        ViTConfig.from_birder(registry._nets["vit_b16_ap"].config)
    with pytest.raises(UserError, match="unknown network"):
        preset("vit_b16_ap")


def test_json_round_trip_and_validation() -> None:
    cfg = preset("vit_s16_pn", image_size=(320, 192), num_classes=7)
    assert ViTConfig.from_dict(cfg.to_dict()) == cfg
    assert ViTConfig.from_birder(cfg.to_birder(), image_size=(320, 192), num_classes=7) == cfg
    with pytest.raises(UserError, match="divisible by the patch size"):
        preset("vit_reg4_b16", image_size=(225, 224))
    with pytest.raises(UserError, match="num_heads"):
        ViTConfig(patch_size=16, num_layers=1, num_heads=5, hidden_dim=64, mlp_dim=64)
    with pytest.raises(UserError, match="unknown ViTConfig field"):
        ViTConfig.from_dict({**cfg.to_dict(), "typo": 1})
