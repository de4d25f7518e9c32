"""The jit boundary for inference: compiled, bucketed, padded, data-parallel embedding.

Two entry points:

- :func:`make_embed_fn` gives the plain functional form, ``embed, params = make_embed_fn(net)`` then
  ``embed(params, images)``: one jitted pure function (it compiles once per input shape).
- :class:`Embedder` is the batch engine behind ``vitreg-jax embed``: the model is split once, its weights are
  replicated over a ``jax.sharding.Mesh`` of every device (every process's devices under
  ``jax.distributed``), each call's batch is padded up to one of a few bucket sizes and sharded along the
  mesh's ``data`` axis, and each (bucket, height, width) is compiled ahead of time exactly once.

Compute dtype: ``dtype="float32"``, ``"bfloat16"`` or ``"auto"`` (or ``policy=``), a
:class:`~vitreg_jax.model.precision.ComputePolicy`, the same one the trainer runs under (its module says what
each dtype computes). Outputs are always float32.

What to return (``features``): ``"cls"`` is birder's ``net.embedding`` (the CLS token after the final norm,
or the patch mean for ``_avg`` variants), ``"tokens"`` every token of ``forward_features``
(``[REG..., CLS, PATCH...]``) and ``"patches"`` the patch tokens only, in row-major patch order.

XLA:CPU flags: turning XLA:CPU's YNNPACK fusion off (``--xla_cpu_experimental_ynn_fusion_type=``) speeds the
float32 path up and slows the bfloat16 path down (BENCHMARKS.md, "Embedding"), and flags are read once per
process, before the backend starts. :func:`configure_xla_flags` applies the better choice for a dtype when the
user has not set ``XLA_FLAGS`` and JAX has not started yet; ``vitreg-jax embed`` calls it first thing. For
``"auto"`` it uses what ``"auto"`` means on this host's CPU (read from the CPU's flags, without starting JAX):
the flags only change XLA:CPU, so on a GPU/TPU run, where ``"auto"`` is bfloat16, they touch nothing that
computes the embedding.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from vitreg_jax.embedding.options import FEATURES
from vitreg_jax.errors import UserError
from vitreg_jax.model.precision import ComputePolicy, choose_policy, resolve_dtype
from vitreg_jax.model.vit import ViT
from vitreg_jax.parallel import DATA_AXIS, default_mesh, fsdp_spec, mesh_platform

# XLA:CPU runs large batches faster as micro-batches of this many images inside the jitted function
# (jax.lax.map): each step's activations stay in cache instead of streaming ~2 GB per call.
CPU_MICRO_BATCH = 4
# XLA_FLAGS chosen per dtype on CPU (see the module docstring and BENCHMARKS.md).
CPU_XLA_FLAGS: dict[str, str] = {"float32": "--xla_cpu_experimental_ynn_fusion_type=", "bfloat16": ""}


# XLA flags ----------------------------------------------------------------------------------------------
def configure_xla_flags(dtype: str) -> str | None:
    """Set ``XLA_FLAGS`` to the measured-best CPU flags for ``dtype``, if it is still possible and wanted.

    ``"auto"`` is resolved as on this host's CPU (``resolve_dtype("auto", platform="cpu")``: the CPU's
    flags, without starting JAX's backends, which would make setting the flags too late); the flags only
    touch XLA:CPU, so a GPU/TPU run, where ``"auto"`` means bfloat16, is unaffected whatever they are.

    Does nothing (returns None) when the user has set ``XLA_FLAGS`` (their choice wins) or when JAX's backends
    have already started (flags are read once per process; a warning says so when the choice would have
    differed). Returns the flags it set otherwise. The flags only touch XLA:CPU (GPU/TPU runs are
    unaffected).
    """
    dtype = resolve_dtype(dtype, platform="cpu")
    if "XLA_FLAGS" in os.environ:
        return None
    flags = CPU_XLA_FLAGS[dtype]
    if _backends_started():
        if flags:
            warnings.warn(
                f"JAX has already started, so XLA_FLAGS={flags!r} (faster for {dtype} on CPU) cannot "
                "be applied in this process; set it before JAX starts",
                stacklevel=2,
            )
        return None
    if flags:
        os.environ["XLA_FLAGS"] = flags
    return flags


def _backends_started() -> bool:
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):  # private API moved: assume started, so we never claim otherwise
        return True


# pure functions -----------------------------------------------------------------------------------------
def _check_features(features: str) -> None:
    if features not in FEATURES:
        raise UserError(f"features must be one of {', '.join(FEATURES)}, got {features!r}")


def _extract(net: ViT, x: jax.Array, features: str) -> jax.Array:
    tokens = net.forward_features(x)  # (B, S + h*w, D)
    if features == "cls":
        return net.embedding_from_features(tokens)  # (B, D)
    if features == "patches":
        return tokens[:, net.cfg.num_special_tokens :]  # (B, h*w, D)
    return tokens


def _micro_size(batch: int, micro_batch: int | None) -> int:
    """The micro-batch for ``batch`` rows: the largest divisor <= micro_batch when it is at least half of it,
    else micro_batch itself (the rows are then padded up to a multiple; a prime batch of 13 would otherwise
    run as 13 micro-batches of 1). ``batch`` itself when micro-batching is off or the batch is small."""
    if not micro_batch or batch <= micro_batch:
        return batch
    divisor = max(d for d in range(1, micro_batch + 1) if batch % d == 0)
    return divisor if 2 * divisor >= micro_batch else micro_batch


def _pure_fn(
    graphdef: nnx.GraphDef,
    policy: ComputePolicy,
    features: str,
    micro_batch: int | None,
    on_trace: Callable[[], None] | None = None,
) -> Callable[[nnx.State, jax.Array], jax.Array]:
    """``fn(params, images (B, H, W, C)) -> float32 features`` on one device's rows, micro-batched, traced
    under the policy's matmul precision."""

    def fn(params: nnx.State, x: jax.Array) -> jax.Array:
        if on_trace is not None:
            on_trace()
        with policy.precision_scope():
            net = nnx.merge(graphdef, params)
            b = x.shape[0]
            m = _micro_size(b, micro_batch)
            if m == b:
                return _extract(net, x, features).astype(jnp.float32)
            steps = -(-b // m)
            if steps * m > b:  # pad rows (each image is computed on its own, so real rows are unaffected)
                x = jnp.concatenate([x, jnp.zeros((steps * m - b, *x.shape[1:]), x.dtype)])
            xs = x.reshape(steps, m, *x.shape[1:])  # (steps, m, H, W, C)
            ys = jax.lax.map(lambda xb: _extract(net, xb, features), xs)  # (steps, m, ...)
            return ys.reshape(steps * m, *ys.shape[2:])[:b].astype(jnp.float32)  # (B, ...)

    return fn


def default_micro_batch() -> int | None:
    """CPU_MICRO_BATCH on CPU, None (whole batch at once) on GPU/TPU."""
    return CPU_MICRO_BATCH if jax.default_backend() == "cpu" else None


def make_embed_fn(
    net: ViT,
    *,
    dtype: str | None = None,
    features: str = "cls",
    micro_batch: int | None = -1,
    policy: ComputePolicy | None = None,
) -> tuple[Callable[[nnx.State, Any], jax.Array], nnx.State]:
    """``(embed, params)``: a jitted pure ``embed(params, images)`` and the parameters it takes.

    ``images`` is (B, H, W, C) float32 (any B; any H, W divisible by the patch size); the result is float32
    (B, D) for ``"cls"``, (B, S + h*w, D) for ``"tokens"``, (B, h*w, D) for ``"patches"``. ``params`` holds
    the matmul kernels in the compute dtype (``dtype``, default float32, or ``policy``: see
    :func:`~vitreg_jax.model.precision.choose_policy`). Each new input shape compiles once; use
    :class:`Embedder` for bucketed batches and several devices. ``micro_batch=-1`` picks
    :func:`default_micro_batch`.
    """
    policy = choose_policy(dtype, policy)
    _check_features(features)
    graphdef, params = nnx.split(net)
    params = policy.cast_params(params)
    micro = default_micro_batch() if micro_batch == -1 else micro_batch
    return jax.jit(_pure_fn(graphdef, policy, features, micro)), params


def _gathering(
    fn: Callable[[nnx.State, jax.Array], jax.Array], specs: Any
) -> Callable[[nnx.State, jax.Array], jax.Array]:
    """``fn`` on whole weights, for use inside ``shard_map`` with the weights split as ``specs`` say."""

    def gather(leaf: jax.Array, spec: P) -> jax.Array:
        if not spec:  # P(): already whole
            return leaf
        return jax.lax.all_gather(leaf, DATA_AXIS, axis=len(spec) - 1, tiled=True)

    def wrapped(params: nnx.State, x: jax.Array) -> jax.Array:
        return fn(jax.tree_util.tree_map(gather, params, specs), x)

    return wrapped


# the batch engine ---------------------------------------------------------------------------------------
def bucket_sizes(batch_size: int, multiple: int = 1) -> tuple[int, ...]:
    """Global batch sizes to compile: ``multiple * 2**k`` below ``batch_size``, then ``batch_size`` itself.

    ``batch_size`` is rounded up to a multiple of ``multiple`` (the number of devices), so every device gets
    the same number of rows. A stream of ragged batches then compiles at most ``len(buckets)`` times, and a
    batch pads by less than half of itself.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"batch size must be a positive integer, got {batch_size!r}")
    top = math.ceil(batch_size / multiple) * multiple
    sizes, b = [], multiple
    while b < top:
        sizes.append(b)
        b *= 2
    sizes.append(top)
    return tuple(sizes)


@dataclass
class PendingEmbedding:
    """An embedding computation in flight: ``result()`` waits for it and returns this process's rows."""

    outputs: list[tuple[jax.Array, int]]  # (global output, number of real local rows)
    embedder: Embedder
    shape: tuple[int, ...]  # one image's output shape

    def result(self) -> np.ndarray:
        parts = [self.embedder._local_rows(y)[:n] for y, n in self.outputs]
        if not parts:
            return np.zeros((0, *self.shape), np.float32)
        return np.concatenate(parts) if len(parts) != 1 else parts[0]


class Embedder:
    """Compiled, bucketed, sharded embedding of image batches with one model.

    >>> embedder = Embedder(net, dtype="bfloat16", batch_size=64)
    >>> out = embedder(images)   # (n, H, W, 3) float32 numpy -> (n, D) float32 numpy

    - The model is split once; the weights (cast by the compute policy: ``policy``, or one made from
      ``dtype``, default float32; ``"auto"`` resolves for the mesh's platform) are replicated on every
      device of ``mesh`` (default: :func:`~vitreg_jax.parallel.default_mesh`, all devices of all processes)
      and each batch is sharded along its ``data`` axis. ``dtype`` is the resolved compute dtype.
      ``shard_weights=True`` (for variants too large to copy to every device) stores each large weight split
      along the same axis instead, 1/n per device, and all-gathers it inside each call (FSDP-style); the
      results are the same, the weights' resting memory per device is divided by the device count.
    - A call with ``n`` images runs in chunks of at most ``batch_size``; each chunk is zero-padded up to the
      smallest bucket (:func:`bucket_sizes`) that holds it, so ragged batches compile once per bucket and
      image size. ``compile_count`` and ``compile_seconds`` say what was compiled.
    - ``micro_batch`` (default -1: :func:`default_micro_batch`) runs each device's rows as ``jax.lax.map``
      steps of that many images inside the compiled function; ``None`` runs them at once.
    - Under ``jax.distributed`` (several processes), ``images`` are this process's rows and the result is
      this process's rows; every process must make the same calls with the same number of images (pad if
      needed: ``vitreg-jax embed`` does), since the computation spans every process's devices.
    """

    def __init__(
        self,
        net: ViT,
        *,
        dtype: str | None = None,
        features: str = "cls",
        batch_size: int = 64,
        micro_batch: int | None = -1,
        mesh: Mesh | None = None,
        shard_weights: bool = False,
        policy: ComputePolicy | None = None,
    ):
        _check_features(features)
        self.features = features
        self.cfg = net.cfg
        self.mesh = default_mesh() if mesh is None else mesh
        self.policy = choose_policy(dtype, policy, platform=mesh_platform(self.mesh))
        self.dtype = self.policy.dtype
        self.num_devices = int(self.mesh.devices.size)
        self.num_processes = len({d.process_index for d in self.mesh.devices.flat})
        self.buckets = bucket_sizes(batch_size, self.num_devices)
        self.batch_size = self.buckets[-1]
        self.micro_batch = default_micro_batch() if micro_batch == -1 else micro_batch
        self.compile_count = 0
        self.compile_seconds: dict[tuple[int, int, int], float] = {}

        graphdef, params = nnx.split(net)
        params = self.policy.cast_params(params)
        self.batch_sharding = NamedSharding(self.mesh, P(DATA_AXIS))
        # each weight's partition spec: P() (a full copy per device), or with shard_weights split along
        # its largest dimension that the device count divides (FSDP-style: gathered inside each call)
        self.param_specs = jax.tree_util.tree_map(
            lambda leaf: fsdp_spec(leaf.shape, self.num_devices) if shard_weights else P(), params
        )
        self.params = jax.tree_util.tree_map(self._place, params, self.param_specs)
        per_device = _pure_fn(graphdef, self.policy, features, self.micro_batch, on_trace=self._count_trace)
        if shard_weights:
            per_device = _gathering(per_device, self.param_specs)
        sharded = jax.shard_map(
            per_device, mesh=self.mesh, in_specs=(self.param_specs, P(DATA_AXIS)), out_specs=P(DATA_AXIS)
        )
        self._jitted = jax.jit(sharded)
        self._compiled: dict[tuple[int, int, int], Any] = {}
        # pixels travel as float32 in both modes: the bf16 path casts them on the device, in the patch
        # projection's matmul (a numpy cast on the host would cost host time in the decode loop)
        self.input_dtype = jnp.float32

    # set-up ---------------------------------------------------------------------------------------------
    def _place(self, leaf: jax.Array, spec: P) -> jax.Array:
        # a replicated array spanning several processes is read through one of its local copies
        remote = isinstance(leaf, jax.Array) and not leaf.is_fully_addressable
        host = np.asarray(leaf.addressable_data(0) if remote else leaf)
        sharding = NamedSharding(self.mesh, spec)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    def load_weights(self, net: ViT) -> None:
        """Put ``net``'s weights (the structure this Embedder was built with) in place of its own, cast by its
        policy and laid out as its own, so the compiled functions run on them without recompiling (the
        k-NN monitor of pre-training embeds each new encoder this way)."""
        _, params = nnx.split(net)
        params = self.policy.cast_params(params)
        if jax.tree_util.tree_structure(params) != jax.tree_util.tree_structure(self.params):
            raise UserError("the encoder's structure differs from the one the Embedder was compiled for")
        self.params = jax.tree_util.tree_map(self._place, params, self.param_specs)

    def _count_trace(self) -> None:
        self.compile_count += 1

    def _check_images(self, images: Any) -> np.ndarray | jax.Array:
        if isinstance(images, jax.Array) and self.num_processes == 1:
            x = images.astype(jnp.float32)  # already on a device: stays there
        else:
            x = np.asarray(images, dtype=np.float32)
        c = self.cfg.in_channels
        if x.ndim != 4 or x.shape[-1] != c:
            raise UserError(f"expected images as (N, H, W, {c}), got shape {tuple(x.shape)}")
        p = self.cfg.patch_size
        if x.shape[1] % p or x.shape[2] % p or x.shape[1] == 0 or x.shape[2] == 0:
            raise UserError(
                f"image size {x.shape[1]}x{x.shape[2]} is not a positive multiple of the patch size {p}"
            )
        return x

    def bucket_for(self, n: int) -> int:
        """The global bucket for ``n`` rows of this process (``n * num_processes`` rows in all)."""
        total = n * self.num_processes
        return next(b for b in self.buckets if b >= total)

    def compiled(self, bucket: int, height: int, width: int) -> Any:
        """The executable for one global bucket and image size, compiled ahead of time on first use."""
        key = (bucket, height, width)
        exe = self._compiled.get(key)
        if exe is None:
            start = time.perf_counter()
            spec = jax.ShapeDtypeStruct(
                (bucket, height, width, self.cfg.in_channels), self.input_dtype, sharding=self.batch_sharding
            )
            exe = self._jitted.lower(self.params, spec).compile()
            self.compile_seconds[key] = time.perf_counter() - start
            self._compiled[key] = exe
        return exe

    def warmup(
        self, height: int | None = None, width: int | None = None, buckets: Iterable[int] | None = None
    ) -> float:
        """Compile every bucket (or those given) for one image size; returns the seconds it took."""
        h, w = self.cfg.image_size if height is None else (height, width or height)
        start = time.perf_counter()
        for b in self.buckets if buckets is None else buckets:
            self.compiled(b, h, w)
        return time.perf_counter() - start

    # running --------------------------------------------------------------------------------------------
    def _local_rows(self, y: jax.Array) -> np.ndarray:
        if self.num_processes == 1:
            return np.asarray(y)
        return np.asarray(multihost_utils.global_array_to_host_local_array(y, self.mesh, P(DATA_AXIS)))

    def embed_async(self, images: Any, *, full_batches: bool = False) -> PendingEmbedding:
        """Start embedding ``images`` (this process's rows) and return at once; ``.result()`` waits.

        The pixels are sent to the devices and the computation is queued before this returns, so the caller
        can decode the next batch meanwhile. ``full_batches=True`` pads every chunk to ``batch_size`` rather
        than to the smallest bucket: one compiled shape for any number of images (each image is embedded on
        its own, so padding changes no real row).
        """
        x = self._check_images(images)
        n, h, w = x.shape[:3]
        outputs: list[tuple[jax.Array, int]] = []
        local_max = self.batch_size // self.num_processes
        for start in range(0, n, local_max):
            chunk = x[start : start + local_max]
            bucket = self.batch_size if full_batches else self.bucket_for(len(chunk))
            local_bucket = bucket // self.num_processes
            exe = self.compiled(bucket, h, w)
            if isinstance(chunk, jax.Array):
                padded = jnp.pad(chunk, ((0, local_bucket - len(chunk)), (0, 0), (0, 0), (0, 0)))
                device_x = jax.device_put(padded, self.batch_sharding)
            else:
                if len(chunk) == local_bucket:
                    padded = chunk  # no copy for a full batch
                else:
                    padded = np.zeros((local_bucket, h, w, x.shape[3]), np.float32)
                    padded[: len(chunk)] = chunk  # (local bucket, H, W, C), zero rows after the real ones
                device_x = jax.make_array_from_process_local_data(self.batch_sharding, padded)
            outputs.append((exe(self.params, device_x), len(chunk)))
        return PendingEmbedding(outputs, self, self.output_shape(h, w))

    def __call__(self, images: Any, *, full_batches: bool = False) -> np.ndarray:
        """Embed ``images`` (N, H, W, C) float32: float32 numpy rows, one per image, in order."""
        return self.embed_async(images, full_batches=full_batches).result()

    def stream(self, batches: Iterable[Any]) -> Iterator[np.ndarray]:
        """Embed a stream of image batches, keeping one batch in flight while the next is produced."""
        pending: PendingEmbedding | None = None
        for images in batches:
            current = self.embed_async(images)
            if pending is not None:
                yield pending.result()
            pending = current
        if pending is not None:
            yield pending.result()

    def output_shape(self, height: int, width: int) -> tuple[int, ...]:
        """The shape of one image's output at this input size (without the batch axis)."""
        p = self.cfg.patch_size
        patches = (height // p) * (width // p)
        d = self.cfg.hidden_dim
        if self.features == "cls":
            return (d,)
        if self.features == "patches":
            return (patches, d)
        return (self.cfg.num_special_tokens + patches, d)
