"""Where an MAE train step's time goes on XLA:CPU: the evidence behind BENCHMARKS.md, "MAE train step".

    python benchmarks/train_step_profile.py                    # fp32, vit_reg4_b16 + mae_vit, batch 8
    python benchmarks/train_step_profile.py --dtype bfloat16

Prints, in one process (run it on a quiet machine; ~2 minutes):

1. ours and birder's step time alone (median of ``--steps`` after two warm-up steps);
2. one ``jax.profiler`` trace of our step, its compiled ops summed by kind: dense-layer and attention
   matmuls, layout-copy fusions, other fusions, the AdamW update (the ops inside the step's finite-loss
   conditional); and birder's largest ops in one ``torch.profiler`` trace of its step;
3. CPU time / wall time of a batched (attention-shaped) and of a plain 2-D matmul: XLA:CPU runs the first on
   one thread;
4. AdamW over the same parameters alone: ours (jitted, donated) against torch's ``AdamW(fused=True)``.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import resource
import statistics
import tempfile
import time
from typing import Any


def median_seconds(fn: Any, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cpu_per_wall(fn: Any, n: int) -> float:
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(n):
        fn()
    wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    return (r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime) / wall


def op_kinds(hlo: str) -> dict[str, str]:
    """{instruction name: kind} for the compiled module's fusions and dots."""
    bodies: dict[str, str] = {}
    for m in re.finditer(r"^(?:ENTRY )?%(\S+) .*?\{\n(.*?)\n\}", hlo, flags=re.DOTALL | re.MULTILINE):
        bodies[m.group(1)] = m.group(2)

    def instructions(branch_list: str) -> set[str]:
        names = re.findall(r"%([\w.-]+)", branch_list)
        return {
            n
            for b in names
            for n in re.findall(r"^\s*(?:ROOT )?%(\S+) = ", bodies.get(b, ""), flags=re.MULTILINE)
        }

    # the AdamW update is the conditional with the largest branches (the others are residual_grad_boundary's)
    branch_lists = re.findall(r" conditional\(.*?branch_computations=\{([^}]*)\}", hlo)
    in_adamw = max((instructions(b) for b in branch_lists), key=len, default=set())
    kinds = {}
    for m in re.finditer(r"^\s*(?:ROOT )?%(\S+) = \S+ (fusion|dot)\((.*)$", hlo, flags=re.MULTILINE):
        name, op, rest = m.groups()
        calls = re.search(r"calls=%([\w.-]+)", rest)
        body = bodies.get(calls.group(1), "") if calls else ""
        if name in in_adamw:
            kinds[name] = "AdamW update"
        elif (op == "dot" and "lhs_batch_dims" in rest) or re.search(r" dot\(.*lhs_batch_dims", body):
            kinds[name] = "batched matmuls (attention)"
        elif op == "dot" or " dot(" in body:
            kinds[name] = "matmuls (dense layers)"
        elif name.startswith(("copy", "transpose")):
            kinds[name] = "layout copies"
        else:
            kinds[name] = "other fusions (LayerNorm, GELU, softmax, casts, ...)"
    return kinds


def profile_ours(trainer: Any, state: Any, batch: Any) -> tuple[Any, dict[str, float]]:
    import jax
    import jax.numpy as jnp

    lr = jnp.asarray(1.5e-4, jnp.float32)
    kinds = op_kinds(trainer._step.lower(state, batch, lr, None).compile().as_text())
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d)
        state, metrics = trainer.step(state, batch, 1.5e-4)
        float(metrics["loss"])
        jax.profiler.stop_trace()
        with gzip.open(glob.glob(f"{d}/**/*.trace.json.gz", recursive=True)[0]) as f:
            events = json.load(f)["traceEvents"]
    totals: dict[str, float] = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("name") in kinds:
            totals[kinds[e["name"]]] += e["dur"] / 1e6
    return state, dict(totals)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--network", default="vit_reg4_b16")
    p.add_argument("--mae", default="mae_vit")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3, help="timed steps per side (median)")
    args = p.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from flax import nnx
    from train_step import birder_step  # this folder's benchmark

    from vitreg_jax import MAE, MAETrainer, TrainConfig, ViT, mae_preset, preset
    from vitreg_jax.pretraining import make_optimizer
    from vitreg_jax.pretraining.optimizer import adamw_update  # measured alone below (4.): the step's update

    size = (224, 224)
    x = np.random.default_rng(0).standard_normal((args.batch, *size, 3)).astype(np.float32)
    # every JAX measurement first, then torch's: torch's OpenMP threads keep spinning for a while after each
    # parallel region, which would slow XLA's threads down if the two alternated

    # ours: the step alone, then one traced step
    vit_cfg = preset(args.network, model_config={"drop_path_rate": 0.0}, image_size=size)
    model = MAE(ViT(vit_cfg, rngs=nnx.Rngs(0)), mae_preset(args.mae), rngs=nnx.Rngs(1))
    trainer = MAETrainer(model, TrainConfig(batch_size=args.batch, steps=1000, compute_dtype=args.dtype))
    holder = {"state": trainer.init_state()}
    batch = trainer.put_batch(x[None])

    def ours() -> None:
        holder["state"], metrics = trainer.step(holder["state"], batch, 1.5e-4)
        float(metrics["loss"])

    ours()
    ours()
    ours_s = median_seconds(ours, args.steps)
    holder["state"], totals = profile_ours(trainer, holder["state"], batch)

    # batched vs 2-D matmul threads
    rng = np.random.default_rng(1)
    a3, b3 = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((128, 201, 201), (128, 201, 32)))
    a2, b2 = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((1608, 512), (512, 2048)))
    batched, plain = jax.jit(jnp.matmul), jax.jit(jnp.matmul)
    jax.block_until_ready((batched(a3, b3), plain(a2, b2)))
    batched_ratio = cpu_per_wall(lambda: jax.block_until_ready(batched(a3, b3)), 50)
    plain_ratio = cpu_per_wall(lambda: jax.block_until_ready(plain(a2, b2)), 20)

    # AdamW alone over the same parameters
    cfg = trainer.cfg
    params = jax.tree_util.tree_map(jnp.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    grads = jax.tree_util.tree_map(lambda q: jnp.full_like(q, 1e-3), params)
    update = jax.jit(lambda q, g, s, lr: adamw_update(cfg, q, g, s, lr), donate_argnums=(0, 2))
    adam = {"params": params, "state": make_optimizer(cfg).init(params)}

    def ours_adamw() -> None:
        adam["params"], adam["state"] = update(adam["params"], grads, adam["state"], jnp.float32(1e-4))
        jax.block_until_ready(adam["params"])

    ours_adamw()
    ours_adamw_s = median_seconds(ours_adamw, 8)
    shapes = [q.shape for q in jax.tree_util.tree_leaves(params)]

    # birder: the step alone, then its AdamW alone
    birder = birder_step(args.network, args.mae, size[0], args.batch, args.dtype)
    birder()
    birder()
    birder_s = median_seconds(birder, args.steps)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        birder()
    torch_ops = sorted(
        ((e.key, e.self_cpu_time_total / 1e6) for e in prof.key_averages()), key=lambda kv: -kv[1]
    )
    tparams = [torch.zeros(shape) for shape in shapes]
    for t in tparams:
        t.grad = torch.full_like(t, 1e-3)
    topt = torch.optim.AdamW(tparams, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05, fused=True)
    topt.step()
    torch_adamw_s = median_seconds(topt.step, 8)

    print(
        f"{args.network} + {args.mae}, {args.dtype}, batch {args.batch}, "
        f"{torch.get_num_threads()} torch threads"
    )
    print(
        f"1. step alone: ours {ours_s:.2f} s, birder {birder_s:.2f} s "
        f"(ours / birder speed {birder_s / ours_s:.2f}x)"
    )
    print(f"2. one traced step of ours, compiled ops by kind (sum {sum(totals.values()):.2f} s):")
    for kind, seconds in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"     {seconds:6.2f} s  {kind}")
    print(
        f"3. CPU time / wall time: batched (128, 201, 201) @ (128, 201, 32) {batched_ratio:.2f}; "
        f"2-D (1608, 512) @ (512, 2048) {plain_ratio:.2f}"
    )
    print("   birder's traced step (torch.profiler), the largest ops by self CPU time:")
    for name, seconds in torch_ops[:6]:
        print(f"     {seconds:6.2f} s  {name}")
    n = sum(t.numel() for t in tparams)
    print(
        f"4. AdamW alone over {n / 1e6:.1f} M parameters: ours {ours_adamw_s * 1e3:.0f} ms, "
        f"torch fused {torch_adamw_s * 1e3:.0f} ms"
    )


if __name__ == "__main__":
    main()
