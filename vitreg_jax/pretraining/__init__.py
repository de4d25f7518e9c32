"""MAE pre-training in JAX, birder's ``mae_vit`` recipe: the model, the optimizer, the jitted step, the data
stream, the loop and the resumable run.

- ``config.py``: ``MAEConfig`` (the decoder and masking) and ``TrainConfig`` (the recipe);
- ``mae.py``: the ``MAE`` module around any supported encoder; ``optimizer.py``: AdamW and its schedule;
- ``step.py``: ``MAETrainer``, the training jit boundary (one step, sharded over the mesh);
- ``data_stream.py``: augmented training batches; ``loop.py``: ``fit`` (steps, logs, checkpoints);
- ``run.py``: ``train``, the run folder behind ``vitreg-jax pretrain`` (settings, resume, export).
"""

from vitreg_jax._lazy import lazy_names

_EXPORTS = {
    "MAEConfig": "vitreg_jax.pretraining.config",
    "TrainConfig": "vitreg_jax.pretraining.config",
    "mae_preset": "vitreg_jax.pretraining.config",
    "MAE": "vitreg_jax.pretraining.mae",
    "Masks": "vitreg_jax.pretraining.mae",
    "make_optimizer": "vitreg_jax.pretraining.optimizer",
    "MAETrainer": "vitreg_jax.pretraining.step",
    "TrainData": "vitreg_jax.pretraining.data_stream",
    "fit": "vitreg_jax.pretraining.loop",
    "train": "vitreg_jax.pretraining.run",
    "PretrainSettings": "vitreg_jax.pretraining.run",
    "open_run": "vitreg_jax.pretraining.run",
    "random_masking": "vitreg_jax.pretraining.mae",
    "unpatchify": "vitreg_jax.pretraining.mae",
}
__all__ = sorted(_EXPORTS)  # noqa: PLE0605 (the lazily imported names above)
__getattr__, __dir__ = lazy_names(__name__, _EXPORTS)
