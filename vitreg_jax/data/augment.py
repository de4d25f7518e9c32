"""birder's level-1 training augmentation (``training_preset(size, "birder", 1, rgb_stats)``) in PIL + numpy.

birder 0.8.4 (``data/transforms/classification.py``, the ``tv`` loader gives uint8 CHW tensors) applies:

1. ``RandomResizedCrop(size, scale=(0.3, 1.0), ratio=(3/4, 4/3), antialias=True)``, the interpolation drawn
   from {bilinear, bicubic} for each image (``--resize-min-scale 0.3`` in ``train_mim.py``);
2. ``BirderAugment(level=1, re_prob=0.0)``: exactly two ops drawn with replacement from
   {identity, ``RandomAffine(degrees=2.25)`` (nearest, fill 0), ``ColorJitter(brightness=0.2125)``,
   ``ColorJitter(contrast=0.075)``} (level 1 has no hue change and no random erasing);
3. ``RandomHorizontalFlip(0.5)``;
4. ``ToDtype(float32, scale=True)`` (a multiply by float32 1/255) and ``Normalize(rgb_stats)``.

Each op below is written to give torchvision's numbers for the same parameters (uint8 arithmetic, truncation,
nearest sampling with round-half-even); the parameters come from a ``numpy.random.Generator`` so an image's
augmentation is a pure function of the seed it is given (``training_data`` seeds it with (seed, epoch,
position)). Level 0 (birder: a bicubic resize to the size, nothing else) is also provided.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from vitreg_jax.data.preprocess import UINT8_SCALE, to_rgb
from vitreg_jax.errors import UserError

# birder's BirderAugment(level) magnitudes, at level 1
LEVEL = 1
AFFINE_DEGREES = 2.25 * LEVEL
BRIGHTNESS = 0.2 + 0.0125 * LEVEL
CONTRAST = 0.05 + 0.025 * LEVEL
NUM_OPS = 2  # min_ops = 2, max_ops = max(2, (level + 1) // 2) = 2
OPS = ("identity", "affine", "brightness", "contrast")
HFLIP_PROB = 0.5
CROP_SCALE = (0.3, 1.0)  # train_mim.py --resize-min-scale 0.3 (birder's level-1 default would be 0.75)
CROP_RATIO = (3 / 4, 4 / 3)
CROP_TRIES = 10
CROP_INTERPOLATIONS = (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC)
# torchvision's rgb_to_grayscale weights (used by adjust_contrast)
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)


# parameters -----------------------------------------------------------------------------------------------
def crop_params(
    rng: np.random.Generator,
    height: int,
    width: int,
    scale: tuple[float, float] = CROP_SCALE,
    ratio: tuple[float, float] = CROP_RATIO,
) -> tuple[int, int, int, int]:
    """torchvision ``RandomResizedCrop.make_params``: (top, left, h, w) of the crop box."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(CROP_TRIES):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height  # fallback: central crop at the nearest allowed aspect ratio
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        h, w = height, round(height * max(ratio))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


# ops on uint8 (H, W, 3) arrays ------------------------------------------------------------------------------
def resized_crop(
    img: Image.Image, box: tuple[int, int, int, int], size: tuple[int, int], resample: Image.Resampling
) -> np.ndarray:
    """Crop (top, left, h, w) then resize to size (H, W) with an antialiased filter: (H, W, 3) uint8.

    The crop comes first, as in torchvision, so the filter never reads pixels outside the box.
    """
    top, left, h, w = box
    crop = img.crop((left, top, left + w, top + h))
    if (h, w) != tuple(size):
        crop = crop.resize((size[1], size[0]), resample=resample)
    return np.asarray(crop, dtype=np.uint8)


def rotate_nearest(pixels: np.ndarray, angle: float) -> np.ndarray:
    """torchvision ``affine(angle, translate=0, scale=1, shear=0, NEAREST, fill=0)`` on a uint8 tensor.

    Output pixel centres, taken relative to the image centre, go through the inverse rotation
    [[cos, sin], [-sin, cos]]; the source pixel is the nearest one (round half to even, like grid_sample);
    sources outside the image give 0.
    """
    h, w = pixels.shape[:2]
    rot = math.radians(angle)
    cos, sin = np.float32(math.cos(rot)), np.float32(math.sin(rot))
    xs = np.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, w, dtype=np.float32)[None, :]  # (1, W)
    ys = np.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, h, dtype=np.float32)[:, None]  # (H, 1)
    src_x = (cos * xs + sin * ys) / np.float32(0.5 * w)  # (H, W) normalised to [-1, 1] like the affine grid
    src_y = (-sin * xs + cos * ys) / np.float32(0.5 * h)
    ix = np.rint(((src_x + 1) * w - 1) / 2).astype(np.int64)  # grid_sample, align_corners=False
    iy = np.rint(((src_y + 1) * h - 1) / 2).astype(np.int64)
    inside = (ix >= 0) & (ix < w) & (iy >= 0) & (iy < h)
    out = pixels[np.clip(iy, 0, h - 1), np.clip(ix, 0, w - 1)]  # (H, W, 3)
    out[~inside] = 0
    return out


def _blend_to_uint8(scaled: np.ndarray) -> np.ndarray:
    return np.clip(scaled, 0.0, 255.0).astype(np.uint8)  # torch: clamp_(0, 255) then .to(uint8) truncates


def adjust_brightness(pixels: np.ndarray, factor: float) -> np.ndarray:
    """torchvision ``adjust_brightness`` on uint8: ``clamp(x * factor)`` in float32, truncated."""
    return _blend_to_uint8(pixels.astype(np.float32) * np.float32(factor))


def adjust_contrast(pixels: np.ndarray, factor: float) -> np.ndarray:
    """torchvision ``adjust_contrast`` on uint8: blend with the mean of the floored grayscale image."""
    x = pixels.astype(np.float32)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    gray = np.floor(
        r * np.float32(GRAY_WEIGHTS[0]) + g * np.float32(GRAY_WEIGHTS[1]) + b * np.float32(GRAY_WEIGHTS[2])
    )
    mean = np.float32(gray.sum(dtype=np.float64)) / np.float32(gray.size)  # exact integer sum, float32 divide
    return _blend_to_uint8(x * np.float32(factor) + mean * np.float32(1.0 - factor))


# the transform ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainTransform:
    """birder's training preset at ``level`` 0 or 1: PIL image + Generator -> (H, W, 3) float32,
    normalised."""

    size: tuple[int, int]
    rgb_stats: Mapping[str, Any]
    level: int = 1
    crop_scale: tuple[float, float] = CROP_SCALE

    def __post_init__(self) -> None:
        if self.level not in (0, 1):
            raise UserError(
                f"augmentation level {self.level} is not implemented (vitreg-jax has birder's 0 and 1)"
            )
        try:
            mean = np.asarray(self.rgb_stats["mean"], np.float32).reshape(3)
            std = np.asarray(self.rgb_stats["std"], np.float32).reshape(3)
        except (KeyError, TypeError, ValueError):
            raise UserError(
                f"rgb_stats must hold three 'mean' and three 'std' values, got {self.rgb_stats!r}"
            ) from None
        object.__setattr__(self, "_mean", mean)
        object.__setattr__(self, "_std", std)

    @property
    def output_shape(self) -> tuple[int, int, int]:
        return (self.size[0], self.size[1], 3)

    def pixels(self, img: Image.Image, rng: np.random.Generator) -> np.ndarray:
        """The augmented uint8 (H, W, 3) image, before scaling and normalising."""
        img = to_rgb(img)
        if self.level == 0:
            if (img.height, img.width) != tuple(self.size):
                img = img.resize((self.size[1], self.size[0]), resample=Image.Resampling.BICUBIC)
            return np.asarray(img, dtype=np.uint8)
        resample = CROP_INTERPOLATIONS[int(rng.integers(len(CROP_INTERPOLATIONS)))]
        box = crop_params(rng, img.height, img.width, self.crop_scale)
        x = resized_crop(img, box, self.size, resample)
        for _ in range(NUM_OPS):
            op = OPS[int(rng.integers(len(OPS)))]
            if op == "affine":
                x = rotate_nearest(x, rng.uniform(-AFFINE_DEGREES, AFFINE_DEGREES))
            elif op == "brightness":
                x = adjust_brightness(x, rng.uniform(max(0.0, 1 - BRIGHTNESS), 1 + BRIGHTNESS))
            elif op == "contrast":
                x = adjust_contrast(x, rng.uniform(max(0.0, 1 - CONTRAST), 1 + CONTRAST))
        if rng.random() < HFLIP_PROB:
            x = x[:, ::-1]
        return np.ascontiguousarray(x)

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> np.ndarray:
        x = self.pixels(img, rng).astype(np.float32) * UINT8_SCALE  # ToDtype(float32, scale=True)
        return (x - self._mean) / self._std  # type: ignore[attr-defined]
