"""Killing ``vitreg-jax convert`` while it reads a large ``.pt`` leaves nothing behind: the reader runs in the
process itself (no child reader to outlive it) and writes no temporary files.

The signal is sent once the process holds the ``.pt`` open (seen in ``/proc/PID/fd``); ``TMPDIR`` points to an
empty folder that must stay empty, and no child process may ever appear.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.birder_files import birder_net, birder_save

pytest.importorskip("torch")
pytest.importorskip("birder")

MEDIUM = {"num_layers": 8, "hidden_dim": 512, "num_heads": 8, "mlp_dim": 2048}  # ~100 MB of fp32 weights

if not Path("/proc/self/fd").is_dir():
    pytest.skip("needs /proc to watch the process", allow_module_level=True)


@pytest.fixture(scope="module")
def big_pt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("big")
    pt, _ = birder_save(birder_net(config=MEDIUM), folder, "vit_reg4_b16_medium", external_config=MEDIUM)
    assert pt.stat().st_size > 64 * 1024 * 1024  # above the old reader's child-process threshold
    return pt


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _holds(pid: int, path: Path) -> bool:
    try:
        return any(os.readlink(fd) == str(path) for fd in Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_kill_while_reading_a_large_pt_leaves_no_child_and_no_temp_folder(
    big_pt: Path, tmp_path: Path, sig: signal.Signals
) -> None:
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    env = {**os.environ, "TMPDIR": str(tmpdir), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vitreg_jax.cli.main",
            "convert",
            str(big_pt),
            "--out",
            str(tmp_path / "ckpt"),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    children: set[int] = set()
    deadline = time.monotonic() + 300
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            children.update(_children(proc.pid))
            if _holds(proc.pid, big_pt) or any(_holds(c, big_pt) for c in children):
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the conversion ended before it was seen reading the file"
        children.update(_children(proc.pid))
        proc.send_signal(sig)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not children, f"child processes appeared: {sorted(children)}"
    assert list(tmpdir.iterdir()) == []
