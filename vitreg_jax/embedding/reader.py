"""Reading ``embed`` output folders of either format, streamed: ``open_embeddings(dir) -> EmbeddingSet``.

The formats are defined in :mod:`vitreg_jax.embedding.outputs` (npy: ``embeddings.npy`` + ``paths.txt`` +
``meta.json`` [+ ``sources.txt``]; parquet: ``part-NNNNN.parquet`` + ``manifest.json``). Only finished runs
are read (``"status": "complete"`` in ``meta.json`` / ``manifest.json``).

``EmbeddingSet``: ``.keys`` (list[str]: file paths, or tar keys), ``.sources`` (the file or shard each row
came from), ``.shape`` (one row's shape: ``(D,)``, or ``(T, D)`` for token features), ``.dim`` (D),
``.failures`` (list of (key, reason)), ``.meta`` (the run's meta.json / manifest.json), ``len()``,
``.blocks(rows)`` -> iterator of ``(keys, (n, *shape) float32 array)`` with ``n <= rows``, reading only
that much at a time (the npy array is memory-mapped; parquet parts are read row group by row group, in
part order), and ``.load()`` -> ``(keys, (N, *shape) float32 array)``. Keys and sources are read up front
(strings only); the embeddings are never all in memory unless ``.load()`` is called.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vitreg_jax.embedding.outputs import MANIFEST_FILE, META_FILE, read_npy_names
from vitreg_jax.errors import UserError
from vitreg_jax.fileio import first_line, read_json_object

if TYPE_CHECKING:
    import pyarrow as pa

DEFAULT_BLOCK_ROWS = 65536
EMBEDDINGS_FILE = "embeddings.npy"
COMPLETE = "complete"


@dataclass
class EmbeddingSet:
    """One ``embed`` output folder (see the module docstring)."""

    directory: Path
    format: str  # "npy" | "parquet"
    keys: list[str]
    sources: list[str]
    shape: tuple[int, ...]
    meta: dict[str, Any]
    failures: list[tuple[str, str]] = field(default_factory=list)
    _parts: list[Path] = field(default_factory=list, repr=False)

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def dim(self) -> int:
        return self.shape[-1]

    def blocks(self, rows: int = DEFAULT_BLOCK_ROWS) -> Iterator[tuple[list[str], np.ndarray]]:
        """``(keys, (n, *shape) float32)`` blocks of at most ``rows`` rows, in row order."""
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
            raise UserError(f"block rows must be a positive integer, got {rows!r}")
        source = self._npy_blocks(rows) if self.format == "npy" else self._parquet_blocks(rows)
        start = 0
        for values in source:
            yield self.keys[start : start + len(values)], values
            start += len(values)
        if start != len(self):
            raise UserError(f"{self.directory}: holds {start} embeddings for {len(self)} keys")

    def load(self) -> tuple[list[str], np.ndarray]:
        """All keys and the (N, *shape) float32 embeddings, in memory."""
        values = [v for _, v in self.blocks()]
        return list(self.keys), np.concatenate(values) if values else np.zeros((0, *self.shape), np.float32)

    def _npy_blocks(self, rows: int) -> Iterator[np.ndarray]:
        array = np.load(self.directory / EMBEDDINGS_FILE, mmap_mode="r")  # (N, *shape), memory-mapped
        for start in range(0, array.shape[0], rows):
            yield np.asarray(array[start : start + rows], dtype=np.float32)

    def _parquet_blocks(self, rows: int) -> Iterator[np.ndarray]:
        import pyarrow.parquet as pq

        for path in self._parts:
            try:
                part = pq.ParquetFile(path)
            except OSError as e:
                raise UserError(f"{path}: cannot read this part ({first_line(e)})") from None
            with part:
                for batch in part.iter_batches(batch_size=rows, columns=["embedding"]):
                    yield _fixed_list_values(batch.column(0), self.shape, path)


def open_embeddings(directory: str | os.PathLike[str]) -> EmbeddingSet:
    """The ``embed`` output in ``directory`` (npy or parquet format); ``UserError`` for anything else."""
    path = Path(directory)
    if not path.is_dir():
        raise UserError(f"{path}: no such folder (expected an embed output folder)")
    if (path / MANIFEST_FILE).is_file():
        return _open_parquet(path)
    if (path / META_FILE).is_file():
        return _open_npy(path)
    raise UserError(f"{path}: not an embed output folder (no {META_FILE} or {MANIFEST_FILE})")


def _read_marker(path: Path) -> dict[str, Any]:
    meta = read_json_object(path, "an embed record")
    if meta.get("status") != COMPLETE:
        raise UserError(f"{path.parent}: the embed run has not finished (rerun the same embed command)")
    return meta


def _failures(meta: dict[str, Any]) -> list[tuple[str, str]]:
    return [(str(f.get("key", "")), str(f.get("reason", ""))) for f in meta.get("failures", [])]


def _open_npy(path: Path) -> EmbeddingSet:
    meta = _read_marker(path / META_FILE)
    try:
        array = np.load(path / EMBEDDINGS_FILE, mmap_mode="r")
        keys = (
            read_npy_names(path)
            if meta.get("names")
            else (path / "paths.txt").read_text("utf-8").splitlines()
        )
        sources = read_npy_names(path, "sources.txt") if meta.get("sources_file") else keys
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read the embeddings ({first_line(e)})") from None
    if array.ndim < 2 or len(keys) != array.shape[0] or len(sources) != len(keys):
        raise UserError(f"{path}: {EMBEDDINGS_FILE} has {array.shape[:1]} rows for {len(keys)} names")
    return EmbeddingSet(path, "npy", keys, list(sources), tuple(array.shape[1:]), meta, _failures(meta))


def _open_parquet(path: Path) -> EmbeddingSet:
    import pyarrow.parquet as pq

    meta = _read_marker(path / MANIFEST_FILE)
    parts = [path / str(p["file"]) for p in sorted(meta.get("parts", []), key=lambda p: int(p["index"]))]
    keys: list[str] = []
    sources: list[str] = []
    shape = tuple(int(n) for n in meta.get("embedding_shape") or ())
    try:
        for part in parts:
            schema = pq.read_schema(part)
            shape = shape or _list_shape(
                schema.field("embedding").type if "embedding" in schema.names else None
            )
            _check_schema(part, schema, shape)
            table = pq.read_table(part, columns=["key", "source"])
            if table.column("key").null_count or table.column("source").null_count:
                raise UserError(f"{part}: a key or source is null (a part written by another tool?)")
            keys.extend(table.column("key").to_pylist())
            sources.extend(table.column("source").to_pylist())
    except (OSError, KeyError, ValueError) as e:
        raise UserError(f"{path}: cannot read its parquet parts ({first_line(e)})") from None
    if not shape:
        raise UserError(f"{path}: {MANIFEST_FILE} gives no embedding_shape and there are no parts")
    return EmbeddingSet(path, "parquet", keys, sources, shape, meta, _failures(meta), parts)


def _check_schema(part: Path, schema: pa.Schema, shape: tuple[int, ...]) -> None:
    """An embed part's columns: ``key`` and ``source`` strings and ``embedding`` fixed-size lists of floats of
    ``shape``; a part rewritten by another tool with other types is one line naming what differs."""
    import pyarrow as pa

    for name in ("key", "source", "embedding"):
        if name not in schema.names:
            raise UserError(f"{part}: no {name!r} column (columns: {', '.join(schema.names)})")
    for name in ("key", "source"):
        kind = schema.field(name).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise UserError(f"{part}: column {name!r} holds {kind}, expected strings")
    kind = schema.field("embedding").type
    inner = kind
    while pa.types.is_fixed_size_list(inner):
        inner = inner.value_type
    if _list_shape(kind) != shape or not pa.types.is_floating(inner):
        raise UserError(
            f"{part}: column 'embedding' holds {kind}, expected fixed-size lists of floats of shape "
            f"{list(shape)} (a part written by another tool or another model?)"
        )


def _list_shape(dtype: pa.DataType | None) -> tuple[int, ...]:
    """(D,) or (T, D) from a (nested) fixed-size-list type."""
    import pyarrow as pa

    shape: list[int] = []
    while dtype is not None and pa.types.is_fixed_size_list(dtype):
        shape.append(dtype.list_size)
        dtype = dtype.value_type
    return tuple(shape)


def _fixed_list_values(column: pa.Array, shape: tuple[int, ...], where: Path) -> np.ndarray:
    """(n, *shape) float32 from a (nested) fixed-size-list column; a null row or value is a UserError."""
    values = column
    for _ in shape:
        if values.null_count:
            raise UserError(f"{where}: an embedding row holds nulls (a part written by another tool?)")
        values = values.flatten()
    if values.null_count:
        raise UserError(f"{where}: an embedding row holds nulls (a part written by another tool?)")
    flat = values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return flat.reshape(len(column), *shape)  # (n, *shape)
