"""The bridge to birder's files, installed as ``vitreg_jax.convert`` (its source lives in ``convert/`` at the
repository's top level, mapped by ``package-dir`` in ``pyproject.toml``).

What it holds: birder's ``.pt`` and ``.safetensors`` formats (``formats/``, read and written without torch),
the published weights and their cache (``hub.py``), the key mapping between birder's state dicts and ours
(``mapping.py``), reading an architecture off a file (``infer.py``, ``architecture.py``), conversion both ways
(``to_checkpoint.py``, ``to_birder.py``), loading any source as a model (``load.py``), ``info.py``, the
seeded stand-in birder writes when the published weights are out of reach (``standin.py``) and the
comparison with birder itself (``verify.py``).

The rule: the command line imports this package, this package imports the library below it, and the library
(``vitreg_jax.model``, ``data``, ``embedding``, ``evaluation``, ``pretraining``) never imports it. torch and
birder are imported only by ``verify.py`` and ``standin.py``, inside the functions that compare with birder
or write a stand-in; nothing else here needs them.
"""

from vitreg_jax._lazy import lazy_names

_EXPORTS = {
    "load_model_with_cfg": "vitreg_jax.convert.load",
    "convert_to_checkpoint": "vitreg_jax.convert.to_checkpoint",
    "export_to_birder": "vitreg_jax.convert.to_birder",
    "read_birder_file": "vitreg_jax.convert.formats.birder_file",
    "write_birder_file": "vitreg_jax.convert.formats.birder_file",
    "published_names": "vitreg_jax.convert.hub",
    "checkpoint_info": "vitreg_jax.convert.info",
    "info_text": "vitreg_jax.convert.info",
    "demo_weights": "vitreg_jax.convert.standin",
    "write_standin": "vitreg_jax.convert.standin",
    "sample_images_dir": "vitreg_jax.convert.standin",
    "TINY_MODEL_CONFIG": "vitreg_jax.convert.standin",
}
__all__ = sorted(_EXPORTS)  # noqa: PLE0605 (the lazily imported names above)
__getattr__, __dir__ = lazy_names(__name__, _EXPORTS)
