"""``vitreg-jax demo``: the whole project in one minute on the bundled sample images.

1. weights: the published ``vit_reg4_b16_mim`` if it is on this machine (``--weights`` or the weights cache),
   else a stand-in written by birder's own save functions from a fixed seed (said plainly: its numbers are not
   the published model's);
2. convert the birder file to a vitreg-jax (Orbax) checkpoint, and load the model back from that checkpoint;
3. embed every image in one compiled batch (``vitreg_jax.Embedder``) and time it;
4. parity: birder 0.8.4 runs the same weights on the same images, with its own preprocessing; the max |diff|
   of the embeddings is printed (skipped, saying why, when birder is not installed);
5. each image's nearest neighbours by cosine similarity.

Heavy imports (jax, torch, birder) happen inside :func:`run`, so ``vitreg-jax --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from vitreg_jax.errors import UserError

MARKER = "demo.json"  # written last into --out; an existing --out without it is never overwritten
DEFAULT_OUT = Path("runs/demo")
TOP_K = 3
MAX_IMAGES = 256  # the demo holds every image in memory; `vitreg-jax embed` streams folders of any size
MAX_BATCH = 64  # one compiled batch up to this many images (the 13 samples: exactly one)
SHOWN_ROWS = 40  # neighbour lines printed (all of them go to neighbours.tsv)
PARITY_TOLERANCE = 1e-4  # = vitreg_jax.convert.verify.VERIFY_ATOL; a wrong mapping shows up as O(0.1..1)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "demo",
        help="convert, check against birder, embed and search the bundled sample images (about a minute on CPU)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="The project in one command, on the sample photos in examples/images:\n"
        "  1. weights: the published vit_reg4_b16_mim when it is on this machine (--weights, or already in\n"
        "     the weights cache); otherwise a STAND-IN: birder's own vit_reg4_b16 with birder's random init\n"
        "     from a fixed seed, saved with birder's save functions. The output says which; a stand-in's\n"
        "     neighbours are not the published model's.\n"
        "  2. convert that birder file to a vitreg-jax (Orbax) checkpoint and load the model from it;\n"
        "  3. embed all images in one compiled batch and print the throughput;\n"
        "  4. run birder itself on the same images and print the max |difference| of the embeddings\n"
        "     (skipped, with the reason, when birder is not installed);\n"
        "  5. print each image's nearest neighbours (cosine similarity of the embeddings).\n"
        "Nothing is downloaded unless --weights names a published weight that is not cached yet.",
        epilog="examples:\n"
        "  vitreg-jax demo                                   # sample images, cached published weights or stand-in\n"
        "  vitreg-jax demo --weights vit_reg4_b16_mim_300    # the published weights (downloaded once, 343 MB)\n"
        "  vitreg-jax demo --weights models/vit_reg4_b16_mim_200.pt --images ~/photos --out /tmp/demo\n"
        "\n"
        "outputs in --out: birder/ (the stand-in's .pt and .json), checkpoint/ (the Orbax checkpoint; try\n"
        "`vitreg-jax info OUT/checkpoint`), embeddings.npy + paths.txt (row i is line i), neighbours.tsv,\n"
        "demo.json (what ran and the measured figures).",
    )
    p.add_argument("--weights", metavar="W",
                   help="a birder .pt/.safetensors file, a vitreg-jax checkpoint directory, or a published name "
                        "(vit_reg4_b16_mim_300, vit_reg4_b16_mim_200, vitreg4_b16_mim_200). Default: a published "
                        "file already in the weights cache (the Hugging Face cache, or $VITREG_JAX_CACHE), else the "
                        "stand-in. If a published name cannot be downloaded, the demo says so and uses the "
                        "stand-in.")
    p.add_argument("--config", metavar="JSON", help="birder's json config for a --weights file (optional: "
                   "read from the file or inferred from its shapes otherwise)")
    p.add_argument("--images", metavar="DIR", type=Path, default=None,
                   help="folder of images (searched recursively) to embed (default: the bundled examples/images)")
    p.add_argument("--out", metavar="DIR", type=Path, default=DEFAULT_OUT,
                   help=f"where the checkpoint, embeddings and report go (default: {DEFAULT_OUT}; a previous "
                        "demo's output there is replaced, any other non-empty folder is refused)")
    p.add_argument("--top", metavar="K", type=int, default=TOP_K, help=f"neighbours shown per image (default {TOP_K})")
    p.add_argument("--no-parity", action="store_true", help="skip the comparison with birder")
    p.add_argument("--quick", action="store_true",
                   help="a tiny 2-layer stand-in instead of the full-size model (for tests; a few seconds)")
    p.set_defaults(func=run)


# helpers ------------------------------------------------------------------------------------------------------
def _prepare_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise UserError(f"--out {out}: folder exists, is not empty and holds no earlier demo output "
                            f"({MARKER}); choose another --out")
        for child in out.iterdir():  # an earlier demo run: start clean
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {out}: cannot create it ({e.strerror or e})") from None


class _Printer:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def step(self, label: str, text: str) -> None:
        print(f"{label:<11} {text}", flush=True)

    def more(self, text: str) -> None:
        print(f"{'':<11} {text}", flush=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0


def _choose_weights(args: argparse.Namespace, out: Path, say: _Printer) -> Any:
    from vitreg_jax.convert import hub, standin

    if args.quick:
        if args.weights:
            raise UserError("--quick uses a tiny stand-in; it does not take --weights")
        return standin.write_standin(out / "birder", model_config=standin.TINY_MODEL_CONFIG)
    if args.weights:
        text = str(args.weights)
        path = Path(text).expanduser()
        if path.exists():
            return standin.Weights(weights=path, config=Path(args.config) if args.config else None, kind="file")
        if text not in hub.PUBLISHED:
            raise UserError(f"--weights {text!r}: neither an existing file/folder nor a published weight name "
                            f"({', '.join(hub.published_names())})")
        try:
            return standin.fetch_published(text)
        except UserError as e:
            say.step("weights", f"could not get {text}: {e}")
            say.more("continuing with the stand-in instead")
    else:
        found = standin.cached_published()
        if found is not None:
            return found
    return standin.write_standin(out / "birder")


def _load(weights: Any, out: Path, config: str | None, say: _Printer) -> tuple[Any, dict[str, Any]]:
    """(model loaded from the Orbax checkpoint, birder config): converts a birder file first."""
    from vitreg_jax.checkpoint import is_checkpoint
    from vitreg_jax.convert.load import load_birder_weights, load_model_with_cfg
    from vitreg_jax.loading import save_model
    from vitreg_jax.vit import num_params

    ckpt = out / "checkpoint"
    if is_checkpoint(weights.weights):
        net, cfg = load_model_with_cfg(config, weights.weights)
        say.step("convert", f"{weights.weights} is already a vitreg-jax checkpoint: loaded it "
                 f"({num_params(net):,} parameters)")
        return net, cfg
    t = time.perf_counter()
    cfg_arg = config if config is not None else weights.config
    net, cfg, bfile = load_birder_weights(cfg_arg, weights.weights)
    save_model(ckpt, net, cfg, source=bfile, force=True,
               extra={"demo": "stand-in" if weights.is_standin else weights.kind})
    del net
    net, cfg = load_model_with_cfg(None, ckpt)  # everything below runs from the Orbax checkpoint
    say.step("convert", f"{weights.weights.name} -> {ckpt}/ ({num_params(net):,} parameters, "
             f"{time.perf_counter() - t:.1f} s)")
    cmd = f"vitreg-jax convert {weights.weights}"
    if cfg_arg is not None:
        cmd += f" --config {cfg_arg}"
    say.more(f"(the same as: {cmd} --out {ckpt})")
    return net, cfg


def _read_images(images_dir: Path, size: tuple[int, int], rgb_stats: Any, say: _Printer) -> tuple[list[str], Any]:
    import numpy as np

    from vitreg_jax.data import iter_batches, list_inputs
    from vitreg_jax.preprocess import classification_transform

    paths = list_inputs([images_dir])
    if len(paths) > MAX_IMAGES:
        say.more(f"{len(paths)} images in {images_dir}: the demo uses the first {MAX_IMAGES} "
                 "(`vitreg-jax embed` streams folders of any size)")
        paths = paths[:MAX_IMAGES]
    transform = classification_transform(size, rgb_stats)
    kept: list[str] = []
    arrays = []
    for batch in iter_batches(paths, transform, batch_size=len(paths)):
        for failure in batch.failed:
            say.more(f"skipped {failure.path}: {failure.reason}")
        kept.extend(paths[i] for i in batch.indices)
        arrays.append(batch.images)
    if not kept:
        raise UserError(f"--images {images_dir}: none of the {len(paths)} images could be read")
    return kept, np.concatenate(arrays)


def _neighbours(emb: Any, names: list[str], k: int) -> list[list[tuple[str, float]]]:
    import numpy as np

    unit = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    sim = unit @ unit.T  # (N, N) cosine similarity
    np.fill_diagonal(sim, -np.inf)
    order = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    return [[(names[j], float(sim[i, j])) for j in row] for i, row in enumerate(order)]


# the command --------------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    if args.top < 1:
        raise UserError(f"--top must be at least 1, got {args.top}")
    say = _Printer()
    from vitreg_jax.convert.standin import sample_images_dir

    images_dir = args.images if args.images is not None else sample_images_dir()
    if not images_dir.is_dir():
        raise UserError(f"--images {images_dir}: no such folder" if args.images is not None else
                        f"the sample images ({images_dir}) are not here: run from the repository or pass --images DIR")
    if args.config is not None and args.weights is None:
        raise UserError("--config goes with --weights FILE (the birder json of that file)")
    out: Path = args.out
    _prepare_out(out)

    from vitreg_jax.embed import configure_xla_flags

    configure_xla_flags("float32")  # before JAX starts (birder/torch may import first; they do not start it)
    from vitreg_jax.convert import standin

    birder_why = "--no-parity was given" if args.no_parity else standin.birder_missing()
    print(f"vitreg-jax demo: birder's ViTReg encoder in JAX, on the images in {images_dir}", flush=True)

    # 1. weights
    weights = _choose_weights(args, out, say)
    say.step("weights", weights.describe())
    if weights.is_standin:
        say.more("The embeddings and neighbours below are NOT those of the published vit_reg4_b16_mim: a random")
        say.more("network only shows that the machinery works. With the published weights:")
        say.more("  vitreg-jax demo --weights vit_reg4_b16_mim_300   (downloads 343 MB once)")

    # 2. convert to Orbax, load back
    import jax
    import numpy as np

    from vitreg_jax.embed import Embedder
    from vitreg_jax.loading import get_params
    from vitreg_jax.preprocess import get_size_from_signature
    from vitreg_jax.vit import num_params

    net, cfg = _load(weights, out, args.config, say)
    size = get_size_from_signature(cfg["signature"])

    # 3. embed in one compiled batch
    paths, images = _read_images(images_dir, size, cfg["rgb_stats"], say)
    n = len(paths)
    embedder = Embedder(net, batch_size=min(n, MAX_BATCH))
    t = time.perf_counter()
    tail = n % embedder.batch_size
    embedder.warmup(*size, buckets={embedder.batch_size, *([embedder.bucket_for(tail)] if tail else [])})
    compile_s = time.perf_counter() - t
    t = time.perf_counter()
    emb = embedder(images)
    embed_s = time.perf_counter() - t
    devices = jax.devices()
    how = "in one compiled batch" if n <= embedder.batch_size else f"in compiled batches of {embedder.batch_size}"
    say.step("embed", f"{n} images at {size[0]}x{size[1]} {how}: {embed_s:.2f} s = "
             f"{n / embed_s:.1f} images/s (compile {compile_s:.1f} s, once; float32, {len(devices)} "
             f"{devices[0].platform} device{'s' if len(devices) > 1 else ''})")

    # 4. parity with birder
    parity: float | None = None
    birder_s: float | None = None
    if birder_why is None:
        params = get_params(net)
        from vitreg_jax.convert import verify

        theirs, same, birder_s = verify.birder_embeddings_of_images(weights, cfg, params, net.cfg, paths)
        parity = float(np.max(np.abs(emb.astype(np.float64) - theirs.astype(np.float64))))
        verdict = "OK" if parity <= PARITY_TOLERANCE else "FAILED"
        import birder

        say.step("parity", f"max |embedding difference| vs birder {birder.__version__} on the {n} images: "
                 f"{parity:.2e} (tolerance {PARITY_TOLERANCE:.0e}, fp32): {verdict}")
        say.more(f"preprocessing bit-identical to birder.classification_transform on {same}/{n} images")
        say.more(f"birder's net.embedding (PyTorch eager, fp32) on the same batch: {n / birder_s:.1f} images/s; "
                 f"ours {n / embed_s:.1f} = {birder_s / embed_s:.2f}x birder (one timed call each; see BENCHMARKS.md)")
    else:
        say.step("parity", f"skipped: {birder_why}")

    # 5. nearest neighbours
    names = [str(Path(p).relative_to(images_dir)) if Path(p).is_relative_to(images_dir) else p for p in paths]
    nbrs = _neighbours(emb, names, min(args.top, n - 1)) if n > 1 else [[] for _ in names]
    width = max(len(s) for s in names)
    say.step("neighbours", f"top {min(args.top, max(n - 1, 0))} by cosine similarity of the embeddings"
             + (" (stand-in weights: not meaningful)" if weights.is_standin else ""))
    for name, row in list(zip(names, nbrs, strict=True))[:SHOWN_ROWS]:
        say.more(f"{name:<{width}}  " + "  ".join(f"{m} {s:+.3f}" for m, s in row))
    if n > SHOWN_ROWS:
        say.more(f"... ({n - SHOWN_ROWS} more in {out / 'neighbours.tsv'})")

    # outputs
    np.save(out / "embeddings.npy", emb)
    (out / "paths.txt").write_text("".join(f"{p}\n" for p in paths))
    (out / "neighbours.tsv").write_text("".join(
        f"{name}\t" + "\t".join(f"{m}\t{s:.6f}" for m, s in row) + "\n" for name, row in zip(names, nbrs, strict=True)))
    report = {
        "weights": str(weights.weights), "kind": weights.kind, "standin_writer": weights.writer,
        "published_name": weights.published_name, "network": cfg.get("registered_name"),
        "parameters": num_params(net),
        "images": n, "size": list(size), "embed_seconds": embed_s, "images_per_second": n / embed_s,
        "compile_seconds": compile_s, "device": f"{len(devices)} x {devices[0].platform}",
        "parity_max_abs_diff": parity, "parity_tolerance": PARITY_TOLERANCE,
        "parity_skipped": birder_why, "birder_embed_seconds": birder_s, "seconds": say.elapsed(),
    }
    (out / MARKER).write_text(json.dumps(report, indent=2) + "\n")
    say.step("wrote", f"{out}/: checkpoint/, embeddings.npy, paths.txt, neighbours.tsv, {MARKER}")
    say.step("done", f"in {say.elapsed():.0f} s")
    if parity is not None and not parity <= PARITY_TOLERANCE:
        print("vitreg-jax demo: the embeddings differ from birder's beyond the tolerance", file=sys.stderr)
        return 1
    return 0
