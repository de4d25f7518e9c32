"""Files that an old birder release writes itself (legacy key layout, legacy json) load with our numbers.

birder 0.3.3 named the encoder block's parts ``ln1`` / ``self_attention`` (torch's MultiheadAttention,
``in_proj_weight``) / ``ln2`` and wrote ``alias`` in its json instead of ``registered_name``. That release is
unpacked with ``--no-deps`` into a folder of its own (``make`` puts it in ``.venv/birder-0.3.3``; the
``VITREG_JAX_LEGACY_BIRDER`` variable may point elsewhere) and run in a child process beside today's torch, so
the files and the reference embeddings come from old birder itself, not from inverting our rename table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.support.legacy_birder import LEGACY_VERSION, WRITER, legacy_birder_dir
from tests.support.report import REQUIRE_BIRDER, record
from tests.support.tiny_models import TINY_BIRDER
from tests.support.tolerances import EMBEDDING_ATOL

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def legacy_dir() -> Path:
    folder = legacy_birder_dir()
    if not (folder / "birder").is_dir():
        message = (
            f"birder {LEGACY_VERSION} is not unpacked in {folder} "
            f"(pip install --no-deps --target {folder} birder=={LEGACY_VERSION})"
        )
        if REQUIRE_BIRDER:
            pytest.fail(message)
        pytest.skip(message)
    return folder


def write_with_legacy_birder(
    legacy: Path, out: Path, network: str, config: dict | None, x: np.ndarray
) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "input.npy", x)
    env = {**os.environ, "PYTHONPATH": str(legacy)}
    proc = subprocess.run(
        [sys.executable, str(WRITER), str(out), network, "0", json.dumps(config) if config else "-"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["birder_version"].lstrip("v") == LEGACY_VERSION  # the old release ran, not today's
    return summary


@pytest.mark.parametrize(
    "network, config",
    [("vit_reg4_b16", TINY_BIRDER), pytest.param("vit_reg4_b16", None, marks=pytest.mark.slow)],
    ids=["tiny", "full"],
)
def test_files_written_by_birder_0_3_3_load_with_its_numbers(
    legacy_dir: Path, tmp_path: Path, network: str, config: dict | None
) -> None:
    import vitreg_jax

    x = np.random.default_rng(3).standard_normal((2, 224, 224, 3)).astype(np.float32)
    summary = write_with_legacy_birder(legacy_dir, tmp_path, network, config, x)
    # the file really is in the legacy layouts this test is about
    assert any(".ln1." in k for k in summary["keys"]) and any(
        "self_attention.in_proj_weight" in k for k in summary["keys"]
    )
    assert "alias" in summary["json_keys"] and "registered_name" not in summary["json_keys"]
    theirs = np.load(tmp_path / "embedding.npy")

    net, cfg = vitreg_jax.load_model_with_cfg(tmp_path / summary["config"], tmp_path / summary["weights"])
    assert cfg["registered_name"] == network
    ours = np.asarray(net.embedding(x))
    diff = float(np.max(np.abs(ours - theirs)))
    record(f"birder {LEGACY_VERSION} file, {network} {'tiny' if config else 'full'}", "embedding", diff)
    assert diff <= EMBEDDING_ATOL, f"max |diff| {diff:.2e} against birder {LEGACY_VERSION}'s own embedding"

    # and through the command line: convert the old file, then load the Orbax checkpoint
    ckpt = tmp_path / "ckpt"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "vitreg_jax",
            "convert",
            str(tmp_path / summary["weights"]),
            "--config",
            str(tmp_path / summary["config"]),
            "--out",
            str(ckpt),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    net2, _ = vitreg_jax.load_model_with_cfg(None, ckpt)
    np.testing.assert_array_equal(np.asarray(net2.embedding(x)), ours)
