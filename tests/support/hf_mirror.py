"""A local Hugging Face hub mirror for tests: ``huggingface_hub``'s download protocol over a folder, on
127.0.0.1.

``HfMirror(root)`` serves ``root/<owner>/<repo>/<filename>`` at
``/<owner>/<repo>/resolve/<revision>/<filename>`` the way the hub serves a file stored with git LFS: ``HEAD``
answers ``X-Repo-Commit`` (the fixed ``COMMIT``), ``ETag`` and ``X-Linked-Etag`` (the file's sha256, as the
hub does for LFS files), ``X-Linked-Size`` and ``Content-Length``; ``GET`` sends the bytes and honours
``Range: bytes=N-`` (``huggingface_hub`` resumes with it after a dropped connection). A missing file answers
404 with ``X-Error-Code: EntryNotFound`` (and the commit, so that ``huggingface_hub`` remembers the absence),
a missing repository 404 ``RepoNotFound``, an unknown revision 404 ``RevisionNotFound``. ``special`` replaces
the answer for one (method, path); ``claimed_size`` makes ``HEAD`` announce another size than the file's.
Every request is recorded in ``requests``.

``put_in_cache`` writes a file into a Hugging Face cache folder the way ``hf_hub_download`` leaves it.
Nothing here reaches the network.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import urllib.parse
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Self

COMMIT = "0123456789abcdef0123456789abcdef01234567"  # the mirror's one commit (40 hex digits, like git's)
POLL_INTERVAL_S = 0.01  # how soon the server notices shutdown() at teardown
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<revision>[^/]+)/(?P<filename>.+)$")
_RANGE = re.compile(r"^bytes=(\d+)-$")

Behaviour = Callable[[BaseHTTPRequestHandler], None]


class HfMirror:
    """A ``ThreadingHTTPServer`` on 127.0.0.1 speaking the hub's resolve protocol; ``url`` is its address."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.requests: list[tuple[str, str]] = []  # (method, path)
        self.special: dict[tuple[str, str], Behaviour] = {}
        self.claimed_size: dict[str, int] = {}  # path -> size announced by HEAD
        self.release = threading.Event()  # lets a stalled handler go at teardown
        mirror = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # one request per connection: nothing outlives shutdown()

            def do_HEAD(self) -> None:
                mirror._answer(self, body=False)

            def do_GET(self) -> None:
                mirror._answer(self, body=True)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": POLL_INTERVAL_S}, daemon=True
        )

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

    # content ----------------------------------------------------------------------------------------------
    def put(self, repo: str, filename: str, data: bytes) -> str:
        """Publish ``data`` as ``filename`` of ``repo``; returns its URL path at ``main``."""
        path = self.root / repo / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return self.path(repo, filename)

    @staticmethod
    def path(repo: str, filename: str, revision: str = "main") -> str:
        return f"/{repo}/resolve/{revision}/{filename}"

    def count(self, path: str, method: str = "GET") -> int:
        return self.requests.count((method, path))

    # the protocol -----------------------------------------------------------------------------------------
    def _answer(self, h: BaseHTTPRequestHandler, *, body: bool) -> None:
        method = "GET" if body else "HEAD"
        path = urllib.parse.unquote(urllib.parse.urlsplit(h.path).path)
        self.requests.append((method, path))
        behaviour = self.special.get((method, path))
        if behaviour is not None:
            behaviour(h)
            return
        m = _RESOLVE.match(path)
        if m is None or not (self.root / m["repo"]).is_dir():
            self._error(h, 404, "RepoNotFound")
            return
        if m["revision"] not in ("main", COMMIT):
            self._error(h, 404, "RevisionNotFound")
            return
        file = self.root / m["repo"] / m["filename"]
        if not file.is_file():
            self._error(h, 404, "EntryNotFound", commit=COMMIT)
            return
        data = file.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        start = 0
        ranged = _RANGE.match(h.headers.get("Range", ""))
        if body and ranged is not None:
            start = min(int(ranged[1]), len(data))
        h.send_response(206 if start else 200)
        h.send_header("X-Repo-Commit", COMMIT)
        h.send_header("ETag", f'"{sha}"')
        h.send_header("X-Linked-Etag", f'"{sha}"')
        h.send_header("X-Linked-Size", str(self.claimed_size.get(path, len(data))))
        h.send_header("Accept-Ranges", "bytes")
        if start:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.send_header("Content-Length", str(len(data) - start))
        h.end_headers()
        if body:
            h.wfile.write(data[start:])

    @staticmethod
    def _error(h: BaseHTTPRequestHandler, status: int, code: str, commit: str | None = None) -> None:
        message = f"{code} (test mirror)".encode()
        h.send_response(status)
        h.send_header("X-Error-Code", code)
        if commit is not None:
            h.send_header("X-Repo-Commit", commit)
        h.send_header("Content-Type", "text/plain")
        h.send_header("Content-Length", str(len(message)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(message)


def put_in_cache(cache: Path, repo: str, filename: str, data: bytes) -> Path:
    """Write ``data`` into the Hugging Face cache ``cache`` as ``hf_hub_download`` would (blob, snapshot link,
    ``refs/main``); returns the snapshot path."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    snapshot = folder / "snapshots" / COMMIT / filename
    snapshot.parent.mkdir(parents=True, exist_ok=True)
    if snapshot.is_symlink() or snapshot.exists():
        snapshot.unlink()
    snapshot.symlink_to(os.path.relpath(blob, snapshot.parent))
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(COMMIT)
    return snapshot
