"""k-NN evaluation during ``pretrain``: logged beside the loss, equal to an evaluation of the exported
encoder, the same after a kill and ``--resume``, saved with the run's settings, and bad folders refused before
training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from tests.support.labelled_images import write_split
from tests.support.pretrain_cli import cli_error, pretrain_args, run_cli
from tests.support.tiny_models import SIZE
from vitreg_jax import load_model_with_cfg
from vitreg_jax.evaluation.monitor import KNNMonitor

CLASSES = {"red": (200, 70, 70), "green": (70, 200, 70), "blue": (70, 70, 200)}
EVAL_K = 3
EVAL_EVERY = 2
STEPS = 8


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("labelled")
    return (
        write_split(base / "train", CLASSES, 5, 0, noise=90, side=36),
        write_split(base / "val", CLASSES, 3, 1, noise=90, side=36),
    )


def eval_args(labelled: tuple[Path, Path]) -> list[str]:
    return [
        "--eval-train",
        str(labelled[0]),
        "--eval-val",
        str(labelled[1]),
        "--eval-every",
        str(EVAL_EVERY),
        "--eval-k",
        str(EVAL_K),
    ]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_knn_during_pretrain_survives_a_kill_and_resume(labelled, tmp_path, capsys):
    cache = tmp_path / "jax-cache"
    whole = run_cli(pretrain_args(tmp_path / "whole", STEPS) + eval_args(labelled), cache)
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert "k-NN evaluation (k=3) every 2 steps: 15 train / 9 val images, 3 classes" in whole.stderr
    killed = run_cli(pretrain_args(tmp_path / "resumed", STEPS) + eval_args(labelled), cache, kill_at_step=7)
    assert killed.returncode == -9, killed.stderr[-3000:]
    resumed = run_cli(["pretrain", "--out", str(tmp_path / "resumed"), "--resume", "--no-progress"], cache)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    lines = metrics(tmp_path / "whole")
    knn = {r["step"]: (r["knn/top1"], r["knn/top5"]) for r in lines if "knn/top1" in r}
    assert sorted(knn) == list(range(EVAL_EVERY, STEPS + 1, EVAL_EVERY))
    assert all(0.0 <= top1 <= 1.0 and top5 is None for top1, top5 in knn.values())  # 3 classes: no top-5
    assert all("loss" in r for r in lines)  # beside the loss, in the same lines
    again = metrics(tmp_path / "resumed")
    assert [r["step"] for r in again] == [r["step"] for r in lines]
    assert {r["step"]: (r["knn/top1"], r["knn/top5"]) for r in again if "knn/top1" in r} == knn

    # the last value is the k-NN accuracy of the exported encoder, evaluated on its own
    encoder, cfg = load_model_with_cfg(None, tmp_path / "whole" / "encoder")
    alone = KNNMonitor(*labelled, size=SIZE, rgb_stats=cfg["rgb_stats"], k=EVAL_K)(encoder)
    assert (alone["top1"], alone["top5"]) == knn[STEPS]

    # the options are part of the run's saved settings: a resume that changes one is refused by name
    settings = json.loads((tmp_path / "whole" / "run.json").read_text())["settings"]
    assert (settings["eval_train"], settings["eval_val"]) == tuple(str(p) for p in labelled)
    assert (settings["eval_every"], settings["eval_k"]) == (EVAL_EVERY, EVAL_K)
    err = cli_error(
        ["pretrain", "--out", str(tmp_path / "whole"), "--resume", "--eval-every", "3", "--eval-k", "5"],
        capsys,
    )
    assert "--eval-every 3 (run has 2)" in err and "--eval-k 5 (run has 3)" in err


def test_tensorboard_gets_the_knn_scalars(labelled, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = run_cli(pretrain_args(tmp_path / "run", 2) + eval_args(labelled), tmp_path / "jax-cache")
    assert result.returncode == 0, result.stderr[-3000:]
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert "knn/top1" in events.Tags()["scalars"]  # three classes: no top-5, in TensorBoard or elsewhere
    assert "knn/top5" not in events.Tags()["scalars"]
    logged = {r["step"]: r["knn/top1"] for r in metrics(tmp_path / "run") if "knn/top1" in r}
    assert {e.step: pytest.approx(e.value) for e in events.Scalars("knn/top1")} == logged


@pytest.mark.parametrize("case", ["empty_class", "one_class", "different_classes", "missing", "val_only"])
def test_bad_eval_folders_are_refused_before_anything_is_written(labelled, tmp_path, capsys, case):
    train, val = labelled
    bad = tmp_path / "bad"
    if case == "empty_class":
        (bad / "red").mkdir(parents=True)
        (bad / "green").mkdir()
        Image.new("RGB", (8, 8)).save(bad / "green" / "a.png")
        extra, expected = (
            ["--eval-train", str(bad), "--eval-val", str(val)],
            "class folder 'red' holds no images",
        )
    elif case == "one_class":
        (bad / "red").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(bad / "red" / "a.png")
        extra, expected = ["--eval-train", str(bad), "--eval-val", str(val)], "only one class (red)"
    elif case == "different_classes":
        for name in ("red", "green", "teal"):
            (bad / name).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(bad / name / "a.png")
        extra = ["--eval-train", str(train), "--eval-val", str(bad)]
        expected = "only in train: blue; only in val: teal"
    elif case == "missing":
        extra, expected = ["--eval-train", str(bad), "--eval-val", str(val)], "not found"
    else:
        extra, expected = ["--eval-val", str(val)], "eval_train and eval_val go together"
    out = tmp_path / "run"
    err = cli_error(pretrain_args(out, STEPS) + extra, capsys)
    assert expected in err
    assert not out.exists() or not any(out.iterdir())
