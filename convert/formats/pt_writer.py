"""Write a birder ``.pt`` without torch: the zip archive ``torch.save`` writes, record for record.

``write_pt(f, archive, state, meta)`` writes ``{"state": OrderedDict(state), **meta}`` (the top-level record
of birder's ``fs_ops.checkpoint_model``) as ``<archive>/data.pkl`` (a protocol-2 pickle naming each tensor by
``torch._utils._rebuild_tensor_v2`` over a ``torch.<T>Storage`` persistent id, as torch does), then
``.format_version``, ``.storage_alignment``, ``byteorder``, one ``data/<i>`` record per tensor, ``version``.
Records are stored uncompressed with their data aligned to 64 bytes (a padding extra field, like torch's),
so both torch (``mmap=True``) and our reader map them; zip64 end records are always written, as torch does.

The pickle is emitted opcode by opcode: Python's pickler would import torch to name its functions.
Metadata may hold ``None``, bools, ints, floats, strings, lists, tuples and dicts of those.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Mapping
from typing import Any, BinaryIO

import numpy as np

from vitreg_jax.convert.formats._pt_format import STORAGE_ALIGNMENT, STORAGE_OF_DTYPE, contiguous_strides
from vitreg_jax.errors import UserError

_U32 = 0xFFFFFFFF  # a 32-bit field saying "see the zip64 extra field"
ZIP64_FROM = 0xFFFFFFFF  # sizes and offsets from this value on go into zip64 extra fields
_PAD_ID = 0x4246  # "FB": the extra-field id torch uses for its alignment padding


class _Pickle:
    """Protocol-2 opcodes for the few kinds of value a birder record holds."""

    def __init__(self) -> None:
        self.out = io.BytesIO()

    def op(self, code: bytes, payload: bytes = b"") -> None:
        self.out.write(code + payload)

    def text(self, s: str) -> None:
        raw = s.encode("utf-8", "surrogatepass")
        self.op(b"X", struct.pack("<I", len(raw)) + raw)

    def integer(self, n: int) -> None:
        if 0 <= n < 256:
            self.op(b"K", bytes([n]))
        elif 0 <= n < 65536:
            self.op(b"M", struct.pack("<H", n))
        elif -(2**31) <= n < 2**31:
            self.op(b"J", struct.pack("<i", n))
        else:
            raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
            self.op(b"\x8a", bytes([len(raw)]) + raw)

    def global_(self, module: str, name: str) -> None:
        self.op(b"c", f"{module}\n{name}\n".encode("ascii"))

    def value(self, v: Any, where: str) -> None:
        if v is None:
            self.op(b"N")
        elif isinstance(v, bool):
            self.op(b"\x88" if v else b"\x89")
        elif isinstance(v, int):
            self.integer(v)
        elif isinstance(v, float):
            self.op(b"G", struct.pack(">d", v))
        elif isinstance(v, str):
            self.text(v)
        elif isinstance(v, tuple):
            self.op(b"(")
            for i, item in enumerate(v):
                self.value(item, f"{where}[{i}]")
            self.op(b"t")
        elif isinstance(v, list):
            self.op(b"]")
            if v:
                self.op(b"(")
                for i, item in enumerate(v):
                    self.value(item, f"{where}[{i}]")
                self.op(b"e")
        elif isinstance(v, Mapping):
            self.op(b"}")
            self.items(v, where)
        else:
            raise UserError(f"cannot write metadata {where} ({type(v).__name__}) into a .pt file")

    def items(self, d: Mapping[Any, Any], where: str) -> None:
        if d:
            self.op(b"(")
            for k, item in d.items():
                self.value(k, where)
                self.value(item, f"{where}.{k}" if where else str(k))
            self.op(b"u")

    def tensor(self, key: str, a: np.ndarray) -> None:
        """``_rebuild_tensor_v2(storage, 0, shape, stride, False, OrderedDict())`` over storage ``key``."""
        self.global_("torch._utils", "_rebuild_tensor_v2")
        self.op(b"((")
        self.text("storage")
        self.global_("torch", STORAGE_OF_DTYPE[a.dtype.newbyteorder("=")])
        self.text(key)
        self.text("cpu")
        self.integer(a.size)
        self.op(b"tQ")  # the persistent id, resolved by BINPERSID
        self.integer(0)
        self.value(tuple(a.shape), "")
        self.value(contiguous_strides(a.shape), "")
        self.op(b"\x89")  # requires_grad=False
        self.global_("collections", "OrderedDict")
        self.op(b")R")  # backward hooks: OrderedDict()
        self.op(b"tR")


def pickle_record(state: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> bytes:
    """``data.pkl`` for ``{"state": OrderedDict(state), **meta}``; tensor i's storage is record
    ``data/<i>``."""
    p = _Pickle()
    p.op(b"\x80\x02}(")
    p.text("state")
    p.global_("collections", "OrderedDict")
    p.op(b")R")
    if state:
        p.op(b"(")
        for i, (name, a) in enumerate(state.items()):
            p.text(name)
            p.tensor(str(i), a)
        p.op(b"u")
    for k, v in meta.items():
        if k == "state":
            raise UserError("metadata cannot have a 'state' entry (it is the tensors' place)")
        p.value(k, "")
        p.value(v, str(k))
    p.op(b"u.")
    return p.out.getvalue()


class _ZipWriter:
    """Stored records with 64-byte-aligned data, a central directory and zip64 end records."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.pos = 0
        self.central: list[bytes] = []

    def write(self, raw: bytes | memoryview) -> None:
        self.f.write(raw)
        self.pos += len(raw)

    def record(self, name: str, data: bytes | memoryview) -> None:
        name_raw = name.encode("utf-8")
        size, crc, offset = len(data), zlib.crc32(data), self.pos
        big = size >= ZIP64_FROM
        zip64 = struct.pack("<HHQQ", 0x0001, 16, size, size) if big else b""
        base = offset + 30 + len(name_raw) + len(zip64) + 4  # data offset with an empty padding field
        pad = b"Z" * (-base % STORAGE_ALIGNMENT)
        extra = zip64 + struct.pack("<HH", _PAD_ID, len(pad)) + pad
        small = _U32 if big else size
        self.write(
            struct.pack(
                "<4sHHHHHIIIHH",
                b"PK\x03\x04",
                45 if big else 20,
                0x800,
                0,
                0,
                0,
                crc,
                small,
                small,
                len(name_raw),
                len(extra),
            )
            + name_raw
            + extra
        )
        self.write(data)
        c_extra = (
            struct.pack("<HHQQQ", 0x0001, 24, size, size, offset) if big or offset >= ZIP64_FROM else b""
        )
        self.central.append(
            struct.pack(
                "<4sHHHHHHIIIHHHHHII",
                b"PK\x01\x02",
                45,
                45 if c_extra else 20,
                0x800,
                0,
                0,
                0,
                crc,
                _U32 if c_extra else size,
                _U32 if c_extra else size,
                len(name_raw),
                len(c_extra),
                0,
                0,
                0,
                0,
                _U32 if c_extra else offset,
            )
            + name_raw
            + c_extra
        )

    def close(self) -> None:
        start = self.pos
        for entry in self.central:
            self.write(entry)
        n, cd_size, eocd64 = len(self.central), self.pos - start, self.pos
        self.write(struct.pack("<4sQHHIIQQQQ", b"PK\x06\x06", 44, 45, 45, 0, 0, n, n, cd_size, start))
        self.write(struct.pack("<4sIQI", b"PK\x06\x07", 0, eocd64, 1))
        self.write(
            struct.pack(
                "<4sHHHHIIH",
                b"PK\x05\x06",
                0,
                0,
                min(n, 0xFFFF),
                min(n, 0xFFFF),
                cd_size if cd_size < ZIP64_FROM else _U32,
                start if start < ZIP64_FROM else _U32,
                0,
            )
        )


def write_pt(f: BinaryIO, archive: str, state: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
    """The whole ``.pt`` into the open binary file ``f``; ``archive`` names the folder inside the zip."""
    arrays = {}
    for name, a in state.items():
        a = np.require(a, requirements="C")  # (ascontiguousarray would make 0-d arrays 1-d)
        if a.dtype.newbyteorder("=") not in STORAGE_OF_DTYPE:
            raise UserError(f"cannot store tensor {name!r} of dtype {a.dtype} in a .pt file")
        arrays[name] = a.astype(a.dtype.newbyteorder("<"), copy=False)  # the file says "little"
    z = _ZipWriter(f)
    z.record(f"{archive}/data.pkl", pickle_record(arrays, meta))
    z.record(f"{archive}/.format_version", b"1")
    z.record(f"{archive}/.storage_alignment", str(STORAGE_ALIGNMENT).encode())
    z.record(f"{archive}/byteorder", b"little")
    for i, a in enumerate(arrays.values()):
        z.record(f"{archive}/data/{i}", memoryview(a.reshape(-1).view(np.uint8)))
    z.record(f"{archive}/version", b"3\n")
    z.close()
