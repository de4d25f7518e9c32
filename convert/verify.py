"""``--verify``: run birder and vitreg-jax on the same fixed input and compare their embeddings.

birder (0.8.4) is the reference; it is imported only here, only when asked. The input is generated once with
numpy (never assume two RNGs agree) and fed to both: NHWC to us, NCHW to birder. Both run in float32 on the
CPU; bf16/fp16 stored weights are widened to float32 identically on both sides.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from vitreg_jax.errors import UserError
from vitreg_jax.fileio import first_line

if TYPE_CHECKING:
    import torch

    from vitreg_jax.model.vit import ViT

# The project's fp32 parity bar against birder: birder's own fp32 floor for vit_reg4_b16 embeddings (its
# distance to itself in float64) is 5e-6 to 9e-6, and a wrong mapping shows up as O(0.1..1). Shipped checks
# (`convert --verify`, `export --verify`, the demo) use this; the tests take theirs from
# tests/support/tolerances.py.
VERIFY_ATOL = 2e-5
VERIFY_BATCH = 2
VERIFY_SEED = 0


@dataclass(frozen=True)
class Verification:
    max_abs_diff: float
    tolerance: float
    input_shape: tuple[int, ...]  # NHWC

    @property
    def ok(self) -> bool:
        return bool(self.max_abs_diff <= self.tolerance)  # NaN fails

    def line(self) -> str:
        verdict = "OK" if self.ok else "FAILED"
        b, h, w, _ = self.input_shape
        return (
            f"verify: max |embedding difference| vs birder = {self.max_abs_diff:.2e} on {b} fixed "
            f"{h}x{w} inputs (tolerance {self.tolerance:.0e}): {verdict}"
        )


def fixed_input(
    image_size: tuple[int, int], channels: int = 3, batch: int = VERIFY_BATCH, seed: int = VERIFY_SEED
) -> np.ndarray:
    """(B, H, W, C) float32, standard normal: roughly what a normalised image looks like."""
    h, w = image_size
    return np.random.default_rng(seed).standard_normal((batch, h, w, channels), dtype=np.float32)


def _birder() -> ModuleType:
    """Import birder (quietly: its torch import logs a CUDA notice on CPU-only machines)."""
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    try:
        import birder
        import torch
    except ImportError as e:
        raise UserError(
            f"--verify needs birder and torch ({e.name} is not installed): pip install 'vitreg-jax[test]'"
        ) from None
    logging.getLogger("birder").setLevel(logging.WARNING)  # its INFO lines ("Reading ...") are noise here
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    return birder


def _birder_embedding(net: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    import torch

    net.eval()
    with torch.no_grad():
        return net.embedding(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).numpy()


def birder_embedding_from_state(
    cfg: Mapping[str, Any], network: str, state: Mapping[str, np.ndarray], x: np.ndarray
) -> np.ndarray:
    """birder's net for ``cfg`` (registered ``network``) holding ``state`` (today's key names), loaded
    strictly, on ``x`` (NHWC)."""
    _birder()
    import torch
    from birder.model_registry import registry

    from vitreg_jax.convert.infer import signature_info

    size, num_classes, channels = signature_info(cfg["signature"])
    net = registry.net_factory(network, num_classes, channels, config=dict(cfg["model_config"]), size=size)
    tensors = {
        k: torch.from_numpy(np.ascontiguousarray(np.asarray(v, dtype=np.float32))) for k, v in state.items()
    }
    try:
        net.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise UserError(f"verify: birder refuses these weights for {network}: {first_line(e)}") from None
    return _birder_embedding(net, x)


def birder_embedding_from_files(
    config_path: os.PathLike[str] | str, weights_path: os.PathLike[str] | str, x: np.ndarray
) -> np.ndarray:
    """Exactly what a birder user runs: ``birder.load_model_with_cfg(json, weights)`` (strict), on ``x``."""
    birder = _birder()
    try:
        net, _ = birder.load_model_with_cfg(str(config_path), str(weights_path))
    except (RuntimeError, KeyError, ValueError) as e:
        raise UserError(
            f"verify: birder.load_model_with_cfg refuses {weights_path}: {first_line(e)}"
        ) from None
    return _birder_embedding(net, x)


def our_embedding(net: ViT, x: np.ndarray) -> np.ndarray:
    import jax
    import jax.numpy as jnp

    with jax.default_matmul_precision("highest"):  # no TF32/bf16 passes on GPU/TPU
        return np.asarray(net.embedding(jnp.asarray(x)))


def compare(
    ours: np.ndarray, theirs: np.ndarray, x: np.ndarray, tolerance: float = VERIFY_ATOL
) -> Verification:
    """max |ours - birder's| (float64 arithmetic) on the input ``x`` both were given."""
    if ours.shape != theirs.shape:
        raise UserError(f"verify: embedding shapes differ: ours {ours.shape}, birder's {theirs.shape}")
    diff = float(np.max(np.abs(ours.astype(np.float64) - theirs.astype(np.float64)))) if ours.size else 0.0
    return Verification(max_abs_diff=diff, tolerance=tolerance, input_shape=tuple(x.shape))
