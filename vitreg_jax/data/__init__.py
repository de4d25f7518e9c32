"""Images in: input listing, tar shards and URLs, the ordered threaded loader, preprocessing, augmentation,
labelled folders. Never imports JAX (tested), so that the loaders serve any framework.

- ``inputs.py``: command-line inputs (files, folders, path lists) to an ordered list of images;
- ``shards.py``: inputs as shards (webdataset ``.tar`` files, brace patterns, globs, fsspec URLs) and their items;
- ``loader.py``: decoding and preprocessing in threads, in order, memory-bounded, as batches with failures;
- ``preprocess.py``: birder's inference transform, bit for bit; ``augment.py``: MAE's training transform;
- ``rgb_stats.py``: the named normalisation statistics; ``labelled.py``: ``class/image`` folders.
"""
