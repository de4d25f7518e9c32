"""vitreg-jax: birder's ViT encoders (``vit_reg4_b16_mim`` and its family) in JAX / flax.nnx.

The public API mirrors birder's model card (NHWC instead of NCHW)::

    net, cfg = vitreg_jax.load_model_with_cfg("vit_reg4_b16_mim.json", "vit_reg4_b16_mim_200.pt")
    size = vitreg_jax.get_size_from_signature(cfg["signature"])
    transform = vitreg_jax.classification_transform(size, cfg["rgb_stats"])
    embedding = net.embedding(transform(image)[None])

The subpackages are the architecture: ``model`` (the encoders), ``data`` (images in), ``embedding``
(images to embeddings), ``evaluation`` (search, k-NN, linear probe), ``pretraining`` (MAE), ``cli`` (the
``vitreg-jax`` command) and ``convert`` (birder's files and published weights), each with a lazy namespace of
its main names. Names are imported on first use, so that ``import vitreg_jax`` stays cheap and never imports
torch. ``load_model_with_cfg`` (any source: birder files, published names, checkpoints) comes from
``vitreg_jax.convert``, which sits above the rest of the library.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "ViT": "vitreg_jax.model.vit",
    "ViTConfig": "vitreg_jax.model.config",
    "MAEConfig": "vitreg_jax.pretraining.config",
    "TrainConfig": "vitreg_jax.pretraining.config",
    "preset": "vitreg_jax.model.config",
    "UserError": "vitreg_jax.errors",
    "load_model_with_cfg": "vitreg_jax.convert.load",
    "build_model": "vitreg_jax.model.build",
    "save_checkpoint": "vitreg_jax.model.checkpoint",
    "load_checkpoint": "vitreg_jax.model.checkpoint",
    "classification_transform": "vitreg_jax.data.preprocess",
    "get_size_from_signature": "vitreg_jax.data.preprocess",
    "Embedder": "vitreg_jax.embedding.embedder",
    "make_embed_fn": "vitreg_jax.embedding.embedder",
    "mae_preset": "vitreg_jax.pretraining.config",
    "MAE": "vitreg_jax.pretraining.mae",
    "Masks": "vitreg_jax.pretraining.mae",
    "MAETrainer": "vitreg_jax.pretraining.step",
    "fit": "vitreg_jax.pretraining.loop",
    "default_mesh": "vitreg_jax.parallel",
}

__all__ = sorted(_EXPORTS)  # noqa: PLE0605 (the lazily imported names above are the API)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'vitreg_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
