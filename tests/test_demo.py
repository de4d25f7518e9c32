"""``vitreg-jax demo`` (the README's main job) and the stand-in weights it shares with the notebooks."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.support.tolerances import DEMO_PARITY_ATOL
from vitreg_jax.cli import _demo_job as demo_lib
from vitreg_jax.cli.main import main
from vitreg_jax.convert import standin

ROOT = Path(__file__).resolve().parents[1]
PARITY = re.compile(r"max \|embedding difference\| vs birder \S+ on the (\d+) images: ([0-9.e+-]+)")
REQUIRE_BIRDER = os.environ.get("VITREG_JAX_REQUIRE_BIRDER") == "1"
# the full-size demo: about a minute on a quiet 2-core CPU (six timed 85M-parameter calls on 13 images among
# them); a shared machine can be several times slower
FULL_DEMO_TIMEOUT_S = 900


def demo(*args: str, cache: Path, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    """The demo as a user runs it: a fresh process, an empty weights cache (no published file to find)."""
    env = {**os.environ, "VITREG_JAX_CACHE": str(cache)}
    env.pop("XLA_FLAGS", None)
    return subprocess.run(
        [sys.executable, "-m", "vitreg_jax", "demo", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
        check=False,
    )


def test_full_demo_exits_0_and_prints_its_parity_figure(tmp_path: Path) -> None:
    """The default demo (full-size vit_reg4_b16 stand-in) on the 13 sample images."""
    pytest.importorskip("birder")
    out = tmp_path / "demo"
    out.mkdir()
    (out / "demo.json").write_text("{}")  # an earlier demo's output: replaced
    (out / "stale.txt").write_text("from an earlier run")
    r = demo("--out", str(out), cache=tmp_path / "cache", timeout=FULL_DEMO_TIMEOUT_S)
    assert r.returncode == 0, f"demo failed:\n{r.stdout}\n{r.stderr[-3000:]}"
    print(r.stdout)
    assert "STAND-IN weights, not the published model" in r.stdout
    m = PARITY.search(r.stdout)
    assert m, f"no parity line in:\n{r.stdout}"
    n_images = len(list((ROOT / "examples" / "images").glob("*.*"))) - 1  # minus ATTRIBUTION.md
    assert int(m.group(1)) == n_images
    assert float(m.group(2)) <= DEMO_PARITY_ATOL
    assert "best of 2 calls each after a warm-up call" in r.stdout
    assert f"bit-identical to birder.classification_transform on {n_images}/{n_images} images" in r.stdout
    report = json.loads((out / "demo.json").read_text())
    assert report["parameters"] == 85_804_800 and report["kind"] == "standin" and report["parity_ok"]
    assert report["parity_tolerance"] <= DEMO_PARITY_ATOL
    emb = np.load(out / "embeddings.npy")
    assert emb.shape == (n_images, 768) and np.isfinite(emb).all()
    assert len((out / "paths.txt").read_text().splitlines()) == n_images
    assert (out / "checkpoint" / "metadata.json").is_file()
    assert not (out / "stale.txt").exists()


def test_quick_demo_without_parity_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The tiny stand-in, in this process (the full-size run above covers the real command line); batches of 8
    and 5 printed rows, to cover larger --images folders too."""
    monkeypatch.setenv("VITREG_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(demo_lib, "MAX_BATCH", 8)
    monkeypatch.setattr(demo_lib, "SHOWN_ROWS", 5)
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--no-parity", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "parity      skipped: --no-parity was given" in text
    assert "a tiny 2-layer vit_reg4_b16" in text and "in compiled batches of 8" in text and "images/s" in text
    assert "... (8 more in" in text
    report = json.loads((out / "demo.json").read_text())
    assert report["parity_max_abs_diff"] is None and report["images"] == 13
    assert len((out / "neighbours.tsv").read_text().splitlines()) == 13


def test_demo_refuses_a_folder_it_did_not_write(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 2
    assert "holds no earlier demo output" in capsys.readouterr().err
    assert (tmp_path / "precious.txt").read_text() == "keep me"
    assert main(["demo", "--quick", "--images", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    assert "--images" in capsys.readouterr().err and not (tmp_path / "o").exists()
    assert main(["demo", "--config", "x.json", "--out", str(tmp_path / "o")]) == 2
    assert "--config goes with --weights" in capsys.readouterr().err


def test_demo_help_names_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = capsys.readouterr().out
    for option in ("--weights", "--images", "--out", "--quick", "STAND-IN"):
        assert option in text


def test_standin_without_birder_is_deterministic_and_loads(tmp_path: Path) -> None:
    """The torch-free stand-in (used when birder is absent): same seed, same bytes; loadable."""
    import vitreg_jax

    a = standin.write_standin(tmp_path / "a", model_config=standin.TINY_MODEL_CONFIG, use_birder=False)
    b = standin.write_standin(tmp_path / "b", model_config=standin.TINY_MODEL_CONFIG, use_birder=False)
    assert a.writer == "vitreg-jax" and a.weights.suffix == ".safetensors"
    assert a.weights.read_bytes() == b.weights.read_bytes()
    net, cfg = vitreg_jax.load_model_with_cfg(a.config, a.weights)
    assert net.cfg.num_layers == 2 and net.cfg.num_reg_tokens == 4
    assert cfg["rgb_stats"] == standin.MIM_RGB_STATS


def test_birder_standin_is_birders_own_file(tmp_path: Path) -> None:
    if not REQUIRE_BIRDER:
        pytest.importorskip("birder")
    import birder

    w = standin.write_standin(tmp_path, model_config=standin.TINY_MODEL_CONFIG)
    assert w.writer == "birder" and w.weights.suffix == ".pt" and w.is_standin
    import torch

    net, _ = birder.load_model_with_cfg(str(w.config), str(w.weights))  # birder reads it back
    fresh = standin.birder_standin_net(model_config=standin.TINY_MODEL_CONFIG).state_dict()
    assert all(torch.equal(v, fresh[k]) for k, v in net.state_dict().items())  # the fixed seed's weights


def test_no_published_weights_in_an_empty_cache(tmp_path: Path) -> None:
    assert standin.cached_published(cache_dir=tmp_path) is None


def test_a_cached_published_file_is_found_without_the_network(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file in the cache whose sha256 is a published one is used; the hub is never asked for it."""
    import dataclasses
    import hashlib

    from tests.support.hf_mirror import put_in_cache
    from vitreg_jax.convert import hub

    src = standin.write_standin(tmp_path / "src", model_config=standin.TINY_MODEL_CONFIG, use_birder=False)
    pub = hub.PUBLISHED["vit_reg4_b16_mim_300"]
    cache = (tmp_path / "cache").resolve()
    cached = put_in_cache(cache, pub.repo, pub.filename, src.weights.read_bytes())
    put_in_cache(cache, pub.repo, pub.config_filename, src.config.read_bytes())
    digest = hashlib.sha256(cached.read_bytes()).hexdigest()
    monkeypatch.setitem(
        hub.PUBLISHED, pub.name, dataclasses.replace(pub, hashes={digest: hub.LAYOUT_CURRENT})
    )
    monkeypatch.setenv(hub.ENV_HUB_URL, "http://127.0.0.1:9")  # nothing listens there: any request would fail
    found = standin.cached_published(cache_dir=cache)
    assert found is not None and found.kind == "published" and found.published_name == pub.name
    assert found.weights == cached and found.config == cached.parent / pub.config_filename
    assert "published vit_reg4_b16_mim_300" in found.describe()


def test_an_unreachable_published_name_falls_back_to_the_standin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from vitreg_jax.convert import hub

    monkeypatch.setenv(hub.ENV_CACHE, str(tmp_path / "cache"))
    monkeypatch.setenv(hub.ENV_HUB_URL, "http://127.0.0.1:9")  # connection refused, at once
    write = standin.write_standin
    tiny = lambda directory, **_: write(directory, model_config=standin.TINY_MODEL_CONFIG, use_birder=False)
    monkeypatch.setattr(standin, "write_standin", tiny)
    options = demo_lib.DemoOptions(weights="vit_reg4_b16_mim_300", out=tmp_path / "out")
    w = demo_lib.choose_weights(options, demo_lib.Printer())
    assert w.is_standin
    out = capsys.readouterr().out
    assert "could not get vit_reg4_b16_mim_300" in out and "continuing with the stand-in" in out


def test_demo_without_birder_or_torch_runs_all_but_the_parity_line(tmp_path: Path) -> None:
    """birder and torch made unimportable: the stand-in comes from vitreg-jax as a .safetensors, and the
    parity line says why it is skipped."""
    code = (
        "import sys; sys.modules['birder'] = None; sys.modules['torch'] = None\n"
        "from vitreg_jax.cli.main import main\n"
        f"sys.exit(main(['demo', '--quick', '--out', {str(tmp_path / 'demo')!r}]))"
    )
    env = {**os.environ, "VITREG_JAX_CACHE": str(tmp_path / "cache")}
    env.pop("XLA_FLAGS", None)
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=ROOT,
        check=False,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "parity      skipped: birder is not installed" in r.stdout
    assert "vitreg-jax's own random init" in r.stdout and ".safetensors" in r.stdout
    assert np.load(tmp_path / "demo" / "embeddings.npy").shape == (13, 64)


def test_demo_on_a_birder_file_with_a_legacy_json_and_on_a_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """--weights FILE --config JSON (a pre-0.4.13 json: `alias: vitreg4_b16`), then --weights CHECKPOINT:
    birder gets the weights exported back from our checkpoint, under today's network name."""
    pytest.importorskip("birder")
    monkeypatch.setenv("VITREG_JAX_CACHE", str(tmp_path / "cache"))
    w = standin.write_standin(tmp_path / "src", model_config=standin.TINY_MODEL_CONFIG)
    cfg = json.loads(w.config.read_text())
    cfg["alias"] = "vitreg4_b16"
    del cfg["registered_name"]
    legacy = tmp_path / "legacy.json"
    legacy.write_text(json.dumps(cfg))
    assert (
        main(["demo", "--weights", str(w.weights), "--config", str(legacy), "--out", str(tmp_path / "a")])
        == 0
    )
    assert main(["demo", "--weights", str(tmp_path / "a" / "checkpoint"), "--out", str(tmp_path / "b")]) == 0
    text = capsys.readouterr().out
    assert "is already a vitreg-jax checkpoint" in text
    diffs = [float(m.group(2)) for m in PARITY.finditer(text)]
    assert len(diffs) == 2 and max(diffs) <= DEMO_PARITY_ATOL
    assert "STAND-IN" not in text  # a file the user gave is not called a stand-in


def test_demo_times_both_sides_warm_and_alike(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ours and birder's embedding calls are timed the same way: one untimed warm-up call, then the best of
    demo_lib.TIMED_CALLS calls of the same batch (birder's first call is never the one timed)."""
    pytest.importorskip("birder")
    timed: list[int] = []
    best_time = demo_lib.best_time

    def counting(call, timed_calls=demo_lib.TIMED_CALLS):
        calls = 0

        def counted():
            nonlocal calls
            calls += 1
            return call()

        out = best_time(counted, timed_calls)
        timed.append(calls)
        return out

    monkeypatch.setattr(demo_lib, "best_time", counting)
    monkeypatch.setenv("VITREG_JAX_CACHE", str(tmp_path / "cache"))
    assert main(["demo", "--quick", "--out", str(tmp_path / "demo")]) == 0
    assert timed == [demo_lib.TIMED_CALLS + 1] * 2  # ours, then birder's
    report = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert report["parity_max_abs_diff"] <= DEMO_PARITY_ATOL and report["timed_calls"] == demo_lib.TIMED_CALLS
    text = capsys.readouterr().out
    assert "best of 2 calls each after a warm-up call" in text


def test_demo_parity_bar_is_the_projects() -> None:
    """The shipped bar is the fp32 bar against birder (the test suite's named constant), not a looser one."""
    assert demo_lib.PARITY_TOLERANCE <= DEMO_PARITY_ATOL
