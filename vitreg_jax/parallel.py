"""Several devices and processes: the 1-D ``data`` mesh, the collectives that keep processes in step, and
the FSDP-style weight spec.

The mesh is grouped by process, so each process's rows are contiguous rows of the global batch. The
collectives (:func:`gather`, :func:`sync`, :func:`on_every_process`) are no-ops for one process.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from vitreg_jax.errors import UserError

DATA_AXIS = "data"
# weights smaller than this many elements stay whole on every device when weights are sharded
MIN_SHARDED_WEIGHT = 4096
T = TypeVar("T")


# the mesh -----------------------------------------------------------------------------------------------
def default_mesh(devices: Iterable[jax.Device] | None = None) -> Mesh:
    """A 1-D ``data`` mesh over ``devices`` (default: every device of every process), grouped by process
    (each process's devices are contiguous, so its local rows are contiguous rows of the global batch)."""
    devs = sorted(jax.devices() if devices is None else devices, key=lambda d: (d.process_index, d.id))
    if not devs:
        raise UserError("a mesh needs at least one device")
    return Mesh(np.array(devs), (DATA_AXIS,))


def mesh_platform(mesh: Mesh) -> str:
    """The platform of a mesh's devices (``"cpu"``, ``"gpu"``, ``"tpu"``): what ``"auto"`` resolves for."""
    return str(next(iter(mesh.devices.flat)).platform)


# collectives -------------------------------------------------------------------------------------------
def gather(values: Sequence[int]) -> np.ndarray:
    """(processes, len(values)) int64: every process's values (a no-op reshape for one process)."""
    mine = np.asarray(values, np.int64)
    if jax.process_count() == 1:
        return mine[None]
    return np.asarray(multihost_utils.process_allgather(mine)).reshape(jax.process_count(), -1)


def sync(name: str) -> None:
    """A barrier across the processes (nothing for one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def on_every_process(step: Callable[[], T], what: str) -> T:
    """``step()`` on every process; a ``UserError`` on any of them is raised on all (its own message where it
    happened), rather than leaving the others waiting at the next collective."""
    error: UserError | None = None
    result: Any = None
    try:
        result = step()
    except UserError as e:
        error = e
    failed = gather([error is not None])[:, 0]  # (processes,)
    if error is not None:
        raise error
    if failed.any():
        raise UserError(f"process {int(np.flatnonzero(failed)[0])} could not {what}; see its message")
    return result


# FSDP-style sharding -------------------------------------------------------------------------------------
def fsdp_spec(shape: tuple[int, ...], num_devices: int) -> P:
    """Split a weight along its largest dimension that ``num_devices`` divides; small or indivisible ones
    (biases, norms, tokens when they do not divide) stay whole on every device."""
    dims = [i for i, n in enumerate(shape) if n % num_devices == 0 and n >= num_devices]
    if num_devices == 1 or not dims or int(np.prod(shape)) < MIN_SHARDED_WEIGHT:
        return P()
    dim = max(dims, key=lambda i: shape[i])
    return P(*([None] * dim), DATA_AXIS)
