"""Build models from birder configs, move parameters in and out, and save / load checkpoint directories.

birder's json config (a dict) describes an architecture: :func:`read_birder_config` reads one (older files with
``alias`` instead of ``registered_name`` too), :func:`vit_config_from_birder` turns it into a ``ViTConfig`` and
:func:`birder_config` writes one back. :func:`model_from_checkpoint` loads a vitreg-jax (Orbax) checkpoint
directory and :func:`save_model` writes one. Nothing here reads birder weight files: the converter package does
(``convert/load.py``; ``vitreg_jax.load_model_with_cfg`` loads any source: birder files, published names
and checkpoints).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import jax.numpy as jnp
import numpy as np
from flax import nnx

from vitreg_jax import __version__
from vitreg_jax.data.preprocess import check_rgb_stats
from vitreg_jax.errors import UserError
from vitreg_jax.fileio import first_line, read_json_object
from vitreg_jax.model.checkpoint import load_checkpoint, save_checkpoint
from vitreg_jax.model.config import ViTConfig, canonical_name, preset
from vitreg_jax.model.vit import ViT
from vitreg_jax.tree import check_fit, flatten, int_keys, unflatten

if TYPE_CHECKING:
    from jax.typing import DTypeLike

    from vitreg_jax.tree import Path as ParamPath

CLASSIFICATION_TASK = "image_classification"
DEFAULT_BIRDER_VERSION = "v0.8.4"


class WeightsSource(Protocol):
    """What a checkpoint's provenance records of the file its weights came from (a birder file)."""

    @property
    def path(self) -> Path: ...
    @property
    def sha256(self) -> str: ...
    @property
    def format(self) -> str: ...
    @property
    def dtypes(self) -> list[str]: ...
    @property
    def meta(self) -> Mapping[str, Any]: ...


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
        raise UserError(f"birder config is for task {task!r}; vitreg-jax loads {CLASSIFICATION_TASK!r} "
                        "ViT encoders")
    name = cfg.get("name")
    registered = cfg.get("registered_name") or name
    if name not in (None, "vit"):
        raise UserError(f"birder network {registered or name!r} is not a ViT (name {name!r}); vitreg-jax ports "
                        "birder's `vit` family")
    try:
        shape = cfg["signature"]["inputs"][0]["data_shape"]
        outputs = cfg["signature"]["outputs"][0]["data_shape"]
    except (KeyError, IndexError, TypeError):
        raise UserError("birder config has no usable signature (inputs[0].data_shape)") from None
    num_classes = int(cfg["signature"].get("num_labels", outputs[1] if len(outputs) > 1 else 0))
    size = (int(shape[2]), int(shape[3]))
    model_config = cfg.get("model_config")
    if model_config is None:  # very old json (net_param era): the registered name says it all
        return preset(canonical_name(str(registered)), image_size=size, num_classes=num_classes,
                      in_channels=int(shape[1]))
    return ViTConfig.from_birder(model_config, image_size=size, num_classes=num_classes, in_channels=int(shape[1]))


def birder_config(vit_cfg: ViTConfig, rgb_stats: Mapping[str, Any], registered_name: str | None = None,
                  birder_version: str = DEFAULT_BIRDER_VERSION) -> dict[str, Any]:
    """The json birder writes beside a weights file (``fs_ops.write_config``), for this architecture."""
    h, w = vit_cfg.image_size
    return {
        "birder_version": birder_version,
        "name": "vit",
        "registered_name": registered_name or "vit",
        "task": CLASSIFICATION_TASK,
        "model_config": vit_cfg.to_birder(),
        "signature": {"inputs": [{"data_shape": [0, vit_cfg.in_channels, h, w]}],
                      "outputs": [{"data_shape": [0, vit_cfg.num_classes]}]},
        "rgb_stats": {"mean": list(rgb_stats["mean"]), "std": list(rgb_stats["std"])},
    }


# models and parameters ---------------------------------------------------------------------------------
def build_model(cfg: ViTConfig | Mapping[str, Any], *, seed: int = 0) -> ViT:
    """A randomly initialised model (birder's init distributions) from a ViTConfig or a birder config."""
    vit_cfg = cfg if isinstance(cfg, ViTConfig) else vit_config_from_birder(cfg)
    return ViT(vit_cfg, rngs=nnx.Rngs(seed))


def abstract_model(vit_cfg: ViTConfig) -> ViT:
    """The model's structure with shape-only parameters (no init), to be filled by ``set_params``."""
    return nnx.eval_shape(lambda: ViT(vit_cfg, rngs=nnx.Rngs(0)))


def get_params(net: nnx.Module) -> dict[ParamPath, np.ndarray]:
    """{parameter path: numpy array} of a model (list indices as ints)."""
    flat = flatten(nnx.to_pure_dict(nnx.state(net, nnx.Param)))
    return {k: np.asarray(v) for k, v in flat.items()}


def set_params(net: nnx.Module, params: Mapping[ParamPath, np.ndarray | jnp.ndarray],
               dtype: DTypeLike = jnp.float32) -> nnx.Module:
    """Put arrays into the model's parameters, checking that every path exists with the right shape."""
    current = flatten(nnx.to_pure_dict(nnx.state(net, nnx.Param)))
    check_fit(params, {k: v.shape for k, v in current.items()}, "parameters do not fit the model")
    nnx.update(net, unflatten({k: jnp.asarray(np.asarray(v), dtype) for k, v in params.items()}))
    return net


# checkpoint directories --------------------------------------------------------------------------------
def model_from_checkpoint(directory: str | os.PathLike[str],
                          config: str | os.PathLike[str] | Mapping[str, Any] | None = None
                          ) -> tuple[ViT, dict[str, Any]]:
    """(model, birder config dict) of a vitreg-jax checkpoint; ``config`` replaces the one it carries."""
    params, meta = load_checkpoint(directory)
    if config is None and not isinstance(meta.get("birder_config"), Mapping):
        raise UserError(f"{directory}: damaged checkpoint (its metadata has no birder_config object)")
    cfg = read_birder_config(config) if config is not None else dict(meta["birder_config"])
    net = set_params(abstract_model(vit_config_from_birder(cfg)), int_keys(flatten(params)))
    return net, cfg


def checkpoint_metadata(vit_cfg: ViTConfig, cfg: Mapping[str, Any], *, source: WeightsSource | None = None,
                        dtype: str = "float32", extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``metadata.json`` content: configs, signature, rgb_stats and where the weights came from."""
    provenance: dict[str, Any] = {"converter": "vitreg-jax", "converter_version": __version__}
    if source is not None:
        provenance.update(source_file=source.path.name, source_sha256=source.sha256, source_format=source.format,
                          source_dtypes=source.dtypes, birder_version=source.meta.get("birder_version"))
    provenance.update(extra or {})
    return {"vit_config": vit_cfg.to_dict(), "birder_config": dict(cfg), "signature": cfg["signature"],
            "rgb_stats": cfg["rgb_stats"], "dtype": dtype, "provenance": provenance}


def save_model(directory: str | os.PathLike[str], net: ViT, cfg: Mapping[str, Any], *,
               source: WeightsSource | None = None, force: bool = False,
               extra: Mapping[str, Any] | None = None) -> Path:
    """Save a model as a vitreg-jax checkpoint directory (see ``vitreg_jax.model.checkpoint``)."""
    params = unflatten(get_params(net))
    # the signature follows the model (adjust_size may have changed its size since the config was read)
    cfg = {**cfg, "signature": birder_config(net.cfg, cfg["rgb_stats"])["signature"]}
    meta = checkpoint_metadata(net.cfg, cfg, source=source, extra=extra)
    return save_checkpoint(directory, params, meta, force=force)
