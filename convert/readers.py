"""Read and write birder weight files: ``.pt`` (torch, ``weights_only=True`` only) and ``.safetensors``.

``.safetensors`` is read and written here with numpy alone (the format is an 8-byte header length, a JSON
header and raw little-endian tensors), so it needs no torch. ``.pt`` needs torch, imported only when a ``.pt``
is touched, and is never unpickled beyond what ``torch.load(weights_only=True)`` allows: a file whose pickle
would run code is refused without running it.

Arrays keep their stored dtype (bf16 as ``ml_dtypes.bfloat16``); callers cast where they need float32.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from vitreg_jax.errors import UserError

# birder's metadata keys that .safetensors stores as JSON strings
_JSON_META = ("class_to_idx", "signature", "rgb_stats", "config", "backbone_config")
_ST_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


@dataclass
class BirderFile:
    """A birder checkpoint: its state_dict as numpy arrays and its metadata (signature, rgb_stats, ...)."""

    path: Path
    format: str  # "pt" | "safetensors"
    state: dict[str, np.ndarray]
    meta: dict[str, Any] = field(default_factory=dict)
    sha256: str = ""

    @property
    def dtypes(self) -> list[str]:
        return sorted({str(a.dtype) for a in self.state.values()})


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_file(path: Path) -> None:
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path}: is a directory, expected a birder .pt or .safetensors file")


def read_birder_file(path: str | os.PathLike[str]) -> BirderFile:
    """Read a birder ``.pt`` or ``.safetensors`` file (any other suffix is tried as ``.pt``)."""
    path = Path(path)
    _check_file(path)
    if path.suffix == ".safetensors":
        state, meta = read_safetensors(path)
        fmt = "safetensors"
    else:
        state, meta = _read_pt(path)
        fmt = "pt"
    return BirderFile(path=path, format=fmt, state=state, meta=meta, sha256=sha256_of(path))


# .pt ---------------------------------------------------------------------------------------------------
def _tensor_to_numpy(t: Any) -> np.ndarray:
    import torch

    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _read_pt(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    try:
        import torch
    except ImportError:
        raise UserError(f"{path}: reading .pt files needs torch: pip install 'vitreg-jax[torch]' "
                        "(or convert it to .safetensors)") from None
    import pickle

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)  # never a full unpickle
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: refused: not a plain weights file (its pickle asks for more than tensors "
                        f"and dicts; it was not run): {first}") from None
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: not a readable torch checkpoint (truncated or corrupted?): {first}") from None
    if isinstance(obj, dict) and isinstance(obj.get("state"), dict):
        raw_state = obj["state"]
        meta = {k: v for k, v in obj.items() if k != "state"}
    elif isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        raw_state, meta = obj, {}  # a bare state_dict
    else:
        raise UserError(f"{path}: not a birder checkpoint (expected a dict with a 'state' state_dict)")
    bad = [k for k, v in raw_state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise UserError(f"{path}: state entries that are not tensors: {', '.join(map(str, bad[:5]))}")
    state = {str(k): _tensor_to_numpy(v) for k, v in raw_state.items()}
    return state, _plain(meta)


def _plain(obj: Any) -> Any:
    """Metadata as JSON-friendly Python (tuples -> lists, str enums -> str)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, str):
        return str(obj)
    return obj


def write_pt(path: Path, state: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """A birder ``.pt``: ``torch.save({"state": state_dict, **meta})``, written atomically."""
    import torch

    def to_tensor(a: np.ndarray) -> Any:
        if a.dtype == ml_dtypes.bfloat16:
            return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(np.ascontiguousarray(a))

    payload = {"state": {k: to_tensor(v) for k, v in state.items()}, **meta}
    _atomic_write(path, lambda f: torch.save(payload, f))


# .safetensors ------------------------------------------------------------------------------------------
def read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError("file shorter than its header")
            (n,) = struct.unpack("<Q", raw)
            if n > _MAX_HEADER:
                raise ValueError(f"header length {n} is implausible")
            header = json.loads(f.read(n))
            data = memoryview(f.read())
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a readable .safetensors file: {e}") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: not a readable .safetensors file: header is not a JSON object")
    meta_raw = header.pop("__metadata__", None) or {}
    state: dict[str, np.ndarray] = {}
    for name, info in header.items():
        try:
            dtype = _ST_DTYPES[info["dtype"]]
            start, end = info["data_offsets"]
            shape = tuple(info["shape"])
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{path}: not a readable .safetensors file: bad entry for {name!r}") from None
        if end > len(data) or end - start != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
            raise UserError(f"{path}: truncated or corrupted .safetensors file (tensor {name!r} out of range)")
        state[name] = np.frombuffer(data[start:end], dtype=dtype).reshape(shape).copy()
    meta: dict[str, Any] = {}
    for k, v in meta_raw.items():
        meta[k] = json.loads(v) if k in _JSON_META else v
    return state, meta


def write_safetensors(path: Path, state: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """A ``.safetensors`` with birder's metadata keys (JSON strings, as ``birder.fs_ops.save_st``)."""
    header: dict[str, Any] = {}
    offset = 0
    arrays = []
    for name, a in state.items():
        a = np.ascontiguousarray(a)
        if a.dtype not in _ST_NAMES:
            raise UserError(f"cannot store tensor {name!r} of dtype {a.dtype} in .safetensors")
        header[name] = {"dtype": _ST_NAMES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays.append(a)
    header["__metadata__"] = {k: (json.dumps(v) if k in _JSON_META else str(v)) for k, v in meta.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep tensor data 8-byte aligned

    def write(f: Any) -> None:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for a in arrays:
            f.write(a.tobytes())

    _atomic_write(path, write)


def write_birder_file(path: str | os.PathLike[str], state: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    path = Path(path)
    if path.suffix == ".safetensors":
        write_safetensors(path, state, meta)
    elif path.suffix == ".pt":
        write_pt(path, state, meta)
    else:
        raise UserError(f"{path}: expected a .pt or .safetensors output file name")


def _atomic_write(path: Path, write: Any) -> None:
    """Write to a temporary file beside ``path``, then rename: no half-written file is ever left."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except FileNotFoundError:
        raise UserError(f"{path.parent}: no such directory") from None
    except PermissionError:
        raise UserError(f"{path.parent}: not writable") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
