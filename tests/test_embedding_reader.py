"""vitreg_jax.embedding.reader.open_embeddings: both embed output formats, streamed in blocks."""

from __future__ import annotations

import numpy as np
import pytest

from tests.support.embed_folders import write_npy_folder, write_parquet_folder
from vitreg_jax.embedding import outputs as embed_outputs
from vitreg_jax.embedding.reader import open_embeddings
from vitreg_jax.errors import UserError


def data(n: int = 11, shape: tuple[int, ...] = (6,), seed: int = 0) -> tuple[list[str], np.ndarray]:
    keys = [f"cls{i % 3}/img{i}.jpg" for i in range(n)]
    return keys, np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)


def test_npy_folder(tmp_path):
    keys, values = data()
    keys[4] = "odd\nname\twith\\escapes.jpg"
    emb = open_embeddings(write_npy_folder(tmp_path / "e", keys, values))
    assert (emb.format, len(emb), emb.dim, emb.shape) == ("npy", 11, 6, (6,))
    assert emb.keys == keys and emb.sources == keys
    assert emb.failures == [("bad.jpg", "not an image")]
    blocks = list(emb.blocks(4))
    assert [len(k) for k, _ in blocks] == [4, 4, 3] and [len(v) for _, v in blocks] == [4, 4, 3]
    np.testing.assert_array_equal(np.concatenate([v for _, v in blocks]), values)
    assert [k for ks, _ in blocks for k in ks] == keys
    loaded_keys, loaded = emb.load()
    assert loaded_keys == keys and loaded.dtype == np.float32
    np.testing.assert_array_equal(loaded, values)


def test_npy_sources_file(tmp_path):
    keys, values = data(3)
    emb = open_embeddings(write_npy_folder(tmp_path / "e", keys, values, sources=["a.tar", "a.tar", "b.tar"]))
    assert emb.sources == ["a.tar", "a.tar", "b.tar"] and emb.keys == keys


def test_parquet_folder_in_part_order_streamed_by_row_group(tmp_path):
    keys, values = data(11)
    emb = open_embeddings(write_parquet_folder(tmp_path / "e", keys, values, [5, 0, 6], row_group=2))
    assert (emb.format, len(emb), emb.dim) == ("parquet", 11, 6)
    assert emb.keys == keys  # the manifest lists the parts backwards: rows still come in part-index order
    assert emb.sources == ["shard-0.tar"] * 5 + ["shard-2.tar"] * 6
    blocks = list(emb.blocks(3))
    assert all(len(v) <= 3 for _, v in blocks)
    np.testing.assert_array_equal(np.concatenate([v for _, v in blocks]), values)
    assert [k for ks, _ in blocks for k in ks] == keys
    np.testing.assert_array_equal(emb.load()[1], values)


def test_parquet_blocks_read_parts_lazily(tmp_path):
    keys, values = data(8)
    folder = write_parquet_folder(tmp_path / "e", keys, values, [4, 4], row_group=4)
    blocks = open_embeddings(folder).blocks(4)
    first_keys, first = next(blocks)
    assert first_keys == keys[:4]
    np.testing.assert_array_equal(first, values[:4])
    (folder / "part-00001.parquet").unlink()  # not opened yet: reading it fails only now
    with pytest.raises(UserError, match="part-00001.parquet"):
        next(blocks)


def test_token_features_keep_their_shape(tmp_path):
    keys, values = data(5, (3, 4))
    for emb in (
        open_embeddings(write_npy_folder(tmp_path / "n", keys, values)),
        open_embeddings(write_parquet_folder(tmp_path / "p", keys, values, [2, 3])),
    ):
        assert emb.shape == (3, 4) and emb.dim == 4
        np.testing.assert_array_equal(emb.load()[1], values)


def test_folders_written_by_embed_outputs_read_back(tmp_path):
    """The writers the embed command uses, read by open_embeddings (catches a format drift)."""
    keys, values = data(7)
    parts_dir = tmp_path / "p"
    parts_dir.mkdir()
    records, files = [], []
    for index, (lo, hi) in enumerate([(0, 3), (3, 7)]):
        part = embed_outputs.PartData(
            index, f"s{index}.tar", keys[lo:hi], [f"s{index}.tar"] * (hi - lo), [values[lo:hi]], []
        )
        files.append(parts_dir / embed_outputs.part_name(index))
        records.append(embed_outputs.write_part(files[-1], part, (6,), "run"))
    meta = {"format": embed_outputs.PARQUET_FORMAT, "status": "complete", "embedding_shape": [6]}
    embed_outputs.write_manifest(parts_dir, records, meta)
    npy_dir = tmp_path / "n"
    npy_dir.mkdir()
    embed_outputs.write_npy(npy_dir, files, records, (6,), {**meta, "format": embed_outputs.NPY_FORMAT})
    for folder, fmt in ((parts_dir, "parquet"), (npy_dir, "npy")):
        emb = open_embeddings(folder)
        assert emb.format == fmt and emb.keys == keys
        assert emb.sources == ["s0.tar"] * 3 + ["s1.tar"] * 4
        np.testing.assert_array_equal(emb.load()[1], values)


def test_errors(tmp_path):
    with pytest.raises(UserError, match="no such folder"):
        open_embeddings(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(UserError, match="not an embed output folder"):
        open_embeddings(tmp_path / "plain")
    keys, values = data(3)
    with pytest.raises(UserError, match="has not finished"):
        open_embeddings(write_npy_folder(tmp_path / "run", keys, values, status="running"))
    with pytest.raises(UserError, match="has not finished"):
        open_embeddings(write_parquet_folder(tmp_path / "prun", keys, values, [3], status="running"))
    folder = write_npy_folder(tmp_path / "short", keys, values)
    (folder / "paths.txt").write_text("only-one\n")
    with pytest.raises(UserError, match="rows for 1 names"):
        open_embeddings(folder)
    bad = write_npy_folder(tmp_path / "badjson", keys, values)
    (bad / "meta.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot read it as an embed record"):
        open_embeddings(bad)
    with pytest.raises(UserError, match="block rows"):
        next(open_embeddings(write_npy_folder(tmp_path / "ok", keys, values)).blocks(0))
