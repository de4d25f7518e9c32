"""The jitted MAE train step: against birder's training step (torch), bf16, non-finite losses, data parallel.

birder's step (``scripts/train_mim.py``): for each micro-batch ``(net(x)["loss"] / accum_steps).backward()``,
then ``AdamW.step()``. Ours runs the same two micro-batches inside one jit call with birder's masks injected.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.support import birder_ref as ref
from tests.support import mae_mapping
from tests.support.report import record
from tests.support.tiny_models import SIZE, TINY_MAE_DECODER, TINY_MAE_ENCODER, tiny_mae
from tests.support.tolerances import (
    STEP_BF16_GRAD_COSINE,
    STEP_BF16_LOSS_RTOL,
    STEP_DP_GRAD_RTOL_OF_MAX,
    STEP_DP_LOSS_RTOL,
    STEP_GRAD_FLOOR,
    STEP_GRAD_RTOL_OF_MAX,
    STEP_LOSS_RTOL,
    STEP_UPDATE_ATOL_OF_LR,
)
from vitreg_jax.errors import UserError
from vitreg_jax.model.build import get_params, set_params
from vitreg_jax.model.precision import ComputePolicy, resolve_dtype
from vitreg_jax.pretraining.config import TrainConfig
from vitreg_jax.pretraining.mae import MAE_STATE, Masks
from vitreg_jax.pretraining.step import MAETrainer

jax.config.update("jax_default_matmul_precision", "highest")

# the tiny MAE of tests.support.tiny_models: 32 px images in 8 px patches
SEQ = (SIZE[0] // 8) * (SIZE[1] // 8)
ACCUM, BATCH = 2, 2
LR = 1e-3


def numpy_masks(shape: tuple[int, ...], seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    noise = np.random.default_rng(seed).random((*shape, SEQ), dtype=np.float32)
    keep = int(SEQ * 0.25)
    shuffle = np.argsort(noise, axis=-1, kind="stable")
    restore = np.argsort(shuffle, axis=-1, kind="stable")
    return (restore >= keep).astype(np.float32), shuffle[..., :keep], restore


@pytest.fixture(scope="module")
def birder_and_ours():
    """birder's MAE and our trainer holding the same (perturbed) weights."""
    pytest.importorskip("birder")
    import torch
    from birder.model_registry import registry

    torch.manual_seed(0)
    enc = registry.net_factory("vit_reg4_b16", 0, 3, config=TINY_MAE_ENCODER, size=SIZE)
    bnet = registry.mim_net_factory("mae_vit", enc, config=TINY_MAE_DECODER, size=SIZE).train()
    rng = np.random.default_rng(1)
    state = {
        k: (v + rng.normal(0, 0.05, v.shape)).astype(np.float32) for k, v in ref.state_numpy(bnet).items()
    }
    ref.load_state(bnet, state)
    model = tiny_mae()
    set_params(model, mae_mapping.to_nnx(state, model.encoder.cfg, model.cfg), kinds=MAE_STATE)
    cfg = TrainConfig(batch_size=BATCH, grad_accum_steps=ACCUM, steps=10, lr=LR)
    return bnet, model, MAETrainer(model, cfg)


def birder_params(bnet) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in bnet.state_dict().items()}


def ours_as_birder(trainer: MAETrainer, params) -> dict[str, np.ndarray]:
    model = trainer.model({"params": params})

    return mae_mapping.to_birder(get_params(model, MAE_STATE), model.encoder.cfg, model.cfg)


def test_step_matches_birder(birder_and_ours, monkeypatch):
    import birder.net.mim.mae_vit as birder_mae_module
    import torch

    bnet, _, trainer = birder_and_ours
    x = np.random.default_rng(2).standard_normal((2, ACCUM, BATCH, *SIZE, 3)).astype(np.float32)  # 2 steps
    masks = [numpy_masks((ACCUM, BATCH), seed=10 + s) for s in range(2)]
    cfg = trainer.cfg
    opt = torch.optim.AdamW(
        bnet.parameters(), lr=LR, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay
    )
    state = trainer.init_state()
    names = {k for k, _ in bnet.named_parameters()}
    start = birder_params(bnet)
    torch_grads: list[dict[str, np.ndarray]] = []
    for s in range(2):
        opt.zero_grad()
        losses = []
        for a in range(ACCUM):
            m, keep, restore = (torch.from_numpy(np.ascontiguousarray(t[a])) for t in masks[s])
            monkeypatch.setattr(
                birder_mae_module, "uniform_mask", lambda *_, m=m, k=keep, r=restore, **__: (m, k, r)
            )
            loss = bnet(ref.nchw(x[s, a]))["loss"]
            (loss / ACCUM).backward()
            losses.append(float(loss.detach()))
        torch_grads.append({k: p.grad.numpy().copy() for k, p in bnet.named_parameters()})
        opt.step()
        state, metrics = trainer.step(state, x[s], LR, masks=Masks(masks[s][1], masks[s][2], masks[s][0]))
        loss_rel = abs(float(metrics["loss"]) - np.mean(losses)) / np.mean(losses)
        assert loss_rel <= STEP_LOSS_RTOL, (
            f"step {s}: loss {float(metrics['loss'])} vs birder {np.mean(losses)}"
        )
        if s == 0:  # after one step AdamW's first moment is (1 - b1) * grad: our accumulated gradient
            mu = state["opt_state"][0].mu  # optax.adamw: (scale_by_adam, add_decayed_weights, scale) states
            grads = ours_as_birder(
                trainer, jax.tree_util.tree_map(lambda v: np.asarray(v) / (1 - cfg.betas[0]), mu)
            )
            worst = max(
                (float(np.abs(grads[k] - g).max() / max(np.abs(g).max(), 1e-12)), k)
                for k, g in torch_grads[0].items()
            )
            record("MAE train step (tiny, 2x2 accum)", "grad (rel. to max)", worst[0])
            assert worst[0] <= STEP_GRAD_RTOL_OF_MAX, (
                f"gradient of {worst[1]} differs by {worst[0]:.2e} of its max"
            )
    ours = ours_as_birder(trainer, state["params"])
    theirs = birder_params(bnet)
    # Compare what the two steps moved, in units of the learning rate. Adam divides each gradient by its own
    # magnitude plus eps, so where a gradient is within a few hundred eps of zero (the key bias, whose
    # gradient is exactly zero, and a few stray entries) the step amplifies the gradients' 1e-7 relative
    # rounding differences: there we only bound the step; everywhere else we compare it closely.
    worst = (0.0, "")
    for k in names:
        moved_o, moved_t = ours[k] - start[k], theirs[k] - start[k]
        steady = np.minimum(np.abs(torch_grads[0][k]), np.abs(torch_grads[1][k])) > STEP_GRAD_FLOOR
        assert np.abs(moved_o - moved_t)[~steady].max(initial=0.0) <= 2 * 2 * LR, (
            k
        )  # at most lr per step each
        worst = max(worst, (float(np.abs(moved_o - moved_t)[steady].max(initial=0.0)) / LR, k))
    record("MAE train step (tiny, 2x2 accum)", "update after 2 steps / lr", worst[0])
    assert worst[0] <= STEP_UPDATE_ATOL_OF_LR, f"{worst[1]}: the updates differ by {worst[0]:.2e} lr"
    np.testing.assert_array_equal(
        ours["decoder_pos_embed"], theirs["decoder_pos_embed"]
    )  # a buffer: untouched
    assert int(state["step"]) == 2


def test_non_finite_step_changes_nothing(birder_and_ours):
    _, _, trainer = birder_and_ours
    state = trainer.init_state()
    before = jax.tree_util.tree_map(np.array, state["params"])
    x = np.full((ACCUM, BATCH, *SIZE, 3), np.nan, np.float32)
    masks = numpy_masks((ACCUM, BATCH), seed=3)
    state, metrics = trainer.step(state, x, LR, masks=Masks(masks[1], masks[2], masks[0]))
    assert not bool(metrics["finite"]) and not np.isfinite(float(metrics["loss"]))
    assert int(state["step"]) == 0
    jax.tree_util.tree_map(
        np.testing.assert_array_equal, jax.tree_util.tree_map(np.asarray, state["params"]), before
    )


def test_bf16_step_is_close_to_fp32_and_keeps_fp32_weights(birder_and_ours):
    _, model, trainer = birder_and_ours
    bf16 = MAETrainer(model, trainer.cfg.replace(compute_dtype="bfloat16"))
    x = np.random.default_rng(4).standard_normal((ACCUM, BATCH, *SIZE, 3)).astype(np.float32)
    m = numpy_masks((ACCUM, BATCH), seed=5)
    masks = Masks(m[1], m[2], m[0])
    hlo = bf16._step.lower(
        bf16.init_state(), bf16.put_batch(x), jnp.float32(LR), bf16_masks(bf16, masks)
    ).as_text()
    assert "bf16" in hlo and "dot_general" in hlo
    results = {}
    for name, tr in (("fp32", trainer), ("bf16", bf16)):
        state, metrics = tr.step(tr.init_state(), x, LR, masks=masks)
        mu = jax.tree_util.tree_leaves(state["opt_state"][0].mu)
        results[name] = (float(metrics["loss"]), np.concatenate([np.ravel(v) for v in mu]))
        assert all(v.dtype == jnp.float32 for v in jax.tree_util.tree_leaves(state["params"]))
    (l32, g32), (l16, g16) = results["fp32"], results["bf16"]
    cosine = float(g32 @ g16 / (np.linalg.norm(g32) * np.linalg.norm(g16)))
    record("MAE train step bf16 vs fp32 (tiny)", "loss (relative)", abs(l16 - l32) / l32)
    assert abs(l16 - l32) / l32 <= STEP_BF16_LOSS_RTOL
    assert cosine >= STEP_BF16_GRAD_COSINE, f"bf16 gradient cosine to fp32 {cosine:.4f}"


def test_compute_dtype_auto_and_policy():
    """``compute_dtype="auto"`` resolves for the mesh's platform; ``policy=`` must agree with the config."""
    model = tiny_mae()
    cfg = TrainConfig(batch_size=BATCH, steps=2, compute_dtype="auto")
    auto = MAETrainer(model, cfg)
    assert auto.policy == ComputePolicy(resolve_dtype("auto", platform=jax.default_backend()))
    bf16 = ComputePolicy("bfloat16")
    assert MAETrainer(model, cfg.replace(compute_dtype="bfloat16"), policy=bf16).policy is bf16
    with pytest.raises(UserError, match="disagrees with the compute policy"):
        MAETrainer(model, cfg.replace(compute_dtype="float32"), policy=bf16)
    params = MAETrainer(model, cfg.replace(compute_dtype="bfloat16")).compute_params(
        auto.init_state()["params"]
    )
    dtypes = {str(v.dtype) for v in jax.tree_util.tree_leaves(params)}
    assert dtypes == {"bfloat16", "float32"}  # kernels in bf16, the rest float32; the state stays float32


def bf16_masks(trainer: MAETrainer, masks: Masks) -> Masks:
    return Masks(*(jax.device_put(jnp.asarray(v), trainer.batch_sharding) for v in masks))


DP_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from flax import nnx
    from vitreg_jax.pretraining.config import MAEConfig, TrainConfig
    from vitreg_jax.model.config import preset
    from vitreg_jax.pretraining.mae import MAE
    from vitreg_jax.parallel import default_mesh
    from vitreg_jax.pretraining.step import MAETrainer
    from vitreg_jax.model.vit import ViT

    vit_cfg = preset("vit_reg4_b16", model_config=json.loads(sys.argv[1]), image_size=(32, 32))
    model = MAE(ViT(vit_cfg, rngs=nnx.Rngs(0)), MAEConfig(**json.loads(sys.argv[2])), rngs=nnx.Rngs(1))
    cfg = TrainConfig(batch_size=4, steps=1, lr=1e-3)
    x = np.random.default_rng(0).standard_normal((1, 1, 4, 32, 32, 3)).astype(np.float32)
    out = {"devices": jax.device_count()}
    grads = {}
    for name, devices in (("two", jax.devices()), ("one", jax.devices()[:1])):
        tr = MAETrainer(model, cfg, mesh=default_mesh(devices))
        batch = tr.put_batch(x[0])
        state, m = tr.step(tr.init_state(), batch, 1e-3)
        out[name + "_batch_devices"] = len(batch.sharding.device_set)
        out[name + "_batch_spec"] = str(batch.sharding.spec)
        out[name + "_loss"] = float(m["loss"])
        mu = jax.tree_util.tree_leaves(state["opt_state"][0].mu)  # AdamW's first moment after step 1
        grads[name] = np.concatenate([np.ravel(v) for v in mu]) / (1 - cfg.betas[0])
    out["grad_diff_of_max"] = float(np.abs(grads["two"] - grads["one"]).max() / np.abs(grads["one"]).max())
    print(json.dumps(out))
""")


def test_data_parallel_over_two_devices_matches_one(tmp_path):
    """A subprocess with two host devices: the batch is split over both; loss and gradient equal one
    device's."""
    # two host devices; XLA's backend optimisations off: the program is tiny, its compile time is not
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0",
    }
    proc = subprocess.run(
        [sys.executable, "-c", DP_SCRIPT, json.dumps(TINY_MAE_ENCODER), json.dumps(TINY_MAE_DECODER)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).parents[1],
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["devices"] == 2
    assert out["two_batch_devices"] == 2 and out["one_batch_devices"] == 1
    assert "'data'" in out["two_batch_spec"]
    record("MAE train step, 2 devices vs 1", "grad (rel. to max)", out["grad_diff_of_max"])
    assert out["grad_diff_of_max"] <= STEP_DP_GRAD_RTOL_OF_MAX
    assert out["two_loss"] == pytest.approx(out["one_loss"], rel=STEP_DP_LOSS_RTOL)
