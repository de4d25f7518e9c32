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
# # 05 · Evaluating an encoder: k-NN and linear probe
#
# Is an encoder any good? MAE encoders are judged by what a simple classifier makes of their frozen embeddings
# on a labelled set: DINO's weighted k-NN (each validation image's 20 most cosine-similar training images vote
# for their class with weight exp(s / 0.07)) and a linear probe (logistic regression on the standardised
# embeddings). This notebook does both on a real labelled set that ships with scikit-learn, the 1,797
# handwritten digits (8×8 px, 10 classes), upscaled and written as image folders, and compares
#
# * a randomly initialised encoder,
# * the same encoder after MAE pre-training with `vitreg_jax.pretraining.train` (the library behind
#   `vitreg-jax pretrain`; 1,500 steps, or 120 in `QUICK`), which measures the k-NN accuracy every 100 (30)
#   steps while it trains,
# * and, as a yardstick, the raw pixels themselves.
#
# The same evaluation is one command: `vitreg-jax eval --checkpoint RUN/encoder --train DIR --val DIR`.
# `QUICK` (set by the test suite through `VITREG_JAX_NOTEBOOK_QUICK=1`) uses fewer images, a tinier encoder
# and fewer steps.

# %%
import json
import os
import tempfile
from pathlib import Path

import jax
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx
from PIL import Image
from sklearn.datasets import load_digits

import vitreg_jax
from vitreg_jax import TrainConfig, preset
from vitreg_jax.data import named_rgb_stats, read_labelled_folder
from vitreg_jax.evaluation import LabelledEmbeddings, embed_folders, evaluate_embeddings, format_report
from vitreg_jax.pretraining import PretrainSettings, open_run, train

QUICK = os.environ.get("VITREG_JAX_NOTEBOOK_QUICK") == "1"
SIZE = (32, 32)
IMAGES = 900 if QUICK else 1797
STEPS = 120 if QUICK else 1500
EVAL_EVERY = 30 if QUICK else 100
MODEL = (
    {"patch_size": 8, "num_layers": 2, "hidden_dim": 64, "num_heads": 4, "mlp_dim": 128}
    if QUICK
    else {"patch_size": 4, "num_layers": 4, "hidden_dim": 128, "num_heads": 4, "mlp_dim": 512}
)
# birder's mae_vit decoder (512 wide, 8 blocks) would dwarf these encoders: a small one
DECODER = (
    {"decoder_embed_dim": 64, "decoder_depth": 1, "decoder_num_heads": 4}
    if QUICK
    else {"decoder_embed_dim": 128, "decoder_depth": 2, "decoder_num_heads": 4}
)
print("JAX", jax.__version__, "on", jax.devices(), "| images:", IMAGES, "| steps:", STEPS)

# %% [markdown]
# ## The digits as image folders
#
# `vitreg-jax eval` reads the ImageFolder layout: one sub-folder per class, named after it. The 8×8 digits
# (grey levels 0-16) are upscaled to 32×32 RGB PNGs; two thirds go to `train/`, one third to `val/`, drawn at
# random with a fixed seed.

# %%
digits = load_digits()
rng = np.random.default_rng(0)
order = rng.permutation(len(digits.target))[:IMAGES]
n_train = 2 * len(order) // 3
root = Path(tempfile.mkdtemp(prefix="vitreg-digits-"))
for split, rows in (("train", order[:n_train]), ("val", order[n_train:])):
    for i in rows:
        folder = root / split / f"digit_{digits.target[i]}"
        folder.mkdir(parents=True, exist_ok=True)
        grey = Image.fromarray((digits.images[i] * (255 / 16)).astype(np.uint8)).resize(SIZE, Image.BICUBIC)
        grey.convert("RGB").save(folder / f"{i:04d}.png")
train_folder = read_labelled_folder(root / "train", "train")
val_folder = read_labelled_folder(root / "val", "val")
print(f"{len(train_folder.paths)} train / {len(val_folder.paths)} val images in {root}")

fig, axes = plt.subplots(1, 10, figsize=(10, 1.3))
for ax, c in zip(axes, range(10)):
    path = train_folder.paths[train_folder.names.index(f"digit_{c}")]
    ax.imshow(Image.open(path))
    ax.set_title(f"digit_{c}", fontsize=8)
    ax.axis("off")
plt.show()

# %% [markdown]
# ## Yardstick: the pixels themselves
#
# The evaluation functions work on any arrays: `evaluate_embeddings` takes two `LabelledEmbeddings` (rows,
# their class names, their keys). Here the rows are the original 8×8 grey levels (64 numbers per digit). Raw
# pixels are a strong baseline on digits, which are centred and size-normalised.


# %%
def pixels(folder):
    rows = [int(Path(p).stem) for p in folder.paths]  # each file is named after its row in the data set
    return LabelledEmbeddings(digits.data[rows].astype(np.float32), folder.names, folder.paths)


report_pixels = evaluate_embeddings(pixels(train_folder), pixels(val_folder), seed=0)
print(format_report(report_pixels))

# %% [markdown]
# ## A randomly initialised encoder
#
# A tiny `vit_reg4_b16`-layout encoder (4 registers + class token) with birder's initialisation and no
# training. `embed_folders` embeds both folders with one compiled `Embedder`; its CLS embeddings go through
# the same evaluation.

# %%
encoder_cfg = preset("vit_reg4_b16", image_size=SIZE, model_config={**MODEL, "drop_path_rate": 0.0})
rgb_stats = named_rgb_stats("neutral")  # pixels in 0..1, as the yardstick sees them
random_encoder = vitreg_jax.ViT(encoder_cfg, rngs=nnx.Rngs(0))
train_emb, val_emb = embed_folders(random_encoder, rgb_stats, [train_folder, val_folder], batch_size=128)
report_random = evaluate_embeddings(train_emb, val_emb, seed=0)
print(format_report(report_random))

# %% [markdown]
# ## Pre-training, with the k-NN accuracy every few steps
#
# `PretrainSettings(eval_train=..., eval_val=..., eval_every=N)` (on the command line `--eval-train DIR
# --eval-val DIR --eval-every N`) makes the run measure the weighted k-NN top-1 / top-5 of the current encoder
# every N steps and at the end, on the training devices, and log it beside the loss in `RUN/metrics.jsonl`
# (and TensorBoard). The images it trains on are the training folder's (their labels unused); the encoder
# starts from the same random weights as above.

# %%
run_dir = root / "run"
recipe = TrainConfig(
    steps=STEPS,
    batch_size=64,
    lr=1.5e-3,
    warmup_steps=STEPS // 10,
    schedule_per_step=True,
    checkpoint_every=STEPS,
    log_every=EVAL_EVERY,
    seed=0,
)
settings = PretrainSettings(
    data=(str(root / "train"),),
    network="vit_reg4_b16",
    model_config=MODEL,
    mae_config=DECODER,
    size=SIZE,
    rgb_stats="neutral",
    aug_level=0,
    eval_train=str(root / "train"),
    eval_val=str(root / "val"),
    eval_every=EVAL_EVERY,
    train=recipe,
)
result = train(open_run(run_dir, settings), progress=False)
print(f"trained {result.step} steps, last loss {result.loss:.4f}")

# %%
lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
curve = [(r["step"], r["knn/top1"]) for r in lines if "knn/top1" in r]
losses = [(r["step"], r["loss"]) for r in lines]
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.2))
ax1.plot(*zip(*losses))
ax1.set(xlabel="step", ylabel="MAE loss", title="reconstruction loss")
ax2.plot(*zip(*curve), marker="o", label="pre-training encoder")
ax2.axhline(report_random["knn_top1"], color="gray", ls="--", label="random init")
ax2.axhline(report_pixels["knn_top1"], color="green", ls=":", label="raw pixels")
ax2.set(xlabel="step", ylabel="k-NN top-1 (val)", title="weighted k-NN, k = 20")
ax2.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# ## The pre-trained encoder, k-NN and linear probe
#
# The run exported its encoder to `RUN/encoder`, a vitreg-jax checkpoint that `load_model_with_cfg`, `embed`
# and `eval` read. Its full evaluation, beside the two others:

# %%
trained, cfg = vitreg_jax.load_model_with_cfg(None, run_dir / "encoder")
train_emb, val_emb = embed_folders(trained, cfg["rgb_stats"], [train_folder, val_folder], batch_size=128)
report_trained = evaluate_embeddings(train_emb, val_emb, seed=0)
print(format_report(report_trained))

rows = [
    ("raw pixels", report_pixels),
    ("random init", report_random),
    (f"MAE, {STEPS} steps", report_trained),
]
keys = ["knn_top1", "knn1_top1", "linear_top1"]
print(f"{'':<18}" + "".join(f"{k:>13}" for k in keys))
for name, r in rows:
    print(f"{name:<18}" + "".join(f"{100 * r[k]:>12.1f}%" for k in keys))

# %% [markdown]
# What to read from this. One full run (1,500 steps, about 25 minutes on a shared 2-core CPU) measured: raw
# pixels 98.0 % k-NN top-1; the random encoder 83.6 % (linear probe 94.0 %); during MAE the k-NN accuracy
# first fell to 61 % (step 200), as the features turned towards reconstruction, then climbed past the random
# encoder's, to 88.8 % at the end (k = 1: 94.3 %, linear probe 95.7 %). The quick run (120 steps) stops in the
# dip. Raw pixels stay ahead: the digits are tiny, centred and size-normalised, and MAE needs far more data
# and steps before its features beat the input they reconstruct. The point is the machinery: the same
# functions, options and files judge `vit_reg4_b16_mim_300` on ImageNet, on a GPU or TPU, with the training
# set streamed blockwise through the neighbour search.
