"""vitreg_jax.data.inputs and .loader: listing inputs, and the threaded, ordered, bounded batch loader with
failure records."""

from __future__ import annotations

import random
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from vitreg_jax.data.inputs import list_inputs
from vitreg_jax.data.loader import Batch, Failure, iter_batches
from vitreg_jax.data.preprocess import classification_transform, load_image
from vitreg_jax.data.rgb_stats import named_rgb_stats
from vitreg_jax.errors import UserError

IMAGES_DIR = Path(__file__).resolve().parent.parent / "examples" / "images"
SAMPLES = sorted(p for p in IMAGES_DIR.iterdir() if p.suffix.lower() in {".jpg", ".png"})
STATS = named_rgb_stats("vit_reg4_b16_mim")
SIZE = (32, 48)  # small, non-square: fast, and catches H/W mix-ups
THREAD_PREFIX = "vitreg-data"


@pytest.fixture(scope="module")
def transform():
    return classification_transform(SIZE, STATS, center_crop=0.9)


def collect(batches) -> tuple[list[int], list[np.ndarray], list[Failure], list[Batch]]:
    batches = list(batches)
    indices = [int(i) for b in batches for i in b.indices]
    images = [img for b in batches for img in b.images]
    failed = [f for b in batches for f in b.failed]
    return indices, images, failed, batches


# ---------------------------------------------------------------- list_inputs


def make_tree(root: Path) -> None:
    """root/{b.JPG, a.png, notes.txt, .hidden.jpg, sub/{z.jpeg, c.Tif}, sub/deeper/d.webp, .git/x.jpg}."""
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / ".git").mkdir()
    for rel in [
        "b.JPG",
        "a.png",
        ".hidden.jpg",
        "sub/z.jpeg",
        "sub/c.Tif",
        "sub/deeper/d.webp",
        ".git/x.jpg",
    ]:
        (root / rel).write_bytes(b"")
    (root / "notes.txt").write_text("not a list: inside a folder, only images are taken\n")


def test_folder_is_recursive_sorted_case_insensitive_and_skips_hidden(tmp_path):
    make_tree(tmp_path)
    got = list_inputs([str(tmp_path)])
    rel = [str(Path(p).relative_to(tmp_path)) for p in got]
    assert rel == ["a.png", "b.JPG", "sub/c.Tif", "sub/deeper/d.webp", "sub/z.jpeg"]
    assert list_inputs([tmp_path]) == got  # PathLike works, same order every time


def test_list_file_comments_blanks_and_relative_paths(tmp_path):
    (tmp_path / "lists").mkdir()
    absolute = str(IMAGES_DIR / "cat.jpg")
    (tmp_path / "lists" / "paths.txt").write_text(
        f"# my images\n\n  ../imgs/one.jpg  \nrel/two.png\n{absolute}\n   # indented comment\nthree.bmp\n"
    )
    got = list_inputs([str(tmp_path / "lists" / "paths.txt")])
    base = str(tmp_path / "lists")
    assert got == [f"{base}/../imgs/one.jpg", f"{base}/rel/two.png", absolute, f"{base}/three.bmp"]


def test_inputs_keep_their_order_and_files_of_any_extension_are_images(tmp_path):
    make_tree(tmp_path / "tree")
    odd = tmp_path / "photo.jfif"
    odd.write_bytes(b"")
    listing = tmp_path / "l.lst"
    listing.write_text("x.jpg\nx.jpg\n")
    got = list_inputs([str(odd), str(tmp_path / "tree" / "sub"), str(listing), str(odd)])
    assert got[0] == str(odd) and got[-1] == str(odd)
    assert got[1:4] == [str(tmp_path / "tree" / "sub" / n) for n in ["c.Tif", "deeper/d.webp", "z.jpeg"]]
    assert got[4:6] == [str(tmp_path / "x.jpg")] * 2  # duplicates kept


def test_missing_input_is_a_user_error(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"")
    with pytest.raises(UserError, match="input not found: .*nope"):
        list_inputs([str(tmp_path / "a.jpg"), str(tmp_path / "nope")])


def test_zero_images_is_a_user_error(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("x")
    (tmp_path / "only_comments.txt").write_text("# nothing\n\n")
    for inputs in ([str(tmp_path / "empty")], [str(tmp_path / "only_comments.txt")], []):
        with pytest.raises(UserError, match="no images found in"):
            list_inputs(inputs)


def test_unreadable_list_file_is_a_user_error(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(UserError, match="path list"):
        list_inputs([str(bad)])


# ---------------------------------------------------------------- iter_batches


def test_arrays_equal_calling_the_transform_directly(transform):
    paths = [str(p) for p in SAMPLES]
    indices, images, failed, batches = collect(iter_batches(paths, transform, batch_size=4, workers=3))
    assert failed == [] and indices == list(range(len(paths)))
    assert [len(b.indices) for b in batches] == [4, 4, 4, len(paths) - 12]
    assert [b.end for b in batches] == [4, 8, 12, len(paths)]
    for index, image in zip(indices, images):
        assert image.dtype == np.float32 and image.shape == (*SIZE, 3)
        assert np.array_equal(image, transform(load_image(paths[index]))), paths[index]
    assert batches[0].images.shape == (4, *SIZE, 3) and batches[0].indices.dtype == np.int64


def test_order_is_deterministic_whatever_the_threads_do(transform):
    paths = [str(p) for p in SAMPLES] * 3
    rng = random.Random(0)
    delays = {i: rng.uniform(0, 0.01) for i in range(len(paths))}
    lock = threading.Lock()
    seen = iter(range(10**9))

    def jittery_loader(path):
        with lock:
            n = next(seen)
        time.sleep(delays[n % len(paths)])  # finishing order scrambled
        return load_image(path)

    reference = collect(iter_batches(paths, transform, batch_size=5, workers=0))
    for workers in (1, 4):
        got = collect(iter_batches(paths, transform, batch_size=5, workers=workers, loader=jittery_loader))
        assert got[0] == reference[0] == list(range(len(paths)))
        assert all(np.array_equal(a, b) for a, b in zip(got[1], reference[1]))


def write_broken_files(folder: Path) -> dict[str, str]:
    """name -> a word its failure reason must contain."""
    jpeg = (IMAGES_DIR / "cat.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (folder / "text.jpg").write_text("I am a text file with an image's name\n")
    (folder / "empty.png").write_bytes(b"")
    (folder / "dir.jpg").mkdir()
    return {
        "truncated.jpg": "truncated",
        "text.jpg": "not an image",
        "empty.png": "not an image",
        "missing.jpg": "file not found",
        "dir.jpg": "is a directory",
    }


def test_broken_files_become_failure_records_and_the_stream_goes_on(tmp_path, transform):
    reasons = write_broken_files(tmp_path)
    good = [str(p) for p in SAMPLES[:6]]
    broken = {name: str(tmp_path / name) for name in reasons}
    # interleave: g0 truncated g1 text g2 empty g3 missing g4 dir g5
    paths = []
    for g, b in zip(good, list(broken.values()) + [None]):
        paths += [g] + ([b] if b else [])
    indices, images, failed, batches = collect(iter_batches(paths, transform, batch_size=2, workers=2))
    assert indices == [0, 2, 4, 6, 8, 10]
    assert [f.index for f in failed] == [1, 3, 5, 7, 9]
    for record in failed:
        index, path, reason = record  # a plain (index, path, reason) tuple too
        assert paths[index] == path
        name = Path(path).name
        assert reasons[name] in reason, (name, reason)
        assert "\n" not in reason
    # failures travel with the batch during whose assembly they were met; `end` is the resume point
    assert [[int(i) for i in b.indices] for b in batches] == [[0, 2], [4, 6], [8, 10]]
    assert [[f.index for f in b.failed] for b in batches] == [[1], [3, 5], [7, 9]]
    assert [b.end for b in batches] == [3, 7, 11]
    for index, image in zip(indices, images):
        assert np.array_equal(image, transform(load_image(paths[index])))


def test_trailing_failures_come_in_a_last_batch_without_images(tmp_path, transform):
    write_broken_files(tmp_path)
    paths = [str(SAMPLES[0]), str(SAMPLES[1]), str(tmp_path / "text.jpg"), str(tmp_path / "missing.jpg")]
    batches = list(iter_batches(paths, transform, batch_size=2, workers=2))
    assert len(batches) == 2
    last = batches[1]
    assert last.images.shape == (0, *SIZE, 3) and last.indices.shape == (0,)
    assert [f.index for f in last.failed] == [2, 3] and last.end == 4


def test_all_inputs_broken(tmp_path, transform):
    write_broken_files(tmp_path)
    paths = [str(tmp_path / n) for n in ["text.jpg", "empty.png"]]
    for workers in (0, 2):
        (batch,) = iter_batches(paths, transform, batch_size=8, workers=workers)
        assert batch.images.shape == (0, *SIZE, 3) and len(batch.failed) == 2


def test_modes_and_unsupported_mode_become_records(tmp_path, transform):
    from PIL import Image

    Image.fromarray(np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 20).save(tmp_path / "g16.png")
    paths = [str(IMAGES_DIR / n) for n in ["camera_gray.jpg", "horse_rgba.png", "coffee_palette.png"]]
    paths.append(str(tmp_path / "g16.png"))
    indices, _, failed, _ = collect(iter_batches(paths, transform, batch_size=3, workers=2))
    assert indices == [0, 1, 2, 3] and failed == []

    def raising_transform(img):
        raise UserError(f"cannot convert an image of mode {img.mode!r} to RGB")

    (batch,) = iter_batches(paths[:1], raising_transform, batch_size=3, workers=1)
    assert batch.failed[0].reason == "cannot convert an image of mode 'L' to RGB"
    assert batch.images.shape == (0, 0, 0, 3)  # a plain callable has no output_shape


def test_start_resumes_with_absolute_indices(transform):
    paths = [str(p) for p in SAMPLES]
    full = collect(iter_batches(paths, transform, batch_size=3, workers=2))
    tail = collect(iter_batches(paths, transform, batch_size=3, workers=2, start=7))
    assert tail[0] == list(range(7, len(paths)))
    assert all(np.array_equal(a, b) for a, b in zip(tail[1], full[1][7:]))
    assert list(iter_batches(paths, transform, batch_size=3, workers=2, start=len(paths))) == []


@pytest.mark.parametrize("workers,batch_size", [(1, 1), (2, 3), (3, 8)])
def test_in_flight_is_bounded_and_work_overlaps_the_consumer(workers, batch_size):
    from PIL import Image

    paths = [f"fake/{i}.png" for i in range(6 * (2 * workers + batch_size))]
    lock = threading.Lock()
    started = 0
    consumed = 0
    peak = 0
    budget = 2 * workers + batch_size

    def counting_loader(path):  # instant, so that timing cannot make the test flaky
        nonlocal started, peak
        with lock:
            started += 1
            peak = max(peak, started - consumed)
        return Image.new("RGB", (8, 8), (len(path), 0, 0))

    def tiny_transform(img):
        return np.asarray(img, np.float32)

    ahead_after_wait = []
    for batch in iter_batches(paths, tiny_transform, batch_size, workers, loader=counting_loader):
        with lock:
            consumed += len(batch.indices) + len(batch.failed)
        time.sleep(0.03)  # the consumer "computes"; the threads should be decoding meanwhile
        with lock:
            ahead_after_wait.append(started - consumed)
    assert consumed == len(paths)
    # While we hold a batch, at most `budget` further images have been started ...
    assert max(ahead_after_wait) <= budget
    # ... and all of them were started while we were busy, not only once we asked for the next batch.
    assert ahead_after_wait[0] == budget
    # Seen from inside the loader, the batch being handed over counts too until we receive it.
    assert peak <= budget + batch_size, (peak, budget)


def test_closing_early_stops_the_threads(transform):
    paths = [str(p) for p in SAMPLES] * 10
    iterator = iter_batches(paths, transform, batch_size=2, workers=3)
    next(iterator)
    assert any(t.name.startswith(THREAD_PREFIX) for t in threading.enumerate())
    iterator.close()
    assert not any(t.name.startswith(THREAD_PREFIX) for t in threading.enumerate())


def test_a_bug_in_the_transform_is_not_swallowed(transform):
    def buggy(img):
        raise ZeroDivisionError("bug")

    with pytest.raises(ZeroDivisionError):
        list(iter_batches([str(SAMPLES[0])], buggy, batch_size=2, workers=2))


@pytest.mark.parametrize(
    "kwargs,word",
    [
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 2, "workers": -1}, "workers"),
        ({"batch_size": 2, "start": 99}, "start"),
        ({"batch_size": 2, "start": -1}, "start"),
    ],
)
def test_bad_arguments_fail_at_once(kwargs, word, transform):
    with pytest.raises(UserError, match=word):
        iter_batches([str(SAMPLES[0])], transform, **kwargs)  # before any iteration


def test_folder_to_batches_end_to_end(tmp_path, transform):
    for p in SAMPLES[:5]:
        shutil.copy(p, tmp_path / p.name.upper())
    write_broken_files(tmp_path)
    paths = list_inputs([str(tmp_path)])
    # 5 copies + truncated.jpg, text.jpg, empty.png; dir.jpg is a folder (with no images in it)
    assert len(paths) == 8 and not any(p.endswith("dir.jpg") for p in paths)
    indices, images, failed, _ = collect(iter_batches(paths, transform, batch_size=4, workers=2))
    assert len(indices) == len(images) == 5
    assert {Path(f.path).name for f in failed} == {"empty.png", "text.jpg", "truncated.jpg"}
