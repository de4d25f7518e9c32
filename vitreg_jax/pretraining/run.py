"""A whole MAE pre-training run as a library: settings, run folder, resume, data, trainer, fit, encoder
export.

``vitreg-jax pretrain`` is a thin wrapper of this module; notebooks and scripts call it directly::

    from vitreg_jax.pretraining.config import TrainConfig
    from vitreg_jax.pretraining.run import PretrainSettings, open_run, train

    settings = PretrainSettings(data=("photos/",), network="vit_t16", size=(64, 64),
                                train=TrainConfig(steps=2000, batch_size=32, lr=1e-3))
    result = train(open_run("runs/tiny", settings))  # later: train(open_run("runs/tiny", resume=True))
    result.model  # the trained MAE; runs/tiny/encoder/ holds its encoder as a vitreg-jax checkpoint

The run folder::

    RUN/run.json        the settings (everything that shapes the run's output) and what they resolved to
    RUN/files.txt       the training images, in the order the epochs permute (fixed when the run starts)
    RUN/checkpoints/    Orbax checkpoints of the full train state (train.checkpoint_every, last K kept)
    RUN/metrics.jsonl   one JSON line per train.log_every steps (+ RUN/tensorboard/ when installed)
    RUN/encoder/        the trained encoder as a vitreg-jax checkpoint (`embed`, `export`, `info` accept it)

A run is only ever written into a new or empty folder, or into a folder holding a run of this module (its
``run.json``); resuming compares the settings asked for with the saved ones and names every one that
differs. Every field of :class:`PretrainSettings` is saved and compared (its ``metadata["normalise"]``, when
present, puts a value in the form it is compared in), and ``vitreg-jax pretrain`` maps the options whose
``dest`` is a field's name onto it, so a new setting is a new field (plus its option).

The encoder is a preset built here (``settings.network`` with ``model_config`` and ``size``) or an already
built :class:`~vitreg_jax.model.vit.ViT` given to :func:`train`, e.g. weights read by
``vitreg_jax.load_model_with_cfg``: this module never reads weight files itself (``settings.init`` records
where given weights came from; :attr:`PretrainRun.needs_init_weights` says when they must be given).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitreg_jax._locks import FolderLock, lock_file_name
from vitreg_jax.data.rgb_stats import RGB_STATS, TRAIN_DEFAULT, named_rgb_stats
from vitreg_jax.errors import UserError
from vitreg_jax.fileio import atomic_write_json, atomic_write_text, make_dir, read_json_object
from vitreg_jax.model.config import ViTConfig, preset
from vitreg_jax.pretraining.config import MAEConfig, TrainConfig, config_from_dict, mae_preset

if TYPE_CHECKING:
    from vitreg_jax.model.vit import ViT
    from vitreg_jax.pretraining.loop import Periodic, RunResult
    from vitreg_jax.pretraining.mae import MAE
    from vitreg_jax.pretraining.step import MAETrainer, TrainState

RUN_FILE = "run.json"
FILES_FILE = "files.txt"
ENCODER_DIR = "encoder"
FORMAT = "vitreg-jax-pretrain/2"
TRAIN_PREFIX = "train."  # option paths of TrainConfig fields: "train.lr", "train.steps", ...
# model_config keys that may change a given (already built) encoder: the rest would change its architecture
GIVEN_ENCODER_KEYS = frozenset({"drop_path_rate"})
MIM_DROP_PATH_RATE = 0.0  # birder's MAE recipe: --encoder-model-config drop_path_rate=0.0


def _locations(data: Sequence[str | os.PathLike[str]]) -> tuple[str, ...]:
    """Inputs as saved and compared: local paths absolute, URLs as given."""
    if isinstance(data, (str, os.PathLike)):
        data = [data]
    return tuple(str(d) if "://" in str(d) else os.path.abspath(os.fspath(d)) for d in data)


def _size(size: Any) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, int):
        return (size, size)
    h, w = size
    return (int(h), int(w))


def _normalised(normalise: Callable[[Any], Any]) -> dict[str, Any]:
    """Field metadata: how a setting is normalised (on construction, and to compare a requested value)."""
    return {"normalise": normalise}


def _folder(path: Any) -> str | None:
    """A local folder as an absolute path (a resumed run may start elsewhere)."""
    return None if path is None else os.path.abspath(os.fspath(path))


def _weights_location(init: Any) -> str | None:
    """An existing local file or folder as an absolute path (a resumed run may start elsewhere), else as given
    (a published name)."""
    if init is None:
        return None
    return os.path.abspath(os.fspath(init)) if os.path.exists(init) else str(init)


def _same(value: Any) -> Any:
    return value


def _json(value: Any) -> Any:
    return json.loads(json.dumps(value))


@dataclass(frozen=True, kw_only=True)
class PretrainSettings:
    """Everything that shapes a pre-training run's output; saved in ``RUN/run.json``, compared on resume.

    Training hyper-parameters and their defaults (birder's ``mae_vit`` recipe) are :class:`TrainConfig`'s.
    """

    data: tuple[str, ...] = field(default=(), metadata=_normalised(_locations))  # folders, images, .txt lists
    network: str = "vit_reg4_b16"  # birder ViT preset, when no encoder is given to train()
    # overrides of the preset's birder config
    model_config: Mapping[str, Any] = field(default_factory=dict, metadata=_normalised(dict))
    # training resolution (None: the preset's 224, or the given encoder's)
    size: tuple[int, int] | None = field(default=None, metadata=_normalised(_size))
    # where a given encoder's weights came from (a file, checkpoint or published name)
    init: str | None = field(default=None, metadata=_normalised(_weights_location))
    mae: str = "mae_vit"  # birder MAE head preset
    mae_config: Mapping[str, Any] = field(
        default_factory=dict, metadata=_normalised(dict)
    )  # MAE head overrides
    mask_ratio: float | None = None  # None: MAEConfig's
    norm_pix_loss: bool = False
    frequency_endpoint: bool = False  # the decoder sin-cos frequencies of birder <= 0.6.2
    rgb_stats: str | None = (
        None  # a name of vitreg_jax.data.rgb_stats (None: a given encoder's own, else "birder")
    )
    aug_level: int = 1  # birder's training augmentation level (0: resize only)
    export_every: int | None = None  # also export RUN/encoder every N steps (always at the end)
    # k-NN accuracy of the encoder during training, on labelled folders (one sub-folder per class):
    eval_train: str | None = field(default=None, metadata=_normalised(_folder))  # the neighbours
    eval_val: str | None = field(default=None, metadata=_normalised(_folder))  # the images classified
    eval_every: int | None = None  # steps between evaluations (None: only after the last step)
    eval_k: int = 20  # neighbours of the weighted k-NN (DINO's, T = 0.07)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if "normalise" in f.metadata:
                object.__setattr__(self, f.name, f.metadata["normalise"](getattr(self, f.name)))
        if self.aug_level not in (0, 1):
            raise UserError(f"aug_level must be 0 or 1, got {self.aug_level}")
        if self.rgb_stats is not None and self.rgb_stats not in RGB_STATS:
            named_rgb_stats(self.rgb_stats)  # the UserError naming the known ones
        if self.export_every is not None and self.export_every < 1:
            raise UserError(f"export_every must be at least 1, got {self.export_every}")
        if (self.eval_train is None) != (self.eval_val is None):
            raise UserError(
                "eval_train and eval_val go together (labelled folders: one sub-folder per class)"
            )
        if self.eval_train is None and self.eval_every is not None:
            raise UserError("eval_every needs eval_train and eval_val")
        for name in ("eval_every", "eval_k"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")

    # the encoder and MAE head these settings describe -------------------------------------------------------
    def mae_config_resolved(self) -> MAEConfig:
        cfg = mae_preset(self.mae, **({} if self.mask_ratio is None else {"mask_ratio": self.mask_ratio}))
        if self.mae_config:
            cfg = MAEConfig.from_dict({**cfg.to_dict(), **self.mae_config})
        if self.norm_pix_loss:
            cfg = cfg.replace(norm_pix_loss=True)
        if self.frequency_endpoint:
            cfg = cfg.replace(include_frequency_endpoint=True)
        return cfg

    def preset_config(self) -> ViTConfig:
        """The encoder built from ``network``, ``model_config`` and ``size`` (drop-path 0 unless given)."""
        overrides = {"drop_path_rate": MIM_DROP_PATH_RATE, **self.model_config}
        return preset(self.network, model_config=overrides, image_size=self.size or (224, 224))

    # saving and comparing ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "train"}
        return _json({**d, "train": self.train.to_dict()})

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PretrainSettings:
        d = dict(d)
        if "train" in d:
            d["train"] = TrainConfig.from_dict(d["train"])
        return config_from_dict(cls, d, "PretrainSettings")

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> PretrainSettings:
        """New-run settings from option paths (``{"network": ..., "train.lr": ...}``); the rest default.
        A run made from options names its length (``train.steps`` or ``train.epochs``)."""
        top = {k: v for k, v in options.items() if not k.startswith(TRAIN_PREFIX)}
        train = {k[len(TRAIN_PREFIX) :]: v for k, v in options.items() if k.startswith(TRAIN_PREFIX)}
        if train.get("steps") is None and train.get("epochs") is None:
            raise UserError("give the run length: train.steps or train.epochs")
        return cls.from_dict({**top, "train": train})

    def flat(self) -> dict[str, Any]:
        """{option path: JSON value} of every setting (TrainConfig fields as ``train.<name>``)."""
        d = self.to_dict()
        train = d.pop("train")
        return {**d, **{TRAIN_PREFIX + k: v for k, v in train.items()}}

    def differences(self, options: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
        """(path, requested, these settings') for every requested option that differs from these settings."""
        mine = self.flat()
        normalise = {f.name: f.metadata.get("normalise", _same) for f in dataclasses.fields(self)}
        out = []
        for path, value in options.items():
            if path not in mine:
                raise UserError(f"unknown pretrain setting {path!r}")
            requested = _json(normalise.get(path, _same)(value))
            if requested != mine[path]:
                out.append((path, requested, mine[path]))
        return out


class SettingsMismatch(UserError):
    """Resuming a run with settings that differ from its saved ones; ``differences`` lists them."""

    def __init__(self, message: str, differences: list[tuple[str, Any, Any]]):
        super().__init__(message)
        self.differences = differences


def _show(value: Any) -> str:
    if isinstance(value, list) and all(not isinstance(v, (list, dict)) for v in value):
        return " ".join(map(str, value))
    return json.dumps(value) if isinstance(value, dict) else str(value)


# the run folder
# ------------------------------------------------------------------------------------------------
@dataclass
class PretrainRun:
    """An opened run folder (nothing written yet): its settings, training files and saved record."""

    out: Path
    settings: PretrainSettings
    paths: list[str]  # the training images, in the run's fixed order
    record: dict[str, Any] | None  # the saved run.json (None: a new run)
    name: Callable[[str], str] = str  # how messages name a setting (the command passes its option names)

    @property
    def is_new(self) -> bool:
        return self.record is None

    @property
    def has_checkpoint(self) -> bool:
        from vitreg_jax.pretraining.loop import CHECKPOINT_DIR

        folder = self.out / CHECKPOINT_DIR
        return folder.is_dir() and any(p.name.isdigit() for p in folder.iterdir())

    @property
    def needs_init_weights(self) -> bool:
        """Whether :func:`train` needs the ``settings.init`` encoder given (no checkpoint to continue
        from)."""
        return self.settings.init is not None and not self.has_checkpoint


def _read_record(out: Path) -> dict[str, Any] | None:
    path = out / RUN_FILE
    if not path.is_file():
        return None
    record = read_json_object(path, "a vitreg-jax pretrain run file")
    if not str(record.get("format", "")).startswith("vitreg-jax-pretrain/"):
        raise UserError(f"{path}: not a vitreg-jax pretrain run")
    if record["format"] != FORMAT:
        raise UserError(
            f"{path}: a run of another vitreg-jax version ({record['format']}; this one reads {FORMAT})"
        )
    return record


def open_run(
    out: str | os.PathLike[str],
    settings: PretrainSettings | Mapping[str, Any] | None = None,
    *,
    resume: bool = False,
    export_only: bool = False,
    name: Callable[[str], str] = str,
) -> PretrainRun:
    """Open the run folder ``out`` for a new run, ``resume`` or ``export_only``; nothing is written here.

    ``settings``: a new run's :class:`PretrainSettings`, or a mapping of option paths (``"train.lr"``) that
    were asked for. Resuming (or exporting) a run checks them against the saved settings and refuses, naming
    each, any that differ; a new run is made from them. ``out`` must be new, empty, or hold a run of ours.
    ``name(path)`` names a setting in messages (e.g. ``"train.lr"`` -> ``"--lr"``).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")
    record = _read_record(out)
    if record is None:
        if out.is_dir() and any(p.name != lock_file_name("pretrain") for p in out.iterdir()):
            raise UserError(
                f"{out}: the folder is not empty and holds no pretrain run ({RUN_FILE}); choose a new "
                "or empty folder"
            )
        if export_only:
            raise UserError(f"{out}: no run to export from (expected {out / RUN_FILE})")
        new = settings if isinstance(settings, PretrainSettings) else _from_options(settings or {}, name)
        if not new.data:
            raise UserError(
                f"{name('data')} is required to start a run (folders of images, image files or .txt lists)"
            )
        _check_configs(new)
        from vitreg_jax.data.inputs import list_inputs

        return PretrainRun(out, new, list_inputs(list(new.data)), None, name)
    if not resume and not export_only:
        raise UserError(
            f"{out} already holds a run; continue it with {name('resume')} or choose another folder"
        )
    saved = PretrainSettings.from_dict(record["settings"])
    asked = settings.flat() if isinstance(settings, PretrainSettings) else dict(settings or {})
    diffs = saved.differences(asked)
    if diffs:
        shown = ", ".join(f"{name(p)} {_show(a)} (run has {_show(s)})" for p, a, s in diffs)
        raise SettingsMismatch(f"{out} continues with its saved settings; these differ: {shown}", diffs)
    return PretrainRun(out, saved, _run_files(out, saved, record), record, name)


def _from_options(options: Mapping[str, Any], name: Callable[[str], str]) -> PretrainSettings:
    if not options.get("data"):
        raise UserError(
            f"{name('data')} is required to start a run (folders of images, image files or .txt lists)"
        )
    if options.get(TRAIN_PREFIX + "steps") is None and options.get(TRAIN_PREFIX + "epochs") is None:
        raise UserError(
            f"give the run length: {name(TRAIN_PREFIX + 'steps')} N (optimizer steps) or "
            f"{name(TRAIN_PREFIX + 'epochs')} N (passes over the data)"
        )
    return PretrainSettings.from_options(options)


def _check_configs(settings: PretrainSettings) -> None:
    """Unknown networks, bad overrides and impossible combinations, before anything starts."""
    settings.mae_config_resolved()
    if settings.init is None:
        settings.preset_config()
    else:
        arch = sorted(set(settings.model_config) - GIVEN_ENCODER_KEYS)
        if arch:
            raise UserError(
                f"model_config {', '.join(arch)} cannot change the architecture of the weights of "
                f"{settings.init}"
            )


def _run_files(out: Path, settings: PretrainSettings, record: Mapping[str, Any]) -> list[str]:
    path = out / FILES_FILE
    if path.is_file():
        return [ln for ln in path.read_text().splitlines() if ln]
    from vitreg_jax.pretraining.loop import CHECKPOINT_DIR

    if (out / CHECKPOINT_DIR).exists():
        raise UserError(f"{path}: the run's file list is missing")
    from vitreg_jax.data.inputs import (
        list_inputs,  # the run stopped between run.json and files.txt: list again
    )

    return list_inputs(list(settings.data))


# training
# --------------------------------------------------------------------------------------------------------
@dataclass
class PretrainResult:
    step: int  # optimizer steps done
    loss: float | None  # the last step's loss (None: the run was already complete)
    resumed_from: int | None
    losses: list[float]  # every step's loss in this call
    model: MAE  # the trained MAE (RUN/encoder holds its encoder)
    total_steps: int


def _echo_main(echo: Callable[[str], None] | None) -> Callable[[str], None]:
    import jax

    if echo is None or jax.process_index() != 0:
        return lambda _text: None
    return echo


def _encoder(run: PretrainRun, encoder: ViT | None) -> ViT:
    """The encoder to train: the given one (adjusted to the settings), or one built from the saved / preset
    config (random, birder's init; a resumed run then restores its checkpoint)."""
    from flax import nnx

    from vitreg_jax.model.vit import ViT

    s = run.settings
    if encoder is None:
        if run.needs_init_weights:
            raise UserError(f"this run starts from the weights of {s.init}: load them and give the encoder")
        cfg = ViTConfig.from_dict(run.record["vit_config"]) if run.record else s.preset_config()
        return ViT(cfg, rngs=nnx.Rngs(s.train.seed))
    arch = sorted(set(s.model_config) - GIVEN_ENCODER_KEYS)
    if arch:
        raise UserError(
            f"{run.name('model_config')} {', '.join(arch)} cannot change the architecture of a given encoder"
        )
    encoder.cfg = encoder.cfg.replace(
        drop_path_rate=float(s.model_config.get("drop_path_rate", MIM_DROP_PATH_RATE))
    )
    if s.size:
        encoder.adjust_size(s.size)
    if run.record and encoder.cfg.to_dict() != run.record["vit_config"]:
        saved = run.record["vit_config"]
        diff = sorted(k for k, v in _json(encoder.cfg.to_dict()).items() if saved.get(k) != v)
        raise UserError(f"the given encoder is not the run's ({', '.join(diff)} differ)")
    return encoder


def _rgb_stats(run: PretrainRun, encoder_rgb_stats: Mapping[str, Any] | None) -> dict[str, list[float]]:
    if run.record is not None:
        return run.record["rgb_stats"]
    if run.settings.rgb_stats is None and encoder_rgb_stats is not None:
        return {"mean": list(encoder_rgb_stats["mean"]), "std": list(encoder_rgb_stats["std"])}
    return named_rgb_stats(run.settings.rgb_stats or TRAIN_DEFAULT)


def _periodic(
    run: PretrainRun,
    trainer: MAETrainer,
    vit_cfg: ViTConfig,
    rgb_stats: Mapping[str, Any],
    total: int,
    echo: Callable[[str], None],
) -> list[Periodic]:
    """The measurements the settings ask for, every N steps and after the last (logged as ``"<name>/<key>"``
    beside the loss): with ``eval_train``/``eval_val``, ``knn/top1`` and ``knn/top5``, the weighted k-NN
    accuracy of ``trainer.model(state).encoder`` (:class:`~vitreg_jax.evaluation.monitor.KNNMonitor`, its
    Embedder on ``trainer.mesh`` under ``trainer.policy``). The folders are read and decoded here, before
    training."""
    s = run.settings
    if s.eval_train is None:
        return []
    from vitreg_jax.evaluation.monitor import KNNMonitor
    from vitreg_jax.pretraining.loop import Periodic

    monitor = KNNMonitor(
        s.eval_train,
        s.eval_val,
        size=vit_cfg.image_size,
        rgb_stats=rgb_stats,
        k=s.eval_k,
        mesh=trainer.mesh,
        policy=trainer.policy,
    )
    echo(
        f"k-NN evaluation (k={s.eval_k}) every {s.eval_every or total} steps: {len(monitor.train.keys)} "
        "train "
        "/ "
        f"{len(monitor.val.keys)} val images, {len(monitor.classes)} classes"
        + (f", {len(monitor.failures)} unreadable images skipped" if monitor.failures else "")
    )
    return [Periodic("knn", s.eval_every or total, lambda state, step: monitor(trainer.model(state).encoder))]


def _exporter(
    run: PretrainRun, trainer: MAETrainer, birder_cfg: Mapping[str, Any], echo: Callable[[str], None]
) -> Callable[[TrainState, int], None]:
    import jax

    from vitreg_jax.model.build import save_model

    def export(state: TrainState, step: int) -> None:
        if jax.process_index() != 0:
            return
        mae = trainer.model(state)
        save_model(
            run.out / ENCODER_DIR,
            mae.encoder,
            birder_cfg,
            force=True,
            extra={
                "trained_by": "vitreg-jax pretrain",
                "run": str(run.out.absolute()),
                "step": step,
                "mae_config": mae.cfg.to_dict(),
                "init": run.settings.init,
            },
        )
        echo(f"exported the encoder at step {step} to {run.out / ENCODER_DIR}")

    return export


def _setup(
    run: PretrainRun,
    encoder: ViT | None,
    encoder_rgb_stats: Mapping[str, Any] | None,
) -> tuple[MAETrainer, dict[str, Any]]:
    """The trainer and the run's record (the saved one, or a new run's)."""
    import jax
    from flax import nnx

    from vitreg_jax import __version__
    from vitreg_jax.model.birder_json import birder_config
    from vitreg_jax.pretraining.mae import MAE
    from vitreg_jax.pretraining.step import MAETrainer

    s = run.settings
    given = encoder is not None
    encoder = _encoder(run, encoder)
    rgb_stats = _rgb_stats(run, encoder_rgb_stats)
    model = MAE(encoder, s.mae_config_resolved(), rngs=nnx.Rngs(s.train.seed + 1))
    trainer = MAETrainer(model, s.train)
    if run.record is not None:
        return trainer, run.record
    registered = s.network if not given and not set(s.model_config) - GIVEN_ENCODER_KEYS else None
    record = {
        "format": FORMAT,
        "vitreg_jax_version": __version__,
        "settings": s.to_dict(),
        "vit_config": encoder.cfg.to_dict(),
        "mae_config": model.cfg.to_dict(),
        "rgb_stats": rgb_stats,
        "birder_config": birder_config(encoder.cfg, rgb_stats, registered_name=registered),
        "num_images": len(run.paths),
        "devices": jax.device_count(),
    }
    return trainer, record


def train(
    run: PretrainRun,
    *,
    encoder: ViT | None = None,
    encoder_rgb_stats: Mapping[str, Any] | None = None,
    workers: int | None = None,
    progress: bool = True,
    echo: Callable[[str], None] | None = None,
    periodic: Sequence[Periodic] = (),
    asynchronous: bool = True,
) -> PretrainResult:
    """Train (or continue) the run to its length, checkpointing, logging and exporting ``RUN/encoder``.

    ``encoder``: an already built ViT to pre-train (needed when :attr:`PretrainRun.needs_init_weights`);
    ``encoder_rgb_stats``: the statistics its weights were trained with (used unless ``settings.rgb_stats``
    names others). ``periodic``: extra measurements logged beside the loss (see
    :class:`~vitreg_jax.pretraining.loop.Periodic`). ``echo(line)`` receives progress lines (process 0 only).
    Start ``jax.distributed`` before calling this in a multi-process run.
    """
    import jax

    from vitreg_jax.data.augment import TrainTransform
    from vitreg_jax.pretraining.data_stream import TrainData
    from vitreg_jax.pretraining.loop import fit
    from vitreg_jax.pretraining.optimizer import lr_schedule, total_steps

    say = _echo_main(echo)
    s, cfg = run.settings, run.settings.train
    trainer, record = _setup(run, encoder, encoder_rgb_stats)
    vit_cfg = ViTConfig.from_dict(record["vit_config"])
    transform = TrainTransform(vit_cfg.image_size, record["rgb_stats"], level=s.aug_level)
    data = TrainData(
        run.paths,
        transform,
        batch_size=cfg.batch_size,
        grad_accum_steps=cfg.grad_accum_steps,
        seed=cfg.seed,
        workers=workers,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    if cfg.batch_size % jax.device_count():
        raise UserError(
            f"{run.name(TRAIN_PREFIX + 'batch_size')} {cfg.batch_size} is not divisible by the "
            f"{jax.device_count()} devices"
        )
    spe, total = data.steps_per_epoch, total_steps(cfg, data.steps_per_epoch)
    # evaluation folders are checked (and decoded) before anything is written
    measurements = [*_periodic(run, trainer, vit_cfg, record["rgb_stats"], total, say), *periodic]
    with contextlib.ExitStack() as held:
        # one run at a time per folder, as for embed: two runs would collide on their checkpoints
        if jax.process_index() == 0:
            make_dir(run.out)
            held.enter_context(FolderLock(run.out, "pretrain"))
            if run.record is None:  # run.json first: it marks the folder as ours
                run.record = {**record, "steps_per_epoch": spe, "total_steps": total}
                atomic_write_json(run.out / RUN_FILE, run.record)
            if not (run.out / FILES_FILE).is_file():
                atomic_write_text(run.out / FILES_FILE, "".join(p + "\n" for p in run.paths))
        network = s.init if s.init else record["birder_config"]["registered_name"]
        say(
            f"{network} + {s.mae} at {vit_cfg.image_size[0]}x{vit_cfg.image_size[1]}, "
            f"{len(run.paths)} images, {spe} steps per epoch, {total} steps of {cfg.batch_size} x "
            f"{cfg.grad_accum_steps} images on "
            f"{jax.device_count()} {jax.devices()[0].platform} device(s), {trainer.policy.dtype}"
        )
        result: RunResult = fit(
            trainer,
            data,
            run.out,
            total=total,
            schedule=lr_schedule(cfg, spe),
            resume=True,
            export=_exporter(run, trainer, record["birder_config"], say),
            export_every=s.export_every,
            progress=progress and jax.process_index() == 0,
            asynchronous=asynchronous,
            periodic=measurements,
        )
        return PretrainResult(
            step=result.step,
            loss=result.loss,
            resumed_from=result.resumed_from,
            losses=result.losses,
            model=trainer.model(result.state),
            total_steps=total,
        )


def export_latest(run: PretrainRun, *, echo: Callable[[str], None] | None = None) -> int:
    """Export ``RUN/encoder`` from the run's latest checkpoint (no training); returns its step."""
    from vitreg_jax.pretraining.loop import CHECKPOINT_DIR, Checkpoints

    if run.record is None:
        raise UserError(f"{run.out}: no run to export from")
    if not run.has_checkpoint:
        raise UserError(f"{run.out / CHECKPOINT_DIR}: no checkpoint to export yet")
    trainer, record = _setup(run, None, None)
    ckpt = Checkpoints(run.out / CHECKPOINT_DIR, keep=run.settings.train.keep_checkpoints, asynchronous=False)
    try:
        step = ckpt.latest_step()
        if step is None:
            raise UserError(f"{run.out / CHECKPOINT_DIR}: no checkpoint to export yet")
        state, _ = ckpt.restore(step, trainer.abstract_state())
    finally:
        ckpt.close()
    _exporter(run, trainer, record["birder_config"], _echo_main(echo))(state, step)
    return step


def stderr_echo(prefix: str) -> Callable[[str], None]:
    """An ``echo`` for :func:`train` that prints ``prefix: line`` to stderr, in process 0 only."""

    def echo(text: str) -> None:
        import jax

        if jax.process_index() == 0:
            print(f"{prefix}: {text}", file=sys.stderr, flush=True)

    return echo
