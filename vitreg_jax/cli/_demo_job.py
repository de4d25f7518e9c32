"""The demo (``vitreg-jax demo``) as a library: the whole project in one minute on the bundled sample images.

1. weights: the published ``vit_reg4_b16_mim`` if it is on this machine (``weights=`` or the weights cache),
   else a stand-in written by birder's own save functions from a fixed seed (said plainly: its numbers are not
   the published model's);
2. convert the birder file to a vitreg-jax (Orbax) checkpoint, and load the model back from that checkpoint;
3. embed every image in one compiled batch (``vitreg_jax.Embedder``) and time it;
4. parity: birder 0.8.4 runs the same weights on the same images, with its own preprocessing; the max |diff|
   of the embeddings is printed (skipped, saying why, when birder is not installed), and both sides' calls
   are timed the same way: one untimed warm-up call each, then the best of :data:`TIMED_CALLS`;
5. each image's nearest neighbours by cosine similarity.

``run_demo(DemoOptions(...))`` prints the lines as it goes and returns the report written to
``OUT/demo.json``. Heavy imports (jax, torch, birder) happen inside the functions.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitreg_jax.convert.verify import VERIFY_ATOL
from vitreg_jax.errors import UserError
from vitreg_jax.fileio import atomic_write, atomic_write_json, atomic_write_text, make_dir

if TYPE_CHECKING:
    import numpy as np

    from vitreg_jax.convert.standin import Weights
    from vitreg_jax.model.vit import ViT

MARKER = "demo.json"  # written last into the output folder; a folder without it is never overwritten
DEFAULT_OUT = Path("runs/demo")
TOP_K = 3
MAX_IMAGES = 256  # the demo holds every image in memory; `vitreg-jax embed` streams folders of any size
MAX_BATCH = 64  # one compiled batch up to this many images (the 13 samples: exactly one)
SHOWN_ROWS = 40  # neighbour lines printed (all of them go to neighbours.tsv)
TIMED_CALLS = 2  # per side, after one untimed warm-up call: the best is reported
PARITY_TOLERANCE = VERIFY_ATOL  # the project's fp32 bar against birder; a wrong mapping shows up as O(0.1..1)


@dataclass(frozen=True)
class DemoOptions:
    weights: str | None = (
        None  # a birder file, a vitreg-jax checkpoint or a published name (None: cache/stand-in)
    )
    config: str | None = None  # birder's json for a weights file
    images: Path | None = None  # None: the bundled sample images
    out: Path = DEFAULT_OUT
    top: int = TOP_K
    parity: bool = True
    quick: bool = False  # a tiny 2-layer stand-in instead of the full-size model


class Printer:
    """The demo's lines: a label column, then the text (stdout)."""

    def __init__(self, write: Callable[[str], None] | None = None) -> None:
        self.t0 = time.perf_counter()
        self.write = write or (lambda text: print(text, flush=True))

    def step(self, label: str, text: str) -> None:
        self.write(f"{label:<11} {text}")

    def more(self, text: str) -> None:
        self.write(f"{'':<11} {text}")

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0


def best_time(call: Callable[[], Any], timed: int = TIMED_CALLS) -> tuple[Any, float]:
    """(the result of one untimed warm-up call, the seconds of the fastest of ``timed`` calls after it)."""
    result = call()
    times = []
    for _ in range(timed):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return result, min(times)


# the steps
# ----------------------------------------------------------------------------------------------------
def prepare_out(out: Path) -> None:
    """An empty output folder: created, or emptied when it holds an earlier demo's output (only then)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise UserError(
                f"--out {out}: folder exists, is not empty and holds no earlier demo output "
                f"({MARKER}); choose another --out"
            )
        for child in out.iterdir():  # an earlier demo run: start clean
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    make_dir(out)


def choose_weights(options: DemoOptions, say: Printer) -> Weights:
    from vitreg_jax.convert import hub, standin

    if options.quick:
        if options.weights:
            raise UserError("--quick uses a tiny stand-in; it does not take --weights")
        return standin.write_standin(options.out / "birder", model_config=standin.TINY_MODEL_CONFIG)
    if options.weights:
        text = str(options.weights)
        path = Path(text).expanduser()
        if path.exists():
            return standin.Weights(
                weights=path, config=Path(options.config) if options.config else None, kind="file"
            )
        if text not in hub.PUBLISHED:
            raise UserError(
                f"--weights {text!r}: neither an existing file/folder nor a published weight name "
                f"({', '.join(hub.published_names())})"
            )
        try:
            return standin.fetch_published(text)
        except UserError as e:
            say.step("weights", f"could not get {text}: {e}")
            say.more("continuing with the stand-in instead")
    else:
        found = standin.cached_published()
        if found is not None:
            return found
    return standin.write_standin(options.out / "birder")


def load(weights: Weights, out: Path, config: str | None, say: Printer) -> tuple[ViT, dict[str, Any]]:
    """(model loaded from the Orbax checkpoint, birder config): converts a birder file first."""
    from vitreg_jax.convert.load import load_birder_weights, load_model_with_cfg
    from vitreg_jax.model.build import save_model
    from vitreg_jax.model.checkpoint import is_checkpoint
    from vitreg_jax.model.vit import num_params

    ckpt = out / "checkpoint"
    if is_checkpoint(weights.weights):
        net, cfg = load_model_with_cfg(config, weights.weights)
        say.step(
            "convert",
            f"{weights.weights} is already a vitreg-jax checkpoint: loaded it "
            f"({num_params(net):,} parameters)",
        )
        return net, cfg
    t = time.perf_counter()
    cfg_arg = config if config is not None else weights.config
    net, cfg, bfile = load_birder_weights(cfg_arg, weights.weights)
    save_model(
        ckpt,
        net,
        cfg,
        source=bfile,
        force=True,
        extra={"demo": "stand-in" if weights.is_standin else weights.kind},
    )
    del net
    net, cfg = load_model_with_cfg(None, ckpt)  # everything below runs from the Orbax checkpoint
    say.step(
        "convert",
        f"{weights.weights.name} -> {ckpt}/ ({num_params(net):,} parameters, "
        f"{time.perf_counter() - t:.1f} s)",
    )
    cmd = f"vitreg-jax convert {weights.weights}"
    if cfg_arg is not None:
        cmd += f" --config {cfg_arg}"
    say.more(f"(the same as: {cmd} --out {ckpt})")
    return net, cfg


def read_images(
    images_dir: Path, size: tuple[int, int], rgb_stats: Any, say: Printer
) -> tuple[list[str], np.ndarray]:
    import numpy as np

    from vitreg_jax.data.inputs import list_inputs
    from vitreg_jax.data.loader import iter_batches
    from vitreg_jax.data.preprocess import classification_transform

    paths = list_inputs([images_dir])
    if len(paths) > MAX_IMAGES:
        say.more(
            f"{len(paths)} images in {images_dir}: the demo uses the first {MAX_IMAGES} "
            "(`vitreg-jax embed` streams folders of any size)"
        )
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


def embed(
    net: ViT, images: np.ndarray, size: tuple[int, int], say: Printer
) -> tuple[np.ndarray, dict[str, Any]]:
    """The embeddings, and the figures: compile seconds, the best warm call's seconds, the device."""
    import jax

    from vitreg_jax.embedding.embedder import Embedder

    n = len(images)
    embedder = Embedder(net, batch_size=min(n, MAX_BATCH))
    tail = n % embedder.batch_size
    compile_s = embedder.warmup(
        *size, buckets={embedder.batch_size, *([embedder.bucket_for(tail)] if tail else [])}
    )
    emb, embed_s = best_time(lambda: embedder(images))
    devices = jax.devices()
    device = f"{len(devices)} {devices[0].platform} device{'s' if len(devices) > 1 else ''}"
    how = (
        "in one compiled batch"
        if n <= embedder.batch_size
        else f"in compiled batches of {embedder.batch_size}"
    )
    say.step(
        "embed",
        f"{n} images at {size[0]}x{size[1]} {how}: {embed_s:.2f} s = {n / embed_s:.1f} images/s "
        f"(compile {compile_s:.1f} s, once; float32, {device}; best of {TIMED_CALLS} calls after a warm-up "
        "call)",
    )
    return emb, {
        "embed_seconds": embed_s,
        "images_per_second": n / embed_s,
        "compile_seconds": compile_s,
        "device": f"{len(devices)} x {devices[0].platform}",
    }


def birder_net_and_batch(
    weights: Weights, cfg: dict[str, Any], net: ViT, paths: list[str]
) -> tuple[Any, Any, int]:
    """birder's network for these weights, the images through birder's own preprocessing (N, 3, H, W), and
    how many of them were bit-identical to ours.

    A stand-in is loaded exactly as birder users load published files (``birder.load_model_with_cfg`` on the
    ``.pt`` and ``.json`` birder wrote); other weights go to birder's network as the state dict exported back
    from our checkpoint (so any key layout, and an Orbax input, work).
    """
    import birder
    import numpy as np
    import torch
    from PIL import Image

    from vitreg_jax.convert import mapping
    from vitreg_jax.data.preprocess import classification_transform, to_rgb
    from vitreg_jax.model.build import get_params

    torch.backends.cuda.matmul.allow_tf32 = False
    if weights.is_standin and weights.writer == "birder":
        theirs_net, _ = birder.load_model_with_cfg(str(weights.config), str(weights.weights))
    else:
        from birder.model_registry import registry

        from vitreg_jax.convert.infer import signature_info
        from vitreg_jax.model.config import canonical_name

        size, num_classes, channels = signature_info(cfg["signature"])
        network = canonical_name(
            str(cfg.get("registered_name") or "vit")
        )  # legacy vitreg4_b16 -> vit_reg4_b16
        theirs_net = registry.net_factory(
            network, num_classes, channels, config=dict(cfg["model_config"]), size=size
        )
        state = mapping.to_birder(get_params(net), net.cfg)
        theirs_net.load_state_dict(
            {k: torch.from_numpy(np.array(v, np.float32)) for k, v in state.items()}, strict=True
        )
    theirs_net.eval()
    size = birder.get_size_from_signature(cfg["signature"])
    theirs = birder.classification_transform(size, cfg["rgb_stats"])
    ours = classification_transform(size, cfg["rgb_stats"])
    batch, same = [], 0
    for p in paths:
        with Image.open(p) as img:
            rgb = to_rgb(img)  # birder's dataset loaders convert to RGB; its transform itself does not
            t = theirs(rgb)  # (3, H, W) torch
            same += int(np.array_equal(t.numpy().transpose(1, 2, 0), ours(rgb)))
            batch.append(t)
    return theirs_net, torch.stack(batch), same  # (N, 3, H, W)


def parity(
    weights: Weights,
    cfg: dict[str, Any],
    net: ViT,
    paths: list[str],
    emb: np.ndarray,
    embed_s: float,
    say: Printer,
) -> dict[str, Any]:
    """birder on the same images: the max |difference| of the embeddings and birder's timing."""
    import birder
    import numpy as np
    import torch

    theirs_net, x, same = birder_net_and_batch(weights, cfg, net, paths)
    with torch.no_grad():
        theirs, birder_s = best_time(lambda: theirs_net.embedding(x).numpy())
    n = len(paths)
    diff = float(np.max(np.abs(emb.astype(np.float64) - theirs.astype(np.float64))))
    verdict = "OK" if diff <= PARITY_TOLERANCE else "FAILED"
    say.step(
        "parity",
        f"max |embedding difference| vs birder {birder.__version__} on the {n} images: "
        f"{diff:.2e} (tolerance {PARITY_TOLERANCE:.0e}, fp32): {verdict}",
    )
    say.more(f"preprocessing bit-identical to birder.classification_transform on {same}/{n} images")
    say.more(
        f"birder's net.embedding (PyTorch eager, fp32) on the same batch: {n / birder_s:.1f} images/s; "
        f"ours {n / embed_s:.1f} = {birder_s / embed_s:.2f}x birder (best of {TIMED_CALLS} calls each after "
        "a warm-up call; see BENCHMARKS.md)"
    )
    return {"parity_max_abs_diff": diff, "birder_embed_seconds": birder_s}


def neighbours(emb: np.ndarray, names: list[str], k: int) -> list[list[tuple[str, float]]]:
    """Each row's ``k`` nearest other rows by cosine similarity: [(name, similarity), ...]."""
    import numpy as np

    unit = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    sim = unit @ unit.T  # (N, N) cosine similarity
    np.fill_diagonal(sim, -np.inf)
    order = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    return [[(names[j], float(sim[i, j])) for j in row] for i, row in enumerate(order)]


def show_neighbours(
    names: list[str], emb: np.ndarray, top: int, standin: bool, out: Path, say: Printer
) -> list[list[tuple[str, float]]]:
    n = len(names)
    nbrs = neighbours(emb, names, min(top, n - 1)) if n > 1 else [[] for _ in names]
    width = max(len(s) for s in names)
    say.step(
        "neighbours",
        f"top {min(top, max(n - 1, 0))} by cosine similarity of the embeddings"
        + (" (stand-in weights: not meaningful)" if standin else ""),
    )
    for name, row in list(zip(names, nbrs, strict=True))[:SHOWN_ROWS]:
        say.more(f"{name:<{width}}  " + "  ".join(f"{m} {s:+.3f}" for m, s in row))
    if n > SHOWN_ROWS:
        say.more(f"... ({n - SHOWN_ROWS} more in {out / 'neighbours.tsv'})")
    return nbrs


def write_outputs(
    out: Path,
    paths: list[str],
    names: list[str],
    emb: np.ndarray,
    nbrs: list[list[tuple[str, float]]],
    report: dict[str, Any],
) -> None:
    import numpy as np

    atomic_write(out / "embeddings.npy", lambda f: np.save(f, emb))
    atomic_write_text(out / "paths.txt", "".join(f"{p}\n" for p in paths))
    atomic_write_text(
        out / "neighbours.tsv",
        "".join(
            f"{name}\t" + "\t".join(f"{m}\t{s:.6f}" for m, s in row) + "\n"
            for name, row in zip(names, nbrs, strict=True)
        ),
    )
    atomic_write_json(out / MARKER, report)  # last: it marks the folder as a demo's output


# the whole demo
# ------------------------------------------------------------------------------------------------
def _images_dir(options: DemoOptions) -> Path:
    from vitreg_jax.convert.standin import sample_images_dir

    if options.top < 1:
        raise UserError(f"--top must be at least 1, got {options.top}")
    images_dir = options.images if options.images is not None else sample_images_dir()
    if not images_dir.is_dir():
        raise UserError(
            f"--images {images_dir}: no such folder"
            if options.images is not None
            else f"the sample images ({images_dir}) are not here: run from the repository or pass "
            "--images DIR"
        )
    if options.config is not None and options.weights is None:
        raise UserError("--config goes with --weights FILE (the birder json of that file)")
    return images_dir


def _shown(path: Path) -> str:
    """A path as the user would type it: relative to the current folder when inside it."""
    here = Path.cwd()
    resolved = path.resolve()
    return str(resolved.relative_to(here)) if resolved.is_relative_to(here) else str(path)


def _announce_weights(weights: Weights, say: Printer) -> None:
    say.step("weights", weights.describe())
    if weights.is_standin:
        say.more(
            "The embeddings and neighbours below are NOT those of the published vit_reg4_b16_mim: a random"
        )
        say.more("network only shows that the machinery works. With the published weights:")
        say.more("  vitreg-jax demo --weights vit_reg4_b16_mim_300   (downloads 343 MB once)")


def run_demo(options: DemoOptions, say: Printer | None = None) -> dict[str, Any]:
    """Run the demo into ``options.out``; returns the report (also ``OUT/demo.json``). The report's
    ``parity_ok`` is False when the embeddings differ from birder's beyond :data:`PARITY_TOLERANCE`."""
    say = say or Printer()
    images_dir = _images_dir(options)
    out = options.out
    prepare_out(out)
    from vitreg_jax.embedding.embedder import configure_xla_flags

    configure_xla_flags("float32")  # before JAX starts (birder/torch may import first; they do not start it)
    from vitreg_jax.convert import standin
    from vitreg_jax.data.preprocess import get_size_from_signature
    from vitreg_jax.model.vit import num_params

    birder_why = "--no-parity was given" if not options.parity else standin.birder_missing()
    say.write(f"vitreg-jax demo: birder's ViTReg encoder in JAX, on the images in {_shown(images_dir)}")
    weights = choose_weights(options, say)
    _announce_weights(weights, say)
    net, cfg = load(weights, out, options.config, say)
    size = get_size_from_signature(cfg["signature"])
    paths, images = read_images(images_dir, size, cfg["rgb_stats"], say)
    emb, figures = embed(net, images, size, say)
    checked: dict[str, Any] = {"parity_max_abs_diff": None, "birder_embed_seconds": None}
    if birder_why is None:
        checked = parity(weights, cfg, net, paths, emb, figures["embed_seconds"], say)
    else:
        say.step("parity", f"skipped: {birder_why}")
    names = [str(Path(p).relative_to(images_dir)) if Path(p).is_relative_to(images_dir) else p for p in paths]
    nbrs = show_neighbours(names, emb, options.top, weights.is_standin, out, say)
    diff = checked["parity_max_abs_diff"]
    report = {
        "weights": str(weights.weights),
        "kind": weights.kind,
        "standin_writer": weights.writer,
        "published_name": weights.published_name,
        "network": cfg.get("registered_name"),
        "parameters": num_params(net),
        "images": len(paths),
        "size": list(size),
        **figures,
        "timed_calls": TIMED_CALLS,
        **checked,
        "parity_tolerance": PARITY_TOLERANCE,
        "parity_ok": None if diff is None else bool(diff <= PARITY_TOLERANCE),
        "parity_skipped": birder_why,
        "seconds": say.elapsed(),
    }
    write_outputs(out, paths, names, emb, nbrs, report)
    say.step("wrote", f"{out}/: checkpoint/, embeddings.npy, paths.txt, neighbours.tsv, {MARKER}")
    say.step("done", f"in {say.elapsed():.0f} s")
    return report
