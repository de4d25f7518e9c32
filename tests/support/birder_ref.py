"""Helpers that run birder (the reference) beside our port on the same numpy inputs."""

from __future__ import annotations

from typing import Any

import numpy as np

from vitreg_jax.data.rgb_stats import named_rgb_stats


def birder_net(
    name: str, *, seed: int, config: dict[str, Any] | None = None, size=(224, 224), num_classes: int = 0
):
    """birder's network with its own random init from a fixed torch seed, in eval mode, dynamic size on."""
    import torch
    from birder.model_registry import registry

    torch.manual_seed(seed)
    net = registry.net_factory(name, num_classes, 3, config=config, size=size).eval()
    net.set_dynamic_size(True)
    return net


def state_numpy(net) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in net.state_dict().items()}


def load_state(net, state: dict[str, np.ndarray]) -> None:
    import torch

    net.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()})


def nchw(x: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def run(fn, x: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return fn(nchw(x)).detach().numpy()


def ours_from_birder(tnet, image_size=(224, 224)):
    """Our model holding exactly birder's weights (through the conversion table)."""
    from vitreg_jax.convert import mapping
    from vitreg_jax.model.build import abstract_model, set_params
    from vitreg_jax.model.config import ViTConfig

    cfg = ViTConfig.from_birder(tnet.config, image_size=image_size, num_classes=tnet.num_classes)
    return set_params(abstract_model(cfg), mapping.to_nnx(state_numpy(tnet), cfg))


def block_outputs_birder(tnet, x: np.ndarray) -> list[np.ndarray]:
    outs: list[np.ndarray] = []
    hooks = [
        b.register_forward_hook(lambda _m, _i, o: outs.append(o.detach().numpy())) for b in tnet.encoder.block
    ]
    try:
        run(tnet.forward_features, x)
    finally:
        for h in hooks:
            h.remove()
    return outs


def first_divergence(tnet, net, x: np.ndarray, atol_rel: float = 1e-5) -> str:
    """Which block's output first differs from birder's, and by how much (for failure messages)."""
    import jax.numpy as jnp

    ref = block_outputs_birder(tnet, x)
    ours = net.encoder(net._tokens(jnp.asarray(x)), return_indices=tuple(range(len(ref))))
    for i, (a, b) in enumerate(zip(ref, ours, strict=True)):
        d = float(np.abs(a - np.asarray(b)).max())
        if d > atol_rel * max(1.0, float(np.abs(a).max())):
            return f"block {i} diverges first: max |diff| {d:.2e} (max |x| {np.abs(a).max():.1f})"
    return "no block output diverges beyond the relative tolerance; look at the final norm / pooling"


OLD_BIRDER_RGB = named_rgb_stats("vit_reg4_b16_mim")  # vit_reg4_b16_mim's era


def save_birder_files(
    tnet, directory, name: str = "vit_reg4_b16_mim", epoch: int = 200, rgb_stats=OLD_BIRDER_RGB
) -> dict[str, str]:
    """Write `.pt`, `.json` and `.safetensors` with birder's own save functions; returns their paths."""
    from pathlib import Path

    from birder.common import fs_ops
    from birder.conf import settings

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    h, w = tnet.size
    sig = {"inputs": [{"data_shape": [0, 3, h, w]}], "outputs": [{"data_shape": [0, tnet.num_classes]}]}
    old = settings.MODELS_DIR
    settings.MODELS_DIR = directory
    try:
        fs_ops.checkpoint_model(name, epoch, tnet, sig, {}, rgb_stats, None, None, None, None)
        fs_ops.write_config(name, tnet, sig, rgb_stats)
    finally:
        settings.MODELS_DIR = old
    st = directory / f"{name}_{epoch}.safetensors"
    fs_ops.save_st(tnet, str(st), "image_classification", {}, sig, rgb_stats)
    return {
        "pt": str(directory / f"{name}_{epoch}.pt"),
        "json": str(directory / f"{name}.json"),
        "safetensors": str(st),
    }
