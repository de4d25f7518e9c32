"""birder's level-1 training augmentation (ops against torchvision with the same parameters) and the
deterministic training stream (same seed, same batches, whatever the threads; epochs permute; processes
split)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.support.tolerances import AFFINE_EQUAL_FRACTION, CROP_STAT_ATOL
from vitreg_jax.data import augment as A
from vitreg_jax.data.augment import TrainTransform
from vitreg_jax.data.rgb_stats import named_rgb_stats
from vitreg_jax.errors import UserError
from vitreg_jax.pretraining.data_stream import TrainData

IMAGES = Path(__file__).parents[1] / "examples" / "images"
STATS = named_rgb_stats("birder")
# torchvision resizes uint8 tensors with its own antialiased kernels, PIL with its fixed-point ones: a few
# levels
RESIZE_MAX_LEVELS = {"bilinear": 1, "bicubic": 6}
CROP_DRAWS = 4000


def photo() -> Image.Image:
    path = IMAGES / "astronaut.jpg"
    if path.exists():
        return Image.open(path).convert("RGB")
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 240, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def tv():
    pytest.importorskip("torchvision")
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    return F, InterpolationMode


def as_tensor(pixels: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)


def as_pixels(tensor) -> np.ndarray:
    return tensor.permute(1, 2, 0).numpy()


@pytest.mark.parametrize("factor", [0.7875, 0.93, 1.11, 1.2125])
def test_brightness_and_contrast_are_torchvisions(tv, factor):
    F, _ = tv
    px = np.asarray(photo())
    np.testing.assert_array_equal(
        A.adjust_brightness(px, factor), as_pixels(F.adjust_brightness(as_tensor(px), factor))
    )
    np.testing.assert_array_equal(
        A.adjust_contrast(px, factor), as_pixels(F.adjust_contrast(as_tensor(px), factor))
    )


@pytest.mark.parametrize("angle", [-2.25, -1.3, 0.7, 2.25, 30.0])
def test_rotation_is_torchvisions(tv, angle):
    F, mode = tv
    px = np.asarray(photo())
    theirs = as_pixels(
        F.affine(
            as_tensor(px),
            angle=angle,
            translate=[0, 0],
            scale=1.0,
            shear=[0.0, 0.0],
            interpolation=mode.NEAREST,
            fill=0,
        )
    )
    equal = (A.rotate_nearest(px, angle) == theirs).all(axis=-1).mean()
    assert equal >= AFFINE_EQUAL_FRACTION, f"{angle} degrees: {equal:.5f} of the pixels equal"


@pytest.mark.parametrize("interp", ["bilinear", "bicubic"])
@pytest.mark.parametrize(("box", "size"), [((37, 51, 300, 260), (224, 224)), ((10, 20, 50, 60), (64, 64))])
def test_resized_crop_is_close_to_torchvisions(tv, interp, box, size):
    F, mode = tv
    img = photo()
    ours = A.resized_crop(img, box, size, getattr(Image.Resampling, interp.upper()))
    theirs = as_pixels(
        F.resized_crop(
            as_tensor(np.asarray(img)),
            *box,
            size=list(size),
            interpolation=getattr(mode, interp.upper()),
            antialias=True,
        )
    )
    assert ours.shape == theirs.shape
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= RESIZE_MAX_LEVELS[interp]


def test_crop_parameters_follow_torchvisions_distribution(tv):
    import torch
    from torchvision.transforms import v2

    h, w = 300, 400
    rng = np.random.default_rng(0)
    ours = np.array([A.crop_params(rng, h, w) for _ in range(CROP_DRAWS)], dtype=np.float64)
    torch.manual_seed(0)
    rrc = v2.RandomResizedCrop(32, scale=A.CROP_SCALE, ratio=A.CROP_RATIO)
    dummy = torch.zeros(3, h, w)
    theirs = []
    for _ in range(CROP_DRAWS):
        p = rrc.make_params([dummy])
        theirs.append((p["top"], p["left"], p["height"], p["width"]))
    theirs = np.array(theirs, dtype=np.float64)
    for name, fn in (
        ("area", lambda b: b[:, 2] * b[:, 3] / (h * w)),
        ("log aspect", lambda b: np.log(b[:, 3] / b[:, 2])),
        ("top", lambda b: b[:, 0] / h),
        ("left", lambda b: b[:, 1] / w),
    ):
        assert abs(fn(ours).mean() - fn(theirs).mean()) <= CROP_STAT_ATOL, name
    assert (ours[:, 2] <= h).all() and (ours[:, 3] <= w).all() and (ours[:, 0] + ours[:, 2] <= h).all()
    area = ours[:, 2] * ours[:, 3] / (h * w)
    assert area.min() >= 0.29 and area.max() <= 1.0


def test_fallback_crop_is_central():
    rng = np.random.default_rng(0)
    top, left, h, w = A.crop_params(rng, 10, 1000)  # too wide for any 3/4..4/3 box of 30-100 % area
    assert (h, w) == (10, round(10 * 4 / 3)) and top == 0 and left == (1000 - w) // 2


def test_transform_is_deterministic_and_normalised():
    t = TrainTransform((32, 32), STATS)
    img = photo()
    a = t(img, np.random.default_rng([1, 2, 3]))
    b = t(img, np.random.default_rng([1, 2, 3]))
    c = t(img, np.random.default_rng([1, 2, 4]))
    assert a.shape == (32, 32, 3) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    lo = (0 - np.array(STATS["mean"])) / np.array(STATS["std"])
    hi = (1 - np.array(STATS["mean"])) / np.array(STATS["std"])
    assert (a >= lo - 1e-6).all() and (a <= hi + 1e-6).all()
    # level 0: birder's plain bicubic resize, no randomness
    t0 = TrainTransform((32, 32), STATS, level=0)
    np.testing.assert_array_equal(t0(img, np.random.default_rng(1)), t0(img, np.random.default_rng(2)))
    with pytest.raises(UserError, match="level 3"):
        TrainTransform((32, 32), STATS, level=3)


def test_every_op_gets_drawn():
    """Two ops drawn with replacement from four, so over many images each one shows up."""
    rng = np.random.default_rng(0)
    drawn = [A.OPS[int(rng.integers(len(A.OPS)))] for _ in range(400)]
    assert set(drawn) == set(A.OPS)
    assert A.NUM_OPS == 2 and math.isclose(A.BRIGHTNESS, 0.2125) and math.isclose(A.CONTRAST, 0.075)


def synthetic_files(tmp_path: Path, n: int) -> list[str]:
    paths = []
    for i in range(n):
        p = tmp_path / f"img{i:02d}.png"
        Image.fromarray(np.full((20, 24, 3), i * 10, np.uint8)).save(p)
        paths.append(str(p))
    return paths


def test_stream_is_deterministic_whatever_the_threads(tmp_path):
    paths = synthetic_files(tmp_path, 10)
    t = TrainTransform((16, 16), STATS)
    a = TrainData(paths, t, batch_size=4, grad_accum_steps=1, seed=3, workers=0)
    b = TrainData(paths, t, batch_size=4, grad_accum_steps=1, seed=3, workers=3)
    assert a.steps_per_epoch == 2  # birder's drop_last: 10 // 4
    got_a = list(a.iterate(0, 5))
    got_b = list(b.iterate(0, 5))
    for (sa, xa), (sb, xb) in zip(got_a, got_b, strict=True):
        assert sa == sb
        np.testing.assert_array_equal(xa, xb)
    resumed = list(b.iterate(3, 5))  # resuming mid-run reads the same batches
    np.testing.assert_array_equal(resumed[0][1], got_a[3][1])
    assert got_a[0][1].shape == (1, 4, 16, 16, 3)
    other = TrainData(paths, t, batch_size=4, seed=4, workers=0)
    assert not np.array_equal(other.batch(0), got_a[0][1])


def test_epochs_permute_without_repeats(tmp_path):
    data = TrainData(
        synthetic_files(tmp_path, 10),
        TrainTransform((16, 16), STATS),
        batch_size=2,
        grad_accum_steps=2,
        seed=0,
        workers=0,
    )
    assert data.steps_per_epoch == 2
    for epoch in range(3):
        seen = np.concatenate(
            [data.epoch_order(epoch)[data.positions(s)[1].ravel()] for s in range(epoch * 2, epoch * 2 + 2)]
        )
        assert len(set(seen.tolist())) == 8  # 8 distinct files per epoch, 2 left over (drop_last)
    assert not np.array_equal(data.epoch_order(0), data.epoch_order(1))


def test_processes_take_disjoint_slices(tmp_path):
    paths = synthetic_files(tmp_path, 12)
    t = TrainTransform((16, 16), STATS)
    whole = TrainData(paths, t, batch_size=4, seed=0, workers=0)
    halves = [
        TrainData(paths, t, batch_size=4, seed=0, workers=0, process_index=i, process_count=2)
        for i in range(2)
    ]
    for step in range(3):
        joined = np.concatenate([h.batch(step) for h in halves], axis=1)
        np.testing.assert_array_equal(joined, whole.batch(step))
    with pytest.raises(UserError, match="not divisible"):
        TrainData(paths, t, batch_size=3, process_count=2)


def test_unreadable_file_is_replaced_and_reported_once(tmp_path, capsys):
    paths = synthetic_files(tmp_path, 6)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    data = TrainData([*paths, str(bad)], TrainTransform((16, 16), STATS), batch_size=7, seed=0, workers=0)
    x1, x2 = data.batch(0), data.batch(0)
    assert np.isfinite(x1).all()
    np.testing.assert_array_equal(x1, x2)
    err = capsys.readouterr().err
    assert err.count("broken.jpg") == 1 and "skipping" in err


def test_too_few_images_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="fewer than one optimizer step"):
        TrainData(
            synthetic_files(tmp_path, 3), TrainTransform((16, 16), STATS), batch_size=2, grad_accum_steps=2
        )
