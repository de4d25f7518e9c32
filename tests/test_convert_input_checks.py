"""`convert` on inputs that used to crash or pass silently: each ends as one line and exit 2, or converts and
says what it changed.

- a config field of the wrong type (``model_config.num_layers: "two"``);
- ``rgb_stats`` of the wrong length or with a zero std (refused at conversion, not later in ``embed``);
- extra top-level entries of a ``.pt`` that JSON cannot hold (kept when representable, else changed or
  dropped, and said);
- hidden ``.partial`` folders left by killed runs (removed by the next run; a live run's is left alone);
- an interrupted convert (nothing to resume: it says nothing was written).
The weights are the tiny stand-in written by vitreg-jax itself (no torch needed), except the ``.pt`` with
extra metadata, which ``torch.save`` writes as birder would.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.support.tiny_models import TINY_BIRDER
from vitreg_jax._locks import GRACE_S, hold, release, remove_stale
from vitreg_jax.cli.main import ON_INTERRUPT, main
from vitreg_jax.convert import standin
from vitreg_jax.convert.formats.birder_file import read_birder_file, write_birder_file
from vitreg_jax.convert.json_meta import json_safe
from vitreg_jax.errors import UserError
from vitreg_jax.model.config import ViTConfig

SIZE = (32, 32)
OLD_S = GRACE_S * 10  # an mtime this far back makes a leftover look abandoned


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> standin.Weights:
    folder = tmp_path_factory.mktemp("standin")
    return standin.write_standin(folder, model_config=standin.TINY_MODEL_CONFIG, size=SIZE, use_birder=False)


def run(capsys: pytest.CaptureFixture[str], *args: Any) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc: int, err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, err
    assert lines[0].startswith("vitreg-jax convert: error: ") and "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def edited_config(weights: standin.Weights, folder: Path, **changes: Any) -> Path:
    """The stand-in's json with ``changes`` (``model_config`` entries merged, other keys replaced)."""
    cfg = json.loads(weights.config.read_text())
    cfg["model_config"] = {**cfg.get("model_config", {}), **changes.pop("model_config", {})}
    cfg.update(changes)
    path = folder / "edited.json"
    path.write_text(json.dumps(cfg))
    return path


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# a config field of the wrong type
# ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "field, value",
    [
        ("num_layers", "two"),
        ("num_heads", 2.5),
        ("qkv_bias", "yes"),
        ("layer_scale_init_value", [1e-5]),
        ("out_indices", "last"),
    ],
)
def test_a_config_field_of_the_wrong_type_is_one_line(
    weights: standin.Weights, tmp_path: Path, field: str, value: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    config = edited_config(weights, tmp_path, model_config={field: value})
    rc, _, err = run(capsys, "convert", weights.weights, "--config", config, "--out", tmp_path / "ckpt")
    assert_one_line_error(rc, err, f"ViTConfig.{field} must be of type", repr(value)[:20])
    assert not (tmp_path / "ckpt").exists() and hidden(tmp_path) == []


def test_vit_config_refuses_wrong_types_by_name() -> None:
    base = {**TINY_BIRDER, "patch_size": 16}
    with pytest.raises(UserError, match=r"ViTConfig.num_layers must be of type int, got 'two' \(str\)"):
        ViTConfig.from_birder({**base, "num_layers": "two"})
    with pytest.raises(UserError, match="ViTConfig.class_token must be of type bool"):
        ViTConfig.from_dict({**base, "class_token": 1})
    with pytest.raises(UserError, match="ViTConfig.image_size must be of type tuple"):
        ViTConfig.from_dict({**base, "image_size": 224})
    assert ViTConfig.from_birder({**base, "out_indices": [-1]}).out_indices == (1,)  # still birder's meaning


# rgb_stats
# --------------------------------------------------------------------------------------------------------
BAD_RGB = [
    ({"mean": [0.5, 0.5], "std": [0.2, 0.2, 0.2]}, "rgb_stats['mean'] must be 3 finite numbers"),
    ({"mean": [0.5], "std": [0.2]}, "rgb_stats['mean'] must be 3 finite numbers"),
    ({"mean": [0.5, 0.5, 0.5], "std": [0.2, 0.0, 0.2]}, "rgb_stats['std'] must be > 0"),
    ({"mean": [0.5, 0.5, 0.5], "std": [0.2, float("nan"), 0.2]}, "rgb_stats['std'] must be 3 finite numbers"),
]


@pytest.mark.parametrize("rgb_stats, message", BAD_RGB)
def test_bad_rgb_stats_in_the_json_are_refused_at_conversion(
    weights: standin.Weights,
    tmp_path: Path,
    rgb_stats: dict,
    message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = edited_config(weights, tmp_path, rgb_stats=rgb_stats)
    rc, _, err = run(capsys, "convert", weights.weights, "--config", config, "--out", tmp_path / "ckpt")
    assert_one_line_error(rc, err, message)
    assert not (tmp_path / "ckpt").exists() and hidden(tmp_path) == []


@pytest.mark.parametrize("rgb_stats, message", BAD_RGB[:3])
def test_bad_rgb_stats_in_the_file_are_refused_at_conversion(
    weights: standin.Weights,
    tmp_path: Path,
    rgb_stats: dict,
    message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    source = read_birder_file(weights.weights)
    bad = tmp_path / "bad.safetensors"
    write_birder_file(bad, source.state, {**source.meta, "rgb_stats": rgb_stats})
    rc, _, err = run(capsys, "convert", bad, "--out", tmp_path / "ckpt")
    assert_one_line_error(rc, err, message, str(bad))
    assert not (tmp_path / "ckpt").exists()


# metadata that JSON cannot hold
# -------------------------------------------------------------------------------
def test_extra_metadata_that_json_cannot_hold_is_kept_changed_or_dropped_and_said(
    weights: standin.Weights, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torch = pytest.importorskip("torch")
    source = read_birder_file(weights.weights)
    pt = tmp_path / "extra.pt"
    torch.save(
        {
            "state": {k: torch.from_numpy(np.array(v)) for k, v in source.state.items()},
            **source.meta,
            "blob": b"\x00\x01\x02",
            "tags": {"b", "a"},
            "notes": {"kept": [1, 2.5, None, "x"], 3: (4, 5)},
        },
        pt,
    )
    rc, out, err = run(capsys, "convert", pt, "--config", weights.config, "--out", tmp_path / "ckpt")
    assert rc == 0, err
    birder_meta = json.loads((tmp_path / "ckpt" / "metadata.json").read_text())["birder_meta"]
    assert "blob" not in birder_meta and birder_meta["tags"] == ["a", "b"]
    assert birder_meta["notes"] == {"kept": [1, 2.5, None, "x"], "3": [4, 5]}
    assert (
        "metadata     blob: bytes (3 bytes) dropped" in out
        and "metadata     tags: set of 2 written as a list" in out
    )


def test_json_safe_reports_every_change() -> None:
    class Odd:
        def __repr__(self) -> str:
            return "Odd()"

    value = {
        "a": (1, 2),
        "b": frozenset({2, 1}),
        "c": np.float32(0.5),
        "d": np.zeros(3),
        "e": Odd(),
        "f": float("inf"),
        (1, 2): "tuple key",
        "g": [b"x", 1],
    }
    safe, notes = json_safe(value)
    json.dumps(safe, allow_nan=False)
    assert safe == {
        "a": [1, 2],
        "b": [1, 2],
        "c": 0.5,
        "e": "Odd()",
        "f": "inf",
        "(1, 2)": "tuple key",
        "g": [1],
    }
    assert len(notes) == 6 and all("\n" not in n for n in notes)
    assert json_safe({"plain": [1, "2", None, True, {"x": 1.5}]}) == (
        {"plain": [1, "2", None, True, {"x": 1.5}]},
        [],
    )


# leftovers of killed runs
# -------------------------------------------------------------------------------------
def make_leftover(folder: Path, name: str, age_s: float = OLD_S) -> Path:
    left = folder / name
    left.mkdir(parents=True)
    (left / "junk").write_bytes(b"x" * 1000)
    then = left.stat().st_mtime - age_s
    os.utime(left, (then, then))
    return left


def test_a_killed_runs_partial_folder_is_removed_by_the_next_convert(
    weights: standin.Weights, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stale = make_leftover(tmp_path, ".ckpt.ab12cd34.partial")
    other = make_leftover(tmp_path, ".other.ab12cd34.partial")  # another output's: not this run's business
    live = make_leftover(tmp_path, ".ckpt.zz99yy88.partial")
    fd = hold(live)  # a run still writing it
    try:
        rc, _, err = run(
            capsys, "convert", weights.weights, "--config", weights.config, "--out", tmp_path / "ckpt"
        )
    finally:
        release(fd)
    assert rc == 0, err
    assert not stale.exists() and other.exists() and live.exists()
    assert (tmp_path / "ckpt" / "metadata.json").is_file()


def test_remove_stale_spares_young_and_foreign_entries(tmp_path: Path) -> None:
    out = tmp_path / "ckpt"
    young = make_leftover(tmp_path, ".ckpt.aaaaaaaa.partial", age_s=0)
    old = make_leftover(tmp_path, ".ckpt.bbbbbbbb.partial")
    old_file = tmp_path / ".ckpt.cccccccc.partial"
    old_file.write_text("{}")
    then = old_file.stat().st_mtime - OLD_S
    os.utime(old_file, (then, then))
    lookalike = make_leftover(tmp_path, ".ckpt.v2.bbbbbbbb.partial")  # the output "ckpt.v2", not "ckpt"
    assert sorted(remove_stale(out)) == sorted([old, old_file])
    assert young.exists() and lookalike.exists() and not old.exists() and not old_file.exists()


# an interrupted convert
# -----------------------------------------------------------------------------------------
def test_an_interrupted_convert_says_nothing_was_written(
    weights: standin.Weights,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import vitreg_jax.model.checkpoint

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(
        vitreg_jax.model.checkpoint, "_checkpointer", lambda: type("C", (), {"save": interrupted})()
    )
    rc, _, err = run(
        capsys, "convert", weights.weights, "--config", weights.config, "--out", tmp_path / "sub" / "ckpt"
    )
    assert rc == 130
    assert err.strip() == "vitreg-jax convert: interrupted; nothing was written"
    assert not (tmp_path / "sub").exists()  # the folder it made for the output is gone too
    assert "resume" in ON_INTERRUPT["embed"] and "--resume" in ON_INTERRUPT["pretrain"]
