"""What a ``.pt`` file (``torch.save``'s zip format) holds, as names: shared by the reader and the writer.

Tensor data lives in ``<archive>/data/<key>`` records, one per storage; ``<archive>/data.pkl`` is a pickle
that rebuilds the objects, naming each storage by a persistent id
``("storage", <type>, key, location, numel)``. The type is a legacy class such as ``torch.FloatStorage``
(``numel`` counts elements) or, for dtypes without one, ``torch.storage.UntypedStorage`` (``numel`` counts
bytes) with the dtype passed to ``_rebuild_tensor_v3``.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

# legacy typed storage classes (attribute names of `torch`) -> the numpy dtype of their elements
STORAGE_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}
# typed storage classes of dtypes vitreg-jax does not carry -> the dtype's name (refused by tensor name)
REFUSED_STORAGES: dict[str, str] = {
    "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
    "ComplexHalfStorage": "complex32",
    "QInt8Storage": "qint8",
    "QUInt8Storage": "quint8",
    "QInt32Storage": "qint32",
    "QUInt4x2Storage": "quint4x2",
    "QUInt2x4Storage": "quint2x4",
}
# `torch.<dtype>` objects (passed to _rebuild_tensor_v3) -> numpy dtype; the names torch gives them
TORCH_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32),
    "float": np.dtype(np.float32),
    "float64": np.dtype(np.float64),
    "double": np.dtype(np.float64),
    "float16": np.dtype(np.float16),
    "half": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "int64": np.dtype(np.int64),
    "long": np.dtype(np.int64),
    "int32": np.dtype(np.int32),
    "int": np.dtype(np.int32),
    "int16": np.dtype(np.int16),
    "short": np.dtype(np.int16),
    "int8": np.dtype(np.int8),
    "uint8": np.dtype(np.uint8),
    "uint16": np.dtype(np.uint16),
    "uint32": np.dtype(np.uint32),
    "uint64": np.dtype(np.uint64),
    "bool": np.dtype(np.bool_),
}
# torch dtypes a file may name that we refuse (with the tensor's name) rather than treat as unknown globals
REFUSED_DTYPES: frozenset[str] = frozenset(
    {
        "float8_e4m3fn",
        "float8_e5m2",
        "float8_e4m3fnuz",
        "float8_e5m2fnuz",
        "float8_e8m0fnu",
        "float4_e2m1fn_x2",
        "complex32",
        "complex64",
        "complex128",
        "chalf",
        "cfloat",
        "cdouble",
        "qint8",
        "quint8",
        "qint32",
        "quint4x2",
        "quint2x4",
        "bits1x8",
        "bits2x4",
        "bits4x2",
        "bits8",
        "bits16",
        *(f"uint{n}" for n in range(1, 8)),
        *(f"int{n}" for n in range(1, 8)),
    }
)
# numpy dtype -> the storage class the writer names (torch.save's own choice for that dtype)
STORAGE_OF_DTYPE: dict[np.dtype, str] = {v: k for k, v in STORAGE_DTYPES.items()}

STORAGE_ALIGNMENT = 64  # torch.save aligns each record's data to 64 bytes (".storage_alignment")


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Row-major strides in elements, as torch computes them (a 0-sized dim counts as 1)."""
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))
