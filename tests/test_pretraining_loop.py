"""The training loop and the ``pretrain`` command: loss falls on real images, kill-and-resume gives the same
run, a non-finite loss stops the run with the last good checkpoint intact, and user mistakes are one line +
exit 2."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from tests.support.pretrain_cli import (
    CLI_TIMEOUT_S,
    IMAGES,
    ROOT,
    STATS,
    cli_env,
    cli_error,
    pretrain_args,
    run_cli,
)
from tests.support.report import record
from tests.support.tiny_models import SIZE, TINY_MAE_DECODER, TINY_MAE_ENCODER, tiny_mae, tiny_vit
from tests.support.tolerances import DP_RUN_LOSS_RTOL, DP_RUN_PARAM_ATOL_OF_LR
from vitreg_jax.cli import main as cli
from vitreg_jax.data.augment import TrainTransform
from vitreg_jax.data.inputs import list_inputs
from vitreg_jax.data.preprocess import load_image
from vitreg_jax.pretraining.config import TrainConfig
from vitreg_jax.pretraining.data_stream import TrainData
from vitreg_jax.pretraining.loop import CHECKPOINT_DIR, Checkpoints, NonFiniteLoss, Periodic, fit
from vitreg_jax.pretraining.optimizer import lr_schedule
from vitreg_jax.pretraining.step import MAETrainer

BATCH = 8
LOSS_STEPS = 240
LOSS_WINDOW = 30
LOSS_DROP = 0.75  # the mean loss of the last LOSS_WINDOW steps must fall below this fraction of the first's


@pytest.fixture(scope="module")
def trainer() -> MAETrainer:
    """One compiled step for the in-process loop tests (masks drawn inside from the key)."""
    return MAETrainer(tiny_mae(), TrainConfig(batch_size=BATCH, steps=LOSS_STEPS, warmup_steps=10, lr=1e-3))


@pytest.fixture(scope="module")
def images() -> TrainData:
    paths = list_inputs([IMAGES])
    cached = functools.lru_cache(maxsize=None)(load_image)  # decode each sample once
    return TrainData(paths, TrainTransform(SIZE, STATS), batch_size=BATCH, seed=0, loader=cached)


def test_loss_falls_on_the_sample_images(trainer, images, tmp_path):
    if len(images) < BATCH:
        pytest.skip("examples/images has too few images")
    result = fit(
        trainer,
        images,
        tmp_path,
        total=LOSS_STEPS,
        schedule=lr_schedule(trainer.cfg, images.steps_per_epoch),
        progress=False,
        checkpoint_every=LOSS_STEPS,
    )
    first, last = np.mean(result.losses[:LOSS_WINDOW]), np.mean(result.losses[-LOSS_WINDOW:])
    assert len(result.losses) == LOSS_STEPS
    assert last < LOSS_DROP * first, f"loss {first:.3f} -> {last:.3f} over {LOSS_STEPS} steps"
    lines = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(10, LOSS_STEPS + 1, 10))
    assert {"loss", "lr", "grad_norm", "images_per_s", "epoch"} <= set(lines[0])
    assert lines[-1]["images_per_s"] > 0
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [r["step"] for r in lines]


class _SignalAt:
    """Wraps a data stream: sends this process SIGUSR1 when step ``at``'s batch is taken."""

    def __init__(self, data, at: int):
        self.data, self.at, self.steps_per_epoch = data, at, data.steps_per_epoch

    def iterate(self, start: int, stop: int):
        import signal

        for step, batch in self.data.iterate(start, stop):
            if step == self.at:
                os.kill(os.getpid(), signal.SIGUSR1)
            yield step, batch


@pytest.mark.skipif(not hasattr(__import__("signal"), "SIGUSR1"), reason="no SIGUSR1 on this platform")
def test_sigusr1_exports_on_demand(trainer, tmp_path):
    exported = []
    total = 5
    fit(
        trainer,
        _SignalAt(_Batches(total), at=1),
        tmp_path,
        total=total,
        schedule=lr_schedule(trainer.cfg, total),
        progress=False,
        checkpoint_every=total,
        export=lambda state, step: exported.append(step),
    )
    assert exported == [2, total]  # after the step during which the signal came, and at the end


class _Batches:
    """A stream of fixed random batches whose step ``nan_at`` is all NaN."""

    def __init__(self, steps: int, nan_at: int | None = None):
        self.batches = (
            np.random.default_rng(7).standard_normal((steps, 1, BATCH, *SIZE, 3)).astype(np.float32)
        )
        if nan_at is not None:
            self.batches[nan_at] = np.nan
        self.steps_per_epoch = steps

    def iterate(self, start: int, stop: int):
        for step in range(start, stop):
            yield step, self.batches[step]


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(trainer, tmp_path):
    total = 6
    schedule = lr_schedule(trainer.cfg, total)
    with pytest.raises(NonFiniteLoss, match=r"non-finite at step 4 .*last good checkpoint is step 2"):
        fit(
            trainer,
            _Batches(total, nan_at=3),
            tmp_path / "bad",
            total=total,
            schedule=schedule,
            progress=False,
            checkpoint_every=2,
        )
    clean = fit(
        trainer,
        _Batches(total),
        tmp_path / "clean",
        total=2,
        schedule=schedule,
        progress=False,
        checkpoint_every=2,
    )
    assert clean.step == 2
    states = []
    for run in ("bad", "clean"):
        ckpt = Checkpoints(tmp_path / run / CHECKPOINT_DIR, keep=3)
        try:
            assert ckpt.manager.all_steps() == [2], run
            state, meta = ckpt.restore(2, trainer.abstract_state())
        finally:
            ckpt.close()
        assert meta["step"] == 2 and int(state["step"]) == 2
        states.append(jax.tree_util.tree_map(np.asarray, state))
    jax.tree_util.tree_map(np.testing.assert_array_equal, *states)  # the good checkpoint is the clean run's
    lines = [json.loads(ln) for ln in (tmp_path / "bad" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in lines)


class _CrashAt(_Batches):
    """Fixed batches; the stream fails when step ``at``'s batch is asked for (a crash between checkpoints)."""

    def __init__(self, steps: int, at: int):
        super().__init__(steps)
        self.at = at

    def iterate(self, start: int, stop: int):
        for step, batch in super().iterate(start, stop):
            if step == self.at:
                raise RuntimeError("crash")
            yield step, batch


def _param_sum(state, step: int) -> dict[str, float]:
    """A measurement that depends on the whole state (any difference in a resumed run would show)."""
    leaves = jax.tree_util.tree_leaves(state["params"])
    return {"param_sum": float(sum(np.sum(np.asarray(x, np.float64)) for x in leaves)), "step_seen": step}


def test_periodic_measurements_are_logged_beside_the_loss_and_survive_a_resume(trainer, tmp_path):
    total, every = 7, 3
    schedule = lr_schedule(trainer.cfg, total)
    probe = [Periodic("probe", every, _param_sum)]
    fit(
        trainer,
        _Batches(total),
        tmp_path / "whole",
        total=total,
        schedule=schedule,
        progress=False,
        checkpoint_every=2,
        log_every=2,
        periodic=probe,
        asynchronous=False,
    )
    with pytest.raises(RuntimeError, match="crash"):  # dies at step 5, after the checkpoint of step 4
        fit(
            trainer,
            _CrashAt(total, at=5),
            tmp_path / "resumed",
            total=total,
            schedule=schedule,
            progress=False,
            checkpoint_every=2,
            log_every=2,
            periodic=probe,
            asynchronous=False,
        )
    again = fit(
        trainer,
        _Batches(total),
        tmp_path / "resumed",
        total=total,
        schedule=schedule,
        progress=False,
        checkpoint_every=2,
        log_every=2,
        periodic=probe,
        asynchronous=False,
    )
    assert again.resumed_from == 4
    runs = [
        [json.loads(ln) for ln in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        for run in ("whole", "resumed")
    ]
    # lines every 2 steps (log_every), at every 3rd (the measurement) and at the end
    assert [r["step"] for r in runs[0]] == [2, 3, 4, 6, 7]
    measured = [
        [(r["step"], r["probe/param_sum"], r["probe/step_seen"]) for r in lines if "probe/param_sum" in r]
        for lines in runs
    ]
    assert [m[0] for m in measured[0]] == [3, 6, 7] and [m[2] for m in measured[0]] == [3, 6, 7]
    assert measured[0] == measured[1]  # the same values at the same steps after the resume
    assert all("loss" in r for r in runs[0])
    assert [r["loss"] for r in runs[0]] == [r["loss"] for r in runs[1]]
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return
    events = EventAccumulator(str(tmp_path / "whole" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("probe/param_sum")] == [3, 6, 7]


def test_a_torn_metrics_line_is_dropped_on_resume(tmp_path):
    from vitreg_jax.pretraining.loop import MetricsLog

    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo'
    )
    MetricsLog(tmp_path, resume_step=2, tensorboard=False).close()
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'


def final_state(run: Path) -> tuple[int, dict]:
    from vitreg_jax.model.checkpoint import restore_params

    ckpt_dir = run / CHECKPOINT_DIR
    step = max(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())
    import orbax.checkpoint as ocp

    path = (ckpt_dir / str(step) / "state").absolute()
    with ocp.PyTreeCheckpointer() as ckptr:  # as host arrays, whatever devices saved it
        tree = ckptr.metadata(path).item_metadata.tree
        state = ckptr.restore(
            path,
            restore_args=jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree),
        )
    return step, {"state": state, "encoder": restore_params(run / "encoder")}


def test_pretrain_killed_and_resumed_equals_uninterrupted(tmp_path):
    cache = tmp_path / "jax-cache"
    whole = run_cli(pretrain_args(tmp_path / "whole"), cache)
    assert whole.returncode == 0, whole.stderr[-3000:]
    # SIGKILL when the loop asks for step 7's batch: between the checkpoints of steps 6 and 8 (checkpoint 6
    # may still be in flight, asynchronously: then the run resumes from 3)
    killed = run_cli(pretrain_args(tmp_path / "resumed"), cache, kill_at_step=7)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert not (tmp_path / "resumed" / "encoder").exists()
    # nothing but --resume: --log-every 1 and every other setting come from the saved run
    resumed = run_cli(["pretrain", "--out", str(tmp_path / "resumed"), "--resume", "--no-progress"], cache)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step 6" in resumed.stderr or "resumed from step 3" in resumed.stderr, resumed.stderr
    step_a, a = final_state(tmp_path / "whole")
    step_b, b = final_state(tmp_path / "resumed")
    assert step_a == step_b == 8
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)
    lines = [
        [json.loads(ln) for ln in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        for run in ("whole", "resumed")
    ]
    assert [r["step"] for r in lines[1]] == list(range(1, 9))
    assert [r["loss"] for r in lines[0]] == [r["loss"] for r in lines[1]]
    # the exported encoder is a vitreg-jax checkpoint that the loader (embed, export, info) accepts
    from vitreg_jax import load_model_with_cfg

    net, cfg = load_model_with_cfg(None, tmp_path / "whole" / "encoder")
    assert cfg["model_config"]["num_layers"] == 1 and tuple(net.cfg.image_size) == SIZE
    assert cfg["rgb_stats"]["mean"] == STATS["mean"]
    assert net.embedding(np.zeros((1, *SIZE, 3), np.float32)).shape == (1, 64)
    # a fine-tune start from those weights
    init = run_cli(
        [
            "pretrain",
            "--data",
            str(IMAGES),
            "--out",
            str(tmp_path / "ft"),
            "--init",
            str(tmp_path / "whole" / "encoder"),
            "--mae-config",
            *[f"{k}={v}" for k, v in TINY_MAE_DECODER.items()],
            "--steps",
            "1",
            "--batch-size",
            "4",
            "--no-progress",
        ],
        cache,
    )
    assert init.returncode == 0, init.stderr[-3000:]
    run = json.loads((tmp_path / "ft" / "run.json").read_text())
    assert run["rgb_stats"]["mean"] == STATS["mean"] and run["vit_config"]["num_layers"] == 1


def test_pretrain_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["pretrain", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in (
        "--data",
        "--out",
        "--steps",
        "--epochs",
        "--batch-size",
        "--lr",
        "--resume",
        "--init",
        "--network",
        "--bf16",
        "--coordinator",
        "--num-processes",
        "--process-id",
        "examples:",
    ):
        assert option in text


def test_pretrain_user_errors(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert "--data is required" in cli_error(["pretrain", "--out", out, "--steps", "5"], capsys)
    assert "run length" in cli_error(["pretrain", "--data", str(IMAGES), "--out", out], capsys)
    assert "input not found" in cli_error(
        ["pretrain", "--data", str(tmp_path / "nope"), "--out", out, "--steps", "5"], capsys
    )
    assert "unknown network" in cli_error(
        ["pretrain", "--data", str(IMAGES), "--out", out, "--steps", "5", "--network", "vit_nope"], capsys
    )
    assert "KEY=VALUE" in cli_error(
        ["pretrain", "--data", str(IMAGES), "--out", out, "--steps", "5", "--model-config", "num_layers"],
        capsys,
    )
    assert "positive integer" in cli_error(
        ["pretrain", "--data", str(IMAGES), "--out", out, "--steps", "0"], capsys
    )
    assert "go together" in cli_error(
        ["pretrain", "--data", str(IMAGES), "--out", out, "--steps", "5", "--coordinator", "127.0.0.1:1"],
        capsys,
    )
    assert "--process-id must be in 0..1" in cli_error(
        [
            "pretrain",
            "--data",
            str(IMAGES),
            "--out",
            out,
            "--steps",
            "5",
            "--coordinator",
            "127.0.0.1:1",
            "--num-processes",
            "2",
            "--process-id",
            "2",
        ],
        capsys,
    )
    assert not (tmp_path / "run").exists(), "a failed start left files behind"
    # an existing run: continue only with --resume, and only with its own settings
    saved_run(tmp_path / "run", {"data": [str(IMAGES)], "train.steps": 5})
    assert "--resume" in cli_error(["pretrain", "--data", str(IMAGES), "--out", out, "--steps", "5"], capsys)
    assert "--steps 7 (run has 5)" in cli_error(
        ["pretrain", "--out", out, "--resume", "--steps", "7"], capsys
    )
    cli_error(["pretrain", "--out", out, "--export-only"], capsys)  # no file list / checkpoint yet: one line


def saved_run(out: Path, options: dict) -> None:
    """A run folder as a run's start leaves it (run.json, files.txt), without training."""
    from vitreg_jax.pretraining.run import FILES_FILE, FORMAT, RUN_FILE, PretrainSettings

    out.mkdir(parents=True)
    settings = PretrainSettings.from_options(options)
    record = {"format": FORMAT, "settings": settings.to_dict(), "rgb_stats": STATS}
    if settings.init is None:
        record["vit_config"] = settings.preset_config().to_dict()
    (out / RUN_FILE).write_text(json.dumps(record))
    (out / FILES_FILE).write_text("".join(f"{p}\n" for p in list_inputs(list(settings.data))))


def test_pretrain_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    """A non-empty --out without run.json is the user's: nothing in it is overwritten or appended to."""
    user = tmp_path / "mine"
    user.mkdir()
    (user / "files.txt").write_text("my list\n")
    (user / "metrics.jsonl").write_text('{"mine": 1}\n')
    for extra in ([], ["--resume"]):
        err = cli_error(
            ["pretrain", "--data", str(IMAGES), "--out", str(user), "--steps", "2", *extra], capsys
        )
        assert "not empty and holds no pretrain run" in err
    assert sorted(p.name for p in user.iterdir()) == ["files.txt", "metrics.jsonl"]
    assert (user / "files.txt").read_text() == "my list\n"
    assert (user / "metrics.jsonl").read_text() == '{"mine": 1}\n'


def test_pretrain_resume_names_every_setting_that_differs(tmp_path, capsys):
    """--data is a setting like --lr: a different one is refused, and every difference is named at once."""
    out = tmp_path / "run"
    saved_run(out, {"data": [str(IMAGES)], "train.steps": 5, "train.lr": 1e-3, "train.log_every": 1})
    other = tmp_path / "other"
    other.mkdir()
    err = cli_error(
        [
            "pretrain",
            "--out",
            str(out),
            "--resume",
            "--data",
            str(other),
            "--lr",
            "0.01",
            "--wd",
            "0.1",
            "--log-every",
            "3",
            "--bf16",
        ],
        capsys,
    )
    for shown in (
        f"--data {other} (run has {IMAGES})",
        "--lr 0.01 (run has 0.001)",
        "--wd 0.1 (run has 0.05)",
        "--log-every 3 (run has 1)",
        "--bf16 bfloat16 (run has float32)",
    ):
        assert shown in err, err
    # the same values as saved (a relative --data naming the same folder included) are accepted
    from vitreg_jax.pretraining.run import open_run

    rel = os.path.relpath(IMAGES)
    run = open_run(out, {"data": [rel], "train.lr": 1e-3, "train.steps": 5}, resume=True)
    assert (
        run.settings.train.log_every == 1 and not run.is_new and len(run.paths) == len(list_inputs([IMAGES]))
    )


def test_pretrain_two_processes_equal_one(tmp_path):
    """Two processes (one CPU device each, jax.distributed on 127.0.0.1) train the run that one process does:
    each reads its half of every global batch and the gradients are averaged across the processes."""
    import socket

    cache = tmp_path / "jax-cache"
    steps = 4
    one = run_cli(pretrain_args(tmp_path / "one", steps=steps), cache)
    assert one.returncode == 0, one.stderr[-3000:]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "vitreg_jax",
                *pretrain_args(tmp_path / "two", steps=steps),
                "--coordinator",
                f"127.0.0.1:{port}",
                "--num-processes",
                "2",
                "--process-id",
                str(i),
            ],
            env=cli_env(cache),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    results = [p.communicate(timeout=CLI_TIMEOUT_S) for p in procs]
    for p, (_, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err[-3000:]
    assert json.loads((tmp_path / "two" / "run.json").read_text())["devices"] == 2
    losses = [
        [json.loads(ln)["loss"] for ln in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        for run in ("one", "two")
    ]
    assert len(losses[0]) == len(losses[1]) == steps
    np.testing.assert_allclose(losses[1], losses[0], rtol=DP_RUN_LOSS_RTOL)
    step_a, a = final_state(tmp_path / "one")
    step_b, b = final_state(tmp_path / "two")
    assert step_a == step_b == steps
    lr = 1e-3  # pretrain_args
    worst = max(
        float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
        for x, y in zip(
            jax.tree_util.tree_leaves(a["encoder"]), jax.tree_util.tree_leaves(b["encoder"]), strict=True
        )
    )
    record("pretrain, 2 processes vs 1", "encoder |diff| / lr", worst / lr)
    assert worst <= DP_RUN_PARAM_ATOL_OF_LR * lr


def test_pretrain_run_checks_a_given_encoder_against_the_run(tmp_path):
    """Python callers hand over encoders: one that is not the saved run's is refused by name, and a run that
    starts from weights (settings.init) asks for them until it has a checkpoint."""
    from vitreg_jax.errors import UserError
    from vitreg_jax.pretraining.run import open_run, train

    saved_run(tmp_path / "run", {"data": [str(IMAGES)], "train.steps": 5})
    other = tiny_vit(TINY_MAE_ENCODER)
    with pytest.raises(UserError, match=r"the given encoder is not the run's \(.*hidden_dim.*num_layers"):
        train(open_run(tmp_path / "run", resume=True), encoder=other)
    saved_run(tmp_path / "ft", {"data": [str(IMAGES)], "train.steps": 5, "init": "vit_reg4_b16_mim_200"})
    run = open_run(tmp_path / "ft", resume=True)
    assert run.needs_init_weights
    with pytest.raises(UserError, match="starts from the weights of vit_reg4_b16_mim_200"):
        train(run)
