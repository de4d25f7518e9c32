"""Judging an encoder: exact search, neighbour tables, k-NN classification, the linear probe, the report
and the monitor that runs k-NN during pre-training.

- ``search.py``: exact cosine top-k, blocked over the index (the engine of the rest);
- ``neighbours.py``: the ``vitreg-jax knn`` table (query, rank, key, score) between two ``embed`` outputs;
- ``knn.py``: weighted k-NN classification (DINO's rule); ``linear_probe.py``: the linear probe;
- ``report.py``: both on one train/val pair, as ``vitreg-jax eval`` reports them;
- ``labelled_embeddings.py``: labelled folders (or ``embed`` outputs) as embeddings with labels;
- ``monitor.py``: k-NN accuracy of the encoder under training, every so many steps.
"""
