"""Dataset-scale embedding from webdataset tar shards: end-to-end rate against the model alone, and memory.

    .venv/bin/python benchmarks/embed_shards.py                 # rate: 256 JPEGs in 4 shards, vit_reg4_b16
    .venv/bin/python benchmarks/embed_shards.py --memory        # peak RSS for N and 10 N images (tiny model)

``rate``: one process builds ``vit_reg4_b16`` (random weights: the numbers do not matter here) and a warmed-up
``Embedder``, then alternates two measurements, round after round: the model alone on one preprocessed batch
(``Embedder.__call__``, steady state) and ``embed_dataset`` over the tar shards into a fresh parquet folder
(listing, streaming the tars, threaded JPEG decoding, preprocessing, embedding, writing the parts and the
manifest). The same Embedder serves both, so no compilation is timed; the image count is a multiple of the
batch, so every step uses the one compiled bucket. It prints the median rate of each and their ratio.

``--memory``: runs ``vitreg-jax embed`` (parquet) in a child process on N and on 10 N images in tar shards
with a small model (so that whatever grows with the input is not hidden under the weights) and compares the
children's peak RSS (``ru_maxrss``).

XLA flags are chosen for the dtype as ``vitreg-jax embed`` does (``configure_xla_flags``), before JAX starts.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "examples" / "images"


def cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    flags = next(
        (line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []
    )
    model = next(
        (line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")),
        "unknown",
    )
    wanted = [f for f in flags if f.startswith(("avx512", "amx")) or f in ("avx2", "fma")]
    return f"{model}, {os.cpu_count()} CPUs, flags: {' '.join(sorted(wanted)) or 'none of avx2/avx512/amx'}"


def make_shards(folder: Path, images: int, per_shard: int, size: int = 256, seed: int = 0) -> list[Path]:
    """``images`` JPEGs (random crops of the sample photos) in webdataset tars of ``per_shard`` samples."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    photos = [
        Image.open(p).convert("RGB")
        for p in sorted(SAMPLES.iterdir())
        if p.suffix.lower() in (".jpg", ".jpeg", ".png")
    ]
    folder.mkdir(parents=True, exist_ok=True)
    shards: list[Path] = []
    for s in range(0, images, per_shard):
        path = folder / f"part-{s // per_shard:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(s, min(s + per_shard, images)):
                photo = photos[i % len(photos)]
                w, h = photo.size
                side = int(min(w, h) * rng.uniform(0.5, 1.0))
                x0, y0 = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
                buf = io.BytesIO()
                photo.crop((x0, y0, x0 + side, y0 + side)).resize((size, size)).save(buf, "JPEG", quality=90)
                for name, data in ((f"{i:08d}.jpg", buf.getvalue()), (f"{i:08d}.json", b'{"i": %d}' % i)):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        shards.append(path)
    return shards


def rate(args: argparse.Namespace) -> None:
    from vitreg_jax.embedding import configure_xla_flags

    configure_xla_flags(args.dtype)
    import jax

    from vitreg_jax import Embedder, build_model, preset
    from vitreg_jax.embedding import embed_dataset
    from vitreg_jax.model.birder_json import birder_config  # shares its module's name: not in the namespace

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shards = make_shards(work / "shards", args.images, args.per_shard)
        net = build_model(preset(args.network))
        cfg = birder_config(net.cfg, {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}, args.network)
        embedder = Embedder(net, dtype=args.dtype, batch_size=args.batch)
        h, w = net.cfg.image_size
        x = np.random.default_rng(0).standard_normal((args.batch, h, w, 3)).astype(np.float32)
        embedder(x)  # compile once
        model_rates, e2e_rates = [], []
        for r in range(args.rounds):
            t0 = time.perf_counter()
            for _ in range(args.model_calls):
                embedder(x)
            model_rates.append(args.batch * args.model_calls / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            result = embed_dataset(
                embedder,
                [str(s) for s in shards],
                work / f"out{r}",
                cfg=cfg,
                format="parquet",
                progress=False,
            )
            e2e_rates.append(result.embedded / (time.perf_counter() - t0))
            assert result.embedded == args.images and result.failed == 0, result
            print(
                f"round {r}: model alone {model_rates[-1]:.2f} img/s, "
                f"embed from shards {e2e_rates[-1]:.2f} img/s",
                flush=True,
            )
    m, e = statistics.median(model_rates), statistics.median(e2e_rates)
    summary = {
        "network": args.network,
        "dtype": args.dtype,
        "batch": args.batch,
        "images": args.images,
        "shards": len(shards),
        "model_img_s": round(m, 3),
        "e2e_img_s": round(e, 3),
        "ratio": round(e / m, 3),
        "devices": f"{jax.device_count()} x {jax.devices()[0].platform}",
        "cpu": cpu_flags(),
    }
    print("RESULT " + json.dumps(summary))
    print(
        f"embed from tar shards reaches {100 * e / m:.0f} % of the model-only rate "
        f"({e:.2f} vs {m:.2f} img/s, {args.dtype}, batch {args.batch}, medians of {args.rounds} rounds)"
    )


def peak_rss_mib(checkpoint: Path, shards: list[Path], out: Path) -> float:
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    cmd = [
        sys.executable,
        "-m",
        "vitreg_jax",
        "embed",
        "--checkpoint",
        str(checkpoint),
        *map(str, shards),
        "--out",
        str(out),
        "--format",
        "parquet",
    ]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    # ru_maxrss of RUSAGE_CHILDREN is the largest child so far: run the small input first
    return max(before, after) / 1024


def memory(args: argparse.Namespace) -> None:
    from vitreg_jax import build_model, preset
    from vitreg_jax.model import save_model
    from vitreg_jax.model.birder_json import birder_config  # shares its module's name: not in the namespace

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        net = build_model(preset(args.memory_network))
        cfg = birder_config(net.cfg, {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}, args.memory_network)
        ckpt = save_model(work / "ckpt", net, cfg)
        small = make_shards(work / "small", args.memory_images, args.per_shard)
        large = make_shards(work / "large", 10 * args.memory_images, args.per_shard, seed=1)
        rss_small = peak_rss_mib(ckpt, small, work / "out-small")
        rss_large = peak_rss_mib(ckpt, large, work / "out-large")
    growth = rss_large / rss_small - 1
    print(
        "RESULT "
        + json.dumps(
            {
                "network": args.memory_network,
                "images": [args.memory_images, 10 * args.memory_images],
                "peak_rss_mib": [round(rss_small), round(rss_large)],
                "growth": round(growth, 4),
                "cpu": cpu_flags(),
            }
        )
    )
    print(
        f"peak RSS of `vitreg-jax embed --format parquet`: {rss_small:.0f} MiB for {args.memory_images} "
        "images, "
        f"{rss_large:.0f} MiB for {10 * args.memory_images} ({100 * growth:+.1f} %)"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--network", default="vit_reg4_b16", help="birder network of the rate measurement")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument(
        "--images", type=int, default=256, help="images for the rate measurement (a multiple of --batch)"
    )
    p.add_argument("--per-shard", type=int, default=64, help="samples per tar shard")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--model-calls", type=int, default=4, help="model-only calls per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--memory", action="store_true", help="measure peak RSS for N and 10 N images instead")
    p.add_argument("--memory-network", default="vit_reg4_m16")
    p.add_argument("--memory-images", type=int, default=256)
    args = p.parse_args()
    if not args.memory and args.images % args.batch:
        p.error("--images must be a multiple of --batch (one compiled bucket)")
    memory(args) if args.memory else rate(args)


if __name__ == "__main__":
    main()
