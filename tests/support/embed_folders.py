"""Writes `embed`-like output folders of both formats directly with numpy / pyarrow (tests of readers)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vitreg_jax.embedding.outputs import NPY_FORMAT, PARQUET_FORMAT, encode_name


def write_npy_folder(
    out: Path,
    keys: list[str],
    values: np.ndarray,
    *,
    status: str = "complete",
    sources: list[str] | None = None,
) -> Path:
    out.mkdir(parents=True)
    np.save(out / "embeddings.npy", values.astype(np.float32))
    (out / "paths.txt").write_text("".join(encode_name(k) + "\n" for k in keys), encoding="utf-8")
    if sources is not None:
        (out / "sources.txt").write_text("".join(encode_name(s) + "\n" for s in sources), encoding="utf-8")
    meta = {
        "format": NPY_FORMAT,
        "status": status,
        "names": "escaped",
        "sources_file": sources is not None,
        "embedding_shape": list(values.shape[1:]),
        "failures": [{"source": "x", "key": "bad.jpg", "reason": "not an image"}],
    }
    (out / "meta.json").write_text(json.dumps(meta))
    return out


def embedding_column(values: np.ndarray) -> pa.Array:
    array: pa.Array = pa.array(values.astype(np.float32).reshape(-1))
    for n in reversed(values.shape[1:]):
        array = pa.FixedSizeListArray.from_arrays(array, int(n))
    return array


def write_parquet_folder(
    out: Path,
    keys: list[str],
    values: np.ndarray,
    part_rows: list[int],
    *,
    status: str = "complete",
    row_group: int = 2,
    shuffle_manifest: bool = True,
) -> Path:
    """Parts part-00000.parquet... of part_rows rows each, row groups of `row_group` rows."""
    out.mkdir(parents=True)
    parts, start = [], 0
    for index, n in enumerate(part_rows):
        name = f"part-{index:05d}.parquet"
        source = f"shard-{index}.tar"
        table = pa.table(
            {
                "key": pa.array(keys[start : start + n], pa.string()),
                "source": pa.array([source] * n, pa.string()),
                "embedding": embedding_column(values[start : start + n]),
            }
        )
        pq.write_table(table, out / name, row_group_size=row_group)
        parts.append({"file": name, "index": index, "source": source, "rows": n, "failed": 0})
        start += n
    assert start == len(keys)
    manifest = {
        "format": PARQUET_FORMAT,
        "status": status,
        "embedding_shape": list(values.shape[1:]),
        "parts": parts[::-1] if shuffle_manifest else parts,
        "failures": [],
    }
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out
