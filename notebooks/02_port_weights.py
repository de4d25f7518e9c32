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
# # 02 · Porting weights: birder file → Orbax → birder, checked block by block
#
# 1. birder writes a checkpoint (`.pt` + `.json`) with its own save functions;
# 2. `vitreg-jax convert` turns it into a vitreg-jax checkpoint (Orbax weights + `metadata.json`);
# 3. `vitreg-jax export` writes it back as a birder file, which birder loads strictly, bit for bit;
# 4. the output of every transformer block is compared with birder's (torch forward hooks);
# 5. the two bicubic position-embedding modes (birder's dynamic size and `adjust_size`) at other resolutions.
#
# This notebook needs birder itself (`pip install 'vitreg-jax[test]'`; `make test` installs it). The
# weights are a *stand-in*: birder's `vit_reg4_b16` with birder's random init from a fixed seed. Parity does
# not depend on the weights being trained; the same calls work on the published files
# (`vitreg-jax convert vit_reg4_b16_mim_300 --out ckpt/mim_300`).
#
# `QUICK` (set by the test suite through `VITREG_JAX_NOTEBOOK_QUICK=1`) swaps in a tiny 2-layer stand-in.

# %%
import json
import os
import tempfile
from pathlib import Path

import birder
import jax
import matplotlib.pyplot as plt
import numpy as np
import torch

import vitreg_jax
from vitreg_jax.convert import (
    TINY_MODEL_CONFIG,
    checkpoint_info,
    convert_to_checkpoint,
    export_to_birder,
    info_text,
    sample_images_dir,
    write_standin,
)
from vitreg_jax.data import list_inputs, load_image
from vitreg_jax.model import bicubic_matrix, resize_grid

jax.config.update("jax_default_matmul_precision", "highest")  # fp32 means fp32 on GPU/TPU too (no TF32)
torch.backends.cuda.matmul.allow_tf32 = False

QUICK = os.environ.get("VITREG_JAX_NOTEBOOK_QUICK") == "1"
WORK = Path(tempfile.mkdtemp(prefix="vitreg-jax-02-"))
print("birder", birder.__version__, "| torch", torch.__version__, "| jax", jax.__version__)

# %% [markdown]
# ## 1. A birder checkpoint, written by birder

# %%
src = write_standin(WORK / "birder", model_config=TINY_MODEL_CONFIG if QUICK else None)
print(src.describe())
for p in sorted((WORK / "birder").iterdir()):
    print(f"  {p.name:<34} {p.stat().st_size / 2**20:8.1f} MiB")
print(json.dumps(json.loads(src.config.read_text())["model_config"]))

# %% [markdown]
# ## 2. Convert to a vitreg-jax checkpoint
#
# `vitreg_jax.convert.convert_to_checkpoint(SRC, DIR, config=JSON)` is what
# `vitreg-jax convert SRC --config JSON --out DIR` runs: it prints what it reads and decides as it goes, and
# `info_text(checkpoint_info(DIR))` is what `vitreg-jax info DIR` prints. The `.pt` is read without torch (an
# interpreter of the few pickle records a state dict is made of, which never runs code from the file); every
# birder key maps through one invertible table, and a missing, extra or mis-shaped tensor is refused by name.

# %%
ckpt = WORK / "checkpoint"
done = convert_to_checkpoint(src.weights, ckpt, config=src.config)
print(f"wrote        {done.out}/ ({done.parameters:,} parameters in {done.tensors} tensors, {done.dtype})")
print()
print(info_text(checkpoint_info(ckpt)))
print("\nfiles:", sorted(str(p.relative_to(ckpt)) for p in ckpt.iterdir()))

# %% [markdown]
# The checkpoint's weights are a plain nested dict of arrays, readable without any model code (on any device
# topology), and `load_model_with_cfg(None, DIR)` builds the model from its metadata:

# %%
params, meta = vitreg_jax.load_checkpoint(ckpt)
qkv = params["encoder"]["block"]["0"]["attn"]["qkv"]["kernel"]
print("top-level keys:", sorted(params), "| qkv kernel of block 0:", qkv.shape)
print("provenance:", {k: meta["provenance"][k] for k in ("source_file", "source_sha256", "birder_version")})
net, cfg = vitreg_jax.load_model_with_cfg(None, ckpt)

# %% [markdown]
# ## 3. Back to birder, bit for bit
#
# `export_to_birder(DIR, FILE)` (`vitreg-jax export DIR --out FILE`) writes a birder `.pt` and its `.json`;
# `birder.load_model_with_cfg` loads them (strictly), and every tensor equals the one birder originally saved.

# %%
back = WORK / "exported" / "vit_reg4_b16_roundtrip.pt"
export_to_birder(ckpt, back)
tnet_back, _ = birder.load_model_with_cfg(str(back.with_suffix(".json")), str(back))
tnet, tcfg = birder.load_model_with_cfg(str(src.config), str(src.weights))
original, roundtrip = tnet.state_dict(), tnet_back.state_dict()
same = [k for k in original if torch.equal(original[k], roundtrip[k])]
print(f"{len(same)}/{len(original)} tensors bit-identical after birder -> Orbax -> birder")
assert len(same) == len(original) and set(original) == set(roundtrip)

# %% [markdown]
# ## 4. Parity with birder, block by block
#
# Both frameworks get the same preprocessed sample images (NHWC for us, NCHW for birder). birder's block
# outputs come from forward hooks; ours from `masked_encoding_omission(x, return_all_features=True)`, birder's
# own method for all block outputs (the last one after the final norm, as birder returns it).

# %%
size = vitreg_jax.get_size_from_signature(cfg["signature"])
transform = vitreg_jax.classification_transform(size, cfg["rgb_stats"])
paths = list_inputs([sample_images_dir()])[:4]
x = np.stack([transform(load_image(p)) for p in paths])  # (B, H, W, 3)
x_torch = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())  # (B, 3, H, W)

tnet.eval()
hooked: list[np.ndarray] = []
hooks = [
    block.register_forward_hook(lambda _m, _i, o: hooked.append(o.detach().numpy()))
    for block in tnet.encoder.block
]
with torch.no_grad():
    t_tokens = tnet.forward_features(x_torch).numpy()
    t_emb = tnet.embedding(x_torch).numpy()
for h in hooks:
    h.remove()

ours = np.asarray(net.masked_encoding_omission(x, return_all_features=True)["tokens"])  # (B, N, D, blocks)
rows = []
for i in range(net.cfg.num_layers):
    theirs = hooked[i] if i < net.cfg.num_layers - 1 else t_tokens  # the last one after the final norm
    label = f"block {i}" + (" + norm" if i == net.cfg.num_layers - 1 else "")
    rows.append((label, np.abs(ours[..., i] - theirs).max(), np.abs(theirs).max()))
rows.append(("embedding", np.abs(np.asarray(net.embedding(x)) - t_emb).max(), np.abs(t_emb).max()))

print(f"{'output':<16}{'max |diff|':>12}{'max |x|':>10}{'relative':>11}")
for label, d, m in rows:
    print(f"{label:<16}{d:>12.2e}{m:>10.2f}{d / m:>11.1e}")

fig, ax = plt.subplots(figsize=(8, 3.2))
ax.bar([r[0] for r in rows], [r[1] for r in rows], color="tab:blue")
ax.axhline(2e-5, color="tab:red", ls="--", lw=1, label="test tolerance on tokens / embedding (2e-5)")
ax.set_yscale("log")
ax.set_ylabel("max |ours - birder|")
ax.set_title(f"fp32 parity with birder {birder.__version__} on {len(x)} sample images, {size[0]}x{size[1]}")
ax.tick_params(axis="x", rotation=60)
ax.legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 5. Other resolutions: the two bicubic position-embedding modes
#
# The learned position embedding covers a 14×14 patch grid (plus the register and class tokens). birder
# resizes its patch part in two ways, and vitreg-jax reproduces both (`jax.image.resize` implements only the
# second):
#
# - **dynamic size**, every forward at another size (`set_dynamic_size(True)`; always on in vitreg-jax):
#   torch's `interpolate(bicubic, antialias=False)`, Keys' kernel with a = −0.75, taps clamped at the border;
# - **`adjust_size(new)`**, once, permanently: `interpolate(bicubic, antialias=True)`, a = −0.5, the support
#   widened when downsampling, the weights renormalised.
#
# Both are separable; here are the 1-D resampling matrices for the grid sizes used below:

# %%
g = net.cfg.grid_size[0]
cases = [(g, 8, "down to 8 (128 px)"), (g, 24, "up to 24 (384 px)")]
fig, axes = plt.subplots(2, 2, figsize=(8, 6))
for col, (n_in, n_out, what) in enumerate(cases):
    for row, aa in enumerate((False, True)):
        m = bicubic_matrix(n_in, n_out, aa)
        lim = np.abs(m).max()
        axes[row, col].imshow(m, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
        axes[row, col].set_title(
            f"{n_in} -> {n_out}: {'antialias (adjust_size)' if aa else 'dynamic size'}", fontsize=9
        )
        axes[row, col].set_xlabel("source row")
        axes[row, col].set_ylabel("target row")
fig.suptitle("torch's bicubic resampling as matrices (red > 0 > blue)")
fig.tight_layout()
plt.show()

# %% [markdown]
# Now both frameworks at other sizes: a non-square 320×192 input in dynamic-size mode, then `adjust_size(384)`
# on both models (the stored embedding itself is resized, antialiased).

# %%
rng = np.random.default_rng(0)
tnet.set_dynamic_size(True)
report = []
for hw in [(320, 192), (128, 128)]:
    xi = rng.standard_normal((2, *hw, 3)).astype(np.float32)
    with torch.no_grad():
        te = tnet.embedding(torch.from_numpy(xi.transpose(0, 3, 1, 2).copy())).numpy()
    report.append((f"dynamic size {hw[0]}x{hw[1]}", float(np.abs(np.asarray(net.embedding(xi)) - te).max())))

stored = np.asarray(net.pos_embedding[...])
tnet.adjust_size((384, 384))
net.adjust_size((384, 384))
resized = float(np.abs(tnet.pos_embedding.detach().numpy() - np.asarray(net.pos_embedding[...])).max())
report.append(("adjust_size(384): pos_embedding", resized))
xi = rng.standard_normal((2, 384, 384, 3)).astype(np.float32)
with torch.no_grad():
    te = tnet.embedding(torch.from_numpy(xi.transpose(0, 3, 1, 2).copy())).numpy()
report.append(("adjust_size(384): embedding", float(np.abs(np.asarray(net.embedding(xi)) - te).max())))
for what, d in report:
    print(f"{what:<34} max |ours - birder| = {d:.2e}")

# %% [markdown]
# What the two modes do to the stored position embedding (first principal component of its patch rows, shown
# on the grid), downsampled to 8×8 and upsampled to 24×24:

# %%
s = net.cfg.num_special_tokens
grid = stored[0, s:].reshape(g, g, -1)  # (14, 14, D)
centred = grid.reshape(g * g, -1) - grid.reshape(g * g, -1).mean(0)
pc1 = np.linalg.svd(centred, full_matrices=False)[2][0]  # (D,)
panels = [("stored 14x14", grid @ pc1)]
for n_out in (8, 24):
    for aa in (False, True):
        r = np.asarray(resize_grid(jax.numpy.asarray(grid), (n_out, n_out), antialias=aa))
        panels.append((f"{n_out}x{n_out} {'antialias' if aa else 'dynamic'}", r @ pc1))
fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 2.8))
lim = max(np.abs(p).max() for _, p in panels)
for ax, (title, p) in zip(axes, panels):
    ax.imshow(p, cmap="RdBu_r", vmin=-lim, vmax=lim)
    ax.set_title(title, fontsize=9)
    ax.axis("off")
fig.suptitle("position embedding, PC1 of the patch rows" + (" (stand-in: random init)" * src.is_standin))
fig.tight_layout()
plt.show()
