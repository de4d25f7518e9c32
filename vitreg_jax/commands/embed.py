"""``vitreg-jax embed --checkpoint CKPT INPUT... --out DIR``: images to embeddings, resumable, multi-process.

Output (DESIGN.md): ``DIR/embeddings.npy`` (N x D float32, or N x T x D for ``--features tokens|patches``;
row i belongs to line i of ``DIR/paths.txt``), ``DIR/failed.txt`` (path, tab, reason per unreadable input)
and ``DIR/meta.json`` (checkpoint, size, dtype, counts, timing), written last: a ``meta.json`` with
``"status": "complete"`` marks a finished run.

How a run survives Ctrl-C or a kill: the inputs are cut into parts of one batch each, and every finished
part is written to ``DIR/.parts/`` under a temporary name and renamed into place, so a part file is either
complete or absent. A rerun with the same arguments (``.parts/run.json`` records them) skips the parts that
exist, computes the rest, then merges all parts into the final files (again temporary name + rename) and
removes ``.parts``. A rerun with other arguments is refused rather than mixing two runs.

Several processes (``--coordinator/--num-processes/--process-id``, or ``--distributed`` where
``jax.distributed.initialize()`` can detect the cluster) form one run: process p takes the p-th contiguous
share of the inputs, all processes step through their shares in lockstep (the batch is sharded over every
device of every process, so each step is one collective computation; shorter shares are zero-padded), each
writes its own parts, and process 0 merges them in input order. ``DIR`` must then be on a file system that
every process sees.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vitreg_jax.commands import distributed
from vitreg_jax.errors import UserError

FEATURES = ("cls", "tokens", "patches")
DTYPES = ("float32", "bfloat16")
PARTS_DIR = ".parts"
RUN_FILE = "run.json"
OUTPUT_FILES = ("embeddings.npy", "paths.txt", "failed.txt", "meta.json")
# Default global batch per device: XLA:CPU peaks at small batches (micro-batched inside the jit);
# accelerators want large ones.
DEFAULT_BATCH_PER_DEVICE = {"cpu": 32, "gpu": 256, "tpu": 256}
FORMAT = "vitreg-jax-embed/1"


# command line ---------------------------------------------------------------------------------------------
def _size(text: str) -> tuple[int, int]:
    parts = re.split(r"[x,]", text.strip().lower())
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected H, HxW or H,W with positive integers, got {text!r}"
        ) from None
    if len(values) not in (1, 2) or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected H, HxW or H,W with positive integers, got {text!r}")
    return (values[0], values[-1])


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "embed",
        help="images (files, folders, .txt path lists) to embeddings, resumable",
        description="Embed images with a vitreg-jax checkpoint, a birder .pt/.safetensors file or a published "
        "weight name. Writes DIR/embeddings.npy, DIR/paths.txt, DIR/failed.txt and DIR/meta.json; rerun the "
        "same command to resume an interrupted run.",
    )
    p.add_argument(
        "inputs", nargs="*", metavar="INPUT", help="image files, folders (recursive) or .txt lists"
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        metavar="CKPT",
        help="Orbax checkpoint dir, birder .pt/.safetensors, or a published weight name",
    )
    p.add_argument(
        "--config", default=None, metavar="JSON", help="birder json config for a birder weights file"
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="global batch (all devices); default 32 per CPU device, 256 per GPU/TPU device",
    )
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default="float32",
        help="float32, or bfloat16 matmuls with float32 accumulation, norms and softmax",
    )
    p.add_argument(
        "--size",
        type=_size,
        default=None,
        metavar="H[xW]",
        help="input size (default: the checkpoint's signature); a multiple of the patch size",
    )
    p.add_argument(
        "--features",
        choices=FEATURES,
        default="cls",
        help="cls: net.embedding (N x D); tokens: all tokens; patches: patch tokens only",
    )
    p.add_argument("--workers", type=int, default=None, help="decode threads (default: CPU count, at most 8)")
    p.add_argument(
        "--shard-weights",
        action="store_true",
        help="split the large weights over the devices instead of copying them to each (for models too large "
        "for one device; same results)",
    )
    distributed.add_arguments(p)
    p.set_defaults(func=run)


def _check_args(args: argparse.Namespace) -> None:
    """Every check that needs no JAX and no file reads beyond stat: fail before anything is written."""
    if not args.inputs:
        raise UserError("no inputs given: pass image files, folders or .txt files listing image paths")
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch-size must be a positive integer, got {args.batch_size}")
    if args.workers is not None and args.workers < 0:
        raise UserError(f"--workers must be 0 or more, got {args.workers}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    distributed.check(args)


# run identity -----------------------------------------------------------------------------------------
def _checkpoint_identity(ckpt: str) -> dict[str, Any]:
    """What names the weights: the argument, and for a local file or folder its size and modification time."""
    path = Path(ckpt).expanduser()
    ident: dict[str, Any] = {"argument": ckpt}
    if path.exists():
        ident["path"] = str(path.resolve())
        probe = path / "metadata.json" if path.is_dir() else path
        if probe.exists():
            st = probe.stat()
            ident.update(size=st.st_size, mtime_ns=st.st_mtime_ns)
    return ident


def _run_identity(
    args: argparse.Namespace,
    paths: Sequence[str],
    size: tuple[int, int],
    batch: int,
    num_processes: int,
    num_devices: int,
) -> dict[str, Any]:
    digest = hashlib.sha256("\n".join(paths).encode("utf-8", "surrogateescape")).hexdigest()
    return {
        "format": FORMAT,
        "checkpoint": _checkpoint_identity(args.checkpoint),
        "config": args.config,
        "size": list(size),
        "dtype": args.dtype,
        "features": args.features,
        "batch_size": batch,
        "num_processes": num_processes,
        "num_devices": num_devices,
        "num_inputs": len(paths),
        "inputs_sha256": digest,
    }


def _differences(a: dict[str, Any], b: dict[str, Any]) -> str:
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return ", ".join(keys) or "nothing"


# atomic files ---------------------------------------------------------------------------------------------
def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _atomic_write_json(path: Path, obj: Any) -> None:
    _atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


# plan ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """Process p owns inputs [p * share, (p + 1) * share); its step k covers rows [k * rows, (k + 1) * rows)."""

    num_inputs: int
    num_processes: int
    process: int
    rows: int  # rows per process per step (the global batch / processes)

    @property
    def share(self) -> int:
        return math.ceil(self.num_inputs / self.num_processes)

    @property
    def steps(self) -> int:
        return math.ceil(self.share / self.rows) if self.share else 0

    def step_rows(self, k: int) -> int:
        """Rows every process feeds at step k (the same on all processes, so they pick the same bucket)."""
        return min(self.rows, self.share - k * self.rows)

    def positions(self, k: int, process: int | None = None) -> range:
        """Global input positions of a process's part k (shorter than step_rows, or empty, at the end)."""
        p = self.process if process is None else process
        lo = p * self.share + k * self.rows
        hi = min(lo + self.step_rows(k), (p + 1) * self.share, self.num_inputs)
        return range(min(lo, self.num_inputs), max(min(lo, self.num_inputs), hi))


def _part_path(parts: Path, process: int, k: int) -> Path:
    return parts / f"p{process:05d}-{k:07d}.npz"


def _write_part(path: Path, index: Any, embeddings: Any, failed: list[tuple[int, str]]) -> None:
    import numpy as np

    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.savez(
            f,
            index=np.asarray(index, np.int64),
            embeddings=np.asarray(embeddings, np.float32),
            failed_index=np.asarray([i for i, _ in failed], np.int64),
            failed_reason=np.asarray([r for _, r in failed], dtype=str),
        )
    os.replace(tmp, path)


# decoding ---------------------------------------------------------------------------------------------
def _parts_from_batches(batches: Iterator[Any], bounds: list[tuple[int, int]]) -> Iterator[tuple[list, list]]:
    """Regroup data.iter_batches output by part: (list of (pos, image), list of (pos, reason)) per bound.

    ``bounds`` are consecutive [lo, hi) ranges of positions in the list given to iter_batches.
    """
    seg = 0
    images: list[tuple[int, Any]] = []
    failed: list[tuple[int, str]] = []
    for batch in batches:
        items: list[tuple[int, Any, str | None]] = [
            (int(i), img, None) for i, img in zip(batch.indices, batch.images)
        ]
        items += [(f.index, None, f.reason) for f in batch.failed]
        items.sort(key=lambda t: t[0])
        for pos, img, reason in items:
            while pos >= bounds[seg][1]:
                yield images, failed
                images, failed, seg = [], [], seg + 1
            if reason is None:
                images.append((pos, img))
            else:
                failed.append((pos, reason))
        while seg < len(bounds) and batch.end >= bounds[seg][1]:
            yield images, failed
            images, failed, seg = [], [], seg + 1
    while seg < len(bounds):
        yield images, failed
        images, failed, seg = [], [], seg + 1


# the command --------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    _check_args(args)
    start_time = time.perf_counter()

    from vitreg_jax.embed import configure_xla_flags

    configure_xla_flags(args.dtype)  # before JAX starts: flags are read once per process

    import jax

    distributed.initialize(args)

    import numpy as np
    from jax.experimental import multihost_utils

    from vitreg_jax.data import iter_batches, list_inputs
    from vitreg_jax.embed import Embedder, default_mesh
    from vitreg_jax.convert.load import load_model_with_cfg
    from vitreg_jax.preprocess import classification_transform, get_size_from_signature

    nproc, pid = jax.process_count(), jax.process_index()
    paths = list_inputs(args.inputs)  # UserError for missing inputs and for zero images found
    net, cfg = load_model_with_cfg(args.config, args.checkpoint)
    size = args.size or get_size_from_signature(cfg["signature"])
    p = net.cfg.patch_size
    if size[0] % p or size[1] % p:
        raise UserError(f"--size {size[0]}x{size[1]} is not a multiple of the model's patch size {p}")
    transform = classification_transform(size, cfg["rgb_stats"])

    mesh = default_mesh()
    ndev = int(mesh.devices.size)
    if args.batch_size is None:
        batch = DEFAULT_BATCH_PER_DEVICE.get(jax.default_backend(), 32) * ndev
    else:
        batch = math.ceil(args.batch_size / ndev) * ndev  # every device gets the same number of rows
    ident = _run_identity(args, paths, size, batch, nproc, ndev)
    if nproc > 1:  # every process must have listed the same inputs with the same arguments
        mine = np.frombuffer(
            hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).digest()[:8], np.int32
        )
        every = np.asarray(multihost_utils.process_allgather(mine))
        if not (every == mine).all():
            raise UserError(
                "the processes disagree on the inputs or arguments: give every process the same "
                "command line and the same file system view"
            )

    out = Path(args.out)
    parts = out / PARTS_DIR
    meta = _read_json(out / "meta.json")
    if meta is not None and meta.get("status") == "complete":
        if meta.get("run") == ident:
            if pid == 0:
                shutil.rmtree(parts, ignore_errors=True)
                print(
                    f"{out}: already complete ({meta['counts']['embedded']} embeddings, "
                    f"{meta['counts']['failed']} failed); nothing to do"
                )
            return 0
        raise UserError(
            f"{out} already holds embeddings of another run (differs in "
            f"{_differences(meta.get('run') or {}, ident)}); choose another --out or remove it"
        )
    previous = _read_json(parts / RUN_FILE)
    if previous is not None and previous != ident:
        raise UserError(
            f"{out} holds an unfinished run with other arguments (differs in "
            f"{_differences(previous, ident)}); rerun that command to finish it, or choose another "
            "--out"
        )
    if previous is None and (out / "embeddings.npy").exists():
        raise UserError(f"{out} holds an embeddings.npy that this run did not write; choose another --out")

    embedder = Embedder(
        net, dtype=args.dtype, features=args.features, batch_size=batch, mesh=mesh, shard_weights=args.shard_weights
    )
    plan = Plan(num_inputs=len(paths), num_processes=nproc, process=pid, rows=embedder.batch_size // nproc)
    parts.mkdir(parents=True, exist_ok=True)  # the first thing written, after every check passed
    _atomic_write_json(parts / RUN_FILE, ident)
    for stale in parts.glob(f".p{pid:05d}-*.tmp"):  # a part being written when the last run stopped
        stale.unlink(missing_ok=True)
    if pid == 0:
        for stale in out.glob(".*.tmp-*"):  # final files of an interrupted merge
            stale.unlink(missing_ok=True)

    own_done = np.array([_part_path(parts, pid, k).exists() for k in range(plan.steps)], bool)
    if nproc > 1:  # a step is skipped only when every process has finished its part
        all_done = np.asarray(multihost_utils.process_allgather(own_done.astype(np.int32))).reshape(nproc, -1)
        step_done = all_done.astype(bool).all(axis=0)
    else:
        step_done = own_done
    todo = [k for k in range(plan.steps) if not step_done[k]]
    decode = [k for k in todo if not own_done[k]]  # parts this process still has to compute

    # decode this process's missing parts as one ordered stream, regrouped by part
    flat: list[int] = []
    bounds: list[tuple[int, int]] = []
    for k in decode:
        pos = plan.positions(k)
        bounds.append((len(flat), len(flat) + len(pos)))
        flat.extend(pos)
    stream = iter_batches([paths[i] for i in flat], transform, max(1, plan.rows), args.workers)
    decoded = _parts_from_batches(stream, bounds)

    from tqdm import tqdm

    mine_total = sum(len(plan.positions(k)) for k in range(plan.steps))
    done_images = sum(len(plan.positions(k)) for k in range(plan.steps) if own_done[k])
    bar = tqdm(
        total=mine_total,
        initial=done_images,
        unit="img",
        desc="embed",
        disable=pid != 0,
        dynamic_ncols=True,
        smoothing=0.1,
    )
    written = computed_images = 0
    out_shape = embedder.output_shape(*size)
    # compile the buckets this run needs before the clock starts (a part whose inputs partly failed may
    # still need a smaller bucket later, compiled on first use)
    per_step = [plan.step_rows(k) if nproc > 1 else len(plan.positions(k)) for k in todo]
    embedder.warmup(*size, buckets=sorted({embedder.bucket_for(n) for n in per_step if n}))
    compute_start = time.perf_counter()

    def finish(item: tuple[int, Any, list[int], list[tuple[int, str]], bool]) -> None:
        nonlocal written, computed_images
        k, pending, valid, failed, write = item
        rows = pending.result()
        if write:
            _write_part(
                _part_path(parts, pid, k), valid, rows[: len(valid)], [(flat[i], r) for i, r in failed]
            )
            written += 1
            computed_images += len(valid) + len(failed)
            bar.update(len(valid) + len(failed))

    try:
        in_flight = None
        for k in todo:
            n_call = plan.step_rows(k) if nproc > 1 else len(plan.positions(k))
            if own_done[k]:  # another process still needs this step: take part with zeros, write nothing
                x = np.zeros((n_call, *size, net.cfg.in_channels), np.float32)
                item = (k, embedder.embed_async(x), [], [], False)
            else:
                images, failed = next(decoded)
                valid = [flat[i] for i, _ in images]
                if nproc == 1:
                    n_call = len(images)
                x = np.zeros((n_call, *size, net.cfg.in_channels), np.float32)
                for row, (_, img) in enumerate(images):
                    x[row] = img
                item = (k, embedder.embed_async(x), valid, failed, True)
            if in_flight is not None:
                finish(in_flight)
            in_flight = item
        if in_flight is not None:
            finish(in_flight)
    finally:
        bar.close()
        decoded.close()
        stream.close()
    compute_seconds = time.perf_counter() - compute_start

    if nproc > 1:  # every process's parts are written before process 0 merges; sum the per-process counts
        computed_images = int(np.asarray(multihost_utils.process_allgather(np.int64(computed_images))).sum())
        written = int(np.asarray(multihost_utils.process_allgather(np.int64(written))).sum())
    if pid == 0:
        counts = _merge(out, parts, plan, paths, out_shape)
        meta = {
            "status": "complete",
            "format": FORMAT,
            "run": ident,
            "checkpoint": args.checkpoint,
            "config": args.config,
            "model": cfg.get("registered_name") or cfg.get("name"),
            "size": list(size),
            "dtype": args.dtype,
            "features": args.features,
            "batch_size": batch,
            "embedding_shape": list(out_shape),
            "rgb_stats": cfg["rgb_stats"],
            "counts": {
                "inputs": len(paths),
                **counts,
                "computed_this_run": computed_images,
                "parts_written_this_run": written,
            },
            "timing": {
                "seconds_total_this_run": round(time.perf_counter() - start_time, 3),
                "seconds_embedding_this_run": round(compute_seconds, 3),
                "images_per_second_this_run": round(computed_images / compute_seconds, 3)
                if compute_seconds > 0
                else None,
                "compile_seconds": round(sum(embedder.compile_seconds.values()), 3),
            },
            "devices": {
                "platform": jax.default_backend(),
                "count": ndev,
                "processes": nproc,
                "kind": jax.devices()[0].device_kind,
                "weights": "sharded" if args.shard_weights else "replicated",
            },
            "xla_flags": os.environ.get("XLA_FLAGS"),
            "versions": _versions(),
        }
        _atomic_write_json(out / "meta.json", meta)  # last: its presence marks the run complete
        shutil.rmtree(parts, ignore_errors=True)
        rate = meta["timing"]["images_per_second_this_run"]
        print(
            f"embedded {counts['embedded']} images ({counts['failed']} failed) into {out}"
            + (f"; {computed_images} computed this run at {rate:.2f} img/s" if rate else "")
        )
    if nproc > 1:
        multihost_utils.sync_global_devices("vitreg-jax embed: merged")
    return 0


def _versions() -> dict[str, str]:
    import jax

    from vitreg_jax import __version__

    return {"vitreg_jax": __version__, "jax": jax.__version__}


def _merge(
    out: Path, parts: Path, plan: Plan, paths: Sequence[str], out_shape: tuple[int, ...]
) -> dict[str, int]:
    """All parts, in input order, into the final files (each written under a temporary name, then renamed)."""
    import numpy as np

    files = [_part_path(parts, q, k) for q in range(plan.num_processes) for k in range(plan.steps)]
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise UserError(
            f"{parts}: parts {', '.join(missing[:5])} are missing; every process must write to the "
            "same --out folder (a file system all of them see)"
        )
    total = 0
    for f in files:
        with np.load(f) as z:
            total += len(z["index"])
    tmp_npy = out / f".embeddings.npy.tmp-{os.getpid()}"
    tmp_paths = out / f".paths.txt.tmp-{os.getpid()}"
    tmp_failed = out / f".failed.txt.tmp-{os.getpid()}"
    emb = np.lib.format.open_memmap(tmp_npy, mode="w+", dtype=np.float32, shape=(total, *out_shape))
    row = n_failed = 0
    last = -1
    with (
        open(tmp_paths, "w", encoding="utf-8", errors="surrogateescape") as fp,
        open(tmp_failed, "w", encoding="utf-8", errors="surrogateescape") as ff,
    ):
        for f in files:
            with np.load(f) as z:
                index, rows = z["index"], z["embeddings"]
                for i in index:
                    assert i > last, f"{f.name}: input order broken at {i}"
                    last = int(i)
                    fp.write(paths[i] + "\n")
                emb[row : row + len(index)] = rows
                row += len(index)
                for i, reason in zip(z["failed_index"], z["failed_reason"]):
                    ff.write(f"{paths[i]}\t{reason}\n")
                    n_failed += 1
    emb.flush()
    del emb
    os.replace(tmp_npy, out / "embeddings.npy")
    os.replace(tmp_paths, out / "paths.txt")
    os.replace(tmp_failed, out / "failed.txt")
    return {"embedded": total, "failed": n_failed}
