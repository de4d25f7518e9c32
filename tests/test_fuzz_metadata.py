"""Loading a checkpoint whose ``metadata.json`` is mutated: the original weights, bit for bit, or a one-line
``UserError``.

The checkpoint is a real one (``vitreg_jax.model.build.save_model`` of a tiny ViT). Mutations of its
``metadata.json``: any value (found by its path in the JSON) set to another type, a huge or negative number,
deep nesting or a number of 5000 digits; keys dropped or added; the root replaced; and raw byte edits (bit
flips, truncation, bytes that are not UTF-8). The loader is ``model_from_checkpoint``, which reads the
metadata, builds the model its configs describe and restores the weights into it; when it returns, the weights
must be the saved ones. The weights folder is never touched, so no mutation may make a load return anything
else.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from tests.support.fuzz_support import flip, fuzz_settings, load_or_refuse
from vitreg_jax.model.build import get_params, model_from_checkpoint
from vitreg_jax.model.checkpoint import METADATA_FILE

METADATA_EXAMPLES = 40  # each load restores the weights with Orbax (~0.2 s)


class Original(NamedTuple):
    folder: Path
    text: bytes
    meta: dict[str, Any]
    paths: list[tuple[Any, ...]]  # every value's path in the JSON (keys and list indices)
    params: dict[Any, np.ndarray]
    size: int  # of the whole checkpoint folder

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:  # hypothesis prints it with each failing case
        p.text(f"<checkpoint {self.folder.name}>")


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else []
    out = [prefix] if prefix else []
    for key, value in items:
        out += _paths(value, (*prefix, key))
    return out


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory) -> Original:
    from vitreg_jax.data.rgb_stats import RGB_STATS
    from vitreg_jax.model.birder_json import birder_config
    from vitreg_jax.model.build import build_model, save_model
    from vitreg_jax.model.config import ViTConfig

    cfg = ViTConfig(
        image_size=(32, 32),
        patch_size=16,
        num_layers=2,
        num_heads=2,
        hidden_dim=64,
        mlp_dim=128,
        num_reg_tokens=4,
    )
    net = build_model(cfg, seed=3)
    folder = save_model(
        tmp_path_factory.mktemp("ckpt") / "tiny", net, birder_config(cfg, RGB_STATS["birder"])
    )
    text = (folder / METADATA_FILE).read_bytes()
    meta = json.loads(text)
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    return Original(folder, text, meta, _paths(meta), get_params(net), size)


VALUES = [
    None,
    True,
    False,
    1.5,
    -1,
    0,
    10**9,
    2**62,
    2**64,
    1e308,
    "x",
    "",
    "two",
    [],
    {},
    [[1]],
    [1, 2, 3],
    {"a": 1},
    "@DEEP@",
    "@BIG@",
    "@NAN@",
]
DEEP = 100_000
BIG = "9" * 5000
KINDS = ["set", "set", "set", "drop", "add", "wrap", "root", "flip", "truncate", "bytes"]
recipes = st.tuples(st.sampled_from(KINDS), st.integers(0, 1 << 20), st.integers(0, 1 << 20))


def _dumps(obj: Any) -> bytes:
    text = json.dumps(obj, indent=1)
    text = text.replace('"@DEEP@"', "[" * DEEP + "]" * DEEP).replace('"@BIG@"', BIG).replace('"@NAN@"', "NaN")
    return text.encode()


def apply(orig: Original, recipe: tuple[str, int, int]) -> tuple[str, bytes]:
    kind, sel, choice = recipe
    text = orig.text
    if kind == "flip":
        at = sel % len(text)
        return f"flip bit {choice % 8} at {at}", flip(text, at, choice % 8)
    if kind == "truncate":
        return f"truncate at {sel % len(text)}", text[: sel % len(text)]
    if kind == "bytes":
        at = sel % len(text)
        junk = [b"\xff\xfe", b"\x00", b"\xc3", b"\xed\xa0\x80", b"\x1b[31m\n"][choice % 5]
        return f"insert {junk!r} at {at}", text[:at] + junk + text[at:]
    meta = json.loads(text)
    value = VALUES[choice % len(VALUES)]
    if kind == "root":
        return f"root = {value!r:.20}", _dumps(value)
    path = orig.paths[sel % len(orig.paths)]
    parent = meta
    for key in path[:-1]:
        parent = parent[key]
    last = path[-1]
    if kind == "set":
        parent[last] = value
    elif kind == "drop":
        del parent[last]
    elif kind == "wrap":
        parent[last] = [[parent[last]], {"v": parent[last]}, str(parent[last])][choice % 3]
    else:  # add a key beside this one (or an item to this list)
        if isinstance(parent, dict):
            parent[f"extra{choice % 3}"] = value
        else:
            parent.append(value)
    return f"{kind} {'.'.join(map(str, path))} ({value!r:.20})", _dumps(meta)


@fuzz_settings(METADATA_EXAMPLES)
@given(recipe=recipes)
@example(recipe=("root", 0, 4))  # a metadata.json holding -1: .get on an int was an AttributeError
@example(recipe=("bytes", 3, 0))  # bytes that are not UTF-8: read_text raised UnicodeDecodeError
@example(recipe=("drop", 26, 0))  # no birder_config: a KeyError
@example(recipe=("set", 26, 0))  # birder_config null: a TypeError
@example(recipe=("set", 31, 10))  # birder_config.model_config "x": a ValueError
@example(recipe=("set", 53, 10))  # birder_config.signature.inputs[0].data_shape "x": an IndexError
@example(recipe=("set", 33, 6))  # birder_config.model_config.num_layers 10**9: a hang building 10**9 blocks
@example(recipe=("set", 55, 9))  # in_channels 1e308 (data_shape[1]): an OverflowError building the model
@example(recipe=("root", 0, 18))  # JSON nested 100000 deep: json.loads raised RecursionError
def test_mutated_metadata_loads_the_original_weights_or_is_refused(
    original: Original, recipe: tuple[str, int, int]
) -> None:
    _, mutated = apply(original, recipe)
    (original.folder / METADATA_FILE).write_bytes(mutated)
    try:
        got = load_or_refuse(lambda: model_from_checkpoint(original.folder), original.size + len(mutated))
    finally:
        (original.folder / METADATA_FILE).write_bytes(original.text)
    if got is not None:
        params = get_params(got[0])
        assert set(params) == set(original.params)
        for key, array in original.params.items():
            assert params[key].dtype == array.dtype and params[key].tobytes() == array.tobytes(), key
