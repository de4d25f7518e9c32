"""vitreg_jax.model.precision: one compute policy for the Embedder and the trainer ("auto", fp32 at "highest",
the cast rule), and the one data mesh."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.support.tiny_models import SIZE, TINY_EMBEDDER_ONE_BLOCK, tiny_mae, tiny_vit
from vitreg_jax.embedding.embedder import Embedder, make_embed_fn
from vitreg_jax.errors import UserError
from vitreg_jax.model.precision import (
    DTYPE_CHOICES,
    DTYPE_HELP,
    DTYPES,
    ComputePolicy,
    choose_policy,
    cpu_has_native_bf16,
    param_name,
    resolve_dtype,
)
from vitreg_jax.parallel import DATA_AXIS, default_mesh
from vitreg_jax.pretraining.config import TrainConfig
from vitreg_jax.pretraining.step import MAETrainer

# /proc/cpuinfo "flags" lines: an AVX2-only EPYC (Zen 2), a Sapphire Rapids Xeon (AMX), a Zen 4 (AVX512-BF16)
AVX2_ONLY = "processor\t: 0\nflags\t\t: fpu vme sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma bmi1 bmi2 sha_ni\n"
AMX = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 avx512f avx512bw avx512_vnni amx_bf16 amx_tile amx_int8\n"
AVX512_BF16 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 avx512f avx512bw avx512_bf16 avx512_vnni\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes sha1 sha2 crc32 bf16 i8mm\n"


def dot_precisions(closed: jax.extend.core.ClosedJaxpr) -> list[str]:
    """The precision of every ``dot_general`` in a jaxpr, nested ones (jit, shard_map, scan, cond)
    included."""
    found: list[str] = []

    def walk(jaxpr: jax.extend.core.Jaxpr) -> None:
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                found.append(str(eqn.params["precision"]))
            for value in eqn.params.values():
                for sub in value if isinstance(value, (list, tuple)) else (value,):
                    if isinstance(sub, jax.extend.core.ClosedJaxpr):
                        walk(sub.jaxpr)
                    elif isinstance(sub, jax.extend.core.Jaxpr):
                        walk(sub)

    walk(closed.jaxpr)
    return found


HIGHEST = str((jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST))


def embedder_dots(embedder: Embedder) -> list[str]:
    x = np.zeros((embedder.buckets[0], *SIZE, 3), np.float32)
    return dot_precisions(jax.make_jaxpr(embedder._jitted)(embedder.params, x))


def trainer_dots(trainer: MAETrainer) -> list[str]:
    batch = trainer.put_batch(np.zeros((1, 2, *SIZE, 3), np.float32))
    return dot_precisions(jax.make_jaxpr(trainer._step)(trainer.init_state(), batch, jnp.float32(1e-3), None))


# "auto" --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("cpuinfo", "machine", "native"),
    [
        (AVX2_ONLY, "x86_64", False),
        (AMX, "x86_64", True),
        (AVX512_BF16, "x86_64", True),
        (AVX512_BF16, "AMD64", True),
        (ARM, "aarch64", False),
        (AMX, "arm64", False),
        ("", "x86_64", False),
    ],
)
def test_cpu_has_native_bf16(cpuinfo, machine, native):
    assert cpu_has_native_bf16(cpuinfo, machine) is native


def test_auto_resolves_by_platform_and_cpu_flags():
    assert resolve_dtype("auto", platform="cpu", cpuinfo=AVX2_ONLY) == "float32"
    assert resolve_dtype("auto", platform="cpu", cpuinfo=AMX) == "bfloat16"
    assert resolve_dtype("auto", platform="cpu", cpuinfo=AVX512_BF16) == "bfloat16"
    for accelerator in ("gpu", "tpu"):
        assert resolve_dtype("auto", platform=accelerator, cpuinfo=AVX2_ONLY) == "bfloat16"
    for dtype in DTYPES:  # explicit choices stand, whatever the hardware
        assert resolve_dtype(dtype, platform="cpu", cpuinfo=AMX) == dtype
        assert resolve_dtype(dtype, platform="gpu") == dtype
    assert resolve_dtype(jnp.bfloat16) == "bfloat16" and resolve_dtype(np.float32) == "float32"
    # this process: the platform JAX runs on, and this CPU's own flags
    here = "bfloat16" if jax.default_backend() != "cpu" or cpu_has_native_bf16() else "float32"
    assert resolve_dtype("auto") == here
    assert ComputePolicy.create("auto", platform="cpu", cpuinfo=AVX2_ONLY).dtype == "float32"
    assert ComputePolicy.create("auto", platform="cpu", cpuinfo=AMX).dtype == "bfloat16"


def test_cpu_flags_are_read_from_cpuinfo(tmp_path, monkeypatch):
    from vitreg_jax.model import precision as policy

    path = tmp_path / "cpuinfo"
    monkeypatch.setattr(policy, "CPUINFO_PATH", str(path))
    monkeypatch.setattr(policy.platform_module, "machine", lambda: "x86_64")
    monkeypatch.setattr(policy.sys, "platform", "linux")
    for text, native in ((AVX2_ONLY, False), (AMX, True), (AVX512_BF16, True)):
        path.write_text(text)
        assert cpu_has_native_bf16() is native
        assert resolve_dtype("auto", platform="cpu") == ("bfloat16" if native else "float32")
    path.unlink()  # unreadable: float32
    assert cpu_has_native_bf16() is False


@pytest.mark.parametrize("bad", ["float16", "fp32", "", None, jnp.int32])
def test_bad_dtypes_are_user_errors(bad):
    with pytest.raises(UserError, match="dtype must be one of auto, float32, bfloat16"):
        resolve_dtype(bad, platform="cpu")


def test_dtype_list_and_help():
    assert DTYPE_CHOICES == ("auto", *DTYPES) and DTYPES == ("float32", "bfloat16")
    for words in ("AVX2", "GPU/TPU", "AVX512-BF16", "slower than float32", "highest"):
        assert words in DTYPE_HELP, words
    with pytest.raises(UserError, match="compute_dtype must be one of auto, float32, bfloat16"):
        TrainConfig(steps=2, compute_dtype="float16")
    assert TrainConfig(steps=2, compute_dtype="auto").compute_dtype == "auto"


def test_policy_is_frozen_and_resolved():
    policy = ComputePolicy("bfloat16")
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.dtype = "float32"  # type: ignore[misc]
    with pytest.raises(UserError, match="ComputePolicy.create resolves 'auto'"):
        ComputePolicy("auto")
    assert ComputePolicy().matmul_precision == "highest" and policy.matmul_precision is None
    assert policy.compute_dtype == jnp.bfloat16


def test_choose_policy():
    bf16 = ComputePolicy("bfloat16")
    assert choose_policy(None, None).dtype == "float32"
    assert choose_policy("bfloat16", None) == bf16
    assert choose_policy(None, bf16) is bf16 and choose_policy("bfloat16", bf16) is bf16
    with pytest.raises(UserError, match="disagrees with the compute policy's 'bfloat16'"):
        choose_policy("float32", bf16)


def test_importing_the_policy_does_not_import_jax():
    code = "import sys, vitreg_jax.model.precision as p; print(p.DTYPE_CHOICES, 'jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split()[-1] == "False", out.stdout


# precision -----------------------------------------------------------------------------------------------
def test_under_precision_pins_highest_for_float32_only():
    a = jnp.ones((4, 4))

    def f(x: jax.Array) -> jax.Array:
        return x @ x

    with jax.default_matmul_precision("default"):  # an ambient setting that is not "highest"
        plain = dot_precisions(jax.make_jaxpr(f)(a))
        fp32 = dot_precisions(jax.make_jaxpr(ComputePolicy("float32").under_precision(f))(a))
        bf16 = dot_precisions(jax.make_jaxpr(ComputePolicy("bfloat16").under_precision(f))(a))
    assert plain == bf16 != [HIGHEST]  # the control: without the policy the dot is not at "highest"
    assert fp32 == [HIGHEST]


def test_embedder_and_trainer_share_one_policy_and_fp32_is_highest_in_both():
    """Traced under an ambient "default" precision (conftest's global "highest" would hide a missing pin),
    every matmul of the fp32 Embedder and of the fp32 train step (forward and backward) is at "highest"."""
    mae = tiny_mae(TINY_EMBEDDER_ONE_BLOCK)
    embedder = Embedder(mae.encoder, batch_size=2)
    trainer = MAETrainer(mae, TrainConfig(batch_size=2, steps=2))
    assert type(embedder.policy) is type(trainer.policy) is ComputePolicy
    assert embedder.policy == trainer.policy == ComputePolicy("float32")
    with jax.default_matmul_precision("default"):
        embed_dots, train_dots = embedder_dots(embedder), trainer_dots(trainer)
        bf16_dots = embedder_dots(Embedder(mae.encoder, dtype="bfloat16", batch_size=2))
    assert embed_dots and set(embed_dots) == {HIGHEST}, set(embed_dots)
    assert len(train_dots) > 2 * len(embed_dots) and set(train_dots) == {HIGHEST}, set(train_dots)
    assert HIGHEST not in bf16_dots  # the control: bf16 leaves the ambient precision alone


def test_cast_rule_is_the_same_for_embedding_and_training():
    """The same leaves are cast to bf16 by the Embedder (an nnx.State) and the train step (a nested dict)."""
    mae = tiny_mae(TINY_EMBEDDER_ONE_BLOCK)
    embedder = Embedder(mae.encoder, dtype="bfloat16", batch_size=2)
    trainer = MAETrainer(mae, TrainConfig(batch_size=2, steps=2, compute_dtype="bfloat16"))
    assert embedder.policy == trainer.policy == ComputePolicy("bfloat16")
    params = trainer.compute_params(trainer.init_state()["params"])
    train_leaves = dict(jax.tree_util.tree_leaves_with_path(params["encoder"]))
    embed_leaves = dict(jax.tree_util.tree_leaves_with_path(embedder.params))
    train_bf16 = {param_name(p) for p, v in train_leaves.items() if v.dtype == jnp.bfloat16}
    embed_bf16 = {param_name(p) for p, v in embed_leaves.items() if v.dtype == jnp.bfloat16}
    assert {param_name(p) for p in train_leaves} == {param_name(p) for p in embed_leaves}
    # every dense layer's kernel and the patch projection's, nothing else
    expected = {("conv_proj", "kernel")} | {
        ("encoder", "block", 0, *layer, "kernel")
        for layer in (("attn", "qkv"), ("attn", "proj"), ("mlp", "fc1"), ("mlp", "fc2"))
    }
    assert train_bf16 == embed_bf16 == expected
    rest = [
        v.dtype for p, v in (*train_leaves.items(), *embed_leaves.items()) if param_name(p) not in expected
    ]
    assert rest and set(rest) == {jnp.dtype(jnp.float32)}
    assert (
        trainer.policy.cast_names(params["encoder"])
        == embedder.policy.cast_names(embedder.params)
        == expected
    )


def test_cast_params_keeps_non_float_leaves_and_makes_the_rest_float32():
    tree = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2, jnp.bfloat16)}, "count": jnp.int32(3)}
    cast = ComputePolicy("bfloat16").cast_params(tree)
    assert cast["dense"]["kernel"].dtype == jnp.bfloat16 and cast["dense"]["bias"].dtype == jnp.float32
    assert cast["count"].dtype == jnp.int32
    assert ComputePolicy("float32").cast_params(tree)["dense"]["kernel"].dtype == jnp.float32


def test_make_embed_fn_takes_the_policy():
    net = tiny_vit(TINY_EMBEDDER_ONE_BLOCK)
    _, params = make_embed_fn(net, policy=ComputePolicy("bfloat16"))
    assert ComputePolicy("bfloat16").cast_names(params) == {
        param_name(p) for p, v in jax.tree_util.tree_leaves_with_path(params) if v.dtype == jnp.bfloat16
    }


# the mesh ------------------------------------------------------------------------------------------------
def test_default_mesh():
    mesh = default_mesh()
    assert mesh.axis_names == (DATA_AXIS,) == ("data",)
    assert list(mesh.devices.flat) == sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    assert default_mesh(jax.devices()[:1]).devices.size == 1
    with pytest.raises(UserError, match="at least one device"):
        default_mesh([])


MESH_SCRIPT = textwrap.dedent("""
    import json, jax
    from vitreg_jax.parallel import default_mesh
    devices = jax.devices()
    mesh = default_mesh(list(reversed(devices)))
    print(json.dumps([d.id for d in mesh.devices.flat] == sorted(d.id for d in devices)))
""")


def test_default_mesh_orders_devices_over_four_host_devices():
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-c", MESH_SCRIPT],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(out.stdout.splitlines()[-1]) is True
