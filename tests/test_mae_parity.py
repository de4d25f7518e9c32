"""The MAE head against birder 0.8.4's ``MAE_ViT`` on CPU in fp32, with birder's weights and masks.

Inputs, weight perturbations and mask noise are generated once with numpy and fed to both frameworks; birder's
weights reach ours through ``tests/support/mae_mapping.py``; birder's ``uniform_mask`` is replaced by one
returning the numpy-made masks, and ours receives the same masks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.support import birder_ref as ref
from tests.support import mae_mapping
from tests.support.report import record
from tests.support.tiny_models import TINY_BIRDER, TINY_MAE_DECODER
from tests.support.tolerances import (
    MAE_ENCODER_TOKENS_ATOL,
    MAE_LOSS_RTOL,
    MAE_POS_EMBED_ATOL,
    MAE_POS_EMBED_VARIANTS_MIN_DIFF,
    MAE_PRED_ATOL,
)
from vitreg_jax.convert import mapping
from vitreg_jax.errors import UserError
from vitreg_jax.model.build import get_params, set_params
from vitreg_jax.model.config import ViTConfig, preset
from vitreg_jax.model.vit import ViT
from vitreg_jax.pretraining.config import MAEConfig, mae_preset
from vitreg_jax.pretraining.mae import (
    MAE,
    MAE_STATE,
    Masks,
    masks_from_noise,
    patchify,
    random_masking,
    sincos_pos_embed_2d,
    unpatchify,
)
from vitreg_jax.tree import flatten

pytest.importorskip("birder")
jax.config.update("jax_default_matmul_precision", "highest")

# added to every birder tensor, so that biases, norms and tokens are not at their init values
WEIGHT_NOISE_STD = 0.05

SIZE = (64, 64)
GRID = (SIZE[0] // 16, SIZE[1] // 16)
ENCODER = "vit_reg4_b16"
ENCODER_CONFIG = {**TINY_BIRDER, "drop_path_rate": 0.0}
DECODER = {**TINY_MAE_DECODER, "decoder_depth": 2}
VARIANTS = {
    "mae_vit": {**DECODER},
    "mae_vit_npl": {**DECODER, "norm_pix_loss": True},
    "mae_vit_npl_lpe": {**DECODER, "norm_pix_loss": True, "learnable_pos_embed": True},
}
BATCH = 3


def birder_mae(variant: str, seed: int = 0):
    import torch
    from birder.model_registry import registry

    torch.manual_seed(seed)
    enc = registry.net_factory(ENCODER, 0, 3, config=ENCODER_CONFIG, size=SIZE)
    return registry.mim_net_factory("mae_vit", enc, config=VARIANTS[variant], size=SIZE).eval()


def configs(variant: str) -> tuple[ViTConfig, MAEConfig]:
    return (
        preset(ENCODER, model_config=ENCODER_CONFIG, image_size=SIZE),
        MAEConfig.from_birder(VARIANTS[variant]),
    )


def perturbed(state: dict[str, np.ndarray], seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (v + rng.normal(0.0, WEIGHT_NOISE_STD, v.shape)).astype(np.float32) for k, v in state.items()}


def numpy_masks(
    batch: int, seq_len: int, ratio: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """birder's uniform_mask computed in numpy from numpy noise: (mask, ids_keep, ids_restore)."""
    noise = np.random.default_rng(seed).random((batch, seq_len), dtype=np.float32)
    keep = int(seq_len * (1 - ratio))
    ids_shuffle = np.argsort(noise, axis=1, kind="stable")
    ids_restore = np.argsort(ids_shuffle, axis=1, kind="stable")
    mask = np.ones((batch, seq_len), np.float32)
    mask[:, :keep] = 0
    mask = np.take_along_axis(mask, ids_restore, axis=1)
    return mask, ids_shuffle[:, :keep], ids_restore


@functools.cache
def make_pair(variant: str):
    """(variant, birder MAE, our MAE, state): both holding the same perturbed weights."""
    bnet = birder_mae(variant)
    state = perturbed(ref.state_numpy(bnet))
    ref.load_state(bnet, state)
    vit_cfg, mae_cfg = configs(variant)
    ours = MAE(ViT(vit_cfg, rngs=nnx.Rngs(0)), mae_cfg, rngs=nnx.Rngs(1))
    set_params(ours, mae_mapping.to_nnx(state, vit_cfg, mae_cfg), kinds=MAE_STATE)
    return variant, bnet, ours, state


@pytest.fixture(params=sorted(VARIANTS))
def pair(request):
    import torch

    with torch.no_grad():
        yield make_pair(request.param)


def test_forward_matches_birder(pair, monkeypatch):
    import birder.net.mim.mae_vit as birder_mae_module
    import torch

    variant, bnet, ours, _ = pair
    x = np.random.default_rng(2).standard_normal((BATCH, *SIZE, 3)).astype(np.float32)  # NHWC
    mask, keep, restore = numpy_masks(BATCH, GRID[0] * GRID[1], 0.75, seed=3)
    monkeypatch.setattr(
        birder_mae_module,
        "uniform_mask",
        lambda *a, **k: (torch.from_numpy(mask), torch.from_numpy(keep), torch.from_numpy(restore)),
    )
    out_b = bnet(ref.nchw(x))
    out_o = ours(jnp.asarray(x), Masks(jnp.asarray(keep), jnp.asarray(restore), jnp.asarray(mask)))
    pred_diff = float(np.abs(np.asarray(out_o["pred"]) - out_b["pred"].numpy()).max())
    loss_b, loss_o = float(out_b["loss"]), float(out_o["loss"])
    loss_rel = abs(loss_o - loss_b) / abs(loss_b)
    record(f"MAE {variant} (tiny, 64 px)", "pred", pred_diff)
    record(f"MAE {variant} (tiny, 64 px)", "loss (relative)", loss_rel)
    np.testing.assert_array_equal(np.asarray(out_o["mask"]), out_b["mask"].numpy())
    assert pred_diff <= MAE_PRED_ATOL, f"{variant}: decoder predictions differ by {pred_diff:.2e}"
    assert loss_rel <= MAE_LOSS_RTOL, f"{variant}: loss {loss_o} vs birder {loss_b} (relative {loss_rel:.2e})"


def test_table_covers_birder_state_dict_both_ways(pair):
    variant, bnet, ours, state = pair
    vit_cfg, mae_cfg = configs(variant)
    rows = mae_mapping.table(vit_cfg, mae_cfg)
    assert [r.birder_key for r in rows] == list(bnet.state_dict()), "table order/keys differ from birder's"
    assert all(r.birder_shape == tuple(bnet.state_dict()[r.birder_key].shape) for r in rows)
    back = mae_mapping.to_birder(get_params(ours, MAE_STATE), vit_cfg, mae_cfg)
    assert list(back) == list(state)
    for k, v in state.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_encoder_part_converts_with_the_encoder_table():
    """birder's encoder-only file is the MAE state_dict's ``encoder.`` entries, prefix removed."""
    variant, bnet, ours, state = make_pair("mae_vit")
    vit_cfg, _ = configs(variant)
    enc_state, rest = mae_mapping.split_encoder(state)
    assert set(enc_state) == set(bnet.encoder.state_dict())
    assert not any(k.startswith("encoder") for k in rest)
    from vitreg_jax.model.build import abstract_model, set_params

    net = set_params(abstract_model(vit_cfg), mapping.to_nnx(enc_state, vit_cfg))
    x = np.random.default_rng(4).standard_normal((2, *SIZE, 3)).astype(np.float32)
    ours_tokens = np.asarray(net.forward_features(jnp.asarray(x)))
    diff = float(np.abs(ours_tokens - ref.run(bnet.encoder.forward_features, x)).max())
    record("MAE encoder part (tiny)", "forward_features", diff)
    assert diff <= MAE_ENCODER_TOKENS_ATOL
    ours_encoder = {p[1:]: v for p, v in get_params(ours, MAE_STATE).items() if p[0] == "encoder"}
    for path, value in mapping.to_nnx(enc_state, vit_cfg).items():
        np.testing.assert_array_equal(ours_encoder[path], value, err_msg=str(path))


@pytest.mark.parametrize("ratio", [0.75, 0.6, 0.9])
def test_masks_from_noise_match_uniform_mask(ratio):
    import torch
    from birder.common.masking import uniform_mask

    torch.manual_seed(5)
    noise = torch.rand(4, 196)
    torch.manual_seed(5)
    mask, keep, restore = uniform_mask(4, 14, 14, ratio)
    ours = masks_from_noise(jnp.asarray(noise.numpy()), ratio)
    np.testing.assert_array_equal(np.asarray(ours.mask), mask.numpy())
    np.testing.assert_array_equal(np.asarray(ours.ids_keep), keep.numpy())
    np.testing.assert_array_equal(np.asarray(ours.ids_restore), restore.numpy())


@pytest.mark.parametrize(("ratio", "grid"), [(0.75, (14, 14)), (0.6, (8, 12))])
def test_block_masks_from_noise_match_uniform_mask(ratio, grid):
    """birder's min_mask_size=2: whole 2x2 blocks kept or masked. torch's argsort is not stable, so the kept
    patches of one block (equal sort keys) may come in another order: compared as block-noise sequences."""
    import torch
    from birder.common.masking import uniform_mask

    h, w = grid
    torch.manual_seed(7)
    noise = torch.rand(4, (h // 2) * (w // 2))
    torch.manual_seed(7)
    mask, keep, restore = uniform_mask(4, h, w, ratio, min_mask_size=2)
    ours = masks_from_noise(jnp.asarray(noise.numpy()), ratio, grid=grid, min_mask_size=2)
    np.testing.assert_array_equal(np.asarray(ours.mask), mask.numpy())
    assert ours.ids_keep.shape == tuple(keep.shape)
    ours_keep, keep = np.asarray(ours.ids_keep), keep.numpy()
    np.testing.assert_array_equal(np.sort(ours_keep, axis=1), np.sort(keep, axis=1))
    block = (np.arange(h)[:, None] // 2 * (w // 2) + np.arange(w)[None, :] // 2).reshape(-1)  # patch -> block
    block_noise = noise.numpy()[:, block]  # (B, L)
    np.testing.assert_array_equal(
        np.take_along_axis(block_noise, ours_keep, 1), np.take_along_axis(block_noise, keep, 1)
    )
    for r in (np.asarray(ours.ids_restore), restore.numpy()):  # a permutation that undoes the shuffle
        assert sorted(r[0]) == list(range(h * w))
    shuffle = np.argsort(np.asarray(ours.ids_restore), axis=1)
    np.testing.assert_array_equal(shuffle[:, : keep.shape[1]], ours_keep)


def test_block_masking_in_the_model():
    vit_cfg = preset(ENCODER, model_config=ENCODER_CONFIG, image_size=SIZE)  # a 4x4 patch grid
    model = MAE(ViT(vit_cfg, rngs=nnx.Rngs(0)), MAEConfig(**DECODER, min_mask_size=2), rngs=nnx.Rngs(1))
    masks = model.random_masks(jax.random.PRNGKey(3), 5)
    blocks = np.asarray(masks.mask).reshape(5, 2, 2, 2, 2)  # (B, h/2, 2, w/2, 2)
    assert (blocks == blocks[:, :, :1, :, :1]).all(), "a 2x2 block is partly masked"
    assert masks.ids_keep.shape == (5, 4)  # int(4 * 0.25) = 1 block of 4 patches
    out = model(jnp.zeros((5, *SIZE, 3), jnp.float32), masks)
    assert np.isfinite(float(out["loss"]))
    assert MAEConfig.from_birder({}, min_mask_size=2).min_mask_size == 2
    with pytest.raises(UserError, match="does not divide"):
        MAE(ViT(vit_cfg, rngs=nnx.Rngs(0)), MAEConfig(**DECODER, min_mask_size=3), rngs=nnx.Rngs(1))


def test_random_masking_properties():
    m = random_masking(jax.random.PRNGKey(0), 8, 196, 0.75)
    assert m.ids_keep.shape == (8, 49) and m.ids_restore.shape == (8, 196)
    np.testing.assert_array_equal(np.asarray(m.mask).sum(1), 147)
    kept = np.take_along_axis(np.asarray(m.mask), np.asarray(m.ids_keep), axis=1)
    assert not kept.any(), "a kept patch is marked masked"
    other = random_masking(jax.random.PRNGKey(1), 8, 196, 0.75)
    assert not np.array_equal(np.asarray(m.ids_keep), np.asarray(other.ids_keep))
    rows = {tuple(r) for r in np.asarray(m.ids_keep)}
    assert len(rows) == 8, "masks are not per-sample"


@pytest.mark.parametrize("endpoint", [False, True])
@pytest.mark.parametrize(("grid", "dim"), [((14, 14), 512), ((4, 6), 32)])
def test_sincos_pos_embed_matches_birder(endpoint, grid, dim):
    from birder.net.base import pos_embedding_sin_cos_2d

    theirs = pos_embedding_sin_cos_2d(grid[0], grid[1], dim, 5, include_frequency_endpoint=endpoint).numpy()
    ours = sincos_pos_embed_2d(grid, dim, 5, include_frequency_endpoint=endpoint)
    assert ours.shape == theirs.shape and ours.dtype == np.float32
    np.testing.assert_array_equal(ours[:5], 0.0)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=MAE_POS_EMBED_ATOL)


def test_decoder_pos_embed_follows_the_frequency_option():
    vit_cfg = preset(ENCODER, model_config=ENCODER_CONFIG, image_size=SIZE)
    old = nnx.eval_shape(
        lambda: MAE(
            ViT(vit_cfg, rngs=nnx.Rngs(0)),
            MAEConfig(**DECODER, include_frequency_endpoint=True),
            rngs=nnx.Rngs(1),
        )
    )
    assert old.cfg.include_frequency_endpoint
    a = sincos_pos_embed_2d(GRID, 32, 5, include_frequency_endpoint=False)
    b = sincos_pos_embed_2d(GRID, 32, 5, include_frequency_endpoint=True)
    assert np.abs(a - b).max() > MAE_POS_EMBED_VARIANTS_MIN_DIFF, (
        "the two denominators should give different tables"
    )


def test_patchify_matches_birder_and_inverts():
    bnet = birder_mae("mae_vit")
    x = np.random.default_rng(6).standard_normal((2, *SIZE, 3)).astype(np.float32)
    theirs = bnet.patchify(ref.nchw(x)).numpy()
    ours = np.asarray(patchify(jnp.asarray(x), 16))
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(np.asarray(unpatchify(jnp.asarray(ours), 16, GRID)), x)
    np.testing.assert_array_equal(bnet.unpatchify(bnet.patchify(ref.nchw(x))).numpy(), ref.nchw(x).numpy())


def test_full_size_decoder_parameter_count():
    """mae_vit on vit_reg4_b16: 26,008,320 decoder parameters (111.8 M with the encoder), as birder's."""
    model = nnx.eval_shape(
        lambda: MAE(ViT(preset(ENCODER), rngs=nnx.Rngs(0)), mae_preset("mae_vit"), rngs=nnx.Rngs(1))
    )
    counts = {
        p: int(np.prod(v.shape)) for p, v in flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param))).items()
    }
    decoder = sum(n for p, n in counts.items() if p[0] != "encoder")
    assert decoder == 26_008_320
    assert sum(counts.values()) == 85_804_800 + 26_008_320


def test_init_follows_birder():
    """xavier_uniform Linear weights with zero biases, unit LayerNorms, mask_token N(0, 0.02)."""
    vit_cfg = preset(ENCODER, model_config=ENCODER_CONFIG, image_size=SIZE)
    model = MAE(
        ViT(vit_cfg, rngs=nnx.Rngs(0)), MAEConfig(decoder_embed_dim=64, decoder_depth=1), rngs=nnx.Rngs(3)
    )
    qkv = np.asarray(model.decoder[0].attn.qkv.kernel[...])
    bound = (6.0 / (64 + 192)) ** 0.5
    assert np.abs(qkv).max() <= bound and np.abs(qkv).max() > 0.9 * bound
    np.testing.assert_array_equal(np.asarray(model.decoder[0].attn.qkv.bias[...]), 0.0)
    np.testing.assert_array_equal(np.asarray(model.decoder[1].scale[...]), 1.0)
    assert 0.005 < float(np.std(np.asarray(model.mask_token[...]))) < 0.05
