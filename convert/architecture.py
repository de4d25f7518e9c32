"""The architecture of a birder file: its json config, else its own metadata and tensor shapes.

``load_source(src, config, network)`` reads a birder file or published name and decides its architecture the
way ``convert``, ``export`` and ``info`` do: ``config`` (birder's json), else the json published beside a
published name, else the file itself (``vitreg_jax.convert.infer``); ``network`` names the architecture
instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vitreg_jax.errors import UserError

if TYPE_CHECKING:
    from vitreg_jax.convert.formats.birder_file import BirderFile
    from vitreg_jax.convert.hub import Resolved
    from vitreg_jax.model.config import ViTConfig


@dataclass
class Architecture:
    """A birder file's architecture, its birder json config, and how it was decided."""

    cfg: dict[str, Any]  # birder's json config dict (registered_name is a name birder 0.8.4 knows)
    vit_cfg: ViTConfig
    source: str  # where the architecture came from, for people
    layout: str  # the file's state_dict key layout
    notes: tuple[str, ...] = field(default_factory=tuple)


def resolve_architecture(
    bfile: BirderFile,
    config: str | os.PathLike[str] | None,
    network: str | None,
    config_origin: str = "--config",
) -> Architecture:
    """The architecture of a birder file: its json (``config``), else its metadata and tensor shapes;
    ``network`` overrides either."""
    from vitreg_jax.convert import infer, mapping
    from vitreg_jax.model.birder_json import read_birder_config, vit_config_from_birder
    from vitreg_jax.model.config import canonical_name, preset

    if config is None:
        inf = infer.infer(bfile.state, bfile.meta, network=network, path=bfile.path)
        return Architecture(inf.birder_config, inf.vit_config, inf.source, inf.layout, inf.notes)
    cfg = read_birder_config(config)
    notes: list[str] = []
    if network is not None:
        size, classes, channels = infer.signature_info(cfg["signature"], f"{config}: ")
        vit_cfg = preset(network, image_size=size, num_classes=classes, in_channels=channels)
        cfg.update(name="vit", registered_name=canonical_name(network), model_config=vit_cfg.to_birder())
        source = f"--network {network} (size, classes and rgb_stats from {config_origin} {config})"
    else:
        vit_cfg = vit_config_from_birder(cfg)
        source = f"{config_origin} {config}"
    name = infer.birder_network_name(cfg.get("registered_name"), vit_cfg)
    if name != cfg.get("registered_name"):
        notes.append(
            f"registered_name {cfg.get('registered_name')!r} is not a name birder 0.8.4 knows; using {name!r}"
        )
    cfg.update(name="vit", registered_name=name, model_config=vit_cfg.to_birder())
    cfg.pop("alias", None)
    cfg.pop("net_param", None)
    cfg["rgb_stats"] = infer.check_rgb_stats(cfg["rgb_stats"], f"{config}: ")
    own = bfile.meta.get("rgb_stats")
    if own is not None and own != cfg["rgb_stats"]:
        notes.append(f"rgb_stats from the json {cfg['rgb_stats']}; the weights file records {own}")
    _, layout = mapping.normalize_keys(bfile.state, vit_cfg.num_layers)
    return Architecture(cfg, vit_cfg, source, layout, tuple(notes))


def load_source(
    src: str, config: str | None, network: str | None
) -> tuple[Resolved, BirderFile, Architecture]:
    """(hub.Resolved, BirderFile, Architecture) for a file path or a published name."""
    resolved, bfile = read_source(src)
    return resolved, bfile, source_architecture(resolved, bfile, config, network)


def read_source(src: str) -> tuple[Resolved, BirderFile]:
    """A birder file path or published name (downloaded and checked once), read; a checkpoint is refused."""
    from vitreg_jax.convert import hub
    from vitreg_jax.convert.formats.birder_file import read_birder_file
    from vitreg_jax.model.checkpoint import is_checkpoint

    if is_checkpoint(src):
        raise UserError(
            f"{src}: is a vitreg-jax checkpoint already (use `vitreg-jax export` to go back to birder)"
        )
    resolved = hub.resolve(src)
    return resolved, read_birder_file(resolved.weights)


def source_architecture(
    resolved: Resolved, bfile: BirderFile, config: str | None, network: str | None
) -> Architecture:
    """--config, else the json published beside a published name, else the file itself."""
    if config is None and resolved.config is not None:
        try:
            return resolve_architecture(bfile, str(resolved.config), network, "the published json")
        except UserError as e:  # the hub's json is optional and unchecked: the file itself still decides
            arch = resolve_architecture(bfile, None, network)
            arch.notes = (f"the published json was not used ({e})", *arch.notes)
            return arch
    return resolve_architecture(bfile, config, network)
