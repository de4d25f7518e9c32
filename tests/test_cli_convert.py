"""``vitreg-jax convert / export / info`` end to end: round trips against birder 0.8.4, every key layout,
published names served from 127.0.0.1, --verify, and one clear error line (exit 2, nothing left behind)
for every kind of bad input.

Most cases call ``vitreg_jax.cli.main.main`` in-process (fast); a few run ``python -m vitreg_jax`` as
users do.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.support.birder_files import (
    RGB,
    SIZE,
    Tiny,
    birder_embedding,
    birder_net,
    birder_save,
    damaged_files,
    evil_files,
    legacy_state,
    nhwc_input,
    save_pt,
    signature,
    state_tensors,
    to_numpy,
)
from tests.support.hf_mirror import HfMirror
from tests.support.tiny_models import TINY_BIRDER
from tests.support.tolerances import CONVERT_PARITY_ATOL, VERIFY_INJECTED_ERROR, VERIFY_LOOSE_TOLERANCE
from vitreg_jax.cli.main import main
from vitreg_jax.convert import hub
from vitreg_jax.convert.formats.birder_file import read_birder_file
from vitreg_jax.fileio import umask
from vitreg_jax.tree import flatten

torch = pytest.importorskip("torch")
birder = pytest.importorskip("birder")
ROOT = Path(__file__).resolve().parent.parent


# helpers -------------------------------------------------------------------------------------------------
def cli(capsys: pytest.CaptureFixture[str], *args: Any) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_user_error(rc: int, err: str, *needles: str) -> None:
    """Exit 2, exactly one line on stderr naming the problem, no traceback."""
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1, err
    assert "Traceback" not in err and lines[0].startswith("vitreg-jax ")
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def leftovers(folder: Path) -> list[str]:
    """Anything a failed command might have left: temporary or partial entries."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") or "partial" in p.name)


def our_embedding(ckpt: Path, x: np.ndarray) -> np.ndarray:
    import vitreg_jax

    net, _ = vitreg_jax.load_model_with_cfg(None, ckpt)
    return np.asarray(net.embedding(x))


def restored(ckpt: Path) -> dict[tuple[str, ...], np.ndarray]:
    from vitreg_jax.model.checkpoint import restore_params

    return flatten(restore_params(ckpt))


def metadata(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / "metadata.json").read_text())


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def converted(tiny: Tiny, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny birder .pt converted once (other tests read it)."""
    out = tmp_path_factory.mktemp("converted") / "ckpt"
    assert main(["convert", str(tiny.pt), "--out", str(out)]) == 0
    return out


# convert ---------------------------------------------------------------------------------------------------
def test_convert_a_birder_file_gives_birders_embedding(
    tiny: Tiny, converted: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    x = nhwc_input()
    assert np.max(np.abs(our_embedding(converted, x) - birder_embedding(tiny.net, x))) < CONVERT_PARITY_ATOL
    meta = metadata(converted)
    prov = meta["provenance"]
    assert prov["source_file"] == tiny.pt.name and prov["source_sha256"] == sha256(tiny.pt)
    assert prov["birder_version"] == "v0.8.4" and prov["converter"] == "vitreg-jax"
    assert prov["converter_version"] and prov["source_layout"] == "current"
    assert prov["source_format"] == "pt" and prov["source_dtypes"] == ["float32"]
    assert meta["rgb_stats"] == {"mean": list(RGB["mean"]), "std": list(RGB["std"])}
    assert meta["signature"] == signature() and meta["dtype"] == "float32"
    # no preset has width 64: the name is the nearest birder network (model_config carries the rest)
    assert meta["birder_config"]["registered_name"].startswith("vit_reg4_")
    assert meta["vit_config"]["num_heads"] == 2 and meta["vit_config"]["image_size"] == list(SIZE)


def test_convert_prints_what_it_inferred(
    tiny: Tiny, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out, err = cli(capsys, "convert", tiny.pt, "--out", tmp_path / "c")
    assert rc == 0, err
    assert "(from the file's own config and tensor shapes)" in out and "nearest" in out
    assert "patch 16, 2 layers, width 64, 2 heads, MLP 128, 4 registers + class token" in out
    assert "wrote" in out and "parameters" in out


def test_convert_safetensors_and_with_json_give_the_same_weights(
    tiny: Tiny, converted: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    want = restored(converted)
    for args in ([tiny.st], [tiny.pt_bare_meta, "--config", tiny.json]):
        rc, out, err = cli(capsys, "convert", *args, "--out", tmp_path / "c")
        assert rc == 0, err
        got = restored(tmp_path / "c")
        assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
        shutil.rmtree(tmp_path / "c")
    assert "from --config" in out


def test_convert_without_json_at_a_nonstandard_width_asks_for_it(
    tiny: Tiny, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, _, err = cli(capsys, "convert", tiny.pt_bare_meta, "--out", tmp_path / "c")
    assert_user_error(rc, err, "num_heads for width 64", "--config")
    assert not (tmp_path / "c").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize(("oldest", "layout"), [(False, "pre-0.4"), (True, "pre-0.4-encoder-norm")])
def test_legacy_layouts_convert_to_the_same_checkpoint(
    tiny: Tiny, converted: Path, tmp_path: Path, oldest: bool, layout: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = save_pt(
        tmp_path / "legacy.pt", legacy_state(state_tensors(tiny.net), oldest=oldest), config=TINY_BIRDER
    )
    rc, out, err = cli(capsys, "convert", path, "--out", tmp_path / "c", "--verify")
    assert rc == 0, err
    assert f"key layout {layout}" in out and "verify: " in out and ": OK" in out
    want, got = restored(converted), restored(tmp_path / "c")
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
    assert metadata(tmp_path / "c")["provenance"]["source_layout"] == layout


@pytest.mark.parametrize("alias", ["vit_reg4_b16", "vitreg4_b16"])
def test_legacy_json_with_alias(
    tiny: Tiny, converted: Path, tmp_path: Path, alias: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """birder < 0.4.13 wrote ``alias`` (and ``net_param``); before 2025-04 the network was ``vitreg4_b16``."""
    legacy = {
        "birder_version": "v0.0.5a91",
        "name": "vit",
        "alias": alias,
        "task": "image_classification",
        "net_param": None,
        "model_config": {**TINY_BIRDER, "patch_size": 16, "num_reg_tokens": 4},
        "signature": signature(),
        "rgb_stats": {"mean": [0.5248, 0.5372, 0.5086], "std": [0.2135, 0.2103, 0.2622]},
    }
    (tmp_path / "old.json").write_text(json.dumps(legacy))
    weights = save_pt(
        tmp_path / "old.pt", legacy_state(state_tensors(tiny.net)), rgb_stats=None, signature=None
    )
    rc, _, err = cli(capsys, "convert", weights, "--config", tmp_path / "old.json", "--out", tmp_path / "c")
    assert rc == 0, err
    meta = metadata(tmp_path / "c")
    assert meta["birder_config"]["registered_name"] == "vit_reg4_b16" and "alias" not in meta["birder_config"]
    assert meta["rgb_stats"]["mean"] == [0.5248, 0.5372, 0.5086]  # the json's, not a default
    want, got = restored(converted), restored(tmp_path / "c")
    assert all(np.array_equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize(("dtype", "name"), [(torch.bfloat16, "bfloat16"), (torch.float16, "float16")])
def test_half_precision_files_convert_and_export_bit_for_bit(
    tiny: Tiny, tmp_path: Path, dtype: Any, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    net = birder_net().to(dtype)
    pt, js = birder_save(net, tmp_path, "half", external_config=TINY_BIRDER)
    rc, _, err = cli(capsys, "convert", pt, "--out", tmp_path / "c", "--verify")
    assert rc == 0, err
    meta = metadata(tmp_path / "c")
    assert meta["dtype"] == name and meta["provenance"]["source_dtypes"] == [name]
    assert {str(a.dtype) for a in restored(tmp_path / "c").values()} == {name}
    rc, _, err = cli(capsys, "export", tmp_path / "c", "--out", tmp_path / "back.pt")
    assert rc == 0, err
    src, back = (
        torch.load(pt, weights_only=True)["state"],
        torch.load(tmp_path / "back.pt", weights_only=True)["state"],
    )
    assert list(back) == list(src)
    assert all(back[k].dtype == src[k].dtype and torch.equal(back[k], src[k]) for k in src)
    # birder (float32 net) loads the exported half-precision file exactly as it loads the original
    x = nhwc_input()
    original, _ = birder.load_model_with_cfg(str(js), str(pt))
    exported, _ = birder.load_model_with_cfg(str(tmp_path / "back.json"), str(tmp_path / "back.pt"))
    assert np.array_equal(birder_embedding(original.eval(), x), birder_embedding(exported.eval(), x))
    assert (
        np.max(np.abs(our_embedding(tmp_path / "c", x) - birder_embedding(original.eval(), x)))
        < CONVERT_PARITY_ATOL
    )


def test_a_classifier_head_is_kept(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    net = birder_net(num_classes=5)
    classes = {f"bird_{i}": i for i in range(5)}
    pt, _ = birder_save(net, tmp_path, "cls", external_config=TINY_BIRDER, class_to_idx=classes)
    rc, out, err = cli(capsys, "convert", pt, "--out", tmp_path / "c")
    assert rc == 0, err
    assert "classifier 5" in out
    assert ("classifier", "kernel") in restored(tmp_path / "c")
    out = tmp_path / "exported" / "cls.safetensors"
    rc, _, err = cli(capsys, "export", tmp_path / "c", "--out", out, "--verify")
    assert rc == 0, err
    back = read_birder_file(out)
    assert back.meta["class_to_idx"] == classes and back.meta["signature"] == signature(SIZE, 5)
    exported, _ = birder.load_model_with_cfg(str(out.with_suffix(".json")), str(out))
    x = torch.from_numpy(np.ascontiguousarray(nhwc_input().transpose(0, 3, 1, 2)))
    with torch.no_grad():
        assert torch.equal(exported.eval()(x), net(x))


# export ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_export_loads_strictly_in_birder_with_the_same_outputs(
    tiny: Tiny, converted: Path, tmp_path: Path, suffix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "models" / f"vit_reg4_b16_tiny{suffix}"
    rc, stdout, err = cli(capsys, "export", converted, "--out", out, "--verify")
    assert rc == 0, err
    assert ": OK" in stdout and out.with_suffix(".json").is_file()
    net, cfg = birder.load_model_with_cfg(str(out.with_suffix(".json")), str(out))  # strict load_state_dict
    assert cfg["registered_name"].startswith("vit_reg4_") and cfg["rgb_stats"] == json.loads(json.dumps(RGB))
    x = nhwc_input()
    assert np.array_equal(birder_embedding(net.eval(), x), birder_embedding(tiny.net, x))  # the same weights
    assert oct(out.stat().st_mode & 0o777) == oct(0o666 & ~umask())


def test_pt_to_orbax_to_pt_is_bit_for_bit(
    tiny: Tiny, converted: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, _, err = cli(capsys, "export", converted, "--out", tmp_path / "back.pt")
    assert rc == 0, err
    src = torch.load(tiny.pt, weights_only=True)
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    assert list(back["state"]) == list(src["state"])
    for key, tensor in src["state"].items():
        assert back["state"][key].dtype == tensor.dtype, key
        assert np.array_equal(to_numpy(back["state"][key]), to_numpy(tensor)), key
    for key in ("signature", "class_to_idx", "task", "birder_version"):
        assert back[key] == src[key], key
    assert back["rgb_stats"] == {k: list(v) for k, v in src["rgb_stats"].items()}
    # the file's own config travels through metadata.json
    assert back["config"] == src["config"] == TINY_BIRDER


def test_the_python_api_behind_convert_and_export(
    tiny: Tiny, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """convert_to_checkpoint / export_to_birder do the commands' work; progress goes to ``report`` only."""
    from vitreg_jax.convert.to_birder import export_to_birder
    from vitreg_jax.convert.to_checkpoint import convert_to_checkpoint

    lines: list[str] = []
    done = convert_to_checkpoint(tiny.pt, tmp_path / "ckpt", report=lines.append)
    assert done.out == tmp_path / "ckpt" and done.verification is None and done.dtype == "float32"
    assert done.tensors == len(tiny.net.state_dict()) and lines[0].startswith("source")
    back = export_to_birder(done.out, tmp_path / "back.safetensors", report=lines.append)
    assert back.out == tmp_path / "back.safetensors" and back.json == tmp_path / "back.json"
    assert back.parameters == done.parameters and back.dtypes == ("float32",)
    assert capsys.readouterr().out == ""
    src, out = read_birder_file(tiny.pt), read_birder_file(back.out)
    assert list(out.state) == list(src.state)
    assert all(np.array_equal(out.state[k], v) for k, v in src.state.items())


def test_export_a_legacy_file_with_todays_keys(
    tiny: Tiny, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = save_pt(
        tmp_path / "old.pt", legacy_state(state_tensors(tiny.net), oldest=True), config=TINY_BIRDER
    )
    rc, _, err = cli(capsys, "export", path, "--out", tmp_path / "new.pt")
    assert rc == 0, err
    new = torch.load(tmp_path / "new.pt", weights_only=True)["state"]
    want = tiny.net.state_dict()
    assert list(new) == list(want) and all(torch.equal(new[k], want[k]) for k in want)
    net, _ = birder.load_model_with_cfg(str(tmp_path / "new.json"), str(tmp_path / "new.pt"))
    assert net is not None


# --verify --------------------------------------------------------------------------------------------------
def test_verify_failure_exits_1_and_writes_nothing(
    tiny: Tiny,
    converted: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from vitreg_jax.convert import verify

    real = verify.our_embedding
    monkeypatch.setattr(
        verify, "our_embedding", lambda net, x: real(net, x) + VERIFY_INJECTED_ERROR
    )  # wrong port
    rc, out, err = cli(capsys, "convert", tiny.pt, "--out", tmp_path / "c", "--verify")
    assert rc == 1 and "FAILED" in out and "nothing was written" in err
    assert not (tmp_path / "c").exists()
    rc, out, err = cli(capsys, "export", converted, "--out", tmp_path / "e.pt", "--verify")
    assert rc == 1 and "FAILED" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    rc, out, err = cli(
        capsys,
        "convert",
        tiny.pt,
        "--out",
        tmp_path / "c",
        "--verify",
        "--tolerance",
        str(VERIFY_LOOSE_TOLERANCE),
    )
    assert rc == 0 and ": OK" in out


@pytest.mark.parametrize("command", ["convert", "export"])
def test_verify_defaults_to_the_fp32_parity_bar(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    """The shipped --verify bar is the project's fp32 bar against birder, and --help says so."""
    from vitreg_jax.convert.verify import VERIFY_ATOL

    assert VERIFY_ATOL <= CONVERT_PARITY_ATOL
    with pytest.raises(SystemExit):
        main([command, "--help"])
    assert f"(default {VERIFY_ATOL:g})" in " ".join(capsys.readouterr().out.split())


# permissions -----------------------------------------------------------------------------------------------
@pytest.fixture
def umask_027() -> Iterator[int]:
    old = os.umask(0o027)
    try:
        yield 0o027
    finally:
        os.umask(old)


def modes(root: Path) -> dict[str, int]:
    """{relative path: permission bits} of ``root`` and everything under it."""
    return {
        str(p.relative_to(root.parent)): p.stat().st_mode & 0o777 for p in [root, *sorted(root.rglob("*"))]
    }


def test_everything_written_follows_the_umask(
    tiny: Tiny, tmp_path: Path, umask_027: int, capsys: pytest.CaptureFixture[str]
) -> None:
    """Like any other tool: folders 0777 & ~umask, files 0666 & ~umask (not mkdtemp's / mkstemp's 0700 /
    0600)."""
    folder, file = 0o777 & ~umask_027, 0o666 & ~umask_027
    assert cli(capsys, "convert", tiny.pt, "--out", tmp_path / "new" / "ckpt")[0] == 0
    assert cli(capsys, "export", tmp_path / "new" / "ckpt", "--out", tmp_path / "out" / "e.pt")[0] == 0
    assert (
        cli(
            capsys,
            "export",
            tmp_path / "new" / "ckpt",
            "--out",
            tmp_path / "out" / "e.safetensors",
            "--json",
            tmp_path / "out" / "s.json",
        )[0]
        == 0
    )
    found = {**modes(tmp_path / "new"), **modes(tmp_path / "out")}
    assert {
        "new/ckpt/metadata.json",
        "new/ckpt/params",
        "out/e.pt",
        "out/e.json",
        "out/s.json",
        "out/e.safetensors",
    } <= set(found)
    wrong = {
        name: oct(mode)
        for name, mode in found.items()
        if mode != (folder if (tmp_path / name).is_dir() else file)
    }
    assert not wrong, f"expected {oct(folder)} folders and {oct(file)} files: {wrong}"


# info ------------------------------------------------------------------------------------------------------
def test_info_on_a_checkpoint_and_a_birder_file(
    tiny: Tiny, converted: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    n = sum(v.numel() for v in tiny.net.state_dict().values())
    rc, out, err = cli(capsys, "info", converted)
    assert rc == 0, err
    for needle in (
        "vitreg-jax checkpoint",
        "network       vit_reg4_",
        f"{n:,} in",
        "float32",
        "input size    32x32",
        "mean (0.5191, 0.5306, 0.4877)",
        f"source_sha256 {sha256(tiny.pt)}",
    ):
        assert needle in out, needle
    rc, out, err = cli(capsys, "info", tiny.pt, "--json")
    assert rc == 0, err
    info = json.loads(out)
    assert info["parameters"] == n and info["tensors"] == len(tiny.net.state_dict())
    assert info["network"].startswith("vit_reg4_") and info["dtypes"] == ["float32"]
    assert info["input_size"] == list(SIZE) and info["provenance"]["sha256"] == sha256(tiny.pt)
    assert info["architecture"]["num_heads"] == 2


def test_info_on_a_file_whose_architecture_is_unknown(tiny: Tiny, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = cli(capsys, "info", tiny.pt_bare_meta)
    assert rc == 0, err
    assert (
        "architecture  unknown:" in out and "num_heads for width 64" in out and "input size    32x32" in out
    )
    rc, out, _ = cli(capsys, "info", tiny.pt_bare_meta, "--config", tiny.json, "--json")
    assert json.loads(out)["architecture"]["num_heads"] == 2


# published names -------------------------------------------------------------------------------------------
@pytest.fixture
def hub_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HfMirror]:
    """A local Hugging Face hub mirror; $HF_ENDPOINT and the cache point at it and at tmp_path."""
    with HfMirror(tmp_path / "hub") as mirror:
        monkeypatch.setenv(hub.ENV_HUB_URL, mirror.url)
        monkeypatch.setenv(hub.ENV_CACHE, str(tmp_path / "cache"))
        yield mirror


def publish(
    mirror: HfMirror,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    weights: Path,
    layout: str,
    config: Path | None = None,
) -> None:
    pub = hub.PUBLISHED[name]
    mirror.put(pub.repo, pub.filename, weights.read_bytes())
    if config is not None:
        mirror.put(pub.repo, pub.config_filename, config.read_bytes())
    monkeypatch.setitem(hub.PUBLISHED, name, dataclasses.replace(pub, hashes={sha256(weights): layout}))


def test_convert_and_info_by_published_name(
    tiny: Tiny,
    converted: Path,
    tmp_path: Path,
    hub_server: HfMirror,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    publish(hub_server, monkeypatch, "vit_reg4_b16_mim_200", tiny.pt_bare_meta, hub.LAYOUT_CURRENT, tiny.json)
    rc, out, err = cli(capsys, "convert", "vit_reg4_b16_mim_200", "--out", tmp_path / "c")
    assert rc == 0, err
    assert "published vit_reg4_b16_mim_200" in out and "from the published json" in out
    assert metadata(tmp_path / "c")["provenance"]["published_name"] == "vit_reg4_b16_mim_200"
    want, got = restored(converted), restored(tmp_path / "c")
    assert all(np.array_equal(got[k], want[k]) for k in want)
    rc, out, err = cli(capsys, "info", "vit_reg4_b16_mim_200", "--json")  # served from the cache now
    assert rc == 0, err
    assert json.loads(out)["provenance"]["published_name"] == "vit_reg4_b16_mim_200"


def test_legacy_published_name_and_a_wrong_hash(
    tiny: Tiny,
    tmp_path: Path,
    hub_server: HfMirror,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    legacy = save_pt(tmp_path / "legacy.pt", legacy_state(state_tensors(tiny.net)), config=TINY_BIRDER)
    publish(hub_server, monkeypatch, "vitreg4_b16_mim_200", legacy, hub.LAYOUT_LEGACY)
    rc, out, err = cli(capsys, "convert", "vitreg4_b16_mim_200", "--out", tmp_path / "c")
    assert rc == 0, err
    assert "key layout pre-0.4" in out
    # a served file whose sha256 is not the published one is never used
    monkeypatch.setitem(
        hub.PUBLISHED,
        "vitreg4_b16_mim_200",
        dataclasses.replace(hub.PUBLISHED["vitreg4_b16_mim_200"], hashes={"0" * 64: "legacy"}),
    )
    monkeypatch.setenv(hub.ENV_CACHE, str(tmp_path / "cache2"))
    rc, _, err = cli(capsys, "convert", "vitreg4_b16_mim_200", "--out", tmp_path / "d")
    progress, last = err.rsplit("\n", 2)[0], err.strip().splitlines()[-1]  # the download shows a progress bar
    assert_user_error(rc, last, "sha256", "is not the published")
    assert "Traceback" not in progress
    assert not (tmp_path / "d").exists()


def test_an_unusable_published_json_falls_back_to_the_file(
    tiny: Tiny,
    tmp_path: Path,
    hub_server: HfMirror,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text(
        json.dumps({**json.loads(tiny.json.read_text()), "model_config": {"stem_type": "hmlp"}})
    )
    publish(hub_server, monkeypatch, "vit_reg4_b16_mim_300", tiny.pt, hub.LAYOUT_CURRENT, broken)
    rc, out, err = cli(capsys, "convert", "vit_reg4_b16_mim_300", "--out", tmp_path / "c")
    assert rc == 0, err
    assert "the published json was not used" in out and "stem_type" in out
    assert metadata(tmp_path / "c")["vit_config"]["num_heads"] == 2


def test_rgb_stats_of_the_json_win_and_the_difference_is_shown(
    tiny: Tiny, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    (tmp_path / "cfg.json").write_text(json.dumps({**json.loads(tiny.json.read_text()), "rgb_stats": other}))
    rc, out, err = cli(capsys, "convert", tiny.pt, "--config", tmp_path / "cfg.json", "--out", tmp_path / "c")
    assert rc == 0, err
    assert "the weights file records" in out
    assert metadata(tmp_path / "c")["rgb_stats"] == other


def test_load_model_with_cfg_reads_a_birder_file_without_its_json(tiny: Tiny) -> None:
    """vitreg_jax.load_model_with_cfg infers the architecture from the file when no config is given."""
    import vitreg_jax

    net, cfg = vitreg_jax.load_model_with_cfg(None, tiny.pt)
    x = nhwc_input()
    assert np.max(np.abs(np.asarray(net.embedding(x)) - birder_embedding(tiny.net, x))) < CONVERT_PARITY_ATOL
    assert cfg["rgb_stats"]["mean"] == list(RGB["mean"]) and cfg["signature"] == signature()


# bad input: one line on stderr, exit 2, nothing left behind ------------------------------------------------
def test_unsafe_pickles_are_refused_and_never_run(
    tiny: Tiny, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "marker"
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for what, path in evil_files(tmp_path / "evil", state_tensors(tiny.net), marker).items():
        for command in (
            ["convert", path, "--out", out_dir / "c"],
            ["info", path],
            ["export", path, "--out", out_dir / "e.pt"],
        ):
            rc, _, err = cli(capsys, *command)
            assert_user_error(rc, err, "refused", str(path))
            assert not marker.exists(), (what, command[0])
    assert list(out_dir.iterdir()) == []


def test_damaged_files_are_refused(tiny: Tiny, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for path in damaged_files(tmp_path / "bad", tiny.pt, tiny.st).values():
        rc, _, err = cli(capsys, "convert", path, "--out", out_dir / "c")
        assert_user_error(rc, err, str(path))
    assert list(out_dir.iterdir()) == []


def _state_variants(tiny: Tiny) -> dict[str, tuple[dict[str, Any], str]]:
    good = state_tensors(tiny.net)
    missing = {k: v for k, v in good.items() if k != "encoder.block.1.mlp.3.bias"}
    extra = {**good, "decoder.weight": torch.zeros(3)}
    shaped = {**good, "encoder.block.0.attn.proj.weight": torch.zeros(64, 32)}
    return {
        "missing": (missing, "missing 1 key(s): encoder.block.1.mlp.3.bias"),
        "extra": (extra, "unexpected 1 key(s): decoder.weight"),
        "mis-shaped": (shaped, "encoder.block.0.attn.proj.weight (64, 32) (expected (64, 64))"),
    }


@pytest.mark.parametrize("problem", ["missing", "extra", "mis-shaped"])
def test_state_dicts_that_do_not_fit_are_refused(
    tiny: Tiny, tmp_path: Path, problem: str, capsys: pytest.CaptureFixture[str]
) -> None:
    state, needle = _state_variants(tiny)[problem]
    path = save_pt(tmp_path / "w.pt", state, config=TINY_BIRDER, birder_version="v0.8.4")
    rc, _, err = cli(capsys, "convert", path, "--config", tiny.json, "--out", tmp_path / "c")
    assert_user_error(rc, err, needle)
    assert not (tmp_path / "c").exists() and leftovers(tmp_path) == []


def test_paths_that_are_not_weight_files(
    tiny: Tiny, converted: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "folder").mkdir()
    cases = [
        (["convert", tmp_path / "folder", "--out", tmp_path / "c"], "is a directory"),
        (["convert", converted, "--out", tmp_path / "c"], "is a vitreg-jax checkpoint already"),
        (
            ["convert", tmp_path / "nope.pt", "--out", tmp_path / "c"],
            "neither an existing file nor a published",
        ),
        (["convert", "vit_reg4_b16_mim_20", "--out", tmp_path / "c"], "did you mean 'vit_reg4_b16_mim_200'"),
        (
            ["convert", tiny.pt, "--network", "vit_nope", "--out", tmp_path / "c"],
            "unknown network 'vit_nope'",
        ),
        (["convert", tiny.pt, "--network", "vit_reg4_b16", "--out", tmp_path / "c"], "do not fit"),
        (["convert", tiny.pt, "--config", tmp_path / "none.json", "--out", tmp_path / "c"], "no such config"),
        (["export", tmp_path / "folder", "--out", tmp_path / "e.pt"], "is a directory"),
        (["export", converted, "--out", tmp_path / "e.onnx"], "expected a .pt or .safetensors"),
        (["export", converted, "--out", tmp_path / "e.pt", "--network", "vit_b16"], "a checkpoint carries"),
        (["info", tmp_path / "folder"], "not a vitreg-jax checkpoint"),
        (["info", tmp_path / "nope"], "neither an existing file nor a published"),
    ]
    for args, needle in cases:
        rc, _, err = cli(capsys, *args)
        assert_user_error(rc, err, needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder"]


def test_a_damaged_checkpoint_is_refused_by_export_and_info(
    converted: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(converted, broken)
    for p in (broken / "params").rglob("*"):
        if p.is_file() and p.stat().st_size > 1000:
            p.write_bytes(b"")
    rc, _, err = cli(capsys, "export", broken, "--out", tmp_path / "e.pt")
    assert_user_error(rc, err, str(broken))
    assert not (tmp_path / "e.pt").exists() and leftovers(tmp_path) == []
    (broken / "metadata.json").write_text("{not json")
    rc, _, err = cli(capsys, "info", broken)
    assert_user_error(rc, err, "metadata.json")


def test_export_never_drops_parameters(
    converted: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from vitreg_jax.model.checkpoint import load_checkpoint, save_checkpoint

    params, meta = load_checkpoint(converted)
    params["decoder"] = {"kernel": np.zeros((2, 2), np.float32)}
    meta.pop("format")
    save_checkpoint(tmp_path / "more", params, meta)
    rc, _, err = cli(capsys, "export", tmp_path / "more", "--out", tmp_path / "e.pt")
    assert_user_error(rc, err, "1 parameter(s) a birder ViT does not have: decoder.kernel")
    assert not (tmp_path / "e.pt").exists()


def test_an_existing_output_is_replaced_only_with_force(
    tiny: Tiny, converted: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "c"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc, _, err = cli(capsys, "convert", tiny.pt, "--out", out)
    assert_user_error(rc, err, "already exists", "--force")
    rc, _, err = cli(capsys, "convert", tiny.pt, "--out", out, "--force")  # not a checkpoint: never deleted
    assert_user_error(rc, err, "not a vitreg-jax checkpoint")
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    assert cli(capsys, "convert", tiny.pt, "--out", out, "--force")[0] == 0
    assert cli(capsys, "convert", tiny.st, "--out", out, "--force")[0] == 0
    assert metadata(out)["provenance"]["source_format"] == "safetensors"
    (tmp_path / "e.json").write_text("{}")
    rc, _, err = cli(capsys, "export", converted, "--out", tmp_path / "e.pt")
    assert_user_error(rc, err, "e.json: already exists")
    assert not (tmp_path / "e.pt").exists()
    assert cli(capsys, "export", converted, "--out", tmp_path / "e.pt", "--force")[0] == 0
    assert json.loads((tmp_path / "e.json").read_text())["registered_name"].startswith("vit_reg4_")
    assert leftovers(tmp_path) == []


def test_unwritable_output_locations(
    tiny: Tiny, converted: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    rc, _, err = cli(capsys, "convert", tiny.pt, "--out", a_file / "sub" / "c")
    assert_user_error(rc, err, "is not a directory")
    rc, _, err = cli(capsys, "export", converted, "--out", a_file / "e.pt")
    assert_user_error(rc, err, "is not a directory")
    if os.geteuid() == 0:  # root writes anywhere chmod allows: /proc refuses new entries even to root
        targets = [Path("/proc") / f"vitreg-jax-test-{os.getpid()}"]
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        targets = [locked / "c"]
    for target in targets:
        rc, _, err = cli(capsys, "convert", tiny.pt, "--out", target)
        assert_user_error(rc, err)
        assert not target.exists()
        rc, _, err = cli(capsys, "export", converted, "--out", target.with_suffix(".pt"))
        assert_user_error(rc, err)
        assert not target.with_suffix(".pt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) in (["a_file"], ["a_file", "locked"])


def test_missing_parent_folders_are_created_and_removed_again_on_failure(
    tiny: Tiny, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, _, err = cli(capsys, "convert", tiny.pt_bare_meta, "--out", tmp_path / "a" / "b" / "c")
    assert_user_error(rc, err, "num_heads")
    assert list(tmp_path.iterdir()) == []
    assert cli(capsys, "convert", tiny.pt, "--out", tmp_path / "a" / "b" / "c")[0] == 0


# help ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["convert", "export", "info"])
def test_help_shows_examples(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0
    assert "examples:" in out and f"vitreg-jax {command} " in out
    if command != "info":
        assert "--verify" in out and "Exit status" in out and "VITREG_JAX_CACHE" in out


# as users run it: python -m vitreg_jax ----------------------------------------------------------------------
def run(*args: Any, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vitreg_jax", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        timeout=300,
        check=False,
    )


def test_end_to_end_convert_info_export_without_torch_in_the_process(tiny: Tiny, tmp_path: Path) -> None:
    """.safetensors in and out needs no torch at all (a .pt is only ever read by torch.load)."""
    probe = (
        "import sys, runpy; sys.argv = ['vitreg-jax', *sys.argv[1:]]\nsys.modules['torch'] = None\n"
        "from vitreg_jax.cli.main import main\nrc = main()\n"
        "assert sys.modules.get('torch') is None, 'torch was imported'\nsys.exit(rc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, "convert", str(tiny.st), "--out", str(tmp_path / "c")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    done = run("info", tmp_path / "c", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["network"].startswith("vit_reg4_")
    done = run("export", tmp_path / "c", "--out", tmp_path / "e.safetensors")
    assert done.returncode == 0, done.stderr
    net, _ = birder.load_model_with_cfg(str(tmp_path / "e.json"), str(tmp_path / "e.safetensors"))
    x = nhwc_input()
    assert np.array_equal(birder_embedding(net.eval(), x), birder_embedding(tiny.net, x))


def test_end_to_end_refusals(tiny: Tiny, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    evil = evil_files(tmp_path / "evil", state_tensors(tiny.net), marker)["payload in the metadata"]
    truncated = damaged_files(tmp_path / "bad", tiny.pt, tiny.st)["truncated .pt"]
    for src, needle in ((evil, "refused"), (truncated, "truncated or corrupted")):
        done = run("convert", src, "--out", tmp_path / "c")
        assert done.returncode == 2 and done.stdout == ""
        assert done.stderr.count("\n") == 1 and needle in done.stderr and "Traceback" not in done.stderr
    assert not marker.exists() and not (tmp_path / "c").exists()
    done = run("convert", "--help")
    assert done.returncode == 0 and "examples:" in done.stdout


@pytest.mark.slow
def test_full_size_vit_reg4_b16_maps_all_151_tensors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The real architecture (85,804,800 parameters, 151 tensors) infers and converts from shapes alone."""
    net = birder_net(config=None, size=(224, 224))
    pt = save_pt(
        tmp_path / "full.pt", state_tensors(net), signature=signature((224, 224)), birder_version="v0.8.4"
    )
    del net
    rc, out, err = cli(capsys, "convert", pt, "--out", tmp_path / "c")
    assert rc == 0, err
    assert "architecture vit_reg4_b16 (from tensor shapes)" in out and "12 heads" in out
    assert "85,804,800 parameters in 151 tensors" in out
    rc, out, err = cli(capsys, "info", tmp_path / "c", "--json")  # reads the Orbax metadata, not the weights
    info = json.loads(out)
    assert (info["parameters"], info["tensors"], info["dtypes"]) == (85_804_800, 151, ["float32"])
    assert info["network"] == "vit_reg4_b16" and info["input_size"] == [224, 224]
