"""The jit boundary for MAE pre-training: birder's optimizer and schedule, one train step, the loop, checkpoints.

birder's recipe (``scripts/train_mim.py`` + ``common/training_utils.py``, 0.8.4) and how it maps here:

* ``torch.optim.AdamW(lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.05)`` on every parameter, one group:
  :func:`make_optimizer` (``optax.adamw`` is the same update: decoupled decay ``p -= lr * wd * p`` plus the
  bias-corrected Adam step), optionally without decay on biases, norms and tokens.
* ``SequentialLR([LinearLR(0.01, warm-up), CosineAnnealingLR(T_max=total - warm-up - 1)])`` stepped once per
  epoch (default) or per optimizer step: :class:`LRSchedule`, evaluated in float64 on the host and passed
  to the step, so the step needs no schedule state.
* the step: ``loss / accum_steps``, backward, optional ``clip_grad_norm_``, ``optimizer.step()``:
  :class:`MAETrainer` ``.step`` -- one ``jax.jit`` function with donated state, the micro-batches of one
  optimizer step accumulated inside with ``lax.scan``, masks drawn inside from ``fold_in(rng, step)`` (or
  injected), the batch sharded over every device of a ``data`` mesh axis (XLA inserts the gradient
  all-reduce), optional bf16 matmuls with float32 master weights. A step whose loss or gradient is not
  finite leaves the parameters and optimizer state unchanged; the loop then stops (:class:`NonFiniteLoss`).
* checkpoints: Orbax ``CheckpointManager`` (asynchronous, keeping the last K) of the whole train state plus
  a JSON record of the data position; resuming continues the same run bit for bit.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from vitreg_jax.config import TrainConfig
from vitreg_jax.errors import UserError
from vitreg_jax.mae import MAE, Masks

# torch.nn.utils.clip_grad_norm_: clip_coef = max_norm / (total_norm + 1e-6), clamped to 1
CLIP_EPS = 1e-6
DATA_AXIS = "data"
# parameters the usual exclusion (decay_bias_and_norm=False) leaves undecayed besides biases and norm scales
NO_DECAY_NAMES = frozenset({"pos_embedding", "class_token", "reg_tokens", "mask_token", "decoder_pos_embed"})
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"

# {"params": the model's nested dict (float32), "opt_state": optax.adamw's, "step": int32, "rng": uint32[2]}
TrainState = dict[str, Any]


class NonFiniteLoss(UserError):
    """The loss (or the gradient) became NaN or infinite; the run stopped without saving anything after it."""


# learning-rate schedule --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LRSchedule:
    """birder's ``get_scheduler`` for ``--lr-scheduler cosine`` with linear warm-up, as a pure function.

    ``total`` and ``warmup`` count scheduler updates (epochs, or optimizer steps with ``per_step``); the LR of
    optimizer step ``s`` is the value after ``s // steps_per_update`` scheduler updates.
    """

    base_lr: float
    total: int
    warmup: int
    start_factor: float = 0.01
    eta_min: float = 0.0
    steps_per_update: int = 1

    def value(self, index: int) -> float:
        """The LR after ``index`` scheduler updates (float64)."""
        if self.warmup > 0 and index < self.warmup:  # LinearLR(start_factor, end_factor=1, total_iters=warmup)
            return self.base_lr * (self.start_factor + (1.0 - self.start_factor) * index / self.warmup)
        t_max = self.total - self.warmup - 1  # CosineAnnealingLR(T_max=main_steps), restarted at the milestone
        t = index - self.warmup
        if t_max <= 0:
            return self.base_lr
        return self.eta_min + (self.base_lr - self.eta_min) * (1.0 + math.cos(math.pi * t / t_max)) / 2.0

    def __call__(self, step: int) -> float:
        return self.value(step // self.steps_per_update)


def steps_per_update(cfg: TrainConfig, steps_per_epoch: int) -> int:
    return 1 if (cfg.schedule_per_step or cfg.steps is not None) else steps_per_epoch


def total_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """Optimizer steps of the whole run."""
    return cfg.steps if cfg.steps is not None else cfg.epochs * steps_per_epoch


def lr_schedule(cfg: TrainConfig, steps_per_epoch: int) -> LRSchedule:
    """birder's schedule for this config (per epoch, or per step with ``schedule_per_step`` / ``steps``)."""
    if cfg.steps is not None:
        total, warmup, every = cfg.steps, cfg.warmup_steps, 1
    elif cfg.schedule_per_step:
        total, warmup, every = cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch, 1
    else:
        total, warmup, every = cfg.epochs, cfg.warmup_epochs, steps_per_epoch
    return LRSchedule(cfg.lr, total, warmup, cfg.warmup_start_factor, cfg.lr_min, every)


# optimizer ---------------------------------------------------------------------------------------------------
def decays_by_default(path: tuple[Any, ...], leaf: Any) -> bool:
    """The usual exclusion (``decay_bias_and_norm=False``): decay matrices only, not biases, norm scales,
    tokens or position embeddings."""
    names = {getattr(k, "key", getattr(k, "name", k)) for k in path}  # KeyEntry or plain keys
    return np.ndim(leaf) >= 2 and not (names & NO_DECAY_NAMES)


def weight_decay_mask(params: Any) -> Any:
    """True for the tensors the usual exclusion decays (a pytree of bools shaped like ``params``)."""
    return jax.tree_util.tree_map_with_path(decays_by_default, params)


def make_optimizer(cfg: TrainConfig, lr: Any = None) -> optax.GradientTransformation:
    """torch's ``AdamW`` with birder's settings: ``optax.adamw`` (scale_by_adam, decoupled decay, -lr).

    The step builds it with the current LR, which does not change the optimizer state (``make_optimizer(cfg)
    .init`` creates it). Weight decay goes to every tensor, as birder's, or with ``decay_bias_and_norm=False``
    only to :func:`weight_decay_mask`'s.
    """
    return optax.adamw(learning_rate=cfg.lr if lr is None else lr, b1=cfg.betas[0], b2=cfg.betas[1], eps=cfg.eps,
                       weight_decay=cfg.weight_decay, mask=None if cfg.decay_bias_and_norm else weight_decay_mask)


def adamw_update(cfg: TrainConfig, params: Any, grads: Any, opt_state: Any, lr: Any) -> tuple[Any, Any]:
    """One AdamW step: (new parameters, new optimizer state)."""
    updates, opt_state = make_optimizer(cfg, lr).update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def cast_matmul_weights(params: Any, dtype: Any) -> Any:
    """Matmul kernels to ``dtype`` (ops.dense then multiplies in it with float32 accumulation); the rest
    (biases, norms, tokens, position embeddings) stays float32."""
    def cast(path: tuple[Any, ...], leaf: jax.Array) -> jax.Array:
        last = getattr(path[-1], "key", None)
        return leaf.astype(dtype) if last == "kernel" else leaf

    return jax.tree_util.tree_map_with_path(cast, params)


def clip_grad_norm(grads: Any, max_norm: float | None) -> tuple[Any, jax.Array]:
    """torch's ``clip_grad_norm_``: scale by ``min(1, max_norm / (norm + 1e-6))``; returns (grads, norm)."""
    norm = optax.tree.norm(grads)
    if max_norm is None:
        return grads, norm
    coef = jnp.minimum(1.0, max_norm / (norm + CLIP_EPS))
    return jax.tree_util.tree_map(lambda g: g * coef, grads), norm


def local_mesh(devices: list[Any] | None = None) -> Mesh:
    """A 1-D ``data`` mesh over all devices (every process's, for multi-host runs)."""
    return Mesh(np.asarray(devices if devices is not None else jax.devices()), (DATA_AXIS,))


# the train step ----------------------------------------------------------------------------------------------
class MAETrainer:
    """The jitted MAE train step for one model structure, config and device mesh.

    ``state = trainer.init_state()`` then ``state, metrics = trainer.step(state, batch, lr)`` with ``batch``
    a (grad_accum_steps, batch, H, W, C) array (numpy, this process's share of the batch, or a global
    ``jax.Array``). ``state`` is donated: use the returned one. ``trainer.model(state)`` is the MAE.
    """

    def __init__(self, model: MAE, cfg: TrainConfig, *, mesh: Mesh | None = None):
        self.cfg = cfg
        self.graphdef, params, self.buffers = nnx.split(model, nnx.Param, ...)
        self._init_params = jax.tree_util.tree_map(lambda a: np.array(a, np.float32), nnx.to_pure_dict(params))
        self.mesh = mesh if mesh is not None else local_mesh()
        self.replicated = NamedSharding(self.mesh, P())
        self.batch_sharding = NamedSharding(self.mesh, P(None, DATA_AXIS))  # (A, B, ...) split over B
        self.compute_dtype = jnp.bfloat16 if cfg.compute_dtype == "bfloat16" else jnp.float32
        self.drop_path = model.encoder.cfg.drop_path_rate > 0.0
        self.num_devices = self.mesh.devices.size
        self._step = jax.jit(self._step_impl, donate_argnums=0)

    # state -------------------------------------------------------------------------------------------------
    def init_state(self, params: Any | None = None) -> TrainState:
        """A fresh state (step 0) from the model's parameters (or ``params``, a nested dict), replicated."""
        # host copies: the state is donated to the step, so it must not share buffers with the model
        params = jax.tree_util.tree_map(lambda a: np.array(a, np.float32),
                                        self._init_params if params is None else params)
        state = {"params": params, "opt_state": make_optimizer(self.cfg).init(params),
                 "step": np.zeros((), np.int32), "rng": np.asarray(jax.random.PRNGKey(self.cfg.seed))}
        return jax.device_put(state, self.replicated)

    def abstract_state(self) -> TrainState:
        """Shapes, dtypes and shardings of the state (what Orbax restores into)."""
        params = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float32), self._init_params)
        shapes = {"params": params, "opt_state": jax.eval_shape(make_optimizer(self.cfg).init, params),
                  "step": jax.ShapeDtypeStruct((), jnp.int32), "rng": jax.eval_shape(jax.random.PRNGKey, 0)}
        return jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=self.replicated),
                                      shapes)

    def params(self, state: TrainState) -> Any:
        """The state's parameters as the model's nested dict of numpy arrays (on the host)."""
        return jax.tree_util.tree_map(np.asarray, jax.device_get(state["params"]))

    def model(self, state: TrainState) -> MAE:
        """The MAE with this state's parameters, on the host."""
        return nnx.merge(self.graphdef, self.params(state), self.buffers)

    # step ----------------------------------------------------------------------------------------------------
    def put_batch(self, batch: np.ndarray | jax.Array) -> jax.Array:
        """This process's (A, B_local, H, W, C) share as the global batch, split over the mesh."""
        if isinstance(batch, jax.Array) and batch.sharding == self.batch_sharding:
            return batch
        if batch.ndim != 5:
            raise UserError(f"a train batch is (accum steps, batch, H, W, C), got shape {tuple(batch.shape)}")
        global_b = batch.shape[1] * jax.process_count()
        if global_b % self.num_devices:
            raise UserError(f"batch size {global_b} is not divisible by the {self.num_devices} devices")
        global_shape = (batch.shape[0], global_b, *batch.shape[2:])
        return jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(batch, np.float32),
                                                      global_shape)

    def step(self, state: TrainState, batch: np.ndarray | jax.Array, lr: float,
             masks: Masks | None = None) -> tuple[TrainState, dict[str, jax.Array]]:
        """One optimizer step; ``masks`` (leaves shaped (A, B, ...)) replaces the drawn ones when given."""
        if masks is not None:
            masks = Masks(*(jax.device_put(jnp.asarray(m), self.batch_sharding) for m in masks))
        return self._step(state, self.put_batch(batch), jnp.asarray(lr, jnp.float32), masks)

    def _loss(self, params: Any, images: jax.Array, key: jax.Array, masks: Masks | None) -> jax.Array:
        model = nnx.merge(self.graphdef, cast_matmul_weights(params, self.compute_dtype), self.buffers)
        mask_key, drop_key = jax.random.split(key)
        if masks is None:
            masks = model.random_masks(mask_key, images.shape[0])
        out = model(images, masks, dropout_key=drop_key if self.drop_path else None)
        return out["loss"]

    def _step_impl(self, state: TrainState, batch: jax.Array, lr: jax.Array,
                   masks: Masks | None) -> tuple[TrainState, dict[str, jax.Array]]:
        params = state["params"]
        key = jax.random.fold_in(state["rng"], state["step"])
        grad_fn = jax.value_and_grad(self._loss)
        accum = batch.shape[0]
        if accum == 1:
            loss, grads = grad_fn(params, batch[0], jax.random.fold_in(key, 0),
                                  None if masks is None else Masks(*(m[0] for m in masks)))
        else:  # birder: loss / accum_steps per micro-batch, gradients summed
            def micro(carry: Any, xs: Any) -> tuple[Any, None]:
                g_sum, l_sum = carry
                images, i, m = xs
                loss_i, g_i = grad_fn(params, images, jax.random.fold_in(key, i), m)
                return (jax.tree_util.tree_map(jnp.add, g_sum, g_i), l_sum + loss_i), None

            zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
            (grads, loss), _ = jax.lax.scan(micro, (zeros, jnp.zeros((), jnp.float32)),
                                            (batch, jnp.arange(accum), masks))
            grads = jax.tree_util.tree_map(lambda g: g / accum, grads)
            loss = loss / accum
        grads, grad_norm = clip_grad_norm(grads, self.cfg.clip_grad_norm)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        # a bad step changes nothing; cond (not where) keeps the update in place in the donated buffers
        new_params, new_opt = jax.lax.cond(
            finite, lambda p, o: adamw_update(self.cfg, p, grads, o, lr), lambda p, o: (p, o),
            params, state["opt_state"])
        new_state = {"params": new_params, "opt_state": new_opt, "step": state["step"] + finite.astype(jnp.int32),
                     "rng": state["rng"]}
        return new_state, {"loss": loss, "grad_norm": grad_norm, "finite": finite}


# checkpoints -------------------------------------------------------------------------------------------------
class Checkpoints:
    """Orbax ``CheckpointManager`` for train states: ``RUN/checkpoints/<step>/{state, meta}``."""

    def __init__(self, directory: str | os.PathLike[str], *, keep: int, asynchronous: bool = True):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=asynchronous,
                                               create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: TrainState, meta: Mapping[str, Any]) -> None:
        ocp = self._ocp
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(dict(meta))), force=True)

    def restore(self, step: int, abstract_state: TrainState) -> tuple[TrainState, dict[str, Any]]:
        ocp = self._ocp
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        except (ValueError, KeyError, FileNotFoundError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"{self.directory}/{step}: the checkpoint does not fit this run (different model or "
                            f"optimizer settings?): {first}") from None
        return out["state"], dict(out["meta"])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


# the loop ----------------------------------------------------------------------------------------------------
@dataclass
class RunResult:
    step: int  # optimizer steps done
    loss: float | None  # the last step's loss
    resumed_from: int | None
    losses: list[float]  # every step's loss in this process (for tests and notebooks)


class MetricsLog:
    """JSON lines in ``RUN/metrics.jsonl`` (and TensorBoard events in ``RUN/tensorboard`` when installed)."""

    def __init__(self, run_dir: Path, *, resume_step: int, tensorboard: bool = True, enabled: bool = True):
        self.enabled = enabled  # one writer: process 0 of a multi-process run
        if not enabled:
            return
        self.path = run_dir / METRICS_FILE
        if self.path.exists():  # drop lines the interrupted run wrote after its last checkpoint
            kept = [ln for ln in self.path.read_text().splitlines() if ln.strip()
                    and json.loads(ln).get("step", 0) <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in kept))
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
        values = [self._summary.Summary.Value(tag=f"train/{k}", simple_value=float(v)) for k, v in record.items()
                  if k not in ("step", "time") and isinstance(v, (int, float)) and math.isfinite(v)]
        self.writer.add_event(self._event.Event(wall_time=time.time(), step=int(record["step"]),
                                                summary=self._summary.Summary(value=values)))

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


def fit(trainer: MAETrainer, data: Any, run_dir: str | os.PathLike[str], *, total: int, schedule: LRSchedule,
        resume: bool = True, log_every: int = 10, export: Callable[[TrainState, int], None] | None = None,
        export_every: int | None = None, progress: bool = True, asynchronous: bool = True,
        checkpoint_every: int | None = None, keep_checkpoints: int | None = None,
        extra_meta: Mapping[str, Any] | None = None) -> RunResult:
    """Train ``total`` optimizer steps, checkpointing every ``checkpoint_every`` steps (default: the config's).

    ``data`` gives ``iterate(start, stop)`` -> (step, batch) and ``steps_per_epoch`` (a :class:`TrainData`).
    With ``resume`` the run continues from the latest checkpoint under ``RUN/checkpoints`` (the data stream
    included); without it that folder must not hold one. ``export(state, step)`` runs at the end, every
    ``export_every`` steps and on SIGUSR1.
    """
    run_dir = Path(run_dir)
    every = checkpoint_every or trainer.cfg.checkpoint_every
    ckpt = Checkpoints(run_dir / CHECKPOINT_DIR, keep=keep_checkpoints or trainer.cfg.keep_checkpoints,
                       asynchronous=asynchronous)
    latest = ckpt.latest_step()
    if latest is not None and not resume:
        ckpt.close()
        raise UserError(f"{run_dir} already holds a run (checkpoint at step {latest}); pass --resume to continue "
                        "it or choose another --out")
    if latest is not None:
        state, meta = ckpt.restore(latest, trainer.abstract_state())
        start = int(meta["step"])
    else:
        state, start = trainer.init_state(), 0
    spe = data.steps_per_epoch
    per_step = trainer.cfg.batch_size * trainer.cfg.grad_accum_steps
    log = MetricsLog(run_dir, resume_step=start, enabled=jax.process_index() == 0)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr,
                   desc="resumed" if latest is not None else "pretrain")
    losses: list[float] = []
    last_loss: float | None = None
    t_last, n_since = time.perf_counter(), 0
    rate = 0.0

    def position(step: int) -> dict[str, Any]:
        return {"step": step, "epoch": step // spe, "batch_in_epoch": step % spe, "images_seen": step * per_step}

    def settle(pending: tuple[int, dict[str, jax.Array], float] | None) -> None:
        """Read one step's metrics back; stop on a non-finite loss; log."""
        nonlocal last_loss, t_last, n_since, rate
        if pending is None:
            return
        step, metrics, lr = pending
        loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
        done = step + 1
        if not bool(metrics["finite"]):
            ckpt.wait()
            good = ckpt.latest_step()
            where = (f"the last good checkpoint is step {good} in {ckpt.directory}; continue from it with --resume "
                     "(a lower --lr or --clip-grad-norm may help)" if good is not None
                     else "no checkpoint was written before it")
            raise NonFiniteLoss(f"the loss became non-finite at step {done} (loss {loss}, gradient norm "
                                f"{grad_norm}); the step was not applied and the run stopped; {where}")
        last_loss = loss
        losses.append(loss)
        n_since += 1
        now = time.perf_counter()
        if now - t_last > 0 and (n_since >= log_every or done == total):
            rate = n_since * per_step / (now - t_last)
            t_last, n_since = now, 0
        if done % log_every == 0 or done == total:
            log.write({**position(done), "loss": loss, "lr": lr, "grad_norm": grad_norm,
                       "images_per_s": rate, "time": time.time()})
        if bar is not None:
            bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{rate:.1f}", lr=f"{lr:.2e}", refresh=False)
            bar.update(1)

    def save(step: int) -> None:
        ckpt.save(step, state, {**position(step), "loss": last_loss, **(extra_meta or {})})

    pending: tuple[int, dict[str, jax.Array], float] | None = None
    try:
        with _ExportRequest() as request:
            for step, batch in data.iterate(start, total):
                lr = schedule(step)
                state, metrics = trainer.step(state, batch, lr)
                settle(pending)  # the previous step's numbers, read while this one runs
                pending = (step, metrics, lr)
                done = step + 1
                if done % every == 0 or done == total:
                    settle(pending)
                    pending = None
                    save(done)
                if export is not None and done < total and (
                        request.flag.is_set() or (export_every and done % export_every == 0)):
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
    return RunResult(step=max(start, total), loss=last_loss, resumed_from=latest, losses=losses)

