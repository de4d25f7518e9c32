"""Running ``vitreg-jax pretrain`` in tests: a tiny MAE's arguments, the environment of a fresh process that
shares one compilation cache, and the one-line error check."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.support.tiny_models import TINY_MAE_DECODER, TINY_MAE_ENCODER
from vitreg_jax.cli import main as cli
from vitreg_jax.data.rgb_stats import named_rgb_stats

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "examples" / "images"


STATS = named_rgb_stats("birder")
CLI_TIMEOUT_S = 300


# the command ---------------------------------------------------------------------------------------------
def pretrain_args(out: Path, steps: int = 8) -> list[str]:
    model_config = [f"{k}={v}" for k, v in TINY_MAE_ENCODER.items()]
    mae_config = [f"{k}={v}" for k, v in TINY_MAE_DECODER.items()]
    return [
        "pretrain",
        "--data",
        str(IMAGES),
        "--out",
        str(out),
        "--network",
        "vit_reg4_b16",
        "--model-config",
        *model_config,
        "--mae-config",
        *mae_config,
        "--size",
        "32",
        "--steps",
        str(steps),
        "--batch-size",
        "4",
        "--lr",
        "1e-3",
        "--checkpoint-every",
        "3",
        "--log-every",
        "1",
        "--workers",
        "2",
        "--no-progress",
    ]


def cli_env(cache: Path) -> dict[str, str]:
    return {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_backend_optimization_level=0",
        "JAX_COMPILATION_CACHE_DIR": str(cache),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }


def run_cli(args: list[str], cache: Path, kill_at_step: int | None = None) -> subprocess.CompletedProcess:
    """``python -m vitreg_jax`` in a fresh process sharing one persistent compilation cache; with
    ``kill_at_step``, the process SIGKILLs itself when the loop asks for that step
    (``tests/support/kill_run.py``)."""
    env = cli_env(cache)
    runner = (
        ["vitreg_jax"]
        if kill_at_step is None
        else ["tests.support.kill_run", "pretrain-step", str(kill_at_step), "--"]
    )
    return subprocess.run(
        [sys.executable, "-m", *runner, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        cwd=ROOT,
        check=False,
    )


def cli_error(args: list[str], capsys) -> str:
    try:
        code = cli.main(args)
    except SystemExit as e:  # argparse's own checks (ours print one line too)
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err
