"""The globals a ``torch.save`` pickle of a state dict may name, and the inert records they become.

:func:`resolve_global` maps ``GLOBAL module name`` to one of our own functions (:class:`Allowed`: the tensor
rebuild functions, which return :class:`TensorRef` records, ``OrderedDict()``, ``set(...)``, ``torch.Size``,
``_codecs.encode(s, "latin1")``) or to plain data (a storage class, a torch dtype, a layout name); any other
name is :class:`Refused`, and nothing is ever imported. Tensors we do not carry (sparse, quantized, nested)
become :class:`Unsupported` records, refused by the reader once their key is known. Used by
:mod:`vitreg_jax.convert.formats._pt_pickle`.
"""

from __future__ import annotations

import codecs
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from vitreg_jax.convert.formats._pt_format import (
    REFUSED_DTYPES,
    REFUSED_STORAGES,
    STORAGE_DTYPES,
    TORCH_DTYPES,
)

MAX_DIMS = 64  # torch's own limit on a tensor's rank


class Refused(Exception):
    """The pickle asks for something a weights file never needs (nothing was run)."""


class Corrupt(Exception):
    """The bytes are not a well-formed pickle of a state dict."""


@dataclass(frozen=True, eq=False)
class StorageType:
    """``torch.<X>Storage`` named in a persistent id: the element dtype (``None``: untyped bytes)."""

    name: str
    dtype: np.dtype | None
    refused: str | None = None  # the dtype's name when vitreg-jax does not carry it


@dataclass(frozen=True, eq=False)
class TorchDType:
    """``torch.<dtype>`` (argument of ``_rebuild_tensor_v3``)."""

    name: str
    dtype: np.dtype | None  # None: refused


@dataclass(frozen=True, eq=False)
class Inert:
    """A name that is only data here (a layout, a quantisation scheme, ``torch.Size``'s arguments)."""

    name: str


@dataclass(eq=False)
class TensorRef:
    """A tensor as the pickle describes it; ``storage`` is what ``persistent_load`` returned."""

    storage: Any
    offset: Any
    shape: Any
    stride: Any
    dtype: np.dtype | None  # None: refused, see dtype_name
    dtype_name: str


@dataclass(eq=False)
class Unsupported:
    """A tensor we do not carry (sparse, quantised, nested ...): refused by name once its key is known."""

    what: str
    dtype_name: str


@dataclass(frozen=True, eq=False)
class Allowed:
    """A global that REDUCE may call: one of ours, never the object the name means elsewhere."""

    name: str
    fn: Callable[..., Any]


def _storage_dtype(storage: Any) -> tuple[np.dtype | None, str]:
    kind = getattr(storage, "type", None)
    if not isinstance(kind, StorageType):
        raise Corrupt("a tensor whose storage is not a storage record")
    return kind.dtype, kind.refused or (str(kind.dtype) if kind.dtype is not None else "untyped")


def _rebuild_v2(
    storage: Any, offset: Any, shape: Any, stride: Any, requires_grad: Any, hooks: Any, metadata: Any = None
) -> TensorRef:
    dtype, name = _storage_dtype(storage)
    if dtype is None and name == "untyped":
        raise Corrupt("_rebuild_tensor_v2 over an untyped storage")
    return TensorRef(storage, offset, shape, stride, dtype, name)


def _rebuild_v3(
    storage: Any,
    offset: Any,
    shape: Any,
    stride: Any,
    requires_grad: Any,
    hooks: Any,
    dtype: Any,
    metadata: Any = None,
) -> TensorRef:
    _storage_dtype(storage)
    if not isinstance(dtype, TorchDType):
        raise Corrupt("_rebuild_tensor_v3 without a torch dtype")
    return TensorRef(storage, offset, shape, stride, dtype.dtype, dtype.name)


def _rebuild_parameter(data: Any, requires_grad: Any, hooks: Any) -> Any:
    if not isinstance(data, TensorRef | Unsupported):
        raise Corrupt("_rebuild_parameter of something that is not a tensor")
    return data


def _unsupported(what: str) -> Callable[..., Unsupported]:
    def rebuild(*args: Any) -> Unsupported:
        return Unsupported(what, _first_dtype_name(args, 3))

    return rebuild


def _sparse(layout: Any, parts: Any = ()) -> Unsupported:
    """``_rebuild_sparse_tensor(layout, (indices..., values, size, ...))``: named by its values' dtype."""
    values = [p for p in parts if isinstance(p, TensorRef)] if isinstance(parts, tuple | list) else []
    return Unsupported("a sparse layout", values[-1].dtype_name if values else "")


def _first_dtype_name(obj: Any, depth: int) -> str:
    if isinstance(obj, TensorRef | Unsupported):
        return obj.dtype_name
    if isinstance(obj, StorageType | TorchDType):
        return obj.refused if isinstance(obj, StorageType) and obj.refused else obj.name
    if depth > 0 and isinstance(obj, tuple | list):
        for item in obj:
            name = _first_dtype_name(item, depth - 1)
            if name:
                return name
    if hasattr(obj, "type"):
        return _first_dtype_name(obj.type, 0)
    return ""


def _ordered_dict(*args: Any) -> OrderedDict[Any, Any]:
    if args:
        raise Refused("OrderedDict called with arguments")
    return OrderedDict()


def _set(items: Any = ()) -> set[Any]:
    if not isinstance(items, list | tuple):
        raise Corrupt("set() of something that is not a list")
    return set(items)


def _frozenset(items: Any = ()) -> frozenset[Any]:
    return frozenset(_set(items))


def _encode(text: Any, encoding: Any = "utf-8") -> bytes:
    """``_codecs.encode``: how protocol 2 spells a ``bytes`` value (``encode(str, "latin1")``) and no more."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise Refused("_codecs.encode used for something other than bytes")
    return codecs.encode(text, "latin1")


def _size(dims: Any = ()) -> tuple[Any, ...]:
    if not isinstance(dims, tuple | list):
        raise Corrupt("torch.Size of something that is not a tuple")
    return tuple(dims)


ALLOWED: dict[tuple[str, str], Callable[..., Any]] = {
    ("collections", "OrderedDict"): _ordered_dict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_sparse_tensor"): _sparse,
    ("torch._utils", "_rebuild_sparse_csr_tensor"): _sparse,
    ("torch._utils", "_rebuild_qtensor"): _unsupported("a quantized layout"),
    ("torch._utils", "_rebuild_nested_tensor"): _unsupported("a nested layout"),
    ("torch._utils", "_rebuild_meta_tensor_no_storage"): _unsupported("no data (a meta tensor)"),
    ("torch.serialization", "_get_layout"): lambda name: Inert(str(name)),
    ("torch", "Size"): _size,
    ("builtins", "set"): _set,
    ("builtins", "frozenset"): _frozenset,
    ("_codecs", "encode"): _encode,
}
_QSCHEMES = {
    "per_tensor_affine",
    "per_channel_affine",
    "per_tensor_symmetric",
    "per_channel_symmetric",
    "per_channel_affine_float_qparams",
}


def resolve_global(module: str, name: str) -> Any:
    """What a ``GLOBAL module name`` means here; any other name is refused (nothing is imported)."""
    module = "builtins" if module == "__builtin__" else module
    if (module, name) in ALLOWED:
        return Allowed(f"{module}.{name}", ALLOWED[(module, name)])
    if module == "torch" and name in STORAGE_DTYPES:
        return StorageType(name, STORAGE_DTYPES[name])
    if module == "torch" and name in REFUSED_STORAGES:
        return StorageType(name, None, REFUSED_STORAGES[name])
    if (module, name) == ("torch.storage", "UntypedStorage"):
        return StorageType(name, None)
    if module == "torch" and name in TORCH_DTYPES:
        return TorchDType(name, TORCH_DTYPES[name])
    if module == "torch" and name in REFUSED_DTYPES:
        return TorchDType(name, None)
    if module == "torch" and name in _QSCHEMES:
        return Inert(name)
    raise Refused(f"its pickle asks for the global {module}.{name}, which a weights file never needs")
