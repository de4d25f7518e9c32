"""Image preprocessing bit-exact with birder's inference transform, in PIL + numpy (no torch, no jax).

`classification_transform(size, rgb_stats)` gives the same float32 numbers as
`birder.classification_transform(size, rgb_stats)` (torchvision v2 on a PIL image), laid out NHWC
without the batch axis: (H, W, 3). `load_image` opens and fully decodes a file, turning every way a file
can be unreadable into one `ImageReadError` (a `UserError`) that names the path and the reason.
"""

from __future__ import annotations

import io
import math
import os
import threading
import warnings
from collections.abc import Mapping, Sequence
from typing import IO, Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vitreg_jax.errors import UserError
from vitreg_jax.fileio import NotARegularFile, open_regular_file

# torchvision's PIL resize kernel calls image.resize((w, h), resample=BICUBIC) and nothing else
# (no reducing_gap); antialias=True is a no-op for PIL, whose bicubic filter already widens its support
# when it downscales.
RESAMPLE = Image.Resampling.BICUBIC
# v2.ToDtype(float32, scale=True) multiplies by 1/255 rounded to float32; it does not divide by 255.
UINT8_SCALE = np.float32(1.0 / 255.0)
# 16-bit samples (0..65535) map onto 8-bit (0..255) as round(v / 257): 65535 -> 255 and 257 * k -> k.
SIXTEEN_BIT_MAX = 65535
SIXTEEN_BIT_DIVISOR = 257.0
# Float ("F") images are taken to hold 0.0..1.0 (black..white).
FLOAT_IMAGE_MAX = 1.0
UINT8_MAX = 255
# load_image refuses images with more pixels than this (about 300 megapixels, e.g. 20000 x 15000). PIL's
# own guard (Image.MAX_IMAGE_PIXELS) warns above ~89 MP and refuses above ~179 MP; load_image applies
# this limit instead, for its own calls only.
MAX_IMAGE_PIXELS = 300_000_000
RGB_STATS_KEYS = frozenset({"mean", "std"})
NUM_CHANNELS = 3

_INTEGER_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})
# PIL reads its decompression-bomb limit from a module global inside Image.open; this lock makes the
# short save / raise / restore around our own Image.open calls safe between our threads.
_PIXEL_LIMIT_LOCK = threading.Lock()


class ImageReadError(UserError):
    """An image file that could not be read: missing, unreadable, not an image, truncated, too large."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"cannot read image {path}: {reason}")
        self.path = path
        self.reason = reason


def get_size_from_signature(signature: Mapping[str, Any]) -> tuple[int, int]:
    """The model's input size (H, W) from birder's signature dict: `inputs[0]["data_shape"][2:4]`."""
    try:
        shape = signature["inputs"][0]["data_shape"]
        height, width = shape[2:4]
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise UserError(
            "signature has no inputs[0].data_shape of the form [N, C, H, W]: "
            f"got {signature!r:.200} ({type(e).__name__}: {e})"
        ) from None
    return _checked_size((height, width), "signature data_shape[2:4]")


def to_rgb(img: Image.Image) -> Image.Image:
    """Return `img` as an 8-bit RGB image (the same object when it is RGB already).

    - 1, L, P, RGBX, CMYK, YCbCr, LAB, HSV: PIL's `convert("RGB")`.
    - Modes with alpha (RGBA, LA, PA, P with a transparent colour): PIL's `convert("RGB")`, which drops
      the alpha channel and keeps the colour underneath it (no compositing onto a background). This is
      what birder's dataset loaders (`.convert("RGB")`) do.
    - 16/32-bit integer grayscale (I;16, I;16B, I;16L, I;16N, I): values are clipped to 0..65535 and
      mapped to 0..255 by round(value / 257) (PIL's own convert would clip at 255 instead). "I" is assumed
      to hold 16-bit data, which is what PIL decodes 16-bit PNG/TIFF files to.
    - Float grayscale (F): assumed to hold 0.0..1.0; mapped by round(value * 255), clipped, NaN -> 0.

    16-bit colour PNGs need nothing here: PIL already decodes them to 8-bit RGB(A) on opening.
    Raises `UserError` for a mode that PIL cannot turn into RGB.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _INTEGER_MODES:
        values = np.asarray(img.convert("I") if mode != "I" else img, dtype=np.int64)
        gray = np.rint(np.clip(values, 0, SIXTEEN_BIT_MAX) / SIXTEEN_BIT_DIVISOR).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if mode == "F":
        values = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0)
        scaled = np.rint(np.clip(values / FLOAT_IMAGE_MAX, 0.0, 1.0) * UINT8_MAX).astype(np.uint8)
        return Image.fromarray(scaled).convert("RGB")
    if mode == "La":  # premultiplied LA: PIL has no La -> RGB conversion, but has La -> LA
        img = img.convert("LA")
    try:
        return img.convert("RGB")
    except ValueError as e:
        raise UserError(f"cannot convert an image of mode {mode!r} to RGB: {e}") from None


def load_image(path: str | os.PathLike[str], *, max_pixels: int | None = MAX_IMAGE_PIXELS) -> Image.Image:
    """Open and fully decode an image file (first frame of multi-frame files); the file is closed again.

    Raises `ImageReadError` (a `UserError`) naming the path and the reason when the file is missing, is a
    directory, cannot be read, is not an image, is truncated or corrupt, or has more than `max_pixels`
    pixels (`None`: no limit). `max_pixels` replaces PIL's decompression-bomb limit for this call only.
    The EXIF orientation is not applied (see `classification_transform(exif_transpose=...)`), and the mode
    is left as stored (see `to_rgb`). A global `PIL.ImageFile.LOAD_TRUNCATED_IMAGES = True` set by the
    caller is honoured: truncated files then decode with grey fill instead of failing.
    """
    name = os.fspath(path)
    try:
        with open_regular_file(name) as handle:
            return _decode(handle, name, max_pixels)
    except ImageReadError:
        raise
    # PIL raises many types for corrupt data (OSError, SyntaxError, EOFError, struct.error, zlib.error...)
    except Exception as e:  # noqa: BLE001
        raise ImageReadError(name, _reason(e)) from None


def decode_image(data: bytes, name: str, *, max_pixels: int | None = MAX_IMAGE_PIXELS) -> Image.Image:
    """`load_image` for encoded bytes already in memory (a tar member, a remote file); `name` is for
    errors."""
    try:
        return _decode(io.BytesIO(data), name, max_pixels)
    except ImageReadError:
        raise
    # PIL raises many types for corrupt data (OSError, SyntaxError, EOFError, struct.error, zlib.error...)
    except Exception as e:  # noqa: BLE001
        raise ImageReadError(name, _reason(e)) from None


def _decode(handle: IO[bytes], name: str, max_pixels: int | None) -> Image.Image:
    """Open and fully decode the image in a binary file object, refusing more than `max_pixels` pixels."""
    img = _open_with_pixel_limit(handle, max_pixels)
    pixels = img.width * img.height
    if max_pixels is not None and pixels > max_pixels:
        raise ImageReadError(
            name,
            f"image too large: {img.width}x{img.height} = {pixels / 1e6:.0f} megapixels, "
            f"more than the limit of {max_pixels / 1e6:.0f}",
        )
    img.load()
    return img


def _open_with_pixel_limit(handle: IO[bytes], max_pixels: int | None) -> Image.Image:
    """Image.open with PIL's global bomb limit replaced by ours for the duration of the (header) read."""
    with _PIXEL_LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        # PIL now raises above twice max_pixels and warns above it; the caller refuses anything above it
        # with an ImageReadError, so PIL's DecompressionBombWarning would only repeat that on stderr: it is
        # ignored for this header read. (None instead would also switch PIL's check off for other threads.)
        Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                return Image.open(handle)
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _reason(error: BaseException) -> str:
    """A short, stable reason for a failed read."""
    if isinstance(error, FileNotFoundError):
        return "file not found"
    if isinstance(error, IsADirectoryError):
        return "is a directory"
    if isinstance(error, NotARegularFile):
        return error.strerror
    if isinstance(error, PermissionError):
        return "permission denied"
    if isinstance(error, UnidentifiedImageError):
        return "not an image file (unknown or empty format)"
    if isinstance(error, Image.DecompressionBombError):
        return f"image too large: {error}"
    if isinstance(error, MemoryError):
        return "out of memory while decoding"
    text = str(error)
    if "truncated" in text.lower() or isinstance(error, EOFError):
        return f"truncated file ({text})" if text else "truncated file"
    return f"corrupt image ({type(error).__name__}: {text})"


class ClassificationTransform:
    """PIL image -> float32 (H, W, 3) array, the numbers of birder's `inference_preset`.

    Steps (see `classification_transform`): optional EXIF transpose, `to_rgb`, bicubic resize, centre crop
    (zero padding when the crop is larger than the image), scale by float32(1/255), normalise.
    """

    def __init__(
        self,
        size: tuple[int, int],
        rgb_stats: Mapping[str, Any],
        center_crop: float = 1.0,
        simple_crop: bool = False,
        *,
        exif_transpose: bool = False,
    ) -> None:
        self.size = _checked_size(size, "size")
        if isinstance(center_crop, bool) or not isinstance(center_crop, (int, float)):
            raise UserError(f"center_crop must be a number > 0, got {center_crop!r}")
        if not math.isfinite(center_crop) or center_crop <= 0:
            raise UserError(f"center_crop must be a finite number > 0, got {center_crop!r}")
        self.center_crop = float(center_crop)
        self.simple_crop = bool(simple_crop)
        self.exif_transpose = bool(exif_transpose)
        # birder: base_size = (int(size[0] / center_crop), int(size[1] / center_crop))
        self.base_size = (int(self.size[0] / self.center_crop), int(self.size[1] / self.center_crop))
        if min(self.base_size) < 1 or self.base_size[0] * self.base_size[1] > MAX_IMAGE_PIXELS:
            raise UserError(
                f"center_crop={center_crop!r} with size={self.size} gives an impossible resize size "
                f"{self.base_size} (H, W)"
            )
        self.mean, self.std = _checked_rgb_stats(rgb_stats)

    @property
    def output_shape(self) -> tuple[int, int, int]:
        """(H, W, 3) of every array this transform returns."""
        return (*self.size, NUM_CHANNELS)

    def __call__(self, img: Image.Image) -> np.ndarray:
        if self.exif_transpose:
            img = ImageOps.exif_transpose(img)
        img = to_rgb(img)
        img = _resize(img, self._resize_size(img.height, img.width))
        pixels = _center_crop(np.asarray(img, dtype=np.uint8), self.size)  # (H, W, 3) uint8
        x = pixels.astype(np.float32) * UINT8_SCALE  # (H, W, 3) float32
        # Normalize: image.sub(mean).div(std), both float32, per channel (last axis here).
        return (x - self.mean) / self.std

    def _resize_size(self, height: int, width: int) -> tuple[int, int]:
        """(H, W) to resize to: the base size itself, or (simple_crop) the smallest cover of it."""
        if not self.simple_crop:
            return self.base_size  # v2.Resize with a 2-tuple squashes to exactly that size
        # birder's ResizeToCover: keep the aspect ratio (integer arithmetic), cover the base size.
        target_h, target_w = self.base_size
        if width * target_h >= height * target_w:  # wider than the target: fit the height
            return target_h, max(target_w, target_h * width // height)
        return max(target_h, target_w * height // width), target_w

    def __repr__(self) -> str:
        return (
            f"ClassificationTransform(size={self.size}, mean={self.mean.tolist()}, std={self.std.tolist()}, "
            f"center_crop={self.center_crop}, simple_crop={self.simple_crop}, "
            f"exif_transpose={self.exif_transpose})"
        )


def classification_transform(
    size: tuple[int, int],
    rgb_stats: Mapping[str, Any],
    center_crop: float = 1.0,
    simple_crop: bool = False,
    *,
    exif_transpose: bool = False,
) -> ClassificationTransform:
    """The callable `PIL.Image -> np.ndarray (H, W, 3) float32` that birder's inference transform computes.

    Bit-exact with `birder.classification_transform(size, rgb_stats, center_crop, simple_crop)` (which
    returns the same numbers as a CHW torch tensor) for every RGB image, and for any other mode that
    birder is given as `img.convert("RGB")`:
    1. the image goes through `to_rgb` (birder's inference path does not convert; its dataset loaders do);
    2. resize with PIL bicubic to `(int(H / center_crop), int(W / center_crop))`, ignoring the aspect
       ratio, or with `simple_crop=True` to the smallest aspect-preserving size that covers it;
    3. centre crop to `size` with torchvision's rounding, zero-padding where the crop is larger;
    4. `uint8 * float32(1/255)`, then `(x - mean) / std` in float32.

    `size` is (H, W); `rgb_stats` is birder's `{"mean": [r, g, b], "std": [r, g, b]}` and must come with
    the weights (never hard-code it). `exif_transpose=True` first rotates/flips the image as its EXIF
    orientation tag says; off by default because birder does not do it (parity), so phone photos stored
    sideways reach the model sideways, exactly as in birder.
    """
    return ClassificationTransform(size, rgb_stats, center_crop, simple_crop, exif_transpose=exif_transpose)


def _resize(img: Image.Image, size_hw: tuple[int, int]) -> Image.Image:
    """torchvision's PIL resize kernel: nothing when the size already matches, else one PIL bicubic call."""
    if (img.height, img.width) == size_hw:
        return img
    return img.resize((size_hw[1], size_hw[0]), resample=RESAMPLE)


def _center_crop(pixels: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """torchvision's CenterCrop on an (H, W, C) array: zero-pad any side the crop exceeds, then crop."""
    crop_h, crop_w = size_hw
    height, width = pixels.shape[:2]
    if crop_h > height or crop_w > width:
        pad_h = max(crop_h - height, 0)
        pad_w = max(crop_w - width, 0)
        # the odd pixel goes to the bottom / right, as in torchvision's _center_crop_compute_padding
        padding = ((pad_h // 2, (pad_h + 1) // 2), (pad_w // 2, (pad_w + 1) // 2), (0, 0))
        pixels = np.pad(pixels, padding, mode="constant", constant_values=0)
        height, width = pixels.shape[:2]
    # Python's round() (half to even) of a float, as torchvision's _center_crop_compute_crop_anchor does
    top = round((height - crop_h) / 2.0)
    left = round((width - crop_w) / 2.0)
    return pixels[top : top + crop_h, left : left + crop_w]


def _checked_size(size: Any, what: str) -> tuple[int, int]:
    """A (H, W) pair of positive ints, or a UserError naming `what`."""
    if isinstance(size, (str, bytes)) or not isinstance(size, Sequence) or len(size) != 2:
        raise UserError(f"{what} must be (height, width), got {size!r}")
    out = []
    for value in size:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise UserError(f"{what} must be two positive integers (height, width), got {tuple(size)!r}")
        out.append(int(value))
    return out[0], out[1]


def _checked_rgb_stats(rgb_stats: Any) -> tuple[np.ndarray, np.ndarray]:
    """float32 (3,) mean and std from birder's rgb_stats dict, or a UserError saying what is wrong."""
    expected = 'birder\'s rgb_stats {"mean": [r, g, b], "std": [r, g, b]}'
    if not isinstance(rgb_stats, Mapping) or set(rgb_stats) != RGB_STATS_KEYS:
        got = sorted(map(str, rgb_stats)) if isinstance(rgb_stats, Mapping) else type(rgb_stats).__name__
        raise UserError(f"rgb_stats must be {expected}, got {got}")
    arrays = []
    for key in ("mean", "std"):
        try:
            values = np.asarray(rgb_stats[key], dtype=np.float64)
        except (TypeError, ValueError):
            values = np.empty(0)
        if values.shape != (NUM_CHANNELS,) or not np.all(np.isfinite(values)):
            raise UserError(f"rgb_stats[{key!r}] must be 3 finite numbers, got {rgb_stats[key]!r}")
        arrays.append(values.astype(np.float32))  # torchvision casts both to the image dtype (float32)
    mean, std = arrays
    if np.any(std <= 0):
        raise UserError(f"rgb_stats['std'] must be > 0, got {rgb_stats['std']!r}")
    return mean, std


def check_rgb_stats(rgb_stats: Any, where: str = "") -> dict[str, list[float]]:
    """birder's ``rgb_stats`` checked as preprocessing needs them (keys ``mean`` and ``std``, 3 finite numbers
    each, std > 0), as a JSON-shaped ``{"mean": [r, g, b], "std": [r, g, b]}``: the one check that converting,
    loading and preprocessing apply. ``where`` starts the error message (e.g. ``"FILE: "``)."""
    try:
        _checked_rgb_stats(rgb_stats)
    except UserError as e:
        raise UserError(f"{where}{e}") from None
    return {key: [float(v) for v in np.asarray(rgb_stats[key], dtype=np.float64)] for key in ("mean", "std")}
