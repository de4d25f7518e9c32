"""Named RGB normalisation statistics: the one table of them in vitreg-jax.

The names are birder 0.8.4's ``get_rgb_stats`` modes (``birder.data.transforms.classification``), plus the
statistics the published ``vit_reg4_b16_mim`` weights were trained with (birder's "birder" statistics of that
time, recorded in their ``.json``). A weights file carries its own ``rgb_stats``; these names are for runs
that choose them (``pretrain --rgb-stats``) and for tests and notebooks.
"""

from __future__ import annotations

from vitreg_jax.errors import UserError

RGB = tuple[float, float, float]

RGB_STATS: dict[str, dict[str, RGB]] = {
    "birder": {"mean": (0.5191, 0.5306, 0.4877), "std": (0.2316, 0.2304, 0.2588)},
    "imagenet": {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)},
    "clip": {"mean": (0.48145466, 0.4578275, 0.40821073), "std": (0.26862954, 0.26130258, 0.27577711)},
    "neutral": {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)},
    "centered": {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)},
    "vit_reg4_b16_mim": {"mean": (0.5248, 0.5372, 0.5086), "std": (0.2135, 0.2103, 0.2622)},
}
BIRDER_MODES = ("birder", "imagenet", "clip", "neutral", "centered")  # the names birder's get_rgb_stats knows
TRAIN_DEFAULT = "birder"  # birder's training scripts' default


def named_rgb_stats(name: str) -> dict[str, list[float]]:
    """``{"mean": [r, g, b], "std": [r, g, b]}`` (a fresh, JSON-shaped copy) for one of :data:`RGB_STATS`."""
    if name not in RGB_STATS:
        raise UserError(f"unknown rgb stats {name!r} (known: {', '.join(sorted(RGB_STATS))})")
    return {key: list(values) for key, values in RGB_STATS[name].items()}
