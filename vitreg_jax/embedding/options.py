"""The choices an embedding run offers, in a module that imports nothing heavy: the ``Embedder``, the dataset
run and the ``embed`` command's ``--help`` read them from here."""

from __future__ import annotations

from vitreg_jax.data.shards import FILES_PER_SHARD

# what an embedding row is: the pooled embedding (birder's ``embedding``), every token, or the patch tokens
FEATURES = ("cls", "tokens", "patches")
# output formats: one embeddings.npy, or one parquet part per input shard
FORMATS = ("npy", "parquet")
# image files per shard of a folder or list, hence per parquet part and unit of resuming
FILES_PER_PART = FILES_PER_SHARD
