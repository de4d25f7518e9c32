"""vitreg_jax.embedding.embedder: the compiled embedder equals net.embedding, buckets compile once, bf16 is
close, sharding exact."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings

import jax
import numpy as np
import pytest

from tests.support.tiny_models import SIZE, TINY_EMBEDDER, tiny_vit
from tests.support.tolerances import EMBEDDER_BF16_MIN_COSINE, EMBEDDER_FP32_ATOL
from vitreg_jax.embedding.embedder import (
    CPU_XLA_FLAGS,
    Embedder,
    bucket_sizes,
    configure_xla_flags,
    make_embed_fn,
)
from vitreg_jax.errors import UserError
from vitreg_jax.model.precision import ComputePolicy, resolve_dtype
from vitreg_jax.model.vit import ViT


@pytest.fixture(scope="module")
def net() -> ViT:
    return tiny_vit()


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(11, *SIZE, 3)).astype(np.float32)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def assert_close(ours: np.ndarray, ref: np.ndarray, atol: float, what: str) -> None:
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} vs {ref.shape}"
    diff = np.abs(ours - ref)
    assert diff.max() <= atol, (
        f"{what}: max |diff| {diff.max():.2e} > {atol:.0e} at {np.unravel_index(diff.argmax(), diff.shape)}"
    )


def test_fp32_equals_net_embedding(net, images):
    embedder = Embedder(net, batch_size=8)  # 11 images: a full bucket of 8 (micro-batched) + a padded 4
    out = embedder(images)
    assert out.dtype == np.float32
    assert_close(out, np.asarray(net.embedding(images)), EMBEDDER_FP32_ATOL, "Embedder fp32 vs net.embedding")


def test_prime_batch_is_padded_to_micro_batches_not_split_into_ones(net, images):
    """11 rows with micro-batch 4: padded to 3 steps of 4 (not 11 steps of 1); padding never leaks into
    rows."""
    from vitreg_jax.embedding.embedder import _micro_size

    assert (_micro_size(11, 4), _micro_size(12, 4), _micro_size(10, 4), _micro_size(3, 4)) == (4, 4, 2, 3)
    embed, params = make_embed_fn(net, micro_batch=4)
    assert_close(
        np.asarray(embed(params, images)),
        np.asarray(net.embedding(images)),
        EMBEDDER_FP32_ATOL,
        "11 rows micro-batched by 4 vs net.embedding",
    )


def test_make_embed_fn_equals_net(net, images):
    embed, params = make_embed_fn(net, features="tokens", micro_batch=None)
    assert_close(
        np.asarray(embed(params, images[:3])),
        np.asarray(net.forward_features(images[:3])),
        EMBEDDER_FP32_ATOL,
        "make_embed_fn tokens vs forward_features",
    )


def test_features_and_any_size(net):
    x = np.random.default_rng(1).normal(size=(3, 48, 40, 3)).astype(np.float32)  # not the stored 32x32 grid
    tokens = np.asarray(net.forward_features(x))
    s = net.cfg.num_special_tokens
    for features, ref in (
        ("tokens", tokens),
        ("patches", tokens[:, s:]),
        ("cls", np.asarray(net.embedding(x))),
    ):
        out = Embedder(net, features=features, batch_size=4)(x)
        assert_close(out, ref, EMBEDDER_FP32_ATOL, f"features={features} at 48x40")
    assert Embedder(net, features="patches").output_shape(48, 40) == (30, 64)


def test_bf16_close_to_fp32(net, images):
    embedder = Embedder(net, dtype="bfloat16", batch_size=16)
    leaves = jax.tree_util.tree_leaves_with_path(embedder.params)
    kernel_dtypes = {str(v.dtype) for p, v in leaves if any(getattr(k, "key", None) == "kernel" for k in p)}
    other_dtypes = {
        str(v.dtype) for p, v in leaves if not any(getattr(k, "key", None) == "kernel" for k in p)
    }
    assert kernel_dtypes == {"bfloat16"} and other_dtypes == {"float32"}
    out = embedder(images)
    assert out.dtype == np.float32
    cos = cosine(out, np.asarray(net.embedding(images)))
    assert cos.min() >= EMBEDDER_BF16_MIN_COSINE, f"bf16 cosine to fp32: min {cos.min():.6f}"


def test_dtype_auto_and_policy(net):
    """``dtype="auto"`` resolves for the mesh's platform (here the CPU); ``policy=`` is taken as given."""
    auto = Embedder(net, dtype="auto", batch_size=2)
    assert auto.dtype == auto.policy.dtype == resolve_dtype("auto", platform=jax.default_backend())
    assert isinstance(auto.policy, ComputePolicy)
    bf16 = Embedder(net, policy=ComputePolicy("bfloat16"), batch_size=2)
    assert bf16.dtype == "bfloat16" and Embedder(net, batch_size=2).policy == ComputePolicy("float32")
    assert {str(v.dtype) for v in jax.tree_util.tree_leaves(bf16.params)} == {"bfloat16", "float32"}
    with pytest.raises(UserError, match="disagrees with the compute policy"):
        Embedder(net, dtype="float32", policy=ComputePolicy("bfloat16"))


def test_one_compilation_per_bucket(net, images):
    embedder = Embedder(net, batch_size=8)
    assert embedder.buckets == (1, 2, 4, 8)
    ref = np.asarray(net.embedding(images))
    sizes = [3, 8, 5, 1, 8, 2, 7, 11, 4, 6, 1, 9]  # ragged stream; 11 and 9 run as 8 + a smaller bucket
    for n in sizes:
        assert_close(embedder(images[:n]), ref[:n], EMBEDDER_FP32_ATOL, f"batch of {n}")
    assert embedder.compile_count == 4, embedder.compile_seconds
    assert sorted(b for b, _, _ in embedder.compile_seconds) == [1, 2, 4, 8]
    embedder(images[:8])
    assert embedder.compile_count == 4


def test_stream_and_empty(net, images):
    embedder = Embedder(net, batch_size=4)
    outs = list(embedder.stream([images[:4], images[4:5], images[5:5], images[5:11]]))
    assert [len(o) for o in outs] == [4, 1, 0, 6]
    assert_close(np.concatenate(outs), np.asarray(net.embedding(images)), EMBEDDER_FP32_ATOL, "stream")
    assert embedder(np.zeros((0, *SIZE, 3), np.float32)).shape == (0, 64)


def test_bad_inputs_are_user_errors(net):
    embedder = Embedder(net)
    with pytest.raises(UserError, match="not a positive multiple of the patch size 8"):
        embedder(np.zeros((1, 30, 32, 3), np.float32))
    with pytest.raises(UserError, match=r"expected images as \(N, H, W, 3\)"):
        embedder(np.zeros((32, 32, 3), np.float32))
    with pytest.raises(UserError, match="dtype must be one of auto, float32, bfloat16, got 'float16'"):
        Embedder(net, dtype="float16")
    with pytest.raises(UserError, match="features must be one of"):
        Embedder(net, features="mean")


def test_bucket_sizes():
    assert bucket_sizes(64) == (1, 2, 4, 8, 16, 32, 64)
    assert bucket_sizes(48) == (1, 2, 4, 8, 16, 32, 48)
    assert bucket_sizes(6, multiple=4) == (4, 8)  # rounded up so every device gets the same rows
    assert bucket_sizes(1) == (1,)
    with pytest.raises(UserError):
        bucket_sizes(0)


def test_configure_xla_flags(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--user-choice")
    assert configure_xla_flags("float32") is None and os.environ["XLA_FLAGS"] == "--user-choice"
    monkeypatch.delenv("XLA_FLAGS")
    jax.devices()  # this process has started JAX: too late, say so, change nothing
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert configure_xla_flags("float32") is None
    assert "XLA_FLAGS" not in os.environ and any("cannot be applied" in str(w.message) for w in caught)


def test_configure_xla_flags_before_jax_starts():
    code = textwrap.dedent("""
        import json, os
        from vitreg_jax.embedding.embedder import configure_xla_flags
        a = configure_xla_flags("bfloat16"); b = os.environ.get("XLA_FLAGS")
        c = configure_xla_flags("float32"); d = os.environ.get("XLA_FLAGS")
        print(json.dumps([a, b, c, d]))
    """)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.splitlines()[-1]) == [
        "",
        None,
        CPU_XLA_FLAGS["float32"],
        CPU_XLA_FLAGS["float32"],
    ]


AUTO_FLAGS_SCRIPT = textwrap.dedent("""
    import json, os, platform, sys
    import vitreg_jax.model.precision
    from vitreg_jax.embedding.embedder import _backends_started, configure_xla_flags
    vitreg_jax.model.precision.CPUINFO_PATH = sys.argv[1]  # this CPU's flags, as the test wrote them
    platform.machine = lambda: "x86_64"
    flags = configure_xla_flags("auto")
    print(json.dumps([flags, os.environ.get("XLA_FLAGS"), _backends_started()]))
""")


@pytest.mark.parametrize(
    ("cpu_flags", "dtype"), [("avx avx2 fma", "float32"), ("avx2 avx512f avx512_bf16", "bfloat16")]
)
def test_configure_xla_flags_auto_resolves_without_starting_jax(tmp_path, cpu_flags, dtype):
    """ "auto" picks the flags of the dtype it means on this CPU (AVX2-only: float32; AVX512-BF16: bfloat16),
    read from the CPU's flags, and JAX's backends are still not started afterwards."""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: fpu sse2 {cpu_flags}\n")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run(
        [sys.executable, "-c", AUTO_FLAGS_SCRIPT, str(cpuinfo)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    flags, environ, started = json.loads(out.stdout.splitlines()[-1])
    assert flags == CPU_XLA_FLAGS[dtype] and environ == (CPU_XLA_FLAGS[dtype] or None)
    assert started is False


SHARDED_SCRIPT = textwrap.dedent("""
    import json, jax, numpy as np
    jax.config.update("jax_default_matmul_precision", "highest")
    from flax import nnx
    from vitreg_jax.model.config import preset
    from vitreg_jax.embedding.embedder import Embedder
    from vitreg_jax.parallel import default_mesh
    from vitreg_jax.model.vit import ViT
    SIZE = (32, 32)
    net = ViT(preset("vit_reg4_b16", model_config=TINY, image_size=SIZE), rngs=nnx.Rngs(0))
    x = np.random.default_rng(2).normal(size=(13, *SIZE, 3)).astype(np.float32)
    sharded = Embedder(net, batch_size=8)
    single = Embedder(net, batch_size=8, mesh=default_mesh(jax.devices()[:1]))
    exe = sharded.compiled(8, *SIZE)
    y = exe(sharded.params, jax.device_put(x[:8], sharded.batch_sharding))
    a, b = sharded(x), single(x)
    fsdp = Embedder(net, batch_size=8, shard_weights=True)
    c = fsdp(x)
    kernel = fsdp.params["encoder"]["block"][0]["mlp"]["fc1"]["kernel"]
    bias = fsdp.params["encoder"]["block"][0]["mlp"]["fc1"]["bias"]
    print(json.dumps({"devices": len(jax.devices()), "mesh": sharded.num_devices, "buckets": sharded.buckets,
                      "fsdp_max_diff": float(np.abs(c - b).max()),
                      "kernel": [list(kernel.shape), list(kernel.addressable_shards[0].data.shape)],
                      "bias": [list(bias.shape), list(bias.addressable_shards[0].data.shape)],
                      "out_devices": len(y.sharding.device_set),
                      "shards": [s.data.shape[0] for s in y.addressable_shards],
                      "max_diff": float(np.abs(a - b).max()),
                      "max_diff_eager": float(np.abs(a - np.asarray(net.embedding(x))).max()),
                      "compiles": sharded.compile_count}))
""")


def test_sharded_over_four_cpu_devices_equals_single_device():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = f"TINY = {TINY_EMBEDDER!r}\n" + SHARDED_SCRIPT
    out = subprocess.run(
        [sys.executable, "-c", code], check=False, env=env, cwd=root, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.splitlines()[-1])
    assert r["devices"] == 4 and r["mesh"] == 4
    assert r["buckets"] == [4, 8]  # multiples of the device count
    assert r["out_devices"] == 4 and r["shards"] == [2, 2, 2, 2]  # the batch is split, not replicated
    assert r["max_diff"] <= EMBEDDER_FP32_ATOL and r["max_diff_eager"] <= EMBEDDER_FP32_ATOL, r
    assert r["compiles"] == 1  # 13 images run as 8 + 5 padded to 8: the one executable compiled above
    # shard_weights: each device holds a quarter of the large weights, and the results do not change
    (k_rows, k_cols), (ks_rows, ks_cols) = r["kernel"]
    assert ks_rows * ks_cols * 4 == k_rows * k_cols, r["kernel"]
    assert r["bias"][0] == r["bias"][1]  # small: whole on every device
    assert r["fsdp_max_diff"] <= EMBEDDER_FP32_ATOL, r
