"""vitreg_jax.data.preprocess: bit-exact parity with birder's classification_transform, colour modes, file
errors."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from vitreg_jax.data.preprocess import (
    MAX_IMAGE_PIXELS,
    ImageReadError,
    classification_transform,
    get_size_from_signature,
    load_image,
    to_rgb,
)
from vitreg_jax.data.rgb_stats import RGB_STATS, named_rgb_stats
from vitreg_jax.errors import UserError

IMAGES_DIR = Path(__file__).resolve().parent.parent / "examples" / "images"
SAMPLES = sorted(p for p in IMAGES_DIR.iterdir() if p.suffix.lower() in {".jpg", ".png"})
# The stats vit_reg4_b16_mim was trained with (birder's "birder" mode before 2025-05-24), and imagenet's.
OLD_BIRDER_STATS = named_rgb_stats("vit_reg4_b16_mim")
IMAGENET_STATS = RGB_STATS["imagenet"]
# (size (H, W), center_crop, simple_crop): squash, non-square, crop < 1, ResizeToCover, crop > 1 (pads)
CONFIGS = [
    ((224, 224), 1.0, False),
    ((160, 224), 0.875, False),
    ((224, 224), 0.9, True),
    ((96, 64), 1.0, True),
    ((112, 112), 1.3, False),
    ((64, 80), 1.7, True),
]
EXIF_ORIENTATION_TAG = 0x0112
EXIF_ROTATE_90_CW = 6  # "rotate 90 CW to view": the stored pixels are the upright photo turned 90 CCW


@pytest.fixture(scope="module")
def birder():
    return pytest.importorskip("birder")


def birder_hwc(birder, img: Image.Image, size, stats, center_crop=1.0, simple_crop=False) -> np.ndarray:
    """birder's transform on `img` (which must already be RGB), as an (H, W, 3) float32 array."""
    assert img.mode == "RGB"
    chw = birder.classification_transform(size, stats, center_crop, simple_crop)(img)
    return chw.numpy().transpose(1, 2, 0)


def assert_bit_exact(ours: np.ndarray, ref: np.ndarray, what: str) -> None:
    assert ours.dtype == np.float32, what
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} vs birder {ref.shape}"
    if not np.array_equal(ours, ref):
        diff = np.abs(ours - ref)
        where = np.unravel_index(np.argmax(diff), diff.shape)
        raise AssertionError(f"{what}: {np.count_nonzero(diff)} values differ, max {diff.max():g} at {where}")


def test_samples_cover_the_modes():
    modes = {load_image(p).mode for p in SAMPLES}
    assert {"RGB", "L", "RGBA", "P"} <= modes, modes
    assert len(SAMPLES) >= 10


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.name)
def test_bit_exact_with_birder_on_sample_photos(birder, path):
    img = load_image(path)
    rgb = img.convert("RGB")  # birder's dataset loaders convert; its transform itself does not
    for size, center_crop, simple_crop in CONFIGS:
        ours = classification_transform(size, OLD_BIRDER_STATS, center_crop, simple_crop)(img)
        ref = birder_hwc(birder, rgb, size, OLD_BIRDER_STATS, center_crop, simple_crop)
        assert_bit_exact(ours, ref, f"{path.name} size={size} center_crop={center_crop} simple={simple_crop}")


def test_default_call_matches_design_example(birder):
    signature = {"inputs": [{"data_shape": [0, 3, 224, 224]}], "outputs": [{"data_shape": [0, 768]}]}
    size = get_size_from_signature(signature)
    assert size == birder.get_size_from_signature(signature) == (224, 224)
    img = load_image(IMAGES_DIR / "cat.jpg")
    ours = classification_transform(size, IMAGENET_STATS)(img)
    assert ours.shape == (224, 224, 3) and ours.flags.c_contiguous
    assert_bit_exact(ours, birder_hwc(birder, img, size, IMAGENET_STATS), "cat.jpg imagenet stats")


def test_non_square_signature_is_height_width():
    signature = {"inputs": [{"data_shape": [1, 3, 192, 256]}]}
    assert get_size_from_signature(signature) == (192, 256)
    assert classification_transform((192, 256), OLD_BIRDER_STATS).output_shape == (192, 256, 3)


@pytest.mark.parametrize(
    "box",
    [(100, 100, 101, 101), (100, 100, 103, 102), (0, 0, 451, 2), (200, 0, 201, 300), (10, 10, 250, 40)],
    ids=["1x1", "3x2", "wide-strip", "tall-strip", "thin"],
)
def test_bit_exact_on_tiny_and_extreme_crops(birder, box):
    img = load_image(IMAGES_DIR / "cat.jpg").crop(box)
    for size, center_crop, simple_crop in CONFIGS:
        ours = classification_transform(size, OLD_BIRDER_STATS, center_crop, simple_crop)(img)
        ref = birder_hwc(birder, img, size, OLD_BIRDER_STATS, center_crop, simple_crop)
        assert_bit_exact(ours, ref, f"crop {box} size={size} cc={center_crop} simple={simple_crop}")


def test_no_resize_when_size_already_matches(birder):
    img = load_image(IMAGES_DIR / "retina.jpg").resize((224, 224))
    ours = classification_transform((224, 224), OLD_BIRDER_STATS)(img)
    assert_bit_exact(ours, birder_hwc(birder, img, (224, 224), OLD_BIRDER_STATS), "224 input")
    expected = (np.asarray(img, np.float32) * np.float32(1 / 255) - np.float32(OLD_BIRDER_STATS["mean"])) / (
        np.float32(OLD_BIRDER_STATS["std"])
    )
    assert np.array_equal(ours, expected)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "PA", "RGBA", "CMYK", "YCbCr", "1", "La"])
def test_other_modes_match_birder_on_convert_rgb(birder, mode):
    img = load_image(IMAGES_DIR / "cat.jpg")
    converted = img.convert("LA").convert("La") if mode == "La" else img.convert(mode)
    ours = classification_transform((224, 224), OLD_BIRDER_STATS)(converted)
    expected_rgb = converted.convert("LA").convert("RGB") if mode == "La" else converted.convert("RGB")
    assert_bit_exact(ours, birder_hwc(birder, expected_rgb, (224, 224), OLD_BIRDER_STATS), mode)


def test_alpha_is_dropped_not_composited():
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))  # fully transparent, colour underneath kept
    assert np.all(np.asarray(to_rgb(rgba)) == (10, 20, 30))
    palette = load_image(IMAGES_DIR / "coffee_palette.png")
    assert palette.mode == "P" and "transparency" in palette.info
    assert np.array_equal(np.asarray(to_rgb(palette)), np.asarray(palette.convert("RGB")))


def test_rgb_is_returned_unchanged():
    img = load_image(IMAGES_DIR / "rocket.jpg")
    assert to_rgb(img) is img


def _write_exif_rotated_jpeg(path: Path) -> Image.Image:
    """rocket.jpg stored turned 90 CCW with Orientation=6, as a phone writes it; returns the upright image."""
    upright = load_image(IMAGES_DIR / "rocket.jpg")
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # CCW
    exif = Image.Exif()
    exif[EXIF_ORIENTATION_TAG] = EXIF_ROTATE_90_CW
    stored.save(path, quality=95, exif=exif.tobytes())
    return upright


def test_exif_orientation_is_ignored_by_default_like_birder(birder, tmp_path):
    path = tmp_path / "rotated.jpg"
    upright = _write_exif_rotated_jpeg(path)
    img = load_image(path)
    assert img.getexif()[EXIF_ORIENTATION_TAG] == EXIF_ROTATE_90_CW
    assert img.size == (upright.height, upright.width)  # stored sideways, not rotated on load
    ours = classification_transform((160, 224), OLD_BIRDER_STATS)(img)
    assert_bit_exact(ours, birder_hwc(birder, img, (160, 224), OLD_BIRDER_STATS), "exif off")


def test_exif_transpose_option(birder, tmp_path):
    path = tmp_path / "rotated.jpg"
    upright = _write_exif_rotated_jpeg(path)
    img = load_image(path)
    transposed = ImageOps.exif_transpose(img)
    assert transposed.size == upright.size
    ours = classification_transform((160, 224), OLD_BIRDER_STATS, exif_transpose=True)(img)
    assert_bit_exact(ours, birder_hwc(birder, transposed, (160, 224), OLD_BIRDER_STATS), "exif on")
    # and it is the upright photo again, up to JPEG re-encoding noise
    direct = classification_transform((160, 224), OLD_BIRDER_STATS)(upright)
    assert np.abs(ours - direct).mean() < 0.05
    assert img.size == (upright.height, upright.width)  # the caller's image is not modified


GRADIENT_16 = np.array(
    [[0, 128, 129, 257, 385, 386], [1000, 32767, 32768, 65278, 65279, 65535]], dtype=np.uint16
)
# round(v / 257): 128/257 = 0.498 -> 0, 129/257 = 0.502 -> 1, 385/257 = 1.498 -> 1, 65278/257 = 253.99 -> 254
EXPECTED_8 = np.array([[0, 0, 1, 1, 1, 2], [4, 127, 128, 254, 254, 255]], dtype=np.uint8)


def test_sixteen_bit_png_scales_by_257(birder, tmp_path):
    path = tmp_path / "gray16.png"
    big = np.tile(GRADIENT_16, (20, 20))  # 40 x 120
    Image.fromarray(big).save(path)
    img = load_image(path)
    assert img.mode == "I;16"
    rgb = to_rgb(img)
    assert rgb.mode == "RGB"
    expected = np.tile(EXPECTED_8, (20, 20))
    assert np.array_equal(np.asarray(rgb), np.repeat(expected[:, :, None], 3, axis=2))
    # birder cannot take I;16; the documented expectation is birder on the 8-bit version
    ours = classification_transform((32, 48), OLD_BIRDER_STATS, 0.9)(img)
    ref = birder_hwc(birder, Image.fromarray(expected).convert("RGB"), (32, 48), OLD_BIRDER_STATS, 0.9)
    assert_bit_exact(ours, ref, "16-bit png")


@pytest.mark.parametrize("mode", ["I;16B", "I;16L", "I;16N", "I"])
def test_other_integer_modes(mode):
    if mode == "I":
        img = Image.fromarray(GRADIENT_16.astype(np.int32))
    else:
        byte_order = {"I;16B": ">u2", "I;16L": "<u2", "I;16N": "=u2"}[mode]
        data = GRADIENT_16.astype(byte_order).tobytes()
        img = Image.frombytes(mode, (GRADIENT_16.shape[1], GRADIENT_16.shape[0]), data)
    assert img.mode == mode
    assert np.array_equal(np.asarray(to_rgb(img))[..., 0], EXPECTED_8)


def test_big_endian_tiff(tmp_path):
    path = tmp_path / "big_endian.tif"
    Image.fromarray(GRADIENT_16.astype(">u2")).save(path)
    img = load_image(path)
    assert img.mode == "I;16B"
    assert np.array_equal(np.asarray(to_rgb(img))[..., 2], EXPECTED_8)


def test_integer_values_out_of_range_are_clipped():
    img = Image.fromarray(np.array([[-5, 70000, 257 * 3]], dtype=np.int32))
    assert np.asarray(to_rgb(img))[0, :, 0].tolist() == [0, 255, 3]


def test_float_mode_is_taken_as_zero_to_one():
    values = np.array([[0.0, 0.5, 1.0, 1.5, -0.2, np.nan, 0.002, 0.998]], dtype=np.float32)
    rgb = to_rgb(Image.fromarray(values))
    assert np.asarray(rgb)[0, :, 1].tolist() == [0, 128, 255, 255, 0, 0, 1, 254]


def test_rejects_bad_rgb_stats():
    good = OLD_BIRDER_STATS
    bad_values = [
        "birder",
        [good["mean"], good["std"]],
        {"mean": good["mean"]},
        {**good, "extra": 1},
        {"mean": [0.5, 0.5], "std": good["std"]},
        {"mean": good["mean"], "std": [0.2, 0.0, 0.2]},
        {"mean": ["a", "b", "c"], "std": good["std"]},
        {"mean": good["mean"], "std": [0.2, float("nan"), 0.2]},
    ]
    for stats in bad_values:
        with pytest.raises(UserError, match="rgb_stats"):
            classification_transform((224, 224), stats)


@pytest.mark.parametrize("size", [224, (224,), (0, 224), (224.0, 224), "ab", (224, 224, 3), (True, 2)])
def test_rejects_bad_size(size):
    with pytest.raises(UserError, match="size"):
        classification_transform(size, OLD_BIRDER_STATS)


@pytest.mark.parametrize("center_crop", [0, -1.0, float("inf"), float("nan"), "0.9", 1e-9])
def test_rejects_bad_center_crop(center_crop):
    with pytest.raises(UserError, match="center_crop"):
        classification_transform((224, 224), OLD_BIRDER_STATS, center_crop)


@pytest.mark.parametrize("signature", [{}, {"inputs": []}, {"inputs": [{"data_shape": [1, 3]}]}, None])
def test_rejects_bad_signature(signature):
    with pytest.raises(UserError, match="signature"):
        get_size_from_signature(signature)


def _broken_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """name -> (path, a word the reason must contain)."""
    jpeg = (IMAGES_DIR / "cat.jpg").read_bytes()
    png = (IMAGES_DIR / "horse_rgba.png").read_bytes()
    files = {
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "truncated"),
        "truncated.png": (png[: len(png) // 2], "truncated"),
        "text.jpg": (b"this is not a picture\n" * 10, "not an image"),
        "empty.png": (b"", "not an image"),
        "header_only.png": (png[:64], ""),
    }
    out = {}
    for name, (data, word) in files.items():
        (tmp_path / name).write_bytes(data)
        out[name] = (tmp_path / name, word)
    return out


def test_load_image_errors_name_path_and_reason(tmp_path):
    for name, (path, word) in _broken_files(tmp_path).items():
        with pytest.raises(ImageReadError) as info:
            load_image(path)
        err = info.value
        assert isinstance(err, UserError)
        assert err.path == str(path) and str(path) in str(err), name
        assert word in err.reason, f"{name}: {err.reason}"
        assert "\n" not in str(err)


def test_load_image_missing_and_directory(tmp_path):
    with pytest.raises(ImageReadError, match="file not found"):
        load_image(tmp_path / "nope.jpg")
    with pytest.raises(ImageReadError, match="is a directory"):
        load_image(tmp_path)


def test_load_image_decodes_fully_and_closes():
    img = load_image(IMAGES_DIR / "coffee.jpg")
    assert img.mode == "RGB" and img.size == (512, 341)
    assert img.fp is None  # file closed, pixels in memory
    assert np.asarray(img).shape == (341, 512, 3)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_pixel_limit_is_ours_and_local(tmp_path, monkeypatch):
    path = tmp_path / "small.png"
    Image.new("RGB", (100, 50), (1, 2, 3)).save(path)
    with pytest.raises(ImageReadError, match="image too large: 100x50"):
        load_image(path, max_pixels=4999)
    assert load_image(path, max_pixels=5000).size == (100, 50)
    # PIL's own (global) limit is neither used nor changed
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)
    assert load_image(path).size == (100, 50)
    assert Image.MAX_IMAGE_PIXELS == 10
    with pytest.raises(Image.DecompressionBombError):
        Image.open(path)
    assert MAX_IMAGE_PIXELS >= 200_000_000
    assert load_image(path, max_pixels=None).size == (100, 50)


def test_multi_frame_gif_gives_first_frame(tmp_path):
    path = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(path, save_all=True, append_images=frames[1:])
    assert np.all(np.asarray(to_rgb(load_image(path)))[..., 0] == 255)


def test_round_trip_through_bytes_is_stable():
    """The transform reads pixels only: the same picture from a file or from memory gives the same array."""
    data = (IMAGES_DIR / "astronaut.jpg").read_bytes()
    transform = classification_transform((224, 224), OLD_BIRDER_STATS)
    assert np.array_equal(
        transform(Image.open(io.BytesIO(data))), transform(load_image(IMAGES_DIR / "astronaut.jpg"))
    )


def test_import_does_not_pull_in_torch():
    code = "import sys, vitreg_jax.data.preprocess; print('torch' in sys.modules)"
    repo_root = IMAGES_DIR.parent.parent
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=repo_root
    )
    assert out.stdout.strip() == "False"
