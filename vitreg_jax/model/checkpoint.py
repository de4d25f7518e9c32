"""vitreg-jax checkpoints: an Orbax PyTree of plain arrays plus a readable ``metadata.json``.

Layout of a checkpoint directory::

    DIR/metadata.json   format, ViTConfig, birder's config (name, model_config, signature, rgb_stats),
                        dtype, provenance (source file, its sha256, birder and converter versions)
    DIR/params/         Orbax PyTree: a nested dict of arrays whose keys are the model's parameter paths
                        (list indices as strings), e.g. params/encoder/block/0/attn/qkv/kernel

The weights restore as numpy arrays with no model code and on any device topology, CPU included.
A directory is written under a temporary name and renamed when complete, so a failed save leaves nothing.
Folders get ``0777 & ~umask`` and files ``0666 & ~umask``, like any other tool's output.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from vitreg_jax import _locks
from vitreg_jax.errors import UserError
from vitreg_jax.fileio import atomic_write_json, first_line, read_json_object, umask

if TYPE_CHECKING:
    import orbax.checkpoint as ocp

FORMAT = "vitreg-jax-checkpoint/1"
METADATA_FILE = "metadata.json"
PARAMS_DIR = "params"


def is_checkpoint(path: str | os.PathLike[str]) -> bool:
    p = Path(path)
    return p.is_dir() and (p / METADATA_FILE).is_file() and (p / PARAMS_DIR).is_dir()


def _str_keys(tree: Mapping[Any, Any]) -> dict[str, Any]:
    return {str(k): _str_keys(v) if isinstance(v, Mapping) else np.asarray(v) for k, v in tree.items()}


def _checkpointer() -> ocp.Checkpointer:
    """A synchronous, process-local PyTree checkpointer whose numpy handler does not deep-copy every array.

    Orbax copies host arrays by default to guard asynchronous saves against later mutation; this save is
    synchronous, so that copy only doubled the peak memory of `vitreg-jax convert` (a whole model's worth).
    The weights are host arrays that this process writes alone (e.g. process 0 of a multi-process
    ``pretrain`` exporting its encoder), so Orbax must not wait for the other processes at its barriers.
    """
    import orbax.checkpoint as ocp

    me = jax.process_index()
    local = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
    registry = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
        (jax.Array, ocp.type_handlers.get_type_handler(jax.Array)),
    )  # unused; keeps Orbax from warning
    handler = ocp.PyTreeCheckpointHandler(type_handler_registry=registry, multiprocessing_options=local)
    return ocp.Checkpointer(handler, multiprocessing_options=local)


def save_checkpoint(
    directory: str | os.PathLike[str],
    params: Mapping[Any, Any],
    metadata: Mapping[str, Any],
    *,
    force: bool = False,
) -> Path:
    """Write ``params`` (nested dict of arrays) and ``metadata`` to ``directory`` atomically.

    An existing ``directory`` is refused unless ``force``; then it is replaced only once the new one is whole.
    """
    import orbax.checkpoint as ocp

    out = Path(directory).absolute()
    if out.exists() and not force:
        raise UserError(f"{out}: already exists (pass --force to replace it)")
    if out.exists() and not is_checkpoint(out) and any(out.iterdir()):
        raise UserError(f"{out}: exists and is not a vitreg-jax checkpoint; refusing to replace it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _locks.remove_stale(out)  # left by runs that were killed before they could clean up
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=_locks.SUFFIX, dir=out.parent))
        held = _locks.hold(tmp)  # while this process lives, no other run takes tmp for stale
    except OSError as e:
        raise UserError(f"{out.parent}: cannot write there ({e.strerror or first_line(e)})") from None
    try:
        tmp.chmod(0o777 & ~umask())  # mkdtemp's 0700 would make the checkpoint private to its writer
        _checkpointer().save(tmp / PARAMS_DIR, args=ocp.args.PyTreeSave(_str_keys(params)))
        atomic_write_json(tmp / METADATA_FILE, {"format": FORMAT, **metadata})
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        _locks.release(held)
    return out


def read_metadata(directory: str | os.PathLike[str]) -> dict[str, Any]:
    d = Path(directory)
    if not d.exists():
        raise UserError(f"{d}: no such checkpoint directory")
    if not is_checkpoint(d):
        raise UserError(
            f"{d}: not a vitreg-jax checkpoint (expected {METADATA_FILE} and {PARAMS_DIR}/ inside)"
        )
    meta = read_json_object(d / METADATA_FILE, "a vitreg-jax checkpoint's metadata")
    if meta.get("format") != FORMAT:
        raise UserError(f"{d}: unknown checkpoint format {meta.get('format')!r} (expected {FORMAT!r})")
    return meta


def restore_params(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The weights as a nested dict of numpy arrays (string keys), on the host, whatever saved them."""
    import orbax.checkpoint as ocp

    d = Path(directory).absolute()  # Orbax wants absolute paths
    read_metadata(d)
    ckptr = ocp.PyTreeCheckpointer()
    try:
        item = ckptr.metadata(d / PARAMS_DIR).item_metadata
        if item is None:  # Orbax found no readable tree metadata (it only logs a warning)
            raise UserError(
                f"{d}: the weights could not be restored (damaged checkpoint?): no readable "
                f"{PARAMS_DIR}/_METADATA"
            )
        args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item.tree)
        return ckptr.restore(d / PARAMS_DIR, restore_args=args)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise UserError(
            f"{d}: the weights could not be restored (damaged checkpoint?): {first_line(e)}"
        ) from None


def load_checkpoint(directory: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(params, metadata) of a checkpoint directory."""
    return restore_params(directory), read_metadata(directory)
