"""Optimizer, schedule and clipping against torch / birder 0.8.4, without compiling a model.

* one (and two) AdamW steps from identical weights and gradients vs ``torch.optim.AdamW`` with birder's
  settings (betas 0.9/0.95, eps 1e-8, weight decay 0.05 on everything), also with the bias/norm exclusion;
* the learning-rate sequence vs the scheduler birder builds (``training_utils.get_scheduler``), per epoch and
  per step, with and without warm-up;
* gradient clipping vs ``torch.nn.utils.clip_grad_norm_``.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.support.tolerances import ADAMW_RTOL, CLIP_RTOL, LR_ATOL, LR_RTOL
from vitreg_jax.pretraining.config import TrainConfig
from vitreg_jax.pretraining.optimizer import (
    LRSchedule,
    adamw_update,
    clip_grad_norm,
    decays_by_default,
    lr_schedule,
    make_optimizer,
    weight_decay_mask,
)

torch = pytest.importorskip("torch")


SHAPES = {
    "decoder_embed": {"kernel": (24, 16), "bias": (16,)},
    "norm": {"scale": (16,), "bias": (16,)},
    "mask_token": (1, 1, 16),
    "block": {0: {"kernel": (16, 48)}},
}


def make_tree(seed: int, scale: float = 1.0) -> dict:
    rng = np.random.default_rng(seed)

    def build(node):
        if isinstance(node, dict):
            return {k: build(v) for k, v in node.items()}
        return (scale * rng.standard_normal(node)).astype(np.float32)

    return build(SHAPES)


def leaves_with_paths(tree: dict) -> list[tuple[tuple, np.ndarray]]:
    return [
        (tuple(getattr(k, "key", k) for k in p), np.asarray(v))
        for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]
    ]


@pytest.mark.parametrize("decay_all", [True, False])
@pytest.mark.parametrize("fused", [False, True])
def test_adamw_matches_torch(decay_all, fused):
    """Two steps of our AdamW (the trainer's update) against torch's AdamW as birder builds it."""
    cfg = TrainConfig(steps=10, lr=1.5e-4, decay_bias_and_norm=decay_all)
    params = make_tree(0)
    grads_seq = [make_tree(1, 1e-2), make_tree(2, 1e-2)]
    tparams = [(p, torch.nn.Parameter(torch.from_numpy(v.copy()))) for p, v in leaves_with_paths(params)]
    decays = {p: decays_by_default(tuple(p), v) for p, v in leaves_with_paths(params)}
    if decay_all:  # birder: one group, weight decay on everything
        groups = [{"params": [t for _, t in tparams]}]
    else:  # the usual two groups
        groups = [
            {"params": [t for p, t in tparams if decays[p]]},
            {"params": [t for p, t in tparams if not decays[p]], "weight_decay": 0.0},
        ]
    try:
        opt = torch.optim.AdamW(
            groups,
            lr=cfg.lr,
            betas=cfg.betas,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            fused=fused or None,
        )
    except RuntimeError as e:  # fused kernels need a supported device / build
        pytest.skip(f"torch fused AdamW unavailable: {e}")
    ours = jax.tree_util.tree_map(jnp.asarray, params)
    opt_state = make_optimizer(cfg).init(ours)
    update = jax.jit(lambda p, g, s: adamw_update(cfg, p, g, s, jnp.float32(cfg.lr)))
    for grads in grads_seq:
        for (_, t), (_, g) in zip(tparams, leaves_with_paths(grads), strict=True):
            t.grad = torch.from_numpy(g.copy())
        opt.step()
        ours, opt_state = update(ours, jax.tree_util.tree_map(jnp.asarray, grads), opt_state)
        for (path, t), (_, o) in zip(tparams, leaves_with_paths(ours), strict=True):
            np.testing.assert_allclose(o, t.detach().numpy(), rtol=ADAMW_RTOL, atol=0, err_msg=str(path))


def test_decay_mask_excludes_biases_norms_and_tokens():
    mask = dict(leaves_with_paths(weight_decay_mask(make_tree(0))))
    assert {p for p, m in mask.items() if m} == {("decoder_embed", "kernel"), ("block", 0, "kernel")}


def birder_lrs(
    epochs: int, warmup_epochs: int | None, steps_per_epoch: int, per_step: bool, lr: float = 1.5e-4
) -> list[float]:
    """The LR of every optimizer step of the run, from the scheduler birder's train_mim.py builds."""
    from birder.common import training_utils

    args = argparse.Namespace(
        resume_epoch=None,
        epochs=epochs,
        warmup_epochs=warmup_epochs,
        warmup_steps=None,
        cooldown_epochs=None,
        cooldown_steps=None,
        lr_scheduler="cosine",
        lr_cosine_fraction=1.0,
        lr_cosine_min=0.0,
        lr_warmup_decay=0.01,
        layer_decay=None,
        backbone_layer_decay=None,
        lr_step_size=None,
        lr_steps=None,
        lr_step_gamma=None,
        lr_power=None,
    )
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = training_utils.get_scheduler(opt, steps_per_epoch if per_step else 1, args)
    out = []
    for _ in range(epochs):
        for _ in range(steps_per_epoch):
            out.append(opt.param_groups[0]["lr"])
            if per_step:
                opt.step()
                sched.step()
        if not per_step:
            opt.step()
            sched.step()
    return out


@pytest.mark.parametrize(
    ("epochs", "warmup", "per_step"), [(20, 3, False), (20, 3, True), (12, None, False), (800, 40, False)]
)
def test_lr_schedule_matches_birder(epochs, warmup, per_step):
    spe = 3 if epochs < 100 else 1
    cfg = TrainConfig(epochs=epochs, warmup_epochs=warmup or 0, schedule_per_step=per_step, lr=1.5e-4)
    sched = lr_schedule(cfg, spe)
    ours = [sched(s) for s in range(epochs * spe)]
    np.testing.assert_allclose(ours, birder_lrs(epochs, warmup, spe, per_step), rtol=LR_RTOL, atol=LR_ATOL)
    assert ours[0] == pytest.approx(1.5e-4 * (0.01 if warmup else 1.0))


def test_lr_schedule_in_steps():
    """--steps N: birder's per-step schedule over N steps with warm-up in steps."""
    sched = lr_schedule(TrainConfig(steps=100, warmup_steps=10, lr=1e-3), steps_per_epoch=7)
    assert sched.steps_per_update == 1 and sched.total == 100 and sched.warmup == 10
    assert sched(0) == pytest.approx(1e-5) and sched(10) == pytest.approx(1e-3) and sched(99) == 0.0
    assert LRSchedule(1.0, total=1, warmup=0)(0) == 1.0  # degenerate T_max: constant, no division by zero


@pytest.mark.parametrize("max_norm", [0.5, 100.0])
def test_clip_matches_torch(max_norm):
    grads = make_tree(3)
    tparams = [torch.nn.Parameter(torch.zeros(v.shape)) for _, v in leaves_with_paths(grads)]
    for t, (_, g) in zip(tparams, leaves_with_paths(grads), strict=True):
        t.grad = torch.from_numpy(g.copy())
    norm_t = float(torch.nn.utils.clip_grad_norm_(tparams, max_norm))
    clipped, norm = clip_grad_norm(jax.tree_util.tree_map(jnp.asarray, grads), max_norm)
    assert float(norm) == pytest.approx(norm_t, rel=CLIP_RTOL)
    for t, (_, c) in zip(tparams, leaves_with_paths(clipped), strict=True):
        np.testing.assert_allclose(c, t.grad.numpy(), rtol=CLIP_RTOL, atol=0)
