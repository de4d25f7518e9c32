"""Read and write birder weight files: ``.pt`` and ``.safetensors``.

``.pt`` files are untrusted pickles: they are read with ``torch.load(weights_only=True)`` and nothing else, so a
file whose pickle would run code is refused without running it. torch is imported only here, only when a
``.pt`` is touched. ``.safetensors`` needs no torch (``safetensors_io``).

``read_birder_file(path, isolate=True)`` runs the ``torch.load`` in a short-lived child process that hands the
tensors back as a temporary ``.safetensors``: the caller's process never imports torch (about 510 MiB resident
for this torch build alone), which keeps ``vitreg-jax convert`` of a ``.pt`` under 3x the file size in memory.

Arrays keep their stored dtype (bf16 as ``ml_dtypes.bfloat16``); callers cast where they need float32.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from vitreg_jax.convert.safetensors_io import read_safetensors, write_safetensors
from vitreg_jax.errors import UserError
from vitreg_jax.fileio import atomic_write, first_line

# `isolate=None` reads .pt files at least this large in a child process (small ones are not worth its start-up)
ISOLATE_ABOVE_BYTES = 64 * 1024 * 1024
TORCH_HINT = "pip install 'vitreg-jax[torch]' (or convert the file to .safetensors where torch is installed)"


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


def read_birder_file(path: str | os.PathLike[str], *, isolate: bool | None = False) -> BirderFile:
    """Read a birder ``.pt`` or ``.safetensors`` file (any other suffix is tried as ``.pt``).

    ``isolate``: read a ``.pt`` in a child process (see the module docstring); same result, less memory here.
    ``None`` isolates files of ``ISOLATE_ABOVE_BYTES`` or more.
    """
    path = Path(path)
    _check_file(path)
    if isolate is None:
        isolate = path.stat().st_size >= ISOLATE_ABOVE_BYTES
    if path.suffix == ".safetensors":
        state, meta = read_safetensors(path)
        fmt = "safetensors"
    else:
        state, meta = _read_pt_isolated(path) if isolate else _read_pt(path)
        fmt = "pt"
    return BirderFile(path=path, format=fmt, state=state, meta=meta, sha256=sha256_of(path))


def _corrupt(path: Path, detail: str) -> UserError:
    return UserError(f"{path}: not a readable torch checkpoint (truncated or corrupted?): {detail}")


def _check_zip_crc(path: Path) -> None:
    """torch's zip format carries a CRC per record; torch (memory-mapping) does not check it, so we do."""
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            if not f.read(1).startswith(b"\x80"):  # neither torch's zip format nor its pre-1.6 pickle format
                raise _corrupt(path, "neither a zip archive nor a pickle")
        return
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise _corrupt(path, first_line(e)) from None
    if bad is not None:
        raise _corrupt(path, f"CRC mismatch in record {bad}")


def _load_pt(path: Path) -> Any:
    """``torch.load(weights_only=True)``: the only way a ``.pt`` is ever opened."""
    _check_zip_crc(path)
    try:
        import torch
    except ImportError:
        raise UserError(f"{path}: reading .pt files needs torch: {TORCH_HINT}") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(f"{path}: refused: its pickle asks for more than tensors and plain containers (it may "
                        f"run code; nothing was run): {first_line(e)}") from None
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, KeyError, TypeError, IndexError) as e:
        raise _corrupt(path, first_line(e)) from None


def _read_pt(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    obj = _load_pt(path)
    import torch

    if isinstance(obj, dict) and isinstance(obj.get("state"), dict):
        raw_state = obj["state"]
        meta = {k: v for k, v in obj.items() if k != "state"}
    elif isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        raw_state, meta = obj, {}  # a bare state_dict
    else:
        raise UserError(f"{path}: not a birder checkpoint (expected a dict with a 'state' state_dict)")
    bad = [str(k) for k, v in raw_state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise UserError(f"{path}: state entries that are not tensors: {', '.join(bad[:5])}")
    tensors_in_meta = _find_tensors(meta)
    if tensors_in_meta:
        raise UserError(f"{path}: not a birder checkpoint (tensors outside 'state': {', '.join(tensors_in_meta)})")
    return {str(k): _tensor_to_numpy(v) for k, v in raw_state.items()}, _plain(meta)


def _read_pt_isolated(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """``_read_pt`` in a child process, handed back through a temporary ``.safetensors`` and a json."""
    import json
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory(prefix="vitreg-pt-") as tmp:
        done = subprocess.run([sys.executable, "-m", "vitreg_jax.convert.readers", str(path), tmp],
                              capture_output=True, text=True, check=False)
        if done.returncode == 2:  # the child's UserError, already one line
            raise UserError(done.stderr.strip().splitlines()[-1])
        if done.returncode != 0:
            raise RuntimeError(f"reading {path} in a child process failed:\n{done.stderr}")
        state, _ = read_safetensors(Path(tmp) / "state.safetensors")
        meta = json.loads((Path(tmp) / "meta.json").read_text())
    return state, meta


def _child_main(argv: list[str]) -> int:
    """``python -m vitreg_jax.convert.readers SRC.pt DIR``: DIR/state.safetensors + DIR/meta.json."""
    import json
    import sys

    src, out = Path(argv[0]), Path(argv[1])
    try:
        state, meta = _read_pt(src)
        write_safetensors(out / "state.safetensors", state, {})
    except UserError as e:
        print(e, file=sys.stderr)
        return 2
    (out / "meta.json").write_text(json.dumps(meta))
    return 0


def _find_tensors(obj: Any, where: str = "") -> list[str]:
    import torch

    if isinstance(obj, torch.Tensor):
        return [where or "<root>"]
    if isinstance(obj, dict):
        return [w for k, v in obj.items() for w in _find_tensors(v, f"{where}.{k}" if where else str(k))]
    if isinstance(obj, (list, tuple)):
        return [w for i, v in enumerate(obj) for w in _find_tensors(v, f"{where}[{i}]")]
    return []


def _tensor_to_numpy(t: Any) -> np.ndarray:
    """A numpy view of the tensor's (memory-mapped) data where possible; bf16 via ``ml_dtypes``."""
    import torch

    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


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
    try:
        import torch
    except ImportError:
        raise UserError(f"{path}: writing .pt files needs torch: {TORCH_HINT}") from None

    def to_tensor(a: np.ndarray) -> Any:
        a = np.require(a, requirements="C")  # (ascontiguousarray would make 0-d arrays 1-d)
        if a.dtype == ml_dtypes.bfloat16:
            return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(a)

    payload = {"state": {k: to_tensor(v) for k, v in state.items()}, **meta}
    atomic_write(path, lambda f: torch.save(payload, f))


def write_birder_file(path: str | os.PathLike[str], state: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    path = Path(path)
    if path.suffix == ".safetensors":
        write_safetensors(path, state, meta)
    elif path.suffix == ".pt":
        write_pt(path, state, meta)
    else:
        raise UserError(f"{path}: expected a .pt or .safetensors output file name")


if __name__ == "__main__":
    import sys

    sys.exit(_child_main(sys.argv[1:]))
