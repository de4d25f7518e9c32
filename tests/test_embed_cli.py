"""`vitreg-jax embed`: output files, failures, resume after Ctrl-C / kill, errors, two processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from tests.support.tiny_models import tiny_vit_config
from tests.support.tolerances import EMBED_BF16_MIN_COSINE, EMBED_FP32_ATOL
from vitreg_jax.cli.main import main
from vitreg_jax.convert.load import load_model_with_cfg
from vitreg_jax.data.preprocess import classification_transform, load_image
from vitreg_jax.embedding._output_folder import STATE_DIR
from vitreg_jax.embedding.outputs import decode_name
from vitreg_jax.model.birder_json import birder_config
from vitreg_jax.model.build import save_model
from vitreg_jax.model.vit import ViT

# the command's embedding of a file vs net.embedding on the same preprocessed pixels

SIZE = (32, 32)
STATS = {"mean": [0.5, 0.45, 0.4], "std": [0.25, 0.24, 0.26]}
ROOT = Path(__file__).resolve().parent.parent
OUTPUTS = {"embeddings.npy", "paths.txt", "failed.txt", "meta.json"}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    cfg = tiny_vit_config()
    net = ViT(cfg, rngs=nnx.Rngs(0))
    return save_model(
        tmp_path_factory.mktemp("ckpt") / "tiny", net, birder_config(cfg, STATS, "vit_reg4_b16")
    )


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """11 readable images in several modes and sizes, in nested folders, plus 2 broken files."""
    root = tmp_path_factory.mktemp("images")
    (root / "a" / "b").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(11):
        h, w = int(rng.integers(20, 90)), int(rng.integers(20, 90))
        rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        img = Image.fromarray(rgb)
        mode, ext = [("RGB", "jpg"), ("L", "png"), ("RGBA", "png"), ("P", "png"), ("I;16", "png")][i % 5]
        if mode == "I;16":
            img = Image.fromarray((rng.integers(0, 65536, (h, w))).astype(np.uint16))
        elif mode != "RGB":
            img = img.convert(mode)
        folder = root if i < 4 else root / "a" if i < 8 else root / "a" / "b"
        img.save(folder / f"img{i:02d}.{ext}")
    (root / "a" / "not_an_image.jpg").write_bytes(b"hello")
    good = (root / "img00.jpg").read_bytes()
    (root / "a" / "b" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    return root


@pytest.fixture(autouse=True)
def _jax_already_started(monkeypatch):
    """In-process runs: this JAX has started, so no flags can apply; say XLA_FLAGS is the user's choice."""
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))


def run_cli(*args: str) -> int:
    """The command in this process; argparse's errors (SystemExit) become their exit status too."""
    try:
        return main(["embed", *map(str, args)])
    except SystemExit as e:
        return int(e.code)


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return {**env, "JAX_PLATFORMS": "cpu", **extra}


def run_sub(*args: str, kill_after_parts: str | None = None, **env: str) -> subprocess.CompletedProcess:
    """``vitreg-jax embed`` in a fresh process; ``kill_after_parts="N"`` SIGKILLs it once N parts are written
    ("N:INT" sends SIGINT, as Ctrl-C does; ``tests/support/kill_run.py``)."""
    runner = (
        ["vitreg_jax"]
        if kill_after_parts is None
        else ["tests.support.kill_run", "embed-parts", kill_after_parts, "--"]
    )
    return subprocess.run(
        [sys.executable, "-m", *runner, "embed", *map(str, args)],
        check=False,
        env=cli_env(**env),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def read_out(out: Path) -> tuple[np.ndarray, list[str], list[str], dict]:
    return (
        np.load(out / "embeddings.npy"),
        (out / "paths.txt").read_text().splitlines(),
        (out / "failed.txt").read_text().splitlines(),
        json.loads((out / "meta.json").read_text()),
    )


# the options of the uninterrupted reference run, which a resumed run must repeat to continue it
REFERENCE_OPTIONS = ("--batch-size", 4, "--workers", 2, "--files-per-part", 4, "--dtype", "float32")


def assert_output_equals_reference(out: Path, reference) -> dict:
    """The paths, failures and embeddings written to ``out`` are the reference run's; returns its meta."""
    emb, paths, failed, meta = read_out(out)
    _, ref_emb, ref_paths, ref_failed, _ = reference
    assert paths == ref_paths and failed == ref_failed
    np.testing.assert_allclose(emb, ref_emb, atol=EMBED_FP32_ATOL, rtol=0)
    return meta


@pytest.fixture(scope="module")
def reference(ckpt, inputs, tmp_path_factory) -> tuple[Path, np.ndarray, list[str], list[str], dict]:
    """One uninterrupted in-process run (batch 4) that the other tests compare against."""
    out = tmp_path_factory.mktemp("ref") / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
        assert run_cli("--checkpoint", ckpt, inputs, "--out", out, *REFERENCE_OPTIONS) == 0
    return (out, *read_out(out))


def test_outputs_match_net_embedding(ckpt, reference):
    out, emb, paths, failed, meta = reference
    assert set(os.listdir(out)) == OUTPUTS  # the parts folder is gone, nothing else is left
    assert emb.shape == (11, 64) and emb.dtype == np.float32 and len(paths) == 11
    reasons = dict(line.split("\t", 1) for line in failed)
    assert sorted(Path(p).name for p in reasons) == ["not_an_image.jpg", "truncated.jpg"]
    assert "not an image" in reasons[next(p for p in reasons if p.endswith("not_an_image.jpg"))]
    assert "truncated" in reasons[next(p for p in reasons if p.endswith("truncated.jpg"))]
    net, cfg = load_model_with_cfg(None, ckpt)
    transform = classification_transform(SIZE, cfg["rgb_stats"])
    x = np.stack([transform(load_image(p)) for p in paths])
    diff = np.abs(emb - np.asarray(net.embedding(x))).max()
    assert diff <= EMBED_FP32_ATOL, f"embed command vs net.embedding: max |diff| {diff:.2e}"
    assert meta["status"] == "complete" and meta["dtype"] == "float32" and meta["size"] == list(SIZE)
    assert (
        meta["counts"]["inputs"] == 13 and meta["counts"]["embedded"] == 11 and meta["counts"]["failed"] == 2
    )
    assert meta["timing"]["images_per_second_this_run"] > 0


def test_rerun_same_args_is_a_no_op_and_other_args_are_refused(ckpt, inputs, reference, capsys):
    out = reference[0]
    before = {f: (out / f).stat().st_mtime_ns for f in OUTPUTS}
    assert (
        run_cli(
            "--checkpoint",
            ckpt,
            inputs,
            "--out",
            out,
            "--batch-size",
            2,
            "--files-per-part",
            4,
            "--dtype",
            "float32",
        )
        == 0
    )
    assert "already complete" in capsys.readouterr().out
    assert (
        run_cli("--checkpoint", ckpt, inputs, "--out", out, "--files-per-part", 4, "--dtype", "bfloat16") == 2
    )
    err = capsys.readouterr().err.strip()
    assert "differs in dtype" in err and len(err.splitlines()) == 1
    assert {f: (out / f).stat().st_mtime_ns for f in OUTPUTS} == before


def test_features_size_dtype_and_list_file(ckpt, inputs, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text(f"# two files\n{inputs / 'img00.jpg'}\n\n{inputs / 'a' / 'img06.png'}\n")
    out = tmp_path / "out"
    assert (
        run_cli(
            "--checkpoint",
            ckpt,
            listing,
            "--out",
            out,
            "--features",
            "patches",
            "--size",
            "48x40",
            "--dtype",
            "bfloat16",
        )
        == 0
    )
    emb, paths, failed, meta = read_out(out)
    assert emb.shape == (2, 30, 64) and len(paths) == 2 and failed == []
    net, cfg = load_model_with_cfg(None, ckpt)
    x = np.stack([classification_transform((48, 40), cfg["rgb_stats"])(load_image(p)) for p in paths])
    ref = np.asarray(net.forward_features(x))[:, net.cfg.num_special_tokens :]
    cos = (emb * ref).sum(-1) / (np.linalg.norm(emb, axis=-1) * np.linalg.norm(ref, axis=-1))
    assert cos.min() >= EMBED_BF16_MIN_COSINE and meta["embedding_shape"] == [30, 64]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--batch-size", "0"], "--batch-size must be a positive integer"),
        (["--dtype", "float16"], "invalid choice: 'float16'"),
        (["--size", "abc"], "expected H, HxW or H,W"),
        (["--size", "36"], "not a multiple of the model's patch size 8"),
        (["--features", "mean"], "invalid choice: 'mean'"),
        (["--workers", "-1"], "--workers must be 0 or more"),
        (["--process-id", "1"], "go together"),
    ],
)
def test_bad_args_one_line_exit_2_nothing_written(ckpt, inputs, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    assert run_cli("--checkpoint", ckpt, inputs, "--out", out, *args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_zero_inputs(ckpt, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    for args, message in (
        ([empty], "no images or .tar shards found"),
        ([], "no inputs given"),
        ([tmp_path / "nope"], "input not found"),
    ):
        assert run_cli("--checkpoint", ckpt, *args, "--out", out) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err


def test_missing_checkpoint(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli("--checkpoint", tmp_path / "missing.pt", inputs, "--out", out) == 2
    err = capsys.readouterr().err.strip()
    assert "missing.pt" in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_resume_after_ctrl_c_and_kill_recomputes_nothing(ckpt, inputs, reference, tmp_path):
    out = tmp_path / "out"
    args = ["--checkpoint", ckpt, inputs, "--out", out, *REFERENCE_OPTIONS]
    # 13 inputs in parts of 4: parts 0..3. Ctrl-C after the first part.
    r = run_sub(*args, kill_after_parts="1:INT")
    assert r.returncode == 130 and "run the same command again to resume" in r.stderr, r.stderr[-2000:]
    parts = sorted(p.name for p in (out / STATE_DIR).glob("part-*"))
    assert parts == ["part-00000.parquet"]
    assert not OUTPUTS & set(os.listdir(out))  # no final file, not even half of one
    first = (out / STATE_DIR / parts[0]).stat()
    # a hard kill after one more part
    r = run_sub(*args, kill_after_parts="1")
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    parts = sorted(p.name for p in (out / STATE_DIR).glob("part-*"))
    assert parts == ["part-00000.parquet", "part-00001.parquet"]
    assert not OUTPUTS & set(os.listdir(out))
    assert (out / STATE_DIR / parts[0]).stat().st_mtime_ns == first.st_mtime_ns  # not rewritten
    # the rerun computes only the two missing parts (5 of 13 inputs) and equals the uninterrupted run
    r = run_sub(*args)
    assert r.returncode == 0, r.stderr[-2000:]
    meta = assert_output_equals_reference(out, reference)
    assert meta["counts"]["parts_written_this_run"] == 2 and meta["counts"]["computed_this_run"] == 5
    assert meta["xla_flags"] == "--xla_cpu_experimental_ynn_fusion_type="  # chosen for float32 on CPU
    assert set(os.listdir(out)) == OUTPUTS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_processes(
    *args: str, n: int = 2, kill_first_after_parts: str | None = None
) -> list[subprocess.Popen]:
    """``n`` processes of one ``vitreg-jax embed`` run on 127.0.0.1; process 0 may kill itself
    (``tests/support/kill_run.py``)."""
    port = free_port()
    procs = []
    for i in range(n):
        hook = i == 0 and kill_first_after_parts is not None
        runner = (
            ["tests.support.kill_run", "embed-parts", kill_first_after_parts, "--"]
            if hook
            else ["vitreg_jax"]
        )
        command = [
            sys.executable,
            "-m",
            *runner,
            "embed",
            *map(str, args),
            "--coordinator",
            f"127.0.0.1:{port}",
            "--num-processes",
            str(n),
            "--process-id",
            str(i),
        ]
        procs.append(
            subprocess.Popen(
                command, env=cli_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    return procs


@pytest.mark.parametrize("weights", ["replicated", "sharded"])
def test_two_processes_equal_one(ckpt, inputs, reference, tmp_path, weights):
    out = tmp_path / "out"
    procs = start_processes(
        "--checkpoint",
        ckpt,
        inputs,
        "--out",
        out,
        "--batch-size",
        4,
        "--files-per-part",
        4,
        "--dtype",
        "float32",
        *(["--shard-weights"] if weights == "sharded" else []),
    )
    results = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]
    meta = assert_output_equals_reference(out, reference)
    assert meta["devices"]["processes"] == 2 and meta["devices"]["count"] == 2
    assert meta["devices"]["weights"] == weights
    assert meta["counts"]["computed_this_run"] == 13  # both shares, summed over the processes
    assert set(os.listdir(out)) == OUTPUTS


def test_a_process_that_cannot_read_its_inputs_stops_every_process(ckpt, inputs, tmp_path):
    out = tmp_path / "out"
    port = free_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "vitreg_jax",
                "embed",
                "--checkpoint",
                str(ckpt),
                str(given),
                "--out",
                str(out),
                "--coordinator",
                f"127.0.0.1:{port}",
                "--num-processes",
                "2",
                "--process-id",
                str(i),
            ],
            env=cli_env(),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i, given in enumerate([inputs, tmp_path / "missing"])
    ]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [2, 2], errors
    assert "process 1 could not read its inputs" in errors[0] and "input not found" in errors[1], errors
    assert not out.exists()


def read_parquet_rows(out: Path) -> dict[str, np.ndarray]:
    import pyarrow.parquet as pq

    table = pq.read_table(sorted(out.glob("part-*.parquet")))
    keys = table.column("key").to_pylist()
    assert len(set(keys)) == len(keys), "a row was written twice"
    return dict(zip(keys, np.stack(table.column("embedding").to_numpy(zero_copy_only=False))))


def assert_rows_equal_reference(rows: dict[str, np.ndarray], reference) -> None:
    _, ref_emb, ref_paths, _, _ = reference
    assert sorted(rows) == sorted(ref_paths)  # every image exactly once
    np.testing.assert_allclose(np.stack([rows[p] for p in ref_paths]), ref_emb, atol=EMBED_FP32_ATOL, rtol=0)


def test_resume_with_other_process_counts(ckpt, inputs, reference, tmp_path):
    """13 inputs in 5 parts of 3: one process on 4 host devices is killed after 2 parts, two processes
    finish the run; then two processes are killed after process 0's first part and one process finishes."""
    out = tmp_path / "out"
    args = [
        "--checkpoint",
        ckpt,
        inputs,
        "--out",
        out,
        "--format",
        "parquet",
        "--files-per-part",
        3,
        "--batch-size",
        4,
        "--dtype",
        "float32",
    ]
    r = run_sub(*args, kill_after_parts="2", XLA_FLAGS="--xla_force_host_platform_device_count=4")
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert sorted(p.name for p in out.glob("part-*")) == ["part-00000.parquet", "part-00001.parquet"]
    procs = start_processes(*args)
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["computed_this_run"] == 7  # parts 2, 3, 4: 3 + 3 + 1 inputs
    assert manifest["devices"]["processes"] == 2 and manifest["counts"]["failed"] == 2
    assert manifest["checkpoint"]["argument"] == str(ckpt)
    assert manifest["checkpoint"]["provenance"]["converter"] == "vitreg-jax"  # the checkpoint's own record
    assert_rows_equal_reference(read_parquet_rows(out), reference)

    out2 = tmp_path / "out2"
    args[4] = out2
    procs = start_processes(*args, kill_first_after_parts="1")
    assert procs[0].wait(timeout=300) == -signal.SIGKILL, procs[0].communicate()[1][-3000:]
    procs[1].kill()  # it would wait for process 0 at the next step
    procs[1].wait(timeout=60)
    for p in procs:
        p.communicate()
    assert (out2 / "part-00000.parquet").exists() and not (out2 / "manifest.json").exists()
    r = run_sub(*args)
    assert r.returncode == 0, r.stderr[-2000:]
    assert_rows_equal_reference(read_parquet_rows(out2), reference)


def test_names_with_newlines_and_tabs_keep_rows_aligned(ckpt, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(1)
    names = ["a\nb.png", "c\td.png", "e.png"]
    for name in names:
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(folder / name, format="PNG")
    (folder / "f\tg\nh.png").write_bytes(b"broken")
    out = tmp_path / "out"
    assert run_cli("--checkpoint", ckpt, folder, "--out", out, "--dtype", "float32") == 0
    emb = np.load(out / "embeddings.npy")
    lines = (out / "paths.txt").read_text("utf-8").split("\n")[:-1]
    assert len(lines) == len(emb) == 3  # one line per row
    net, cfg = load_model_with_cfg(None, ckpt)
    transform = classification_transform(SIZE, cfg["rgb_stats"])
    for line, row in zip(lines, emb):
        path = decode_name(line)
        assert Path(path).name in names
        np.testing.assert_allclose(
            row, np.asarray(net.embedding(transform(load_image(path))[None]))[0], atol=EMBED_FP32_ATOL, rtol=0
        )
    failed = (out / "failed.txt").read_text("utf-8").split("\n")[:-1]
    assert len(failed) == 1 and failed[0].count("\t") == 1
    assert Path(decode_name(failed[0].split("\t")[0])).name == "f\tg\nh.png"


@pytest.mark.parametrize("name", ["meta.json", "paths.txt", "failed.txt"])
def test_users_files_in_out_are_never_overwritten(ckpt, inputs, tmp_path, capsys, name):
    out = tmp_path / "out"
    out.mkdir()
    (out / name).write_text("mine\n")
    assert run_cli("--checkpoint", ckpt, inputs, "--out", out) == 2
    err = capsys.readouterr().err.strip()
    assert "did not write" in err and len(err.splitlines()) == 1, err
    assert (out / name).read_text() == "mine\n" and os.listdir(out) == [name]


def test_a_second_run_into_a_folder_in_use_exits_2(ckpt, inputs, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    code = (
        "import sys, time; from vitreg_jax._locks import FolderLock; "
        "FolderLock(sys.argv[1], 'embed').acquire(); print('locked', flush=True); time.sleep(600)"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert run_cli("--checkpoint", ckpt, inputs, "--out", out, "--batch-size", 4) == 2
        err = capsys.readouterr().err.strip()
        assert "in use by another embed run" in err and len(err.splitlines()) == 1, err
    finally:
        holder.kill()  # a killed run: its lock file stays, and must not block the next run
        holder.wait()
        holder.stdout.close()
    assert run_cli("--checkpoint", ckpt, inputs, "--out", out, "--batch-size", 4) == 0


def test_huge_images_fail_quietly(ckpt, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (24, 24), "red").save(folder / "small.png")

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0))  # 400 megapixels
    (folder / "huge.png").write_bytes(
        b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"\0" * 8)) + chunk(b"IEND", b"")
    )
    out = tmp_path / "out"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert run_cli("--checkpoint", ckpt, folder, "--out", out, "--workers", 2) == 0
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    failed = (out / "failed.txt").read_text().splitlines()
    assert len(failed) == 1 and "huge.png\timage too large" in failed[0]


def test_help_default_is_the_librarys():
    from vitreg_jax.cli import embed as embed_command
    from vitreg_jax.data.shards import FILES_PER_SHARD

    assert embed_command.FILES_PER_PART == FILES_PER_SHARD


@pytest.mark.parametrize("fmt", ["npy", "parquet"])
def test_every_input_failing_is_exit_2_with_the_failures_recorded(ckpt, tmp_path, capsys, fmt):
    """A run where no input could be read said "embedded 0 images" with exit status 0."""
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("a.jpg", "b.png"):
        (broken / name).write_bytes(b"not an image")
    out = tmp_path / f"emb-{fmt}"
    assert run_cli("--checkpoint", ckpt, broken, "--out", out, "--format", fmt) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("vitreg-jax embed: error: ")]
    assert len(errors) == 1 and "none of the 2 inputs could be read" in errors[0] and "Traceback" not in err
    listed = out / ("failed.txt" if fmt == "npy" else "manifest.json")
    assert "a.jpg" in listed.read_text() and "b.png" in listed.read_text()
