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
# # 03 · MAE pre-training in JAX
#
# A few hundred steps of birder's `mae_vit` recipe (75 % of the patches masked, a transformer decoder, pixel
# MSE on the masked patches, AdamW (0.9, 0.95) with weight decay 0.05, warm-up then cosine) on the 13 sample
# photos, with a tiny encoder and decoder so that it runs on a laptop CPU in about a minute. The same code
# trains the full `vit_reg4_b16` (`vitreg-jax pretrain --data DIR --out RUN`) on GPUs and TPUs: the train step
# is one jitted function with donated state, data-parallel over every device.
#
# Thirteen images are far too few to learn anything general: the model learns to reconstruct *these* images.
# The point is the machinery: the loss curve, and original / masked / reconstructed side by side.
#
# `QUICK` (set by the test suite through `VITREG_JAX_NOTEBOOK_QUICK=1`) trains fewer steps.

# %%
import json
import os
import tempfile
from pathlib import Path

import jax
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx

from vitreg_jax import TrainConfig, ViT, classification_transform, preset
from vitreg_jax.convert import sample_images_dir
from vitreg_jax.data import TrainTransform, list_inputs, load_image, named_rgb_stats
from vitreg_jax.model import num_params
from vitreg_jax.pretraining import PretrainSettings, open_run, random_masking, train, unpatchify

QUICK = os.environ.get("VITREG_JAX_NOTEBOOK_QUICK") == "1"
STEPS = 60 if QUICK else 300
SIZE = (64, 64)
print("JAX", jax.__version__, "on", jax.devices(), "| steps:", STEPS)

# %% [markdown]
# ## A tiny ViTReg and its MAE
#
# The encoder is birder's `vit_reg4_b16` layout (4 registers + class token) shrunk: patch 8 at 64×64 px
# (64 patches), 4 blocks of width 128. The decoder is birder's `mae_vit` decoder at width 128 and depth 2.
#
# `vitreg_jax.pretraining.train` (the library behind `vitreg-jax pretrain`) runs a run folder opened with the
# run's `PretrainSettings`: everything that shapes the run, saved with it and checked when it is resumed. The
# training hyper-parameters are a `TrainConfig`, whose defaults are birder's recipe. The encoder is built here
# and handed over; the settings `network="vit_reg4_b16", model_config={...}` would have the library build the
# same one.

# %%
tiny = {
    "patch_size": 8,
    "num_layers": 4,
    "hidden_dim": 128,
    "num_heads": 4,
    "mlp_dim": 512,
    "drop_path_rate": 0.0,
}
encoder_cfg = preset("vit_reg4_b16", image_size=SIZE, model_config=tiny)
encoder = ViT(encoder_cfg, rngs=nnx.Rngs(0))
settings = PretrainSettings(
    data=(str(sample_images_dir()),),
    size=SIZE,
    rgb_stats="vit_reg4_b16_mim",
    aug_level=0,
    mae_config={"decoder_embed_dim": 128, "decoder_depth": 2, "decoder_num_heads": 4},
    train=TrainConfig(steps=STEPS, batch_size=8, lr=1e-3, warmup_steps=STEPS // 10, seed=0, log_every=1),
)
print(
    f"encoder: {encoder_cfg.num_layers} blocks x {encoder_cfg.hidden_dim}, {encoder_cfg.grid_size} patch "
    f"grid, {num_params(encoder):,} parameters; decoder: {settings.mae_config_resolved()}"
)

# %% [markdown]
# ## Data: the sample photos, and birder's augmentation
#
# birder's level-1 training augmentation (the `vitreg-jax pretrain` default) is a random resized crop
# (scale 0.3-1), two random ops from {identity, small affine, brightness, contrast} and a horizontal flip,
# deterministic given (seed, epoch, position), so a resumed run reads exactly the same batches. Below: eight
# draws of it on one photo. On only 13 photos and a few hundred steps it mostly slows the model down, so the
# run itself uses level 0 (resize only): `aug_level=1` in the settings is all it takes to switch.

# %%
rgb_stats = named_rgb_stats(settings.rgb_stats)  # those the published vit_reg4_b16_mim was trained with
paths = list_inputs(list(settings.data))
level0 = TrainTransform(SIZE, rgb_stats, level=0)
mean, std = np.asarray(rgb_stats["mean"]), np.asarray(rgb_stats["std"])


def to_pixels(x: np.ndarray) -> np.ndarray:
    """Normalised (..., H, W, 3) back to displayable [0, 1] RGB."""
    return np.clip(x * std + mean, 0.0, 1.0)


level1 = TrainTransform(SIZE, rgb_stats, level=1)
photo = load_image(paths[0])
draws = [level1(photo, np.random.default_rng([0, 0, i])) for i in range(8)]  # (H, W, 3) each
fig, axes = plt.subplots(1, len(draws) + 1, figsize=(1.6 * (len(draws) + 1), 1.9))
axes[0].imshow(to_pixels(level0(photo, np.random.default_rng(0))))  # what the run trains on: level 0
axes[0].set_title("level 0", fontsize=8)
for i, (ax, img) in enumerate(zip(axes[1:], draws)):
    ax.imshow(to_pixels(img))
    ax.set_title(f"level 1 #{i}", fontsize=8)
for ax in axes:
    ax.axis("off")
fig.suptitle("birder's training augmentation at 64x64")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Train
#
# `open_run` checks the run folder (new, empty, or a run to resume) and the settings; `train` runs
# `MAETrainer.step`, one compiled function with the state donated, the masks drawn inside from the step's key
# and the batch sharded over every device, with checkpoints, `metrics.jsonl` and, at the end, the encoder
# exported to `RUN/encoder` (a checkpoint `vitreg-jax embed` reads). `open_run(run_dir, resume=True)` would
# continue it after an interruption, with the saved settings.

# %%
run_dir = Path(tempfile.mkdtemp(prefix="vitreg-jax-mae-")) / "run"
result = train(open_run(run_dir, settings), encoder=encoder, progress=False)
records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
losses = np.array([r["loss"] for r in records])
lrs = [r["lr"] for r in records]
print(f"run folder: {sorted(p.name for p in run_dir.iterdir())}")
print(f"loss: first 10 steps {losses[:10].mean():.3f} -> last 10 steps {losses[-10:].mean():.3f}")

fig, ax = plt.subplots(figsize=(7, 3.2))
ax.plot(losses, lw=0.8, alpha=0.5, label="loss per step")
w = max(1, STEPS // 20)
smooth = np.convolve(losses, np.ones(w) / w, mode="valid")  # the mean of each w consecutive steps
ax.plot(np.arange(w - 1, STEPS), smooth, lw=2, label=f"mean of {w}")
ax.set_xlabel("optimizer step")
ax.set_ylabel("MSE on masked patches")
ax2 = ax.twinx()
ax2.plot(lrs, color="tab:gray", ls=":", label="learning rate")
ax2.set_ylabel("learning rate")
ax.legend(loc="upper right", fontsize=8)
ax.set_title("MAE loss (normalised pixels)")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Original / masked / reconstructed
#
# The trained MAE on un-augmented images (birder's inference transform at 64×64), with fresh random masks:
# 75 % of the patches hidden, the decoder predicts their pixels. The last column pastes the visible patches
# back over the prediction, as in the MAE paper.

# %%
trained = result.model
transform = classification_transform(SIZE, rgb_stats)
show = [0, 3, 6, 12][: len(paths)]
x = np.stack([transform(load_image(paths[i])) for i in show])  # (n, H, W, 3)
p, grid = encoder_cfg.patch_size, encoder_cfg.grid_size
masks = random_masking(jax.random.PRNGKey(42), len(x), grid[0] * grid[1], trained.cfg.mask_ratio)
out = trained(x, masks)
pred = np.asarray(unpatchify(out["pred"], p, grid))  # (n, H, W, 3), normalised pixels
mask = np.asarray(out["mask"]).reshape(len(x), grid[0], grid[1])  # 1 = hidden
mask_px = np.repeat(np.repeat(mask, p, axis=1), p, axis=2)[..., None]  # (n, H, W, 1)
print("loss on these images:", float(out["loss"]))

cols = [
    ("original", to_pixels(x)),
    ("masked (75 %)", to_pixels(x) * (1 - mask_px) + 0.5 * mask_px),
    ("reconstruction", to_pixels(pred)),
    ("reconstruction + visible", to_pixels(x * (1 - mask_px) + pred * mask_px)),
]
fig, axes = plt.subplots(len(x), len(cols), figsize=(2.3 * len(cols), 2.3 * len(x)))
for r in range(len(x)):
    for c, (title, imgs) in enumerate(cols):
        axes[r, c].imshow(imgs[r])
        axes[r, c].axis("off")
        if r == 0:
            axes[r, c].set_title(title, fontsize=9)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## From here
#
# - `vitreg-jax pretrain --data DIR --out RUN --network vit_reg4_b16 --epochs 800` is the full recipe,
#   resumable after a kill (`--resume`), with `--bf16` mixed precision and `--grad-accum-steps`; at the end it
#   exports `RUN/encoder/`, a vitreg-jax checkpoint that `vitreg-jax embed` uses and `vitreg-jax export` turns
#   into a birder `.pt`.
# - `--init vit_reg4_b16_mim_300` starts from the published encoder (fine-tuning the MAE on your own images).
# - Several hosts (a TPU slice, GPU nodes): run the same command once per host with `--distributed`
#   (`jax.distributed` finds the others on TPU pods and under SLURM) or with
#   `--coordinator HOST0:PORT --num-processes N --process-id I`; `--batch-size` stays the global batch, each
#   process reads its share of every batch, and the gradients are averaged over every device of every host.
#   `RUN` must be on a file system that all hosts see.
