"""``.safetensors`` read and written with numpy alone: an 8-byte header length, a JSON header, raw tensors.

birder's metadata keys (``signature``, ``rgb_stats``, ...) are stored as JSON strings, as
``birder.common.fs_ops.save_st`` does. bf16 tensors come back as ``ml_dtypes.bfloat16`` arrays.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from vitreg_jax.errors import UserError
from vitreg_jax.fileio import atomic_write, first_line

# birder's metadata keys that .safetensors stores as JSON strings
_JSON_META = ("class_to_idx", "signature", "rgb_stats", "config", "backbone_config")
_ST_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


def read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Each tensor is read from the file straight into the array returned (no whole-file buffer)."""
    bad = f"{path}: not a readable .safetensors file"
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError("file shorter than its header")
            (n,) = struct.unpack("<Q", raw)
            if n > _MAX_HEADER:
                raise ValueError(f"header length {n} is implausible")
            if 8 + n > os.fstat(f.fileno()).st_size:  # checked before reading: read(n) would allocate n bytes
                raise ValueError(f"header length {n} reaches past the end of the file")
            header = json.loads(f.read(n))
            if not isinstance(header, dict):
                raise TypeError("header is not a JSON object")
            data_start = 8 + n
            data_len = os.fstat(f.fileno()).st_size - data_start
            meta_raw = header.pop("__metadata__", None)
            meta_raw = {} if meta_raw is None else meta_raw
            entries = {name: _entry(bad, name, info) for name, info in header.items()}
            _check_ranges(path, entries, data_len)
            state: dict[str, np.ndarray] = {}
            for name, (dtype, shape, start, end) in entries.items():
                nbytes = end - start
                buf = np.empty(nbytes, np.uint8)
                f.seek(data_start + start)
                if f.readinto(memoryview(buf)) != nbytes:
                    raise UserError(f"{path}: truncated .safetensors file (tensor {name!r} cut short)")
                state[name] = buf.view(dtype).reshape(shape)
            if not isinstance(meta_raw, dict) or not all(isinstance(v, str) for v in meta_raw.values()):
                raise TypeError("__metadata__ is not a JSON object of strings")
            meta = {k: json.loads(v) if k in _JSON_META else v for k, v in meta_raw.items()}
    except (ValueError, TypeError, UnicodeDecodeError, RecursionError) as e:  # json: ValueError, or too deep
        raise UserError(f"{bad}: {first_line(e)}") from None
    return state, meta


def _entry(bad: str, name: str, info: Any) -> tuple[np.dtype, tuple[int, ...], int, int]:
    """(dtype, shape, start, end) of one header entry, its byte count matching its dtype and shape."""
    try:
        dtype = _ST_DTYPES[info["dtype"]]
        start, end = (_int(v) for v in info["data_offsets"])
        shape = tuple(_int(v) for v in info["shape"])
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{bad}: bad entry for {name!r}") from None
    nbytes = dtype.itemsize * int(np.prod(shape, dtype=object)) if shape else dtype.itemsize
    if min(shape, default=0) < 0 or start < 0 or end - start != nbytes:
        raise UserError(f"{bad}: bad entry for {name!r}")
    return dtype, shape, start, end


def _int(v: Any) -> int:
    if type(v) is not int:
        raise TypeError("not an integer")
    return v


def _check_ranges(path: Path, entries: dict[str, tuple[Any, Any, int, int]], data_len: int) -> None:
    """Tensors' byte ranges in range, non-overlapping and covering the data exactly (as ``safetensors``
    does)."""
    where = 0
    for name, (_, _, start, end) in sorted(entries.items(), key=lambda e: (e[1][2], e[1][3])):
        if end > data_len:
            raise UserError(
                f"{path}: truncated or corrupted .safetensors file (tensor {name!r} out of range)"
            )
        if start != where:
            what = "overlaps another tensor's bytes" if start < where else "leaves a gap before it"
            raise UserError(f"{path}: not a valid .safetensors file (tensor {name!r} {what})")
        where = end
    if where != data_len:
        raise UserError(
            f"{path}: not a valid .safetensors file ({data_len - where} bytes after the last tensor)"
        )


def write_safetensors(path: Path, state: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """A ``.safetensors`` with birder's metadata keys (JSON strings, as ``birder.fs_ops.save_st``)."""
    header: dict[str, Any] = {}
    offset = 0
    arrays = []
    for name, a in state.items():
        a = np.ascontiguousarray(a)
        if a.dtype not in _ST_NAMES:
            raise UserError(f"cannot store tensor {name!r} of dtype {a.dtype} in .safetensors")
        header[name] = {
            "dtype": _ST_NAMES[a.dtype],
            "shape": list(a.shape),
            "data_offsets": [offset, offset + a.nbytes],
        }
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

    atomic_write(path, write)
