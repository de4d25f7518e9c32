"""Tests for ``vitreg_jax.convert.hub``: published weights by name, sha256-checked download and cache.

Nothing here touches the internet: a ``ThreadingHTTPServer`` on 127.0.0.1 serves a temporary folder laid out
as the hub's ``<repo>/resolve/main/<file>`` addresses, and the known-hash table is patched to the hash of a
small generated fake file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from vitreg_jax.convert import hub
from vitreg_jax.errors import UserError

NAME = "vit_reg4_b16_mim_200"
REPO = "birder-project/vit_reg4_b16_mim"
WEIGHTS_PATH = f"/{REPO}/resolve/main/{NAME}.pt"
CONFIG_PATH = f"/{REPO}/resolve/main/vit_reg4_b16_mim.json"
FAKE_WEIGHTS = bytes(range(256)) * 800  # 200 KiB stand-in for the 327 MB .pt
FAKE_SHA = hashlib.sha256(FAKE_WEIGHTS).hexdigest()
FAKE_CONFIG = {"name": "vit", "registered_name": "vit_reg4_b16", "task": "image_classification"}
SLOW_RESPONSE_S = 0.3
SHORT_TIMEOUT_S = 0.3
POLL_INTERVAL_S = 0.01  # how soon the server notices shutdown() at teardown

Behaviour = Callable[[SimpleHTTPRequestHandler], None]


class FakeHub:
    """A local HTTP server over a folder, counting the requests it gets; ``special`` overrides paths."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.requests: list[str] = []
        self.special: dict[str, Behaviour] = {}
        self.release = threading.Event()  # lets a stalled handler go at teardown
        hub_ = self

        class Handler(SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs) -> None:
                super().__init__(*args, directory=str(root), **kwargs)

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                hub_.requests.append(self.path)
                behaviour = hub_.special.get(self.path)
                if behaviour is not None:
                    behaviour(self)
                else:
                    super().do_GET()

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": POLL_INTERVAL_S}, daemon=True
        )

    def put(self, url_path: str, data: bytes) -> None:
        path = self.root / url_path.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def weight_requests(self) -> int:
        return self.requests.count(WEIGHTS_PATH)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[FakeHub]:
    fake = FakeHub(tmp_path / "hub")
    fake.thread.start()
    try:
        yield fake
    finally:
        fake.release.set()
        fake.server.shutdown()
        fake.server.server_close()


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty cache folder; the environment variables are cleared so nothing leaks in from the shell."""
    monkeypatch.delenv(hub.ENV_CACHE, raising=False)
    monkeypatch.delenv(hub.ENV_HUB_URL, raising=False)
    path = tmp_path / "cache"
    path.mkdir()
    return path


def accept(monkeypatch: pytest.MonkeyPatch, hashes: dict[str, str]) -> None:
    """Make ``NAME`` accept exactly ``hashes`` (sha256 -> layout)."""
    monkeypatch.setitem(hub.PUBLISHED, NAME, dataclasses.replace(hub.PUBLISHED[NAME], hashes=hashes))


@pytest.fixture
def published(server: FakeHub, monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    """The fake weights and config on the server, and the table patched to accept the fake weights."""
    server.put(WEIGHTS_PATH, FAKE_WEIGHTS)
    server.put(CONFIG_PATH, json.dumps(FAKE_CONFIG).encode())
    accept(monkeypatch, {FAKE_SHA: hub.LAYOUT_CURRENT})
    return server


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def cached_weights(cache: Path) -> Path:
    return cache / REPO / f"{NAME}.pt"


# ------------------------------------------------------------------------------------------------------------
# the table


def test_published_table_matches_the_hub_addresses() -> None:
    assert hub.published_names() == ["vit_reg4_b16_mim_200", "vit_reg4_b16_mim_300", "vitreg4_b16_mim_200"]
    base = hub.DEFAULT_BASE_URL
    hf = "https://huggingface.co/birder-project"
    for name in ("vit_reg4_b16_mim_200", "vit_reg4_b16_mim_300"):
        p = hub.PUBLISHED[name]
        assert p.url(base) == f"{hf}/vit_reg4_b16_mim/resolve/main/{name}.pt"
        assert p.config_url(base) == f"{hf}/vit_reg4_b16_mim/resolve/main/vit_reg4_b16_mim.json"
        assert sorted(p.hashes.values()) == [hub.LAYOUT_CURRENT, hub.LAYOUT_LEGACY]
    legacy = hub.PUBLISHED["vitreg4_b16_mim_200"]
    assert legacy.url(base) == f"{hf}/vitreg4_b16_mim/resolve/main/vitreg4_b16_mim_200.pt"
    assert legacy.config_filename == "vitreg4_b16_mim.json"
    assert legacy.hashes == {
        "6b044cd7834293e344309f809070db3fe9ede489478e7549ad96255f9d76b329": hub.LAYOUT_LEGACY
    }
    assert hub.PUBLISHED["vit_reg4_b16_mim_200"].hashes == {
        "c7ec433c01e1dc0d6100cafc29fa88155a0d65f4b42afa9cc252b77485a566a7": hub.LAYOUT_CURRENT,
        "6b044cd7834293e344309f809070db3fe9ede489478e7549ad96255f9d76b329": hub.LAYOUT_LEGACY,
    }
    assert hub.PUBLISHED["vit_reg4_b16_mim_300"].hashes == {
        "b0e5e2b24ea7a8d2be246df43c9d8092354f6ee81e88c6cdd7c52d8e38ed44a4": hub.LAYOUT_CURRENT,
        "e0df2e79f8ed0612d12c736cc6317be1b9b354e468715a5077366f7676fdd2ce": hub.LAYOUT_LEGACY,
    }


# ------------------------------------------------------------------------------------------------------------
# downloads


def test_download_then_cache_hit_makes_no_request(published: FakeHub, cache: Path) -> None:
    first = hub.resolve(NAME, cache_dir=cache, base_url=published.base_url, progress=False)
    assert first.weights == cached_weights(cache)
    assert first.weights.read_bytes() == FAKE_WEIGHTS
    assert (first.layout, first.sha256, first.name) == (hub.LAYOUT_CURRENT, FAKE_SHA, NAME)
    assert first.config is not None and json.loads(first.config.read_text()) == FAKE_CONFIG
    assert published.requests == [WEIGHTS_PATH, CONFIG_PATH]
    assert files_under(cache) == sorted([first.weights, first.config])  # no temporary or lock file left

    second = hub.resolve(NAME, cache_dir=cache, base_url=published.base_url, progress=False)
    assert second == first
    assert published.requests == [WEIGHTS_PATH, CONFIG_PATH]  # nothing new: served from the cache
    path = hub.resolve_weights(NAME, cache_dir=cache, base_url=published.base_url, progress=False)
    assert path == first.weights
    assert len(published.requests) == 2


def test_legacy_hash_is_recorded_as_legacy_layout(published: FakeHub, cache: Path, monkeypatch) -> None:
    accept(monkeypatch, {"0" * 64: hub.LAYOUT_CURRENT, FAKE_SHA: hub.LAYOUT_LEGACY})
    resolved = hub.resolve(NAME, cache_dir=cache, base_url=published.base_url, progress=False)
    assert resolved.layout == hub.LAYOUT_LEGACY


def test_wrong_hash_is_refused_and_nothing_is_kept(published: FakeHub, cache: Path, monkeypatch) -> None:
    accept(monkeypatch, {"0" * 64: hub.LAYOUT_CURRENT})
    with pytest.raises(UserError) as info:
        hub.resolve(NAME, cache_dir=cache, base_url=published.base_url, progress=False)
    message = str(info.value)
    assert published.base_url + WEIGHTS_PATH in message and FAKE_SHA in message and "\n" not in message
    assert files_under(cache) == []
    assert published.requests == [WEIGHTS_PATH]  # the config is not fetched for refused weights


def test_cached_corrupt_file_is_downloaded_again(published: FakeHub, cache: Path) -> None:
    target = cached_weights(cache)
    target.parent.mkdir(parents=True)
    target.write_bytes(b"truncated or tampered")
    resolved = hub.resolve(NAME, cache_dir=cache, base_url=published.base_url, progress=False)
    assert resolved.weights == target and target.read_bytes() == FAKE_WEIGHTS
    assert published.weight_requests() == 1


def test_cached_corrupt_file_is_removed_even_when_the_download_fails(
    server: FakeHub, cache: Path, monkeypatch
) -> None:
    accept(monkeypatch, {FAKE_SHA: hub.LAYOUT_CURRENT})
    target = cached_weights(cache)
    target.parent.mkdir(parents=True)
    target.write_bytes(b"junk")
    with pytest.raises(UserError, match="HTTP 404"):
        hub.resolve(NAME, cache_dir=cache, base_url=server.base_url, progress=False)
    assert files_under(cache) == []


def test_http_404(server: FakeHub, cache: Path, monkeypatch) -> None:
    accept(monkeypatch, {FAKE_SHA: hub.LAYOUT_CURRENT})
    with pytest.raises(UserError) as info:
        hub.resolve(NAME, cache_dir=cache, base_url=server.base_url, progress=False)
    assert str(info.value) == f"download failed: {server.base_url}{WEIGHTS_PATH}: HTTP 404 File not found"
    assert files_under(cache) == []


def test_server_down_connection_refused(cache: Path, monkeypatch) -> None:
    accept(monkeypatch, {FAKE_SHA: hub.LAYOUT_CURRENT})
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    with pytest.raises(UserError) as info:
        hub.resolve(NAME, cache_dir=cache, base_url=base, progress=False)
    message = str(info.value)
    assert message.startswith(f"download failed: {base}{WEIGHTS_PATH}: ") and "refused" in message.lower()
    assert files_under(cache) == []


def test_truncated_response_is_refused(published: FakeHub, cache: Path) -> None:
    def half(handler: SimpleHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(FAKE_WEIGHTS)))
        handler.end_headers()
        handler.wfile.write(FAKE_WEIGHTS[: len(FAKE_WEIGHTS) // 2])
        handler.close_connection = True

    published.special[WEIGHTS_PATH] = half
    with pytest.raises(UserError, match=r"interrupted after 102400 of 204800 bytes"):
        hub.resolve(NAME, cache_dir=cache, base_url=published.base_url, progress=False)
    assert files_under(cache) == []


def test_timeout(published: FakeHub, cache: Path) -> None:
    published.special[WEIGHTS_PATH] = lambda handler: published.release.wait(10)
    start = time.monotonic()
    with pytest.raises(UserError, match=r"timed out"):
        hub.resolve(
            NAME, cache_dir=cache, base_url=published.base_url, progress=False, timeout=SHORT_TIMEOUT_S
        )
    assert time.monotonic() - start < 5
    assert files_under(cache) == []


def test_interrupt_removes_the_temporary_file(published: FakeHub, cache: Path, monkeypatch) -> None:
    class Interrupting:
        def __init__(self, *args, **kwargs) -> None:
            pass

        def __enter__(self) -> Interrupting:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def update(self, n: int) -> None:
            # the bytes are streaming into a temporary file
            assert [p.name for p in files_under(cache) if p.name.endswith(hub.TMP_SUFFIX)]
            raise KeyboardInterrupt

    monkeypatch.setattr(hub, "tqdm", Interrupting)
    with pytest.raises(KeyboardInterrupt):
        hub.resolve(NAME, cache_dir=cache, base_url=published.base_url, progress=False)
    assert files_under(cache) == []


def test_two_concurrent_calls_download_once(published: FakeHub, cache: Path) -> None:

    def slow(handler: SimpleHTTPRequestHandler) -> None:
        time.sleep(SLOW_RESPONSE_S)
        SimpleHTTPRequestHandler.do_GET(handler)

    published.special[WEIGHTS_PATH] = slow
    results: list[hub.Resolved] = []
    errors: list[BaseException] = []

    def call() -> None:
        try:
            results.append(hub.resolve(NAME, cache_dir=cache, base_url=published.base_url, progress=False))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert errors == [] and len(results) == 2
    assert results[0].weights == results[1].weights and results[0].sha256 == FAKE_SHA
    assert published.weight_requests() == 1
    assert not [p for p in files_under(cache) if p.name.endswith((hub.TMP_SUFFIX, hub.LOCK_SUFFIX))]


# ------------------------------------------------------------------------------------------------------------
# the config beside the weights


def test_absent_config_is_fine_and_not_asked_for_again(server: FakeHub, cache: Path, monkeypatch) -> None:
    server.put(WEIGHTS_PATH, FAKE_WEIGHTS)
    accept(monkeypatch, {FAKE_SHA: hub.LAYOUT_CURRENT})
    first = hub.resolve(NAME, cache_dir=cache, base_url=server.base_url, progress=False)
    assert first.config is None and first.weights.read_bytes() == FAKE_WEIGHTS
    assert server.requests == [WEIGHTS_PATH, CONFIG_PATH]
    second = hub.resolve(NAME, cache_dir=cache, base_url=server.base_url, progress=False)
    assert second == first and len(server.requests) == 2


def test_config_that_is_not_json_is_not_used(published: FakeHub, cache: Path) -> None:
    published.put(CONFIG_PATH, b"<html>rate limited</html>")
    with pytest.warns(UserWarning, match="not a json config"):
        resolved = hub.resolve(NAME, cache_dir=cache, base_url=published.base_url, progress=False)
    assert resolved.config is None and resolved.layout == hub.LAYOUT_CURRENT
    assert files_under(cache) == [resolved.weights]


def test_missing_config_is_fetched_on_a_later_cache_hit(published: FakeHub, cache: Path) -> None:
    first = hub.resolve(NAME, cache_dir=cache, base_url=published.base_url, progress=False)
    assert first.config is not None
    first.config.unlink()
    again = hub.resolve(NAME, cache_dir=cache, base_url=published.base_url, progress=False)
    assert again.config == first.config and again.config.is_file()
    assert published.weight_requests() == 1 and published.requests.count(CONFIG_PATH) == 2


# ------------------------------------------------------------------------------------------------------------
# names, paths, environment, progress


def test_unknown_name_lists_the_known_names(cache: Path) -> None:
    with pytest.raises(UserError) as info:
        hub.resolve("vit_reg4_b16_mim_100", cache_dir=cache)
    message = str(info.value)
    assert "neither an existing file nor a published weight name" in message
    assert all(name in message for name in hub.published_names())
    suggestions = [f"did you mean {name!r}" for name in ("vit_reg4_b16_mim_200", "vit_reg4_b16_mim_300")]
    assert any(s in message for s in suggestions)
    assert files_under(cache) == []


def test_missing_file_says_both(tmp_path: Path, cache: Path) -> None:
    missing = tmp_path / "models" / "nope.pt"
    with pytest.raises(UserError) as info:
        hub.resolve(str(missing), cache_dir=cache)
    message = str(info.value)
    assert str(missing) in message and "neither an existing file nor a published weight name" in message
    with pytest.raises(UserError, match="empty"):
        hub.resolve("", cache_dir=cache)


def test_local_path_is_passed_through(tmp_path: Path, server: FakeHub, cache: Path) -> None:
    local = tmp_path / "my_weights.pt"
    local.write_bytes(b"anything: local files are not hash-checked")
    assert hub.resolve_weights(str(local), cache_dir=cache, base_url=server.base_url) == local
    assert hub.resolve(local, cache_dir=cache) == hub.Resolved(weights=local)
    checkpoint_dir = tmp_path / "orbax_ckpt"
    checkpoint_dir.mkdir()
    assert hub.resolve_weights(checkpoint_dir) == checkpoint_dir
    # a local file with a published name wins over the hub
    (tmp_path / NAME).write_bytes(b"x")
    assert hub.resolve_weights(tmp_path / NAME) == tmp_path / NAME
    assert server.requests == [] and files_under(cache) == []


def test_environment_variables_pick_hub_and_cache(published: FakeHub, cache: Path, monkeypatch) -> None:
    monkeypatch.setenv(hub.ENV_HUB_URL, published.base_url + "/")
    monkeypatch.setenv(hub.ENV_CACHE, str(cache))
    assert hub.hub_base_url() == published.base_url and hub.default_cache_dir() == cache
    assert hub.resolve_weights(NAME, progress=False) == cached_weights(cache)
    assert published.weight_requests() == 1
    # an explicit argument wins over the environment
    with pytest.raises(UserError, match="download failed: http://127.0.0.1:1/"):
        hub.resolve(NAME, cache_dir=cache / "other", base_url="http://127.0.0.1:1", progress=False)


def test_default_cache_dir_without_environment(monkeypatch) -> None:
    monkeypatch.delenv(hub.ENV_CACHE, raising=False)
    monkeypatch.delenv(hub.ENV_HUB_URL, raising=False)
    assert hub.default_cache_dir() == Path("~/.cache/vitreg-jax").expanduser()
    assert hub.hub_base_url() == "https://huggingface.co"


def test_invalid_base_url(cache: Path, monkeypatch) -> None:
    accept(monkeypatch, {FAKE_SHA: hub.LAYOUT_CURRENT})
    with pytest.raises(UserError, match="invalid hub URL"):
        hub.resolve(NAME, cache_dir=cache, base_url="127.0.0.1:8000", progress=False)
    assert files_under(cache) == []


def test_progress_bar_on_stderr_only_when_asked(published: FakeHub, cache: Path, capsys) -> None:
    hub.resolve(NAME, cache_dir=cache / "quiet", base_url=published.base_url, progress=False)
    quiet = capsys.readouterr()
    assert quiet.out == "" and quiet.err == ""
    hub.resolve(NAME, cache_dir=cache / "loud", base_url=published.base_url, progress=True)
    loud = capsys.readouterr()
    assert loud.out == ""
    assert f"{NAME}.pt" in loud.err and "B/s" in loud.err and "200k/200k" in loud.err
    hub.resolve(NAME, cache_dir=cache / "loud", base_url=published.base_url, progress=True)
    assert capsys.readouterr().err == ""  # a cache hit is silent


def test_module_imports_neither_torch_nor_jax() -> None:
    source = Path(hub.__file__).read_text()
    assert "import torch" not in source and "import jax" not in source


def test_file_url_mirror(tmp_path: Path, cache: Path, monkeypatch) -> None:
    mirror = tmp_path / "mirror"
    weights = mirror / WEIGHTS_PATH.lstrip("/")
    weights.parent.mkdir(parents=True)
    weights.write_bytes(FAKE_WEIGHTS)
    accept(monkeypatch, {FAKE_SHA: hub.LAYOUT_CURRENT})
    resolved = hub.resolve(NAME, cache_dir=cache, base_url=mirror.as_uri(), progress=False)
    assert resolved.weights.read_bytes() == FAKE_WEIGHTS and resolved.config is None  # absent: no warning
