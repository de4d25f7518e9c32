"""The converter's library layer: the .pt reader (torch.load(weights_only=True) only), .safetensors, legacy
key layouts, architecture inference, and the refusal of unsafe or damaged files.

Reference files are written by birder 0.8.4 itself (``fs_ops.checkpoint_model``, ``write_config``,
``save_st``) from tiny networks with a fixed torch seed; legacy files are made from those by renaming keys
exactly as the old layouts had them. The birder-made files come from :mod:`tests.support.birder_files`.
"""

from __future__ import annotations

import json
import logging
import zipfile
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest

from tests.support.birder_files import (
    RGB,
    SIZE,
    Tiny,
    birder_net,
    damaged_files,
    evil_files,
    legacy_state,
    save_pt,
    signature,
    state_tensors,
    to_numpy,
)
from tests.support.tiny_models import TINY_BIRDER
from vitreg_jax.convert import infer, mapping
from vitreg_jax.convert.formats.birder_file import read_birder_file
from vitreg_jax.errors import UserError
from vitreg_jax.model.config import ViTConfig

torch = pytest.importorskip("torch")
pytest.importorskip("birder")
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


# the .pt reader --------------------------------------------------------------------------------------------
def test_pt_reader_matches_torch_load_for_every_dtype_and_layout(tmp_path: Path) -> None:
    base = torch.arange(12.0).reshape(3, 4)
    state = {
        "bf16": torch.randn(3, 5, dtype=torch.bfloat16),
        "fp16": torch.randn(2, 3, dtype=torch.float16),
        "fp32": torch.randn(4),
        "fp64": torch.randn(2, dtype=torch.float64),
        "transposed": base.t(),
        "row_view": base[1],
        "column_slice": base[:, 1:3],
        "param": torch.nn.Parameter(torch.ones(2)),
        "empty": torch.zeros(0, 3),
        "scalar": torch.tensor(3.5),
        "int64": torch.arange(5),
        "bool": torch.tensor([True, False]),
        "uint8": torch.arange(4, dtype=torch.uint8),
    }
    path = save_pt(tmp_path / "w.pt", state, class_to_idx={"a": 0})
    got = read_birder_file(path)
    ref = torch.load(path, weights_only=True)
    assert list(got.state) == list(ref["state"])
    for key, tensor in ref["state"].items():
        want = to_numpy(tensor)
        assert got.state[key].dtype == want.dtype, key
        assert got.state[key].shape == want.shape, key
        assert np.array_equal(got.state[key], want), key
        assert got.state[key].flags.c_contiguous and got.state[key].flags.writeable, key
    assert got.meta["rgb_stats"] == {"mean": list(RGB["mean"]), "std": list(RGB["std"])}
    assert got.meta["class_to_idx"] == {"a": 0} and got.format == "pt" and len(got.sha256) == 64


def test_pt_writer_round_trips_through_torch(tmp_path: Path) -> None:
    """write_pt's file is what torch.save writes: torch.load(weights_only=True) (and mmap) reads it
    exactly."""
    from vitreg_jax.convert.formats.birder_file import write_pt

    rng = np.random.default_rng(0)
    state = {
        "fp32": rng.standard_normal((7, 5), dtype=np.float32),
        "fp16": np.arange(6, dtype=np.float16),
        "bf16": rng.standard_normal(9).astype(ml_dtypes.bfloat16),
        "scalar": np.array(2.5, np.float32),
        "empty": np.zeros((0, 3), np.float32),
        "int64": np.arange(4),
        "bool": np.array([True, False]),
    }
    meta = {
        "birder_version": "v0.8.4",
        "task": "image_classification",
        "signature": signature(),
        "class_to_idx": {"b": 1},
        "rgb_stats": RGB,
        "config": {"a": None, "b": True, "c": -3, "d": 1e-6, "e": 2**40, "f": "x", "g": [1, (2, 3)]},
    }
    write_pt(tmp_path / "w.pt", state, meta)
    for mmap in (False, True):
        loaded = torch.load(tmp_path / "w.pt", weights_only=True, mmap=mmap)
        assert list(loaded["state"]) == list(state)
        for key, want in state.items():
            got = to_numpy(loaded["state"][key])
            assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want), key
        assert {k: v for k, v in loaded.items() if k != "state"} == meta
    ours = read_birder_file(tmp_path / "w.pt")
    assert all(np.array_equal(ours.state[k], v) and ours.state[k].dtype == v.dtype for k, v in state.items())


def test_birder_saved_pt_and_safetensors_read_identically(tiny: Tiny) -> None:
    pt, st = read_birder_file(tiny.pt), read_birder_file(tiny.st)
    want = {k: v.numpy() for k, v in tiny.net.state_dict().items()}
    for got in (pt, st):
        assert list(got.state) == list(want) if got is pt else set(got.state) == set(want)
        assert all(np.array_equal(got.state[k], want[k]) for k in want)
        assert got.meta["signature"] == signature() and got.meta["config"] == TINY_BIRDER
    assert pt.meta["birder_version"] == st.meta["birder_version"] == "v0.8.4"


def test_reader_keeps_bf16_and_fp16(tmp_path: Path, tiny: Tiny) -> None:
    for dtype, np_dtype in ((torch.bfloat16, ml_dtypes.bfloat16), (torch.float16, np.float16)):
        state = {k: v.to(dtype) for k, v in state_tensors(tiny.net).items()}
        got = read_birder_file(save_pt(tmp_path / f"{dtype}.pt", state))
        assert got.dtypes == [str(np.dtype(np_dtype))]
        assert all(np.array_equal(got.state[k], to_numpy(v)) for k, v in state.items())


def test_a_pickle_that_would_run_code_is_refused_without_running_it(tmp_path: Path, tiny: Tiny) -> None:
    marker = tmp_path / "marker"
    for what, path in evil_files(tmp_path / "evil", state_tensors(tiny.net), marker).items():
        assert zipfile.is_zipfile(path), what
        with pytest.raises(UserError, match="refused") as err:
            read_birder_file(path)
        assert str(path) in str(err.value), what
        assert not marker.exists(), what
    # the payload is real: a full unpickle does create the marker
    torch.load(tmp_path / "evil" / "meta.pt", weights_only=False)
    assert marker.exists()


def test_a_pickle_cannot_rewrite_a_checked_tensor_record(tmp_path: Path) -> None:
    """BUILD after _rebuild_tensor_v2 would swap in a shape reaching past the storage: never a tensor."""
    pickled = (
        b"\x80\x02}(X\x05\x00\x00\x00state}(X\x01\x00\x00\x00a"
        b"ctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storagectorch\nFloatStorage\n"
        b"X\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x04tQK\x00K\x04\x85K\x01\x85\x89)tR"
        b"}X\x05\x00\x00\x00shapeJ\x00\x00\x10\x00\x85sb"  # BUILD {"shape": (1048576,)}
        b"uX\x09\x00\x00\x00rgb_stats}uu."
    )
    path = tmp_path / "crafted.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pickled)
        zf.writestr("archive/data/0", b"\0" * 16)
    with pytest.raises(UserError, match="refused|not a readable torch checkpoint"):
        read_birder_file(path)


def test_damaged_files_are_one_clear_error(tmp_path: Path, tiny: Tiny) -> None:
    for what, path in damaged_files(tmp_path, tiny.pt, tiny.st).items():
        with pytest.raises(UserError) as err:
            read_birder_file(path)
        message = str(err.value)
        assert str(path) in message and "\n" not in message, (what, message)
    with pytest.raises(UserError, match="is a directory"):
        read_birder_file(tmp_path)
    with pytest.raises(UserError, match="no such file"):
        read_birder_file(tmp_path / "missing.pt")


def test_a_flipped_byte_is_caught_by_the_crc(tmp_path: Path, tiny: Tiny) -> None:
    path = damaged_files(tmp_path, tiny.pt, tiny.st)["corrupted byte in a tensor"]
    with pytest.raises(UserError, match="CRC"):
        read_birder_file(path)


# key layouts -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("oldest", "layout"), [(False, "pre-0.4"), (True, "pre-0.4-encoder-norm")])
def test_legacy_layouts_normalise_to_todays_keys(tiny: Tiny, oldest: bool, layout: str) -> None:
    current = {k: v.numpy() for k, v in tiny.net.state_dict().items()}
    legacy = legacy_state(current, oldest=oldest)
    assert "encoder.block.0.self_attention.in_proj_weight" in legacy and "encoder.block.1.ln2.bias" in legacy
    assert ("encoder.block.2.weight" in legacy) == oldest and ("norm.weight" in legacy) != oldest
    normalized, found = mapping.normalize_keys(legacy)
    assert found == layout
    assert set(normalized) == set(current)
    assert all(normalized[k] is current[k] for k in current)
    assert mapping.normalize_keys(current)[1] == "current"


def test_to_nnx_consume_drops_the_source_and_gives_the_same_arrays(tiny: Tiny) -> None:
    cfg = ViTConfig.from_birder(TINY_BIRDER | {"patch_size": 16, "num_reg_tokens": 4}, image_size=SIZE)
    source = {k: v.numpy().copy() for k, v in tiny.net.state_dict().items()}
    kept = mapping.to_nnx(source, cfg)
    consumed = mapping.to_nnx(source, cfg, consume=True)
    assert source == {}
    assert kept.keys() == consumed.keys() and all(np.array_equal(kept[k], consumed[k]) for k in kept)


# architecture inference ------------------------------------------------------------------------------------
def _birder_vit_config(net: Any, size: tuple[int, int] = SIZE) -> ViTConfig:
    """What birder's own json says about ``net``, through our reader of birder configs."""
    from birder.common import lib

    from vitreg_jax.model.birder_json import vit_config_from_birder

    cfg = json.loads(json.dumps(lib.get_network_config(net, signature(size, net.num_classes), RGB)))
    return vit_config_from_birder(cfg)


VARIANTS = {
    "registers + class token": {},
    "layer scale + pre-norm": {"layer_scale_init_value": 1e-5, "pre_norm": True, "norm_layer_eps": 1e-5},
    "mean-pooled, norm after pool": {"class_token": False, "norm_after_pool": True, "num_reg_tokens": 1},
    "no final norm, no qkv bias": {"post_norm": False, "qkv_bias": False},
    "pos-embedding on patches only": {"pos_embed_special_tokens": False},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_inference_with_the_files_config_reproduces_birders_architecture(variant: str) -> None:
    config = {**TINY_BIRDER, **VARIANTS[variant]}
    net = birder_net(config=config, num_classes=3 if "no final" in variant else 0)
    state = {k: v.numpy() for k, v in net.state_dict().items()}
    meta = {"signature": signature(SIZE, net.num_classes), "rgb_stats": RGB, "config": config}
    result = infer.infer(state, meta)
    assert result.vit_config == _birder_vit_config(net).replace(drop_path_rate=0.0)
    assert result.source == infer.SOURCE_FILE_CONFIG
    assert mapping.to_nnx(state, result.vit_config)  # every tensor maps


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_inference_from_shapes_alone_at_a_standard_width(variant: str) -> None:
    """Width 192: birder's standard head count is 3; eps and layer scale follow birder's conventions."""
    config = {**TINY_BIRDER, "hidden_dim": 192, "num_heads": 3, "mlp_dim": 256, **VARIANTS[variant]}
    net = birder_net(config=config)
    state = {k: v.numpy() for k, v in net.state_dict().items()}
    result = infer.infer(state, {"signature": signature(), "rgb_stats": RGB})
    assert result.vit_config == _birder_vit_config(net).replace(drop_path_rate=0.0)
    assert result.source == infer.SOURCE_SHAPES and not result.exact
    assert any("num_heads=3" in n for n in result.notes)


def test_inference_names_the_preset_with_exactly_these_shapes() -> None:
    net = birder_net("vit_t32", config=None, size=(64, 64))
    state = {k: v.numpy() for k, v in net.state_dict().items()}
    result = infer.infer(state, {"signature": signature((64, 64)), "rgb_stats": RGB})
    assert (result.network, result.exact) == ("vit_t32", True)
    assert result.vit_config == _birder_vit_config(net, (64, 64))
    assert result.birder_config["registered_name"] == "vit_t32"
    # no signature: the input size comes from the position-embedding length
    no_sig = infer.infer(state, {"rgb_stats": RGB})
    assert no_sig.vit_config.image_size == (64, 64)
    assert any("position-embedding length" in n for n in no_sig.notes)


def test_standard_heads_come_from_birders_presets() -> None:
    heads = infer.standard_heads()
    assert heads[768] == 12 and heads[192] == 3 and heads[1024] == 16 and heads[1536] == 24


def test_non_square_signature_and_classifier(tmp_path: Path) -> None:
    net = birder_net(config=TINY_BIRDER, size=(32, 48), num_classes=5)
    state = {k: v.numpy() for k, v in net.state_dict().items()}
    result = infer.infer(
        state, {"signature": signature((32, 48), 5), "rgb_stats": RGB, "config": TINY_BIRDER}
    )
    assert result.vit_config.image_size == (32, 48) and result.vit_config.num_classes == 5
    assert result.birder_config["signature"] == signature((32, 48), 5)


@pytest.mark.parametrize(
    ("meta", "match"),
    [
        ({"signature": signature()}, "no rgb_stats.*--config"),
        ({"signature": signature(), "rgb_stats": RGB}, "num_heads for width 64.*--config"),
        (
            {"signature": signature((64, 64)), "rgb_stats": RGB, "config": TINY_BIRDER},
            "pos_embedding has 9 rows",
        ),
        ({"signature": signature(SIZE, 7), "rgb_stats": RGB, "config": TINY_BIRDER}, "7 classes"),
        (
            {"signature": signature(), "rgb_stats": RGB, "config": {**TINY_BIRDER, "mlp_dim": 64}},
            "disagrees.*mlp_dim",
        ),
        ({"signature": {"inputs": []}, "rgb_stats": RGB, "config": TINY_BIRDER}, "signature"),
        ({"signature": signature(), "rgb_stats": {"mean": 1}, "config": TINY_BIRDER}, "rgb_stats"),
        ({"signature": signature(), "rgb_stats": RGB, "config": {**TINY_BIRDER, "qk_norm": True}}, "qk_norm"),
    ],
)
def test_inference_refuses_what_it_cannot_know_with_one_clear_line(
    tiny: Tiny, meta: dict[str, Any], match: str
) -> None:
    state = {k: v.numpy() for k, v in tiny.net.state_dict().items()}
    with pytest.raises(UserError, match=match):
        infer.infer(state, meta)


def test_network_override_and_unknown_names(tiny: Tiny) -> None:
    state = {k: v.numpy() for k, v in tiny.net.state_dict().items()}
    meta = {"signature": signature(), "rgb_stats": RGB}
    result = infer.infer(state, meta, network="vitreg4_b16")  # the legacy name
    assert result.network == "vit_reg4_b16" and result.vit_config.hidden_dim == 768
    assert result.vit_config.image_size == SIZE and result.source == "--network"
    with pytest.raises(UserError, match="unknown network 'vit_nope'"):
        infer.infer(state, meta, network="vit_nope")


def test_birder_network_name() -> None:
    cfg = ViTConfig.from_birder(TINY_BIRDER | {"patch_size": 16, "num_reg_tokens": 4})
    assert infer.birder_network_name("vitreg4_b16", cfg) == "vit_reg4_b16"
    assert infer.birder_network_name("vit", cfg) == infer.nearest_preset(cfg)[0]
    assert infer.nearest_preset(cfg)[0].startswith("vit_reg4_")
