"""The jit boundary for MAE pre-training: one train step.

birder's recipe (``scripts/train_mim.py`` + ``common/training_utils.py``, 0.8.4) and how it maps here:

* the step: ``loss / accum_steps``, backward, optional ``clip_grad_norm_``, ``optimizer.step()``:
  :class:`MAETrainer` ``.step`` -- one ``jax.jit`` function with donated state, the micro-batches of one
  optimizer step accumulated inside with ``lax.scan``, masks drawn inside from ``fold_in(rng, step)`` (or
  injected), the batch sharded over every device of a ``data`` mesh axis (XLA inserts the gradient
  all-reduce), optional bf16 matmuls with float32 master weights. A step whose loss or gradient is not
  finite leaves the parameters and optimizer state unchanged; the loop then stops
  (:class:`~vitreg_jax.pretraining.loop.NonFiniteLoss`).

Compute dtype: a :class:`~vitreg_jax.model.precision.ComputePolicy` (from ``TrainConfig.compute_dtype`` or
``policy=``), the same one the Embedder runs under; the kernels are cast inside the step, so the state keeps
float32 master weights.

The optimizer, the schedule and clipping are in :mod:`vitreg_jax.pretraining.optimizer`; checkpoints and the
loop (:func:`~vitreg_jax.pretraining.loop.fit`) in :mod:`vitreg_jax.pretraining.loop`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from vitreg_jax.errors import UserError
from vitreg_jax.model.precision import ComputePolicy, choose_policy
from vitreg_jax.parallel import DATA_AXIS, default_mesh, mesh_platform
from vitreg_jax.pretraining.config import TrainConfig
from vitreg_jax.pretraining.mae import MAE, Masks
from vitreg_jax.pretraining.optimizer import adamw_update, clip_grad_norm, make_optimizer

# {"params": the model's nested dict (float32), "opt_state": optax.adamw's, "step": int32, "rng": uint32[2]}
TrainState = dict[str, Any]


# the train step
# ----------------------------------------------------------------------------------------------
class MAETrainer:
    """The jitted MAE train step for one model structure, config and device mesh.

    ``state = trainer.init_state()`` then ``state, metrics = trainer.step(state, batch, lr)`` with ``batch``
    a (grad_accum_steps, batch, H, W, C) array (numpy, this process's share of the batch, or a global
    ``jax.Array``). ``state`` is donated: use the returned one. ``trainer.model(state)`` is the MAE.

    ``mesh`` defaults to :func:`~vitreg_jax.parallel.default_mesh`; ``policy`` to the one made from
    ``cfg.compute_dtype`` (``"auto"`` resolved for the mesh's platform); when both are given they must agree.
    """

    def __init__(
        self, model: MAE, cfg: TrainConfig, *, mesh: Mesh | None = None, policy: ComputePolicy | None = None
    ):
        self.cfg = cfg
        self.graphdef, params, self.buffers = nnx.split(model, nnx.Param, ...)
        self._init_params = jax.tree_util.tree_map(
            lambda a: np.array(a, np.float32), nnx.to_pure_dict(params)
        )
        self.mesh = mesh if mesh is not None else default_mesh()
        self.policy = choose_policy(cfg.compute_dtype, policy, platform=mesh_platform(self.mesh))
        self.replicated = NamedSharding(self.mesh, P())
        self.batch_sharding = NamedSharding(self.mesh, P(None, DATA_AXIS))  # (A, B, ...) split over B
        self.drop_path = model.encoder.cfg.drop_path_rate > 0.0
        self.num_devices = self.mesh.devices.size
        self._step = jax.jit(self.policy.under_precision(self._step_impl), donate_argnums=0)

    # state -------------------------------------------------------------------------------------------------
    def init_state(self, params: Any | None = None) -> TrainState:
        """A fresh state (step 0) from the model's parameters (or ``params``, a nested dict), replicated."""
        # host copies: the state is donated to the step, so it must not share buffers with the model
        params = jax.tree_util.tree_map(
            lambda a: np.array(a, np.float32), self._init_params if params is None else params
        )
        state = {
            "params": params,
            "opt_state": make_optimizer(self.cfg).init(params),
            "step": np.zeros((), np.int32),
            "rng": np.asarray(jax.random.PRNGKey(self.cfg.seed)),
        }
        return jax.device_put(state, self.replicated)

    def abstract_state(self) -> TrainState:
        """Shapes, dtypes and shardings of the state (what Orbax restores into)."""
        params = jax.tree_util.tree_map(
            lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float32), self._init_params
        )
        shapes = {
            "params": params,
            "opt_state": jax.eval_shape(make_optimizer(self.cfg).init, params),
            "step": jax.ShapeDtypeStruct((), jnp.int32),
            "rng": jax.eval_shape(jax.random.PRNGKey, 0),
        }
        return jax.tree_util.tree_map(
            lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=self.replicated), shapes
        )

    def params(self, state: TrainState) -> Any:
        """The state's parameters as the model's nested dict of numpy arrays (on the host)."""
        return jax.tree_util.tree_map(np.asarray, jax.device_get(state["params"]))

    def model(self, state: TrainState) -> MAE:
        """The MAE with this state's parameters, on the host."""
        return nnx.merge(self.graphdef, self.params(state), self.buffers)

    # step
    # ----------------------------------------------------------------------------------------------------
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
        return jax.make_array_from_process_local_data(
            self.batch_sharding, np.asarray(batch, np.float32), global_shape
        )

    def step(
        self, state: TrainState, batch: np.ndarray | jax.Array, lr: float, masks: Masks | None = None
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        """One optimizer step; ``masks`` (leaves shaped (A, B, ...)) replaces the drawn ones when given."""
        if masks is not None:
            masks = Masks(*(jax.device_put(jnp.asarray(m), self.batch_sharding) for m in masks))
        return self._step(state, self.put_batch(batch), jnp.asarray(lr, jnp.float32), masks)

    def compute_params(self, params: Any) -> Any:
        """The parameters as the step computes with them: the policy's cast of the float32 master weights."""
        return self.policy.cast_params(params)

    def _loss(self, params: Any, images: jax.Array, key: jax.Array, masks: Masks | None) -> jax.Array:
        model = nnx.merge(self.graphdef, self.compute_params(params), self.buffers)
        mask_key, drop_key = jax.random.split(key)
        if masks is None:
            masks = model.random_masks(mask_key, images.shape[0])
        out = model(images, masks, dropout_key=drop_key if self.drop_path else None)
        return out["loss"]

    def _step_impl(
        self, state: TrainState, batch: jax.Array, lr: jax.Array, masks: Masks | None
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        params = state["params"]
        key = jax.random.fold_in(state["rng"], state["step"])
        grad_fn = jax.value_and_grad(self._loss)
        accum = batch.shape[0]
        if accum == 1:
            loss, grads = grad_fn(
                params,
                batch[0],
                jax.random.fold_in(key, 0),
                None if masks is None else Masks(*(m[0] for m in masks)),
            )
        else:  # birder: loss / accum_steps per micro-batch, gradients summed

            def micro(carry: Any, xs: Any) -> tuple[Any, None]:
                g_sum, l_sum = carry
                images, i, m = xs
                loss_i, g_i = grad_fn(params, images, jax.random.fold_in(key, i), m)
                return (jax.tree_util.tree_map(jnp.add, g_sum, g_i), l_sum + loss_i), None

            zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
            (grads, loss), _ = jax.lax.scan(
                micro, (zeros, jnp.zeros((), jnp.float32)), (batch, jnp.arange(accum), masks)
            )
            grads = jax.tree_util.tree_map(lambda g: g / accum, grads)
            loss = loss / accum
        grads, grad_norm = clip_grad_norm(grads, self.cfg.clip_grad_norm)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        # a bad step changes nothing; cond (not where) keeps the update in place in the donated buffers
        new_params, new_opt = jax.lax.cond(
            finite,
            lambda p, o: adamw_update(self.cfg, p, grads, o, lr),
            lambda p, o: (p, o),
            params,
            state["opt_state"],
        )
        new_state = {
            "params": new_params,
            "opt_state": new_opt,
            "step": state["step"] + finite.astype(jnp.int32),
            "rng": state["rng"],
        }
        return new_state, {"loss": loss, "grad_norm": grad_norm, "finite": finite}
