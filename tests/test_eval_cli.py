"""`vitreg-jax eval` on labelled folders and on `embed` outputs of them; bad input."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from flax import nnx

from tests.support.labelled_images import write_split
from tests.support.tiny_models import tiny_vit_config
from vitreg_jax.cli.main import main
from vitreg_jax.model.birder_json import birder_config
from vitreg_jax.model.build import save_model
from vitreg_jax.model.precision import resolve_dtype
from vitreg_jax.model.vit import ViT

SIZE = (32, 32)
STATS = {"mean": [0.5, 0.45, 0.4], "std": [0.25, 0.24, 0.26]}
CLASSES = {"cat": (200, 60, 60), "dog": (60, 200, 60), "eel": (60, 60, 200)}
KEYS = ("knn_top1", "knn_top5", "knn1_top1", "linear_top1", "linear_top5")
FAST = ["-k", "3", "--batch-size", "8", "--workers", "0"]


@pytest.fixture(autouse=True)
def _jax_already_started(monkeypatch):
    """In-process runs: JAX has started, so no XLA flags can apply; say XLA_FLAGS is the user's choice."""
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    cfg = tiny_vit_config()
    net = ViT(cfg, rngs=nnx.Rngs(0))
    return save_model(
        tmp_path_factory.mktemp("ckpt") / "tiny", net, birder_config(cfg, STATS, "vit_reg4_b16")
    )


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("data")
    return (
        write_split(base / "train", CLASSES, 8, 0, noise=70, side=40),
        write_split(base / "val", CLASSES, 4, 1, noise=70, side=40),
    )


def run_cli(*args) -> int:
    try:
        return main(["eval", *map(str, args)])
    except SystemExit as e:
        return int(e.code)


def numbers(report: dict) -> dict:
    return {k: report[k] for k in (*KEYS, "linear_l2", "classes", "counts")}


@pytest.fixture(scope="module")
def folder_report(ckpt, dataset, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("out") / "eval.json"
    train, val = dataset
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
        assert run_cli("--checkpoint", ckpt, "--train", train, "--val", val, "--out", out, *FAST) == 0
    return json.loads(out.read_text())


def test_folders(folder_report, ckpt, capsys):
    report = folder_report
    for key in ("knn_top1", "knn1_top1", "linear_top1"):
        assert 0.0 <= report[key] <= 1.0
    assert report["knn_top5"] is None and report["linear_top5"] is None  # three classes: top-5 means nothing
    from vitreg_jax.evaluation.report import format_report

    assert format_report(report).count("n/a") == 2
    assert report["counts"] == {"classes": 3, "train": 24, "val": 12, "failed": 0}
    assert report["classes"] == sorted(CLASSES) and report["failures"] == []
    settings = report["settings"]
    assert (settings["k"], settings["temperature"], settings["seed"]) == (3, 0.07, 0)
    assert settings["dtype"] == resolve_dtype("auto")
    assert settings["checkpoint"] == str(ckpt)


def test_embed_outputs_give_the_same_numbers(folder_report, ckpt, dataset, tmp_path, capsys):
    train, val = dataset
    for name, folder, fmt in (("train", train, "npy"), ("val", val, "parquet")):
        assert (
            main(
                [
                    "embed",
                    "--checkpoint",
                    str(ckpt),
                    str(folder),
                    "--out",
                    str(tmp_path / name),
                    "--format",
                    fmt,
                    "--batch-size",
                    "5",
                    "--workers",
                    "0",
                ]
            )
            == 0
        )
    out = tmp_path / "eval.json"
    assert (
        run_cli(
            "--train-embeddings",
            tmp_path / "train",
            "--val-embeddings",
            tmp_path / "val",
            "--out",
            out,
            "-k",
            "3",
        )
        == 0
    )
    report = json.loads(out.read_text())
    assert numbers(report) == numbers(folder_report)
    assert "k-NN (k=3, weighted)" in capsys.readouterr().out


def test_unreadable_images_are_failure_records(ckpt, dataset, tmp_path, capsys):
    train = tmp_path / "train"
    shutil.copytree(dataset[0], train)
    (train / "dog" / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "eval.json"
    assert (
        run_cli(
            "--checkpoint", ckpt, "--train", train, "--val", dataset[1], "--out", out, "--no-linear", *FAST
        )
        == 0
    )
    report = json.loads(out.read_text())
    assert report["counts"]["failed"] == 1 and report["counts"]["train"] == 24
    assert report["failures"][0]["path"].endswith("broken.png") and report["failures"][0]["reason"]
    assert report["linear_top1"] is None
    assert "broken.png" in capsys.readouterr().err


def one_line_error(capsys, code: int) -> str:
    err = capsys.readouterr().err.strip()
    assert code == 2 and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("vitreg-jax eval: error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_bad_folders(ckpt, dataset, tmp_path, capsys):
    train, val = dataset
    out = tmp_path / "eval.json"
    empty = tmp_path / "empty_class"
    shutil.copytree(train, empty)
    (empty / "fox").mkdir()
    line = one_line_error(capsys, run_cli("--checkpoint", ckpt, "--train", empty, "--val", val, "--out", out))
    assert "class folder 'fox' holds no images" in line

    single = tmp_path / "single"
    shutil.copytree(train / "cat", single / "cat")
    line = one_line_error(
        capsys, run_cli("--checkpoint", ckpt, "--train", single, "--val", val, "--out", out)
    )
    assert "only one class (cat)" in line

    other = tmp_path / "other"
    shutil.copytree(val, other)
    (other / "eel").rename(other / "emu")
    line = one_line_error(
        capsys, run_cli("--checkpoint", ckpt, "--train", train, "--val", other, "--out", out, *FAST)
    )
    assert "only in train: eel; only in val: emu" in line

    loose = tmp_path / "loose"
    shutil.copytree(train, loose)
    shutil.copy(train / "cat" / "00.png", loose / "stray.png")
    line = one_line_error(capsys, run_cli("--checkpoint", ckpt, "--train", loose, "--val", val, "--out", out))
    assert "images directly in it (e.g. stray.png)" in line

    line = one_line_error(capsys, run_cli("--checkpoint", ckpt, "--train", tmp_path / "nope", "--val", val))
    assert "train folder" in line and "not found" in line
    assert not out.exists()


def test_bad_arguments(ckpt, dataset, tmp_path, capsys):
    train, val = dataset
    cases = [
        (["--checkpoint", ckpt, "--train", train], "--train, --val and --checkpoint go together"),
        (["--train-embeddings", train], "--train-embeddings and --val-embeddings go together"),
        (
            [
                "--checkpoint",
                ckpt,
                "--train",
                train,
                "--val",
                val,
                "--train-embeddings",
                train,
                "--val-embeddings",
                val,
            ],
            "give either",
        ),
        (["--checkpoint", ckpt, "--train", train, "--val", val, "-k", "0"], "-k must be a positive integer"),
        (
            ["--checkpoint", ckpt, "--train", train, "--val", val, "--out", tmp_path / "no" / "x.json"],
            "no such folder",
        ),
        (
            ["--train-embeddings", train, "--val-embeddings", val],
            str(train),
        ),  # a folder of images, not embed's
    ]
    for args, expected in cases:
        assert expected in one_line_error(capsys, run_cli(*args))
    assert list(tmp_path.iterdir()) == []


def test_an_existing_out_file_is_replaced_only_with_force(ckpt, dataset, tmp_path, capsys):
    """One rule for every command that writes one named file: `eval --out` replaced a user's file."""
    train, val = dataset
    out = tmp_path / "thesis.txt"
    out.write_text("the user's own file")
    args = ["--checkpoint", ckpt, "--train", train, "--val", val, "--out", out, *FAST]
    assert "already exists (pass --force to replace it)" in one_line_error(capsys, run_cli(*args))
    assert out.read_text() == "the user's own file"
    assert run_cli(*args, "--force") == 0
    assert json.loads(out.read_text())["counts"]["classes"] == 3
