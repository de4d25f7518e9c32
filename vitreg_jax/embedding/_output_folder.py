"""The output folder of a dataset-embedding run: what it holds, whether a run may write there, its state.

A run records its identity (what it computes: format, checkpoint, size, dtype, features, the shards) in
``DIR/.vitreg-jax-embed/run.json`` (:data:`STATE_DIR`), next to the npy run's parts. :func:`start_run` is
called by process 0 while it holds the folder's lock (:class:`vitreg_jax._locks.FolderLock`):

- a ``meta.json`` / ``manifest.json`` that this tool did not write: refused;
- a finished run with the same identity: "complete" (nothing to do); with another identity: refused;
- an unfinished run (``run.json``) with the same identity: "resume"; with another identity: refused;
- no run yet: refused if any file of the format's output names is already there (the user's own
  ``meta.json``, ``paths.txt``, ``failed.txt``, ``sources.txt``, ``embeddings.npy``; ``manifest.json`` or a
  ``part-*.parquet``), since embed never overwrites a file it did not write; else "fresh".
For "fresh" and "resume" it writes ``run.json`` and removes the temporary files of interrupted writes.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vitreg_jax.embedding.outputs import (
    MANIFEST_FILE,
    META_FILE,
    NPY_FILES,
    NPY_FORMAT,
    PARQUET_FORMAT,
    PART_GLOB,
)
from vitreg_jax.errors import UserError
from vitreg_jax.fileio import atomic_write_json, make_dir, read_json_object_or_none

STATE_DIR = ".vitreg-jax-embed"
RUN_FILE = "run.json"


def differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> str:
    """The keys whose values differ, for a message."""
    return ", ".join(sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))) or "nothing"


def check_folder(out: Path, fmt: str, ident: Mapping[str, Any]) -> str:
    """ "complete", "resume" or "fresh" (see the module docstring); ``UserError`` when refused."""
    for marker in (META_FILE, MANIFEST_FILE):
        if not (out / marker).exists():
            continue
        done = read_json_object_or_none(out / marker)
        if done is None or done.get("format") not in (NPY_FORMAT, PARQUET_FORMAT):
            raise UserError(
                f"{out} holds a {marker} that vitreg-jax embed did not write; choose another --out"
            )
        if done.get("status") == "complete" and done.get("run") == ident:
            return "complete"
        if done.get("status") == "complete":
            raise UserError(
                f"{out} already holds embeddings of another run (differs in "
                f"{differences(done.get('run') or {}, ident)}); choose another --out or remove it"
            )
    previous = read_json_object_or_none(out / STATE_DIR / RUN_FILE)
    if previous is not None:
        if previous != ident:
            raise UserError(
                f"{out} holds an unfinished run with other settings (differs in "
                f"{differences(previous, ident)}); rerun that command to finish it, or choose another --out"
            )
        return "resume"
    if fmt == "npy":
        foreign = [name for name in NPY_FILES if (out / name).exists()]
    else:
        foreign = [MANIFEST_FILE] if (out / MANIFEST_FILE).exists() else []
        foreign += sorted(p.name for p in out.glob(PART_GLOB))[:3]
    if foreign:
        raise UserError(
            f"{out} holds {', '.join(foreign)} that this run did not write; choose another --out "
            "(embed never overwrites files it did not write)"
        )
    return "fresh"


def remove_stale_temporaries(out: Path) -> None:
    """Files of an interrupted write (``vitreg_jax.fileio`` names them ``.NAME.XXXX.tmp``), ours only."""
    names = [*NPY_FILES, MANIFEST_FILE, "part-"]
    for folder in (out, out / STATE_DIR):
        for stale in folder.glob(".*.tmp"):
            if any(stale.name.startswith(f".{n}") for n in names):
                stale.unlink(missing_ok=True)


def start_run(out: Path, fmt: str, ident: Mapping[str, Any]) -> str:
    """:func:`check_folder`, then for a run to do: the state folder, ``run.json``, no stale temporaries."""
    status = check_folder(out, fmt, ident)
    if status != "complete":
        make_dir(out / STATE_DIR)
        atomic_write_json(out / STATE_DIR / RUN_FILE, dict(ident), sort_keys=True)
        remove_stale_temporaries(out)
    return status


def end_run(out: Path) -> None:
    """Remove the state folder (the run is complete: its marker file is written)."""
    shutil.rmtree(out / STATE_DIR, ignore_errors=True)
