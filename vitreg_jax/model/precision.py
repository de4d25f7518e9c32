"""The compute policy shared by inference (:class:`~vitreg_jax.embedding.embedder.Embedder`) and training
(:class:`~vitreg_jax.pretraining.step.MAETrainer`): the one place that explains the compute dtypes.

A :class:`ComputePolicy` says three things, the same way for embedding and training:

- the compute dtype, one of :data:`DTYPES`. ``float32`` runs every matmul in float32 at ``"highest"``
  precision (:data:`FLOAT32_PRECISION`: no TF32 or bf16 passes on GPU/TPU); ``bfloat16`` stores the matmul
  kernels in bfloat16, so that every matmul takes bfloat16 inputs and accumulates in float32
  (:func:`vitreg_jax.model._kernels.dense`), while LayerNorm, softmax, GELU, biases and the residual stream
  stay float32 (the mixed path that is fast on CPU and GPU alike). Outputs are float32 either way.
- which parameters are cast: the matmul kernels, i.e. every parameter named ``kernel`` (dense layers and the
  patch projection); every other floating parameter (biases, norms, tokens, position embeddings) is float32.
  :meth:`ComputePolicy.cast_params` applies it to an ``nnx.State`` or to a nested dict of arrays alike.
- the matmul precision to trace under: :meth:`ComputePolicy.precision_scope` (a context manager) and
  :meth:`ComputePolicy.under_precision` (a function wrapper) pin ``"highest"`` for float32 and leave the
  ambient setting alone for bfloat16 (whose matmul inputs are bfloat16 anyway).

``"auto"`` (:func:`resolve_dtype`) is bfloat16 on GPU and TPU and on CPUs with native bf16 instructions
(x86 ``avx512_bf16`` or ``amx_bf16``), float32 on every other CPU: without them XLA:CPU emulates bf16 matmuls
and they run slower than float32 (BENCHMARKS.md, "bf16 vs fp32 on an AVX2-only CPU"). On non-x86 CPUs, or
where the flags cannot be read, ``"auto"`` is float32 (never measured faster there; float32 is the exact
choice). :data:`DTYPE_HELP` is the ``--dtype`` help text of the commands.

Importing this module does not import JAX (the commands read :data:`DTYPE_CHOICES` and :data:`DTYPE_HELP`
while parsing arguments, before JAX may start); the functions import it when called.
"""

from __future__ import annotations

import contextlib
import functools
import platform as platform_module
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from vitreg_jax.errors import UserError

if TYPE_CHECKING:
    import jax.numpy as jnp
    from flax import nnx

DTYPES = ("float32", "bfloat16")
AUTO = "auto"
DTYPE_CHOICES = (AUTO, *DTYPES)  # what a dtype argument accepts
# The float32 path's matmul precision: fp32 means fp32 on every backend (no TF32 / bf16 passes).
FLOAT32_PRECISION = "highest"
# The parameters stored in the compute dtype: the matmul kernels (dense layers, the patch projection).
CAST_PARAM_NAME = "kernel"
# /proc/cpuinfo flags of x86 CPUs with native bf16 dot products (AVX512-BF16, AMX-BF16).
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
X86_MACHINES = ("x86_64", "amd64", "i386", "i686", "x86")
CPUINFO_PATH = "/proc/cpuinfo"

DTYPE_HELP = (
    "compute dtype. float32: float32 matmuls at 'highest' precision (exact). bfloat16: bf16 matmul inputs "
    "with float32 accumulation, norms, softmax and master weights (faster where bf16 is native). auto: "
    "bfloat16 on GPU/TPU and on CPUs with native bf16 (AVX512-BF16 or AMX), float32 on other CPUs such as "
    "AVX2-only ones, which emulate bf16 matmuls and run them slower than float32 (measured: BENCHMARKS.md)"
)

F = TypeVar("F", bound=Callable[..., Any])


# "auto" -------------------------------------------------------------------------------------------------
def cpu_has_native_bf16(cpuinfo: str | None = None, machine: str | None = None) -> bool:
    """Whether this CPU has native bf16 dot products (x86 ``avx512_bf16`` or ``amx_bf16`` flags).

    ``cpuinfo`` is the text of ``/proc/cpuinfo`` (read when None, on Linux) and ``machine`` the
    ``platform.machine()`` name (this one when None); both are parameters so that either answer can be
    tested anywhere. False on non-x86 machines and wherever the flags cannot be read.
    """
    machine = platform_module.machine() if machine is None else machine
    if machine.lower() not in X86_MACHINES:
        return False
    if cpuinfo is None:
        if not sys.platform.startswith("linux"):
            return False
        try:
            with open(CPUINFO_PATH, encoding="utf-8", errors="replace") as f:
                cpuinfo = f.read()
        except OSError:
            return False
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return any(flag in value.split() for flag in BF16_CPU_FLAGS)
    return False


def resolve_dtype(dtype: Any, *, platform: str | None = None, cpuinfo: str | None = None) -> str:
    """The compute dtype ``dtype`` names: ``"float32"`` or ``"bfloat16"`` as they are, ``"auto"`` resolved.

    ``"auto"`` is bfloat16 on an accelerator (any ``platform`` but ``"cpu"``) and on a CPU with native bf16
    (:func:`cpu_has_native_bf16`, ``cpuinfo`` passed on to it), float32 otherwise. ``platform`` defaults to
    ``jax.default_backend()``, which starts JAX's backends; callers that must not start them (before
    ``XLA_FLAGS`` is set) pass ``platform="cpu"`` to ask what ``"auto"`` means on this host's CPU.
    A jnp/numpy dtype (``jnp.bfloat16``) is accepted by its name. Anything else is a :class:`UserError`.
    """
    if dtype is not None and not isinstance(dtype, str):
        import jax.numpy as jnp

        try:
            dtype = jnp.dtype(dtype).name
        except TypeError:
            pass
    if dtype in DTYPES:
        return dtype
    if dtype != AUTO:
        raise UserError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {dtype!r}")
    if platform is None:
        import jax

        platform = jax.default_backend()
    if platform != "cpu":
        return "bfloat16"
    return "bfloat16" if cpu_has_native_bf16(cpuinfo) else "float32"


# the policy ---------------------------------------------------------------------------------------------
def param_name(path: tuple[Any, ...]) -> tuple[str | int, ...]:
    """A pytree path as the parameter's name: its dict keys and sequence indices (``("encoder", "block", 0,
    "mlp", "fc1", "kernel")``), without the ``.value`` of an ``nnx.State`` leaf, so that an ``nnx.State``
    and ``nnx.to_pure_dict`` of it name their leaves alike."""
    import jax

    names: list[str | int] = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            names.append(k.key)
        elif isinstance(k, jax.tree_util.SequenceKey):
            names.append(k.idx)
    return tuple(names)


@dataclass(frozen=True)
class ComputePolicy:
    """How a model computes: the dtype, the float32 matmul precision, which parameters are cast.

    >>> policy = ComputePolicy.create("auto")        # resolved here: "float32" or "bfloat16"
    >>> params = policy.cast_params(params)          # kernels in policy.dtype, the rest float32
    >>> fn = policy.under_precision(fn)              # traced at "highest" precision in float32

    ``dtype`` is resolved (one of :data:`DTYPES`); use :meth:`create` to resolve ``"auto"``.
    """

    dtype: str = "float32"
    float32_precision: str = FLOAT32_PRECISION
    cast_param_name: str = CAST_PARAM_NAME

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            hint = " (ComputePolicy.create resolves 'auto')" if self.dtype == AUTO else ""
            raise UserError(
                f"ComputePolicy.dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}{hint}"
            )

    @classmethod
    def create(
        cls, dtype: Any = "float32", *, platform: str | None = None, cpuinfo: str | None = None
    ) -> ComputePolicy:
        """The policy for ``dtype`` (``"auto"`` resolved by :func:`resolve_dtype` for ``platform``)."""
        return cls(resolve_dtype(dtype, platform=platform, cpuinfo=cpuinfo))

    @property
    def compute_dtype(self) -> jnp.dtype:
        """The matmul input dtype, as a jnp dtype."""
        import jax.numpy as jnp

        return jnp.dtype(self.dtype)

    @property
    def matmul_precision(self) -> str | None:
        """``"highest"`` for float32; None (the ambient setting) for bfloat16."""
        return self.float32_precision if self.dtype == "float32" else None

    def precision_scope(self) -> contextlib.AbstractContextManager[Any]:
        """A context that traces matmuls at :attr:`matmul_precision` (enter it inside the jitted function)."""
        import jax

        precision = self.matmul_precision
        return contextlib.nullcontext() if precision is None else jax.default_matmul_precision(precision)

    def under_precision(self, fn: F) -> F:
        """``fn`` run inside :meth:`precision_scope` (wrap the function that ``jax.jit`` traces)."""

        @functools.wraps(fn)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            with self.precision_scope():
                return fn(*args, **kwargs)

        return wrapped  # type: ignore[return-value]

    def is_cast(self, path: tuple[Any, ...]) -> bool:
        """Whether the leaf at ``path`` is a matmul kernel (stored in :attr:`dtype`)."""
        name = param_name(path)
        return bool(name) and name[-1] == self.cast_param_name

    def cast_params(self, params: nnx.State | Any) -> nnx.State | Any:
        """``params`` with every matmul kernel in :attr:`dtype` and every other floating leaf in float32
        (non-floating leaves unchanged); an ``nnx.State`` or a nested dict of arrays."""
        import jax
        import jax.numpy as jnp

        target = self.compute_dtype

        def cast(path: tuple[Any, ...], leaf: Any) -> Any:
            if not jnp.issubdtype(leaf.dtype, jnp.floating):
                return leaf
            return leaf.astype(target if self.is_cast(path) else jnp.float32)

        return jax.tree_util.tree_map_with_path(cast, params)

    def cast_names(self, params: nnx.State | Any) -> set[tuple[str | int, ...]]:
        """The names (:func:`param_name`) of the leaves of ``params`` that :meth:`cast_params` stores in
        :attr:`dtype`."""
        import jax

        leaves = jax.tree_util.tree_leaves_with_path(params)
        return {param_name(path) for path, _ in leaves if self.is_cast(path)}


def choose_policy(
    dtype: Any | None, policy: ComputePolicy | None, *, platform: str | None = None
) -> ComputePolicy:
    """The policy a constructor taking both ``dtype=`` and ``policy=`` runs under: ``policy`` when given,
    else one made from ``dtype`` (float32 when None). When both are given they must agree (``"auto"`` is
    resolved for ``platform`` first); a disagreement is a :class:`UserError`."""
    if policy is None:
        return ComputePolicy.create("float32" if dtype is None else dtype, platform=platform)
    if dtype is not None and resolve_dtype(dtype, platform=platform) != policy.dtype:
        raise UserError(f"dtype {dtype!r} disagrees with the compute policy's {policy.dtype!r}")
    return policy
