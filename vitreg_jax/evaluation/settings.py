"""The settings of evaluation and their rules, in one module that imports nothing heavy: the library checks
them with these functions and the commands' ``--help`` shows these defaults (without importing JAX). The
two-class rule lives with the labelled folders (:func:`vitreg_jax.data.labelled.check_two_classes`).

DINO's weighted k-NN: ``k = 20`` neighbours, votes ``exp(similarity / 0.07)``.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable

from vitreg_jax.errors import UserError

DEFAULT_K = 20
DEFAULT_TEMPERATURE = 0.07
# neighbours per query of the `knn` table
DEFAULT_NEIGHBOURS = 10
# index rows per device step of the exact search
DEFAULT_INDEX_BLOCK = 16384


def check_k(
    k: object, available: int | None = None, *, name: str = "k", what: str = "training embeddings"
) -> None:
    """``k`` is a positive integer, and at most ``available`` (the rows it is drawn from) when given."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise UserError(f"{name} must be a positive integer, got {k!r}")
    if available is not None and k > available:
        raise UserError(f"{name} {k} is more than the {available} {what}")


def check_temperature(temperature: object, *, name: str = "temperature") -> None:
    """A k-NN vote temperature is a positive number (None means unweighted votes)."""
    if temperature is not None and not (isinstance(temperature, numbers.Real) and temperature > 0):
        raise UserError(f"{name} must be positive, got {temperature!r}")


def check_same_classes(train: Iterable[str], val: Iterable[str]) -> None:
    """Train and val name the same classes; the error names the classes found on one side only."""
    only_train = sorted(set(train) - set(val))
    only_val = sorted(set(val) - set(train))
    if only_train or only_val:
        parts = [
            f"only in train: {_names(only_train)}" if only_train else "",
            f"only in val: {_names(only_val)}" if only_val else "",
        ]
        raise UserError("train and val have different classes (" + "; ".join(p for p in parts if p) + ")")


def _names(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
