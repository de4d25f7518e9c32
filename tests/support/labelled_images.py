"""Writes small labelled image folders (the ImageFolder layout) for the evaluation tests."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image


def write_split(
    root: Path,
    classes: Mapping[str, tuple[int, int, int]],
    per_class: int,
    seed: int,
    *,
    noise: float,
    side: int,
) -> Path:
    """``root/CLASS/NN.png``: noisy images tinted by class, so the classes are learnable but not trivially."""
    rng = np.random.default_rng(seed)
    for name, tint in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(rng.normal(tint, noise, (side, side, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:02d}.png")
    return root
