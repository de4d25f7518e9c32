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
# # 01 · Image embeddings with vitreg-jax
#
# Load a ViTReg4-B16 encoder, preprocess images exactly as birder does, embed them (the obvious path and the
# compiled fast path), compare images by cosine similarity, look at nearest neighbours, and draw a PCA of the
# patch features over the images.
#
# **Weights.** The published `vit_reg4_b16_mim` weights are used when they are already on this machine
# (`vitreg-jax convert vit_reg4_b16_mim_300 --out ...` or `vitreg-jax demo --weights vit_reg4_b16_mim_300`
# downloads them once). Otherwise this notebook uses a *stand-in*: birder's own `vit_reg4_b16` with birder's
# random initialisation from a fixed seed, saved with birder's save functions. A random network still runs
# every step below, but its neighbours and PCA maps only reflect colour and texture, **not** what the trained
# model sees. The next cell prints which weights were used.
#
# `QUICK` (set by the test suite through `VITREG_JAX_NOTEBOOK_QUICK=1`) swaps in a tiny 2-layer stand-in.

# %%
import os
import tempfile
from pathlib import Path

import jax
import matplotlib.pyplot as plt
import numpy as np
from PIL import Image

import vitreg_jax
from vitreg_jax.convert import demo_weights, sample_images_dir
from vitreg_jax.data import list_inputs, load_image

QUICK = os.environ.get("VITREG_JAX_NOTEBOOK_QUICK") == "1"
WORK = Path(tempfile.mkdtemp(prefix="vitreg-jax-01-"))
IMAGES = sample_images_dir()

weights = demo_weights(WORK, quick=QUICK)
NOTE = " (stand-in weights)" if weights.is_standin else ""  # said on every figure of a stand-in
print(weights.describe())
print("JAX", jax.__version__, "on", jax.devices())

# %% [markdown]
# ## Load and preprocess
#
# `load_model_with_cfg` takes birder's json and a `.pt` / `.safetensors` file (or a vitreg-jax checkpoint
# directory, or a published name) and returns the model and birder's config dict. The input size and the
# normalisation statistics come from that config, never from code.

# %%
net, cfg = vitreg_jax.load_model_with_cfg(weights.config, weights.weights)
size = vitreg_jax.get_size_from_signature(cfg["signature"])
transform = vitreg_jax.classification_transform(size, cfg["rgb_stats"])
print("input size", size, "| rgb_stats", cfg["rgb_stats"])
print(f"{net.cfg.num_layers} blocks, width {net.cfg.hidden_dim}, {net.cfg.num_reg_tokens} registers")

paths = list_inputs([IMAGES])
names = [Path(p).stem for p in paths]
x = np.stack([transform(load_image(p)) for p in paths])  # (N, H, W, 3) float32, NHWC
print(x.shape, x.dtype)

# %% [markdown]
# The model card's one-image path is `net.embedding(x)`; for batches the compiled `Embedder` is the fast path
# (split once, jit-compiled, padded to a bucket, sharded over every device). Both give the same numbers.

# %%
one = np.asarray(net.embedding(x[:1]))  # (1, D)
embedder = vitreg_jax.Embedder(net, batch_size=len(x))
emb = embedder(x)  # (N, D) float32
diff = float(np.abs(one - emb[:1]).max())
print("embedding", emb.shape, "| max |net.embedding - Embedder| on image 0:", diff)

# %% [markdown]
# ## Cosine similarity

# %%
unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
sim = unit @ unit.T  # (N, N)

fig, ax = plt.subplots(figsize=(7, 6))
im = ax.imshow(sim, cmap="viridis", vmin=min(0.0, float(sim.min())), vmax=1.0)
ax.set_xticks(range(len(names)), names, rotation=90)
ax.set_yticks(range(len(names)), names)
ax.set_title("cosine similarity of the embeddings" + NOTE)
fig.colorbar(im, ax=ax, fraction=0.046)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Nearest neighbours, with the images


# %%
def shown(path: str) -> np.ndarray:
    """The image as the model sees it (birder squashes to the input size), for display."""
    return np.asarray(load_image(path).convert("RGB").resize(size[::-1], Image.BICUBIC))


k = 3
queries = list(range(0, len(paths), max(1, len(paths) // 4)))[:4]
masked = sim.copy()
np.fill_diagonal(masked, -np.inf)
fig, axes = plt.subplots(len(queries), k + 1, figsize=(2.2 * (k + 1), 2.3 * len(queries)))
for row, q in zip(axes, queries):
    order = np.argsort(-masked[q])[:k]
    row[0].imshow(shown(paths[q]))
    row[0].set_title(f"query: {names[q]}", fontsize=8)
    for ax, j in zip(row[1:], order):
        ax.imshow(shown(paths[j]))
        ax.set_title(f"{names[j]}  cos {sim[q, j]:.3f}", fontsize=8)
    for ax in row:
        ax.axis("off")
fig.suptitle("nearest neighbours by cosine similarity" + NOTE)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## PCA of the patch features, drawn over the image
#
# `features="patches"` returns the patch tokens after the final norm, without the register and class tokens:
# (N, h·w, D) in row-major patch order. One PCA over the patches of all the images shown, first three
# components as RGB: patches that the model represents alike get the same colour.

# %%
pick = queries
patch_embedder = vitreg_jax.Embedder(net, features="patches", batch_size=len(pick))
patches = patch_embedder(x[pick])  # (n, h*w, D)
n, t, d = patches.shape
gh, gw = size[0] // net.cfg.patch_size, size[1] // net.cfg.patch_size
flat = patches.reshape(n * t, d)
flat = flat - flat.mean(axis=0)
_, s, vt = np.linalg.svd(flat, full_matrices=False)
proj = flat @ vt[:3].T  # (n*t, 3)
lo, hi = np.percentile(proj, 1, axis=0), np.percentile(proj, 99, axis=0)
rgb = np.clip((proj - lo) / (hi - lo), 0, 1).reshape(n, gh, gw, 3)
print("variance explained by the first 3 components:", np.round(s[:3] ** 2 / (s**2).sum(), 3))

fig, axes = plt.subplots(2, n, figsize=(2.6 * n, 5.4))
for i, q in enumerate(pick):
    axes[0, i].imshow(shown(paths[q]))
    axes[0, i].set_title(names[q], fontsize=9)
    axes[1, i].imshow(shown(paths[q]))
    axes[1, i].imshow(rgb[i], alpha=0.65, extent=(0, size[1], size[0], 0), interpolation="nearest")
    axes[1, i].set_title("patch PCA (RGB = PC1-3)", fontsize=9)
for ax in axes.flat:
    ax.axis("off")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Where to go next
#
# - `vitreg-jax embed --checkpoint CKPT FOLDER --out DIR` embeds a folder (resumable, sharded over all
#   devices); notebook 04 shows the same engine on several devices.
# - Notebook 02 moves weights between birder and JAX and checks every block against birder.
