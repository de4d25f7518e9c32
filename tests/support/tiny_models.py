"""The tiny models the tests build: one name for each distinct configuration (birder ``model_config``
overrides of ``vit_reg4_b16``, as ``preset(..., model_config=...)`` and birder's ``net_factory(config=...)``
take them), and the builders every test file uses.

The names say what differs: ``TINY_BIRDER`` keeps birder's 16 px patches, ``TINY_EMBEDDER`` has 8 px patches
and four heads, the ``TINY_MAE_*`` pair compiles a whole train step in seconds, and the last two serve one
test each.
"""

from __future__ import annotations

from typing import Any

from flax import nnx

from vitreg_jax.model.config import ViTConfig, preset
from vitreg_jax.model.vit import ViT
from vitreg_jax.pretraining.config import MAEConfig
from vitreg_jax.pretraining.mae import MAE

SIZE = (32, 32)
# birder-made files and the parity tests: two blocks of width 64, two heads, birder's 16 px patches
TINY_BIRDER = {"num_layers": 2, "hidden_dim": 64, "num_heads": 2, "mlp_dim": 128}
# the embedding tests: two blocks, four heads, 32 px images in 8 px patches (16 patch tokens + 4 registers
# + the class token)
TINY_EMBEDDER = {"num_layers": 2, "hidden_dim": 64, "mlp_dim": 128, "num_heads": 4, "patch_size": 8}
# the compute-precision tests: TINY_EMBEDDER with one block
TINY_EMBEDDER_ONE_BLOCK = {**TINY_EMBEDDER, "num_layers": 1}
# the MAE tests, small enough to compile a train step in seconds: one encoder block (TINY_BIRDER's width and
# heads) in 8 px patches, one decoder block
TINY_MAE_ENCODER = {**TINY_BIRDER, "num_layers": 1, "patch_size": 8, "drop_path_rate": 0.0}
TINY_MAE_DECODER = {"decoder_depth": 1, "decoder_embed_dim": 32}
# tests/test_pretrain_export_birder.py: a pre-training run exported to birder, half TINY_BIRDER's width
TINY_HALF_WIDTH = {"patch_size": 8, "num_layers": 2, "hidden_dim": 32, "num_heads": 2, "mlp_dim": 64}
# tests/test_residual_grad_boundary.py: three blocks of width 16 in 4 px patches, two registers (16 px images)
TINY_NARROW_THREE_BLOCKS = {
    "patch_size": 4,
    "num_layers": 3,
    "num_heads": 2,
    "hidden_dim": 16,
    "mlp_dim": 32,
    "num_reg_tokens": 2,
}


def tiny_vit_config(model_config: dict[str, Any] = TINY_EMBEDDER, size: tuple[int, int] = SIZE) -> ViTConfig:
    return preset("vit_reg4_b16", model_config=model_config, image_size=size)


def tiny_vit(
    model_config: dict[str, Any] = TINY_EMBEDDER, seed: int = 0, size: tuple[int, int] = SIZE
) -> ViT:
    """A randomly initialised tiny ``vit_reg4_b16`` (our init from ``seed``)."""
    return ViT(tiny_vit_config(model_config, size), rngs=nnx.Rngs(seed))


def tiny_mae(encoder: dict[str, Any] = TINY_MAE_ENCODER, seed: int = 0) -> MAE:
    """A tiny MAE around a tiny encoder (encoder from ``seed``, decoder from ``seed + 1``)."""
    return MAE(tiny_vit(encoder, seed), MAEConfig(**TINY_MAE_DECODER), rngs=nnx.Rngs(seed + 1))
