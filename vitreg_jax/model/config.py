"""Frozen, JSON round-trippable configurations: the encoder (``ViTConfig``), MAE and training.

``ViTConfig`` covers the options of birder's ``ViT`` that this port implements. Building one from a birder
config dict refuses, by name, every option it does not implement, rather than silently computing something
else.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any

from vitreg_jax.errors import UserError
from vitreg_jax.model.presets import LEGACY_NAMES, PRESETS

# birder ViT options and the only values this port accepts for those it does not implement.
UNSUPPORTED_UNLESS: dict[str, tuple[Any, ...]] = {
    "stem_type": ("patchify",),
    "stem_norm_layer_type": (None,),
    "norm_layer_type": ("LayerNorm",),
    "mlp_layer_type": ("FFN",),
    "act_layer_type": (None, "gelu"),
    "qk_norm": (False,),
    "attn_norm": (False,),
    "attn_pool_head": (False,),
    "soft_moe_num_experts": (None,),
    "pos_embed_interpolation_mode": ("bicubic",),
    "dropout": (0, 0.0),
    "attention_dropout": (0, 0.0),
    "projection_dropout": (0, 0.0),
}
# options that only matter when the unsupported feature above is on: accepted and ignored
INERT_OPTIONS = {
    "attn_pool_type",
    "attn_pool_num_heads",
    "attn_pool_special_tokens",
    "attn_pool_norm_eps",
    "attn_pool_act_layer_type",
    "soft_moe_num_slots",
}
BIRDER_VIT_NAMES = ("vit", "deit3")
MAX_LAYERS = 1024  # far above any ViT's depth
MAX_SIZE = 2**31 - 1  # any other size (a width, a token or class count, an image side) fits int32


@dataclass(frozen=True, kw_only=True, slots=True)
class ViTConfig:
    """The architecture of a birder ``ViT`` (defaults are birder's ``ViT.__init__`` defaults)."""

    patch_size: int
    num_layers: int
    num_heads: int
    hidden_dim: int
    mlp_dim: int
    num_reg_tokens: int = 0
    # False: the embedding is the mean of the patch tokens (birder's `_avg` variants)
    class_token: bool = True
    abs_pos_embed: bool = True
    pos_embed_special_tokens: bool = True  # the learned position embedding has rows for [REG..., CLS] too
    pos_embed_antialias: bool = False  # dynamic-size resampling (adjust_size always antialiases, as birder)
    layer_scale_init_value: float | None = None
    pre_norm: bool = False  # LayerNorm before the blocks; the patch projection then has no bias
    post_norm: bool = True
    norm_after_pool: bool = False  # the final norm applies to the pooled embedding instead of every token
    qkv_bias: bool = True
    norm_layer_eps: float = 1e-6
    drop_path_rate: float = 0.0
    drop_path_uniform: bool = False
    out_indices: tuple[int, ...] | None = None  # blocks whose outputs `detection_features` returns
    num_classes: int = 0  # > 0 adds birder's linear classifier head
    in_channels: int = 3
    image_size: tuple[int, int] = (224, 224)  # (H, W) the position embedding is stored for

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # a wrong type is a user error, named, before any arithmetic
            value = getattr(self, f.name)
            if not _has_type(value, str(f.type)):
                raise UserError(
                    f"ViTConfig.{f.name} must be of type {f.type}, got {value!r:.60} ({type(value).__name__})"
                )
        for name in ("patch_size", "num_layers", "num_heads", "hidden_dim", "mlp_dim", "in_channels"):
            if getattr(self, name) <= 0:
                raise UserError(f"ViTConfig.{name} must be positive, got {getattr(self, name)}")
        if self.num_layers > MAX_LAYERS:  # each block is built in Python: a damaged config must not hang
            raise UserError(f"ViTConfig.num_layers {self.num_layers} is implausible (at most {MAX_LAYERS})")
        sizes = (
            "patch_size",
            "num_heads",
            "hidden_dim",
            "mlp_dim",
            "num_reg_tokens",
            "num_classes",
            "in_channels",
        )
        for name, value in [*((n, getattr(self, n)) for n in sizes), ("image_size", max(self.image_size))]:
            if value > MAX_SIZE:
                raise UserError(f"ViTConfig.{name} {value} is implausible (at most {MAX_SIZE})")
        if self.hidden_dim % self.num_heads:
            raise UserError(f"hidden_dim {self.hidden_dim} is not divisible by num_heads {self.num_heads}")
        h, w = self.image_size
        if h % self.patch_size or w % self.patch_size:
            raise UserError(f"image size {h}x{w} is not divisible by the patch size {self.patch_size}")
        if self.num_reg_tokens < 0 or self.num_classes < 0:
            raise UserError("num_reg_tokens and num_classes must be >= 0")
        # a damaged or hand-edited config must not run: eps -1 or NaN gave NaN embeddings with exit status 0
        if not (math.isfinite(self.norm_layer_eps) and 0.0 < self.norm_layer_eps < 1.0):
            raise UserError(
                f"ViTConfig.norm_layer_eps must be a finite number in (0, 1), got {self.norm_layer_eps}"
            )
        if not (math.isfinite(self.drop_path_rate) and 0.0 <= self.drop_path_rate < 1.0):
            raise UserError(f"ViTConfig.drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        if self.layer_scale_init_value is not None and not math.isfinite(self.layer_scale_init_value):
            raise UserError(
                f"ViTConfig.layer_scale_init_value must be finite, got {self.layer_scale_init_value}"
            )

    # derived sizes -------------------------------------------------------------------------------------
    @property
    def num_special_tokens(self) -> int:
        return self.num_reg_tokens + int(self.class_token)

    @property
    def grid_size(self) -> tuple[int, int]:
        return (self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size)

    @property
    def pos_embed_len(self) -> int:
        gh, gw = self.grid_size
        return gh * gw + (self.num_special_tokens if self.pos_embed_special_tokens else 0)

    def drop_path_rates(self) -> list[float]:
        """birder's ``stochastic_depth_rates``: linear from 0 to ``drop_path_rate`` (or constant)."""
        n = self.num_layers
        if self.drop_path_uniform or n == 1:
            return [self.drop_path_rate] * n
        return [self.drop_path_rate * i / (n - 1) for i in range(n)]

    def replace(self, **changes: Any) -> ViTConfig:
        return dataclasses.replace(self, **changes)

    # JSON ----------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["image_size"] = list(self.image_size)
        d["out_indices"] = None if self.out_indices is None else list(self.out_indices)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ViTConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise UserError(f"unknown ViTConfig field(s): {', '.join(unknown)}")
        d = dict(d)
        for key in ("image_size", "out_indices"):  # JSON lists; anything else is refused by the type check
            if isinstance(d.get(key), list):
                d[key] = tuple(d[key])
        return cls(**d)

    # birder ----------------------------------------------------------------------------------------------
    @classmethod
    def from_birder(
        cls,
        model_config: dict[str, Any],
        *,
        image_size: tuple[int, int] = (224, 224),
        num_classes: int = 0,
        in_channels: int = 3,
    ) -> ViTConfig:
        """From birder's ``model_config`` dict (the resolved ``net.config``); refuses unimplemented
        options."""
        mc = dict(model_config)
        for key, allowed in UNSUPPORTED_UNLESS.items():
            if key in mc and mc[key] not in allowed:
                raise UserError(
                    f"unsupported birder ViT option {key}={mc[key]!r}: vitreg-jax implements only "
                    f"{key} in {list(allowed)}"
                )
        for key in (*UNSUPPORTED_UNLESS, *INERT_OPTIONS):
            mc.pop(key, None)
        out_indices, depth = mc.get("out_indices"), mc.get("num_layers")
        if isinstance(out_indices, (list, tuple)):  # negative indices count from the end, as in birder
            mc["out_indices"] = tuple(out_indices)
            if _has_type(mc["out_indices"], "tuple[int, ...]") and _has_type(depth, "int") and depth > 0:
                mc["out_indices"] = tuple(int(i) % int(depth) for i in out_indices)
        names = {f.name for f in dataclasses.fields(cls)} - {"num_classes", "in_channels", "image_size"}
        unknown = sorted(set(mc) - names)
        if unknown:
            raise UserError(f"unsupported birder ViT option(s): {', '.join(unknown)}")
        missing = [
            k for k in ("patch_size", "num_layers", "num_heads", "hidden_dim", "mlp_dim") if k not in mc
        ]
        if missing:
            raise UserError(f"birder model_config lacks {', '.join(missing)}")
        return cls(**mc, num_classes=num_classes, in_channels=in_channels, image_size=tuple(image_size))

    def to_birder(self) -> dict[str, Any]:
        """birder's ``model_config`` for this architecture (size, classes and channels go in the
        signature)."""
        d = self.to_dict()
        for key in ("num_classes", "in_channels", "image_size"):
            d.pop(key)
        if d["out_indices"] is None:
            d.pop("out_indices")
        return d


def _has_type(value: Any, annotation: str) -> bool:
    """Whether ``value`` has the type a ``ViTConfig`` field annotation names (a bool is not an int here)."""
    if annotation.endswith(" | None"):
        if value is None:
            return True
        annotation = annotation.removesuffix(" | None")
    if annotation == "bool":
        return isinstance(value, bool)
    if annotation == "int":
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if annotation == "float":
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if annotation.startswith("tuple[") and annotation.endswith("]"):
        items = annotation.removeprefix("tuple[").removesuffix("]").split(", ")
        if not isinstance(value, tuple) or not all(_has_type(v, items[0]) for v in value):
            return False
        return items[-1] == "..." or len(value) == len(items)
    return True


def canonical_name(name: str) -> str:
    """birder's current registered name (``vitreg4_b16`` -> ``vit_reg4_b16``)."""
    return LEGACY_NAMES.get(name, name)


def preset(name: str, **overrides: Any) -> ViTConfig:
    """A ``ViTConfig`` by birder network name, e.g. ``preset("vit_reg4_b16")`` or the legacy
    ``vitreg4_b16``."""
    key = canonical_name(name)
    if key not in PRESETS:
        close = sorted(n for n in PRESETS if n.split("_")[1:2] == key.split("_")[1:2])[:8]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise UserError(f"unknown network {name!r}: not a birder ViT this port supports{hint}")
    return ViTConfig.from_birder({**PRESETS[key], **overrides.pop("model_config", {})}, **overrides)
