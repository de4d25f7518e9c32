"""The torch-free ``.pt`` reader against ``torch.load(weights_only=True)``, and its refusals.

Files come from birder 0.8.4's own ``fs_ops.checkpoint_model`` (every structural variant of the presets, at a
tiny width), from ``torch.save`` (dtypes, layouts, legacy key layouts), or are crafted byte by byte where a
file torch would never write is the point (a pickle that would run code, claims past the data).
"""

from __future__ import annotations

import contextlib
import io
import logging
import pickle
import struct
import subprocess
import sys
import tracemalloc
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.support.birder_files import RGB, birder_save, legacy_state, save_pt, state_tensors, to_numpy
from tests.support.tiny_models import TINY_BIRDER
from vitreg_jax.convert.formats.birder_file import read_birder_file
from vitreg_jax.convert.formats.pt_reader import DAMAGED, NOT_WEIGHTS, read_pt
from vitreg_jax.errors import UserError
from vitreg_jax.model.presets import PRESETS

torch = pytest.importorskip("torch")
pytest.importorskip("birder")
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)

_SIZE_KEYS = {"patch_size", "num_layers", "num_heads", "hidden_dim", "mlp_dim", "drop_path_rate"}


def _structural_variants() -> list[str]:
    """One preset per distinct set of structural options (class token, layer scale, norms, registers ...)."""
    seen: dict[tuple[Any, ...], str] = {}
    for name, cfg in PRESETS.items():
        shape = tuple(
            sorted(
                (k, v > 0 if k == "num_reg_tokens" else v)
                for k, v in cfg.items()
                if k not in _SIZE_KEYS and k != "layer_scale_init_value"
            )
        )
        shape += ("ls" in name or "layer_scale_init_value" in cfg,)
        seen.setdefault(shape, name)
    return sorted(seen.values())


def assert_same_as_torch(path: Path) -> None:
    """Our reader equals torch.load(weights_only=True): keys in order, dtypes, shapes, bits, metadata."""
    ours_state, ours_meta = read_pt(path)
    ref = torch.load(path, map_location="cpu", weights_only=True)
    ref_state = ref.get("state", ref)
    assert list(ours_state) == list(ref_state)
    for key, tensor in ref_state.items():
        want, got = to_numpy(tensor), ours_state[key]
        assert got.dtype == want.dtype and got.shape == want.shape, key
        assert got.tobytes() == want.tobytes(), key  # bit for bit (NaN payloads and signed zeros included)
        assert got.flags.c_contiguous and got.flags.writeable, key
    if "state" in ref:
        assert ours_meta == _plain({k: v for k, v in ref.items() if k != "state"})


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj


# birder's own files -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", _structural_variants())
def test_every_birder_variant_reads_as_torch_does(tmp_path: Path, name: str) -> None:
    from birder.model_registry import registry

    config = {**PRESETS[name], **TINY_BIRDER}
    torch.manual_seed(0)
    size = (2 * config["patch_size"], 2 * config["patch_size"])
    net = registry.net_factory(name, 0, 3, config=config, size=size).eval()
    pt, _ = birder_save(net, tmp_path, name, external_config=config, size=size)
    assert_same_as_torch(pt)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("layout", ["current", "pre-0.4", "pre-0.4-encoder-norm"])
def test_fp32_fp16_bf16_in_every_key_layout(tmp_path: Path, dtype: str, layout: str) -> None:
    from birder.model_registry import registry

    torch.manual_seed(1)
    net = registry.net_factory("vit_reg4_b16", 0, 3, config=TINY_BIRDER, size=(32, 32)).eval()
    state = {k: v.to(getattr(torch, dtype)) for k, v in state_tensors(net).items()}
    if layout != "current":
        state = legacy_state(state, oldest=layout.endswith("encoder-norm"))
    assert_same_as_torch(save_pt(tmp_path / "w.pt", state, config=TINY_BIRDER))


def test_strides_offsets_shared_storages_and_every_dtype(tmp_path: Path) -> None:
    base = torch.arange(24.0).reshape(4, 6)
    state = {
        "base": base,
        "transposed": base.t(),
        "row": base[2],
        "block": base[1:3, 2:5],
        "every_other": base[:, ::2],
        "also_base": base,
        "bf16": torch.randn(3, 5).to(torch.bfloat16),
        "fp16": torch.randn(7).half(),
        "fp64": torch.randn(2, dtype=torch.float64),
        "int64": torch.arange(5),
        "int32": torch.arange(3).int(),
        "int16": torch.arange(3).short(),
        "int8": torch.arange(-2, 2).char(),
        "uint8": torch.arange(4).byte(),
        "bool": torch.tensor([True, False, True]),
        "uint16": torch.tensor([1, 60000]).to(torch.uint16),
        "scalar": torch.tensor(-0.0),
        "empty": torch.zeros(0, 3),
        "nan": torch.tensor([float("nan"), -float("inf")]),
        "param": torch.nn.Parameter(torch.ones(2)),
        "permuted": torch.randn(2, 3, 4).permute(2, 0, 1),
    }
    assert_same_as_torch(save_pt(tmp_path / "w.pt", state))
    ours, _ = read_pt(tmp_path / "w.pt")
    assert np.shares_memory(ours["base"], ours["row"])  # views of one mapped storage, not copies


def test_stored_records_are_memory_mapped_not_read(tmp_path: Path) -> None:
    path = save_pt(tmp_path / "w.pt", {"big": torch.randn(1 << 20)})  # 4 MiB
    tracemalloc.start()
    try:
        state, _ = read_pt(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < (1 << 20)  # far below the 4 MiB of data: nothing was copied
    base = state["big"]
    while base.base is not None and not isinstance(base, np.memmap):
        base = base.base
    assert isinstance(base, np.memmap)


def test_big_endian_files_are_swapped(tmp_path: Path) -> None:
    """A file saved on a big-endian host (``byteorder`` = big, swapped records) reads like torch reads it."""
    state = {"fp32": torch.randn(5), "bf16": torch.randn(3).to(torch.bfloat16), "int64": torch.arange(3)}
    little = save_pt(tmp_path / "little.pt", state)
    big = tmp_path / "big.pt"
    with zipfile.ZipFile(little) as src, zipfile.ZipFile(big, "w") as dst:
        sizes = {k: v.element_size() for k, v in state.items()}
        order = list(sizes.values())  # storages are numbered in the order torch met them
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("/byteorder"):
                data = b"big"
            elif "/data/" in info.filename and not info.filename.endswith(".pkl"):
                item = order[int(info.filename.rsplit("/", 1)[1])]
                data = np.frombuffer(data, f"<u{item}").byteswap().tobytes()
            dst.writestr(info.filename, data)
    ours, _ = read_pt(big)
    theirs = torch.load(big, weights_only=True)["state"]
    for key, tensor in state.items():
        assert ours[key].tobytes() == tensor.contiguous().view(torch.uint8).numpy().tobytes(), key
        assert ours[key].tobytes() == to_numpy(theirs[key]).tobytes(), key


# dtypes and layouts we do not carry (each used to be a traceback or a silent truncation) --------------------
@pytest.mark.parametrize(
    ("tensor", "words"),
    [
        (lambda: torch.zeros(3, dtype=torch.float8_e4m3fn), "float8_e4m3fn"),
        (lambda: torch.zeros(3, dtype=torch.float8_e5m2), "float8_e5m2"),
        (lambda: torch.zeros(2, dtype=torch.complex64), "complex64"),
        (lambda: torch.eye(3).to_sparse(), "sparse layout (float32)"),
        (lambda: torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.quint8), "quantized layout (quint8)"),
    ],
)
def test_dtypes_and_layouts_we_do_not_carry_are_refused_by_name(
    tmp_path: Path, tensor: Any, words: str
) -> None:
    with pytest.warns() if "quantized" in words else contextlib.nullcontext():
        path = save_pt(tmp_path / "w.pt", {"ok": torch.ones(2), "odd.weight": tensor()})
    with pytest.raises(UserError) as err:
        read_birder_file(path)
    message = str(err.value)
    assert "'odd.weight'" in message and words in message and "\n" not in message and str(path) in message


# not a weights file -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("opcode", [b"\x80", b"(", b"}", b"c", b"K"])
def test_random_bytes_starting_with_a_pickle_opcode(tmp_path: Path, opcode: bytes) -> None:
    path = tmp_path / "noise.pt"
    path.write_bytes(opcode + np.random.default_rng(0).bytes(4095))
    with pytest.raises(UserError) as err:
        read_birder_file(path)
    assert str(err.value) == f"{path}: {NOT_WEIGHTS}"


def test_random_bytes_on_the_command_line_are_one_line_without_torchs_advice(tmp_path: Path) -> None:
    path = tmp_path / "noise.pt"
    path.write_bytes(b"\x80\x02" + np.random.default_rng(1).bytes(4094))
    done = subprocess.run(
        [sys.executable, "-m", "vitreg_jax.cli.main", "info", str(path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert done.returncode == 2
    assert done.stderr.splitlines() == [f"vitreg-jax info: error: {path}: {NOT_WEIGHTS}"]


def test_the_pre_zip_torch_format_is_refused_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "old.pt"
    torch.save({"state": {"a": torch.ones(2)}}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(UserError, match="pre-1.6 .*birder never wrote") as err:
        read_birder_file(path)
    assert "\n" not in str(err.value)


# crafted archives: pickles that would run code, and claims past the data ------------------------------------
def craft(path: Path, pickled: bytes, records: dict[str, bytes] | None = None) -> Path:
    """A torch-style zip: ``archive/data.pkl`` plus ``archive/data/<key>`` records."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pickled)
        zf.writestr("archive/byteorder", b"little")
        zf.writestr("archive/version", b"3\n")
        for key, data in (records or {"0": b"\0" * 16}).items():
            zf.writestr(f"archive/data/{key}", data)
    return path


def _s(text: str) -> bytes:
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def tensor_pickle(
    *,
    storage: str = "FloatStorage",
    key: str = "0",
    numel: int = 4,
    offset: int = 0,
    shape: tuple[int, ...] = (4,),
    stride: tuple[int, ...] = (1,),
) -> bytes:
    """``{"state": {"a": <tensor>}}`` exactly as torch pickles it, with every claim chosen by the test."""

    def ints(values: tuple[int, ...]) -> bytes:
        return b"(" + b"".join(b"\x8a\x08" + struct.pack("<q", v) for v in values) + b"t"

    return (
        b"\x80\x02}("
        + _s("state")
        + b"}("
        + _s("a")
        + b"ctorch._utils\n_rebuild_tensor_v2\n(("
        + _s("storage")
        + f"ctorch\n{storage}\n".encode()
        + _s(key)
        + _s("cpu")
        + b"\x8a\x08"
        + struct.pack("<q", numel)
        + b"tQ"
        + b"\x8a\x08"
        + struct.pack("<q", offset)
        + ints(shape)
        + ints(stride)
        + b"\x89ccollections\nOrderedDict\n)RtRuu."
    )


def test_the_crafted_tensor_pickle_is_what_torch_reads(tmp_path: Path) -> None:
    path = craft(tmp_path / "w.pt", tensor_pickle(), {"0": np.arange(4, dtype=np.float32).tobytes()})
    assert_same_as_torch(path)


@pytest.mark.parametrize(
    ("claim", "words"),
    [
        ({"numel": 5}, "claims 20 bytes"),
        ({"numel": 1 << 60, "shape": (1 << 60,)}, "claims"),
        ({"shape": (5,)}, "past its storage"),
        ({"offset": 1}, "past its storage"),
        ({"shape": (2, 3), "stride": (3, 1)}, "past its storage"),
        ({"shape": (1 << 40,), "stride": (0,)}, "past its storage"),  # an expanded view would allocate 4 TiB
        ({"shape": (1 << 62, 0), "stride": (1, 1)}, "implausibly large"),
        ({"shape": (0, 3), "stride": (3, 1)}, None),
        ({"key": "../data.pkl"}, "outside the archive"),
        ({"key": "7"}, "outside the archive"),
        ({"storage": "ComplexFloatStorage"}, "complex64"),
    ],
)
def test_claims_past_the_data_are_refused_before_allocating(
    tmp_path: Path, claim: dict[str, Any], words: str | None
) -> None:
    path = craft(tmp_path / "w.pt", tensor_pickle(**claim), {"0": b"\0" * 16})
    tracemalloc.start()
    try:
        try:
            state, _ = read_pt(path)
        except UserError as e:
            assert words is not None and words in str(e) and "\n" not in str(e), str(e)
        else:
            assert words is None and state["a"].size == 0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < path.stat().st_size + 65536


def test_a_small_file_cannot_claim_more_copies_than_it_holds(tmp_path: Path) -> None:
    """Many strided views of one storage: each copy is small, their sum is bounded by the file's size."""
    views = b"".join(
        _s(f"v{i}") + b"h\x01(h\x02K\x00(K\x40K\x40t(K\x01K\x40t\x89h\x03)RtR" for i in range(400)
    )
    pickled = (
        b"\x80\x02}("
        + _s("state")
        + b"}("
        + _s("first")
        + b"ctorch._utils\n_rebuild_tensor_v2\nq\x01(("
        + _s("storage")
        + b"ctorch\nFloatStorage\n"
        + _s("0")
        + _s("cpu")
        + b"M\x00\x10tQq\x02K\x00(M\x00\x10t(K\x01t\x89ccollections\nOrderedDict\nq"
        + b"\x03)RtR"
        + views
        + b"uu."
    )
    path = craft(tmp_path / "w.pt", pickled, {"0": b"\0" * 16384})
    with pytest.raises(UserError, match="claims more data than the file holds"):
        read_pt(path)


class Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.marker, "w"))


@pytest.mark.parametrize(
    ("what", "pickled", "words"),
    [
        ("REDUCE of os.system", b"\x80\x02cos\nsystem\n" + _s("touch MARK") + b"\x85R.", "os.system"),
        ("a global behind torch", b"\x80\x02ctorch\nload\n" + _s("MARK") + b"\x85R.", "torch.load"),
        (
            "STACK_GLOBAL",
            b"\x80\x04" + _s("builtins") + _s("eval") + b"\x93" + _s("1") + b"\x85R.",
            "builtins.eval",
        ),
        ("a nested pickle", b"\x80\x02c_pickle\nloads\nC\x02N.\x85R.", "_pickle.loads"),
        ("INST", b"(S'MARK'\nios\nsystem\n.", "INST"),
        ("OBJ", b"\x80\x02(cos\nsystem\n" + _s("MARK") + b"o.", "os.system"),
        ("NEWOBJ", b"\x80\x02}(" + _s("state") + b"ccollections\nOrderedDict\n)\x81u.", "NEWOBJ"),
        (
            "BUILD on a storage class",
            b"\x80\x02ctorch\nFloatStorage\n}(" + _s("x") + b"K\x01ub.",
            "FloatStorage",
        ),
        ("BUILD on a list", b"\x80\x02](K\x01e}b.", "list"),
        ("a persistent id that is not a storage", b"\x80\x02" + _s("/etc/passwd") + b"Q.", "not a storage"),
        ("EXT1", b"\x80\x02\x82\x01.", "EXT1"),
    ],
)
def test_a_pickle_that_would_run_code_is_refused_before_anything_runs(
    tmp_path: Path, what: str, pickled: bytes, words: str
) -> None:
    path = craft(tmp_path / "evil.pt", pickled.replace(b"MARK", str(tmp_path / "marker").encode()))
    with pytest.raises(UserError, match="refused") as err:
        read_birder_file(path)
    assert words in str(err.value) and "nothing was run" in str(err.value), what
    assert "\n" not in str(err.value)
    assert not (tmp_path / "marker").exists()


def test_torch_saved_payloads_are_refused_and_real(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    path = save_pt(tmp_path / "evil.pt", {"a": torch.ones(2)}, rgb_stats=Evil(marker))
    with pytest.raises(UserError, match=r"refused: .*\.open, "):
        read_birder_file(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is real
    assert marker.exists()


def test_build_on_a_state_dict_is_harmless_and_dropped(tmp_path: Path) -> None:
    """birder's state dicts carry ``_metadata`` (BUILD on the OrderedDict): read, never set, not returned."""
    net = torch.nn.Linear(2, 3)
    path = save_pt(tmp_path / "w.pt", net.state_dict())
    assert b"_metadata" in zipfile.ZipFile(path).read("w/data.pkl")
    state, _ = read_pt(path)
    assert not hasattr(state, "_metadata") and list(state) == ["weight", "bias"]


def test_pickled_python_metadata_reads_as_torch_reads_it(tmp_path: Path) -> None:
    meta = {
        "config": {"a": None, "b": True, "c": -3, "d": 1e-6, "e": 2**70, "f": "é", "g": [1, (2, 3)]},
        "class_to_idx": {"x": 0},
        "tags": {1, 2},
        "blob": b"\x00\xff",
        "rgb_stats": RGB,
    }
    for protocol in (2, 4, 5):
        path = tmp_path / f"p{protocol}.pt"
        torch.save({"state": {"a": torch.ones(2)}, **meta}, path, pickle_protocol=protocol)
        _, ours = read_pt(path)
        assert ours == _plain(meta)
    protocol0 = pickle.dumps({"state": {}, "x": [1, 2.5, "s", None]}, protocol=0)
    assert read_pt(craft(tmp_path / "p0.pt", protocol0))[1] == {"x": [1, 2.5, "s", None]}


def test_zip_damage_is_one_line(tmp_path: Path) -> None:
    good = save_pt(tmp_path / "good.pt", {"a": torch.randn(64)})
    data = good.read_bytes()
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        info = zf.getinfo("good/data/0")
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    cases = {
        "truncated": data[: len(data) - 100],
        "flipped data byte": _flip(data, info.header_offset + 30 + name_len + extra_len + 3),
        "local header names another record": _flip(data, info.header_offset + 30),
        "no data.pkl": data.replace(b"good/data.pkl", b"good/data.pkk"),
        "empty": b"",
    }
    for what, raw in cases.items():
        path = tmp_path / "bad.pt"
        path.write_bytes(raw)
        with pytest.raises(UserError) as err:
            read_birder_file(path)
        message = str(err.value)
        expected = NOT_WEIGHTS if what == "empty" else DAMAGED
        assert message.startswith(f"{path}: {expected}") and "\n" not in message, what


def _flip(data: bytes, at: int) -> bytes:
    out = bytearray(data)
    out[at] ^= 0xFF
    return bytes(out)


def test_the_old_torch_path_kept_for_benchmarks_reads_the_same(tmp_path: Path) -> None:
    from tests.support.torch_pt_reader import read_pt_with_torch

    state = {"a": torch.randn(3, 4), "b": torch.randn(5).to(torch.bfloat16), "c": torch.arange(3)}
    path = save_pt(tmp_path / "w.pt", state, config=TINY_BIRDER)
    (ours, ours_meta), (old, old_meta) = read_pt(path), read_pt_with_torch(path)
    assert ours_meta == old_meta and list(ours) == list(old)
    assert all(ours[k].dtype == old[k].dtype and ours[k].tobytes() == old[k].tobytes() for k in ours)


def test_deflated_records_are_read_and_bounded(tmp_path: Path) -> None:
    """torch.save never compresses, but a re-zipped file reads the same; a record claiming to inflate past the
    file's own size is refused before it is inflated (so nothing allocated is larger than the file)."""
    stored = save_pt(tmp_path / "w.pt", {"a": torch.randn(64), "b": torch.randn(4096)})
    deflated = tmp_path / "deflated.pt"
    with zipfile.ZipFile(stored) as src, zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    assert zipfile.ZipFile(deflated).getinfo("w/data/1").compress_type == zipfile.ZIP_DEFLATED
    ours, _ = read_pt(deflated)
    want, _ = read_pt(stored)
    assert all(ours[k].tobytes() == want[k].tobytes() for k in want)
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as dst:
        dst.writestr("bomb/data.pkl", tensor_pickle(numel=1 << 22, shape=(1 << 22,)))
        dst.writestr("bomb/data/0", bytes(16 << 20))  # 16 MiB of zeros in a few KiB
    assert bomb.stat().st_size < 1 << 20
    with pytest.raises(UserError, match="larger than the whole file"):
        read_pt(bomb)


def test_zip64_records_as_files_over_4_gib_write_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every size and offset in zip64 fields (as in a file over 4 GiB): torch, zipfile and our reader
    agree."""
    from vitreg_jax.convert.formats import pt_writer
    from vitreg_jax.convert.formats.birder_file import write_pt

    monkeypatch.setattr(pt_writer, "ZIP64_FROM", 0)
    state = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(5, np.float16)}
    path = tmp_path / "w.pt"
    write_pt(path, state, {"birder_version": "v0.8.4"})
    with zipfile.ZipFile(path) as zf:
        assert zf.testzip() is None and all(i.extra[:2] == b"\x01\x00" for i in zf.infolist())
    assert_same_as_torch(path)
    ours, _ = read_pt(path)
    assert all(ours[k].tobytes() == v.tobytes() for k, v in state.items())


@pytest.mark.parametrize("zip64", [False, True])
def test_written_records_are_stored_and_64_byte_aligned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, zip64: bool
) -> None:
    from vitreg_jax.convert.formats import pt_writer
    from vitreg_jax.convert.formats.birder_file import write_pt

    if zip64:
        monkeypatch.setattr(pt_writer, "ZIP64_FROM", 0)
    path = tmp_path / "w.pt"
    write_pt(path, {f"t{i}": np.ones(i, np.float32) for i in range(1, 9)}, {})
    data = path.read_bytes()
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            name_len, extra_len = struct.unpack(
                "<HH", data[info.header_offset + 26 : info.header_offset + 30]
            )
            assert info.compress_type == zipfile.ZIP_STORED, info.filename
            assert (info.header_offset + 30 + name_len + extra_len) % 64 == 0, info.filename
    state, _ = read_pt(path)
    assert all(isinstance(_root(a), np.memmap) for a in state.values())


def _root(a: np.ndarray) -> object:
    while a.base is not None and not isinstance(a, np.memmap):
        a = a.base
    return a
