"""Loading birder files written by birder's own save functions, Orbax round trips, and bad inputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import vitreg_jax
from tests.support import birder_ref as ref
from tests.support.report import record
from tests.support.tiny_models import TINY_BIRDER
from tests.support.tolerances import EMBEDDING_ATOL, TOKENS_ATOL
from vitreg_jax.errors import UserError
from vitreg_jax.model.build import get_params, save_model

pytest.importorskip("birder")


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    tnet = ref.birder_net("vit_reg4_b16", seed=11, config=TINY_BIRDER)
    ref.load_state(
        tnet,
        {
            k: v + 0.05 * np.random.default_rng(11).standard_normal(v.shape).astype(np.float32)
            for k, v in ref.state_numpy(tnet).items()
        },
    )
    return tnet, ref.save_birder_files(tnet, tmp_path_factory.mktemp("birder"))


def x_batch(n: int = 2, hw=(224, 224), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *hw, 3)).astype(np.float32)


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_birder_saved_files_load(tiny_files, fmt: str) -> None:
    tnet, files = tiny_files
    net, cfg = vitreg_jax.load_model_with_cfg(files["json"], files[fmt])
    assert cfg["rgb_stats"] == ref.OLD_BIRDER_RGB  # from the file, never hard-coded
    assert vitreg_jax.get_size_from_signature(cfg["signature"]) == (224, 224)
    x = x_batch()
    d = float(np.abs(np.asarray(net.embedding(x)) - ref.run(tnet.embedding, x)).max())
    record(f"tiny from birder .{fmt}", "embedding", d)
    assert d <= EMBEDDING_ATOL


@pytest.mark.slow
def test_full_size_birder_pt(tmp_path) -> None:
    tnet = ref.birder_net("vit_reg4_b16", seed=0)
    files = ref.save_birder_files(tnet, tmp_path)
    net, _ = vitreg_jax.load_model_with_cfg(files["json"], files["pt"])
    x = x_batch(1)
    d = float(np.abs(np.asarray(net.forward_features(x)) - ref.run(tnet.forward_features, x)).max())
    record("vit_reg4_b16 from birder .pt", "forward_features", d)
    assert d <= TOKENS_ATOL


def test_orbax_round_trip_is_exact(tiny_files, tmp_path) -> None:
    _, files = tiny_files
    net, cfg = vitreg_jax.load_model_with_cfg(files["json"], files["safetensors"])
    save_model(tmp_path / "ckpt", net, cfg)
    net2, cfg2 = vitreg_jax.load_model_with_cfg(None, tmp_path / "ckpt")
    a, b = get_params(net), get_params(net2)
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    assert cfg2["rgb_stats"] == cfg["rgb_stats"] and cfg2["signature"] == cfg["signature"]
    meta = json.loads((tmp_path / "ckpt" / "metadata.json").read_text())
    assert meta["rgb_stats"] == ref.OLD_BIRDER_RGB and meta["vit_config"]["num_reg_tokens"] == 4


def test_orbax_restores_without_model_code(tiny_files, tmp_path) -> None:
    """The weights are a plain dict of arrays: Orbax alone restores them, as numpy, on the CPU."""
    _, files = tiny_files
    net, cfg = vitreg_jax.load_model_with_cfg(files["json"], files["pt"])
    save_model(tmp_path / "ckpt", net, cfg)
    code = (
        "import orbax.checkpoint as ocp, numpy as np, jax, sys\n"
        "d = sys.argv[1] + '/params'\n"
        "c = ocp.PyTreeCheckpointer()\n"
        "t = c.metadata(d).item_metadata.tree\n"
        "r = c.restore(d, restore_args=jax.tree_util.tree_map("
        "lambda _: ocp.RestoreArgs(restore_type=np.ndarray), t))\n"
        "print(r['encoder']['block']['0']['attn']['qkv']['kernel'].shape)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "ckpt")], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "(64, 192)"


def test_adjust_size_survives_a_checkpoint(tiny_files, tmp_path) -> None:
    _, files = tiny_files
    net, cfg = vitreg_jax.load_model_with_cfg(files["json"], files["pt"])
    net.adjust_size((256, 192))
    save_model(tmp_path / "ckpt", net, cfg)
    net2, cfg2 = vitreg_jax.load_model_with_cfg(None, tmp_path / "ckpt")
    assert vitreg_jax.get_size_from_signature(cfg2["signature"]) == (256, 192)
    x = x_batch(1, (256, 192))
    assert np.array_equal(np.asarray(net.embedding(x)), np.asarray(net2.embedding(x)))


def test_legacy_json_with_alias(tiny_files, tmp_path) -> None:
    tnet, files = tiny_files
    cfg = json.loads(Path(files["json"]).read_text())
    cfg["alias"] = cfg.pop("registered_name")
    cfg["net_param"] = None
    (tmp_path / "legacy.json").write_text(json.dumps(cfg))
    net, loaded = vitreg_jax.load_model_with_cfg(tmp_path / "legacy.json", files["pt"])
    assert loaded["registered_name"] == "vit_reg4_b16"
    x = x_batch(1)
    assert np.abs(np.asarray(net.embedding(x)) - ref.run(tnet.embedding, x)).max() <= EMBEDDING_ATOL


def test_bad_inputs_raise_one_clear_error(tiny_files, tmp_path) -> None:
    _, files = tiny_files
    cases = []
    cases.append(((files["json"], tmp_path / "missing.pt"), "no such file|neither an existing file"))
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    cases.append(((files["json"], text), "not a birder weights file"))
    raw = Path(files["pt"]).read_bytes()
    (tmp_path / "truncated.pt").write_bytes(raw[: len(raw) // 2])
    cases.append(((files["json"], tmp_path / "truncated.pt"), "truncated or corrupted"))
    (tmp_path / "truncated.safetensors").write_bytes(Path(files["safetensors"]).read_bytes()[:5000])
    cases.append(
        ((files["json"], tmp_path / "truncated.safetensors"), "truncated or corrupted|not a readable")
    )
    cases.append(((files["json"], tmp_path), "is a directory|not a vitreg-jax checkpoint"))
    other = ref.save_birder_files(
        ref.birder_net("vit_s16", seed=0, config=TINY_BIRDER), tmp_path / "other", name="vit_s16"
    )
    cases.append(((files["json"], other["pt"]), r"missing 1 key\(s\): reg_tokens"))
    cfg = json.loads(Path(files["json"]).read_text())
    cfg["model_config"]["qk_norm"] = True
    cases.append(((cfg, files["pt"]), "qk_norm"))
    cases.append(((cfg | {"name": "resnet_v1"}, files["pt"]), "not a ViT"))
    for (config, weights), pattern in cases:
        with pytest.raises(UserError, match=pattern) as info:
            vitreg_jax.load_model_with_cfg(config, weights)
        assert "\n" not in str(info.value), str(info.value)


def test_imports_and_runs_without_torch(tiny_files, tmp_path) -> None:
    """`vitreg_jax` (and .safetensors / Orbax loading) must work where torch is not installed."""
    _, files = tiny_files
    code = (
        "import sys\n"
        "sys.modules['torch'] = None  # any `import torch` now raises ImportError\n"
        "import numpy as np, vitreg_jax\n"
        "from vitreg_jax.model.build import save_model\n"
        "net, cfg = vitreg_jax.load_model_with_cfg(sys.argv[1], sys.argv[2])\n"
        "save_model(sys.argv[3], net, cfg)\n"
        "net, cfg = vitreg_jax.load_model_with_cfg(None, sys.argv[3])\n"
        "print(net.embedding(np.zeros((1, 224, 224, 3), np.float32)).shape)\n"
        "net, cfg = vitreg_jax.load_model_with_cfg(sys.argv[1], sys.argv[4])  # a .pt needs no torch either\n"
        "print('pt:', net.embedding(np.zeros((1, 224, 224, 3), np.float32)).shape)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, files["json"], files["safetensors"], str(tmp_path / "c"), files["pt"]],
        check=False,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert "(1, 64)" in out.stdout
    assert "pt: (1, 64)" in out.stdout
