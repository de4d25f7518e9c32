"""MAE pre-training in JAX, birder's ``mae_vit`` recipe: the model, the optimizer, the jitted step, the data
stream, the loop and the resumable run.

- ``config.py``: ``MAEConfig`` (the decoder and masking) and ``TrainConfig`` (the recipe);
- ``mae.py``: the ``MAE`` module around any supported encoder; ``optimizer.py``: AdamW and its schedule;
- ``step.py``: ``MAETrainer``, the training jit boundary (one step, sharded over the mesh);
- ``data_stream.py``: augmented training batches; ``loop.py``: ``fit`` (steps, logs, checkpoints);
- ``run.py``: ``train``, the run folder behind ``vitreg-jax pretrain`` (settings, resume, export).
"""
