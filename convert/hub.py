"""Published birder weights by name, through ``huggingface_hub``: a pinned revision, sha256-checked, cached.

``resolve("vit_reg4_b16_mim_200")`` returns the cached ``.pt`` file (downloading it the first time) together
with the json config published beside it; ``resolve_weights`` returns just the weights path; ``cached`` the
verified cached file without any network access. An existing local path is passed through unchanged, so
every command can take "a file or a published name".

Downloads go through ``huggingface_hub.hf_hub_download``, so the files live in the standard Hugging Face cache
(shared with every other tool: ``$HF_HUB_CACHE``, default ``~/.cache/huggingface/hub``) and the usual settings
apply: ``$HF_ENDPOINT`` (a mirror), ``$HF_HUB_OFFLINE=1`` (cached files only), ``$HF_TOKEN`` or a stored
login. ``$VITREG_JAX_CACHE``, when set, replaces the cache folder (same Hugging Face layout inside).
``HF_ENDPOINT`` and ``HF_HUB_OFFLINE`` are read at each call, not only when ``huggingface_hub`` is imported.

Safety rules:

- a weights file is accepted only when its sha256 is one of the known hashes for its name (``PUBLISHED``);
  the matching hash also says which state_dict key layout the file uses (``"current"``: birder >= 0.4
  re-export, ``"legacy"``: the older ``self_attention`` / ``ln1`` names). The hash is checked after every
  download and on every cache hit; a file with any other hash is deleted from the cache (its snapshot link and
  its blob) and never used;
- ``huggingface_hub`` streams into a temporary file and renames it into place only when complete (its size
  checked against the hub's), removes the temporary file on any failure, and serialises concurrent
  downloads of one file with a lock;
- a verified cached file is used without asking the hub anything: the sha256 pins the content;
- the json config is **not** hash-checked (birder publishes no hash for it; it was edited in place on the
  hub over time); it is optional, and its absence on the hub is remembered by ``huggingface_hub``.

The pinned revision (``Published.revision``): birder 0.8.4's own registry records only
``https://huggingface.co/<repo>/resolve/main`` for these files, no commit. So the revision stays ``main`` and
the sha256 allow-list is the pin: a moved ``main`` can never hand us a different file, only a refused one.

Before a download, one HEAD request without retries checks that the hub answers, so that a machine without a
network (or a wrong ``$HF_ENDPOINT``) fails at once with one line instead of after ``huggingface_hub``'s
retries. Every failure raises :class:`vitreg_jax.errors.UserError` with one line naming the URL or name and
the problem. This module imports neither torch nor jax.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import os
import sys
import urllib.parse
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx2  # huggingface_hub's HTTP client: its transport errors are what an unreachable hub raises
from huggingface_hub import constants as hf_constants
from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url, try_to_load_from_cache
from huggingface_hub.errors import (
    EntryNotFoundError,
    FileMetadataError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from tqdm import tqdm

from vitreg_jax.errors import UserError
from vitreg_jax.fileio import first_line

__all__ = [
    "DEFAULT_BASE_URL",
    "ENV_CACHE",
    "ENV_HUB_URL",
    "ENV_OFFLINE",
    "HUB_REVISION",
    "LAYOUT_CURRENT",
    "LAYOUT_LEGACY",
    "PUBLISHED",
    "Published",
    "Resolved",
    "cached",
    "default_cache_dir",
    "hub_base_url",
    "is_offline",
    "published_names",
    "resolve",
    "resolve_weights",
]

ENV_CACHE = "VITREG_JAX_CACHE"  # replaces the Hugging Face cache folder for vitreg-jax only
ENV_HUB_URL = "HF_ENDPOINT"
ENV_OFFLINE = "HF_HUB_OFFLINE"
DEFAULT_BASE_URL = "https://huggingface.co"
HUB_REVISION = "main"  # see the module docstring: birder's registry pins no commit; the sha256 does
URL_SCHEMES = ("http", "https")

DEFAULT_TIMEOUT_S = 30.0  # the HEAD requests (reachability, metadata); reads use $HF_HUB_DOWNLOAD_TIMEOUT
CONFIG_TIMEOUT_S = 10.0  # the json is small and optional: do not make a cache hit wait long for it
MAX_CONFIG_BYTES = 1 << 20  # a birder json config is ~1 KB; anything this large is not one

LAYOUT_CURRENT = "current"  # state_dict keys of birder >= 0.4 (attn.qkv, norm1, norm2)
LAYOUT_LEGACY = "legacy"  # state_dict keys of birder < 0.4 (self_attention.in_proj_*, ln1, ln2)

_TRUE = ("1", "on", "yes", "true")


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
    revision: str = HUB_REVISION

    def url(self, base_url: str | None = None) -> str:
        return hf_hub_url(self.repo, self.filename, revision=self.revision, endpoint=hub_base_url(base_url))

    def config_url(self, base_url: str | None = None) -> str | None:
        if self.config_filename is None:
            return None
        return hf_hub_url(
            self.repo, self.config_filename, revision=self.revision, endpoint=hub_base_url(base_url)
        )


def _published(name: str, repo: str, config_filename: str, hashes: Mapping[str, str]) -> Published:
    return Published(
        name=name, repo=repo, filename=f"{name}.pt", config_filename=config_filename, hashes=hashes
    )


_REPO = "birder-project/vit_reg4_b16_mim"
_REPO_LEGACY = "birder-project/vitreg4_b16_mim"

# sha256 values: the "current" ones are birder 0.8.4's weights registry (birder/net/vit.py), the "legacy" ones
# birder 0.3.3's (the same names served the pre-0.4 files until the 2026-01 re-export); the legacy name
# vitreg4_b16_mim_200 is that same 200-epoch file, published before the 2025-04 rename.
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
    """``$VITREG_JAX_CACHE``, else the Hugging Face hub cache (``$HF_HUB_CACHE``,
    ``~/.cache/huggingface/hub``)."""
    return Path(os.environ.get(ENV_CACHE) or hf_constants.HF_HUB_CACHE).expanduser()


def hub_base_url(base_url: str | None = None) -> str:
    """The hub address: the argument, else ``$HF_ENDPOINT`` (read now), else ``https://huggingface.co``."""
    return (base_url or os.environ.get(ENV_HUB_URL) or hf_constants.ENDPOINT or DEFAULT_BASE_URL).rstrip("/")


def is_offline() -> bool:
    """``$HF_HUB_OFFLINE`` is set to a true value (now, or when ``huggingface_hub`` was imported)."""
    return hf_constants.HF_HUB_OFFLINE or os.environ.get(ENV_OFFLINE, "").strip().lower() in _TRUE


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


def cached(name: str, *, cache_dir: str | os.PathLike[str] | None = None) -> Resolved | None:
    """The published ``name`` if its file is already in the cache with a known sha256, else None.

    Never touches the network (the json config too comes from the cache only); a cached file with an unknown
    hash is deleted.
    """
    pub = PUBLISHED[name]
    cache = _cache_root(cache_dir)
    hit = _cached_weights(pub, cache)
    if hit is None:
        return None
    path, digest, layout = hit
    config = _config(pub, cache, None, offline=True, timeout=CONFIG_TIMEOUT_S)
    return Resolved(weights=path, config=config, layout=layout, sha256=digest, name=pub.name)


def resolve(
    name_or_path: str | os.PathLike[str],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    base_url: str | None = None,
    progress: bool = True,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> Resolved:
    """Resolve a local path (returned as is) or a published weight name (cached, sha256-verified).

    ``progress`` shows a progress bar (bytes, bytes/s) on stderr while downloading. ``timeout`` bounds the
    HEAD requests in seconds. Raises :class:`UserError` on every failure.
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

    cache = _cache_root(cache_dir)
    offline = is_offline()
    endpoint = None if offline else _checked_base_url(hub_base_url(base_url))
    hit = _cached_weights(pub, cache)
    if hit is None:
        if endpoint is None:
            raise UserError(
                f"{pub.name} is not in the weights cache {cache} and ${ENV_OFFLINE} is set: "
                f"download it once with network access (unset ${ENV_OFFLINE})"
            )
        downloaded = _download(pub, cache, endpoint, timeout=timeout, progress=progress)
        hit = _verify_download(pub, downloaded, pub.url(endpoint), cache)
    weights, digest, layout = hit
    config = _config(pub, cache, endpoint, offline=offline, timeout=timeout)
    return Resolved(weights=weights, config=config, layout=layout, sha256=digest, name=pub.name)


# ------------------------------------------------------------------------------------------------------------
# internals


def _checked_base_url(base: str) -> str:
    parts = urllib.parse.urlsplit(base)
    if parts.scheme not in URL_SCHEMES or not parts.netloc:
        raise UserError(
            f"invalid hub URL {base!r}: expected http(s)://host[:port][/path] (from base_url or "
            f"${ENV_HUB_URL})"
        )
    return base


def _cache_root(cache_dir: str | os.PathLike[str] | None) -> Path:
    root = default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser()
    return root.resolve()  # as huggingface_hub does, so that paths from a hit and a download agree


def _known() -> str:
    return "known names: " + ", ".join(published_names())


def _unknown_message(text: str) -> str:
    stem = Path(text).stem if text.endswith(".pt") else text
    close = difflib.get_close_matches(stem, published_names(), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{text!r} is neither an existing file nor a published weight name ({_known()}){hint}"


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _forget(path: Path, cache: Path) -> None:
    """Remove a cached file: its snapshot entry and, when the entry points into the cache's own ``blobs``
    folder, that blob. The cache is shared with other tools: an entry that points anywhere else (a user's own
    file linked in) is unlinked but its target is left alone, and a warning says so."""
    blob = Path(os.path.realpath(path))
    root = Path(os.path.realpath(cache))
    in_cache = blob != path.absolute() and blob.parent.name == "blobs" and root in blob.parents
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    if in_cache:
        with contextlib.suppress(FileNotFoundError):
            blob.unlink()
    elif blob != path.absolute():
        print(
            f"vitreg-jax: warning: the cached entry {path} pointed outside the cache's blobs, to {blob}; "
            "removed the entry, left that file alone",
            file=sys.stderr,
        )


def _cached_weights(pub: Published, cache: Path) -> tuple[Path, str, str] | None:
    """(path, sha256, layout) of the cached file of ``pub`` when its hash is known; a wrong one is deleted."""
    found = try_to_load_from_cache(pub.repo, pub.filename, cache_dir=cache, revision=pub.revision)
    if not isinstance(found, str):
        return None
    path = Path(found)
    try:
        digest = _sha256(path)
    except OSError:
        return None
    layout = pub.hashes.get(digest)
    if layout is None:
        _forget(path, cache)  # present but wrong: never used, and not kept
        return None
    return path, digest, layout


def _verify_download(pub: Published, path: Path, url: str, cache: Path) -> tuple[Path, str, str]:
    digest = _sha256(path)
    layout = pub.hashes.get(digest)
    if layout is None:
        _forget(path, cache)
        expected = " or ".join(sorted(pub.hashes))
        raise UserError(
            f"download refused: {url}: sha256 {digest} is not the published {expected}; file deleted"
        )
    return path, digest, layout


def _bar(filename: str) -> type[tqdm]:
    """The download bar for ``filename``: bytes and bytes/s on stderr."""

    class Bar(tqdm):
        def __init__(self, *args: object, **kwargs: object) -> None:
            kwargs.update(desc=filename, file=sys.stderr, unit_divisor=1024, dynamic_ncols=True)
            super().__init__(*args, **kwargs)

    return Bar


class _NoBar(tqdm):
    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)


def _reachable(url: str, endpoint: str, timeout: float) -> None:
    """Raise a one-line UserError at once if nothing at ``endpoint`` answers (no retries, unlike a download).

    HTTP error statuses are left to the download itself, which reports (or retries) them.
    """
    try:
        meta = get_hf_file_metadata(url, timeout=timeout, endpoint=endpoint)
    except httpx2.TimeoutException:
        raise UserError(f"download failed: {url}: no answer within {timeout:g} s (timed out)") from None
    except httpx2.TransportError as e:
        raise UserError(
            f"download failed: {url}: cannot reach the hub ({first_line(e)}); check the network and "
            f"${ENV_HUB_URL}, or set {ENV_OFFLINE}=1 to use cached files only"
        ) from None
    except HfHubHTTPError:
        return
    if meta.commit_hash is None or meta.etag is None:
        raise UserError(
            f"download failed: {url}: the server does not answer like a Hugging Face hub (no X-Repo-Commit "
            "or "
            ""
            f"ETag header); check ${ENV_HUB_URL}"
        )


def _http_failure(url: str, e: HfHubHTTPError) -> str:
    status = e.response.status_code if e.response is not None else "?"
    if isinstance(e, EntryNotFoundError):
        what = "no such file on the hub"
    elif isinstance(e, RevisionNotFoundError):
        what = "no such revision on the hub"
    elif isinstance(e, RepositoryNotFoundError):
        what = "repository not found, private or gated (log in with `hf auth login` or set $HF_TOKEN)"
    else:
        what = first_line(e)
    return f"download failed: {url}: HTTP {status} ({what})"


def _download(pub: Published, cache: Path, endpoint: str, *, timeout: float, progress: bool) -> Path:
    url = pub.url(endpoint)
    _reachable(url, endpoint, timeout)
    try:
        return Path(
            hf_hub_download(
                pub.repo,
                pub.filename,
                revision=pub.revision,
                cache_dir=cache,
                endpoint=endpoint,
                etag_timeout=timeout,
                tqdm_class=_bar(pub.filename) if progress else _NoBar,
            )
        )
    except HfHubHTTPError as e:
        raise UserError(_http_failure(url, e)) from None
    except LocalEntryNotFoundError as e:  # the HEAD failed and nothing is cached
        cause = e.__cause__
        if isinstance(cause, FileMetadataError):
            raise UserError(f"download failed: {url}: {first_line(cause)}") from None
        raise UserError(f"download failed: {url}: {first_line(cause or e)}") from None
    except httpx2.TransportError as e:
        raise UserError(f"download failed: {url}: connection interrupted ({first_line(e)})") from None
    except OSError as e:  # a size mismatch (truncated download), a full disk, an unwritable cache
        if "Consistency check failed" in str(e):
            raise UserError(f"download failed: {url}: truncated ({first_line(e)})") from None
        raise UserError(
            f"download failed: {url}: {first_line(e)} (cache {cache}; set ${ENV_CACHE})"
        ) from None


def _config(
    pub: Published, cache: Path, endpoint: str | None, *, offline: bool, timeout: float
) -> Path | None:
    """The cached json config of ``pub``; fetched once if not cached. Never hash-checked; never fatal."""
    if pub.config_filename is None:
        return None
    found = try_to_load_from_cache(pub.repo, pub.config_filename, cache_dir=cache, revision=pub.revision)
    if found is not None and not isinstance(found, str):
        return None  # the hub said it has no such file; huggingface_hub remembers that
    if isinstance(found, str):
        path = Path(found)
    elif offline or endpoint is None:
        return None
    else:
        url = pub.config_url(endpoint)
        assert url is not None
        timeout = min(timeout, CONFIG_TIMEOUT_S)
        try:
            _reachable(url, endpoint, timeout)
            path = Path(
                hf_hub_download(
                    pub.repo,
                    pub.config_filename,
                    revision=pub.revision,
                    cache_dir=cache,
                    endpoint=endpoint,
                    etag_timeout=timeout,
                    tqdm_class=_NoBar,
                )
            )
        except EntryNotFoundError:
            return None
        except UserError as e:
            warnings.warn(f"json config not fetched ({e})", stacklevel=3)
            return None
        except (HfHubHTTPError, httpx2.TransportError, OSError) as e:
            warnings.warn(f"json config not fetched: {url}: {first_line(e)}", stacklevel=3)
            return None
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES or not isinstance(json.loads(path.read_bytes()), dict):
            raise ValueError("not a json object")
    except (OSError, ValueError):
        warnings.warn(
            f"json config not used: {pub.config_filename} of {pub.repo} is not a json config object",
            stacklevel=3,
        )
        _forget(path, cache)
        return None
    return path
