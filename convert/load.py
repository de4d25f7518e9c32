"""Load a model from any source: a birder file, a published weight name or a vitreg-jax checkpoint.

``load_model_with_cfg(config, weights)`` mirrors ``birder.load_model_with_cfg`` (it is re-exported as
``vitreg_jax.load_model_with_cfg``): ``config`` is birder's json (path or dict; older files with ``alias``
instead of ``registered_name`` load too) or None, and ``weights`` is a birder ``.pt`` / ``.safetensors`` file,
a vitreg-jax (Orbax) checkpoint directory, or a published weight name. birder files go through the one table
in ``vitreg_jax.convert.mapping``; no random init happens first. Without a config, a birder file's
architecture is inferred from its own metadata and tensor shapes (``vitreg_jax.convert.infer``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from vitreg_jax.convert import hub, mapping
from vitreg_jax.convert.formats.birder_file import BirderFile, read_birder_file
from vitreg_jax.convert.infer import infer_birder_config
from vitreg_jax.model.birder_json import read_birder_config, vit_config_from_birder
from vitreg_jax.model.build import abstract_model, model_from_checkpoint, set_params
from vitreg_jax.model.checkpoint import is_checkpoint
from vitreg_jax.model.vit import ViT


def load_model_with_cfg(
    config: str | os.PathLike[str] | Mapping[str, Any] | None, weights: str | os.PathLike[str]
) -> tuple[ViT, dict[str, Any]]:
    """(model, birder config dict) from a config (or None) and weights; see the module docstring."""
    if is_checkpoint(weights):
        return model_from_checkpoint(weights, config)
    net, cfg, _ = load_birder_weights(config, weights)
    return net, cfg


def load_birder_weights(
    config: str | os.PathLike[str] | Mapping[str, Any] | None, weights: str | os.PathLike[str]
) -> tuple[ViT, dict[str, Any], BirderFile]:
    """(model, birder config, the file read) from a birder file or a published weight name."""
    resolved = hub.resolve(weights)
    if config is None and resolved.config is not None:
        config = resolved.config
    bfile = read_birder_file(resolved.weights)
    cfg = read_birder_config(config) if config is not None else infer_birder_config(bfile)
    vit_cfg = vit_config_from_birder(cfg)
    net = set_params(abstract_model(vit_cfg), mapping.to_nnx(bfile.state, vit_cfg))
    return net, cfg, bfile
