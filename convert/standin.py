"""Weights for the demo and the notebooks: the published model when it is on this machine, else a stand-in.

The published ``vit_reg4_b16_mim`` weights are used when they are already in the weights cache (see
``vitreg_jax.convert.hub``; nothing here touches the network). Otherwise :func:`write_standin` writes a
*stand-in*: birder's own ``vit_reg4_b16`` with birder's random initialisation from a fixed torch seed, saved
with birder's own save functions (``fs_ops.checkpoint_model`` and ``fs_ops.write_config``), i.e. exactly the
kind of ``.pt`` + ``.json`` pair birder publishes. Its numbers are **not** the published model's: it shows
the machinery (conversion, parity, embedding), not what the trained model sees.

When birder (and torch) are not installed, the stand-in is vitreg-jax's own initialisation from the same seed,
written as a birder ``.safetensors`` file by vitreg-jax's torch-free writer; :attr:`Weights.writer` says
which happened.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from vitreg_jax.data.rgb_stats import named_rgb_stats
from vitreg_jax.errors import UserError
from vitreg_jax.fileio import atomic_write_json, first_line

if TYPE_CHECKING:
    import torch

STANDIN_SEED = 0
STANDIN_NETWORK = "vit_reg4_b16"
STANDIN_NAME = "vit_reg4_b16_standin"  # files: <name>_<epoch>.pt and <name>.json (never the published names)
STANDIN_EPOCH = 0
# The rgb_stats vit_reg4_b16_mim was trained with (birder's "birder" statistics of that time): the stand-in
# carries them so that preprocessing is the published model's.
MIM_RGB_STATS: dict[str, list[float]] = named_rgb_stats("vit_reg4_b16_mim")
# A tiny vit_reg4_b16 (same patch size and registers) for fast tests and the --quick demo.
TINY_MODEL_CONFIG: dict[str, int] = {"num_layers": 2, "hidden_dim": 64, "num_heads": 2, "mlp_dim": 128}
# Published names, most trained first; the first one found in the cache is used.
PUBLISHED_PREFERENCE = ("vit_reg4_b16_mim_300", "vit_reg4_b16_mim_200", "vitreg4_b16_mim_200")
SAMPLES = Path("examples/images")  # the bundled sample photos, relative to the repository root


@dataclass(frozen=True)
class Weights:
    """A birder weights file to start from, and what it is."""

    weights: Path  # birder .pt or .safetensors
    config: Path | None  # birder's json beside it (None: read from the file / inferred)
    kind: Literal["published", "standin", "file"]
    writer: Literal["birder", "vitreg-jax"] | None = None  # who wrote a stand-in
    published_name: str | None = None
    layout: str | None = None  # key layout of a published file ("current" / "legacy")
    tiny: bool = False  # a stand-in with TINY_MODEL_CONFIG instead of the full-size network

    @property
    def is_standin(self) -> bool:
        return self.kind == "standin"

    def describe(self) -> str:
        """One line for people: what these weights are."""
        if self.kind == "published":
            return f"published {self.published_name} ({self.weights})"
        if self.kind == "file":
            return f"{self.weights}"
        who = (
            f"birder's own random init (torch.manual_seed({STANDIN_SEED})), saved with birder's fs_ops"
            if self.writer == "birder"
            else f"vitreg-jax's own random init (seed {STANDIN_SEED}; birder was not used), saved as a "
            "birder .safetensors"
        )
        size = "a tiny 2-layer vit_reg4_b16" if self.tiny else "the full-size vit_reg4_b16"
        return f"STAND-IN weights, not the published model: {size} with {who} ({self.weights.name})"


def sample_images_dir() -> Path:
    """The bundled sample images: beside the source tree (editable install), else under the current folder."""
    here = Path(__file__).resolve().parents[1] / SAMPLES
    if here.is_dir():
        return here
    for base in (Path.cwd(), *Path.cwd().parents):
        if (base / SAMPLES).is_dir():
            return base / SAMPLES
    return SAMPLES


# birder availability -------------------------------------------------------------------------------------
def birder_missing() -> str | None:
    """None when birder and torch import; otherwise why not (one line)."""
    try:
        _quiet_torch_logs()
        import birder  # noqa: F401
        import torch  # noqa: F401
    except ImportError as e:
        return f"{e.name or 'birder'} is not installed (pip install 'vitreg-jax[test]')"
    except Exception as e:  # noqa: BLE001 - a broken torch/torchvision pair raises all sorts of errors
        return f"birder does not import here ({type(e).__name__}: {first_line(e)})"
    logging.getLogger("birder").setLevel(logging.WARNING)  # its INFO lines ("Saving ...") are noise here
    return None


def _quiet_torch_logs() -> None:
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime is found"


# published weights, offline ------------------------------------------------------------------------------
def cached_published(
    names: tuple[str, ...] = PUBLISHED_PREFERENCE, cache_dir: str | os.PathLike[str] | None = None
) -> Weights | None:
    """The published weights if one of ``names`` is already in the cache with a known sha256, else None.

    Never touches the network (``hub.cached``: the json config too comes from the cache only).
    """
    from vitreg_jax.convert import hub

    for name in names:
        resolved = hub.cached(name, cache_dir=cache_dir)
        if resolved is None:
            continue
        return Weights(
            weights=resolved.weights,
            config=resolved.config,
            kind="published",
            published_name=name,
            layout=resolved.layout,
        )
    return None


def fetch_published(name: str) -> Weights:
    """A published name, downloaded once if needed (raises ``UserError`` when it cannot be had)."""
    from vitreg_jax.convert import hub

    resolved = hub.resolve(name)
    return Weights(
        weights=resolved.weights,
        config=resolved.config,
        kind="published",
        published_name=name,
        layout=resolved.layout,
    )


# the stand-in --------------------------------------------------------------------------------------------
def write_standin(
    directory: str | os.PathLike[str],
    *,
    network: str = STANDIN_NETWORK,
    seed: int = STANDIN_SEED,
    model_config: Mapping[str, Any] | None = None,
    size: tuple[int, int] = (224, 224),
    rgb_stats: Mapping[str, Any] = MIM_RGB_STATS,
    use_birder: bool | None = None,
) -> Weights:
    """Write stand-in weights (``.pt`` + ``.json`` by birder, or ``.safetensors`` + ``.json`` without it).

    ``model_config`` overrides birder's registered config of ``network`` (e.g. :data:`TINY_MODEL_CONFIG`).
    ``use_birder=None`` uses birder when it imports. The same arguments always give the same weights.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if use_birder is None:
        use_birder = birder_missing() is None
    write = _standin_by_birder if use_birder else _standin_by_us
    weights = write(directory, network, seed, model_config, size, rgb_stats)
    return dataclasses.replace(weights, tiny=model_config == TINY_MODEL_CONFIG)


def birder_standin_net(
    network: str = STANDIN_NETWORK,
    seed: int = STANDIN_SEED,
    model_config: Mapping[str, Any] | None = None,
    size: tuple[int, int] = (224, 224),
) -> torch.nn.Module:
    """birder's network with birder's own random init from ``torch.manual_seed(seed)``, in eval mode."""
    _quiet_torch_logs()
    import torch
    from birder.model_registry import registry

    torch.manual_seed(seed)
    config = None if model_config is None else dict(model_config)
    return registry.net_factory(network, 0, 3, config=config, size=size).eval()


@contextlib.contextmanager
def birder_models_dir(directory: Path) -> Iterator[None]:
    """birder's fs_ops write under ``settings.MODELS_DIR``."""
    from birder.conf import settings

    old = settings.MODELS_DIR
    settings.MODELS_DIR = directory
    try:
        yield
    finally:
        settings.MODELS_DIR = old


def _signature(size: tuple[int, int], num_classes: int = 0) -> dict[str, Any]:
    return {
        "inputs": [{"data_shape": [0, 3, size[0], size[1]]}],
        "outputs": [{"data_shape": [0, num_classes]}],
    }


def _standin_by_birder(
    directory: Path,
    network: str,
    seed: int,
    model_config: Mapping[str, Any] | None,
    size: tuple[int, int],
    rgb_stats: Mapping[str, Any],
) -> Weights:
    if birder_missing() is not None:
        raise UserError(f"cannot write the stand-in with birder: {birder_missing()}")
    from birder.common import fs_ops

    net = birder_standin_net(network, seed, model_config, size)
    sig = _signature(size)
    stats = {"mean": list(rgb_stats["mean"]), "std": list(rgb_stats["std"])}
    with birder_models_dir(directory):
        fs_ops.checkpoint_model(STANDIN_NAME, STANDIN_EPOCH, net, sig, {}, stats, None, None, None, None)
        fs_ops.write_config(STANDIN_NAME, net, sig, stats)
    return Weights(
        weights=directory / f"{STANDIN_NAME}_{STANDIN_EPOCH}.pt",
        config=directory / f"{STANDIN_NAME}.json",
        kind="standin",
        writer="birder",
    )


def _standin_by_us(
    directory: Path,
    network: str,
    seed: int,
    model_config: Mapping[str, Any] | None,
    size: tuple[int, int],
    rgb_stats: Mapping[str, Any],
) -> Weights:
    from vitreg_jax.convert import mapping
    from vitreg_jax.convert.formats.birder_file import write_birder_file
    from vitreg_jax.model.birder_json import birder_config
    from vitreg_jax.model.build import build_model, get_params
    from vitreg_jax.model.config import preset

    vit_cfg = preset(network, image_size=size, model_config=dict(model_config or {}))
    net = build_model(vit_cfg, seed=seed)
    cfg = birder_config(vit_cfg, rgb_stats, registered_name=network)
    state = mapping.to_birder(get_params(net), vit_cfg)
    weights = directory / f"{STANDIN_NAME}_{STANDIN_EPOCH}.safetensors"
    write_birder_file(
        weights, state, {"task": cfg["task"], "signature": cfg["signature"], "rgb_stats": cfg["rgb_stats"]}
    )
    config = directory / f"{STANDIN_NAME}.json"
    atomic_write_json(config, cfg)
    return Weights(weights=weights, config=config, kind="standin", writer="vitreg-jax")


def demo_weights(
    directory: str | os.PathLike[str],
    *,
    quick: bool = False,
    use_birder: bool | None = None,
    prefer_published: bool = True,
) -> Weights:
    """What the demo and the notebooks start from: the cached published weights, else a stand-in.

    ``quick`` writes a tiny stand-in (:data:`TINY_MODEL_CONFIG`) instead and never uses published weights.
    """
    if prefer_published and not quick:
        found = cached_published()
        if found is not None:
            return found
    return write_standin(directory, model_config=TINY_MODEL_CONFIG if quick else None, use_birder=use_birder)
