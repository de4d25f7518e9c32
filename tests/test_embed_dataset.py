"""vitreg_jax.embedding.dataset in this process: both formats, readers without our code, names, refusals,
lock."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import tarfile
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from tests.support.tiny_models import tiny_vit_config
from tests.support.tolerances import EMBED_FOLDER_VS_TAR_ATOL, EMBED_FP32_ATOL
from vitreg_jax._locks import FolderLock
from vitreg_jax.data.preprocess import classification_transform, load_image
from vitreg_jax.embedding._output_folder import STATE_DIR
from vitreg_jax.embedding.dataset import embed_dataset
from vitreg_jax.embedding.embedder import Embedder
from vitreg_jax.embedding.outputs import MANIFEST_FILE, NOT_UTF8, decode_name, encode_name, read_npy_names
from vitreg_jax.errors import UserError
from vitreg_jax.model.birder_json import birder_config
from vitreg_jax.model.vit import ViT

SIZE = (32, 32)
STATS = {"mean": [0.5, 0.45, 0.4], "std": [0.25, 0.24, 0.26]}
ROOT = Path(__file__).resolve().parent.parent
NUM_IMAGES = 10


@pytest.fixture(scope="module")
def model() -> tuple[ViT, dict, Embedder]:
    vit_cfg = tiny_vit_config()
    net = ViT(vit_cfg, rngs=nnx.Rngs(0))
    cfg = birder_config(vit_cfg, STATS, "vit_reg4_b16")
    return net, cfg, Embedder(net, dtype="float32", batch_size=4)


def write_images(folder: Path, count: int = NUM_IMAGES, names: list[str] | None = None) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        name = names[i] if names else f"img{i:02d}.png"
        h, w = int(rng.integers(20, 60)), int(rng.integers(20, 60))
        path = folder / name
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, format="PNG")
        paths.append(path)
    return paths


def reference(model, paths: list[str]) -> np.ndarray:
    """The Embedder's rows for these files, read one by one (what every output row must equal)."""
    _, cfg, embedder = model
    transform = classification_transform(SIZE, cfg["rgb_stats"])
    return embedder(np.stack([transform(load_image(p)) for p in paths]))


def run(model, inputs, out: Path, **kwargs):
    _, cfg, embedder = model
    return embed_dataset(embedder, inputs, out, cfg=cfg, workers=2, progress=False, **kwargs)


def test_npy_and_parquet_rows_equal_the_embedder(model, tmp_path):
    paths = [str(p) for p in write_images(tmp_path / "images")]
    (tmp_path / "images" / "broken.png").write_bytes(b"not a png")
    ref = reference(model, paths)
    result = run(model, [tmp_path / "images"], tmp_path / "npy", files_per_part=3)
    assert (result.embedded, result.failed, result.computed, result.parts_written) == (10, 1, 11, 4)
    assert not result.already_complete
    emb = np.load(tmp_path / "npy" / "embeddings.npy")
    assert read_npy_names(tmp_path / "npy") == paths
    np.testing.assert_allclose(emb, ref, atol=EMBED_FP32_ATOL, rtol=0)
    assert sorted(os.listdir(tmp_path / "npy")) == ["embeddings.npy", "failed.txt", "meta.json", "paths.txt"]

    result = run(model, [tmp_path / "images"], tmp_path / "pq", format="parquet", files_per_part=3)
    assert (result.embedded, result.failed, result.parts_written) == (10, 1, 4)
    manifest = json.loads((tmp_path / "pq" / MANIFEST_FILE).read_text())
    assert [p["file"] for p in manifest["parts"]] == [f"part-{i:05d}.parquet" for i in range(4)]
    assert [p["rows"] for p in manifest["parts"]] == [2, 3, 3, 2]  # 11 files in 3s; broken.png sorts first
    assert manifest["failures"] == [
        {
            "source": str(tmp_path / "images" / "broken.png"),
            "key": str(tmp_path / "images" / "broken.png"),
            "reason": manifest["failures"][0]["reason"],
        }
    ]
    assert "not an image" in manifest["failures"][0]["reason"]
    for field in ("model", "checkpoint", "size", "dtype", "features", "embedding_shape", "status"):
        assert field in manifest
    import pyarrow.parquet as pq

    table = pq.read_table(sorted((tmp_path / "pq").glob("*.parquet")))
    assert table.column("key").to_pylist() == paths
    np.testing.assert_allclose(
        np.stack(table.column("embedding").to_numpy(zero_copy_only=False)), ref, atol=EMBED_FP32_ATOL, rtol=0
    )
    # a rerun is a no-op
    again = run(model, [tmp_path / "images"], tmp_path / "pq", format="parquet", files_per_part=3)
    assert again.already_complete and again.embedded == 10 and again.computed == 0


@pytest.mark.parametrize("features", ["cls", "patches"])
def test_parquet_read_by_pyarrow_polars_duckdb(model, tmp_path, features):
    import duckdb
    import polars as pl

    net, cfg, _ = model
    embedder = Embedder(net, dtype="float32", features=features, batch_size=4)
    paths = [str(p) for p in write_images(tmp_path / "images", 5)]
    embed_dataset(
        embedder,
        [tmp_path / "images"],
        tmp_path / "out",
        cfg=cfg,
        format="parquet",
        files_per_part=2,
        progress=False,
    )
    transform = classification_transform(SIZE, cfg["rgb_stats"])
    ref = embedder(np.stack([transform(load_image(p)) for p in paths]))  # (5, D) or (5, T, D)
    shape = ref.shape[1:]

    import pyarrow.dataset as ds

    table = ds.dataset(
        tmp_path / "out", format="parquet", exclude_invalid_files=True
    ).to_table()  # every part
    assert table.schema.names == ["key", "source", "embedding"]
    values = table.column("embedding").combine_chunks()
    for n in shape:
        assert values.type.list_size == n
        values = values.flatten()
    np.testing.assert_allclose(values.to_numpy().reshape(ref.shape), ref, atol=EMBED_FP32_ATOL, rtol=0)

    frame = pl.read_parquet(str(tmp_path / "out" / "*.parquet"))
    assert frame["key"].to_list() == paths and frame["source"].to_list() == paths
    np.testing.assert_allclose(frame["embedding"].to_numpy(), ref, atol=EMBED_FP32_ATOL, rtol=0)

    glob = str(tmp_path / "out" / "*.parquet")
    rows = duckdb.sql(f"select key, embedding from read_parquet('{glob}') order by key").fetchall()
    assert [r[0] for r in rows] == paths
    np.testing.assert_allclose(
        np.asarray([r[1] for r in rows], np.float32), ref, atol=EMBED_FP32_ATOL, rtol=0
    )
    kind = duckdb.sql(f"select typeof(embedding) from read_parquet('{glob}') limit 1").fetchall()[0][0]
    assert kind == "FLOAT" + "[]" * len(shape)  # parquet stores lists; the fixed sizes are arrow's metadata


def test_names_with_newlines_tabs_and_odd_bytes(model, tmp_path):
    names = ["a\nb.png", "tab\there.png", "back\\slash.png", "line\u2028sep.png", "plain.png"]
    folder = tmp_path / "images"
    paths = [str(p) for p in write_images(folder, len(names), names)]
    latin1 = os.fsdecode(b"caf\xe9.png")  # not UTF-8: a lone surrogate in Python's name for it
    Image.new("RGB", (24, 24), "red").save(folder / latin1, format="PNG")
    (folder / "bad\tname\n.png").write_bytes(b"broken")
    listing = [str(folder / "bad\tname\n.png"), *paths, str(folder / latin1)]
    ref = reference(model, [*paths, str(folder / latin1)])

    run(model, [folder], tmp_path / "npy")
    lines = (tmp_path / "npy" / "paths.txt").read_text("utf-8").split("\n")
    assert lines[-1] == "" and len(lines) - 1 == len(ref)  # one line per row, whatever the names hold
    keys = read_npy_names(tmp_path / "npy")
    emb = np.load(tmp_path / "npy" / "embeddings.npy")
    by_key = dict(zip(keys, emb))
    assert sorted(by_key) == sorted(listing[1:])
    for name, row in zip([*paths, str(folder / latin1)], ref):
        np.testing.assert_allclose(by_key[name], row, atol=EMBED_FP32_ATOL, rtol=0)
    failed = (tmp_path / "npy" / "failed.txt").read_text("utf-8").splitlines()
    assert len(failed) == 1
    key, reason = failed[0].split("\t")
    assert decode_name(key) == listing[0] and "not an image" in decode_name(reason)

    run(model, [folder], tmp_path / "pq", format="parquet")
    import pyarrow.parquet as pq

    table = pq.read_table(sorted((tmp_path / "pq").glob("*.parquet")))
    assert sorted(table.column("key").to_pylist()) == sorted(paths)  # names carried as data
    manifest = json.loads((tmp_path / "pq" / MANIFEST_FILE).read_text())
    assert {f["key"]: f["reason"] for f in manifest["failures"]}[str(folder / latin1)] == NOT_UTF8


def test_name_encoding_round_trips():
    odd = ["a\nb", "a\\nb", "\\", "t\tr\r", "\x00\x1f\x7f\x85\u2028\u2029", "\udce9x", "é中"]
    for name in ["plain", *odd]:
        line = encode_name(name)
        assert decode_name(line) == name
        assert len(line.splitlines()) <= 1 and "\t" not in line
        line.encode("utf-8")  # always writable as UTF-8
    assert encode_name("images/cat 01.jpg") == "images/cat 01.jpg"


@pytest.mark.parametrize("foreign", ["meta.json", "paths.txt", "failed.txt", "embeddings.npy"])
def test_never_overwrites_the_users_files(model, tmp_path, foreign):
    write_images(tmp_path / "images", 2)
    out = tmp_path / "out"
    out.mkdir()
    (out / foreign).write_text("the user's own file\n")
    with pytest.raises(
        UserError, match=f"holds {foreign}.* did not write|{foreign} that vitreg-jax embed did not"
    ):
        run(model, [tmp_path / "images"], out)
    assert (out / foreign).read_text() == "the user's own file\n"
    assert sorted(os.listdir(out)) == [foreign]  # nothing written, the lock file removed


def test_parquet_refuses_foreign_parts(model, tmp_path):
    write_images(tmp_path / "images", 2)
    out = tmp_path / "out"
    out.mkdir()
    (out / "part-00000.parquet").write_bytes(b"mine")
    with pytest.raises(UserError, match="part-00000.parquet that this run did not write"):
        run(model, [tmp_path / "images"], out, format="parquet")
    assert (out / "part-00000.parquet").read_bytes() == b"mine"


def _hold_lock(folder: Path) -> subprocess.Popen:
    code = (
        "import sys, time; from vitreg_jax._locks import FolderLock; "
        "FolderLock(sys.argv[1], 'embed').acquire(); print('locked', flush=True); time.sleep(600)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(folder)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_lock_refuses_a_second_run_and_a_killed_ones_lock_does_not_block(model, tmp_path):
    write_images(tmp_path / "images", 2)
    out = tmp_path / "out"
    out.mkdir()
    holder = _hold_lock(out)
    try:
        with pytest.raises(UserError, match=f"in use by another embed run \\(pid {holder.pid} on"):
            run(model, [tmp_path / "images"], out)
        assert sorted(os.listdir(out)) == [".vitreg-jax-embed.lock"]  # the other run's files are untouched
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        holder.stdout.close()
    assert (out / ".vitreg-jax-embed.lock").exists()  # left behind by the killed run ...
    result = run(model, [tmp_path / "images"], out)  # ... and no obstacle
    assert result.embedded == 2 and not (out / ".vitreg-jax-embed.lock").exists()


def test_lock_without_flock_trusts_a_live_pid_only(tmp_path, monkeypatch):
    import fcntl

    def no_flock(fd, op):
        raise OSError(37, "No locks available")  # ENOLCK, as some network file systems answer

    monkeypatch.setattr(fcntl, "flock", no_flock)
    lock = FolderLock(tmp_path, "embed")
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    import socket

    lock.path.write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout)}))
    with lock:  # a dead pid on this host: taken over
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    lock.path.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getppid()}))
    with pytest.raises(UserError, match="in use by another embed run"):
        lock.acquire()


def _bomb_png(path: Path, width: int, height: int) -> None:
    """A PNG whose header says width x height (PIL reads the header only before our size check)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 8))
        + chunk(b"IEND", b"")
    )


def test_huge_images_are_quiet_failures(model, tmp_path):
    write_images(tmp_path / "images", 2)
    _bomb_png(tmp_path / "images" / "huge_400mp.png", 20000, 20000)  # between the limit and twice it
    _bomb_png(tmp_path / "images" / "huge_700mp.png", 28000, 25000)  # beyond twice the limit
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run(model, [tmp_path / "images"], tmp_path / "out", format="parquet")
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    manifest = json.loads((tmp_path / "out" / MANIFEST_FILE).read_text())
    reasons = {Path(f["key"]).name: f["reason"] for f in manifest["failures"]}
    assert sorted(reasons) == ["huge_400mp.png", "huge_700mp.png"] and result.embedded == 2
    assert all("too large" in r for r in reasons.values())


def _tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    import io

    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_folder_and_tar_shards_give_the_same_rows(model, tmp_path):
    paths = write_images(tmp_path / "images", NUM_IMAGES)
    shards = tmp_path / "shards"
    shards.mkdir()
    for s, lo in enumerate(range(0, NUM_IMAGES, 4)):
        members = [
            (f"{p.stem}.{ext}", p.read_bytes() if ext == "png" else b'{"label": 1}')
            for p in paths[lo : lo + 4]
            for ext in ("png", "json")
        ]  # webdataset: a key's members together
        if s == 1:
            members.append(("corrupt.png", b"\x89PNG broken"))
        _tar(shards / f"shard-{s:04d}.tar", members)
    run(model, [tmp_path / "images"], tmp_path / "folder", files_per_part=4)
    folder_rows = dict(
        zip(
            (Path(k).stem for k in read_npy_names(tmp_path / "folder")),
            np.load(tmp_path / "folder" / "embeddings.npy"),
        )
    )
    for fmt in ("parquet", "npy"):
        out = tmp_path / f"tar-{fmt}"
        result = run(model, [str(shards / "shard-{0000..0002}.tar")], out, format=fmt)
        assert (result.embedded, result.failed) == (NUM_IMAGES, 1)
        if fmt == "parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(sorted(out.glob("*.parquet")))
            keys, sources = table.column("key").to_pylist(), table.column("source").to_pylist()
            values = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
            failures = json.loads((out / MANIFEST_FILE).read_text())["failures"]
        else:
            keys, sources = read_npy_names(out), read_npy_names(out, "sources.txt")
            values = np.load(out / "embeddings.npy")
            failures = json.loads((out / "meta.json").read_text())["failures"]
        assert sorted(keys) == sorted(folder_rows)  # every image exactly once
        assert sources[0] == str(shards / "shard-0000.tar")
        diff = max(np.abs(folder_rows[k] - v).max() for k, v in zip(keys, values))
        assert diff <= EMBED_FOLDER_VS_TAR_ATOL, f"{fmt}: folder vs tar max |diff| {diff:.2e}"
        assert [(f["source"], f["key"]) for f in failures] == [(str(shards / "shard-0001.tar"), "corrupt")]


def test_state_folder_and_refused_reruns(model, tmp_path):
    write_images(tmp_path / "images", 3)
    out = tmp_path / "out"
    run(model, [tmp_path / "images"], out, format="parquet", files_per_part=2)
    assert not (out / STATE_DIR).exists()
    with pytest.raises(UserError, match="another run \\(differs in format"):
        run(model, [tmp_path / "images"], out, format="npy", files_per_part=2)
    with pytest.raises(UserError, match="differs in files_per_part"):
        run(model, [tmp_path / "images"], out, format="parquet", files_per_part=1)
