"""birder's json config (the dict ``fs_ops.write_config`` writes beside a weights file), read and written.

:func:`read_birder_config` reads one (older files with ``alias`` instead of ``registered_name`` too),
:func:`vit_config_from_birder` turns it into a ``ViTConfig`` (refusing other networks and options by name) and
:func:`birder_config` writes one back for an architecture.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vitreg_jax.data.preprocess import check_rgb_stats
from vitreg_jax.errors import UserError
from vitreg_jax.fileio import first_line, read_json_object
from vitreg_jax.model.config import ViTConfig, canonical_name, preset

CLASSIFICATION_TASK = "image_classification"


DEFAULT_BIRDER_VERSION = "v0.8.4"


# birder config dicts -----------------------------------------------------------------------------------
def read_birder_config(config: str | os.PathLike[str] | Mapping[str, Any]) -> dict[str, Any]:
    """birder's json config as a dict, with legacy ``alias`` read as ``registered_name``."""
    if isinstance(config, Mapping):
        cfg = dict(config)
    else:
        path = Path(config)
        if not path.is_file():
            raise UserError(f"{path}: no such config file")
        cfg = read_json_object(path, "a birder config")
    if "registered_name" not in cfg and "alias" in cfg:  # birder < 0.4.13
        cfg["registered_name"] = cfg.pop("alias")
    missing = [k for k in ("signature", "rgb_stats") if k not in cfg]
    if missing:
        raise UserError(f"birder config lacks {', '.join(missing)}")
    cfg["rgb_stats"] = check_rgb_stats(cfg["rgb_stats"], "" if isinstance(config, Mapping) else f"{config}: ")
    return cfg


def vit_config_from_birder(cfg: Mapping[str, Any]) -> ViTConfig:
    """The architecture a birder config describes; refuses non-ViT networks and unsupported options."""
    try:
        return _vit_config_from_birder(cfg)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, OverflowError) as e:
        # a config value of the wrong type or shape (a damaged or hand-edited file) is the user's to fix
        raise UserError(f"birder config is malformed ({type(e).__name__}: {first_line(e)})") from None


def _vit_config_from_birder(cfg: Mapping[str, Any]) -> ViTConfig:
    task = cfg.get("task", CLASSIFICATION_TASK)
    if task != CLASSIFICATION_TASK:
        raise UserError(
            f"birder config is for task {task!r}; vitreg-jax loads {CLASSIFICATION_TASK!r} ViT encoders"
        )
    name = cfg.get("name")
    registered = cfg.get("registered_name") or name
    if name not in (None, "vit"):
        raise UserError(
            f"birder network {registered or name!r} is not a ViT (name {name!r}); vitreg-jax ports "
            "birder's `vit` family"
        )
    try:
        shape = cfg["signature"]["inputs"][0]["data_shape"]
        outputs = cfg["signature"]["outputs"][0]["data_shape"]
    except (KeyError, IndexError, TypeError):
        raise UserError("birder config has no usable signature (inputs[0].data_shape)") from None
    num_classes = int(cfg["signature"].get("num_labels", outputs[1] if len(outputs) > 1 else 0))
    size = (int(shape[2]), int(shape[3]))
    model_config = cfg.get("model_config")
    if model_config is None:  # very old json (net_param era): the registered name says it all
        return preset(
            canonical_name(str(registered)),
            image_size=size,
            num_classes=num_classes,
            in_channels=int(shape[1]),
        )
    return ViTConfig.from_birder(
        model_config, image_size=size, num_classes=num_classes, in_channels=int(shape[1])
    )


def birder_config(
    vit_cfg: ViTConfig,
    rgb_stats: Mapping[str, Any],
    registered_name: str | None = None,
    birder_version: str = DEFAULT_BIRDER_VERSION,
) -> dict[str, Any]:
    """The json birder writes beside a weights file (``fs_ops.write_config``), for this architecture."""
    h, w = vit_cfg.image_size
    return {
        "birder_version": birder_version,
        "name": "vit",
        "registered_name": registered_name or "vit",
        "task": CLASSIFICATION_TASK,
        "model_config": vit_cfg.to_birder(),
        "signature": {
            "inputs": [{"data_shape": [0, vit_cfg.in_channels, h, w]}],
            "outputs": [{"data_shape": [0, vit_cfg.num_classes]}],
        },
        "rgb_stats": {"mean": list(rgb_stats["mean"]), "std": list(rgb_stats["std"])},
    }
