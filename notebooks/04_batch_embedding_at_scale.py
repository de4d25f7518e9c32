# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 04 · Batch embedding at scale: one engine from a laptop to a TPU slice
#
# `vitreg_jax.Embedder` (and `embed_dataset` / `vitreg-jax embed`, built on it) splits the model once,
# replicates the weights over a `jax.sharding.Mesh` of every device, pads each batch up to one of a few bucket
# sizes and shards it along the mesh's `data` axis, so a stream of ragged batches compiles once per bucket.
# The same code runs on one CPU, eight GPUs or a multi-host TPU slice.
#
# Here the CPU pretends to be 4 devices (`--xla_force_host_platform_device_count=4`, which must be set before
# JAX starts: the first cell does it). They share the same cores, so this shows *correctness and mechanics*
# (same numbers on 1, 2 and 4 devices; compile counts; who computed which rows), not speed-ups; the throughput
# section at the end says where real scaling figures come from.
#
# `QUICK` (set by the test suite through `VITREG_JAX_NOTEBOOK_QUICK=1`) swaps in a tiny 2-layer stand-in.

# %%
import os

# Before JAX starts: 4 host-platform devices. Keep any flags already set (the user's choice wins otherwise).
flags = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=4".strip()

# everything below imports JAX, so it comes after XLA_FLAGS on purpose
import tempfile
import time
from pathlib import Path

import jax
import matplotlib.pyplot as plt
import numpy as np
import pyarrow.parquet as pq

import vitreg_jax
from vitreg_jax.convert import demo_weights, sample_images_dir
from vitreg_jax.data import iter_batches, list_inputs
from vitreg_jax.embedding import embed_dataset

QUICK = os.environ.get("VITREG_JAX_NOTEBOOK_QUICK") == "1"
WORK = Path(tempfile.mkdtemp(prefix="vitreg-jax-04-"))
print(jax.device_count(), "devices:", jax.devices())
assert jax.device_count() == 4, "XLA_FLAGS was read before this cell ran: restart the kernel and run it first"

# %% [markdown]
# ## The model and a stream of images
#
# The sample photos, repeated to make a few ragged batches. `iter_batches` decodes and preprocesses in worker
# threads, in input order, with bounded memory; unreadable files become failure records, not crashes.

# %%
weights = demo_weights(WORK, quick=QUICK)
print(weights.describe())
net, cfg = vitreg_jax.load_model_with_cfg(weights.config, weights.weights)
size = vitreg_jax.get_size_from_signature(cfg["signature"])
transform = vitreg_jax.classification_transform(size, cfg["rgb_stats"])
paths = list_inputs([sample_images_dir()]) * (2 if QUICK else 3)
batches = [b.images for b in iter_batches(paths, transform, batch_size=12)]
print(f"{len(paths)} images in batches of {[len(b) for b in batches]}")

# %% [markdown]
# ## The same numbers on 1, 2 and 4 devices
#
# Each `Embedder` gets a mesh over the first *k* devices. The batch size (here 16) is global: each device
# embeds 16/k rows of every batch. Ragged batches (12 images, then a shorter tail) are padded up to the
# buckets (`bucket_sizes`), so each bucket that is needed compiles once, whatever the number of batches.

# %%
results, timings = {}, {}
for k in (1, 2, 4):
    embedder = vitreg_jax.Embedder(net, batch_size=16, mesh=vitreg_jax.default_mesh(jax.devices()[:k]))
    start = time.perf_counter()
    out = np.concatenate(list(embedder.stream(batches)))  # one batch in flight while the next is queued
    timings[k] = time.perf_counter() - start
    results[k] = out
    print(
        f"{k} device(s): buckets {embedder.buckets}, {embedder.compile_count} compilations, "
        f"{len(out)} embeddings in {timings[k]:.1f} s (compile included), "
        f"max |diff| to 1 device: {np.abs(out - results[1]).max():.1e}"
    )

# %% [markdown]
# Who computed what: the input batch is a global `jax.Array` split along its first axis, one block of rows per
# device. Below, a 16-image batch on the 4-device mesh; each row of the output is coloured by the device that
# holds it.

# %%
embedder4 = vitreg_jax.Embedder(net, batch_size=16, mesh=vitreg_jax.default_mesh())
x = np.concatenate(batches)[:16]
device_x = jax.device_put(x, embedder4.batch_sharding)
owner = np.zeros(len(x), int)
for shard in device_x.addressable_shards:
    owner[shard.index[0]] = shard.device.id
print("input sharding:", device_x.sharding)
for shard in device_x.addressable_shards:
    rows = shard.index[0]
    print(f"  {shard.device}: rows {rows.start}..{rows.stop - 1}, local block {shard.data.shape}")

emb = embedder4(x)
cols = min(96, emb.shape[1])
fig, ax = plt.subplots(figsize=(8, 3))
ax.imshow(emb[:, :cols], aspect="auto", cmap="coolwarm", vmin=-3, vmax=3)
for d in range(4):
    rows = np.flatnonzero(owner == d)
    ax.axhspan(rows.min() - 0.5, rows.max() + 0.5, xmin=0.0, xmax=0.02, color=f"C{d}")
    ax.text(cols + 0.5, rows.mean(), f" device {d}", va="center", fontsize=8, color=f"C{d}")
ax.set_xlabel(f"embedding dimension (first {cols})")
ax.set_ylabel("image")
ax.set_title("16 embeddings from one sharded batch, rows grouped by device")
fig.tight_layout()
plt.show()

fig, ax = plt.subplots(figsize=(5, 3))
ax.bar([str(k) for k in timings], [len(paths) / timings[k] for k in timings], color="tab:green")
ax.set_xlabel("host-platform CPU devices (sharing the same cores)")
ax.set_ylabel("images/s, compile included")
ax.set_title("same work, same cores: no speed-up expected here")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## A whole dataset into a folder: `embed_dataset`
#
# `embed_dataset` (what `vitreg-jax embed` calls) streams inputs of any size through the same engine: files,
# folders, path lists, webdataset `.tar` shards, brace patterns and bucket URLs are cut into shards, each
# shard becomes one part file written atomically, and a rerun of the same call resumes after the last finished
# part (also with another number of processes). `format="npy"` merges the parts into `embeddings.npy` +
# `paths.txt` at the end; `format="parquet"` keeps them as `part-NNNNN.parquet` files with a `manifest.json`,
# readable by pyarrow, polars or DuckDB without vitreg-jax.

# %%
listing = WORK / "inputs.txt"
listing.write_text("\n".join(paths) + "\n")
npy = embed_dataset(net, [listing], WORK / "emb-npy", cfg=cfg, batch_size=16)
npy_emb = np.load(WORK / "emb-npy" / "embeddings.npy")
npy_diff = float(np.abs(npy_emb - results[1]).max())
names = sorted(p.name for p in (WORK / "emb-npy").iterdir())
print(names, npy_emb.shape, "| max |diff| to the Embedder above:", npy_diff)

parquet = {"cfg": cfg, "batch_size": 16, "format": "parquet", "files_per_part": 8}
pq_run = embed_dataset(net, [listing], WORK / "emb-parquet", **parquet)
print(sorted(p.name for p in (WORK / "emb-parquet").iterdir()))
table = pq.read_table(sorted((WORK / "emb-parquet").glob("part-*.parquet")))
print(table.schema)
parquet_emb = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
print("max |diff| parquet vs npy:", float(np.abs(parquet_emb - npy_emb).max()))
again = embed_dataset(net, [listing], WORK / "emb-parquet", **parquet)
print("second call: already complete =", again.already_complete, "| images read:", again.computed)

# %% [markdown]
# ## On real hardware
#
# **One machine, several GPUs** (or one TPU VM): nothing to change. JAX sees every local accelerator, and
# `embed` shards each batch over all of them. Use a large global batch and bf16 matmuls:
#
# ```bash
# vitreg-jax embed --checkpoint ckpt/mim_300 /data/images --out /data/emb --batch-size 2048 --dtype bfloat16
# ```
#
# **Several hosts** (a multi-host TPU slice, or GPU nodes): run the *same* command in one process per host.
# Process *p* of *n* takes the shards whose index is *p* mod *n* (no process needs the list of images inside
# the tar shards of the others), every step is one computation over all devices of all hosts, each process
# writes the parts of its own shards, and process 0 writes the manifest (or merges the npy files) at the end.
# `--out` must be on a file system every host sees (or a bucket mounted on every host). With tar shards in a
# bucket and `--format parquet`, nothing is ever gathered in one place:
#
# ```bash
# vitreg-jax embed --distributed --checkpoint ckpt "gs://bucket/shards/part-{00000..09999}.tar" \
#   --format parquet --out /shared/emb --dtype auto
# ```
#
# ```bash
# # TPU pod slice: jax.distributed finds the other hosts by itself
# gcloud compute tpus tpu-vm ssh my-slice --zone us-central2-b --worker=all --command \
#   "vitreg-jax embed --distributed --checkpoint /mnt/ckpt/mim_300 /mnt/data/list.txt --out /mnt/emb \
#    --dtype bfloat16"
#
# # SLURM (one task per node): also detected by --distributed
# srun --nodes 4 --ntasks-per-node 1 \
#   vitreg-jax embed --distributed --checkpoint ckpt /shared/list.txt --out /shared/emb
#
# # anything else: say who the coordinator is
# vitreg-jax embed --coordinator host0:1234 --num-processes 4 --process-id $RANK \
#   --checkpoint ckpt ... --out /shared/emb
# ```
#
# From Python, the same engine: call `jax.distributed.initialize()` first, then `embed_dataset(net, inputs,
# out, cfg=cfg, ...)` in every process, as above; or build `Embedder(net)` (its default mesh spans every
# process's devices) and give every process the same number of images per call (pad the last call:
# `embed_dataset` does).
#
# ## How throughput scales
#
# Measured figures (images/s per chip and across devices, fp32 and bf16, against birder in the same run) live
# in [BENCHMARKS.md](../BENCHMARKS.md) with the command that produced each; the README copies them. For
# orientation: a ViT-B/16-reg4 forward pass at 224 px is about 35.9 GFLOP per image, so an H100's bf16 peak
# would allow about 27,600 images/s, and a well-fed data-parallel run scales with the number of chips because
# the weights (86 M parameters) are replicated and no communication happens between devices during a step.
#
# For a variant too large to copy to every device, `Embedder(net, shard_weights=True)` (`vitreg-jax embed
# --shard-weights`) keeps each large weight split over the devices, 1/n on each, and gathers it inside every
# call (FSDP-style): the same results for more communication per batch.
