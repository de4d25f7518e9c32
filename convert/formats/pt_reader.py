"""Read a birder ``.pt`` (``torch.save``'s zip format) without torch, safely: numpy arrays and plain metadata.

The container: ``<archive>/data.pkl`` (the pickle), ``<archive>/data/<key>`` (one record per storage),
``<archive>/byteorder`` (``little``/``big``; absent in old files, meaning little). The pickle runs through
:mod:`vitreg_jax.convert.formats._pt_pickle`, which understands a state dict and refuses anything else before
it could execute. Every number the pickle claims (a storage's element count, a tensor's offset, shape and
strides) is checked against the record's real size before any array exists, and no tensor may claim more
elements than its storage holds, so nothing allocated here is larger than the file.

Records stored uncompressed (``torch.save`` never compresses) become copy-on-write memory maps of the file,
one per record: contiguous tensors are views of it (nothing is read until used; each record's CRC is checked
once, which reads it through the page cache); strided tensors are copied out contiguously. Arrays keep their
stored dtype (bf16 as ``ml_dtypes.bfloat16``), in native byte order, C-contiguous and writeable.

The pre-1.6 non-zip format is refused: birder has always saved with ``torch.save``'s zip format.
"""

from __future__ import annotations

import re
import struct
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vitreg_jax.convert.formats._pt_format import TORCH_DTYPES, contiguous_strides
from vitreg_jax.convert.formats._pt_globals import (
    MAX_DIMS,
    Corrupt,
    Refused,
    StorageType,
    TensorRef,
    Unsupported,
)
from vitreg_jax.convert.formats._pt_pickle import unpickle
from vitreg_jax.errors import UserError
from vitreg_jax.fileio import first_line

NOT_WEIGHTS = "not a birder weights file (corrupt or not a torch checkpoint)"
DAMAGED = "a truncated or corrupted torch checkpoint"
# torch.save's pre-1.6 format starts with this number, pickled (protocol 2, LONG1)
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
_KEY = re.compile(r"[0-9]{1,18}")
_LOCAL_HEADER = struct.Struct("<4s5H3I2H")  # signature ... name length, extra length (30 bytes)
_MAX_DIM = 1 << 48  # no real tensor has a dimension (or stride, or offset) this large
_MAX_META_NODES_PER_BYTE = 4  # metadata objects visited per pickle byte (a shared-reference bomb stops here)
SUPPORTED_DTYPES = ", ".join(sorted({str(d) for d in TORCH_DTYPES.values()}))


@dataclass(frozen=True)
class _Entry:
    name: str
    offset: int  # of the data in the file
    size: int  # uncompressed
    stored: bool
    crc: int
    info: zipfile.ZipInfo


@dataclass(eq=False)
class _Storage:
    key: str
    type: StorageType
    numel: int  # elements (bytes for an untyped storage)
    entry: _Entry


# A re-zipped file's deflated records, all together, inflate to at most this many times the file's size:
# float32 weights barely deflate (normal random ones to 93 %, so they inflate past 1x); a file of many small
# records that each stay under the file's size, 600 of them inflating to 2.7 GB from 6.8 MB, is refused.
MAX_INFLATION = 2


@dataclass
class _Budget:
    """Bytes the reader may still allocate for copies (starts at the file's size)."""

    left: int

    def take(self, nbytes: int, what: str) -> None:
        if nbytes > self.left:
            raise Corrupt(f"{what} claims more data than the file holds")
        self.left -= nbytes


@dataclass
class _Archive:
    path: Path
    size: int
    zf: zipfile.ZipFile
    prefix: str
    entries: dict[str, _Entry]
    big_endian: bool = False
    inflate_budget: _Budget | None = None  # bytes all deflated records together may inflate to
    storages: dict[str, _Storage] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # per storage key: its elements


def read_pt(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The ``state`` tensors (in file order) and the other top-level entries of a birder ``.pt``."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(len(_LEGACY_MAGIC))
            if head == _LEGACY_MAGIC:
                raise UserError(
                    f"{path}: a torch file in the pre-1.6 (non-zip) format, which birder never wrote; "
                    "re-save it with torch.save"
                )
            try:
                zf = zipfile.ZipFile(f)
            except (
                zipfile.BadZipFile,
                zipfile.LargeZipFile,
                ValueError,
                EOFError,
                struct.error,
                OverflowError,
                UnicodeDecodeError,
                NotImplementedError,
                IndexError,
                KeyError,
            ) as e:
                if head.startswith(b"PK\x03\x04"):  # a zip archive's start, without a readable directory
                    raise UserError(f"{path}: {DAMAGED}: {first_line(e)}") from None
                raise UserError(f"{path}: {NOT_WEIGHTS}") from None
            with zf:
                return _read(_open_archive(path, size, zf))
    except (
        Corrupt,
        OSError,
        zipfile.BadZipFile,
        EOFError,
        ValueError,
        struct.error,
        OverflowError,
        UnicodeDecodeError,
        NotImplementedError,
        zlib.error,
        IndexError,
        KeyError,
    ) as e:
        raise UserError(f"{path}: {DAMAGED}: {first_line(e)}") from None
    except Refused as e:
        raise UserError(f"{path}: refused: {first_line(e)} (nothing was run)") from None


# the zip container ------------------------------------------------------------------------------------------
def _open_archive(path: Path, size: int, zf: zipfile.ZipFile) -> _Archive:
    infos = zf.infolist()
    names = [i.filename for i in infos]
    if len(set(names)) != len(names):
        raise Corrupt("two zip records with the same name")
    pickles = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
    if len(pickles) != 1:
        raise Corrupt("no data.pkl record" if not pickles else "more than one data.pkl record")
    prefix = pickles[0][: -len("data.pkl")]
    entries = {i.filename: _locate(zf, i, size) for i in infos if i.filename.startswith(prefix)}
    arc = _Archive(path=path, size=size, zf=zf, prefix=prefix, entries=entries)
    order = entries.get(prefix + "byteorder")
    if order is not None:
        value = bytes(_entry_bytes(arc, order, limit=16))
        if value not in (b"little", b"big"):
            raise Corrupt(f"byteorder record {value[:16]!r}")
        arc.big_endian = value == b"big"
    return arc


def _locate(zf: zipfile.ZipFile, info: zipfile.ZipInfo, size: int) -> _Entry:
    """Where the record's data starts (after its local header), checked against the file's size."""
    if info.flag_bits & 0x1:
        raise Corrupt(f"{info.filename} is encrypted")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise Corrupt(f"{info.filename} uses zip compression method {info.compress_type}")
    fp = zf.fp
    assert fp is not None
    fp.seek(info.header_offset)
    raw = fp.read(_LOCAL_HEADER.size)
    if len(raw) != _LOCAL_HEADER.size:
        raise Corrupt(f"{info.filename}: local header past the end of the file")
    fields = _LOCAL_HEADER.unpack(raw)
    if fields[0] != b"PK\x03\x04":
        raise Corrupt(f"{info.filename}: bad local header")
    name_len, extra_len = fields[-2], fields[-1]
    if fp.read(name_len) != info.orig_filename.encode("utf-8" if info.flag_bits & 0x800 else "cp437"):
        raise Corrupt(f"{info.filename}: local header names another record")
    offset = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
    stored = info.compress_type == zipfile.ZIP_STORED
    if stored and info.compress_size != info.file_size:
        raise Corrupt(f"{info.filename}: stored record with two sizes")
    if offset + info.compress_size > size:
        raise Corrupt(f"{info.filename} reaches past the end of the file (truncated?)")
    if not stored and info.file_size > size:
        raise Corrupt(
            f"{info.filename}: a compressed record larger than the whole file (torch.save never "
            "compresses; re-save the file with torch.save)"
        )
    return _Entry(info.filename, offset, info.file_size, stored, info.CRC, info)


def _entry_bytes(arc: _Archive, entry: _Entry, limit: int | None = None) -> np.ndarray:
    """The record's bytes (uint8), CRC-checked: a copy-on-write map of the file when stored, else inflated."""
    if limit is not None and entry.size > limit:
        raise Corrupt(f"{entry.name} is implausibly large")
    if entry.stored:
        if not entry.size:
            data = np.zeros(0, np.uint8)
        else:  # one map per record: it is unmapped once its last tensor is dropped (convert drops as it goes)
            mm = np.memmap(arc.path, dtype=np.uint8, mode="c", offset=entry.offset, shape=(entry.size,))
            data = mm.view(np.ndarray)
        crc = zlib.crc32(data)
        if crc != entry.crc:
            raise Corrupt(f"CRC mismatch in record {entry.name}")
        return data
    if arc.inflate_budget is None:
        arc.inflate_budget = _Budget(MAX_INFLATION * arc.size)
    arc.inflate_budget.take(entry.size, f"{entry.name} (deflated; with the records inflated before it)")
    chunks, total = [], 0
    with arc.zf.open(entry.info) as r:  # zipfile checks the CRC and the size at the end
        while chunk := r.read(1 << 20):
            total += len(chunk)
            if total > entry.size:
                raise Corrupt(f"{entry.name} decompresses past its size")
            chunks.append(chunk)
    return np.frombuffer(bytearray(b"".join(chunks)), np.uint8)


# the pickle -------------------------------------------------------------------------------------------------
def _persistent_load(arc: _Archive, pid: Any) -> _Storage:
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
        raise Refused(f"its pickle names a persistent object {_short(pid)} that is not a storage")
    _, kind, key, _location, numel = pid
    if not isinstance(key, str) or not _KEY.fullmatch(key) or arc.prefix + "data/" + key not in arc.entries:
        raise Refused(f"its pickle names a storage {_short(key)} outside the archive")
    if not isinstance(kind, StorageType) or type(numel) is not int or numel < 0:
        raise Corrupt(f"storage {key}: malformed persistent id")
    if key in arc.storages:
        seen = arc.storages[key]
        if seen.type.name != kind.name or seen.numel != numel:
            raise Corrupt(f"storage {key} is named with two types or sizes")
        return seen
    entry = arc.entries[arc.prefix + "data/" + key]
    itemsize = kind.dtype.itemsize if kind.dtype is not None and kind.refused is None else 1
    if kind.refused is None and numel * itemsize != entry.size:  # torch.load requires them equal too
        raise Corrupt(f"storage {key} claims {numel * itemsize} bytes; its record holds {entry.size}")
    arc.storages[key] = _Storage(key, kind, numel, entry)
    return arc.storages[key]


def _short(obj: Any) -> str:
    text = repr(obj)
    return text if len(text) <= 60 else text[:57] + "..."


def _read(arc: _Archive) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    pkl = arc.entries[arc.prefix + "data.pkl"]
    data = bytes(_entry_bytes(arc, pkl))
    obj = unpickle(data, lambda pid: _persistent_load(arc, pid))
    raw_state, meta = _split_record(obj, arc.path)
    budget = _Budget(arc.size)
    state = {}
    for key, value in raw_state.items():
        if isinstance(value, Unsupported):
            raise UserError(
                f"{arc.path}: tensor {key!r} has {value.what} ({value.dtype_name or 'unknown dtype'}), "
                "which vitreg-jax does not carry"
            )
        if value.dtype is None:
            raise UserError(
                f"{arc.path}: tensor {key!r} is {value.dtype_name}, which vitreg-jax does not carry "
                f"(it reads {SUPPORTED_DTYPES})"
            )
        state[str(key)] = _array(arc, str(key), value, budget)
    nodes = [_MAX_META_NODES_PER_BYTE * len(data) + 1000]
    return state, {str(k): _plain(v, nodes, str(k), arc.path) for k, v in meta.items()}


def _split_record(obj: Any, path: Path) -> tuple[dict[Any, Any], dict[Any, Any]]:
    tensors = (TensorRef, Unsupported)
    if isinstance(obj, dict) and isinstance(obj.get("state"), dict):
        raw_state, meta = obj["state"], {k: v for k, v in obj.items() if k != "state"}
    elif isinstance(obj, dict) and obj and all(isinstance(v, tensors) for v in obj.values()):
        raw_state, meta = obj, {}  # a bare state_dict
    else:
        raise UserError(f"{path}: not a birder checkpoint (expected a dict with a 'state' state_dict)")
    bad = [str(k) for k, v in raw_state.items() if not isinstance(v, tensors)]
    if bad:
        raise UserError(f"{path}: state entries that are not tensors: {', '.join(bad[:5])}")
    return raw_state, meta


def _plain(obj: Any, nodes: list[int], where: str, path: Path, depth: int = 0) -> Any:
    """Metadata as plain Python (tuples -> lists, OrderedDict -> dict); a tensor here is refused."""
    nodes[0] -= 1
    if nodes[0] < 0 or depth > 100:
        raise Corrupt("metadata nested too deeply or too many times")
    if isinstance(obj, TensorRef | Unsupported):
        raise UserError(f"{path}: not a birder checkpoint (a tensor outside 'state': {where})")
    if isinstance(obj, dict):
        return {str(k): _plain(v, nodes, f"{where}.{k}", path, depth + 1) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v, nodes, f"{where}[{i}]", path, depth + 1) for i, v in enumerate(obj)]
    if isinstance(obj, set | frozenset) and all(_scalar(v) for v in obj):
        return set(obj)
    if _scalar(obj):
        return obj
    raise UserError(f"{path}: not a birder checkpoint (metadata {where} is a {type(obj).__name__})")


def _scalar(obj: Any) -> bool:
    return obj is None or isinstance(obj, bool | int | float | str | bytes | bytearray)


# tensors ----------------------------------------------------------------------------------------------------
def _ints(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple | list) or len(value) > MAX_DIMS:
        raise Corrupt(f"{what} is not a tuple of at most {MAX_DIMS} integers")
    if not all(type(v) is int and v >= 0 for v in value):
        raise Corrupt(f"{what} holds something other than non-negative integers")
    if any(v >= _MAX_DIM for v in value):
        raise Corrupt(f"{what} is implausibly large")
    return tuple(value)


def _elements(arc: _Archive, storage: _Storage, dtype: np.dtype, name: str) -> np.ndarray:
    """The storage's elements as a 1-D array of ``dtype`` (native byte order)."""
    if storage.key not in arc.arrays:
        nbytes = storage.numel * (dtype.itemsize if storage.type.dtype is not None else 1)
        if nbytes % dtype.itemsize:
            raise Corrupt(f"tensor {name!r}: storage of {nbytes} bytes holds no whole number of {dtype}")
        raw = _entry_bytes(arc, storage.entry)[:nbytes]
        if arc.big_endian and dtype.itemsize > 1:
            raw = raw.copy().view(f">u{dtype.itemsize}").byteswap().view(np.uint8)
        arc.arrays[storage.key] = raw.view(dtype)
    elems = arc.arrays[storage.key]
    if elems.dtype != dtype:
        raise Corrupt(f"tensor {name!r}: storage {storage.key} is shared with a tensor of another dtype")
    return elems


def _array(arc: _Archive, name: str, t: TensorRef, budget: _Budget) -> np.ndarray:
    storage = t.storage
    if not isinstance(storage, _Storage):
        raise Corrupt(f"tensor {name!r} has no storage record")
    dtype = t.dtype
    assert dtype is not None
    if storage.type.dtype is not None and storage.type.dtype != dtype:
        raise Corrupt(f"tensor {name!r}: dtype {dtype} over a {storage.type.name}")
    shape, stride = _ints(t.shape, f"tensor {name!r}'s shape"), _ints(t.stride, f"tensor {name!r}'s stride")
    if len(shape) != len(stride) or type(t.offset) is not int or t.offset < 0:
        raise Corrupt(f"tensor {name!r}: malformed shape, stride or offset")
    numel = int(np.prod(shape, dtype=object)) if shape else 1
    elems = _elements(arc, storage, dtype, name)
    if numel == 0:
        return np.zeros(shape, dtype)
    last = t.offset + sum((n - 1) * s for n, s in zip(shape, stride, strict=True))
    if numel > len(elems) or last >= len(elems):
        raise Corrupt(f"tensor {name!r} reaches past its storage ({len(elems)} elements)")
    if all(s == c for n, s, c in zip(shape, stride, contiguous_strides(shape), strict=True) if n > 1):
        return elems[t.offset : t.offset + numel].reshape(shape)
    budget.take(numel * dtype.itemsize, f"tensor {name!r}")
    view = np.lib.stride_tricks.as_strided(
        elems[t.offset :], shape, [s * dtype.itemsize for s in stride], writeable=False
    )
    return np.ascontiguousarray(view)
