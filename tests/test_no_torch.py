"""The shipped commands never import torch: ``convert`` of a ``.pt``, ``export`` to ``.pt`` and
``.safetensors``, ``info`` and ``embed`` run in a subprocess where ``torch`` (and torchvision, birder,
safetensors) are stubs that log the attempt and raise ``ImportError``. The files it wrote are then checked
with torch and birder here: the exported ``.pt`` loads strictly in birder, bit for bit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.support.birder_files import birder_net, birder_save, to_numpy
from tests.support.tiny_models import TINY_BIRDER

torch = pytest.importorskip("torch")
pytest.importorskip("birder")

BLOCKED = ("torch", "torchvision", "birder", "safetensors")
STUB = """import os
with open(os.environ["VITREG_TEST_IMPORT_LOG"], "a") as log:
    log.write(__name__ + "\\n")
raise ImportError("{name} is blocked in this test")
"""


@pytest.fixture(scope="module")
def blocked_env(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, str], Path]:
    stubs = tmp_path_factory.mktemp("stubs")
    for name in BLOCKED:
        (stubs / name).mkdir()
        (stubs / name / "__init__.py").write_text(STUB.replace("{name}", name))
    log = stubs / "imports.log"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(stubs), os.environ.get("PYTHONPATH", "")]),
        "VITREG_TEST_IMPORT_LOG": str(log),
        "JAX_PLATFORMS": "cpu",
    }
    return env, log


# runs each command in one interpreter (as the CLI would, one after another) and reports their stdout
DRIVER = """import contextlib, io, json, sys
from vitreg_jax.cli.main import main
outs = []
for args in json.loads(sys.argv[1]):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(args)
    if rc != 0:
        sys.exit(f"{args}: exit status {rc}")
    outs.append(out.getvalue())
print(json.dumps({"outputs": outs, "torch_imported": "torch" in sys.modules}))
"""


def run_blocked(env: dict[str, str], *commands: list[str]) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps(commands)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert not result["torch_imported"]
    return result["outputs"]


def test_the_stub_really_blocks_torch(blocked_env: tuple[dict[str, str], Path]) -> None:
    env, log = blocked_env
    done = subprocess.run(
        [sys.executable, "-c", "import torch"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode != 0 and "blocked" in done.stderr
    assert log.read_text() == "torch\n"
    log.unlink()


def test_convert_export_info_embed_without_torch(
    tmp_path: Path, blocked_env: tuple[dict[str, str], Path]
) -> None:
    env, log = blocked_env
    net = birder_net()
    pt, js = birder_save(net, tmp_path / "birder", "vit_reg4_b16_tiny", external_config=TINY_BIRDER)
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(images / f"{i}.png")

    ckpt, st = str(tmp_path / "ckpt"), str(tmp_path / "st" / "out.safetensors")
    (tmp_path / "st").mkdir()
    outputs = run_blocked(
        env,
        ["convert", str(pt), "--out", ckpt],
        ["export", ckpt, "--out", str(tmp_path / "out.pt")],
        ["export", ckpt, "--out", st],
        ["info", ckpt],
        ["info", str(pt)],
        ["embed", "--checkpoint", ckpt, str(images), "--out", str(tmp_path / "emb")],
        ["embed", "--checkpoint", str(pt), str(images), "--out", str(tmp_path / "emb_pt")],
    )
    assert "vit_reg4_" in outputs[3] and "birder .pt" in outputs[4]
    assert not log.exists(), f"imports attempted: {log.read_text()}"

    # what was written without torch, checked with torch and birder
    from birder.common import fs_ops
    from safetensors.torch import load_file

    want = {k: to_numpy(v) for k, v in net.state_dict().items()}
    loaded, _ = fs_ops.load_model_with_cfg(str(js), tmp_path / "out.pt")  # load_state_dict(strict=True)
    assert {k: to_numpy(v).tobytes() for k, v in loaded.state_dict().items()} == {
        k: v.tobytes() for k, v in want.items()
    }
    record = torch.load(tmp_path / "out.pt", weights_only=True)
    birders = torch.load(pt, weights_only=True)
    assert list(record) == list(birders)  # the same top-level record as fs_ops.checkpoint_model
    st = load_file(tmp_path / "st" / "out.safetensors")
    assert {k: to_numpy(v).tobytes() for k, v in st.items()} == {k: v.tobytes() for k, v in want.items()}
    assert sorted(p.name for p in (tmp_path / "emb").iterdir()) == sorted(
        p.name for p in (tmp_path / "emb_pt").iterdir()
    )


def test_a_pickle_that_would_run_code_is_refused_without_torch(
    tmp_path: Path, blocked_env: tuple[dict[str, str], Path]
) -> None:
    env, log = blocked_env
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    torch.save({"state": {"a": torch.ones(2)}, "rgb_stats": _Evil(marker)}, path)
    done = subprocess.run(
        [sys.executable, "-m", "vitreg_jax.cli.main", "info", str(path)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert done.returncode == 2 and "refused" in done.stderr and done.stderr.count("\n") == 1, done.stderr
    assert not marker.exists() and not log.exists()


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[object, ...]:
        return (open, (self.marker, "w"))
