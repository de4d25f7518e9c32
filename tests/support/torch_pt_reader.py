"""The ``.pt`` path vitreg-jax used before its own reader, kept for comparison only (never shipped).

``torch.load(weights_only=True)`` runs in a child process that hands the tensors back through a temporary
``.safetensors`` (so the converting process never imported torch). Run any ``vitreg-jax`` command with it in
place of :func:`vitreg_jax.convert.formats.pt_reader.read_pt`, e.g. for a before/after benchmark in the same
run:

    .venv/bin/python -m tests.support.torch_pt_reader convert FILE.pt --out DIR      # the old path
    .venv/bin/python -m vitreg_jax convert FILE.pt --out DIR                 # today's
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from vitreg_jax.errors import UserError

CHILD = """
import json, sys
import ml_dtypes, torch
from vitreg_jax.convert.formats.safetensors_io import write_safetensors
obj = torch.load(sys.argv[1], map_location="cpu", weights_only=True)
def arr(t):
    t = t.detach().contiguous()
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16) if t.dtype == torch.bfloat16 else t.numpy()
write_safetensors(sys.argv[2] + "/state.safetensors", {k: arr(v) for k, v in obj["state"].items()}, {})
def plain(o):
    if isinstance(o, dict):
        return {str(k): plain(v) for k, v in o.items()}
    return [plain(v) for v in o] if isinstance(o, (list, tuple)) else o
json.dump(plain({k: v for k, v in obj.items() if k != "state"}), open(sys.argv[2] + "/meta.json", "w"))
"""


def read_pt_with_torch(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    from vitreg_jax.convert.formats.safetensors_io import read_safetensors

    with tempfile.TemporaryDirectory(prefix="vitreg-pt-") as tmp:
        done = subprocess.run(
            [sys.executable, "-c", CHILD, str(path), tmp], capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise UserError(f"{path}: torch.load failed: {done.stderr.strip().splitlines()[-1]}")
        state, _ = read_safetensors(Path(tmp) / "state.safetensors")
        meta = json.loads((Path(tmp) / "meta.json").read_text())
    return state, meta


def main(argv: list[str]) -> int:
    from vitreg_jax.cli import main as cli
    from vitreg_jax.convert.formats import birder_file as readers

    readers.read_pt = read_pt_with_torch  # read_birder_file looks it up at call time
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
