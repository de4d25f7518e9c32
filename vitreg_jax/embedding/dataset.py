"""Embed a dataset into a folder: resumable, in one process or several, as npy or parquet.

>>> net, cfg = vitreg_jax.load_model_with_cfg(None, "ckpt/mim_300")
>>> result = embed_dataset(net, ["images/"], "out/", cfg=cfg, checkpoint="ckpt/mim_300", format="parquet")

The output formats are described in :mod:`vitreg_jax.embedding.outputs`; ``vitreg-jax embed`` is this function
behind a command line.

How a run goes. The inputs are cut into ordered shards (:func:`vitreg_jax.data.shards.list_shards`: each tar
file is one, consecutive image files are grouped ``files_per_part`` at a time); every shard becomes
one part file, written under a temporary name and renamed, so a part is complete or absent. A run records
what it computes (checkpoint, size, dtype, features, the shards) in ``DIR/.vitreg-jax-embed/run.json``; a
rerun with the same settings skips the shards whose part exists and computes the rest (whatever the number
of processes or the batch size), while a rerun with other settings is refused rather than mixing two runs.
When every part exists, ``npy`` merges them into its four files and ``parquet`` writes ``manifest.json``;
that file, written last, marks the run complete, and the state folder is removed.

Safety. ``DIR`` is locked for the run (:class:`vitreg_jax._locks.FolderLock`): a second run into it stops with
a ``UserError`` saying it is in use; a lock left by a killed run does not block. A run never overwrites a file
it did not write (:mod:`vitreg_jax.embedding._output_folder`): a fresh run into a folder that already holds
``meta.json``, ``paths.txt``, ``failed.txt``, ``sources.txt``, ``embeddings.npy``, ``manifest.json`` or
``part-*.parquet`` is refused, and so is a rerun with other settings.

Several processes (``jax.distributed`` initialised before the call): process p takes the shards whose index
is p modulo the process count, decodes only those, and writes their parts. Every step is one computation
over every device of every process (the Embedder's mesh), so the processes step in lockstep
(:mod:`vitreg_jax.embedding._lockstep`): before each step they exchange how many images each has (one small
all-gather), every process feeds the largest count (zero-padded), and the loop ends when all are out of
images. Process 0 checks and locks the folder first and writes the final files at the end; ``DIR`` must be
on a file system every process sees.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from vitreg_jax._locks import FolderLock
from vitreg_jax.data.preprocess import classification_transform, get_size_from_signature
from vitreg_jax.data.shards import FILES_PER_SHARD, Shard, list_shards, shards_for_process
from vitreg_jax.embedding._lockstep import embed_shards
from vitreg_jax.embedding._output_folder import STATE_DIR, end_run, start_run
from vitreg_jax.embedding.embedder import Embedder
from vitreg_jax.embedding.options import FORMATS
from vitreg_jax.embedding.outputs import (
    MANIFEST_FILE,
    META_FILE,
    NPY_FORMAT,
    PARQUET_FORMAT,
    part_name,
    read_part_record,
    write_manifest,
    write_npy,
)
from vitreg_jax.errors import UserError
from vitreg_jax.fileio import make_dir, read_json_object_or_none
from vitreg_jax.parallel import gather, on_every_process, sync

if TYPE_CHECKING:
    from vitreg_jax.model.vit import ViT

# Default global batch per device: XLA:CPU peaks at small batches (micro-batched inside the jit);
# accelerators want large ones.
DEFAULT_BATCH_PER_DEVICE = {"cpu": 32, "gpu": 256, "tpu": 256}


@dataclass(frozen=True, kw_only=True)
class EmbedResult:
    """What a call did: where, how many rows in all, and what this call computed."""

    out: Path
    format: str
    embedded: int
    failed: int
    computed: int  # images this call read (all processes), 0 when the folder was already complete
    parts_written: int  # parts this call wrote (all processes)
    already_complete: bool
    images_per_second: float | None
    meta: dict[str, Any]  # meta.json (npy) or manifest.json (parquet)


# settings ----------------------------------------------------------------------------------------------
def checkpoint_identity(checkpoint: str | os.PathLike[str]) -> dict[str, Any]:
    """What names a checkpoint: the argument, a local file's or folder's path, size and modification time,
    and a vitreg-jax checkpoint's provenance."""
    ckpt = os.fspath(checkpoint)
    path = Path(ckpt).expanduser()
    ident: dict[str, Any] = {"argument": ckpt}
    if path.exists():
        ident["path"] = str(path.resolve())
        probe = path / "metadata.json" if path.is_dir() else path
        if probe.is_file():
            st = probe.stat()
            ident.update(size=st.st_size, mtime_ns=st.st_mtime_ns)
        if path.is_dir() and probe.is_file():
            try:
                ident["provenance"] = json.loads(probe.read_text()).get("provenance")
            except (OSError, ValueError, AttributeError):
                pass
    return ident


def _inputs_digest(shards: Sequence[Shard]) -> str:
    """sha256 of the ordered shards (tar URLs, file paths): what a resumed run must see again."""
    digest = hashlib.sha256()
    for shard in shards:
        for name in (shard.url,) if shard.kind == "tar" else shard.files:
            digest.update(
                f"{shard.index}\0{shard.kind}\0".encode() + name.encode("utf-8", "surrogatepass") + b"\0"
            )
    return digest.hexdigest()


def _prepare(out: Path, fmt: str, ident: dict[str, Any], lock: FolderLock | None) -> str:
    """Process 0 locks and checks the folder (:func:`start_run`), the others follow its verdict."""
    verdict = 2
    error: UserError | None = None
    if lock is not None:
        try:
            lock.acquire()
            verdict = 1 if start_run(out, fmt, ident) == "complete" else 0
        except UserError as e:
            error = e
    verdict = int(gather([verdict])[0, 0])
    if error is not None:
        raise error
    if verdict == 2:
        raise UserError(f"process 0 refused the output folder {out}; see its message")
    return "complete" if verdict == 1 else "run"


# the run -----------------------------------------------------------------------------------------------
def embed_dataset(
    model: Embedder | ViT,
    inputs: Sequence[str | os.PathLike[str]] | Sequence[Shard] | str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    cfg: Mapping[str, Any],
    format: str = "npy",
    checkpoint: str | os.PathLike[str] | None = None,
    size: tuple[int, int] | None = None,
    dtype: str | None = None,
    features: str = "cls",
    batch_size: int | None = None,
    shard_weights: bool = False,
    files_per_part: int = FILES_PER_SHARD,
    workers: int | None = None,
    progress: bool = True,
) -> EmbedResult:
    """Embed ``inputs`` into the folder ``out``; rerun the same call to resume.

    ``inputs``: what :func:`vitreg_jax.data.shards.list_shards` expands (image files, folders, path lists,
    .tar shards, brace patterns, globs, fsspec URLs), or the shards it returned.

    ``model`` is a built ``ViT`` (an :class:`~vitreg_jax.embedding.embedder.Embedder` is made from it with
    ``dtype`` (``"float32"``, ``"bfloat16"`` or ``"auto"``; None: the Embedder's default, float32),
    ``features``, ``batch_size`` (global; default 32 per CPU device, 256 per GPU/TPU device) and
    ``shard_weights``) or an ``Embedder`` (those four are then its own). ``cfg`` is the birder config that
    came with the weights: its ``rgb_stats`` preprocess the images and its ``signature`` gives the default
    ``size`` (H, W). ``checkpoint`` names the weights in the outputs and in the run's identity (resuming with
    other weights is refused when it is given). ``files_per_part``: image files per part (a tar shard is one
    part). See the module docstring for resuming, locking and several processes. ``UserError`` for anything
    the user can fix; nothing is written before every check has passed.
    """
    start_time = time.perf_counter()
    if format not in FORMATS:
        raise UserError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    shards, embedder, size, ident = on_every_process(
        lambda: _settings(
            model,
            inputs,
            cfg,
            fmt=format,
            checkpoint=checkpoint,
            size=size,
            dtype=dtype,
            features=features,
            batch_size=batch_size,
            shard_weights=shard_weights,
            files_per_part=files_per_part,
        ),
        "read its inputs or settings",
    )
    transform = classification_transform(size, cfg["rgb_stats"])
    run_id = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()
    every = gather(np.frombuffer(bytes.fromhex(run_id)[:8], np.int32).tolist())
    if not (every == every[0]).all():
        raise UserError(
            "the processes disagree on the inputs or settings: give every process the same "
            "arguments and the same file system view"
        )

    pid, nproc = jax.process_index(), jax.process_count()
    if pid == 0:
        make_dir(out)
    lock = FolderLock(out, "embed") if pid == 0 else None
    try:
        if _prepare(out, format, ident, lock) == "complete":
            return _already_complete(out, format)
        parts_dir = out if format == "parquet" else out / STATE_DIR
        todo = [
            s for s in shards_for_process(shards, pid, nproc) if not (parts_dir / part_name(s.index)).exists()
        ]
        counters = embed_shards(
            embedder, todo, transform, size, parts_dir, run_id, format, workers, progress and pid == 0
        )
        totals = gather([counters["computed"], counters["parts"]]).sum(axis=0)
        sync("vitreg-jax embed: parts written")
        meta = _finish_meta(ident, cfg, embedder, size, counters, totals, start_time)
        result_meta = on_every_process(
            lambda: _merge(out, parts_dir, format, shards, embedder, size, meta) if pid == 0 else {},
            "write the final files",
        )
    finally:
        if lock is not None:
            lock.release()
    counts = result_meta.get("counts", {})
    return EmbedResult(
        out=out,
        format=format,
        embedded=counts.get("embedded", 0),
        failed=counts.get("failed", 0),
        computed=int(totals[0]),
        parts_written=int(totals[1]),
        already_complete=False,
        images_per_second=meta["timing"]["images_per_second_this_run"],
        meta=result_meta,
    )


def _settings(
    model: Embedder | ViT,
    inputs: Any,
    cfg: Mapping[str, Any],
    *,
    fmt: str,
    checkpoint: str | os.PathLike[str] | None,
    size: tuple[int, int] | None,
    dtype: str | None,
    features: str,
    batch_size: int | None,
    shard_weights: bool,
    files_per_part: int,
) -> tuple[list[Shard], Embedder, tuple[int, int], dict[str, Any]]:
    """The shards, the Embedder, the input size and the run's identity; UserError for a mistake."""
    shards = _shards(inputs, files_per_part)
    embedder = (
        model
        if isinstance(model, Embedder)
        else _make_embedder(model, dtype, features, batch_size, shard_weights)
    )
    size = size or get_size_from_signature(cfg["signature"])
    p = embedder.cfg.patch_size
    if size[0] % p or size[1] % p:
        raise UserError(f"size {size[0]}x{size[1]} is not a multiple of the model's patch size {p}")
    return shards, embedder, size, _run_identity(fmt, checkpoint, cfg, size, embedder, shards, files_per_part)


def _shards(inputs: Any, files_per_part: int) -> list[Shard]:
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    if inputs and all(isinstance(i, Shard) for i in inputs):
        return list(inputs)
    return list_shards([os.fspath(i) for i in inputs], files_per_part)


def _run_identity(
    fmt: str,
    checkpoint: str | os.PathLike[str] | None,
    cfg: Mapping[str, Any],
    size: tuple[int, int],
    embedder: Embedder,
    shards: list[Shard],
    files_per_part: int,
) -> dict[str, Any]:
    """What a resumed run must compute the same way (not the batch size, devices or processes)."""
    return {
        "format": NPY_FORMAT if fmt == "npy" else PARQUET_FORMAT,
        "checkpoint": checkpoint_identity(checkpoint) if checkpoint is not None else None,
        "model": cfg.get("name"),
        "size": list(size),
        "dtype": embedder.dtype,
        "features": embedder.features,
        "files_per_part": files_per_part if any(s.kind == "files" for s in shards) else None,
        "num_shards": len(shards),
        "inputs_sha256": _inputs_digest(shards),
    }


def _make_embedder(
    net: ViT, dtype: str | None, features: str, batch_size: int | None, shard_weights: bool
) -> Embedder:
    ndev = jax.device_count()
    if batch_size is None:
        batch_size = DEFAULT_BATCH_PER_DEVICE.get(jax.default_backend(), 32) * ndev
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"batch size must be a positive integer, got {batch_size!r}")
    return Embedder(net, dtype=dtype, features=features, batch_size=batch_size, shard_weights=shard_weights)


def _already_complete(out: Path, fmt: str) -> EmbedResult:
    meta = read_json_object_or_none(out / (META_FILE if fmt == "npy" else MANIFEST_FILE)) or {}
    if jax.process_index() == 0:
        end_run(out)
    counts = meta.get("counts", {})
    return EmbedResult(
        out=out,
        format=fmt,
        embedded=counts.get("embedded", 0),
        failed=counts.get("failed", 0),
        computed=0,
        parts_written=0,
        already_complete=True,
        images_per_second=None,
        meta=meta,
    )


def _finish_meta(
    ident: dict[str, Any],
    cfg: Mapping[str, Any],
    embedder: Embedder,
    size: tuple[int, int],
    counters: dict[str, Any],
    totals: np.ndarray,
    start: float,
) -> dict[str, Any]:
    from vitreg_jax import __version__

    seconds = counters["seconds"]
    rate = round(int(totals[0]) / seconds, 3) if seconds > 0 and totals[0] else None
    return {
        "status": "complete",
        "format": ident["format"],
        "run": ident,
        "checkpoint": ident["checkpoint"],  # the argument, its path, size, mtime and provenance
        "model": cfg.get("registered_name") or cfg.get("name"),
        "size": list(size),
        "dtype": embedder.dtype,
        "features": embedder.features,
        "batch_size": embedder.batch_size,
        "embedding_shape": list(embedder.output_shape(*size)),
        "rgb_stats": cfg["rgb_stats"],
        "counts": {"computed_this_run": int(totals[0]), "parts_written_this_run": int(totals[1])},
        "timing": {
            "seconds_total_this_run": round(time.perf_counter() - start, 3),
            "seconds_embedding_this_run": round(seconds, 3),
            "images_per_second_this_run": rate,
            "compile_seconds": round(sum(embedder.compile_seconds.values()), 3),
        },
        "devices": {
            "platform": jax.default_backend(),
            "count": embedder.num_devices,
            "processes": jax.process_count(),
            "kind": jax.devices()[0].device_kind,
            "weights": "sharded" if _sharded(embedder) else "replicated",
        },
        "xla_flags": os.environ.get("XLA_FLAGS"),
        "versions": {"vitreg_jax": __version__, "jax": jax.__version__},
    }


def _sharded(embedder: Embedder) -> bool:
    return any(
        len(spec)
        for spec in jax.tree_util.tree_leaves(
            embedder.param_specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)
        )
    )


def _merge(
    out: Path,
    parts_dir: Path,
    fmt: str,
    shards: list[Shard],
    embedder: Embedder,
    size: tuple[int, int],
    meta: dict[str, Any],
) -> dict[str, Any]:
    """Process 0: every part's record, then the npy files or the manifest (the completion marker last)."""
    files = [parts_dir / part_name(s.index) for s in shards]
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise UserError(
            f"{parts_dir}: parts {', '.join(missing[:5])} are missing; every process must write to the "
            "same output folder (a file system all of them see)"
        )
    records = [read_part_record(f) for f in files]
    shape = embedder.output_shape(*size)
    embedded = sum(int(r["rows"]) for r in records)
    failed = sum(int(r["failed"]) for r in records)
    meta["counts"]["inputs"] = embedded + failed
    if fmt == "npy":
        write_npy(out, files, records, shape, meta)
    else:
        write_manifest(out, records, meta)
    end_run(out)
    return read_json_object_or_none(out / (META_FILE if fmt == "npy" else MANIFEST_FILE)) or {}
