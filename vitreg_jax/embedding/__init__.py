"""Images to embeddings: the ``Embedder`` (the inference jit boundary), output formats, the dataset run and
the reader of its outputs.

- ``embedder.py``: ``Embedder`` (compiled per shape bucket, sharded over every device and host, fp32 or bf16);
- ``dataset.py``: ``embed_dataset``, the resumable, multi-process run behind ``vitreg-jax embed``, stepping
  through its shards in ``_lockstep.py`` and keeping its state in the output folder (``_output_folder.py``);
- ``outputs.py``: the npy and parquet formats and their manifest; ``reader.py``: ``open_embeddings`` reads
  either back; ``options.py``: the choices the command line offers (no JAX import).
"""

from vitreg_jax._lazy import lazy_names

_EXPORTS = {
    "Embedder": "vitreg_jax.embedding.embedder",
    "make_embed_fn": "vitreg_jax.embedding.embedder",
    "embed_dataset": "vitreg_jax.embedding.dataset",
    "EmbedResult": "vitreg_jax.embedding.dataset",
    "open_embeddings": "vitreg_jax.embedding.reader",
    "EmbeddingSet": "vitreg_jax.embedding.reader",
    "decode_name": "vitreg_jax.embedding.outputs",
    "configure_xla_flags": "vitreg_jax.embedding.embedder",
}
__all__ = sorted(_EXPORTS)  # noqa: PLE0605 (the lazily imported names above)
__getattr__, __dir__ = lazy_names(__name__, _EXPORTS)
