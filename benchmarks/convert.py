"""Converting the full vit_reg4_b16 (85.8 M parameters): wall time and peak memory against the file size.

    .venv/bin/python benchmarks/convert.py              # 3 runs of each command, ~2 minutes on 2 cores
    .venv/bin/python benchmarks/convert.py --runs 1 --keep /tmp/bench   # keep the files for a look

The weights are birder's own randomly initialised ``vit_reg4_b16`` (``torch.manual_seed(0)``), saved by birder
(``fs_ops.checkpoint_model`` for the ``.pt``, ``fs_ops.save_st`` for the ``.safetensors``). Every measured
command runs as a fresh process, exactly as a user runs it (``python -m vitreg_jax ...``), and its peak
resident memory is the kernel's ``ru_maxrss`` for that child (``os.wait4``): imports, libraries and all. Wall
time is the median of the runs; peak RSS the largest.

For scale, the same run measures (a) birder loading the same file (``birder.load_model_with_cfg``), (b) the
``.pt`` path vitreg-jax had before its own torch-free reader (``torch.load(weights_only=True)`` in a child
process, kept in ``tests/support/torch_pt_reader.py`` for this comparison), and (c) the straightforward
conversion this project started from: ``torch.load(weights_only=True)`` -> numpy -> the mapping table ->
``orbax PyTreeCheckpointer().save`` with Orbax's defaults. The cases run in turn within each round, so a
neighbour's load on a shared machine hits them alike.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
NET = "vit_reg4_b16"
SIZE = (224, 224)
RGB = {"mean": (0.5191, 0.5306, 0.4877), "std": (0.2316, 0.2304, 0.2588)}

MAKE_FILES = f"""
import logging, sys
logging.disable(logging.INFO)
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
from pathlib import Path
import torch
from birder.common import fs_ops
from birder.conf import settings
from birder.model_registry import registry
out = Path(sys.argv[1])
torch.manual_seed(0)
net = registry.net_factory("{NET}", 0, 3, size={SIZE})
sig = {{"inputs": [{{"data_shape": [0, 3, {SIZE[0]}, {SIZE[1]}]}}], "outputs": [{{"data_shape": [0, 0]}}]}}
settings.MODELS_DIR = out
fs_ops.checkpoint_model("{NET}_mim", 200, net, sig, {{}}, {RGB!r}, None, None, None, None)
fs_ops.write_config("{NET}_mim", net, sig, {RGB!r})
fs_ops.save_st(net, str(out / "{NET}_mim_200.safetensors"), net.task, {{}}, sig, {RGB!r})
"""

BIRDER_LOAD = """
import logging, sys
logging.disable(logging.INFO)
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
import birder
net, cfg = birder.load_model_with_cfg(sys.argv[1], sys.argv[2])
"""

NAIVE_CONVERT = """
import sys
import jax, numpy as np, orbax.checkpoint as ocp, torch
from pathlib import Path
from vitreg_jax import preset
from vitreg_jax.convert import mapping  # the key table itself: the naive conversion measured is built on it
loaded = torch.load(sys.argv[1], map_location="cpu", weights_only=True)
state = {k: v.numpy() for k, v in loaded["state"].items()}
params = mapping.to_nnx(state, preset("vit_reg4_b16"))
tree = {}
for path, a in params.items():
    node = tree
    for k in path[:-1]:
        node = node.setdefault(str(k), {})
    node[path[-1]] = a
ocp.PyTreeCheckpointer().save(Path(sys.argv[2]).absolute(), tree)
"""


def cpu_flags() -> str:
    """The CPU model, core count and the vector flags that decide XLA:CPU's speed."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return f"{os.cpu_count()} CPUs"
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
    model = next(
        (ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "?"
    )
    vector = sorted(f for f in flags if f.startswith(("avx512", "amx")) or f == "avx2")
    return f"{model}, {os.cpu_count()} CPUs ({' '.join(vector) or 'no avx2/avx512/amx'})"


def measure(argv: list[str], *, cwd: Path = ROOT) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode() if proc.stderr else ""
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(argv)}\n{err}")
    return wall, usage.ru_maxrss / 1024  # KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temporary one)")
    ap.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="vitreg-convert-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    try:
        pt, st, cfg = (
            work / f"{NET}_mim_200.pt",
            work / f"{NET}_mim_200.safetensors",
            work / f"{NET}_mim.json",
        )
        if not pt.exists():
            print(f"writing birder's {NET} (seed 0) to {work} ...", flush=True)
            subprocess.run([py, "-c", MAKE_FILES, str(work)], check=True, cwd=ROOT)
        cases: list[tuple[str, Path, Any]] = [
            (
                "vitreg-jax convert .pt",
                pt,
                lambda o: [py, "-m", "vitreg_jax", "convert", str(pt), "--out", str(o), "--force"],
            ),
            (
                "(before) convert .pt via torch.load in a child",
                pt,
                lambda o: [
                    py,
                    "-m",
                    "tests.support.torch_pt_reader",
                    "convert",
                    str(pt),
                    "--out",
                    str(o),
                    "--force",
                ],
            ),
            (
                "vitreg-jax convert .safetensors",
                st,
                lambda o: [py, "-m", "vitreg_jax", "convert", str(st), "--out", str(o), "--force"],
            ),
            (
                "vitreg-jax export Orbax -> .pt",
                pt,
                lambda o: [
                    py,
                    "-m",
                    "vitreg_jax",
                    "export",
                    str(work / "ckpt_pt"),
                    "--out",
                    str(o) + ".pt",
                    "--force",
                ],
            ),
            (
                "(reference) birder.load_model_with_cfg .pt",
                pt,
                lambda o: [py, "-c", BIRDER_LOAD, str(cfg), str(pt)],
            ),
            (
                "(before) torch.load -> numpy -> orbax defaults",
                pt,
                lambda o: [py, "-c", NAIVE_CONVERT, str(pt), str(o)],
            ),
        ]
        subprocess.run(
            [py, "-m", "vitreg_jax", "convert", str(pt), "--out", str(work / "ckpt_pt"), "--force"],
            check=True,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
        )
        walls: dict[str, list[float]] = {name: [] for name, _, _ in cases}
        peaks: dict[str, list[float]] = {name: [] for name, _, _ in cases}
        for i in range(args.runs):
            for k, (name, _, command) in enumerate(cases):
                out = work / f"out_{k}_{i}"
                wall, peak = measure(command(out))
                walls[name].append(wall)
                peaks[name].append(peak)
                if out.is_dir():
                    shutil.rmtree(out)
                for extra in (out.with_name(out.name + ".pt"), out.with_name(out.name + ".json")):
                    extra.unlink(missing_ok=True)
        results = []
        for name, src, _ in cases:
            size = src.stat().st_size / 2**20
            results.append(
                {
                    "case": name,
                    "file_mib": round(size, 1),
                    "wall_s": round(statistics.median(walls[name]), 2),
                    "wall_min_max_s": [round(min(walls[name]), 2), round(max(walls[name]), 2)],
                    "peak_rss_mib": round(max(peaks[name])),
                    "peak_over_file": round(max(peaks[name]) / size, 2),
                }
            )
            r = results[-1]
            print(
                f"{name:<48} file {r['file_mib']:6.1f} MiB  wall median {r['wall_s']:5.2f} s "
                f"({r['wall_min_max_s'][0]:.2f}-{r['wall_min_max_s'][1]:.2f})  peak RSS "
                f"{r['peak_rss_mib']:5d} MiB = {r['peak_over_file']:.2f} x file",
                flush=True,
            )
        machine = f"{platform.machine()}, {cpu_flags()}, Python {platform.python_version()}"
        print(f"machine: {machine}; runs per case: {args.runs}")
        if args.json:
            print(json.dumps({"machine": machine, "runs": args.runs, "results": results}))
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
