"""Judging an encoder: exact search, neighbour tables, k-NN classification, the linear probe, the report
and the monitor that runs k-NN during pre-training.

- ``search.py``: exact cosine top-k, blocked over the index (the engine of the rest);
- ``neighbours.py``: the ``vitreg-jax knn`` table (query, rank, key, score) between two ``embed`` outputs;
- ``knn.py``: weighted k-NN classification (DINO's rule); ``probe.py``: the linear probe;
- ``report.py``: both on one train/val pair, as ``vitreg-jax eval`` reports them;
- ``labelled_embeddings.py``: labelled folders (or ``embed`` outputs) as embeddings with labels;
- ``monitor.py``: k-NN accuracy of the encoder under training, every so many steps.
"""

from vitreg_jax._lazy import lazy_names

_EXPORTS = {
    "cosine_topk": "vitreg_jax.evaluation.search",
    "knn_to_parquet": "vitreg_jax.evaluation.neighbours",
    "knn_classify": "vitreg_jax.evaluation.knn",
    "linear_probe": "vitreg_jax.evaluation.probe",
    "evaluate_embeddings": "vitreg_jax.evaluation.report",
    "format_report": "vitreg_jax.evaluation.report",
    "LabelledEmbeddings": "vitreg_jax.evaluation.labelled_embeddings",
    "embed_labelled": "vitreg_jax.evaluation.labelled_embeddings",
    "load_labelled_embeddings": "vitreg_jax.evaluation.labelled_embeddings",
    "KNNMonitor": "vitreg_jax.evaluation.monitor",
    "embed_folders": "vitreg_jax.evaluation.labelled_embeddings",
    "DEFAULT_INDEX_BLOCK": "vitreg_jax.evaluation.settings",
}
__all__ = sorted(_EXPORTS)  # noqa: PLE0605 (the lazily imported names above)
__getattr__, __dir__ = lazy_names(__name__, _EXPORTS)
