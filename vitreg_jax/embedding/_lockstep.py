"""The embedding loop of a dataset run: this process's shards, decoded, embedded, written as parts.

:func:`embed_shards` streams the shards (:func:`vitreg_jax.data.loader.iter_item_batches`: threaded, ordered,
bounded decoding), embeds each batch with the :class:`~vitreg_jax.embedding.embedder.Embedder` (one batch in
flight while the next decodes) and writes each shard's part as soon as its last row is back
(:class:`PartBuffer`, :func:`vitreg_jax.embedding.outputs.write_part`). With several processes every step is
one computation over all of their devices, so the processes step in lockstep: before each step they all-gather
how many images each has, every process feeds the largest count (zero rows where it has fewer), and the loop
ends when every process is out of images (:func:`lockstep`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import jax
import numpy as np

from vitreg_jax.data.loader import ItemBatch, Transform, iter_item_batches
from vitreg_jax.data.shards import Shard
from vitreg_jax.embedding.embedder import Embedder, PendingEmbedding
from vitreg_jax.embedding.outputs import (
    NON_FINITE,
    NOT_UTF8,
    PartData,
    encode_name,
    is_utf8,
    part_name,
    write_part,
)
from vitreg_jax.parallel import gather

T = TypeVar("T")


def shard_source(shard: Shard) -> str:
    """What a part's record calls its shard: the tar's path or URL, or the range of files."""
    return (
        shard.url
        if shard.kind == "tar"
        else f"{shard.files[0]} .. {shard.files[-1]} ({len(shard.files)} files)"
    )


class PartBuffer:
    """This process's unfinished parts: rows arrive in order, a part is written once its shard is done."""

    def __init__(
        self, parts_dir: Path, shape: tuple[int, ...], run_id: str, names: dict[int, str], escape: bool
    ) -> None:
        self.parts_dir, self.shape, self.run_id, self.names = parts_dir, shape, run_id, names
        self.escape = escape
        self.open: dict[int, PartData] = {}
        self.written = 0

    def _part(self, index: int) -> PartData:
        if index not in self.open:
            self.open[index] = PartData(index, self.names[index])
        return self.open[index]

    def add(self, chunk: ItemBatch, rows: np.ndarray) -> None:
        for failure in chunk.failed:
            self._part(failure.shard).failures.append(
                {"source": failure.source, "key": failure.key, "reason": failure.reason}
            )
        finite = np.isfinite(rows).all(axis=tuple(range(1, rows.ndim)))  # (b,): every value of each row
        for i, (shard, key, src) in enumerate(zip(chunk.shards.tolist(), chunk.keys, chunk.sources)):
            part = self._part(shard)
            if not finite[i]:  # a NaN or inf row is never written as an embedding
                part.failures.append({"source": src, "key": key, "reason": NON_FINITE})
                continue
            if self.escape:  # npy: its parts hold the names as paths.txt will
                key, src = encode_name(key), encode_name(src)
            elif not (is_utf8(key) and is_utf8(src)):
                part.failures.append({"source": src, "key": key, "reason": NOT_UTF8})
                continue
            part.keys.append(key)
            part.sources.append(src)
            part.rows.append(rows[i : i + 1])
        for index in chunk.done:
            write_part(self.parts_dir / part_name(index), self._part(index), self.shape, self.run_id)
            del self.open[index]
            self.written += 1


def embed_shards(
    embedder: Embedder,
    todo: list[Shard],
    transform: Transform,
    size: tuple[int, int],
    parts_dir: Path,
    run_id: str,
    fmt: str,
    workers: int | None,
    progress: bool,
) -> dict[str, Any]:
    """Embed this process's unfinished shards, in lockstep with the other processes."""
    from tqdm import tqdm

    nproc = jax.process_count()
    rows_per_step = max(1, embedder.batch_size // nproc)
    parts = PartBuffer(
        parts_dir,
        embedder.output_shape(*size),
        run_id,
        {s.index: shard_source(s) for s in todo},
        escape=fmt == "npy",
    )
    stream = iter_item_batches(todo, transform, rows_per_step, workers)
    total = sum(len(s.files) for s in todo) if all(s.kind == "files" for s in todo) else None
    bar = tqdm(total=total, unit="img", desc="embed", disable=not progress, dynamic_ncols=True, smoothing=0.1)
    # compile the full-batch bucket before the clock starts (smaller ones compile on first use)
    if todo or nproc > 1:
        embedder.warmup(*size, buckets=[embedder.batch_size])
    computed = 0
    compute_start = time.perf_counter()
    try:
        for chunk, rows in lockstep(embedder, stream, size):
            parts.add(chunk, rows)
            n = len(chunk.keys) + len(chunk.failed)
            computed += n
            bar.update(n)
    finally:
        bar.close()
        stream.close()
    return {"computed": computed, "parts": parts.written, "seconds": time.perf_counter() - compute_start}


def lockstep(
    embedder: Embedder, stream: Iterator[ItemBatch], size: tuple[int, int]
) -> Iterator[tuple[ItemBatch, np.ndarray]]:
    """(chunk, its embeddings) for every chunk of ``stream``, one embedding in flight while the next decodes;
    with several processes, every step feeds the same number of rows on every process (zero-padded)."""
    channels = embedder.cfg.in_channels
    in_flight: tuple[ItemBatch, PendingEmbedding | None] | None = None
    while True:
        chunk = next(stream, None)
        n = 0 if chunk is None else len(chunk.keys)
        counts = gather([n, chunk is None])  # (processes, 2)
        if counts[:, 1].all():
            break
        n_call = int(counts[:, 0].max())
        pending = None
        if n_call:
            x = chunk.images if chunk is not None and n == n_call else _padded(chunk, n_call, size, channels)
            pending = embedder.embed_async(x)  # (n_call, H, W, C)
        if in_flight is not None:
            yield _result(*in_flight)
        in_flight = (chunk, pending) if chunk is not None else None
    if in_flight is not None:
        yield _result(*in_flight)


def _padded(chunk: ItemBatch | None, rows: int, size: tuple[int, int], channels: int) -> np.ndarray:
    """This process's images followed by zero rows, ``rows`` in all: (rows, H, W, C)."""
    x = np.zeros((rows, *size, channels), np.float32)
    if chunk is not None and len(chunk.keys):
        x[: len(chunk.keys)] = chunk.images
    return x


def _result(chunk: ItemBatch, pending: PendingEmbedding | None) -> tuple[ItemBatch, np.ndarray]:
    rows = pending.result() if pending is not None else np.zeros((0,), np.float32)
    return chunk, rows[: len(chunk.keys)]
