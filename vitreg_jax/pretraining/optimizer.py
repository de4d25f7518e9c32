"""birder's optimizer and learning-rate schedule for MAE pre-training: AdamW, warm-up + cosine, gradient
clipping.

birder's recipe (``scripts/train_mim.py`` + ``common/training_utils.py``, 0.8.4) and how it maps here:

* ``torch.optim.AdamW(lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.05)`` on every parameter, one group:
  :func:`make_optimizer` (``optax.adamw`` is the same update: decoupled decay ``p -= lr * wd * p`` plus the
  bias-corrected Adam step), optionally without decay on biases, norms and tokens.
* ``SequentialLR([LinearLR(0.01, warm-up), CosineAnnealingLR(T_max=total - warm-up - 1)])`` stepped once per
  epoch (default) or per optimizer step: :class:`LRSchedule`, evaluated in float64 on the host and passed
  to the step, so the step needs no schedule state.
* the step's optional ``clip_grad_norm_``: :func:`clip_grad_norm`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vitreg_jax.pretraining.config import TrainConfig

# torch.nn.utils.clip_grad_norm_: clip_coef = max_norm / (total_norm + 1e-6), clamped to 1
CLIP_EPS = 1e-6
# parameters the usual exclusion (decay_bias_and_norm=False) leaves undecayed besides biases and norm scales
NO_DECAY_NAMES = frozenset({"pos_embedding", "class_token", "reg_tokens", "mask_token", "decoder_pos_embed"})


# learning-rate schedule
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LRSchedule:
    """birder's ``get_scheduler`` for ``--lr-scheduler cosine`` with linear warm-up, as a pure function.

    ``total`` and ``warmup`` count scheduler updates (epochs, or optimizer steps with ``per_step``); the LR of
    optimizer step ``s`` is the value after ``s // steps_per_update`` scheduler updates.
    """

    base_lr: float
    total: int
    warmup: int
    start_factor: float = 0.01
    eta_min: float = 0.0
    steps_per_update: int = 1

    def value(self, index: int) -> float:
        """The LR after ``index`` scheduler updates (float64)."""
        if (
            self.warmup > 0 and index < self.warmup
        ):  # LinearLR(start_factor, end_factor=1, total_iters=warmup)
            return self.base_lr * (self.start_factor + (1.0 - self.start_factor) * index / self.warmup)
        t_max = (
            self.total - self.warmup - 1
        )  # CosineAnnealingLR(T_max=main_steps), restarted at the milestone
        t = index - self.warmup
        if t_max <= 0:
            return self.base_lr
        return self.eta_min + (self.base_lr - self.eta_min) * (1.0 + math.cos(math.pi * t / t_max)) / 2.0

    def __call__(self, step: int) -> float:
        return self.value(step // self.steps_per_update)


def steps_per_update(cfg: TrainConfig, steps_per_epoch: int) -> int:
    return 1 if (cfg.schedule_per_step or cfg.steps is not None) else steps_per_epoch


def total_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """Optimizer steps of the whole run."""
    return cfg.steps if cfg.steps is not None else cfg.epochs * steps_per_epoch


def lr_schedule(cfg: TrainConfig, steps_per_epoch: int) -> LRSchedule:
    """birder's schedule for this config (per epoch, or per step with ``schedule_per_step`` / ``steps``)."""
    if cfg.steps is not None:
        total, warmup, every = cfg.steps, cfg.warmup_steps, 1
    elif cfg.schedule_per_step:
        total, warmup, every = cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch, 1
    else:
        total, warmup, every = cfg.epochs, cfg.warmup_epochs, steps_per_epoch
    return LRSchedule(cfg.lr, total, warmup, cfg.warmup_start_factor, cfg.lr_min, every)


# optimizer
# ---------------------------------------------------------------------------------------------------
def decays_by_default(path: tuple[Any, ...], leaf: Any) -> bool:
    """The usual exclusion (``decay_bias_and_norm=False``): decay matrices only, not biases, norm scales,
    tokens or position embeddings."""
    names = {getattr(k, "key", getattr(k, "name", k)) for k in path}  # KeyEntry or plain keys
    return np.ndim(leaf) >= 2 and not (names & NO_DECAY_NAMES)


def weight_decay_mask(params: Any) -> Any:
    """True for the tensors the usual exclusion decays (a pytree of bools shaped like ``params``)."""
    return jax.tree_util.tree_map_with_path(decays_by_default, params)


def make_optimizer(cfg: TrainConfig, lr: Any = None) -> optax.GradientTransformation:
    """torch's ``AdamW`` with birder's settings: ``optax.adamw`` (scale_by_adam, decoupled decay, -lr).

    The step builds it with the current LR, which does not change the optimizer state (``make_optimizer(cfg)
    .init`` creates it). Weight decay goes to every tensor, as birder's, or with ``decay_bias_and_norm=False``
    only to :func:`weight_decay_mask`'s.
    """
    return optax.adamw(
        learning_rate=cfg.lr if lr is None else lr,
        b1=cfg.betas[0],
        b2=cfg.betas[1],
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        mask=None if cfg.decay_bias_and_norm else weight_decay_mask,
    )


def adamw_update(cfg: TrainConfig, params: Any, grads: Any, opt_state: Any, lr: Any) -> tuple[Any, Any]:
    """One AdamW step: (new parameters, new optimizer state)."""
    updates, opt_state = make_optimizer(cfg, lr).update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def clip_grad_norm(grads: Any, max_norm: float | None) -> tuple[Any, jax.Array]:
    """torch's ``clip_grad_norm_``: scale by ``min(1, max_norm / (norm + 1e-6))``; returns (grads, norm)."""
    norm = optax.tree.norm(grads)
    if max_norm is None:
        return grads, norm
    coef = jnp.minimum(1.0, max_norm / (norm + CLIP_EPS))
    return jax.tree_util.tree_map(lambda g: g * coef, grads), norm
