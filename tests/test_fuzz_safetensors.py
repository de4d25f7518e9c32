"""The ``.safetensors`` reader on mutated real birder files: it refuses in one line, or reads what the
``safetensors`` library reads from the same bytes, bit for bit.

The file mutated is birder 0.8.4's own ``fs_ops.save_st`` output for a tiny ``vit_reg4_b16``. A
``.safetensors`` has no checksum, so a changed data byte is a valid file with other weights: the library is
the oracle (it must accept every file we accept, with the same arrays), and a mutation that touches only
tensor data must still be read. Mutations: bit flips, bytes set, truncation, insertion and deletion in the
length prefix, the JSON header and each tensor's data; the length prefix set to hostile values; and JSON
header edits (dtypes, shapes, offsets with wrong types or huge values, keys and tensors dropped or
duplicated, ``__metadata__`` of the wrong type or holding broken JSON, deep nesting, huge numbers).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from tests.support.fuzz_support import flip, fuzz_settings, interesting_ints, load_or_refuse, put_int
from vitreg_jax.convert.formats.safetensors_io import read_safetensors

pytest.importorskip("torch")
pytest.importorskip("birder")
safetensors_numpy = pytest.importorskip("safetensors.numpy")


class Original(NamedTuple):
    data: bytes
    header: dict[str, Any]
    header_end: int  # 8 + the header's length
    regions: list[tuple[str, int, int]]
    names: list[str]  # the tensors, in header order

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:  # hypothesis prints it with each failing case
        p.text(f"<birder .safetensors, {len(self.data)} bytes>")


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory) -> Original:
    from tests.support.birder_files import birder_net, birder_save_st
    from tests.support.tiny_models import TINY_BIRDER

    path = birder_save_st(birder_net(config=TINY_BIRDER), tmp_path_factory.mktemp("birder") / "w.safetensors")
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    names = [k for k in header if k != "__metadata__"]
    regions = [("length", 0, 8), ("header", 8, 8 + n)]
    regions += [
        (f"data {k}", 8 + n + header[k]["data_offsets"][0], 8 + n + header[k]["data_offsets"][1])
        for k in names
    ]
    return Original(data, header, 8 + n, regions, names)


def _read(path: Path, data: bytes) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    path.write_bytes(data)
    return load_or_refuse(lambda: read_safetensors(path), len(data))


def _check(data: bytes, got: tuple[dict[str, np.ndarray], dict[str, Any]] | None, must_read: bool) -> None:
    if got is None:
        assert not must_read, "a file whose header is intact was refused"
        return
    theirs = safetensors_numpy.load(data)  # raises if the library refuses what we read
    assert set(got[0]) == set(theirs)
    for key, array in theirs.items():
        assert got[0][key].dtype == array.dtype and got[0][key].shape == array.shape, key
        assert got[0][key].tobytes() == array.tobytes(), key


# raw mutations ---------------------------------------------------------------------------------------------
RAW_KINDS = ["flip", "byte", "truncate", "insert", "delete", "length"]
raw_recipes = st.tuples(
    st.sampled_from(RAW_KINDS),
    st.integers(0, 1 << 20),
    st.integers(0, 1 << 40),
    st.integers(-16, -1) | st.integers(0, (1 << 64) - 1),
    st.binary(min_size=1, max_size=64),
)


def apply_raw(orig: Original, recipe: tuple[str, int, int, int, bytes]) -> tuple[str, bytes, bool]:
    """(what, mutated bytes, whether only tensor data changed: the file must then still be read)."""
    kind, sel, where, value, junk = recipe
    data = orig.data
    if kind == "length":
        if value < 0:
            choices = interesting_ints(orig.header_end - 8, len(data), 8)
            value = choices[value % len(choices)]
        return f"length = {value}", put_int(data, 0, 8, value), False
    name, start, end = orig.regions[sel % len(orig.regions)]
    pos = start + where % (end - start + 1)
    if kind == "truncate":
        return f"truncate at {pos} ({name})", data[:pos], False
    pos = min(pos, len(data) - 1)
    data_only = pos >= orig.header_end
    if kind == "flip":
        return f"flip bit {value % 8} at {pos} ({name})", flip(data, pos, value % 8), data_only
    if kind == "byte":
        return f"byte {value % 256} at {pos}", data[:pos] + bytes([value % 256]) + data[pos + 1 :], data_only
    if kind == "insert":
        return f"insert {len(junk)} bytes at {pos} ({name})", data[:pos] + junk + data[pos:], False
    count = 1 + value % 64
    return f"delete {count} bytes at {pos} ({name})", data[:pos] + data[pos + count :], False


@fuzz_settings()
@given(recipe=raw_recipes)
@example(recipe=("length", 0, 0, 1 << 26, b"\x00"))  # a 64 MiB header claimed: read(n) allocated 64 MiB
def test_raw_mutations_are_refused_or_read_as_safetensors_reads_them(
    original: Original, tmp_path_factory: pytest.TempPathFactory, recipe: tuple[str, int, int, int, bytes]
) -> None:
    _, mutated, data_only = apply_raw(original, recipe)
    _check(mutated, _read(tmp_path_factory.getbasetemp() / "raw.safetensors", mutated), data_only)


# JSON header edits -----------------------------------------------------------------------------------------
DEEP = 100_000  # nesting depth of a hostile JSON value (Python's json recurses once per level)
BIG = "9" * 5000  # a number with more digits than Python converts from text by default


VALUES = [
    None,
    True,
    1.5,
    -1,
    0,
    2**62,
    2**64,
    "x",
    "",
    [],
    {},
    [[1]],
    "@DEEP@",
    "@BIG@",
    [-1],
    [0, 2**70],
    [2**62, 2**62],
    [1.0, 2.0],
    ["1"],
    [True],
]
DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I8", "U8", "BOOL", "F8_E4M3", "C64", "U64", "f32"]
METADATA = [
    None,
    [],
    "x",
    1,
    {"a": 1},
    {"rgb_stats": "not json"},
    {"rgb_stats": "[" * 2000},
    {"config": "1e999999"},
    {"signature": "@DEEPTEXT@"},
    {"class_to_idx": '"' + "x" * 100},
]
JSON_KINDS = [
    "dtype",
    "shape",
    "offsets",
    "field",
    "drop_field",
    "drop_tensor",
    "dup_tensor",
    "entry",
    "metadata",
    "root",
    "extra",
]
json_recipes = st.tuples(st.sampled_from(JSON_KINDS), st.integers(0, 1 << 20), st.integers(0, 1 << 20))


def _dumps(header: Any) -> bytes:
    text = json.dumps(header)
    text = text.replace('"@DEEP@"', "[" * DEEP + "]" * DEEP).replace('"@BIG@"', BIG)
    text = text.replace("@DEEPTEXT@", "[" * DEEP)
    raw = text.encode()
    return raw + b" " * (-len(raw) % 8)


def apply_json_edit(orig: Original, recipe: tuple[str, int, int]) -> tuple[str, bytes]:
    kind, sel, choice = recipe
    header = json.loads(json.dumps(orig.header))
    name = orig.names[sel % len(orig.names)]
    info = header[name]
    start, end = info["data_offsets"]
    if kind == "dtype":
        info["dtype"] = DTYPES[choice % len(DTYPES)]
    elif kind == "shape":
        shapes = [*VALUES, info["shape"][::-1], [*info["shape"], 1], [*info["shape"], 0], [end - start]]
        info["shape"] = shapes[choice % len(shapes)]
    elif kind == "offsets":
        offsets = [
            *VALUES,
            [0, 0],
            [start, end + 1],
            [start - 1, end],
            [end, start],
            [start, 2**63],
            [2**64, 2**64 + end - start],
            [start],
            [start, end, 0],
            [start + 8, end + 8],
        ]
        info["data_offsets"] = offsets[choice % len(offsets)]
    elif kind == "field":
        field = ["dtype", "shape", "data_offsets"][sel % 3]
        info[field] = VALUES[choice % len(VALUES)]
    elif kind == "drop_field":
        del info[["dtype", "shape", "data_offsets"][choice % 3]]
    elif kind == "drop_tensor":
        del header[name]
    elif kind == "dup_tensor":
        header[f"{name}.copy{choice % 3}"] = dict(info)
    elif kind == "entry":
        header[name] = VALUES[choice % len(VALUES)]
    elif kind == "metadata":
        header["__metadata__"] = METADATA[choice % len(METADATA)]
    elif kind == "root":
        header = VALUES[choice % len(VALUES)]
    else:
        info[["extra", "dtype2", ""][choice % 3]] = VALUES[sel % len(VALUES)]
    blob = _dumps(header)
    return f"{kind} {name} ({choice})", struct.pack("<Q", len(blob)) + blob + orig.data[orig.header_end :]


@fuzz_settings()
@given(recipe=json_recipes)
# JSON nested 100000 deep in the header: json.loads raised RecursionError, which escaped the reader
@example(recipe=("shape", 0, 12))
@example(recipe=("metadata", 0, 8))  # the same inside a metadata value that birder stores as JSON text
@example(recipe=("shape", 0, 13))  # a dimension of 5000 digits: int() refuses it (ValueError)
@example(recipe=("metadata", 0, 1))  # __metadata__ [] was read as {} (the library refuses it)
@example(recipe=("metadata", 0, 4))  # __metadata__ {"a": 1}: values must be strings (the library refuses it)
def test_header_edits_are_refused_or_read_as_safetensors_reads_them(
    original: Original, tmp_path_factory: pytest.TempPathFactory, recipe: tuple[str, int, int]
) -> None:
    _, mutated = apply_json_edit(original, recipe)
    _check(mutated, _read(tmp_path_factory.getbasetemp() / "header.safetensors", mutated), False)
