"""vitreg-jax: birder's ViTReg encoders (``vit_reg4_b16_mim`` and its family) in JAX / flax.nnx.

The public API mirrors birder's model card (NHWC instead of NCHW)::

    net, cfg = vitreg_jax.load_model_with_cfg("vit_reg4_b16_mim.json", "vit_reg4_b16_mim_200.pt")
    size = vitreg_jax.get_size_from_signature(cfg["signature"])
    transform = vitreg_jax.classification_transform(size, cfg["rgb_stats"])
    embedding = net.embedding(transform(image)[None])

Names are imported lazily so that ``import vitreg_jax`` stays cheap and never imports torch.
``load_model_with_cfg`` (any source: birder files, published names, checkpoints) comes from the converter
package ``vitreg_jax.convert``, which sits above this core library.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "ViT": "vitreg_jax.vit",
    "ViTConfig": "vitreg_jax.config",
    "MAEConfig": "vitreg_jax.config",
    "TrainConfig": "vitreg_jax.config",
    "preset": "vitreg_jax.config",
    "UserError": "vitreg_jax.errors",
    "load_model_with_cfg": "vitreg_jax.convert.load",
    "build_model": "vitreg_jax.loading",
    "save_checkpoint": "vitreg_jax.checkpoint",
    "load_checkpoint": "vitreg_jax.checkpoint",
    "classification_transform": "vitreg_jax.preprocess",
    "get_size_from_signature": "vitreg_jax.preprocess",
    "Embedder": "vitreg_jax.embed",
    "make_embed_fn": "vitreg_jax.embed",
    "mae_preset": "vitreg_jax.config",
    "MAE": "vitreg_jax.mae",
    "Masks": "vitreg_jax.mae",
    "MAETrainer": "vitreg_jax.train",
    "fit": "vitreg_jax.train_loop",
}

__all__ = sorted(_EXPORTS)  # noqa: PLE0605 (the lazily imported names above are the API)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'vitreg_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
