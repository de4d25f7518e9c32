"""The pre-training configuration: ``MAEConfig`` (birder's ``MAE_ViT`` head, its registered presets) and
``TrainConfig`` (birder's ``mae_vit`` training recipe), frozen dataclasses that refuse unknown or invalid
fields.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any, TypeVar

from vitreg_jax.errors import UserError
from vitreg_jax.model.precision import DTYPE_CHOICES

# birder 0.8.4's registered MAE_ViT configs (net/mim/mae_vit.py); the decoder always has 16 heads there.
MAE_PRESETS: dict[str, dict[str, Any]] = {
    "mae_vit": {"decoder_depth": 8, "decoder_embed_dim": 512},
    "mae_vit_dec512d12": {"decoder_depth": 12, "decoder_embed_dim": 512},
    "mae_vit_dec512d24": {"decoder_depth": 24, "decoder_embed_dim": 512},
    "mae_vit_dec512d32": {"decoder_depth": 32, "decoder_embed_dim": 512},
    "mae_vit_dec512d12_npl": {"decoder_depth": 12, "decoder_embed_dim": 512, "norm_pix_loss": True},
    "mae_vit_dec512d24_npl": {"decoder_depth": 24, "decoder_embed_dim": 512, "norm_pix_loss": True},
    "mae_vit_dec512d32_npl": {"decoder_depth": 32, "decoder_embed_dim": 512, "norm_pix_loss": True},
    "mae_vit_dec512d12_npl_lpe": {
        "decoder_depth": 12,
        "decoder_embed_dim": 512,
        "norm_pix_loss": True,
        "learnable_pos_embed": True,
    },
    "mae_vit_dec512d24_npl_lpe": {
        "decoder_depth": 24,
        "decoder_embed_dim": 512,
        "norm_pix_loss": True,
        "learnable_pos_embed": True,
    },
    "mae_vit_dec512d32_npl_lpe": {
        "decoder_depth": 32,
        "decoder_embed_dim": 512,
        "norm_pix_loss": True,
        "learnable_pos_embed": True,
    },
}


_Config = TypeVar("_Config")


def _check_number(
    name: str, value: float, *, low: float, low_open: bool = False, high: float | None = None
) -> None:
    """A finite number in ``[low, high)`` (``(low, high)`` with ``low_open``); else one line naming it."""
    ok = (
        isinstance(value, numbers.Real)
        and math.isfinite(value)
        and (value > low if low_open else value >= low)
    )
    if ok and high is not None:
        ok = value < high
    if not ok:
        span = f"{'(' if low_open else '['}{low:g}, {'inf)' if high is None else f'{high:g})'}"
        raise UserError(f"TrainConfig.{name} must be a finite number in {span}, got {value!r}")


def config_from_dict(cls: type[_Config], d: dict[str, Any], what: str) -> _Config:
    """A frozen settings dataclass from its ``to_dict()`` form (lists read as tuples); an unknown field is a
    :class:`UserError` listing the known ones."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise UserError(f"unknown {what} field(s): {', '.join(unknown)} (known: {', '.join(sorted(names))})")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


@dataclass(frozen=True, kw_only=True, slots=True)
class MAEConfig:
    """birder's ``MAE_ViT`` head: decoder width/depth/heads, masking and loss options (defaults:
    ``mae_vit``)."""

    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16  # birder hard-codes 16 (``ViT.decoder_block``)
    mask_ratio: float = 0.75
    norm_pix_loss: bool = False
    learnable_pos_embed: bool = False  # birder's ``_lpe`` variants; else a fixed 2-D sin-cos buffer
    # birder 0.8.4 divides the sin-cos frequency exponents by dim//4; the code that trained the published
    # weights (<= 0.6.2) by dim//4 - 1 ("include_frequency_endpoint").
    include_frequency_endpoint: bool = False
    min_mask_size: int = 1  # birder's MAE_ViT(min_mask_size=): mask whole m x m blocks of patches

    def __post_init__(self) -> None:
        if self.min_mask_size < 1:
            raise UserError(f"MAEConfig: min_mask_size must be 1 or more, got {self.min_mask_size}")
        if self.decoder_embed_dim <= 0 or self.decoder_depth < 0 or self.decoder_num_heads <= 0:
            raise UserError("MAEConfig: decoder_embed_dim and decoder_num_heads must be positive, depth >= 0")
        if self.decoder_embed_dim % self.decoder_num_heads:
            raise UserError(
                f"MAEConfig: decoder_embed_dim {self.decoder_embed_dim} is not divisible by "
                f"decoder_num_heads {self.decoder_num_heads}"
            )
        if not self.learnable_pos_embed and self.decoder_embed_dim % 4:
            raise UserError(
                f"MAEConfig: the sin-cos decoder position embedding needs decoder_embed_dim "
                f"divisible by 4, got {self.decoder_embed_dim}"
            )
        if not 0.0 < self.mask_ratio < 1.0:  # 0 masks nothing: a loss over no patch is 0 / 0
            raise UserError(f"MAEConfig: mask_ratio must be in (0, 1), got {self.mask_ratio}")

    def replace(self, **changes: Any) -> MAEConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MAEConfig:
        return config_from_dict(cls, d, "MAEConfig")

    @classmethod
    def from_birder(
        cls, config: dict[str, Any], *, mask_ratio: float | None = None, min_mask_size: int | None = None
    ) -> MAEConfig:
        """From birder's MAE ``config`` dict (``decoder_depth``, ``decoder_embed_dim``, ...) and the
        ``MAE_ViT`` constructor's ``mask_ratio`` / ``min_mask_size`` when they are not the defaults."""
        known = {"decoder_depth", "decoder_embed_dim", "norm_pix_loss", "learnable_pos_embed"}
        unknown = sorted(set(config) - known)
        if unknown:
            raise UserError(f"unsupported birder MAE option(s): {', '.join(unknown)}")
        extra = {
            k: v for k, v in (("mask_ratio", mask_ratio), ("min_mask_size", min_mask_size)) if v is not None
        }
        return cls(**config, **extra)

    def to_birder(self) -> dict[str, Any]:
        d: dict[str, Any] = {"decoder_depth": self.decoder_depth, "decoder_embed_dim": self.decoder_embed_dim}
        if self.norm_pix_loss:
            d["norm_pix_loss"] = True
        if self.learnable_pos_embed:
            d["learnable_pos_embed"] = True
        return d


def mae_preset(name: str, **overrides: Any) -> MAEConfig:
    """An ``MAEConfig`` by birder MIM network name, e.g. ``mae_preset("mae_vit")``."""
    if name not in MAE_PRESETS:
        raise UserError(f"unknown MAE network {name!r} (known: {', '.join(MAE_PRESETS)})")
    return MAEConfig(**{**MAE_PRESETS[name], **overrides})


# birder's mae_vit recipe warms up for 40 of its 800 epochs: a warm-up not given is this fraction of the
# length
WARMUP_FRACTION = 0.05


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainConfig:
    """birder's ``mae_vit`` recipe (``train_mim.py`` defaults and docs/training_mim.md) as the defaults.

    Length: ``epochs`` (birder's unit) or ``steps`` (optimizer steps; setting it clears ``epochs``). Warm-up:
    ``warmup_epochs`` / ``warmup_steps``, by default :data:`WARMUP_FRACTION` of the length (birder's 40 of 800
    epochs), resolved when the config is made. The learning rate follows birder's
    ``SequentialLR(LinearLR(warmup_start_factor, warm-up), CosineAnnealingLR(eta_min=lr_min))``, updated once
    per epoch (birder's default) or, with ``schedule_per_step`` (always with ``steps``), once per optimizer
    step. ``batch_size`` is the global batch of one forward pass (birder's per-GPU batch times the number of
    GPUs); one optimizer step sees ``batch_size * grad_accum_steps`` images.
    """

    batch_size: int = 256
    lr: float = 1.5e-4
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    decay_bias_and_norm: bool = True  # birder decays every parameter; False excludes biases, norms and tokens
    epochs: int | None = 800
    steps: int | None = None
    warmup_epochs: int | None = None  # with ``epochs``; None: WARMUP_FRACTION of them
    warmup_steps: int | None = None  # with ``steps``; None: WARMUP_FRACTION of them
    warmup_start_factor: float = 0.01
    lr_min: float = 0.0
    schedule_per_step: bool = False  # birder updates the LR once per epoch by default
    clip_grad_norm: float | None = None
    grad_accum_steps: int = 1
    compute_dtype: str = "float32"  # or "bfloat16" / "auto": see vitreg_jax.model.precision
    seed: int = 0
    checkpoint_every: int = 500  # optimizer steps
    keep_checkpoints: int = 3
    log_every: int = 10  # optimizer steps per metrics line

    def __post_init__(self) -> None:
        if self.steps is not None and self.epochs is not None:  # steps, when given, replaces the epoch count
            object.__setattr__(self, "epochs", None)
        if self.epochs is None and self.steps is None:
            raise UserError("TrainConfig: set epochs or steps")
        length = self.epochs if self.epochs is not None else self.steps
        if length is None or length <= 0:
            raise UserError(f"TrainConfig: the run length must be positive, got {length}")
        for name, length_of in (("warmup_epochs", self.epochs), ("warmup_steps", self.steps)):
            if getattr(self, name) is None:  # the warm-up rule, in one place
                object.__setattr__(self, name, round((length_of or 0) * WARMUP_FRACTION))
        if self.warmup_epochs < 0 or self.warmup_steps < 0:  # type: ignore[operator]
            raise UserError("TrainConfig: warm-up must be >= 0")
        if self.epochs is not None and self.warmup_epochs >= self.epochs:
            raise UserError(
                f"TrainConfig: warmup_epochs {self.warmup_epochs} must be below epochs {self.epochs}"
            )
        if self.steps is not None and self.warmup_steps >= self.steps:
            raise UserError(f"TrainConfig: warmup_steps {self.warmup_steps} must be below steps {self.steps}")
        for name in ("batch_size", "grad_accum_steps", "checkpoint_every", "keep_checkpoints", "log_every"):
            if getattr(self, name) < 1:
                raise UserError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        _check_number("lr", self.lr, low=0.0, low_open=True)
        _check_number("weight_decay", self.weight_decay, low=0.0)
        _check_number("eps", self.eps, low=0.0, low_open=True)
        _check_number("lr_min", self.lr_min, low=0.0)
        _check_number("warmup_start_factor", self.warmup_start_factor, low=0.0, low_open=True)
        if len(self.betas) != 2:
            raise UserError(f"TrainConfig.betas must be two numbers, got {self.betas!r}")
        for beta in self.betas:
            _check_number("betas", beta, low=0.0, high=1.0)
        if self.compute_dtype not in DTYPE_CHOICES:
            raise UserError(
                f"TrainConfig.compute_dtype must be one of {', '.join(DTYPE_CHOICES)}, "
                f"got {self.compute_dtype!r}"
            )
        if self.clip_grad_norm is not None:
            _check_number("clip_grad_norm", self.clip_grad_norm, low=0.0, low_open=True)

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with ``changes``; a new length keeps the resolved warm-up unless ``warmup_*=None`` is
        given."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        return config_from_dict(cls, d, "TrainConfig")
