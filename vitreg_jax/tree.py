"""Nested <-> flat parameter trees, and the one check that a set of arrays fits a model's parameters.

nnx pure dicts key list entries by int (``encoder -> block -> 0 -> attn -> qkv -> kernel``); a flat tree keys
each array by its whole path as a tuple, ``("encoder", "block", 0, "attn", "qkv", "kernel")``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeAlias

import numpy as np

from vitreg_jax.errors import UserError

ParamPath: TypeAlias = tuple[str | int, ...]


def flatten(tree: Mapping[Any, Any], prefix: ParamPath = ()) -> dict[ParamPath, Any]:
    out: dict[ParamPath, Any] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, (*prefix, k)))
        else:
            out[(*prefix, k)] = v
    return out


def unflatten(flat: Mapping[ParamPath, Any]) -> dict[Any, Any]:
    tree: dict[Any, Any] = {}
    for path, v in flat.items():
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return tree


def int_keys(flat: Mapping[tuple[str, ...], Any]) -> dict[ParamPath, Any]:
    """String path parts that are digits back to ints (Orbax and JSON store every key as a string)."""
    return {tuple(int(p) if isinstance(p, str) and p.isdigit() else p for p in k): v for k, v in flat.items()}


def short_list(items: list[str], limit: int = 12) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def check_fit(given: Mapping[Any, Any], expected: Mapping[Any, tuple[int, ...]], what: str) -> None:
    """Refuse, listing every one, missing keys, unexpected keys and shape mismatches (one UserError line)."""
    name = (lambda k: k) if all(isinstance(k, str) for k in expected) else (lambda k: ".".join(map(str, k)))
    missing = [name(k) for k in expected if k not in given]
    extra = sorted(name(k) for k in given if k not in expected)
    wrong = [
        f"{name(k)} {tuple(np.shape(given[k]))} (expected {tuple(shape)})"
        for k, shape in expected.items()
        if k in given and tuple(np.shape(given[k])) != tuple(shape)
    ]
    problems = [
        f"{label} {len(items)} key(s): {short_list(items)}"
        if label != "shape mismatch"
        else f"{label}: {short_list(items)}"
        for label, items in (("missing", missing), ("unexpected", extra), ("shape mismatch", wrong))
        if items
    ]
    if problems:
        raise UserError(f"{what}: " + "; ".join(problems))
