"""Files birder writes itself, for the converter's tests: tiny birder networks saved by ``fs_ops`` (``.pt``,
``.json``, ``.safetensors``), the same state in the legacy key layouts, hand-made ``.pt`` files, files whose
pickle would run code (``evil_files``) and damaged files (``damaged_files``)."""

from __future__ import annotations

import builtins
import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest

from tests.support.tiny_models import SIZE, TINY_BIRDER
from vitreg_jax.convert import mapping
from vitreg_jax.convert.standin import birder_models_dir
from vitreg_jax.data.rgb_stats import RGB_STATS

torch = pytest.importorskip("torch")
pytest.importorskip("birder")
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)

RGB = RGB_STATS["birder"]
DEPTH = TINY_BIRDER["num_layers"]


# birder-made reference files -------------------------------------------------------------------------------
def signature(size: tuple[int, int] = SIZE, num_classes: int = 0) -> dict[str, Any]:
    return {"inputs": [{"data_shape": [0, 3, *size]}], "outputs": [{"data_shape": [0, num_classes]}]}


def birder_net(
    name: str = "vit_reg4_b16",
    config: dict[str, Any] | None = TINY_BIRDER,
    size: tuple[int, int] = SIZE,
    num_classes: int = 0,
    seed: int = 0,
) -> Any:
    from birder.model_registry import registry

    torch.manual_seed(seed)
    return registry.net_factory(name, num_classes, 3, config=config, size=size).eval()


def birder_save(
    net: Any,
    folder: Path,
    name: str,
    *,
    external_config: dict[str, Any] | None = None,
    class_to_idx: dict[str, int] | None = None,
    size: tuple[int, int] = SIZE,
) -> tuple[Path, Path]:
    """(.pt, .json) exactly as birder's training scripts write them (epoch 1)."""
    from birder.common import fs_ops

    folder.mkdir(parents=True, exist_ok=True)
    sig = signature(size, getattr(net, "num_classes", 0))
    with birder_models_dir(folder):
        fs_ops.checkpoint_model(
            name,
            1,
            net,
            sig,
            class_to_idx or {},
            RGB,
            None,
            None,
            None,
            None,
            external_config=external_config,
        )
        fs_ops.write_config(name, net, sig, RGB)
    return folder / f"{name}_1.pt", folder / f"{name}.json"


def birder_save_st(
    net: Any, path: Path, *, size: tuple[int, int] = SIZE, external_config: dict[str, Any] | None = None
) -> Path:
    from birder.common import fs_ops

    fs_ops.save_st(
        net, str(path), net.task, {}, signature(size, net.num_classes), RGB, external_config=external_config
    )
    return path


def state_tensors(net: Any) -> dict[str, Any]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def legacy_state(state: dict[str, Any], *, oldest: bool = False, depth: int = DEPTH) -> dict[str, Any]:
    """Today's keys renamed to the pre-0.4 layout (ln1/self_attention/ln2); ``oldest`` also moves the final
    norm into ``encoder.block.<depth>`` as the Sep-2024 code kept it."""
    back = {v: k for k, v in mapping.LEGACY_RENAMES.items()}
    out = {}
    for key, value in state.items():
        parts = key.split(".", 3)
        if key.startswith("encoder.block.") and parts[3] in back:
            key = f"encoder.block.{parts[2]}.{back[parts[3]]}"
        elif oldest and key in ("norm.weight", "norm.bias"):
            key = f"encoder.block.{depth}.{key.split('.')[1]}"
        out[key] = value
    return out


def save_pt(path: Path, state: dict[str, Any], *, birder_version: str = "v0.0.5a90", **meta: Any) -> Path:
    """A birder-style .pt (torch.save of {"state": ..., metadata}); metadata defaults to birder's keys."""
    payload = {
        "state": state,
        "birder_version": birder_version,
        "task": "image_classification",
        "signature": signature(),
        "class_to_idx": {},
        "rgb_stats": RGB,
    }
    payload.update(meta)
    torch.save({k: v for k, v in payload.items() if v is not None}, path)
    return path


def nhwc_input(size: tuple[int, int] = SIZE, batch: int = 2, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, *size, 3), dtype=np.float32)


def birder_embedding(net: Any, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return net.embedding(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).numpy()


def to_numpy(t: Any) -> np.ndarray:
    t = t.detach().contiguous()
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16) if t.dtype == torch.bfloat16 else t.numpy()


class Evil:
    """Unpickling this opens (creates) ``marker`` for writing: the proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (builtins.open, (self.marker, "w"))


class EvilTorch:
    """A payload behind a torch global (torch.save writes ``marker``): the torch fallback must refuse it."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (torch.save, ({}, self.marker))


@dataclass
class Tiny:
    net: Any
    pt: Path  # birder-saved, with its external config (num_heads etc.) in the file
    pt_bare_meta: Path  # birder-saved without an external config: only shapes, signature, rgb_stats
    json: Path
    st: Path


# unsafe and damaged files ----------------------------------------------------------------------------------
def evil_files(folder: Path, state: dict[str, Any], marker: Path) -> dict[str, Path]:
    """Valid torch zip files whose pickle would create ``marker`` if it were fully unpickled."""
    folder.mkdir(exist_ok=True)
    return {
        "payload in the metadata": save_pt(folder / "meta.pt", state, rgb_stats=Evil(marker)),
        "payload instead of a tensor": save_pt(folder / "tensor.pt", {**state, "norm.weight": Evil(marker)}),
        "payload as the whole file": _torch_save(folder / "whole.pt", Evil(marker)),
        "payload behind a torch global": save_pt(folder / "torch.pt", state, rgb_stats=EvilTorch(marker)),
    }


def _torch_save(path: Path, obj: Any) -> Path:
    torch.save(obj, path)
    return path


def damaged_files(folder: Path, good_pt: Path, good_st: Path) -> dict[str, Path]:
    folder.mkdir(exist_ok=True)
    data = good_pt.read_bytes()
    out = {}
    out["truncated .pt"] = folder / "truncated.pt"
    out["truncated .pt"].write_bytes(data[: len(data) // 2])
    flipped = bytearray(data)
    with zipfile.ZipFile(good_pt) as zf:
        info = zf.getinfo(next(n for n in zf.namelist() if n.endswith("/data/3")))
    local = data[info.header_offset : info.header_offset + 30]  # the local header's own name/extra lengths
    name_len, extra_len = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
    offset = info.header_offset + 30 + name_len + extra_len + 5  # a byte inside the tensor's data
    flipped[offset] ^= 0xFF
    out["corrupted byte in a tensor"] = folder / "flipped.pt"
    out["corrupted byte in a tensor"].write_bytes(bytes(flipped))
    out["random bytes"] = folder / "random.pt"
    out["random bytes"].write_bytes(np.random.default_rng(0).bytes(4096))
    out["empty file"] = folder / "empty.pt"
    out["empty file"].write_bytes(b"")
    out["zip without data.pkl"] = folder / "other.pt"
    with zipfile.ZipFile(out["zip without data.pkl"], "w") as zf:
        zf.writestr("hello.txt", "not a checkpoint")
    st = good_st.read_bytes()
    out["truncated .safetensors"] = folder / "truncated.safetensors"
    out["truncated .safetensors"].write_bytes(st[: len(st) - 1000])
    out["garbage .safetensors header"] = folder / "header.safetensors"
    out["garbage .safetensors header"].write_bytes((40).to_bytes(8, "little") + b"{not json" + b" " * 40)
    out["a pickle that is not a checkpoint"] = _torch_save(folder / "list.pt", [1, 2, 3])
    return out
