"""Images in: input listing, tar shards and URLs, the ordered threaded loader, preprocessing, augmentation,
labelled folders. Never imports JAX (tested), so that the loaders serve any framework.

- ``inputs.py``: command-line inputs (files, folders, path lists) to an ordered list of images;
- ``shards.py``: inputs as shards (webdataset ``.tar`` files, brace patterns, globs, fsspec URLs) and their
  items;
- ``loader.py``: decoding and preprocessing in threads, in order, memory-bounded, as batches with failures;
- ``preprocess.py``: birder's inference transform, bit for bit; ``augment.py``: MAE's training transform;
- ``rgb_stats.py``: the named normalisation statistics; ``labelled.py``: ``class/image`` folders.
"""

from vitreg_jax._lazy import lazy_names

_EXPORTS = {
    "list_inputs": "vitreg_jax.data.inputs",
    "list_shards": "vitreg_jax.data.shards",
    "Shard": "vitreg_jax.data.shards",
    "iter_batches": "vitreg_jax.data.loader",
    "iter_item_batches": "vitreg_jax.data.loader",
    "classification_transform": "vitreg_jax.data.preprocess",
    "get_size_from_signature": "vitreg_jax.data.preprocess",
    "load_image": "vitreg_jax.data.preprocess",
    "decode_image": "vitreg_jax.data.preprocess",
    "TrainTransform": "vitreg_jax.data.augment",
    "named_rgb_stats": "vitreg_jax.data.rgb_stats",
    "read_labelled_folder": "vitreg_jax.data.labelled",
}
__all__ = sorted(_EXPORTS)  # noqa: PLE0605 (the lazily imported names above)
__getattr__, __dir__ = lazy_names(__name__, _EXPORTS)
