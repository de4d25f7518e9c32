"""Checkpoints and the loop of MAE pre-training: :func:`fit` around
:class:`~vitreg_jax.pretraining.step.MAETrainer`'s step.

* checkpoints: Orbax ``CheckpointManager`` (asynchronous, keeping the last K) of the whole train state plus
  a JSON record of the data position; resuming continues the same run bit for bit.
* a step whose loss or gradient is not finite stops the loop (:class:`NonFiniteLoss`); the step itself left
  the parameters and optimizer state unchanged.
* :class:`Periodic` measurements (e.g. a k-NN evaluation of the encoder) run every N steps and after the last
  one; their values are logged beside the loss, in the same ``metrics.jsonl`` line and in TensorBoard.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax

from vitreg_jax.errors import UserError
from vitreg_jax.fileio import atomic_write_text, first_line
from vitreg_jax.pretraining.optimizer import LRSchedule
from vitreg_jax.pretraining.step import MAETrainer, TrainState

METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"


class NonFiniteLoss(UserError):
    """The loss (or the gradient) became NaN or infinite; the run stopped without saving anything after it."""


# checkpoints
# -------------------------------------------------------------------------------------------------
class Checkpoints:
    """Orbax ``CheckpointManager`` for train states: ``RUN/checkpoints/<step>/{state, meta}``."""

    def __init__(self, directory: str | os.PathLike[str], *, keep: int, asynchronous: bool = True):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=asynchronous, create=True
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: TrainState, meta: Mapping[str, Any]) -> None:
        ocp = self._ocp
        self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta))),
            force=True,
        )

    def restore(self, step: int, abstract_state: TrainState) -> tuple[TrainState, dict[str, Any]]:
        ocp = self._ocp
        try:
            out = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
                ),
            )
        except (ValueError, KeyError, FileNotFoundError) as e:
            raise UserError(
                f"{self.directory}/{step}: the checkpoint does not fit this run (different model or "
                f"optimizer settings?): {first_line(e)}"
            ) from None
        return out["state"], dict(out["meta"])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


# the loop
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Periodic:
    """A measurement of the train state every ``every`` optimizer steps and after the last step.

    ``fn(state, step)`` returns ``{key: number or None}``; the values join that step's ``metrics.jsonl``
    line as ``"<name>/<key>"`` (the TensorBoard tag is the same; None is written as null, not to TensorBoard).
    ``fn`` runs on every process of a multi-process run
    (the state spans them all), after the step's loss was found finite; only process 0 writes. A function of
    (state, step) only, it gives a resumed run the values the uninterrupted one logs at the same steps.
    """

    name: str
    every: int
    fn: Callable[[TrainState, int], Mapping[str, float]]

    def __post_init__(self) -> None:
        if self.every < 1:
            raise UserError(f"{self.name}: the period must be at least 1 step, got {self.every}")

    def due(self, done: int, total: int) -> bool:
        return done % self.every == 0 or done == total

    def __call__(self, state: TrainState, step: int) -> dict[str, float | None]:
        # None: not measured (k-NN top-5 with fewer than five classes), written as null, not to TensorBoard
        return {
            f"{self.name}/{key}": None if value is None else float(value)
            for key, value in self.fn(state, step).items()
        }


@dataclass
class RunResult:
    step: int  # optimizer steps done
    loss: float | None  # the last step's loss
    resumed_from: int | None
    losses: list[float]  # every step's loss in this process (for tests and notebooks)
    state: TrainState | None = None  # the final train state (``trainer.model(state)`` is the trained MAE)


class MetricsLog:
    """JSON lines in ``RUN/metrics.jsonl`` (and TensorBoard events in ``RUN/tensorboard`` when installed)."""

    def __init__(self, run_dir: Path, *, resume_step: int, tensorboard: bool = True, enabled: bool = True):
        self.enabled = enabled  # one writer: process 0 of a multi-process run
        if not enabled:
            return
        self.path = run_dir / METRICS_FILE
        if self.path.exists():  # drop lines the interrupted run wrote after its last checkpoint
            kept = [ln for ln in self.path.read_text().splitlines() if _step_of(ln) <= resume_step]
            atomic_write_text(self.path, "".join(ln + "\n" for ln in kept))
        self.handle = self.path.open("a")
        self.tb = _TensorBoard(run_dir / "tensorboard") if tensorboard else None

    def write(self, record: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        self.handle.write(json.dumps(record) + "\n")
        self.handle.flush()
        if self.tb is not None:
            self.tb.write(record)

    def close(self) -> None:
        if not self.enabled:
            return
        self.handle.close()
        if self.tb is not None:
            self.tb.close()


def _step_of(line: str) -> float:
    """The step of a metrics line; infinity (dropped) for a blank or torn one (a kill mid-write)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return math.inf
    return record.get("step", math.inf) if isinstance(record, dict) else math.inf


class _TensorBoard:
    """Scalars through tensorboard's own event writer (no TensorFlow, no torch); inert if it is missing."""

    def __init__(self, logdir: Path):
        try:
            from tensorboard.compat.proto import event_pb2, summary_pb2
            from tensorboard.summary.writer.event_file_writer import EventFileWriter
        except ImportError:
            self.writer = None
            return
        self._event, self._summary = event_pb2, summary_pb2
        self.writer = EventFileWriter(str(logdir))

    def write(self, record: Mapping[str, Any]) -> None:
        if self.writer is None:
            return
        values = [
            self._summary.Summary.Value(tag=k if "/" in k else f"train/{k}", simple_value=float(v))
            for k, v in record.items()
            if k not in ("step", "time") and isinstance(v, (int, float)) and math.isfinite(v)
        ]
        self.writer.add_event(
            self._event.Event(
                wall_time=time.time(), step=int(record["step"]), summary=self._summary.Summary(value=values)
            )
        )

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class _ExportRequest:
    """SIGUSR1 asks a running ``fit`` to export the encoder after the current step."""

    def __init__(self) -> None:
        self.flag = threading.Event()
        self.previous: Any = None
        self.installed = False

    def __enter__(self) -> _ExportRequest:  # noqa: PYI034
        if hasattr(signal, "SIGUSR1") and threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGUSR1, lambda *_: self.flag.set())
            self.installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self.installed:
            signal.signal(signal.SIGUSR1, self.previous)


@dataclass
class _StepTracker:
    """What ``fit`` learns from each step's metrics once they are read back: the losses, the throughput since
    the last log line; it stops the run on a non-finite loss, runs the periodic measurements and logs."""

    total: int
    log_every: int
    per_step: int  # images per optimizer step
    steps_per_epoch: int
    ckpt: Checkpoints
    log: MetricsLog
    periodic: Sequence[Periodic]
    bar: Any
    losses: list[float] = field(default_factory=list)
    last_loss: float | None = None
    t_last: float = field(default_factory=time.perf_counter)
    n_since: int = 0  # steps since the throughput was last measured
    rate: float = 0.0  # images per second

    def position(self, step: int) -> dict[str, Any]:
        spe = self.steps_per_epoch
        return {
            "step": step,
            "epoch": step // spe,
            "batch_in_epoch": step % spe,
            "images_seen": step * self.per_step,
        }

    def settle(
        self,
        pending: tuple[int, dict[str, jax.Array], float] | None,
        state: TrainState,
        measure: bool = False,
    ) -> None:
        """Read one step's metrics back; stop on a non-finite loss; run the periodic measurements (with
        ``measure``) on ``state``; log."""
        if pending is None:
            return
        step, metrics, lr = pending
        loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
        done = step + 1
        if not bool(metrics["finite"]):
            self.ckpt.wait()
            good = self.ckpt.latest_step()
            where = (
                f"the last good checkpoint is step {good} in {self.ckpt.directory}; continue from it with "
                "--resume (a lower --lr or --clip-grad-norm may help)"
                if good is not None
                else "no checkpoint was written before it"
            )
            raise NonFiniteLoss(
                f"the loss became non-finite at step {done} (loss {loss}, gradient norm "
                f"{grad_norm}); the step was not applied and the run stopped; {where}"
            )
        self.last_loss = loss
        self.losses.append(loss)
        self.n_since += 1
        now = time.perf_counter()
        if now - self.t_last > 0 and (self.n_since >= self.log_every or done == self.total):
            self.rate = self.n_since * self.per_step / (now - self.t_last)
            self.t_last, self.n_since = now, 0
        measured: dict[str, float | None] = {}
        if measure:
            t_measure = time.perf_counter()
            for p in self.periodic:
                if p.due(done, self.total):
                    measured.update(p(state, done))
            self.t_last += time.perf_counter() - t_measure  # the throughput counts training time only
        if done % self.log_every == 0 or done == self.total or measured:
            self.log.write(
                {
                    **self.position(done),
                    "loss": loss,
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "images_per_s": self.rate,
                    **measured,
                    "time": time.time(),
                }
            )
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{self.rate:.1f}", lr=f"{lr:.2e}", refresh=False)
            self.bar.update(1)


def fit(
    trainer: MAETrainer,
    data: Any,
    run_dir: str | os.PathLike[str],
    *,
    total: int,
    schedule: LRSchedule,
    resume: bool = True,
    log_every: int | None = None,
    export: Callable[[TrainState, int], None] | None = None,
    export_every: int | None = None,
    progress: bool = True,
    asynchronous: bool = True,
    checkpoint_every: int | None = None,
    keep_checkpoints: int | None = None,
    extra_meta: Mapping[str, Any] | None = None,
    periodic: Sequence[Periodic] = (),
) -> RunResult:
    """Train ``total`` optimizer steps, checkpointing every ``checkpoint_every`` steps (default: the
    config's).

    ``data`` gives ``iterate(start, stop)`` -> (step, batch) and ``steps_per_epoch`` (a :class:`TrainData`).
    With ``resume`` the run continues from the latest checkpoint under ``RUN/checkpoints`` (the data stream
    included); without it that folder must not hold one. A metrics line is written every ``log_every`` steps
    (default: the config's), at the last step and at every step a ``periodic`` measurement runs.
    ``export(state, step)`` runs at the end, every ``export_every`` steps and on SIGUSR1.
    """
    run_dir = Path(run_dir)
    cfg = trainer.cfg
    every = checkpoint_every or cfg.checkpoint_every
    log_every = log_every or cfg.log_every
    ckpt = Checkpoints(
        run_dir / CHECKPOINT_DIR, keep=keep_checkpoints or cfg.keep_checkpoints, asynchronous=asynchronous
    )
    latest = ckpt.latest_step()
    if latest is not None and not resume:
        ckpt.close()
        raise UserError(
            f"{run_dir} already holds a run (checkpoint at step {latest}); pass --resume to continue "
            "it or choose another --out"
        )
    if latest is not None:
        state, meta = ckpt.restore(latest, trainer.abstract_state())
        start = int(meta["step"])
    else:
        state, start = trainer.init_state(), 0
    spe = data.steps_per_epoch
    per_step = cfg.batch_size * cfg.grad_accum_steps
    log = MetricsLog(run_dir, resume_step=start, enabled=jax.process_index() == 0)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(
            total=total,
            initial=start,
            unit="step",
            dynamic_ncols=True,
            file=sys.stderr,
            desc="resumed" if latest is not None else "pretrain",
        )
    track = _StepTracker(
        total=total,
        log_every=log_every,
        per_step=per_step,
        steps_per_epoch=spe,
        ckpt=ckpt,
        log=log,
        periodic=periodic,
        bar=bar,
    )

    def settle(pending: tuple[int, dict[str, jax.Array], float] | None, measure: bool = False) -> None:
        track.settle(pending, state, measure)

    def save(step: int) -> None:
        ckpt.save(step, state, {**track.position(step), "loss": track.last_loss, **(extra_meta or {})})

    pending: tuple[int, dict[str, jax.Array], float] | None = None
    try:
        with _ExportRequest() as request:
            for step, batch in data.iterate(start, total):
                lr = schedule(step)
                state, metrics = trainer.step(state, batch, lr)
                settle(pending)  # the previous step's numbers, read while this one runs
                pending = (step, metrics, lr)
                done = step + 1
                if any(p.due(done, total) for p in periodic):
                    settle(pending, measure=True)
                    pending = None
                if done % every == 0 or done == total:
                    settle(pending)
                    pending = None
                    save(done)
                if (
                    export is not None
                    and done < total
                    and (request.flag.is_set() or (export_every and done % export_every == 0))
                ):
                    settle(pending)
                    pending = None
                    request.flag.clear()
                    export(state, done)
            settle(pending)
            pending = None
        ckpt.wait()
        if export is not None:
            export(state, max(start, total))
    finally:
        if bar is not None:
            bar.close()
        log.close()
        ckpt.wait()
        ckpt.close()
    return RunResult(
        step=max(start, total), loss=track.last_loss, resumed_from=latest, losses=track.losses, state=state
    )
