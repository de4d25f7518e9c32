"""A birder file or published weight name -> a vitreg-jax checkpoint directory: the library behind
``convert``.

``convert_to_checkpoint(src, out)`` decides the architecture (``convert/architecture.py``), maps the tensors
through the one table, optionally compares our embedding with birder's on a fixed input first (``verify``:
nothing is written when they differ by more than ``tolerance``), and saves the checkpoint with its provenance.
Progress lines (source, architecture, metadata notes, the verification) go to ``report`` as they happen.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vitreg_jax.convert import mapping, verify
from vitreg_jax.convert.architecture import Architecture, load_source
from vitreg_jax.convert.infer import describe
from vitreg_jax.convert.json_meta import json_safe
from vitreg_jax.convert.output_paths import check_new_path, parents_made_for

if TYPE_CHECKING:
    import numpy as np

    from vitreg_jax.convert.formats.birder_file import BirderFile
    from vitreg_jax.convert.hub import Resolved
    from vitreg_jax.tree import ParamPath


@dataclass(frozen=True)
class Converted:
    """What ``convert_to_checkpoint`` did: ``out`` is None when the verification failed (nothing written)."""

    out: Path | None
    architecture: Architecture
    verification: verify.Verification | None
    parameters: int
    tensors: int
    nbytes: int
    dtype: str  # the stored dtype, or "mixed"


def convert_to_checkpoint(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    config: str | os.PathLike[str] | None = None,
    network: str | None = None,
    force: bool = False,
    verify_with_birder: bool = False,
    tolerance: float = verify.VERIFY_ATOL,
    report: Callable[[str], object] = print,
) -> Converted:
    """Convert ``src`` (a birder ``.pt`` / ``.safetensors`` or a published name) into the checkpoint
    ``out``."""
    from vitreg_jax.model.build import checkpoint_metadata
    from vitreg_jax.model.checkpoint import save_checkpoint
    from vitreg_jax.tree import unflatten

    out = Path(out)
    check_new_path(out, force, "directory")
    resolved, bfile, arch = load_source(str(src), None if config is None else str(config), network)
    report(source_line(bfile, resolved, arch))
    report(f"architecture {arch.cfg['registered_name']} (from {arch.source}): {describe(arch.vit_cfg)}")
    for note in arch.notes:
        report(f"             {note}")
    dtypes = bfile.dtypes
    extra = {
        "source_layout": arch.layout,
        "architecture_source": arch.source,
        "converted_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    if resolved.name is not None:
        extra["published_name"] = resolved.name
    meta = checkpoint_metadata(
        arch.vit_cfg, arch.cfg, source=bfile, dtype=dtypes[0] if len(dtypes) == 1 else "mixed", extra=extra
    )
    meta["birder_meta"], changed = json_safe(
        {k: v for k, v in bfile.meta.items() if k not in ("signature", "rgb_stats")}
    )
    for note in changed:  # extra entries of the file that JSON cannot hold as they are
        report(f"metadata     {note}")

    state, _ = mapping.normalize_keys(bfile.state, arch.vit_cfg.num_layers)
    bfile.state = {}  # hand the arrays over: to_nnx drops each source array once converted
    x = theirs = None
    if verify_with_birder:
        mapping.to_nnx(state, arch.vit_cfg)  # a mismatch is a user error before birder gets to see it
        x = verify.fixed_input(arch.vit_cfg.image_size, arch.vit_cfg.in_channels)
        theirs = verify.birder_embedding_from_state(arch.cfg, arch.cfg["registered_name"], state, x)
    params = mapping.to_nnx(state, arch.vit_cfg, consume=True)
    del state
    counts = {
        "parameters": sum(int(a.size) for a in params.values()),
        "tensors": len(params),
        "nbytes": sum(int(a.nbytes) for a in params.values()),
        "dtype": meta["dtype"],
    }
    result = None
    if verify_with_birder:
        result = _compare(params, arch, x, theirs, tolerance)
        report(result.line())
        if not result.ok:
            return Converted(out=None, architecture=arch, verification=result, **counts)

    with parents_made_for(out):
        save_checkpoint(out, unflatten(params), meta, force=force)
    return Converted(out=out, architecture=arch, verification=result, **counts)


def source_line(bfile: BirderFile, resolved: Resolved, arch: Architecture) -> str:
    """One line for people: the file, where it came from, its format, key layout, dtypes and sha256."""
    what = f"published {resolved.name}, " if resolved.name else ""
    version = bfile.meta.get("birder_version")
    return (
        f"source       {bfile.path} ({what}birder .{bfile.format}{f' {version}' if version else ''}, "
        f"key layout {arch.layout}, {'/'.join(bfile.dtypes)}, sha256 {bfile.sha256[:12]}...)"
    )


def _compare(
    params: Mapping[ParamPath, np.ndarray],
    arch: Architecture,
    x: np.ndarray,
    theirs: np.ndarray,
    tolerance: float,
) -> verify.Verification:
    from vitreg_jax.model.build import abstract_model, set_params

    net = set_params(abstract_model(arch.vit_cfg), params)
    return verify.compare(verify.our_embedding(net, x), theirs, x, tolerance)
