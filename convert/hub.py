"""Published birder weights by name: fetched once from the Hugging Face hub, checked by sha256, cached.

``resolve("vit_reg4_b16_mim_200")`` returns the cached ``.pt`` file (downloading it the first time) together
with the json config published beside it; ``resolve_weights`` returns just the weights path. An existing local
path is passed through unchanged, so every command can take "a file or a published name".

Safety rules:

- a weights file is accepted only when its sha256 is one of the known hashes for its name (``PUBLISHED``);
  the matching hash also says which state_dict key layout the file uses (``"current"``: birder >= 0.4
  re-export, ``"legacy"``: the older ``self_attention`` / ``ln1`` names);
- a download streams into a temporary file beside its destination, is hashed while streaming and is renamed
  into place only after the hash matched; on any failure (HTTP error, refused connection, timeout, truncated
  response, wrong hash, Ctrl-C) the temporary file is removed;
- a cached file whose hash does not match is never used: it is deleted and downloaded again;
- two processes never download the same file at once (an ``fcntl.flock`` on a lock file beside it);
- the json config is **not** hash-checked (birder publishes no hash for it; it was edited in place on the hub
  over time); it is optional, and its absence on the server is remembered so that later calls stay offline.

Configuration: the cache lives in ``$VITREG_JAX_CACHE`` (default ``~/.cache/vitreg-jax``), laid out as
``<cache>/<hub repo>/<file>``; the hub base address is ``$VITREG_JAX_HUB_URL`` (default
``https://huggingface.co``), which lets tests and mirrors serve the same ``<repo>/resolve/main/<file>``
layout.

Every failure raises :class:`vitreg_jax.errors.UserError` with one line naming the URL or name and the
problem.
This module uses only the standard library and tqdm (no torch, no jax).
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import http.client
import json
import os
import secrets
import sys
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path

from tqdm import tqdm

from vitreg_jax.errors import UserError

try:  # POSIX only; elsewhere downloads are not serialised across processes (still atomic and hash-checked)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "DEFAULT_BASE_URL",
    "ENV_CACHE",
    "ENV_HUB_URL",
    "LAYOUT_CURRENT",
    "LAYOUT_LEGACY",
    "PUBLISHED",
    "Published",
    "Resolved",
    "default_cache_dir",
    "hub_base_url",
    "published_names",
    "resolve",
    "resolve_weights",
]

ENV_CACHE = "VITREG_JAX_CACHE"
ENV_HUB_URL = "VITREG_JAX_HUB_URL"
DEFAULT_CACHE_DIR = Path("~/.cache/vitreg-jax")
DEFAULT_BASE_URL = "https://huggingface.co"
HUB_REVISION = "main"
URL_SCHEMES = ("http", "https", "file")  # file:// serves a local mirror laid out like the hub
USER_AGENT = "vitreg-jax (+https://pypi.org/project/vitreg-jax/)"

DEFAULT_TIMEOUT_S = 30.0  # per socket operation (connect, each read), not for the whole download
CONFIG_TIMEOUT_S = 10.0  # the json is small and optional: do not make a cache hit wait long for it
CHUNK_BYTES = 1 << 20
MAX_CONFIG_BYTES = 1 << 20  # a birder json config is ~1 KB; anything this large is not one

LAYOUT_CURRENT = "current"  # state_dict keys of birder >= 0.4 (attn.qkv, norm1, norm2)
LAYOUT_LEGACY = "legacy"  # state_dict keys of birder < 0.4 (self_attention.in_proj_*, ln1, ln2)

TMP_SUFFIX = ".part"
LOCK_SUFFIX = ".lock"
MISSING_SUFFIX = ".missing"  # marker: the server answered 404 for this (optional) config file


@dataclass(frozen=True)
class Published:
    """One published weight file: where it lives on the hub and which sha256 values are accepted.

    ``hashes`` maps a sha256 hex digest to the key layout of the file that has it (``LAYOUT_CURRENT`` or
    ``LAYOUT_LEGACY``). Tests replace entries of ``PUBLISHED`` (``dataclasses.replace(p, hashes={...})``) to
    serve small fake files.
    """

    name: str
    repo: str  # "<owner>/<name>" on the hub
    filename: str
    config_filename: str | None
    hashes: Mapping[str, str]

    def url(self, base_url: str) -> str:
        return _hub_url(base_url, self.repo, self.filename)

    def config_url(self, base_url: str) -> str | None:
        return None if self.config_filename is None else _hub_url(base_url, self.repo, self.config_filename)


def _published(name: str, repo: str, config_filename: str, hashes: Mapping[str, str]) -> Published:
    return Published(
        name=name, repo=repo, filename=f"{name}.pt", config_filename=config_filename, hashes=hashes
    )


_REPO = "birder-project/vit_reg4_b16_mim"
_REPO_LEGACY = "birder-project/vitreg4_b16_mim"

# sha256 values: reference/birder-vit-reg4.md section 0 (birder's registry for the re-exports; git history for
# the pre-0.4 files, which the hub served under these same names before 2026-01).
PUBLISHED: dict[str, Published] = {
    p.name: p
    for p in (
        _published(
            "vit_reg4_b16_mim_200",
            _REPO,
            "vit_reg4_b16_mim.json",
            {
                "c7ec433c01e1dc0d6100cafc29fa88155a0d65f4b42afa9cc252b77485a566a7": LAYOUT_CURRENT,
                "6b044cd7834293e344309f809070db3fe9ede489478e7549ad96255f9d76b329": LAYOUT_LEGACY,
            },
        ),
        _published(
            "vit_reg4_b16_mim_300",
            _REPO,
            "vit_reg4_b16_mim.json",
            {
                "b0e5e2b24ea7a8d2be246df43c9d8092354f6ee81e88c6cdd7c52d8e38ed44a4": LAYOUT_CURRENT,
                "e0df2e79f8ed0612d12c736cc6317be1b9b354e468715a5077366f7676fdd2ce": LAYOUT_LEGACY,
            },
        ),
        _published(
            "vitreg4_b16_mim_200",
            _REPO_LEGACY,
            "vitreg4_b16_mim.json",
            {"6b044cd7834293e344309f809070db3fe9ede489478e7549ad96255f9d76b329": LAYOUT_LEGACY},
        ),
    )
}


@dataclass(frozen=True)
class Resolved:
    """What a weights argument resolved to.

    For a local path only ``weights`` is set. For a published name: the verified cached file, its json config
    (``None`` when the hub has none or it could not be fetched; never hash-checked), the key layout the
    matching hash identifies, and that hash.
    """

    weights: Path
    config: Path | None = None
    layout: str | None = None
    sha256: str | None = None
    name: str | None = None  # the published name; None for a local path


def published_names() -> list[str]:
    """The published weight names, sorted."""
    return sorted(PUBLISHED)


def default_cache_dir() -> Path:
    """``$VITREG_JAX_CACHE``, else ``~/.cache/vitreg-jax``."""
    return Path(os.environ.get(ENV_CACHE) or DEFAULT_CACHE_DIR).expanduser()


def hub_base_url(base_url: str | None = None) -> str:
    """The hub base address: the argument, else ``$VITREG_JAX_HUB_URL``, else ``https://huggingface.co``."""
    return (base_url or os.environ.get(ENV_HUB_URL) or DEFAULT_BASE_URL).rstrip("/")


def resolve_weights(
    name_or_path: str | os.PathLike[str],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    base_url: str | None = None,
    progress: bool = True,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> Path:
    """A local weights path, or the verified cached file of a published name (downloaded if needed)."""
    return resolve(
        name_or_path, cache_dir=cache_dir, base_url=base_url, progress=progress, timeout=timeout
    ).weights


def resolve(
    name_or_path: str | os.PathLike[str],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    base_url: str | None = None,
    progress: bool = True,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> Resolved:
    """Resolve a local path (returned as is) or a published weight name (cached, sha256-verified).

    ``progress`` shows a tqdm bar (bytes, bytes/s) on stderr while downloading. ``timeout`` bounds each
    socket operation in seconds. Raises :class:`UserError` on every failure.
    """
    text = os.fspath(name_or_path)
    if not text:
        raise UserError(f"empty weights argument: expected a file path or a published name ({_known()})")
    path = Path(text).expanduser()
    if path.exists():
        return Resolved(weights=path)
    pub = PUBLISHED.get(text)
    if pub is None:
        raise UserError(_unknown_message(text))

    base = _checked_base_url(hub_base_url(base_url))
    target = _cache_root(cache_dir) / pub.repo / pub.filename
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(
            f"cannot create the weights cache {target.parent}: {_one_line(e)} (set ${ENV_CACHE})"
        ) from None

    hit = _verified(target, pub.hashes)
    if hit is None:
        with _locked(target.with_name(target.name + LOCK_SUFFIX), progress=progress, what=pub.name):
            hit = _verified(target, pub.hashes)  # another process may have finished it meanwhile
            if hit is None:
                with contextlib.suppress(FileNotFoundError):
                    target.unlink()  # present but wrong: never used, and not kept
                hit = _download(pub.url(base), target, pub.hashes, timeout=timeout, progress=progress)
    digest, layout = hit
    return Resolved(
        weights=target,
        config=_config(pub, target.parent, base, timeout),
        layout=layout,
        sha256=digest,
        name=pub.name,
    )


# ------------------------------------------------------------------------------------------------------------
# internals


def _hub_url(base_url: str, repo: str, filename: str) -> str:
    return f"{base_url.rstrip('/')}/{repo}/resolve/{HUB_REVISION}/{filename}"


def _checked_base_url(base: str) -> str:
    parts = urllib.parse.urlsplit(base)
    if parts.scheme not in URL_SCHEMES or (parts.scheme != "file" and not parts.netloc):
        raise UserError(
            f"invalid hub URL {base!r}: expected http(s)://host[:port][/path] "
            f"(from base_url or ${ENV_HUB_URL})"
        )
    return base


def _cache_root(cache_dir: str | os.PathLike[str] | None) -> Path:
    return default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser()


def _known() -> str:
    return "known names: " + ", ".join(published_names())


def _unknown_message(text: str) -> str:
    stem = Path(text).stem if text.endswith(".pt") else text
    close = difflib.get_close_matches(stem, published_names(), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{text!r} is neither an existing file nor a published weight name ({_known()}){hint}"


def _one_line(e: BaseException | object) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _verified(path: Path, hashes: Mapping[str, str]) -> tuple[str, str] | None:
    """(sha256, layout) of a cached file whose hash is known, else None (missing or wrong)."""
    try:
        if not path.is_file():
            return None
        digest = _sha256(path)
    except OSError:
        return None
    layout = hashes.get(digest)
    return None if layout is None else (digest, layout)


@contextlib.contextmanager
def _locked(lock_path: Path, *, progress: bool, what: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path``; the lock file is removed again on release.

    Removing a lock file is safe only with the inode check: a waiter that wakes up on a file that was unlinked
    meanwhile retries on the current one.
    """
    if fcntl is None:  # pragma: no cover - Windows
        yield
        return
    told = False
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"cannot create the lock file {lock_path}: {_one_line(e)}") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if progress and not told:
                    print(f"waiting for another process downloading {what} ({lock_path})", file=sys.stderr)
                    told = True
                fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                current = os.stat(lock_path)
            except FileNotFoundError:
                current = None
            held = os.fstat(fd)
            if current is not None and (current.st_dev, current.st_ino) == (held.st_dev, held.st_ino):
                break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # the file we locked was replaced: lock the current one
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock_path)  # while still holding the lock
        os.close(fd)


def _open(url: str, timeout: float) -> http.client.HTTPResponse:
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    return urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 - the scheme is the user's choice


def _failure(url: str, e: BaseException, timeout: float) -> str:
    """One line describing why a request to ``url`` failed."""
    if isinstance(e, urllib.error.HTTPError):
        return f"download failed: {url}: HTTP {e.code} {_one_line(e.reason)}"
    reason = e.reason if isinstance(e, urllib.error.URLError) else e
    if isinstance(reason, TimeoutError):
        return f"download failed: {url}: no answer within {timeout:g} s (timed out)"
    if isinstance(reason, (http.client.HTTPException, ConnectionError)):
        what = f"{type(reason).__name__}: {_one_line(reason)}"
        return f"download failed: {url}: connection interrupted ({what})"
    if isinstance(e, ValueError):
        return f"download failed: {url}: not a valid URL ({_one_line(e)}; check ${ENV_HUB_URL})"
    return f"download failed: {url}: {_one_line(reason)}"


def _content_length(response: http.client.HTTPResponse) -> int | None:
    value = response.headers.get("Content-Length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _temp_beside(dest: Path) -> tuple[int, Path]:
    """A new file next to ``dest`` (same file system, so the final rename is atomic), mode 0o644 & ~umask."""
    tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(6)}{TMP_SUFFIX}")
    return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644), tmp


def _download(
    url: str, dest: Path, hashes: Mapping[str, str], *, timeout: float, progress: bool
) -> tuple[str, str]:
    """Stream ``url`` into ``dest`` if its sha256 is a key of ``hashes``; return (sha256, layout)."""
    tmp: Path | None = None
    try:
        with _open(url, timeout) as response:
            total = _content_length(response)
            fd, tmp = _temp_beside(dest)
            digest = hashlib.sha256()
            received = 0
            with (
                os.fdopen(fd, "wb") as out,
                tqdm(
                    total=total,
                    desc=dest.name,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    file=sys.stderr,
                    disable=not progress,
                    dynamic_ncols=True,
                ) as bar,
            ):
                while chunk := response.read(CHUNK_BYTES):
                    out.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            if total is not None and received != total:
                raise UserError(
                    f"download failed: {url}: connection interrupted after {received} of {total} bytes"
                )
        sha = digest.hexdigest()
        layout = hashes.get(sha)
        if layout is None:
            expected = " or ".join(sorted(hashes))
            raise UserError(
                f"download refused: {url}: sha256 {sha} is not the published {expected}; file deleted"
            )
        os.replace(tmp, dest)
        tmp = None
        return sha, layout
    except UserError:
        raise
    except (OSError, ValueError, http.client.HTTPException) as e:  # URLError/HTTPError/timeouts are OSErrors
        if isinstance(e, urllib.error.HTTPError):
            e.close()  # it holds the response body
        raise UserError(_failure(url, e, timeout)) from None
    finally:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


def _config(pub: Published, folder: Path, base_url: str, timeout: float) -> Path | None:
    """The cached json config of ``pub``; fetched once if not cached. Never hash-checked; never fatal."""
    if pub.config_filename is None:
        return None
    dest = folder / pub.config_filename
    if dest.is_file():
        return dest
    missing = dest.with_name(dest.name + MISSING_SUFFIX)
    if missing.exists():
        return None
    url = pub.config_url(base_url)
    assert url is not None
    timeout = min(timeout, CONFIG_TIMEOUT_S)
    try:
        with _open(url, timeout) as response:
            data = response.read(MAX_CONFIG_BYTES + 1)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == HTTPStatus.NOT_FOUND:
            missing.touch()  # remembered: later calls do not ask again
            return None
        warnings.warn(f"json config not fetched ({_failure(url, e, timeout)})", stacklevel=3)
        return None
    except (OSError, ValueError, http.client.HTTPException) as e:
        if isinstance(e, urllib.error.URLError) and isinstance(e.reason, FileNotFoundError):  # file:// mirror
            missing.touch()
            return None
        warnings.warn(f"json config not fetched ({_failure(url, e, timeout)})", stacklevel=3)
        return None
    try:
        if len(data) > MAX_CONFIG_BYTES or not isinstance(json.loads(data), dict):
            raise ValueError("not a json object")
    except ValueError:
        warnings.warn(f"json config not used: {url} is not a json config object", stacklevel=3)
        return None
    tmp: Path | None = None
    try:
        fd, tmp = _temp_beside(dest)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp, dest)
        tmp = None
    except OSError as e:
        warnings.warn(f"json config not cached: {dest}: {_one_line(e)}", stacklevel=3)
        return None
    finally:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
    return dest

