"""Read and write birder weight files: ``.pt`` (torch's zip format) and ``.safetensors``, numpy only.

``.safetensors`` is read and written with numpy alone (an 8-byte header length, a JSON header and raw
little-endian tensors). ``.pt`` files in torch's zip format (every file torch >= 1.6 writes, so every birder
file) are read without torch too: the zip's ``data.pkl`` goes through an unpickler that knows only the few
names a plain state dict needs (``collections.OrderedDict``, ``torch._utils._rebuild_tensor_v2``,
``torch._utils._rebuild_parameter`` and the typed storages) and refuses every other global before anything
is called, as ``torch.load(weights_only=True)`` does; tensor data is then read straight from the archive
(CRC-checked) into the arrays that are returned, with no intermediate copy. Files this reader does not
understand (torch's pre-1.6 format, tensors of other torch types) go to ``torch.load(weights_only=True)``
when torch is installed. A file whose pickle would run code is refused without running it.

Arrays keep their stored dtype (bf16 as ``ml_dtypes.bfloat16``); callers cast where they need float32.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import struct
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import ml_dtypes
import numpy as np

from vitreg_jax.errors import UserError

# birder's metadata keys that .safetensors stores as JSON strings
_JSON_META = ("class_to_idx", "signature", "rgb_stats", "config", "backbone_config")
_ST_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


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


def read_birder_file(path: str | os.PathLike[str]) -> BirderFile:
    """Read a birder ``.pt`` or ``.safetensors`` file (any other suffix is tried as ``.pt``)."""
    path = Path(path)
    _check_file(path)
    if path.suffix == ".safetensors":
        state, meta = read_safetensors(path)
        fmt = "safetensors"
    else:
        state, meta = _read_pt(path)
        fmt = "pt"
    return BirderFile(path=path, format=fmt, state=state, meta=meta, sha256=sha256_of(path))


# .pt ---------------------------------------------------------------------------------------------------
# torch's typed storages as they appear in a pickle ("torch FloatStorage") -> numpy dtype
_PT_STORAGES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype("<f4"), "DoubleStorage": np.dtype("<f8"), "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16), "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"), "ShortStorage": np.dtype("<i2"), "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"), "BoolStorage": np.dtype("?"),
}
_MAX_PICKLE = 256 * 1024 * 1024
_ZIP_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, ..., file name length, extra field length


class _Refused(Exception):
    """The pickle asks for a global that a weights file never needs (possibly code): nothing was called."""


class _NeedsTorch(Exception):
    """A torch construct this reader does not implement; ``torch.load(weights_only=True)`` decides."""


class _NoState:
    """BUILD on one of these would let a pickle overwrite fields after they were checked: refuse it."""

    def __setstate__(self, state: Any) -> None:
        raise ValueError(f"unexpected state for {type(self).__name__}")


@dataclass(frozen=True)
class _StorageType(_NoState):
    name: str

    @property
    def dtype(self) -> np.dtype:
        return _PT_STORAGES[self.name]


@dataclass
class _Storage(_NoState):
    key: str
    dtype: np.dtype
    numel: int


@dataclass
class _Tensor(_NoState):
    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


class _StateDict(dict):  # stands in for collections.OrderedDict (dicts keep insertion order)
    def __setstate__(self, state: Any) -> None:  # BUILD: torch stores the state_dict's `_metadata` here
        self._pickled_state = state


def _ints(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(type(v) is int and v >= 0 for v in value):
        raise ValueError(f"bad tensor {what} {value!r}")
    return tuple(value)


def _rebuild_tensor_v2(storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any = False,
                       backward_hooks: Any = None, metadata: Any = None) -> _Tensor:
    if not isinstance(storage, _Storage) or type(storage_offset) is not int or storage_offset < 0:
        raise ValueError("bad tensor record")
    shape, strides = _ints(size, "size"), _ints(stride, "stride")
    if len(shape) != len(strides):
        raise ValueError("tensor size and stride differ in length")
    if shape and min(shape) > 0:
        last = storage_offset + sum((n - 1) * s for n, s in zip(shape, strides))
        if last >= storage.numel:
            raise ValueError(f"tensor reaches past its storage ({last} >= {storage.numel})")
    return _Tensor(storage, storage_offset, shape, strides)


def _rebuild_parameter(data: Any, requires_grad: Any = False, backward_hooks: Any = None) -> _Tensor:
    if not isinstance(data, _Tensor):
        raise TypeError("bad parameter record")
    return data


class _WeightsUnpickler(pickle.Unpickler):
    """Knows only what a plain state dict needs; every other global is refused before it is looked up."""

    _ALLOWED: ClassVar[dict[tuple[str, str], Any]] = {
        ("collections", "OrderedDict"): _StateDict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    }

    def __init__(self, data: bytes) -> None:
        import io

        super().__init__(io.BytesIO(data))
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        found = self._ALLOWED.get((module, name))
        if found is not None:
            return found
        if module == "torch" and name in _PT_STORAGES:
            return _StorageType(name)
        if module == "torch" or module.startswith("torch."):
            raise _NeedsTorch(f"{module}.{name}")
        raise _Refused(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and type(pid[4]) is int and pid[4] >= 0):
            raise ValueError(f"unexpected persistent id {pid!r:.80}")
        key = str(pid[2])
        storage = self.storages.setdefault(key, _Storage(key, pid[1].dtype, pid[4]))
        if storage.dtype != pid[1].dtype or storage.numel != pid[4]:
            raise ValueError(f"storage {key} is referenced with two different types")
        return storage


def _read_pt(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    if zipfile.is_zipfile(path):  # torch >= 1.6 (every birder file)
        try:
            return _read_pt_zip(path)
        except _NeedsTorch as e:
            why = f"it uses {e}, which only torch reads"
    else:
        with open(path, "rb") as f:
            head = f.read(2)
        if not head.startswith(b"\x80"):  # neither a zip archive nor a pickle (torch's pre-1.6 format)
            raise UserError(f"{path}: not a readable torch checkpoint (truncated or corrupted?): "
                            "not a zip archive")
        why = "it is in torch's pre-1.6 format"
    return _read_pt_torch(path, why)


def _corrupt(path: Path, detail: str) -> UserError:
    return UserError(f"{path}: not a readable torch checkpoint (truncated or corrupted?): {detail}")


def _read_pt_zip(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    try:
        with zipfile.ZipFile(path) as zf, open(path, "rb") as raw:
            pickles = [n for n in zf.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
            if len(pickles) != 1:
                raise _corrupt(path, "no single data.pkl in the archive (not a torch file?)")
            prefix = pickles[0][: -len("data.pkl")]
            info = zf.getinfo(pickles[0])
            if info.file_size > _MAX_PICKLE:
                raise _corrupt(path, f"data.pkl of {info.file_size} bytes is implausible")
            byteorder = "little"
            if f"{prefix}byteorder" in zf.namelist():
                byteorder = zf.read(f"{prefix}byteorder").decode("ascii", "replace").strip()
            if byteorder not in ("little", "big"):
                raise _corrupt(path, f"unknown byte order {byteorder!r}")
            unpickler = _WeightsUnpickler(zf.read(info))
            try:
                obj = unpickler.load()
            except _Refused as e:
                raise UserError(f"{path}: refused: its pickle asks for {e}, which a weights file never needs "
                                "(it may run code; nothing was run)") from None
            except (_NeedsTorch, UserError):
                raise
            except Exception as e:  # noqa: BLE001 - a malformed pickle fails in many ways; none ran code
                raise _corrupt(path, f"data.pkl: {_first_line(e)}") from None
            state, meta = _split_checkpoint(path, obj)
            arrays = _read_storages(path, zf, raw, prefix, unpickler.storages, state, byteorder)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError) as e:
        raise _corrupt(path, _first_line(e)) from None
    return arrays, _plain(meta)


def _split_checkpoint(path: Path, obj: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    if isinstance(obj, dict) and isinstance(obj.get("state"), dict):
        state, meta = obj["state"], {k: v for k, v in obj.items() if k != "state"}
    elif isinstance(obj, dict) and obj and all(isinstance(v, _Tensor) for v in obj.values()):
        state, meta = obj, {}  # a bare state_dict
    else:
        raise UserError(f"{path}: not a birder checkpoint (expected a dict with a 'state' state_dict)")
    bad = [str(k) for k, v in state.items() if not isinstance(v, _Tensor)]
    if bad:
        raise UserError(f"{path}: state entries that are not tensors: {', '.join(bad[:5])}")
    stray = _find_tensors(meta)
    if stray:
        raise UserError(f"{path}: tensors outside the state dict (in {', '.join(stray[:5])}); not a birder "
                        "checkpoint")
    return {str(k): v for k, v in state.items()}, meta


def _find_tensors(obj: Any, where: str = "") -> list[str]:
    if isinstance(obj, _Tensor):
        return [where or "<top>"]
    if isinstance(obj, dict):
        return [w for k, v in obj.items() for w in _find_tensors(v, f"{where}.{k}" if where else str(k))]
    if isinstance(obj, (list, tuple)):
        return [w for i, v in enumerate(obj) for w in _find_tensors(v, f"{where}[{i}]")]
    return []


def _read_storages(path: Path, zf: zipfile.ZipFile, raw: Any, prefix: str, storages: dict[str, _Storage],
                   state: dict[str, _Tensor], byteorder: str) -> dict[str, np.ndarray]:
    """Each storage read once from the archive into a fresh buffer that becomes the array (no copy)."""
    users: dict[str, int] = {}
    for t in state.values():
        users[t.storage.key] = users.get(t.storage.key, 0) + 1
    cache: dict[str, np.ndarray] = {}
    out: dict[str, np.ndarray] = {}
    for name, t in state.items():
        flat = cache.get(t.storage.key)
        if flat is None:
            flat = _read_storage(path, zf, raw, f"{prefix}data/{t.storage.key}", t.storage, byteorder)
            if users[t.storage.key] > 1:
                cache[t.storage.key] = flat
        out[name] = _view(flat, t)
        users[t.storage.key] -= 1
        if users[t.storage.key] == 0:
            cache.pop(t.storage.key, None)
    return out


def _read_storage(path: Path, zf: zipfile.ZipFile, raw: Any, member: str, storage: _Storage,
                  byteorder: str) -> np.ndarray:
    try:
        info = zf.getinfo(member)
    except KeyError:
        raise _corrupt(path, f"storage {member} is missing from the archive") from None
    nbytes = storage.numel * storage.dtype.itemsize
    if info.file_size < nbytes:
        raise _corrupt(path, f"storage {member} holds {info.file_size} bytes, expected {nbytes}")
    buf = np.empty(info.file_size, np.uint8)
    if info.compress_type == zipfile.ZIP_STORED:  # what torch writes: read in place, no intermediate copy
        raw.seek(info.header_offset)
        sig, name_len, extra_len = _ZIP_LOCAL_HEADER.unpack(raw.read(_ZIP_LOCAL_HEADER.size))
        if sig != b"PK\x03\x04":
            raise _corrupt(path, f"bad local header for {member}")
        raw.seek(info.header_offset + _ZIP_LOCAL_HEADER.size + name_len + extra_len)
        if raw.readinto(memoryview(buf)) != info.file_size:
            raise _corrupt(path, f"storage {member} is cut short")
        if zlib.crc32(buf) != info.CRC:
            raise _corrupt(path, f"storage {member} fails its CRC check")
    else:  # zipfile decompresses and checks the CRC itself
        buf[:] = np.frombuffer(zf.read(member), np.uint8)
    dtype = storage.dtype if byteorder == "little" else storage.dtype.newbyteorder(">")
    flat = buf[:nbytes].view(dtype)
    return flat if byteorder == "little" else flat.astype(storage.dtype)


def _view(flat: np.ndarray, t: _Tensor) -> np.ndarray:
    size = int(np.prod(t.shape, dtype=np.int64))
    contiguous = tuple(int(np.prod(t.shape[i + 1:], dtype=np.int64)) for i in range(len(t.shape)))
    if t.offset == 0 and size == flat.size and (t.stride == contiguous or size <= 1):
        return flat.reshape(t.shape)
    if size == 0:
        return np.empty(t.shape, flat.dtype)
    item = flat.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(flat[t.offset:], t.shape, tuple(s * item for s in t.stride))
    return np.ascontiguousarray(view)  # a view into a shared or larger storage: own its bytes


def _read_pt_torch(path: Path, why: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """``torch.load(weights_only=True)``: the reader for what ``_read_pt_zip`` does not implement."""
    try:
        import torch
    except ImportError:
        raise UserError(f"{path}: reading this file needs torch ({why}): pip install 'vitreg-jax[torch]'"
                        ) from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)  # never a full unpickle
    except pickle.UnpicklingError as e:
        raise UserError(f"{path}: refused: not a plain weights file (its pickle asks for more than tensors "
                        f"and dicts; it was not run): {_first_line(e)}") from None
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, KeyError) as e:
        raise _corrupt(path, _first_line(e)) from None
    if isinstance(obj, dict) and isinstance(obj.get("state"), dict):
        raw_state = obj["state"]
        meta = {k: v for k, v in obj.items() if k != "state"}
    elif isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        raw_state, meta = obj, {}  # a bare state_dict
    else:
        raise UserError(f"{path}: not a birder checkpoint (expected a dict with a 'state' state_dict)")
    bad = [k for k, v in raw_state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise UserError(f"{path}: state entries that are not tensors: {', '.join(map(str, bad[:5]))}")
    state = {str(k): _tensor_to_numpy(v) for k, v in raw_state.items()}
    return state, _plain(meta)


def _tensor_to_numpy(t: Any) -> np.ndarray:
    import torch

    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


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
    """A birder ``.pt`` (what ``torch.save({"state": state_dict, **meta})`` writes), atomically, without torch.

    torch's zip format: ``archive/data.pkl`` (a protocol-2 pickle that uses only the names
    ``torch.load(weights_only=True)`` allows: ``collections.OrderedDict``, ``torch._utils._rebuild_tensor_v2``
    and the typed storages), one uncompressed, 64-byte-aligned ``archive/data/<i>`` per tensor, and torch's
    small records (``byteorder``, ``version``, ...). Each tensor is written straight from its array.
    """
    _atomic_write(path, lambda f: _write_torch_zip(f, state, meta))


_PT_STORAGE_NAMES = {dtype: name for name, dtype in _PT_STORAGES.items()}
_PT_ALIGN = 64  # torch aligns every record's data to 64 bytes (so that torch.load(mmap=True) works)


class _PickleWriter:
    """The few pickle opcodes a birder checkpoint needs (protocol 2), tensors as persistent storages."""

    def __init__(self) -> None:
        self.out = bytearray(b"\x80\x02")  # PROTO 2
        self.arrays: list[np.ndarray] = []

    def dump(self, obj: Any) -> bytes:
        self._value(obj)
        self.out += b"."  # STOP
        return bytes(self.out)

    def _global(self, module: str, name: str) -> None:
        self.out += b"c" + module.encode() + b"\n" + name.encode() + b"\n"  # GLOBAL

    def _value(self, v: Any) -> None:
        o = self.out
        if v is None:
            o += b"N"
        elif v is True or v is False:
            o += b"\x88" if v else b"\x89"
        elif isinstance(v, int):
            if 0 <= v < 256:
                o += b"K" + struct.pack("<B", v)
            elif -(2**31) <= v < 2**31:
                o += b"J" + struct.pack("<i", v)
            else:
                raw = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
                o += b"\x8a" + struct.pack("<B", len(raw)) + raw  # LONG1
        elif isinstance(v, float):
            o += b"G" + struct.pack(">d", v)
        elif isinstance(v, str):
            raw = v.encode("utf-8", "surrogatepass")
            o += b"X" + struct.pack("<I", len(raw)) + raw
        elif isinstance(v, np.ndarray):
            self._tensor(v)
        elif isinstance(v, tuple):
            o += b"("
            for item in v:
                self._value(item)
            o += b"t"
        elif isinstance(v, list):
            o += b"]"
            if v:
                o += b"("
                for item in v:
                    self._value(item)
                o += b"e"  # APPENDS
        elif isinstance(v, dict):
            if v and all(isinstance(a, np.ndarray) for a in v.values()):  # a state_dict: torch's OrderedDict
                self._global("collections", "OrderedDict")
                o += b")R"
            else:
                o += b"}"
            if v:
                o += b"("
                for key, item in v.items():
                    self._value(str(key))
                    self._value(item)
                o += b"u"  # SETITEMS
        else:
            raise TypeError(f"cannot store {type(v).__name__} in a birder .pt")

    def _tensor(self, a: np.ndarray) -> None:
        name = _PT_STORAGE_NAMES.get(a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype)
        if name is None:
            raise TypeError(f"cannot store a {a.dtype} tensor in a birder .pt")
        key = len(self.arrays)
        self.arrays.append(a)
        o = self.out
        self._global("torch._utils", "_rebuild_tensor_v2")
        o += b"(("  # MARK (args), MARK (persistent id)
        self._value("storage")
        self._global("torch", name)
        self._value(str(key))
        self._value("cpu")
        self._value(int(a.size))
        o += b"tQ"  # TUPLE, BINPERSID
        self._value(0)  # storage offset
        self._value(tuple(int(n) for n in a.shape))
        self._value(tuple(int(np.prod(a.shape[i + 1:], dtype=np.int64)) for i in range(a.ndim)))  # C strides
        o += b"\x89"  # requires_grad False
        self._global("collections", "OrderedDict")
        o += b")R"  # backward hooks: OrderedDict()
        o += b"tR"  # TUPLE, REDUCE


def _write_torch_zip(f: Any, state: dict[str, np.ndarray], meta: dict[str, Any], archive: str = "archive") -> None:
    writer = _PickleWriter()
    data_pkl = writer.dump({"state": dict(state), **meta})
    with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        def put(name: str, data: Any, size: int) -> None:
            info = zipfile.ZipInfo(f"{archive}/{name}", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_STORED
            info.file_size = size
            zip64 = size > zipfile.ZIP64_LIMIT // 2
            start = f.tell() + 30 + len(info.filename.encode()) + 4 + (20 if zip64 else 0)
            pad = -start % _PT_ALIGN
            info.extra = struct.pack("<HH", 0x4246, pad) + b"Z" * pad  # torch's "FB" padding field
            with zf.open(info, "w", force_zip64=zip64) as out:
                out.write(data)

        put("data.pkl", data_pkl, len(data_pkl))
        put(".format_version", b"1", 1)
        put(".storage_alignment", str(_PT_ALIGN).encode(), len(str(_PT_ALIGN)))
        put("byteorder", b"little", 6)
        for i, a in enumerate(writer.arrays):
            a = np.ascontiguousarray(a)
            if a.dtype.byteorder == ">":
                a = a.astype(a.dtype.newbyteorder("<"))
            put(f"data/{i}", a.reshape(-1).view(np.uint8), a.nbytes)
        put("version", b"3\n", 2)
        serial = str(int.from_bytes(hashlib.sha256(data_pkl).digest()[:16], "little")).zfill(40)[:40]
        put(".data/serialization_id", serial.encode(), len(serial))


# .safetensors ------------------------------------------------------------------------------------------
def read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Each tensor is read from the file straight into the array returned (no whole-file buffer)."""
    bad = f"{path}: not a readable .safetensors file"
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError("file shorter than its header")
            (n,) = struct.unpack("<Q", raw)
            if n > _MAX_HEADER:
                raise ValueError(f"header length {n} is implausible")
            header = json.loads(f.read(n))
            if not isinstance(header, dict):
                raise TypeError("header is not a JSON object")
            data_start = 8 + n
            data_len = os.fstat(f.fileno()).st_size - data_start
            meta_raw = header.pop("__metadata__", None) or {}
            state: dict[str, np.ndarray] = {}
            for name, info in header.items():
                try:
                    dtype = _ST_DTYPES[info["dtype"]]
                    start, end = (int(v) for v in info["data_offsets"])
                    shape = tuple(int(v) for v in info["shape"])
                except (KeyError, TypeError, ValueError):
                    raise UserError(f"{bad}: bad entry for {name!r}") from None
                nbytes = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
                if min(shape, default=0) < 0 or start < 0 or end - start != nbytes:
                    raise UserError(f"{bad}: bad entry for {name!r}")
                if end > data_len:
                    raise UserError(f"{path}: truncated or corrupted .safetensors file "
                                    f"(tensor {name!r} out of range)")
                buf = np.empty(nbytes, np.uint8)
                f.seek(data_start + start)
                if f.readinto(memoryview(buf)) != nbytes:
                    raise UserError(f"{path}: truncated .safetensors file (tensor {name!r} cut short)")
                state[name] = buf.view(dtype).reshape(shape)
            if not isinstance(meta_raw, dict):
                raise TypeError("__metadata__ is not a JSON object")
            meta = {k: json.loads(v) if k in _JSON_META else v for k, v in meta_raw.items()}
    except (ValueError, TypeError, UnicodeDecodeError) as e:  # json errors are ValueErrors
        raise UserError(f"{bad}: {_first_line(e)}") from None
    return state, meta


def write_safetensors(path: Path, state: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """A ``.safetensors`` with birder's metadata keys (JSON strings, as ``birder.fs_ops.save_st``)."""
    header: dict[str, Any] = {}
    offset = 0
    arrays = []
    for name, a in state.items():
        a = np.ascontiguousarray(a)
        if a.dtype not in _ST_NAMES:
            raise UserError(f"cannot store tensor {name!r} of dtype {a.dtype} in .safetensors")
        header[name] = {"dtype": _ST_NAMES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays.append(a)
    header["__metadata__"] = {k: (json.dumps(v) if k in _JSON_META else str(v)) for k, v in meta.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep tensor data 8-byte aligned

    def write(f: Any) -> None:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for a in arrays:
            f.write(a.tobytes())

    _atomic_write(path, write)


def write_birder_file(path: str | os.PathLike[str], state: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    path = Path(path)
    if path.suffix == ".safetensors":
        write_safetensors(path, state, meta)
    elif path.suffix == ".pt":
        write_pt(path, state, meta)
    else:
        raise UserError(f"{path}: expected a .pt or .safetensors output file name")


def _atomic_write(path: Path, write: Any) -> None:
    """Write to a temporary file beside ``path``, then rename: no half-written file is ever left."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except FileNotFoundError:
        raise UserError(f"{path.parent}: no such directory") from None
    except PermissionError:
        raise UserError(f"{path.parent}: not writable") from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would make the result private to its writer
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
