"""k-NN evaluation time: ``vitreg_jax.evaluation.knn_classify`` on random embeddings (weighted k = 20, k = 1).

The default size (the one BENCHMARKS.md quotes): 50,000 train x 10,000 val embeddings of 768 floats, 1,000
classes::

    .venv/bin/python benchmarks/eval_knn.py                 # 50k x 10k x 768, 3 timed runs after a warm-up
    .venv/bin/python benchmarks/eval_knn.py --train 2000 --val 500 --repeat 1     # a quick check

The embeddings are Gaussian (seeded); the labels uniform. The warm-up run compiles the device steps (one per
block shape); the timed runs are what a user pays per evaluation once compiled, neighbour search on the
default JAX device and the class vote on the host included. Reported: median seconds of the weighted
k-NN (k = 20, T = 0.07), of the k = 1 run, and the rate in query x train pairs per second.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import numpy as np

from vitreg_jax.evaluation import knn_classify


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=50_000, help="training embeddings (default 50000)")
    parser.add_argument("--val", type=int, default=10_000, help="validation embeddings (default 10000)")
    parser.add_argument("--dim", type=int, default=768, help="embedding width (default 768)")
    parser.add_argument("--classes", type=int, default=1000, help="number of classes (default 1000)")
    parser.add_argument("-k", type=int, default=20, help="neighbours of the weighted k-NN (default 20)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs after the warm-up (default 3)")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    train = rng.standard_normal((args.train, args.dim), dtype=np.float32)
    val = rng.standard_normal((args.val, args.dim), dtype=np.float32)
    labels = rng.integers(0, args.classes, args.train)

    def weighted() -> None:
        knn_classify(train, labels, val, k=args.k, num_classes=args.classes)

    def nearest() -> None:
        knn_classify(train, labels, val, k=1, temperature=None, num_classes=args.classes)

    times: dict[str, list[float]] = {"weighted": [], "k1": []}
    for name, fn in (("weighted", weighted), ("k1", nearest)):
        fn()  # warm-up: compiles the device steps
        for _ in range(args.repeat):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    result = {
        "device": f"{jax.devices()[0].platform} x{jax.device_count()} ({jax.devices()[0].device_kind})",
        "train": args.train,
        "val": args.val,
        "dim": args.dim,
        "classes": args.classes,
        "k": args.k,
        "weighted_s": statistics.median(times["weighted"]),
        "k1_s": statistics.median(times["k1"]),
    }
    result["pairs_per_s"] = args.train * args.val / result["weighted_s"]
    print(json.dumps(result))
    print(
        f"k-NN of {args.val} val x {args.train} train x {args.dim}-d on {result['device']}: "
        f"weighted k={args.k} "
        f"{result['weighted_s']:.2f} s, k=1 {result['k1_s']:.2f} s (median of {args.repeat}; "
        f"{result['pairs_per_s'] / 1e6:.0f} M pairs/s)"
    )
    return result


if __name__ == "__main__":
    main()
