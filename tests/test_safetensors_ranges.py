"""``.safetensors`` byte ranges: in range, non-overlapping and covering the data exactly, as the
``safetensors`` library requires. Each crafted file is also given to that library: we accept exactly the files
it accepts, with the same arrays.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from vitreg_jax.convert.formats.safetensors_io import read_safetensors
from vitreg_jax.errors import UserError

safetensors_numpy = pytest.importorskip("safetensors.numpy")


def write(path: Path, entries: dict[str, tuple[list[int], list[int]]], data: bytes) -> Path:
    """A .safetensors with F32 tensors at the given (shape, [start, end]) and ``data`` after the header."""
    header: dict[str, Any] = {
        name: {"dtype": "F32", "shape": shape, "data_offsets": offsets}
        for name, (shape, offsets) in entries.items()
    }
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


DATA = np.arange(6, dtype="<f4").tobytes()  # 24 bytes


@pytest.mark.parametrize(
    ("entries", "data", "words"),
    [
        ({"a": ([3], [0, 12]), "b": ([3], [12, 24])}, DATA, None),
        ({"b": ([3], [12, 24]), "a": ([3], [0, 12])}, DATA, None),  # header order need not be file order
        ({"a": ([3], [0, 12]), "b": ([3], [0, 12])}, DATA[:12], "overlaps"),  # two names, one range
        ({"a": ([4], [0, 16]), "b": ([3], [12, 24])}, DATA, "overlaps"),
        ({"a": ([2], [0, 8]), "b": ([3], [12, 24])}, DATA, "gap"),
        ({"a": ([3], [0, 12])}, DATA, "12 bytes after the last tensor"),
        ({"a": ([3], [0, 12]), "b": ([3], [12, 24])}, DATA[:20], "out of range"),
        ({"a": ([3], [0, 12]), "b": ([0], [12, 12]), "c": ([3], [12, 24])}, DATA, None),  # an empty tensor
    ],
)
def test_ranges_are_checked_as_safetensors_checks_them(
    tmp_path: Path, entries: dict[str, Any], data: bytes, words: str | None
) -> None:
    path = write(tmp_path / "w.safetensors", entries, data)
    try:
        theirs = safetensors_numpy.load_file(str(path))
    except Exception:  # noqa: BLE001 - the library's own error types vary by version
        theirs = None
    if words is None:
        ours, _ = read_safetensors(path)
        assert theirs is not None and set(ours) == set(theirs)
        assert all(
            ours[k].tobytes() == theirs[k].tobytes() and ours[k].shape == theirs[k].shape for k in ours
        )
    else:
        assert theirs is None
        with pytest.raises(UserError, match=words) as err:
            read_safetensors(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value)
