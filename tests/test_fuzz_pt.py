"""The torch-free ``.pt`` reader on mutated real birder files: it reads the original exactly or refuses in one
line.

The file mutated is birder 0.8.4's own ``checkpoint_model`` output for a tiny ``vit_reg4_b16``. Raw mutations
(bit flips, bytes set, truncation, insertion and deletion in each region of the zip: local headers, record
data, central directory entries, the zip64 and classic end records; integer fields of those headers set to
hostile values) leave the records' CRCs as they were, so the reader must return exactly the original tensors
and metadata or raise a one-line ``UserError``. Rebuilt archives (pickle opcode and integer edits, zip entries
dropped, duplicated, renamed, swapped, deflated, reordered) carry correct CRCs, so the edit reaches the
unpickler and the tensor checks: the reader must then refuse, or read what ``torch.load(weights_only=True)``
reads from the same bytes, bit for bit. Every load runs under
:func:`tests.support.fuzz_support.load_or_refuse` (no
other exception type, no hang, nothing allocated beyond the file's size).
"""

from __future__ import annotations

import io
import pickletools
import struct
import warnings
import zipfile
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from tests.support.fuzz_support import flip, fuzz_settings, interesting_ints, load_or_refuse, put_int
from vitreg_jax.convert.formats.pt_reader import read_pt

torch = pytest.importorskip("torch")
pytest.importorskip("birder")

# (offset, width) of each integer field after the signature, per zip structure
_LOCAL_FIELDS = [(4, 2), (6, 2), (8, 2), (10, 2), (12, 2), (14, 4), (18, 4), (22, 4), (26, 2), (28, 2)]
_CENTRAL_FIELDS = [
    (4, 2),
    (6, 2),
    (8, 2),
    (10, 2),
    (12, 2),
    (14, 2),
    (16, 4),
    (20, 4),
    (24, 4),
    (28, 2),
    (30, 2),
    (32, 2),
    (34, 2),
    (36, 2),
    (38, 4),
    (42, 4),
]
_ZIP64_END_FIELDS = [(4, 8), (12, 2), (14, 2), (16, 4), (20, 4), (24, 8), (32, 8), (40, 8), (48, 8)]
_ZIP64_LOCATOR_FIELDS = [(4, 4), (8, 8), (16, 4)]
_END_FIELDS = [(4, 2), (6, 2), (8, 2), (10, 2), (12, 4), (16, 4), (20, 2)]


class Original(NamedTuple):
    """The real file, its regions (name, start, end), its integer header fields (position, width) and what
    it reads as."""

    data: bytes
    regions: list[tuple[str, int, int]]
    fields: list[tuple[int, int]]
    state: dict[str, np.ndarray]
    meta: dict[str, Any]
    records: list[tuple[str, bytes]]  # (name, bytes) in archive order
    pickle_name: str

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:  # hypothesis prints it with each failing case
        p.text(repr(self))

    def __repr__(self) -> str:
        return f"<birder .pt, {len(self.data)} bytes>"


def _layout(data: bytes) -> tuple[list[tuple[str, int, int]], list[tuple[int, int]], list[tuple[str, bytes]]]:
    regions, fields, records = [], [], []
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        for info in zf.infolist():
            start = info.header_offset
            name_len, extra_len = struct.unpack("<HH", data[start + 26 : start + 30])
            body = start + 30 + name_len + extra_len
            regions += [
                (f"local header {info.filename}", start, body),
                (f"data {info.filename}", body, body + info.compress_size),
            ]
            fields += [(start + at, width) for at, width in _LOCAL_FIELDS]
            records.append((info.filename, zf.read(info)))
        at = zf.start_dir
    end = data.rfind(b"PK\x05\x06")
    z64, locator = data.rfind(b"PK\x06\x06"), data.rfind(b"PK\x06\x07")
    while data[at : at + 4] == b"PK\x01\x02":
        name_len, extra_len, comment_len = struct.unpack("<HHH", data[at + 28 : at + 34])
        size = 46 + name_len + extra_len + comment_len
        regions.append((f"central directory entry at {at}", at, at + size))
        fields += [(at + off, width) for off, width in _CENTRAL_FIELDS]
        at += size
    assert 0 <= z64 < locator < end, "torch.save writes zip64 end records"
    regions += [
        ("zip64 end record", z64, locator),
        ("zip64 locator", locator, end),
        ("end record", end, len(data)),
    ]
    fields += [(z64 + off, w) for off, w in _ZIP64_END_FIELDS] + [
        (locator + off, w) for off, w in _ZIP64_LOCATOR_FIELDS
    ]
    fields += [(end + off, w) for off, w in _END_FIELDS]
    return regions, fields, records


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory) -> Original:
    from tests.support.birder_files import birder_net, birder_save
    from tests.support.tiny_models import TINY_BIRDER

    folder = tmp_path_factory.mktemp("birder")
    pt, _ = birder_save(birder_net(config=TINY_BIRDER), folder, "vit_reg4_b16")
    data = pt.read_bytes()
    state, meta = read_pt(pt)
    regions, fields, records = _layout(data)
    pickle_name = next(name for name, _ in records if name.endswith("/data.pkl"))
    return Original(
        data, regions, fields, {k: v.copy() for k, v in state.items()}, meta, records, pickle_name
    )


def _read(path: Path, data: bytes) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    path.write_bytes(data)
    return load_or_refuse(lambda: read_pt(path), len(data))


def _same_arrays(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert list(got) == list(want)
    for key, array in want.items():
        assert got[key].dtype == array.dtype and got[key].shape == array.shape, key
        assert got[key].tobytes() == array.tobytes(), key


# raw mutations: CRCs untouched -----------------------------------------------------------------------------
# a recipe is plain data (so a case hypothesis finds can be kept as an @example): (kind, selector, position,
# value, junk); the selector picks a region or a header field, a negative value one of interesting_ints
RAW_KINDS = ["flip", "byte", "truncate", "insert", "delete", "field", "field"]
raw_recipes = st.tuples(
    st.sampled_from(RAW_KINDS),
    st.integers(0, 1 << 20),
    st.integers(0, 1 << 40),
    st.integers(-16, -1) | st.integers(0, (1 << 64) - 1),
    st.binary(min_size=1, max_size=64),
)


def apply_raw(orig: Original, recipe: tuple[str, int, int, int, bytes]) -> tuple[str, bytes]:
    kind, sel, where, value, junk = recipe
    data = orig.data
    if kind == "field":
        at, width = orig.fields[sel % len(orig.fields)]
        if value < 0:
            choices = interesting_ints(int.from_bytes(data[at : at + width], "little"), len(data), width)
            value = choices[value % len(choices)]
        return f"field {width}@{at} = {value}", put_int(data, at, width, value)
    name, start, end = orig.regions[sel % len(orig.regions)]
    pos = start + where % (end - start + 1)
    if kind == "truncate":
        return f"truncate at {pos} ({name})", data[:pos]
    pos = min(pos, len(data) - 1)
    if kind == "flip":
        return f"flip bit {value % 8} at {pos} ({name})", flip(data, pos, value % 8)
    if kind == "byte":
        return f"byte {value % 256} at {pos} ({name})", data[:pos] + bytes([value % 256]) + data[pos + 1 :]
    if kind == "insert":
        return f"insert {len(junk)} bytes at {pos} ({name})", data[:pos] + junk + data[pos:]
    count = 1 + value % 64
    return f"delete {count} bytes at {pos} ({name})", data[:pos] + data[pos + count :]


@fuzz_settings()
@given(recipe=raw_recipes)
def test_raw_mutations_read_the_original_or_are_refused(
    original: Original, tmp_path_factory: pytest.TempPathFactory, recipe: tuple[str, int, int, int, bytes]
) -> None:
    what, mutated = apply_raw(original, recipe)
    got = _read(tmp_path_factory.getbasetemp() / "raw.pt", mutated)
    if got is not None:
        _same_arrays(got[0], original.state)
        assert got[1] == original.meta, what


# rebuilt archives: correct CRCs, so the edit reaches the unpickler and the tensor checks -------------------
def _zip(records: list[tuple[str, bytes, int]]) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zipfile warns about duplicate names
        with zipfile.ZipFile(buf, "w") as zf:
            for name, body, method in records:
                zf.writestr(zipfile.ZipInfo(name, (2000, 1, 1, 0, 0, 0)), body, compress_type=method)
    return buf.getvalue()


_INT_OPS = {"BININT", "BININT1", "BININT2", "LONG1", "LONG4", "INT", "LONG"}
_STR_OPS = {"BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "BINSTRING", "SHORT_BINSTRING"}
HOSTILE_INTS = [
    0,
    1,
    -1,
    3,
    255,
    256,
    65535,
    2**31 - 1,
    2**31,
    2**32,
    2**40,
    2**48,
    2**62,
    2**63 - 1,
    -(2**63),
    2**64,
    10**30,
]
STRINGS = [
    "state",
    "storage",
    "cpu",
    "0",
    "30",
    "31",
    "../data.pkl",
    "data.pkl",
    "torch",
    "os",
    "system",
    "FloatStorage",
    "HalfStorage",
    "BFloat16Storage",
    "LongStorage",
    "BoolStorage",
    "UntypedStorage",
    "ComplexFloatStorage",
    "_rebuild_tensor_v2",
    "collections",
    "OrderedDict",
    "",
    "\u00e9" * 9,
]
GLOBALS = [
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor_v3"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_sparse_tensor"),
    ("torch._utils", "_rebuild_qtensor"),
    ("collections", "OrderedDict"),
    ("torch", "Size"),
    ("builtins", "set"),
    ("_codecs", "encode"),
    ("torch", "FloatStorage"),
    ("torch", "HalfStorage"),
    ("torch", "BFloat16Storage"),
    ("torch", "BoolStorage"),
    ("torch", "LongStorage"),
    ("torch", "ComplexFloatStorage"),
    ("torch.storage", "UntypedStorage"),
    ("torch", "bfloat16"),
    ("torch", "float8_e4m3fn"),
    ("torch", "per_tensor_affine"),
    ("os", "system"),
    ("builtins", "eval"),
    ("torch", "load"),
    ("__builtin__", "set"),
]
OPCODES = sorted({op.code.encode("latin1") for op in pickletools.opcodes})
PICKLE_KINDS = ["opcode", "drop", "dup", "int", "int", "str", "global", "splice", "byte", "truncate"]
pickle_recipes = st.tuples(
    st.sampled_from(PICKLE_KINDS),
    st.integers(0, 1 << 20),
    st.sampled_from(HOSTILE_INTS) | st.integers(-(2**70), 2**70),
    st.sampled_from(STRINGS) | st.text(max_size=12),
    st.binary(min_size=1, max_size=16),
)


def _long1(value: int) -> bytes:
    raw = value.to_bytes((value.bit_length() + 8) // 8 or 1, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def _unicode(text: str) -> bytes:
    raw = text.encode("utf-8", "surrogatepass")
    return b"X" + struct.pack("<I", len(raw)) + raw


def apply_pickle_edit(pkl: bytes, recipe: tuple[str, int, int, str, bytes]) -> tuple[str, bytes]:
    kind, sel, value, text, junk = recipe
    ops = [(op.name, pos) for op, _, pos in pickletools.genops(pkl)]
    ends = [pos for _, pos in ops[1:]] + [len(pkl)]
    spans = [(name, pos, end) for (name, pos), end in zip(ops, ends, strict=True)]
    pool = {
        "int": [s for s in spans if s[0] in _INT_OPS],
        "str": [s for s in spans if s[0] in _STR_OPS],
        "global": [s for s in spans if s[0] == "GLOBAL"],
    }.get(kind, spans)
    name, pos, end = pool[sel % len(pool)]
    if kind == "opcode":
        code = OPCODES[value % len(OPCODES)]
        return f"opcode {name}@{pos} -> {code!r}", pkl[:pos] + code + pkl[pos + 1 :]
    if kind == "drop":
        return f"drop {name}@{pos}", pkl[:pos] + pkl[end:]
    if kind == "dup":
        return f"duplicate {name}@{pos}", pkl[:end] + pkl[pos:end] + pkl[end:]
    if kind == "int":
        return f"{name}@{pos} = {value}", pkl[:pos] + _long1(value) + pkl[end:]
    if kind == "str":
        return f"{name}@{pos} = {text!r}", pkl[:pos] + _unicode(text) + pkl[end:]
    if kind == "global":
        module, attr = GLOBALS[value % len(GLOBALS)]
        return f"GLOBAL@{pos} = {module}.{attr}", pkl[:pos] + f"c{module}\n{attr}\n".encode() + pkl[end:]
    if kind == "splice":
        return f"insert {junk!r} at {pos}", pkl[:pos] + junk + pkl[pos:]
    if kind == "byte":
        at = sel % len(pkl)
        return f"byte {value % 256} at {at}", pkl[:at] + bytes([value % 256]) + pkl[at + 1 :]
    return f"truncate at {pos}", pkl[:pos]


ENTRY_KINDS = ["drop", "dup", "rename", "swap", "deflate", "reorder", "junk", "resize"]
entry_recipes = st.tuples(
    st.sampled_from(ENTRY_KINDS), st.integers(0, 1 << 20), st.integers(0, 1 << 20), st.binary(max_size=64)
)


def apply_entry_edit(
    orig: Original, recipe: tuple[str, int, int, bytes]
) -> tuple[str, list[tuple[str, bytes, int]]]:
    kind, i, j, junk = recipe
    records = [(name, body, zipfile.ZIP_STORED) for name, body in orig.records]
    names = [name for name, _ in orig.records]
    prefix = orig.pickle_name[: -len("data.pkl")]
    i %= len(records)
    name, body, _ = records[i]
    if kind == "drop":
        del records[i]
    elif kind == "dup":
        records.insert(j % (len(records) + 1), (name, body if j % 2 else b"", 0))
    elif kind == "rename":
        choices = [
            *names,
            f"{prefix}data/99",
            f"{prefix}data/-1",
            f"{prefix}data/../data.pkl",
            f"other/{name.split('/', 1)[1]}",
            name.split("/", 1)[1],
            f"{prefix}DATA.PKL",
            f"{prefix}byteorder",
        ]
        records[i] = (choices[j % len(choices)], body, 0)
    elif kind == "swap":
        j %= len(records)
        records[i], records[j] = (name, records[j][1], 0), (records[j][0], body, 0)
    elif kind == "deflate":
        records[i] = (name, body, zipfile.ZIP_DEFLATED)
    elif kind == "reorder":
        records = [records[k] for k in np.random.default_rng(j).permutation(len(records))]
    elif kind == "junk":
        choices = [f"{prefix}data/31", f"{prefix}extra", "junk", f"{prefix}data.pkl"]
        records.insert(i, (choices[j % len(choices)], junk, 0))
    else:
        cut = j % (len(body) + 1)
        choices = [body[:cut], body + bytes(cut), b"little", b"big", b"nope"]
        records[i] = (name, choices[j % len(choices)], 0)
    return f"{kind} {name}", records


# what torch's archive reader refuses and ours reads (the records it needs are there): any other refusal of a
# file ours read fails the test
TORCH_ONLY_REFUSALS = ('hasRecord("version")', "is not in a subdirectory")


# records torch reads and the reader has no use for (a birder file always has them, whole): torch may refuse
# a file in which one of them is damaged
SIDE_RECORDS = ("/version", "/.format_version", "/.storage_alignment", "/.data/serialization_id")


def _torch_reads_the_same(
    data: bytes, got: tuple[dict[str, np.ndarray], dict[str, Any]], side_record_edited: bool = False
) -> None:
    from tests.support.birder_files import to_numpy

    try:
        ref = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (RuntimeError, ValueError) as e:
        if side_record_edited or any(words in str(e) for words in TORCH_ONLY_REFUSALS):
            return
        raise
    ref_state = ref.get("state", ref)
    _same_arrays(got[0], {k: to_numpy(v) for k, v in ref_state.items()})


@fuzz_settings()
@given(recipe=pickle_recipes)
# the memoised FloatStorage global made HalfStorage: every record then holds twice the bytes its storage
# claims; torch refuses that, and the reader used to read the first half
@example(recipe=("global", 242, 18916, "state", b"\x00"))
def test_pickle_edits_are_refused_or_read_as_torch_reads_them(
    original: Original, tmp_path_factory: pytest.TempPathFactory, recipe: tuple[str, int, int, str, bytes]
) -> None:
    pkl = dict(original.records)[original.pickle_name]
    _, edited = apply_pickle_edit(pkl, recipe)
    mutated = _zip([(n, edited if n == original.pickle_name else b, 0) for n, b in original.records])
    got = _read(tmp_path_factory.getbasetemp() / "pickle.pt", mutated)
    if got is not None:
        _torch_reads_the_same(mutated, got)


@fuzz_settings()
@given(recipe=entry_recipes)
@example(
    recipe=("resize", 890, 0, b"")
)  # an empty .storage_alignment record: torch refuses, the reader reads
@example(recipe=("rename", 1, 482, b""))  # DATA.PKL beside data.pkl: torch reads DATA.PKL as its pickle
def test_zip_entry_edits_are_refused_or_read_as_torch_reads_them(
    original: Original, tmp_path_factory: pytest.TempPathFactory, recipe: tuple[str, int, int, bytes]
) -> None:
    what, records = apply_entry_edit(original, recipe)
    mutated = _zip(records)
    got = _read(tmp_path_factory.getbasetemp() / "entries.pt", mutated)
    if got is not None:
        names = [name for name, _, _ in records]
        # torch's zip reader finds names case-insensitively: with DATA.PKL beside data.pkl it may read the
        # other
        case_clash = len({n.lower() for n in names}) < len(set(names))
        if not case_clash:
            _torch_reads_the_same(mutated, got, what.endswith(SIDE_RECORDS))
