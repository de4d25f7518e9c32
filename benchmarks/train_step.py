"""MAE train-step throughput, ours against birder's, same config, same batch, same machine, same run.

    python benchmarks/train_step.py                      # vit_reg4_b16 + mae_vit, 224 px, batch 8
    python benchmarks/train_step.py --batch 4 --rounds 3 # quicker
    python benchmarks/train_step.py --torch-compile      # also birder under torch.compile (slow to compile)

GPU (one command on a machine with jax[cuda], torch (CUDA) and birder installed)::

    python benchmarks/train_step.py --gpu                # batch 64, bf16 and fp32, birder eager + compile

One optimizer step is: draw masks, encoder on the kept 25 % of the patches, decoder on all tokens,
masked-pixel loss, backward, AdamW (birder's settings). Each variant runs in its own process, because the best
XLA flags differ between float32 and bf16 on CPU (BENCHMARKS.md), and torch and JAX should not share the
cores:

* ours fp32: ``MAETrainer`` with float32 compute, default XLA flags
  (``--xla_cpu_experimental_ynn_fusion_type=``, which speeds up fp32 inference on this CPU, slows the train
  step down: the variant "YNN fusion off");
* ours bf16: bf16 matmul inputs, float32 accumulation and master weights, default flags;
* birder fp32 / bf16: ``MAE_ViT`` in train mode, ``torch.optim.AdamW(fused=True)`` as in the recipe, bf16 via
  ``torch.amp.autocast(dtype=bfloat16)`` as ``--amp --amp-dtype bfloat16`` does.

The machine is shared and its speed drifts, so the variants are interleaved: every variant runs in its own
process, compiles and warms up, then waits; the parent asks each in turn for one timed step, for ``--rounds``
rounds, so all variants see the same conditions. Images/s is the batch size over the median step time.
Prints one table and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

NO_YNN = "--xla_cpu_experimental_ynn_fusion_type="


def serve(step, warmup: int, describe: dict) -> None:
    """Child loop: warm-up steps (the first compiles), a ready report, then one timed step per stdin line."""
    t0 = time.perf_counter()
    loss = step()
    first = time.perf_counter() - t0
    for _ in range(warmup - 1):
        loss = step()
    print(json.dumps({"ready": True, "first_step_s": first, "loss": loss, **describe}), flush=True)
    for line in sys.stdin:
        if line.strip() != "step":
            break
        t0 = time.perf_counter()
        loss = step()
        print(json.dumps({"step_s": time.perf_counter() - t0, "loss": loss}), flush=True)


def child_ours(args: argparse.Namespace) -> None:
    import jax
    import numpy as np
    from flax import nnx

    from vitreg_jax import MAE, MAETrainer, TrainConfig, ViT, mae_preset, preset

    if args.gpu:  # fp32 means fp32 on both sides (no TF32)
        jax.config.update("jax_default_matmul_precision", "highest")
    vit_cfg = preset(args.network, model_config={"drop_path_rate": 0.0}, image_size=(args.size, args.size))
    model = MAE(ViT(vit_cfg, rngs=nnx.Rngs(0)), mae_preset(args.mae), rngs=nnx.Rngs(1))
    trainer = MAETrainer(model, TrainConfig(batch_size=args.batch, steps=1000, compute_dtype=args.dtype))
    holder = {"state": trainer.init_state()}
    del model
    x = np.random.default_rng(0).standard_normal((1, args.batch, args.size, args.size, 3)).astype(np.float32)
    batch = trainer.put_batch(x)

    def step() -> float:
        holder["state"], metrics = trainer.step(holder["state"], batch, 1.5e-4)
        return float(metrics["loss"])  # waits for the step

    serve(
        step,
        args.warmup,
        {"device": str(jax.devices()[0].device_kind), "xla_flags": os.environ.get("XLA_FLAGS", "")},
    )


def birder_step(
    network: str, mae: str, size: int, batch: int, dtype: str, *, device: str = "cpu", compile_: bool = False
) -> Callable[[], float]:
    """One optimizer step of birder's recipe (``MAE_ViT`` in train mode, fused AdamW, autocast for bf16) on a
    fixed random batch; returns the loss (which waits for the step)."""
    import numpy as np
    import torch
    from birder.model_registry import registry

    torch.manual_seed(0)
    enc = registry.net_factory(network, 0, 3, config={"drop_path_rate": 0.0}, size=(size, size))
    net = registry.mim_net_factory(mae, enc, size=(size, size)).train().to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05, fused=True)
    step_net = torch.compile(net) if compile_ else net
    x = torch.from_numpy(
        np.random.default_rng(0).standard_normal((batch, 3, size, size), dtype=np.float32)
    ).to(device)

    def step() -> float:
        with torch.amp.autocast(device, enabled=dtype == "bfloat16", dtype=torch.bfloat16):
            loss = step_net(x)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad()
        return float(loss.detach())

    return step


def child_birder(args: argparse.Namespace, compile_: bool) -> None:
    import torch

    if args.gpu:  # fp32 means fp32 on both sides (JAX's GPU matmuls are not TF32 under "highest" either)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    step = birder_step(
        args.network,
        args.mae,
        args.size,
        args.batch,
        args.dtype,
        device="cuda" if args.gpu else "cpu",
        compile_=compile_,
    )
    where = torch.cuda.get_device_name() if args.gpu else f"{torch.get_num_threads()} threads"
    serve(step, args.warmup, {"device": f"torch {torch.__version__}, {where}"})


VARIANTS = {
    "ours fp32": ("ours", "float32", None),
    "ours fp32 (YNN fusion off)": ("ours", "float32", NO_YNN),
    "ours bf16": ("ours", "bfloat16", None),
    "birder fp32": ("birder", "float32", None),
    "birder bf16 autocast": ("birder", "bfloat16", None),
    "birder fp32 torch.compile": ("birder-compile", "float32", None),
    "birder bf16 autocast torch.compile": ("birder-compile", "bfloat16", None),
}


def start_variant(name: str, args: argparse.Namespace) -> subprocess.Popen:
    kind, dtype, flags = VARIANTS[name]
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    if flags:
        env["XLA_FLAGS"] = flags
    cmd = [
        sys.executable,
        __file__,
        "--child",
        kind,
        "--dtype",
        dtype,
        "--network",
        args.network,
        "--mae",
        args.mae,
        "--size",
        str(args.size),
        "--batch",
        str(args.batch),
        "--warmup",
        str(args.warmup),
    ]
    if args.gpu:
        cmd.append("--gpu")
        env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # the JAX and torch children share the GPU
    return subprocess.Popen(
        cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def reply(proc: subprocess.Popen) -> dict:
    line = proc.stdout.readline()
    if not line:
        err = proc.stderr.read().strip().splitlines()
        return {"error": err[-1] if err else f"exit {proc.wait()}"}
    return json.loads(line)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--network", default="vit_reg4_b16")
    p.add_argument("--mae", default="mae_vit")
    p.add_argument("--size", type=int, default=224)
    p.add_argument(
        "--batch", type=int, default=None, help="images per step (default: 8 on CPU, 64 with --gpu)"
    )
    p.add_argument(
        "--rounds", type=int, default=4, help="timed steps per variant, interleaved (median reported)"
    )
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (the first one compiles)")
    p.add_argument("--gap", type=float, default=1.0, help="idle seconds before each timed step (default 1)")
    p.add_argument("--torch-compile", action="store_true", help="also time birder under torch.compile")
    p.add_argument(
        "--gpu",
        action="store_true",
        help="run both sides on the GPU (JAX's default device and torch's cuda), with torch.compile",
    )
    p.add_argument("--only", nargs="+", default=None, choices=sorted(VARIANTS), metavar="VARIANT")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.batch is None:
        args.batch = 64 if args.gpu else 8
    if args.gpu:
        args.torch_compile = True
    if args.child is not None:
        if args.child == "ours":
            child_ours(args)
        else:
            child_birder(args, compile_=args.child == "birder-compile")
        return

    names = args.only or [
        n
        for n in VARIANTS
        if (args.torch_compile or "torch.compile" not in n) and not (args.gpu and "YNN" in n)
    ]
    print(
        f"MAE train step: {args.network} + {args.mae}, {args.size} px, batch {args.batch}; median of "
        f"{args.rounds} interleaved rounds after {args.warmup} warm-up step(s); {platform.machine()}, "
        f"{os.cpu_count()} CPUs",
        flush=True,
    )
    procs, first = {}, {}
    for name in names:  # one at a time: compiling and warming up while the others wait
        procs[name] = start_variant(name, args)
        first[name] = reply(procs[name])
        if "error" in first[name]:
            print(f"  {name:<36} failed: {first[name]['error']}", flush=True)
    live = [n for n in names if "error" not in first[n]]
    times: dict[str, list[float]] = {n: [] for n in live}
    for _ in range(args.rounds):
        for name in live:
            time.sleep(args.gap)  # let the previous variant's threads go idle (OpenMP spins after a region)
            procs[name].stdin.write("step\n")
            procs[name].stdin.flush()
            r = reply(procs[name])
            if "error" in r:
                raise SystemExit(f"{name}: {r['error']}")
            times[name].append(r["step_s"])
    for proc in procs.values():
        if proc.poll() is None:
            proc.stdin.close()
            proc.wait()
    rate = {}
    for name in live:
        step_s = statistics.median(times[name])
        rate[name] = args.batch / step_s
        print(
            f"  {name:<36} {rate[name]:7.2f} img/s   step {step_s:6.2f} s (min {min(times[name]):.2f})   "
            f"first step (compiles) {first[name]['first_step_s']:5.1f} s",
            flush=True,
        )
    for ours, theirs in (
        ("ours fp32", "birder fp32"),
        ("ours bf16", "birder bf16 autocast"),
        ("ours fp32", "birder fp32 torch.compile"),
        ("ours bf16", "birder bf16 autocast torch.compile"),
    ):
        if ours in rate and theirs in rate:
            print(f"  {ours} / {theirs}: {rate[ours] / rate[theirs]:.2f}x")


if __name__ == "__main__":
    main()
