"""Where images come from: inputs expanded into an ordered list of shards, and items streamed from a shard.

API (used by the dataset embedder and by `data.iter_item_batches`):

- ``list_shards(inputs, files_per_shard=FILES_PER_SHARD) -> list[Shard]``: expand command-line inputs into
  shards, in input order. ``Shard.index`` is the shard's position in that list (deterministic for the same
  inputs), so processes can split the work by index (``shards_for_process``) without a central list.
  Inputs may be:
  - an image file (any extension) or a folder (searched recursively for image extensions, sorted, hidden
    names skipped), as in ``data.list_inputs``;
  - a ``.txt``/``.lst``/``.list`` file listing paths, one per line (relative to the list's folder; an entry
    ending in ``.tar`` is a shard, any other an image);
  - a ``.tar`` file in the webdataset layout (see below): one shard;
  - a brace pattern, ``shards/part-{0000..0099}.tar`` (zero padding kept) or ``{a,b}``, and/or a shell glob
    (``*``, ``?``, ``[...]``, ``**``; matches sorted);
  - any of the above as an fsspec URL (``file://``, ``memory://``, ``gs://``, ``s3://``, ``https://``...),
    read through fsspec when the protocol's package is installed (``pip install 'vitreg-jax[gcs]'`` for
    ``gs://``, ``[s3]`` for ``s3://``, ``[http]`` for ``https://``); a missing package or an unknown protocol
    is one ``UserError`` line.
  Consecutive image files (from files, folders and lists alike) are grouped into ``kind="files"`` shards of
  at most ``files_per_shard`` files; each tar is one ``kind="tar"`` shard. A local input that does not exist
  is a ``UserError``; a remote ``.tar`` named explicitly (or by a brace pattern) is not checked up front: a
  missing one becomes a failure record when it is read.
- ``iter_items(shard) -> Iterator[Item]``: the shard's items in order. For a files shard, one item per file,
  ``key`` = ``source`` = the path or URL as listed, with ``data=None`` (the decoder reads the file itself, in
  its worker thread). For a tar shard, the archive is read as a stream (``tarfile`` mode ``r|*`` over the
  fsspec file object: nothing is extracted to disk, nothing seeks), members are grouped by key = member
  name up to the first dot of its base name, directory part included (``a/b/0001.jpg`` and
  ``a/b/0001.json`` -> key ``a/b/0001``), consecutive members of one key forming one sample. The sample's
  image is its first member whose extension (after the last dot) is an image extension; its ``.json``,
  ``.txt`` and ``.cls`` members are carried in ``Item.meta`` (extension -> bytes); other members are
  ignored. ``source`` is the shard's URL or path.
- Failures are items with ``reason`` set and ``data=None``: a sample without an image member; a tar that
  cannot be opened, is truncated or corrupt (``key`` = the sample being read, or ``""`` when none was);
  the rest of the stream goes on (a broken tar ends that shard only). Image bytes that do not decode
  become failures later, in the decoder, with the same shard and key.
"""

from __future__ import annotations

import glob as globlib
import os
import posixpath
import re
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, BinaryIO

from vitreg_jax.data.inputs import (
    IMAGE_EXTENSIONS,
    LIST_COMMENT,
    LIST_EXTENSIONS,
    read_list_file,
    walk_images,
)
from vitreg_jax.errors import UserError
from vitreg_jax.fileio import first_line, open_regular_file

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

# Image files per "files" shard: the unit of output parts and of resuming for file inputs.
FILES_PER_SHARD = 1000
# webdataset shards: plain or gzip-compressed tar archives (read as a stream either way)
TAR_EXTENSIONS = (".tar", ".tar.gz", ".tgz")
META_EXTENSIONS = frozenset({"json", "txt", "cls"})
# fsspec protocol -> the vitreg-jax extra that installs its filesystem package
EXTRAS = {"gs": "gcs", "gcs": "gcs", "s3": "s3", "s3a": "s3", "http": "http", "https": "http"}
GLOB_CHARS = re.compile(r"[*?\[]")
BRACE = re.compile(r"\{([^{}]*)\}")
RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
MAX_BRACE_EXPANSION = 1_000_000


@dataclass(frozen=True)
class Shard:
    """One unit of input: a tar archive (``url``) or a run of image files (``files``). ``index``: position."""

    index: int
    kind: str  # "tar" | "files"
    url: str = ""
    files: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """How failures and progress name the shard: the tar's URL, or the first file of the run."""
        return self.url if self.kind == "tar" else f"{self.files[0]} (+{len(self.files) - 1} files)"


@dataclass(frozen=True)
class Item:
    """One sample: ``data`` holds the encoded image (``None`` for a file the decoder reads itself, or when
    ``reason`` says why the sample failed); ``meta`` the sample's .json/.txt/.cls members."""

    shard: int
    key: str
    source: str
    data: bytes | None = None
    reason: str | None = None
    meta: dict[str, bytes] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------- listing
def list_shards(
    inputs: Sequence[str | os.PathLike[str]], files_per_shard: int = FILES_PER_SHARD
) -> list[Shard]:
    """Expand inputs into ordered shards (see the module docstring); ``UserError`` when nothing is found."""
    if isinstance(files_per_shard, bool) or not isinstance(files_per_shard, int) or files_per_shard < 1:
        raise UserError(f"files_per_shard must be a positive integer, got {files_per_shard!r}")
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    entries: list[tuple[str, str]] = []  # (kind, path-or-url) with kind "tar" | "file"
    for item in inputs:
        entries.extend(_expand_input(os.fspath(item)))
    if not entries:
        shown = ", ".join(os.fspath(i) for i in inputs) or "(no inputs)"
        raise UserError(f"no images or .tar shards found in {shown}")
    return _group(entries, files_per_shard)


def shards_for_process(shards: Sequence[Shard], process_index: int, process_count: int) -> list[Shard]:
    """The shards process ``process_index`` of ``process_count`` takes: those whose index is congruent to
    it."""
    if not 0 <= process_index < process_count:
        raise UserError(f"process index {process_index} is not in 0..{process_count - 1}")
    return [s for s in shards if s.index % process_count == process_index]


def _group(entries: list[tuple[str, str]], files_per_shard: int) -> list[Shard]:
    shards: list[Shard] = []
    run: list[str] = []

    def flush() -> None:
        for start in range(0, len(run), files_per_shard):
            shards.append(Shard(len(shards), "files", files=tuple(run[start : start + files_per_shard])))
        run.clear()

    for kind, name in entries:
        if kind == "file":
            run.append(name)
        else:
            flush()
            shards.append(Shard(len(shards), "tar", url=name))
    flush()
    return shards


def expand_braces(pattern: str) -> list[str]:
    """``{a,b}`` alternatives and ``{0000..0099}`` ranges (zero padding kept), left to right, in order."""
    match = BRACE.search(pattern)
    if match is None:
        return [pattern]
    body, head, tail = match.group(1), pattern[: match.start()], pattern[match.end() :]
    numbers = RANGE.match(body)
    if numbers:
        lo, hi = int(numbers.group(1)), int(numbers.group(2))
        width = max(len(numbers.group(1)), len(numbers.group(2)))
        padded = any(len(g.lstrip("-")) > 1 and g.lstrip("-")[0] == "0" for g in numbers.groups())
        step = 1 if hi >= lo else -1
        if abs(hi - lo) >= MAX_BRACE_EXPANSION:
            raise UserError(f"brace range {{{body}}} in {pattern} has more than {MAX_BRACE_EXPANSION} values")
        choices = [f"{n:0{width}d}" if padded else str(n) for n in range(lo, hi + step, step)]
    elif "," in body:
        choices = body.split(",")
    else:
        return [head + "{" + body + "}" + t for t in expand_braces(tail)]
    return [head + c + t for c in choices for t in expand_braces(tail)]


def _expand_input(name: str) -> list[tuple[str, str]]:
    if not is_url(name) and os.path.exists(name):  # a local name holding braces or glob characters
        return _expand_local_path(name)
    out: list[tuple[str, str]] = []
    for expanded in expand_braces(name):
        if is_url(expanded):
            out.extend(_expand_remote(expanded))
        else:
            out.extend(_expand_local(expanded))
    return out


def is_url(name: str) -> bool:
    """Whether ``name`` starts with a URL scheme (``gs://``, ``file://``...)."""
    return re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", name) is not None


def _kind_of_file(name: str) -> str:
    lower = name.lower()
    if lower.endswith(TAR_EXTENSIONS):
        return "tar"
    return "list" if posixpath.splitext(lower)[1] in LIST_EXTENSIONS else "file"


def _expand_local(name: str) -> list[tuple[str, str]]:
    if GLOB_CHARS.search(name) and not os.path.exists(name):
        matches = sorted(globlib.glob(name, recursive=True))
        if not matches:
            raise UserError(f"no files match {name}")
        return [entry for m in matches for entry in _expand_local_path(m)]
    return _expand_local_path(name)


def _expand_local_path(name: str) -> list[tuple[str, str]]:
    if os.path.isdir(name):  # its images, then its tar shards (a folder of shards is a dataset too)
        return [("file", p) for p in walk_images(name)] + [("tar", p) for p in _walk_tars(name)]
    if not os.path.isfile(name):
        if os.path.exists(name):
            raise UserError(f"input {name} is neither a file nor a folder")
        raise UserError(
            f"input not found: {name} (expected an image file, a folder, a .tar shard or a .txt list of "
            "paths)"
        )
    kind = _kind_of_file(name)
    if kind == "list":
        return [("tar" if p.lower().endswith(TAR_EXTENSIONS) else "file", p) for p in read_list_file(name)]
    return [(kind, name)]


# ---------------------------------------------------------------------------------------------- fsspec
def filesystem(url: str) -> tuple[AbstractFileSystem, str]:
    """The fsspec filesystem for ``url`` and the path within it; a missing package is one UserError line."""
    import fsspec

    protocol = url.split("://", 1)[0].lower()
    try:
        cls = fsspec.get_filesystem_class(protocol)
    except ImportError as e:
        extra = EXTRAS.get(protocol)
        fix = f"pip install 'vitreg-jax[{extra}]'" if extra else f"install it ({first_line(e)})"
        raise UserError(
            f"{url}: reading {protocol}:// URLs needs a package that is not installed: {fix}"
        ) from None
    except ValueError:
        raise UserError(f"{url}: unknown URL protocol {protocol}:// (fsspec does not know it)") from None
    fs = cls()
    return fs, cls._strip_protocol(url)


def _join_url(url: str, fs: AbstractFileSystem, path: str) -> str:
    """A path listed by ``fs`` as a URL of the same protocol as ``url``."""
    return fs.unstrip_protocol(path) if "://" in url else path


def _expand_remote(url: str) -> list[tuple[str, str]]:
    fs, path = filesystem(url)
    try:
        if GLOB_CHARS.search(path):
            matches = sorted(fs.glob(path))
            if not matches:
                raise UserError(f"no files match {url}")
            return [e for m in matches for e in _expand_remote_path(url, fs, m, listed=True)]
        return _expand_remote_path(url, fs, path, listed=False)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - each filesystem raises its own types for missing or denied URLs
        raise UserError(f"cannot list {url}: {first_line(e)}") from None


def _expand_remote_path(url: str, fs: AbstractFileSystem, path: str, listed: bool) -> list[tuple[str, str]]:
    kind = _kind_of_file(path)
    full = _join_url(url, fs, path) if listed else url
    if kind == "tar" or (kind == "file" and posixpath.splitext(path.lower())[1] in IMAGE_EXTENSIONS):
        return [(kind, full)]
    if kind == "list":
        return _read_remote_list(full, fs, path)
    if fs.isdir(path):
        found = sorted(p for p in fs.find(path) if _visible_image(posixpath.relpath(p, path)))
        tars = sorted(p for p in fs.find(path) if _visible_tar(posixpath.relpath(p, path)))
        return [("file", _join_url(url, fs, p)) for p in found] + [
            ("tar", _join_url(url, fs, p)) for p in tars
        ]
    if fs.isfile(path):
        return [("file", full)]
    raise UserError(f"input not found: {full}")


def _walk_tars(folder: str) -> list[str]:
    """The tar shards under ``folder``, recursively, sorted by path; hidden names skipped."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [
            os.path.join(root, f)
            for f in files
            if not f.startswith(".") and f.lower().endswith(TAR_EXTENSIONS)
        ]
    return sorted(found, key=lambda p: os.path.relpath(p, folder).split(os.sep))


def _visible_tar(rel: str) -> bool:
    return not any(p.startswith(".") for p in rel.split("/")) and rel.lower().endswith(TAR_EXTENSIONS)


def _visible_image(rel: str) -> bool:
    parts = rel.split("/")
    return (
        not any(p.startswith(".") for p in parts) and posixpath.splitext(rel.lower())[1] in IMAGE_EXTENSIONS
    )


def _read_remote_list(url: str, fs: AbstractFileSystem, path: str) -> list[tuple[str, str]]:
    try:
        text = fs.cat_file(path).decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read the path list {url}: {first_line(e)}") from None
    base = url.rsplit("/", 1)[0]
    out = []
    for line in text.splitlines():
        entry = line.strip()
        if entry and not entry.startswith(LIST_COMMENT):
            entry = entry if is_url(entry) or entry.startswith("/") else f"{base}/{entry}"
            out.append(("tar" if entry.lower().endswith(TAR_EXTENSIONS) else "file", entry))
    return out


# ---------------------------------------------------------------------------------------------- items
def iter_items(shard: Shard) -> Iterator[Item]:
    """The shard's items in order (see the module docstring); read lazily, one tar member at a time."""
    if shard.kind == "files":
        for path in shard.files:
            yield Item(shard.index, path, path)
        return
    yield from _tar_items(shard)


def read_bytes(path_or_url: str) -> bytes:
    """The bytes of a local file or an fsspec URL (OSError for a missing or unreadable one)."""
    if not is_url(path_or_url):
        with open_regular_file(path_or_url) as handle:
            return handle.read()
    fs, path = filesystem(path_or_url)
    return fs.cat_file(path)


def _open_stream(url: str) -> BinaryIO:
    """A binary file object for a local path or an fsspec URL (the caller closes it)."""
    if not is_url(url):
        return open_regular_file(url)
    fs, path = filesystem(url)
    return fs.open(path, "rb")


def _split_member(name: str) -> tuple[str, str]:
    """(key, extension after the first dot of the base name): ``a/b/x.seg.png`` -> (``a/b/x``,
    ``seg.png``)."""
    folder, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(folder, stem) if folder else stem, ext.lower()


def _tar_items(shard: Shard) -> Iterator[Item]:
    key, image, meta = None, None, {}
    try:
        with _open_stream(shard.url) as stream, tarfile.open(fileobj=stream, mode="r|*") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                member_key, ext = _split_member(member.name)
                if member_key != key:
                    if key is not None:
                        yield _sample(shard, key, image, meta)
                    key, image, meta = member_key, None, {}
                last = ext.rsplit(".", 1)[-1]
                if image is None and f".{last}" in IMAGE_EXTENSIONS:
                    image = _read_member(archive, member)
                elif last in META_EXTENSIONS and ext == last:
                    meta[last] = _read_member(archive, member)
    # OSError / EOFError / TarError locally; remote filesystems raise their own types (HTTP, auth, timeouts)
    except Exception as e:  # noqa: BLE001 - recorded with its type; the other shards go on
        yield Item(
            shard.index, key or "", shard.url, reason=f"unreadable shard {shard.url}: {_tar_reason(e)}"
        )
        return
    if key is not None:
        yield _sample(shard, key, image, meta)


def _read_member(archive: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    handle = archive.extractfile(member)
    assert handle is not None  # regular files always have data
    data = handle.read()
    if len(data) != member.size:
        raise EOFError(f"member {member.name} is cut short ({len(data)} of {member.size} bytes)")
    return data


def _sample(shard: Shard, key: str, image: bytes | None, meta: dict[str, bytes]) -> Item:
    if image is None:
        kinds = ", ".join(sorted(meta)) or "none readable"
        return Item(
            shard.index, key, shard.url, reason=f"no image member in the sample (members: {kinds})", meta=meta
        )
    return Item(shard.index, key, shard.url, data=image, meta=meta)


def _tar_reason(error: BaseException) -> str:
    if isinstance(error, FileNotFoundError):
        return "file not found"
    if isinstance(error, EOFError) or "unexpected end" in str(error).lower():
        return f"truncated ({first_line(error)})"
    if isinstance(error, tarfile.TarError):
        return f"not a valid tar archive ({first_line(error)})"
    if isinstance(error, (OSError, UserError)):
        return first_line(error)
    return f"{type(error).__name__}: {first_line(error)}"
