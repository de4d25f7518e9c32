"""The encoders: configuration and presets, the modules of each family, layers, kernels, position
embeddings, compute precision, birder configs and checkpoint files.

- ``config.py`` (``ViTConfig``, ``preset``) and ``presets.py`` (birder's registered configurations);
- ``vit.py`` (the ``ViT`` module: birder's ``embedding``, ``forward_features``, ``detection_features``,
  ``masked_encoding_omission``), built from ``blocks.py`` (transformer blocks and their MLPs),
  ``attention.py`` (the one attention implementation), ``layers.py`` (linear, norms, layer scale, drop-path)
  and ``_kernels.py`` (the precision-aware matmul, softmax and GELU every layer calls);
- ``position_embedding.py`` (birder's position-embedding resampling);
- ``precision.py`` (the compute policy: float32, bfloat16 or auto, shared by embedding and training);
- ``birder_json.py`` (birder's json configs to ``ViTConfig`` and back), ``build.py`` (a model from a config
  or a checkpoint), ``checkpoint.py`` (the Orbax checkpoint directory).

A new model family is a module of its own here; its birder-name mapping is a table in ``vitreg_jax.convert``.
"""

from vitreg_jax._lazy import lazy_names

_EXPORTS = {
    "ViT": "vitreg_jax.model.vit",
    "ViTConfig": "vitreg_jax.model.config",
    "preset": "vitreg_jax.model.config",
    "canonical_name": "vitreg_jax.model.config",
    "ComputePolicy": "vitreg_jax.model.precision",
    "resolve_dtype": "vitreg_jax.model.precision",
    "read_birder_config": "vitreg_jax.model.birder_json",
    "vit_config_from_birder": "vitreg_jax.model.birder_json",
    "build_model": "vitreg_jax.model.build",
    "abstract_model": "vitreg_jax.model.build",
    "model_from_checkpoint": "vitreg_jax.model.build",
    "save_model": "vitreg_jax.model.build",
    "save_checkpoint": "vitreg_jax.model.checkpoint",
    "load_checkpoint": "vitreg_jax.model.checkpoint",
    "is_checkpoint": "vitreg_jax.model.checkpoint",
    "num_params": "vitreg_jax.model.vit",
    "get_params": "vitreg_jax.model.build",
    "set_params": "vitreg_jax.model.build",
    "bicubic_matrix": "vitreg_jax.model.position_embedding",
    "resize_grid": "vitreg_jax.model.position_embedding",
}
__all__ = sorted(_EXPORTS)  # noqa: PLE0605 (the lazily imported names above)
__getattr__, __dir__ = lazy_names(__name__, _EXPORTS)
