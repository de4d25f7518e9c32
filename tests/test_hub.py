"""Tests for ``vitreg_jax.convert.hub``: published weights by name through ``huggingface_hub``,
sha256-checked.

The table is compared with birder's own weights registry (0.8.4 for the current files, 0.3.3 for the pre-0.4
ones). Downloads never reach the internet: ``tests/support/hf_mirror.py`` serves the hub's resolve protocol on
127.0.0.1 and ``$HF_ENDPOINT`` points at it (an autouse fixture points it at a closed port otherwise), and the
known-hash table is patched to the hash of a small generated fake file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Self

import pytest

from tests.support.hf_mirror import COMMIT, HfMirror, put_in_cache
from tests.support.legacy_birder import LEGACY_VERSION, legacy_birder_dir
from tests.support.report import REQUIRE_BIRDER
from vitreg_jax.convert import hub
from vitreg_jax.errors import UserError

NAME = "vit_reg4_b16_mim_200"
REPO = "birder-project/vit_reg4_b16_mim"
FILENAME = f"{NAME}.pt"
CONFIG_FILENAME = "vit_reg4_b16_mim.json"
WEIGHTS_PATH = HfMirror.path(REPO, FILENAME)
CONFIG_PATH = HfMirror.path(REPO, CONFIG_FILENAME)
FAKE_WEIGHTS = bytes(range(256)) * 800  # 200 KiB stand-in for the 327 MB .pt
FAKE_SHA = hashlib.sha256(FAKE_WEIGHTS).hexdigest()
FAKE_CONFIG = {"name": "vit", "registered_name": "vit_reg4_b16", "task": "image_classification"}
SHORT_TIMEOUT_S = 0.3
FAIL_FAST_S = 5.0  # a failure that needs no retry must come well before huggingface_hub's ~23 s of back-off
CURRENT_NAMES = ("vit_reg4_b16_mim_200", "vit_reg4_b16_mim_300")
LEGACY_NAME = "vitreg4_b16_mim_200"
HF_DEFAULT = "https://huggingface.co"


def closed_port_url() -> str:
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing here may reach the real hub: the endpoint is a closed local port unless a test sets its own."""
    for var in (hub.ENV_CACHE, hub.ENV_OFFLINE, "HF_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv(hub.ENV_HUB_URL, closed_port_url())


@pytest.fixture
def mirror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HfMirror]:
    with HfMirror(tmp_path / "hub") as served:
        monkeypatch.setenv(hub.ENV_HUB_URL, served.url)
        yield served


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    path = tmp_path / "cache"
    path.mkdir()
    return path.resolve()


def accept(monkeypatch: pytest.MonkeyPatch, hashes: dict[str, str], name: str = NAME) -> None:
    """Make ``name`` accept exactly ``hashes`` (sha256 -> layout)."""
    monkeypatch.setitem(hub.PUBLISHED, name, dataclasses.replace(hub.PUBLISHED[name], hashes=hashes))


@pytest.fixture
def published(mirror: HfMirror, monkeypatch: pytest.MonkeyPatch) -> HfMirror:
    """The fake weights and config on the mirror, and the table patched to accept the fake weights."""
    mirror.put(REPO, FILENAME, FAKE_WEIGHTS)
    mirror.put(REPO, CONFIG_FILENAME, json.dumps(FAKE_CONFIG).encode())
    accept(monkeypatch, {FAKE_SHA: hub.LAYOUT_CURRENT})
    return mirror


def files_under(folder: Path) -> list[Path]:
    """Cached files, links included; huggingface_hub's lock files aside."""
    return sorted(p for p in folder.rglob("*") if (p.is_file() or p.is_symlink()) and ".locks" not in p.parts)


def leftovers(cache: Path) -> list[Path]:
    """What a download may leave: blobs, snapshot links, temporary files (refs and tags aside)."""
    return [
        p
        for p in files_under(cache)
        if "blobs" in p.parts or "snapshots" in p.parts or p.name.endswith(".incomplete")
    ]


def snapshot(cache: Path, filename: str = FILENAME) -> Path:
    return cache / "models--birder-project--vit_reg4_b16_mim" / "snapshots" / COMMIT / filename


def resolve(cache: Path, name: str = NAME, **kwargs: object) -> hub.Resolved:
    return hub.resolve(name, cache_dir=cache, progress=False, **kwargs)


def user_error(call: object, *args: object, **kwargs: object) -> str:
    with pytest.raises(UserError) as info:
        call(*args, **kwargs)  # type: ignore[operator]
    message = str(info.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------------------------------------------------
# the table, against birder's own registries


def test_published_table_matches_birder_0_8_4_registry() -> None:
    """Names, addresses and the current sha256 values are birder 0.8.4's, from its registry and URL helper."""
    if not REQUIRE_BIRDER:
        pytest.importorskip("birder")
    from birder.common.lib import get_pretrained_model_url
    from birder.model_registry import registry

    assert hub.published_names() == sorted((*CURRENT_NAMES, LEGACY_NAME))
    for name in CURRENT_NAMES:
        pub = hub.PUBLISHED[name]
        theirs = registry.get_pretrained_metadata(name)["formats"]["pt"]["sha256"]
        assert [h for h, layout in pub.hashes.items() if layout == hub.LAYOUT_CURRENT] == [theirs]
        assert pub.url(HF_DEFAULT) == get_pretrained_model_url(name, "pt")[1]
        assert pub.revision == hub.HUB_REVISION == "main"  # birder records resolve/main, no commit
    assert not registry.pretrained_exists(LEGACY_NAME)  # the legacy name is gone from 0.8.4


def test_legacy_hashes_match_birder_0_3_3_registry() -> None:
    """The pre-0.4 files: birder 0.3.3's own registry (run in a child process), the same file as the legacy
    name."""
    legacy = legacy_birder_dir()
    if not (legacy / "birder").is_dir():
        message = f"birder {LEGACY_VERSION} is not unpacked in {legacy}"
        if REQUIRE_BIRDER:
            pytest.fail(message)
        pytest.skip(message)
    code = (
        "import json, sys\n"
        "from birder.common.lib import get_pretrained_model_url\n"
        "from birder.model_registry import registry\n"
        "names = sys.argv[1:]\n"
        "print(json.dumps({n: [get_pretrained_model_url(n, 'pt')[1],"
        " registry.get_pretrained_metadata(n)['formats']['pt']['sha256']] for n in names}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, *CURRENT_NAMES],
        env={**os.environ, "PYTHONPATH": str(legacy)},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in CURRENT_NAMES:
        pub = hub.PUBLISHED[name]
        url, sha = theirs[name]
        assert [h for h, layout in pub.hashes.items() if layout == hub.LAYOUT_LEGACY] == [sha]
        assert pub.url(HF_DEFAULT) == url
    legacy_pub = hub.PUBLISHED[LEGACY_NAME]
    assert legacy_pub.hashes == {theirs["vit_reg4_b16_mim_200"][1]: hub.LAYOUT_LEGACY}
    assert (
        legacy_pub.url(HF_DEFAULT)
        == f"{HF_DEFAULT}/birder-project/vitreg4_b16_mim/resolve/main/{LEGACY_NAME}.pt"
    )
    assert legacy_pub.config_filename == "vitreg4_b16_mim.json"


# ------------------------------------------------------------------------------------------------------------
# downloads


def test_download_then_cache_hit_makes_no_request(published: HfMirror, cache: Path) -> None:
    first = resolve(cache)
    assert first.weights == snapshot(cache) and first.weights.read_bytes() == FAKE_WEIGHTS
    assert first.weights.resolve() == cache / "models--birder-project--vit_reg4_b16_mim" / "blobs" / FAKE_SHA
    assert (first.layout, first.sha256, first.name) == (hub.LAYOUT_CURRENT, FAKE_SHA, NAME)
    assert first.config == snapshot(cache, CONFIG_FILENAME)
    assert json.loads(first.config.read_text()) == FAKE_CONFIG
    assert published.count(WEIGHTS_PATH) == 1 and published.count(CONFIG_PATH) == 1
    assert not [p for p in files_under(cache) if p.name.endswith(".incomplete")]

    seen = len(published.requests)
    assert resolve(cache) == first
    assert hub.resolve_weights(NAME, cache_dir=cache, progress=False) == first.weights
    assert hub.cached(NAME, cache_dir=cache) == first
    assert len(published.requests) == seen  # served from the cache: the sha256 pins the content


def test_legacy_hash_is_recorded_as_legacy_layout(published: HfMirror, cache: Path, monkeypatch) -> None:
    accept(monkeypatch, {"0" * 64: hub.LAYOUT_CURRENT, FAKE_SHA: hub.LAYOUT_LEGACY})
    assert resolve(cache).layout == hub.LAYOUT_LEGACY


def test_legacy_name_downloads_from_its_own_repository(mirror: HfMirror, cache: Path, monkeypatch) -> None:
    mirror.put("birder-project/vitreg4_b16_mim", f"{LEGACY_NAME}.pt", FAKE_WEIGHTS)
    accept(monkeypatch, {FAKE_SHA: hub.LAYOUT_LEGACY}, LEGACY_NAME)
    resolved = resolve(cache, LEGACY_NAME)
    assert resolved.layout == hub.LAYOUT_LEGACY and resolved.weights.read_bytes() == FAKE_WEIGHTS
    assert "models--birder-project--vitreg4_b16_mim" in resolved.weights.parts and resolved.config is None


def test_wrong_hash_is_refused_and_nothing_is_kept(published: HfMirror, cache: Path, monkeypatch) -> None:
    accept(monkeypatch, {"0" * 64: hub.LAYOUT_CURRENT})
    message = user_error(resolve, cache)
    assert message.startswith(f"download refused: {published.url}{WEIGHTS_PATH}: sha256 {FAKE_SHA} ")
    assert message.endswith("is not the published " + "0" * 64 + "; file deleted")
    assert leftovers(cache) == []  # no blob, no snapshot link
    assert published.count(CONFIG_PATH) == 0  # the config is not fetched for refused weights


def test_cached_file_with_a_wrong_hash_is_deleted_and_downloaded_again(
    published: HfMirror, cache: Path
) -> None:
    put_in_cache(cache, REPO, FILENAME, b"truncated or tampered")
    resolved = resolve(cache)
    assert resolved.weights == snapshot(cache) and resolved.weights.read_bytes() == FAKE_WEIGHTS
    assert published.count(WEIGHTS_PATH) == 1
    blobs = [p.name for p in files_under(cache) if p.parent.name == "blobs"]
    assert FAKE_SHA in blobs and hashlib.sha256(b"truncated or tampered").hexdigest() not in blobs


def test_truncated_download_is_refused_and_nothing_is_kept(published: HfMirror, cache: Path) -> None:
    """The hub announces the full size; the bytes stop early: huggingface_hub's size check, one line."""
    published.claimed_size[WEIGHTS_PATH] = len(FAKE_WEIGHTS) * 2
    message = user_error(resolve, cache)
    assert message.startswith(f"download failed: {published.url}{WEIGHTS_PATH}: truncated (")
    assert f"should be of size {2 * len(FAKE_WEIGHTS)} but has size {len(FAKE_WEIGHTS)}" in message
    assert leftovers(cache) == []


def test_dropped_connection_is_resumed_and_the_result_hash_checked(published: HfMirror, cache: Path) -> None:
    """The first GET stops half-way (Content-Length says more): huggingface_hub resumes with a Range
    request."""
    half = len(FAKE_WEIGHTS) // 2

    def drop_half_way(h: BaseHTTPRequestHandler) -> None:
        del published.special[("GET", WEIGHTS_PATH)]  # the next request is served normally
        h.send_response(200)
        h.send_header("Content-Length", str(len(FAKE_WEIGHTS)))
        h.end_headers()
        h.wfile.write(FAKE_WEIGHTS[:half])

    published.special[("GET", WEIGHTS_PATH)] = drop_half_way
    resolved = resolve(cache)
    assert resolved.weights.read_bytes() == FAKE_WEIGHTS and resolved.sha256 == FAKE_SHA
    assert published.count(WEIGHTS_PATH) == 2


def test_interrupt_removes_the_temporary_file(published: HfMirror, cache: Path, monkeypatch) -> None:
    seen: list[str] = []

    class Interrupting:
        def __init__(self, *args: object, **kwargs: object) -> None:
            pass

        def __enter__(self) -> Self:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def update(self, n: int) -> None:
            seen.extend(p.name for p in files_under(cache) if p.name.endswith(".incomplete"))
            raise KeyboardInterrupt

    monkeypatch.setattr(hub, "_bar", lambda filename: Interrupting)
    with pytest.raises(KeyboardInterrupt):
        hub.resolve(NAME, cache_dir=cache, progress=True)
    assert seen  # the bytes were streaming into a temporary file
    assert leftovers(cache) == []


def test_two_concurrent_calls_download_once(published: HfMirror, cache: Path) -> None:
    results: list[hub.Resolved] = []
    errors: list[BaseException] = []

    def call() -> None:
        try:
            results.append(resolve(cache))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == [] and len(results) == 2
    assert results[0].weights == results[1].weights and results[0].sha256 == FAKE_SHA
    assert published.count(WEIGHTS_PATH) == 1


# ------------------------------------------------------------------------------------------------------------
# failures: one line each, nothing left behind


def test_missing_file_is_http_404(mirror: HfMirror, cache: Path, monkeypatch) -> None:
    mirror.put(REPO, "other.pt", b"x")  # the repository exists, the file does not
    accept(monkeypatch, {FAKE_SHA: hub.LAYOUT_CURRENT})
    message = user_error(resolve, cache)
    assert message == f"download failed: {mirror.url}{WEIGHTS_PATH}: HTTP 404 (no such file on the hub)"
    assert leftovers(cache) == []


def test_missing_repository(mirror: HfMirror, cache: Path) -> None:
    message = user_error(resolve, cache)
    assert message.startswith(f"download failed: {mirror.url}{WEIGHTS_PATH}: HTTP 404 (repository not found")


def test_no_network_fails_at_once(cache: Path) -> None:
    start = time.monotonic()
    message = user_error(resolve, cache)
    assert time.monotonic() - start < FAIL_FAST_S
    base = os.environ[hub.ENV_HUB_URL]
    assert message.startswith(f"download failed: {base}{WEIGHTS_PATH}: cannot reach the hub (")
    assert "refused" in message.lower() and f"{hub.ENV_OFFLINE}=1" in message
    assert files_under(cache) == []


def test_timeout(published: HfMirror, cache: Path) -> None:
    published.special[("HEAD", WEIGHTS_PATH)] = lambda h: published.release.wait(10)
    start = time.monotonic()
    message = user_error(resolve, cache, timeout=SHORT_TIMEOUT_S)
    assert "timed out" in message and time.monotonic() - start < FAIL_FAST_S
    assert files_under(cache) == []


def test_a_plain_file_server_is_not_taken_for_a_hub(published: HfMirror, cache: Path) -> None:
    def plain(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(len(FAKE_WEIGHTS)))
        h.end_headers()

    published.special[("HEAD", WEIGHTS_PATH)] = plain
    message = user_error(resolve, cache)
    assert "does not answer like a Hugging Face hub" in message and hub.ENV_HUB_URL in message


def test_offline_with_the_file_cached_asks_nothing(published: HfMirror, cache: Path, monkeypatch) -> None:
    first = resolve(cache)
    seen = len(published.requests)
    monkeypatch.setenv(hub.ENV_OFFLINE, "1")
    assert hub.is_offline()
    assert resolve(cache) == first
    assert len(published.requests) == seen


def test_offline_without_the_file_is_one_line(published: HfMirror, cache: Path, monkeypatch) -> None:
    monkeypatch.setenv(hub.ENV_OFFLINE, "1")
    message = user_error(resolve, cache)
    assert message == (
        f"{NAME} is not in the weights cache {cache} and ${hub.ENV_OFFLINE} is set: "
        f"download it once with network access (unset ${hub.ENV_OFFLINE})"
    )
    assert published.requests == [] and files_under(cache) == []


def test_cached_never_touches_the_network(published: HfMirror, cache: Path) -> None:
    assert hub.cached(NAME, cache_dir=cache) is None
    put_in_cache(cache, REPO, FILENAME, FAKE_WEIGHTS)
    found = hub.cached(NAME, cache_dir=cache)
    assert found is not None and found.sha256 == FAKE_SHA and found.config is None
    assert published.requests == []


# ------------------------------------------------------------------------------------------------------------
# the config beside the weights


def test_absent_config_is_fine_and_not_asked_for_again(mirror: HfMirror, cache: Path, monkeypatch) -> None:
    mirror.put(REPO, FILENAME, FAKE_WEIGHTS)
    accept(monkeypatch, {FAKE_SHA: hub.LAYOUT_CURRENT})
    first = resolve(cache)
    assert first.config is None and first.weights.read_bytes() == FAKE_WEIGHTS
    seen = len(mirror.requests)
    assert resolve(cache) == first and len(mirror.requests) == seen  # huggingface_hub remembers the 404


def test_config_that_is_not_json_is_not_used(published: HfMirror, cache: Path) -> None:
    published.put(REPO, CONFIG_FILENAME, b"<html>rate limited</html>")
    with pytest.warns(UserWarning, match="not a json config"):
        resolved = resolve(cache)
    assert resolved.config is None and resolved.layout == hub.LAYOUT_CURRENT
    assert not snapshot(cache, CONFIG_FILENAME).exists()


def test_missing_config_is_fetched_on_a_later_cache_hit(published: HfMirror, cache: Path) -> None:
    first = resolve(cache)
    assert first.config is not None
    first.config.unlink()
    asked = published.count(CONFIG_PATH, "HEAD")
    again = resolve(cache)
    assert again.config == first.config and again.config.is_file()
    assert published.count(CONFIG_PATH, "HEAD") > asked  # the hub was asked again (the blob was still cached)
    assert published.count(WEIGHTS_PATH) == 1


# ------------------------------------------------------------------------------------------------------------
# names, paths, environment, progress


def test_unknown_name_lists_the_known_names(cache: Path) -> None:
    message = user_error(hub.resolve, "vit_reg4_b16_mim_100", cache_dir=cache)
    assert "neither an existing file nor a published weight name" in message
    assert all(name in message for name in hub.published_names())
    assert "did you mean 'vit_reg4_b16_mim_" in message
    assert files_under(cache) == []


def test_missing_file_says_both(tmp_path: Path, cache: Path) -> None:
    missing = tmp_path / "models" / "nope.pt"
    message = user_error(hub.resolve, str(missing), cache_dir=cache)
    assert str(missing) in message and "neither an existing file nor a published weight name" in message
    assert "empty" in user_error(hub.resolve, "", cache_dir=cache)


def test_local_path_is_passed_through(tmp_path: Path, mirror: HfMirror, cache: Path) -> None:
    local = tmp_path / "my_weights.pt"
    local.write_bytes(b"anything: local files are not hash-checked")
    assert hub.resolve_weights(str(local), cache_dir=cache) == local
    assert hub.resolve(local, cache_dir=cache) == hub.Resolved(weights=local)
    (tmp_path / NAME).write_bytes(b"x")  # a local file with a published name wins over the hub
    assert hub.resolve_weights(tmp_path / NAME) == tmp_path / NAME
    assert mirror.requests == [] and files_under(cache) == []


def test_environment_picks_hub_and_cache_at_each_call(
    published: HfMirror, tmp_path: Path, monkeypatch
) -> None:
    """$HF_ENDPOINT (set by the fixture after huggingface_hub was imported) and $VITREG_JAX_CACHE are
    honoured."""
    monkeypatch.setenv(hub.ENV_CACHE, str(tmp_path / "env-cache"))
    assert hub.hub_base_url() == published.url and hub.default_cache_dir() == tmp_path / "env-cache"
    path = hub.resolve_weights(NAME, progress=False)
    assert path == snapshot((tmp_path / "env-cache").resolve())
    assert published.count(WEIGHTS_PATH) == 1
    other = closed_port_url()  # an explicit argument wins over the environment
    message = user_error(hub.resolve, NAME, cache_dir=tmp_path / "other", base_url=other, progress=False)
    assert message.startswith(f"download failed: {other}/")


def test_default_cache_is_the_hugging_face_one(monkeypatch) -> None:
    from huggingface_hub import constants

    assert hub.default_cache_dir() == Path(constants.HF_HUB_CACHE).expanduser()
    monkeypatch.delenv(hub.ENV_HUB_URL)
    assert hub.hub_base_url() == constants.ENDPOINT.rstrip("/")


def test_invalid_base_url(cache: Path, monkeypatch) -> None:
    accept(monkeypatch, {FAKE_SHA: hub.LAYOUT_CURRENT})
    assert "invalid hub URL" in user_error(resolve, cache, base_url="127.0.0.1:8000")
    assert files_under(cache) == []


def test_progress_bar_on_stderr_only_when_asked(published: HfMirror, cache: Path, capsys) -> None:
    hub.resolve(NAME, cache_dir=cache / "quiet", progress=False)
    quiet = capsys.readouterr()
    assert quiet.out == "" and quiet.err == ""
    hub.resolve(NAME, cache_dir=cache / "loud", progress=True)
    loud = capsys.readouterr()
    assert loud.out == ""
    assert FILENAME in loud.err and "B/s" in loud.err and "200k/200k" in loud.err
    hub.resolve(NAME, cache_dir=cache / "loud", progress=True)
    assert capsys.readouterr().err == ""  # a cache hit is silent


def test_module_imports_neither_torch_nor_jax() -> None:
    source = Path(hub.__file__).read_text()
    assert "import torch" not in source and "import jax" not in source
