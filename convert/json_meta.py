"""birder file metadata made JSON-safe for a checkpoint's ``metadata.json``, every change reported.

A birder ``.pt`` may carry any picklable extra top-level entries beside ``state`` (bytes, sets, arrays, ...).
What JSON can hold is kept as it is: str, int, float, bool, None, and lists and dicts of them (tuples become
lists and non-string dict keys strings, as ``json`` itself would write them). The rest is changed, and each
change is one entry of the returned notes:

- sets and frozensets become lists (sorted when their items sort);
- numpy scalars become the Python number; non-finite floats (not valid JSON) become strings;
- bytes and arrays are dropped (binary data does not belong in a readable metadata file);
- any other object becomes its ``repr`` (at most ``MAX_REPR`` characters).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["MAX_REPR", "json_safe"]

MAX_REPR = 200
_DROP = object()


def json_safe(value: Any, where: str = "") -> tuple[Any, list[str]]:
    """(a JSON-serialisable copy of ``value``, one note per change, naming the entry by its dotted path)."""
    notes: list[str] = []
    return _safe(value, where, notes), notes


def _name(where: str) -> str:
    return where or "(top level)"


def _safe(value: Any, where: str, notes: list[str]) -> Any:
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        notes.append(f"{_name(where)}: {value} written as the string {str(value)!r} (not valid JSON)")
        return str(value)
    if isinstance(value, np.generic) and not isinstance(value, (np.bytes_, np.void)):
        return _safe(value.item(), where, notes)
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                if not isinstance(key, (int, float, bool)) and key is not None:
                    notes.append(f"{_name(where)}: key {key!r:.{MAX_REPR}} written as a string")
                key = str(key)
            safe = _safe(item, f"{where}.{key}" if where else key, notes)
            if safe is not _DROP:
                out[key] = safe
        return out
    if isinstance(value, (list, tuple)):
        items = (_safe(item, f"{where}[{i}]", notes) for i, item in enumerate(value))
        return [item for item in items if item is not _DROP]
    if isinstance(value, (set, frozenset)):
        try:
            ordered = sorted(value)
        except TypeError:
            ordered = sorted(value, key=repr)
        notes.append(f"{_name(where)}: {type(value).__name__} of {len(value)} written as a list")
        return _safe(ordered, where, notes)
    if isinstance(value, (bytes, bytearray, memoryview)):
        notes.append(
            f"{_name(where)}: {type(value).__name__} ({len(value)} bytes) dropped (binary, not JSON)"
        )
        return _DROP
    if isinstance(value, np.ndarray):
        notes.append(f"{_name(where)}: array {value.dtype}{list(value.shape)} dropped (not JSON)")
        return _DROP
    text = repr(value)[:MAX_REPR]
    notes.append(f"{_name(where)}: {type(value).__name__} written as its repr (not JSON)")
    return text
