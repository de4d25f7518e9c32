"""The two on-disk formats of ``embed`` output folders, and the parts both are built from.

Readers (``vitreg_jax.embedding.reader``, pyarrow, polars, DuckDB, numpy) need nothing but this description.

``format="npy"`` (the default; one array, for runs that fit in memory)::

    DIR/embeddings.npy  float32, (N, D) for features "cls", (N, T, D) for "tokens" / "patches"
    DIR/paths.txt       N lines, UTF-8: line i is the name (file path, or tar key) of row i, escaped
    DIR/failed.txt      one line per input that could not be read: escaped name, a tab, escaped reason
    DIR/sources.txt     only when some row's source differs from its key (tar members): line i is the
                        escaped name of the file or shard row i came from
    DIR/meta.json       "format": "vitreg-jax-embed/1", "status": "complete", model, checkpoint, size, dtype,
                        features, embedding_shape, counts, "names": "escaped", "sources_file" (whether
                        sources.txt exists) and "failures" (source, key, reason of each, as JSON)

Names are escaped so that one line is always one name, also for names holding a newline or a tab: ``\\``
is written ``\\\\``, newline ``\\n``, tab ``\\t``, carriage return ``\\r``; any other control character (C0,
DEL, C1), U+2028, U+2029 (everything ``str.splitlines`` splits on) and lone surrogates (file names that are
not valid UTF-8, as Python's ``os`` functions give them) are written ``\\xHH`` or ``\\uHHHH``. Every other
character is itself, so ordinary names read back unchanged; :func:`decode_name` undoes the escaping
(``os.fsencode(decode_name(line))`` gives the original bytes of a file name).

``format="parquet"`` (sharded; any size, any number of processes)::

    DIR/part-NNNNN.parquet  one per input shard (a .tar file, or a run of ``files_per_part`` files): columns
                            key (string: the file path, or the member's key in its tar shard),
                            source (string: the file, or the shard, it came from),
                            embedding (fixed-size list of float32: D values for "cls"; for "tokens" /
                            "patches" a fixed-size list of T fixed-size lists of D, row-major, i.e. one
                            (T, D) array per row, token order as ``Embedder`` returns it)
    DIR/manifest.json       "format": "vitreg-jax-embed-parquet/1", "status": "complete", "parts" (file,
                            shard index, source, rows, failed), "failures" (source, key, reason), counts,
                            model, checkpoint provenance, size, dtype, features, embedding_shape

NNNNN is the shard's index in the run's ordered list of shards (zero-padded to at least five digits), so
parts sort in input order and every shard maps to one part whichever process wrote it. Names are carried as
data (newlines included); a name that is not valid UTF-8 cannot be a parquet string and is listed as a
failure instead. Parts are readable without our code: ``pyarrow.parquet.read_table(sorted(glob))`` or
``pyarrow.dataset.dataset(DIR, format="parquet", exclude_invalid_files=True)`` (which skips manifest.json),
``polars.read_parquet("DIR/*.parquet")`` (an Array column), DuckDB's ``read_parquet('DIR/*.parquet')``
(parquet itself has no fixed-size list: DuckDB sees ``FLOAT[]``, or ``FLOAT[][]`` for tokens; the fixed
sizes travel in the arrow schema that pyarrow and polars read back). Each part also carries its own record
(shard, source, rows, failures, run id) as JSON under the schema metadata key ``vitreg_jax.part``, from which
the run's last step builds the manifest.

Both formats are written from the same parts: every finished shard becomes one part file, written under a
temporary name and renamed (``vitreg_jax.fileio``), so a part is complete or absent. For ``npy`` the parts
sit in the run's state folder and are merged into the four files at the end; for ``parquet`` they are the
output. The completion marker (``meta.json`` / ``manifest.json``) is written last.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from vitreg_jax.errors import UserError
from vitreg_jax.fileio import atomic_write, atomic_write_json

if TYPE_CHECKING:
    import pyarrow as pa

NPY_FORMAT = "vitreg-jax-embed/1"
PARQUET_FORMAT = "vitreg-jax-embed-parquet/1"
NPY_FILES = ("embeddings.npy", "paths.txt", "failed.txt", "sources.txt", "meta.json")
META_FILE = "meta.json"
MANIFEST_FILE = "manifest.json"
PART_METADATA_KEY = b"vitreg_jax.part"
PART_GLOB = "part-*.parquet"
PART_DIGITS = 5
NAMES_ENCODING = "escaped"
NOT_UTF8 = "name is not valid UTF-8 (parquet strings must be)"
# the reason recorded for an image whose embedding holds NaN or inf (broken weights or a broken input)
NON_FINITE = "non-finite embedding (NaN or inf)"

# everything str.splitlines splits on, other control characters, and lone surrogates
_SPECIAL = re.compile("[\\\\\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_SHORT = {"\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}
_ESCAPE = re.compile(r"\\(\\|n|t|r|x[0-9a-f]{2}|u[0-9a-f]{4})")
_UNSHORT = {"\\": "\\", "n": "\n", "t": "\t", "r": "\r"}


# names -------------------------------------------------------------------------------------------------
def _escape_char(match: re.Match[str]) -> str:
    ch = match.group(0)
    if ch in _SHORT:
        return _SHORT[ch]
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def encode_name(name: str) -> str:
    """``name`` as one line of ``paths.txt`` / ``failed.txt`` (see the module docstring)."""
    return _SPECIAL.sub(_escape_char, name) if _SPECIAL.search(name) else name


def decode_name(line: str) -> str:
    """The name that :func:`encode_name` wrote as ``line``."""
    if "\\" not in line:
        return line

    def unescape(match: re.Match[str]) -> str:
        code = match.group(1)
        return _UNSHORT[code] if code in _UNSHORT else chr(int(code[1:], 16))

    return _ESCAPE.sub(unescape, line)


def is_utf8(name: str) -> bool:
    """False for names holding lone surrogates (undecodable bytes of a file name)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# parts ---------------------------------------------------------------------------------------------------
@dataclass
class PartData:
    """One shard's results: rows in input order, and the inputs that could not be read."""

    index: int
    source: str
    keys: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    rows: list[np.ndarray] = field(default_factory=list)  # blocks of (n, *shape) float32
    failures: list[dict[str, str]] = field(default_factory=list)  # {"source", "key", "reason"}


def part_name(index: int) -> str:
    return f"part-{index:0{PART_DIGITS}d}.parquet"


def embedding_type(shape: Sequence[int]) -> pa.DataType:
    """float32 fixed-size lists nested as ``shape`` says: (D,) -> list<D>, (T, D) -> list<list<D>, T>."""
    import pyarrow as pa

    dtype: pa.DataType = pa.float32()
    for n in reversed(shape):
        dtype = pa.list_(dtype, int(n))
    return dtype


def _embedding_array(values: np.ndarray, shape: Sequence[int]) -> pa.Array:
    import pyarrow as pa

    array: pa.Array = pa.array(np.ascontiguousarray(values, np.float32).reshape(-1))
    for n in reversed(shape):
        array = pa.FixedSizeListArray.from_arrays(array, int(n))
    return array


def write_part(path: Path, part: PartData, shape: Sequence[int], run_id: str) -> dict[str, Any]:
    """Write one part file atomically; returns its record (also stored in the file's schema metadata)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    values = np.concatenate(part.rows) if part.rows else np.zeros((0, *shape), np.float32)  # (n, *shape)
    record = {
        "file": path.name,
        "index": part.index,
        "source": part.source,
        "rows": len(part.keys),
        "failed": len(part.failures),
        "failures": part.failures,
        "run": run_id,
    }
    schema = pa.schema(
        [("key", pa.string()), ("source", pa.string()), ("embedding", embedding_type(shape))],
        metadata={PART_METADATA_KEY: json.dumps(record).encode()},
    )
    table = pa.Table.from_arrays(
        [
            pa.array(part.keys, pa.string()),
            pa.array(part.sources, pa.string()),
            _embedding_array(values, shape),
        ],
        schema=schema,
    )
    atomic_write(path, lambda f: pq.write_table(table, f))
    return record


def read_part_record(path: Path) -> dict[str, Any]:
    """The record a part carries in its schema metadata (its footer only is read)."""
    import pyarrow.parquet as pq

    metadata = pq.read_schema(path).metadata or {}
    if PART_METADATA_KEY not in metadata:
        raise UserError(f"{path} is not a part that vitreg-jax embed wrote (no {PART_METADATA_KEY.decode()})")
    return json.loads(metadata[PART_METADATA_KEY])


def _part_values(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    """keys, sources and (n, *shape) float32 embeddings of one part."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    values = _flat_values(table.column("embedding").combine_chunks())
    return table.column("key").to_pylist(), table.column("source").to_pylist(), values


def _flat_values(column: pa.Array) -> np.ndarray:
    """(n, *shape) float32 from a (nested) fixed-size-list column."""
    import pyarrow as pa

    shape: list[int] = []
    array = column
    while pa.types.is_fixed_size_list(array.type):
        shape.append(array.type.list_size)
        array = array.flatten()
    return array.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(len(column), *shape)


# the npy layout ------------------------------------------------------------------------------------------
def write_npy(
    out: Path,
    part_files: Sequence[Path],
    records: Sequence[Mapping[str, Any]],
    shape: Sequence[int],
    meta: Mapping[str, Any],
) -> dict[str, int]:
    """Merge parts (in shard order) into embeddings.npy, paths.txt, failed.txt (+ sources.txt), meta.json.

    The parts of an npy run hold their keys and sources already escaped (:func:`encode_name`), so that names
    that are not valid UTF-8 survive the parquet strings; the records' failures hold the names as they are.

    Each file is written under a temporary name and renamed; meta.json comes last and marks completion.
    """
    total = sum(int(r["rows"]) for r in records)
    keys: list[str] = []
    sources: list[str] = []

    def write_embeddings(f: IO[bytes]) -> None:
        header = {"descr": "<f4", "fortran_order": False, "shape": (total, *map(int, shape))}
        np.lib.format.write_array_header_1_0(f, header)
        for path in part_files:
            part_keys, part_sources, values = _part_values(path)
            keys.extend(part_keys)
            sources.extend(part_sources)
            f.write(np.ascontiguousarray(values, "<f4").tobytes())

    atomic_write(out / "embeddings.npy", write_embeddings)
    if len(keys) != total:
        raise UserError(f"{out}: the parts hold {len(keys)} rows, their records say {total}")
    atomic_write(out / "paths.txt", lambda f: _write_lines(f, keys, escaped=True))
    separate_sources = keys != sources
    if separate_sources:
        atomic_write(out / "sources.txt", lambda f: _write_lines(f, sources, escaped=True))
    else:
        (out / "sources.txt").unlink(missing_ok=True)
    failures = [x for r in records for x in r["failures"]]
    atomic_write(
        out / "failed.txt",
        lambda f: _write_lines(
            f, (f"{encode_name(x['key'])}\t{encode_name(x['reason'])}" for x in failures), escaped=True
        ),
    )
    counts = {"embedded": total, "failed": len(failures)}
    atomic_write_json(
        out / META_FILE,
        {
            **meta,
            "counts": {**meta.get("counts", {}), **counts},
            "names": NAMES_ENCODING,
            "sources_file": separate_sources,
            "failures": failures,
        },
    )
    return counts


def _write_lines(f: IO[bytes], lines: Iterable[str], *, escaped: bool = False) -> None:
    for line in lines:
        f.write(((line if escaped else encode_name(line)) + "\n").encode("utf-8"))


def read_npy_names(out: Path, name: str = "paths.txt") -> list[str]:
    """The names of ``paths.txt`` (or ``sources.txt``), unescaped."""
    with open(out / name, encoding="utf-8", newline="\n") as f:
        return [decode_name(line.rstrip("\n")) for line in f]


# the parquet layout ----------------------------------------------------------------------------------------
def write_manifest(
    out: Path, records: Sequence[Mapping[str, Any]], meta: Mapping[str, Any]
) -> dict[str, int]:
    """manifest.json for the parts of a finished parquet run (written last: it marks completion)."""
    parts = [{k: r[k] for k in ("file", "index", "source", "rows", "failed")} for r in records]
    failures = [x for r in records for x in r["failures"]]
    counts = {"embedded": sum(p["rows"] for p in parts), "failed": len(failures), "parts": len(parts)}
    atomic_write_json(
        out / MANIFEST_FILE,
        {**meta, "counts": {**meta.get("counts", {}), **counts}, "parts": parts, "failures": failures},
    )
    return counts
