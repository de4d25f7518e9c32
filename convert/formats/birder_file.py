"""Read and write birder weight files, ``.pt`` and ``.safetensors``, with numpy alone (no torch).

``.pt`` files are untrusted pickles: :mod:`vitreg_jax.convert.formats.pt_reader` understands the few records a
state dict is made of and refuses anything else before it could run;
:mod:`vitreg_jax.convert.formats.pt_writer` writes the archive ``torch.save`` writes. ``.safetensors``:
:mod:`vitreg_jax.convert.formats.safetensors_io`.

Arrays keep their stored dtype (bf16 as ``ml_dtypes.bfloat16``); callers cast where they need float32.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vitreg_jax.convert.formats.pt_reader import read_pt
from vitreg_jax.convert.formats.pt_writer import write_pt as _write_pt_to
from vitreg_jax.convert.formats.safetensors_io import read_safetensors, write_safetensors
from vitreg_jax.errors import UserError
from vitreg_jax.fileio import atomic_write


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
    if not path.is_file():  # a FIFO would block forever, /dev/zero would never end
        raise UserError(
            f"{path}: not a regular file (a FIFO, device or socket), expected a birder .pt or "
            ".safetensors file"
        )


def read_birder_file(path: str | os.PathLike[str]) -> BirderFile:
    """Read a birder ``.pt`` or ``.safetensors`` file (any other suffix is tried as ``.pt``)."""
    path = Path(path)
    _check_file(path)
    if path.suffix == ".safetensors":
        state, meta = read_safetensors(path)
        fmt = "safetensors"
    else:
        state, meta = read_pt(path)
        fmt = "pt"
    return BirderFile(path=path, format=fmt, state=state, meta=meta, sha256=sha256_of(path))


def write_pt(path: Path, state: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """A birder ``.pt``, as ``torch.save({"state": state_dict, **meta})`` writes it, written atomically."""
    atomic_write(path, lambda f: _write_pt_to(f, path.stem or "archive", state, meta))


def write_birder_file(
    path: str | os.PathLike[str], state: dict[str, np.ndarray], meta: dict[str, Any]
) -> None:
    path = Path(path)
    if path.suffix == ".safetensors":
        write_safetensors(path, state, meta)
    elif path.suffix == ".pt":
        write_pt(path, state, meta)
    else:
        raise UserError(f"{path}: expected a .pt or .safetensors output file name")
