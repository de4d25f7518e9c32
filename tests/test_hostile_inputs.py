"""What a hostile or unlucky user's inputs do: a clean one-line refusal, a recorded failure or the right
result, never a crash, a hang, an unbounded read or a file lost outside our own outputs."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tests.support.hf_mirror import put_in_cache
from vitreg_jax.convert import hub
from vitreg_jax.convert.formats.birder_file import write_pt
from vitreg_jax.convert.formats.pt_reader import MAX_INFLATION, read_pt
from vitreg_jax.errors import UserError

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: object, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``python -m vitreg_jax ARGS`` in a fresh process (a crash or a hang cannot take the test run down)."""
    command = [sys.executable, "-m", "vitreg_jax", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=timeout, check=False)


def assert_one_line_refusal(done: subprocess.CompletedProcess[str], needle: str) -> None:
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr and needle in done.stderr


def tiny_checkpoint_with(tmp_path: Path, model_config: dict[str, object]) -> Path:
    """A tiny vit_reg4_b16 checkpoint whose metadata.json (both configs) claims ``model_config``'s values."""
    import json

    from tests.support.tiny_models import tiny_vit
    from vitreg_jax.data.rgb_stats import named_rgb_stats
    from vitreg_jax.model.birder_json import birder_config
    from vitreg_jax.model.build import save_model

    net = tiny_vit()
    ckpt = tmp_path / "ckpt"
    if not ckpt.exists():
        save_model(ckpt, net, birder_config(net.cfg, named_rgb_stats("birder")))
    meta_path = ckpt / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["birder_config"]["model_config"].update(model_config)
    meta["vit_config"].update(model_config)
    meta_path.write_text(json.dumps(meta))
    return ckpt


# the .pt reader -------------------------------------------------------------------------------------------
def test_a_deeply_nested_dict_key_is_refused_not_a_crash(tmp_path: Path) -> None:
    """A 200,000-deep tuple used as a dict key: hashing it overflowed the C stack (SIGSEGV) in info,
    convert and pretrain --init; the interpreter refuses nesting past MAX_NESTING while it builds it."""
    depth = 200_000
    pickled = (
        b"\x80\x02}(X\x05\x00\x00\x00state}" + b"K\x01" + b"\x85" * depth + b"K\x02su."
    )  # TUPLE1 x depth
    path = tmp_path / "deep.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("deep/data.pkl", pickled)
    assert path.stat().st_size < 300_000
    with pytest.raises(UserError, match="nests tuples or sets deeper than"):
        read_pt(path)
    assert_one_line_refusal(run_cli("info", path), "nests tuples or sets deeper than")


def test_many_deflated_records_are_budgeted_together(tmp_path: Path) -> None:
    """Each record inflates to less than the file's size (the per-record bound), but all of them together
    to far more: refused before the total passes MAX_INFLATION x the file's size."""
    rng = np.random.default_rng(0)
    state = {"noise": rng.standard_normal(25_000).astype(np.float32)}  # 100 kB that deflate does not shrink
    state |= {f"zeros{i}": np.zeros(20_000, np.float32) for i in range(60)}  # 80 kB each, ~100 B deflated
    stored = tmp_path / "stored.pt"
    write_pt(stored, state, {"birder_version": "v0.8.4", "task": "image_classification"})
    deflated = tmp_path / "deflated.pt"
    with zipfile.ZipFile(stored) as src, zipfile.ZipFile(deflated, "w") as dst:
        for info in src.infolist():
            kind = zipfile.ZIP_STORED if info.filename.endswith("/data/0") else zipfile.ZIP_DEFLATED
            dst.writestr(info.filename, src.read(info), compress_type=kind)
    size = deflated.stat().st_size
    total = sum(a.nbytes for a in state.values())
    assert max(a.nbytes for a in state.values()) < size < total / MAX_INFLATION
    with pytest.raises(UserError, match="claims more data than the file holds"):
        read_pt(deflated)
    assert list(read_pt(stored)[0]) == list(state)  # the same state stored reads as ever


# the weights cache ----------------------------------------------------------------------------------------
def test_a_wrong_cache_entry_never_deletes_a_file_outside_the_cache(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The cache is shared with other tools: a snapshot entry linking to the user's own file (with a sha256
    that is not the published one) is removed, and the user's file is left alone, with a warning."""
    pub = hub.PUBLISHED["vit_reg4_b16_mim_200"]
    cache = (tmp_path / "cache").resolve()
    entry = put_in_cache(cache, pub.repo, pub.filename, b"not the published weights")
    mine = tmp_path / "thesis-weights.pt"
    mine.write_bytes(b"the user's own file")
    entry.unlink()
    entry.symlink_to(mine)
    assert hub.cached("vit_reg4_b16_mim_200", cache_dir=cache) is None
    assert mine.read_bytes() == b"the user's own file"
    assert not entry.is_symlink() and not entry.exists()
    assert "pointed outside the cache's blobs" in capsys.readouterr().err
    # a wrong blob inside the cache is still removed with its entry
    entry = put_in_cache(cache, pub.repo, pub.filename, b"tampered")
    blob = Path(os.path.realpath(entry))
    assert hub.cached("vit_reg4_b16_mim_200", cache_dir=cache) is None
    assert not blob.exists() and not entry.exists()


# settings refused up front, by name ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("option", "value", "needle"),
    [
        ("--lr", "nan", "TrainConfig.lr must be a finite number"),
        ("--betas", "0.9 1.0", "TrainConfig.betas must be a finite number in [0, 1)"),
        ("--mask-ratio", "0", "mask_ratio must be in (0, 1)"),
    ],
)
def test_pretrain_settings_that_cannot_train_are_refused_by_name(
    option: str, value: str, needle: str, tmp_path: Path
) -> None:
    images = ROOT / "examples" / "images"
    done = run_cli(
        "pretrain", "--data", images, "--out", tmp_path / "run", "--steps", 2, option, *value.split()
    )
    assert_one_line_refusal(done, needle)
    assert not (tmp_path / "run").exists()


# checkpoints and configs --------------------------------------------------------------------------------
def test_a_config_with_a_negative_or_nan_eps_is_refused(tmp_path: Path) -> None:
    """norm_layer_eps -1 or NaN in a checkpoint's config was accepted, and embed wrote NaN everywhere with
    exit status 0: every numeric config field is checked (finite, in range) when the config is read."""
    for bad in (-1.0, float("nan")):
        ckpt = tiny_checkpoint_with(tmp_path, {"norm_layer_eps": bad})
        done = run_cli("embed", "--checkpoint", ckpt, ROOT / "examples" / "images", "--out", tmp_path / "emb")
        assert_one_line_refusal(done, "norm_layer_eps must be a finite number in (0, 1)")
        assert not (tmp_path / "emb").exists()


# files that are not regular files ---------------------------------------------------------------------------
def test_a_fifo_or_a_device_as_weights_is_refused_at_once(tmp_path: Path) -> None:
    """A FIFO as .pt / .safetensors blocked forever; /dev/zero grew until the OOM killer."""
    fifo = tmp_path / "weights.pt"
    os.mkfifo(fifo)
    for src in (fifo, Path("/dev/zero")):
        done = run_cli("info", src, timeout=60)  # it blocked or grew forever
        assert_one_line_refusal(done, "not a regular file")


def test_a_fifo_among_the_images_is_a_recorded_failure(tmp_path: Path) -> None:
    from vitreg_jax.data.loader import iter_batches
    from vitreg_jax.data.preprocess import classification_transform
    from vitreg_jax.data.rgb_stats import named_rgb_stats

    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "a.png").write_bytes((ROOT / "examples" / "images").glob("*.jpg").__next__().read_bytes())
    os.mkfifo(folder / "b.jpg")
    transform = classification_transform((32, 32), named_rgb_stats("birder"))
    batches = list(iter_batches([str(folder / "a.png"), str(folder / "b.jpg")], transform, 2, 1))
    assert sum(len(b.indices) for b in batches) == 1
    assert [(f.path, f.reason) for b in batches for f in b.failed] == [
        (str(folder / "b.jpg"), "not a regular file (a FIFO, device or socket)")
    ]


def test_export_refuses_a_checkpoint_whose_metadata_claims_another_width(tmp_path: Path) -> None:
    """export wrote a .pt + .json pair that birder refuses when metadata.json claimed another mlp_dim."""
    ckpt = tiny_checkpoint_with(tmp_path, {"mlp_dim": 256})  # the arrays are 128 wide
    done = run_cli("export", ckpt, "--out", tmp_path / "out.pt")
    assert_one_line_refusal(done, "its arrays do not fit the architecture in its metadata")
    assert not (tmp_path / "out.pt").exists() and not (tmp_path / "out.json").exists()


def test_a_second_pretrain_into_a_busy_run_folder_is_refused(tmp_path: Path) -> None:
    """Two pretrain runs into one --out trained side by side and collided on a checkpoint."""
    from tests.support.pretrain_cli import pretrain_args
    from vitreg_jax._locks import FolderLock

    out = tmp_path / "run"
    out.mkdir()
    with FolderLock(out, "pretrain"):  # a run in progress, as another process would hold it
        done = run_cli(*pretrain_args(out, steps=2))
    assert_one_line_refusal(done, "is in use by another pretrain run")
    assert sorted(p.name for p in out.iterdir()) == []  # nothing written; the lock went with its holder


def test_a_non_finite_embedding_is_a_recorded_failure_never_a_row(tmp_path: Path) -> None:
    """A row holding NaN or inf (broken weights, a broken input) is recorded as a failure, not written."""
    import jax.numpy as jnp

    from tests.support.tiny_models import tiny_vit
    from vitreg_jax.data.rgb_stats import named_rgb_stats
    from vitreg_jax.embedding.dataset import embed_dataset
    from vitreg_jax.embedding.outputs import NON_FINITE
    from vitreg_jax.model.birder_json import birder_config

    net = tiny_vit()
    net.norm.scale[...] = jnp.full_like(net.norm.scale[...], jnp.nan)  # every embedding NaN
    cfg = birder_config(net.cfg, named_rgb_stats("birder"))
    images = sorted((ROOT / "examples" / "images").glob("*.jpg"))[:3]
    for fmt in ("npy", "parquet"):
        result = embed_dataset(
            net, [str(p) for p in images], tmp_path / fmt, cfg=cfg, format=fmt, progress=False
        )
        assert (result.embedded, result.failed) == (0, 3)
        reasons = {f["reason"] for f in result.meta["failures"]}
        assert reasons == {NON_FINITE}
