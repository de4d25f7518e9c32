"""vitreg_jax.data.shards + loader.iter_item_batches: shards from files, folders, lists, webdataset tars,
brace patterns, globs and fsspec URLs; streamed, ordered, memory-bounded decoding with failure records."""

from __future__ import annotations

import io
import tarfile
import threading
from pathlib import Path

import fsspec
import numpy as np
import pytest
from PIL import Image

from vitreg_jax.data import loader as data
from vitreg_jax.data import shards as sources
from vitreg_jax.data.inputs import list_inputs
from vitreg_jax.data.loader import ItemBatch, iter_batches, iter_item_batches
from vitreg_jax.data.preprocess import classification_transform
from vitreg_jax.data.shards import Item, Shard, expand_braces, iter_items, list_shards, shards_for_process
from vitreg_jax.errors import UserError

IMAGES_DIR = Path(__file__).resolve().parent.parent / "examples" / "images"
SAMPLES = sorted(p for p in IMAGES_DIR.iterdir() if p.suffix.lower() in {".jpg", ".png"})[:5]
STATS = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
THREAD_PREFIX = "vitreg-data"


@pytest.fixture(scope="module")
def transform():
    return classification_transform((24, 32), STATS)


def png_bytes(seed: int, size: tuple[int, int] = (20, 28)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as archive:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    return out.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    path.write_bytes(tar_bytes(members))
    return path


def collect(batches) -> tuple[list[tuple[int, str, str]], np.ndarray, list, list[int], list[ItemBatch]]:
    batches = list(batches)
    ids = [(int(s), k, src) for b in batches for s, k, src in zip(b.shards, b.keys, b.sources, strict=True)]
    images = np.concatenate([b.images for b in batches]) if batches else np.zeros((0,))
    failed = [f for b in batches for f in b.failed]
    done = [d for b in batches for d in b.done]
    return ids, images, failed, done, batches


@pytest.fixture(autouse=True)
def clean_memory_fs():
    fs = fsspec.filesystem("memory")
    yield fs
    for path in list(fs.store):
        fs.store.pop(path, None)
    fs.pseudo_dirs[:] = [""]


# ------------------------------------------------------------------------------------ brace patterns
def test_brace_ranges_keep_zero_padding_and_lists_expand_in_order():
    assert expand_braces("s/part-{0008..0011}.tar") == [f"s/part-{i:04d}.tar" for i in range(8, 12)]
    assert expand_braces("p{8..10}") == ["p8", "p9", "p10"]
    assert expand_braces("{a,b}/{1..2}.tar") == ["a/1.tar", "a/2.tar", "b/1.tar", "b/2.tar"]
    assert expand_braces("{3..1}") == ["3", "2", "1"]
    assert expand_braces("x{y}z") == ["x{y}z"]  # not a pattern: kept as written
    assert expand_braces("plain.tar") == ["plain.tar"]


# -------------------------------------------------------------------------------------------- listing
def test_shards_in_input_order_files_grouped_tars_alone(tmp_path):
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    for rel in ["a.png", "b.png", "sub/c.png", ".hidden.png"]:
        (tmp_path / "imgs" / rel).write_bytes(b"")
    tar = write_tar(tmp_path / "s.tar", [("k.png", b"")])
    single = tmp_path / "one.jpg"
    single.write_bytes(b"")
    listing = tmp_path / "list.txt"
    listing.write_text("# comment\none.jpg\ns.tar\n")
    shards = list_shards([str(single), tmp_path / "imgs", str(tar), str(listing)], files_per_shard=2)
    imgs = tmp_path / "imgs"
    assert [(s.index, s.kind, s.url, s.files) for s in shards] == [
        (0, "files", "", (str(single), str(imgs / "a.png"))),
        (1, "files", "", (str(imgs / "b.png"), str(imgs / "sub" / "c.png"))),
        (2, "tar", str(tar), ()),
        (3, "files", "", (str(tmp_path / "one.jpg"),)),
        (4, "tar", str(tmp_path / "s.tar"), ()),
    ]
    # the same inputs give the same shards every time; files inputs match today's list_inputs
    assert list_shards([str(single), tmp_path / "imgs"], files_per_shard=2)[0] == shards[0]
    flat = [f for s in list_shards([tmp_path / "imgs"]) for f in s.files]
    assert flat == list_inputs([tmp_path / "imgs"])


def test_brace_and_glob_inputs(tmp_path):
    for i in range(3):
        write_tar(tmp_path / f"part-{i:04d}.tar", [(f"{i}.png", b"")])
    braced = list_shards([str(tmp_path / "part-{0000..0002}.tar")])
    globbed = list_shards([str(tmp_path / "part-*.tar")])
    expected = [str(tmp_path / f"part-{i:04d}.tar") for i in range(3)]
    assert [s.url for s in braced] == [s.url for s in globbed] == expected
    with pytest.raises(UserError, match=r"input not found: .*part-0003.tar"):
        list_shards([str(tmp_path / "part-{0000..0003}.tar")])
    with pytest.raises(UserError, match="no files match"):
        list_shards([str(tmp_path / "nothing-*.tar")])


def test_listing_errors(tmp_path):
    with pytest.raises(UserError, match="input not found"):
        list_shards([str(tmp_path / "missing.tar")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images or .tar shards found"):
        list_shards([str(tmp_path / "empty")])
    with pytest.raises(UserError, match="files_per_shard"):
        list_shards([str(tmp_path)], files_per_shard=0)


def test_shards_for_process_is_by_index():
    shards = [Shard(i, "tar", url=f"{i}.tar") for i in range(7)]
    parts = [shards_for_process(shards, p, 3) for p in range(3)]
    assert [[s.index for s in p] for p in parts] == [[0, 3, 6], [1, 4], [2, 5]]
    with pytest.raises(UserError):
        shards_for_process(shards, 3, 3)


# ------------------------------------------------------------------------------------------ tar items
def test_tar_members_grouped_by_key_with_folders_and_metadata(tmp_path):
    tar = write_tar(
        tmp_path / "s.tar",
        [
            ("d/x/0001.jpg", b"J1"),
            ("d/x/0001.json", b'{"a": 1}'),
            ("d/x/0001.cls", b"3"),
            ("d/x/0001.npy", b"ignored"),
            ("d/y/0001.png", b"P1"),  # same base name, another folder: another sample
            ("0002.txt", b"caption only"),  # no image: a failure
            ("0003.seg.png", b"S3"),
            ("0003.PNG", b"second image member: not used"),
        ],
    )
    items = list(iter_items(list_shards([str(tar)])[0]))
    assert [(i.key, i.data, i.reason is None) for i in items] == [
        ("d/x/0001", b"J1", True),
        ("d/y/0001", b"P1", True),
        ("0002", None, False),
        ("0003", b"S3", True),
    ]
    assert items[0].meta == {"json": b'{"a": 1}', "cls": b"3"}
    assert items[2].meta == {"txt": b"caption only"} and "no image member" in items[2].reason
    assert all(i.source == str(tar) and i.shard == 0 for i in items)


def test_truncated_shard_keeps_earlier_samples_and_records_the_rest(tmp_path, transform):
    whole = tar_bytes([(f"{i:04d}.png", png_bytes(i)) for i in range(4)])
    cut = tmp_path / "cut.tar"
    with tarfile.open(fileobj=io.BytesIO(whole)) as archive:
        second = archive.getmembers()[1]
    cut.write_bytes(whole[: second.offset_data + second.size // 2])  # inside 0001's image bytes
    after = write_tar(tmp_path / "after.tar", [("z.png", png_bytes(9))])
    ids, _images, failed, done, _ = collect(
        iter_item_batches(list_shards([str(cut), str(after)]), transform, 2, 2)
    )
    assert [k for s, k, _ in ids if s == 0] == ["0000"]  # sample 0001 was being read when the data ran out
    assert ids[-1] == (1, "z", str(after))
    assert len(failed) == 1 and failed[0].shard == 0 and failed[0].source == str(cut)
    assert failed[0].key == "0001" and "truncated" in failed[0].reason
    assert done == [0, 1]


def test_not_a_tar_and_missing_shard_are_failures(tmp_path, transform):
    bogus = tmp_path / "bogus.tar"
    bogus.write_bytes(b"this is not a tar archive" * 30)
    shards = [Shard(0, "tar", url=str(bogus)), Shard(1, "tar", url=str(tmp_path / "gone.tar"))]
    _, images, failed, done, _ = collect(iter_item_batches(shards, transform, 4, 1))
    assert len(images) == 0 and done == [0, 1]
    assert [(f.shard, f.key) for f in failed] == [(0, ""), (1, "")]
    assert "not a valid tar" in failed[0].reason and "file not found" in failed[1].reason


def test_corrupt_member_is_a_failure_naming_shard_and_key(tmp_path, transform):
    tar = write_tar(
        tmp_path / "s.tar",
        [("a.png", png_bytes(1)), ("b.jpg", b"\xff\xd8 not really a jpeg"), ("c.png", png_bytes(3))],
    )
    ids, images, failed, _done, _ = collect(iter_item_batches(list_shards([str(tar)]), transform, 8, 2))
    assert [k for _, k, _ in ids] == ["a", "c"] and len(images) == 2
    assert [(f.shard, f.key, f.source) for f in failed] == [(0, "b", str(tar))]
    assert "image" in failed[0].reason or "corrupt" in failed[0].reason


# ------------------------------------------------------------------------- decoding equals the files
def test_tar_and_folder_give_the_same_arrays_in_order(tmp_path, transform):
    folder = tmp_path / "imgs"
    folder.mkdir()
    members = []
    for p in SAMPLES:
        (folder / p.name).write_bytes(p.read_bytes())
        members.append((p.name, p.read_bytes()))
    tar = write_tar(tmp_path / "s.tar", members)
    reference = [b.images for b in iter_batches(list_inputs([folder]), transform, 3, 2)]
    reference = np.concatenate(reference)
    for inputs in ([folder], [tar], [f"file://{tar}"], [f"file://{folder}"]):
        ids, images, failed, _, _ = collect(
            iter_item_batches(list_shards([str(i) for i in inputs]), transform, 2, 2)
        )
        assert not failed
        assert [Path(k).stem for _, k, _ in ids] == [p.stem for p in SAMPLES]
        np.testing.assert_array_equal(images, reference)


def test_a_folder_of_plain_and_gzipped_tar_shards_is_read(tmp_path, transform):
    """A folder of .tar shards was "no images or .tar shards found"; .tar.gz / .tgz shards were taken for
    images. Both are shards now, found in folders (local and fsspec) like images are."""
    import gzip

    members = [(p.name, p.read_bytes()) for p in SAMPLES]
    shards = tmp_path / "shards"
    shards.mkdir()
    write_tar(shards / "part-0.tar", members[:2])
    (shards / "part-1.tar.gz").write_bytes(gzip.compress(tar_bytes(members[2:4])))
    (shards / "part-2.tgz").write_bytes(gzip.compress(tar_bytes(members[4:])))
    (shards / ".hidden.tar").write_bytes(tar_bytes(members[:1]))
    reference = np.concatenate([b.images for b in iter_batches([str(p) for p in SAMPLES], transform, 3, 2)])
    for inputs in ([shards], [f"file://{shards}"], [shards / "part-1.tar.gz", shards / "part-2.tgz"]):
        listed = list_shards([str(i) for i in inputs])
        assert all(s.kind == "tar" for s in listed), listed
        ids, images, failed, _, _ = collect(iter_item_batches(listed, transform, 2, 2))
        assert not failed
        if len(inputs) == 1:
            assert [Path(k).stem for _, k, _ in ids] == [p.stem for p in SAMPLES]
            np.testing.assert_array_equal(images, reference)


# ------------------------------------------------------------------------------------------- fsspec
def test_memory_urls_tar_glob_folder_and_list(clean_memory_fs, transform):
    fs = clean_memory_fs
    for i in range(3):
        fs.pipe(f"/bucket/shards/part-{i:02d}.tar", tar_bytes([(f"k{i}.png", png_bytes(i))]))
    fs.pipe("/bucket/imgs/a.png", png_bytes(10))
    fs.pipe("/bucket/imgs/sub/b.png", png_bytes(11))
    fs.pipe("/bucket/imgs/.hidden/c.png", png_bytes(12))
    fs.pipe("/bucket/imgs/notes.json", b"{}")
    fs.pipe("/bucket/list.txt", b"imgs/a.png\nshards/part-01.tar\n")
    assert [s.url for s in list_shards(["memory://bucket/shards/part-{00..02}.tar"])] == [
        f"memory://bucket/shards/part-{i:02d}.tar" for i in range(3)
    ]
    shards = list_shards(["memory://bucket/shards/*.tar", "memory://bucket/imgs", "memory://bucket/list.txt"])
    assert [s.kind for s in shards] == ["tar", "tar", "tar", "files", "tar"]
    assert shards[3].files == (
        "memory:///bucket/imgs/a.png",
        "memory:///bucket/imgs/sub/b.png",
        "memory://bucket/imgs/a.png",
    )
    ids, images, failed, done, _ = collect(iter_item_batches(shards, transform, 2, 2))
    assert not failed and done == [0, 1, 2, 3, 4]
    assert [k for _, k, _ in ids][:3] == ["k0", "k1", "k2"]
    expected = transform(Image.open(io.BytesIO(png_bytes(10))))
    np.testing.assert_array_equal(images[3], expected)


def test_missing_remote_file_is_a_failure(clean_memory_fs, transform):
    shards = [
        Shard(0, "files", files=("memory://bucket/none.png",)),
        Shard(1, "tar", url="memory://b/none.tar"),
    ]
    _, images, failed, _, _ = collect(iter_item_batches(shards, transform, 2, 1))
    assert len(images) == 0 and [f.shard for f in failed] == [0, 1]
    assert "file not found" in failed[0].reason and "file not found" in failed[1].reason


def test_missing_filesystem_package_is_one_line_naming_the_extra(monkeypatch):
    def no_package(protocol):
        raise ImportError("Install gcsfs to access Google Storage")

    monkeypatch.setattr(fsspec, "get_filesystem_class", no_package)
    with pytest.raises(UserError, match=r"gs://.*pip install 'vitreg-jax\[gcs\]'") as info:
        list_shards(["gs://bucket/shards/part-{0..3}.tar"])
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match=r"install it \(Install gcsfs"):
        list_shards(["weird://bucket/x.tar"])


def test_a_really_missing_filesystem_package_fails_cleanly():
    """Without monkeypatching: the first fsspec protocol whose package is absent here (gs:// when gcsfs
    is)."""
    from fsspec.registry import known_implementations

    for protocol in ["gs", "s3", *sorted(known_implementations)]:
        try:
            fsspec.get_filesystem_class(protocol)
        except ImportError:
            break
    else:
        raise AssertionError("every fsspec filesystem package is installed: nothing to test with")
    with pytest.raises(UserError, match=rf"{protocol}://.*needs a package that is not installed: .*install"):
        list_shards([f"{protocol}://bucket/part-0000.tar"])


def test_unknown_protocol():
    with pytest.raises(UserError, match="unknown URL protocol nosuchproto://"):
        list_shards(["nosuchproto://x/y.tar"])


# -------------------------------------------------------------------------- order and memory bounds
def test_stream_is_lazy_bounded_ordered_and_closes_its_threads(monkeypatch, transform):
    produced = []
    lock = threading.Lock()
    encoded = png_bytes(0)

    def endless(shard):
        for i in range(10**9):
            with lock:
                produced.append(i)
            yield Item(shard.index, f"{i:09d}", "gen", data=encoded)

    monkeypatch.setattr(sources, "iter_items", endless)
    workers, batch_size = 2, 4
    stream = iter_item_batches([Shard(0, "tar", url="gen")], transform, batch_size, workers)
    first = [next(stream) for _ in range(3)]
    assert [k for b in first for k in b.keys] == [f"{i:09d}" for i in range(12)]
    threading.Event().wait(0.3)  # let the reader run as far ahead as it may
    bound = 3 * batch_size + data.READ_AHEAD + data.QUEUED_PER_WORKER * workers + 1 + 2
    assert len(produced) <= bound
    assert any(t.name.startswith(THREAD_PREFIX) for t in threading.enumerate())
    stream.close()
    assert not any(t.name.startswith(THREAD_PREFIX) for t in threading.enumerate())


def test_an_error_while_listing_items_reaches_the_consumer(monkeypatch, transform):
    def broken(shard):
        yield Item(shard.index, "a", "x", data=png_bytes(1))
        raise RuntimeError("bug in a reader")

    monkeypatch.setattr(sources, "iter_items", broken)
    with pytest.raises(RuntimeError, match="bug in a reader"):
        list(iter_item_batches([Shard(0, "tar", url="x")], transform, 4, 0))


def test_empty_shard_is_done_and_batches_are_full_except_the_last(tmp_path, transform):
    empty = write_tar(tmp_path / "empty.tar", [])
    full = write_tar(tmp_path / "full.tar", [(f"{i}.png", png_bytes(i)) for i in range(5)])
    _ids, images, failed, done, batches = collect(
        iter_item_batches(list_shards([str(empty), str(full)]), transform, 2, 0)
    )
    assert [len(b.keys) for b in batches] == [2, 2, 1] and done == [0, 1] and not failed
    assert images.shape == (5, 24, 32, 3) and images.dtype == np.float32


def test_bad_arguments(transform):
    with pytest.raises(UserError, match="batch_size"):
        iter_item_batches([], transform, 0)
    with pytest.raises(UserError, match="workers"):
        iter_item_batches([], transform, 1, -1)


@pytest.mark.parametrize("workers,batch_size", [(1, 1), (2, 3)])
def test_decoding_overlaps_the_consumer_within_its_window(monkeypatch, workers, batch_size):
    encoded = png_bytes(0, (4, 4))
    total = 6 * (2 * workers + batch_size)

    def items(shard):
        for i in range(total):
            yield Item(shard.index, str(i), "gen", data=encoded)

    monkeypatch.setattr(sources, "iter_items", items)
    lock = threading.Lock()
    started = 0

    def counting_transform(img):
        nonlocal started
        with lock:
            started += 1
        return np.asarray(img, np.float32)

    window = data.QUEUED_PER_WORKER * workers + 1
    consumed, ahead = 0, []
    for batch in iter_item_batches([Shard(0, "tar", url="gen")], counting_transform, batch_size, workers):
        consumed += len(batch.keys)
        threading.Event().wait(0.05)  # the consumer "computes"; the decoders should work meanwhile
        with lock:
            ahead.append(started - consumed)
    assert consumed == total
    assert max(ahead) <= window
    assert ahead[0] == window - 1  # all but the slot being refilled were decoded while we held the batch


def test_an_existing_name_with_braces_or_brackets_is_taken_as_written(tmp_path):
    odd = write_tar(tmp_path / "set{1,2}[a].tar", [("k.png", b"")])
    assert [s.url for s in list_shards([str(odd)])] == [str(odd)]


def test_a_remote_error_of_any_type_fails_that_shard_only(monkeypatch, tmp_path, transform):
    class HttpError(Exception):  # what a remote filesystem might raise mid-stream
        pass

    class Flaky(io.RawIOBase):
        def readable(self) -> bool:
            return True

        def readinto(self, buffer) -> int:
            raise HttpError("503 Service Unavailable")

    good = write_tar(tmp_path / "good.tar", [("a.png", png_bytes(1))])
    real_open = sources._open_stream
    monkeypatch.setattr(sources, "_open_stream", lambda url: Flaky() if "flaky" in url else real_open(url))
    shards = [Shard(0, "tar", url="memory://b/flaky.tar"), Shard(1, "tar", url=str(good))]
    ids, _, failed, done, _ = collect(iter_item_batches(shards, transform, 4, 1))
    assert [(f.shard, f.key) for f in failed] == [(0, "")] and "HttpError: 503" in failed[0].reason
    assert ids == [(1, "a", str(good))] and done == [0, 1]
