"""Build models from configs, move parameters in and out, and save / load checkpoint directories.

:func:`build_model` initialises one from a ``ViTConfig`` or a birder config (read by
:mod:`vitreg_jax.model.birder_json`), :func:`abstract_model` gives its shapes only.
:func:`model_from_checkpoint` loads a vitreg-jax (Orbax) checkpoint directory and :func:`save_model` writes
one. Nothing here reads birder weight files: the converter package does (``convert/load.py``;
``vitreg_jax.load_model_with_cfg`` loads any source: birder files, published names and checkpoints).
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
from vitreg_jax.errors import UserError
from vitreg_jax.model.birder_json import birder_config, read_birder_config, vit_config_from_birder
from vitreg_jax.model.checkpoint import load_checkpoint, save_checkpoint
from vitreg_jax.model.config import ViTConfig
from vitreg_jax.model.vit import ViT
from vitreg_jax.tree import check_fit, flatten, int_keys, unflatten

if TYPE_CHECKING:
    from jax.typing import DTypeLike

    from vitreg_jax.tree import ParamPath


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


# models and parameters ---------------------------------------------------------------------------------
def build_model(cfg: ViTConfig | Mapping[str, Any], *, seed: int = 0) -> ViT:
    """A randomly initialised model (birder's init distributions) from a ViTConfig or a birder config."""
    vit_cfg = cfg if isinstance(cfg, ViTConfig) else vit_config_from_birder(cfg)
    return ViT(vit_cfg, rngs=nnx.Rngs(seed))


def abstract_model(vit_cfg: ViTConfig) -> ViT:
    """The model's structure with shape-only parameters (no init), to be filled by ``set_params``."""
    return nnx.eval_shape(lambda: ViT(vit_cfg, rngs=nnx.Rngs(0)))


def _variables(net: nnx.Module, kinds: tuple[type[nnx.Variable], ...]) -> dict[ParamPath, Any]:
    return flatten(nnx.to_pure_dict(nnx.state(net, kinds)))


def get_params(
    net: nnx.Module, kinds: tuple[type[nnx.Variable], ...] = (nnx.Param,)
) -> dict[ParamPath, np.ndarray]:
    """{path: numpy array} of a model's variables of ``kinds`` (default: its parameters; list indices as
    ints)."""
    return {k: np.asarray(v) for k, v in _variables(net, kinds).items()}


def set_params(
    net: nnx.Module,
    params: Mapping[ParamPath, np.ndarray | jnp.ndarray],
    dtype: DTypeLike = jnp.float32,
    *,
    kinds: tuple[type[nnx.Variable], ...] = (nnx.Param,),
    what: str = "parameters do not fit the model",
) -> nnx.Module:
    """Put arrays into the model's variables of ``kinds``, refusing (``what``) missing, extra or mis-shaped
    ones."""
    current = _variables(net, kinds)  # shapes only: ``net`` may be abstract
    check_fit(params, {k: v.shape for k, v in current.items()}, what)
    nnx.update(net, unflatten({k: jnp.asarray(np.asarray(v), dtype) for k, v in params.items()}))
    return net


# checkpoint directories --------------------------------------------------------------------------------
def model_from_checkpoint(
    directory: str | os.PathLike[str], config: str | os.PathLike[str] | Mapping[str, Any] | None = None
) -> tuple[ViT, dict[str, Any]]:
    """(model, birder config dict) of a vitreg-jax checkpoint; ``config`` replaces the one it carries."""
    params, meta = load_checkpoint(directory)
    if config is None and not isinstance(meta.get("birder_config"), Mapping):
        raise UserError(f"{directory}: damaged checkpoint (its metadata has no birder_config object)")
    cfg = read_birder_config(config) if config is not None else dict(meta["birder_config"])
    net = set_params(abstract_model(vit_config_from_birder(cfg)), int_keys(flatten(params)))
    return net, cfg


def checkpoint_metadata(
    vit_cfg: ViTConfig,
    cfg: Mapping[str, Any],
    *,
    source: WeightsSource | None = None,
    dtype: str = "float32",
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """``metadata.json`` content: configs, signature, rgb_stats and where the weights came from."""
    provenance: dict[str, Any] = {"converter": "vitreg-jax", "converter_version": __version__}
    if source is not None:
        provenance.update(
            source_file=source.path.name,
            source_sha256=source.sha256,
            source_format=source.format,
            source_dtypes=source.dtypes,
            birder_version=source.meta.get("birder_version"),
        )
    provenance.update(extra or {})
    return {
        "vit_config": vit_cfg.to_dict(),
        "birder_config": dict(cfg),
        "signature": cfg["signature"],
        "rgb_stats": cfg["rgb_stats"],
        "dtype": dtype,
        "provenance": provenance,
    }


def save_model(
    directory: str | os.PathLike[str],
    net: ViT,
    cfg: Mapping[str, Any],
    *,
    source: WeightsSource | None = None,
    force: bool = False,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Save a model as a vitreg-jax checkpoint directory (see ``vitreg_jax.model.checkpoint``)."""
    params = unflatten(get_params(net))
    # the signature follows the model (adjust_size may have changed its size since the config was read)
    cfg = {**cfg, "signature": birder_config(net.cfg, cfg["rgb_stats"])["signature"]}
    meta = checkpoint_metadata(net.cfg, cfg, source=source, extra=extra)
    return save_checkpoint(directory, params, meta, force=force)
