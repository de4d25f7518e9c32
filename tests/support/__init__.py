"""What the tests share. Test files import from here and never from each other; ``tests/conftest.py`` keeps
only pytest's hooks and the fixtures (the tiny birder files, ``tiny``).

- ``tiny_models.py``: every tiny model configuration of the suite, one name each (``TINY_BIRDER``,
  ``TINY_EMBEDDER``, ``TINY_MAE_ENCODER`` / ``TINY_MAE_DECODER``, ...), and the builders ``tiny_vit_config``,
  ``tiny_vit`` and ``tiny_mae``;
- ``tolerances.py``: every tolerance of the suite, one named constant each, with what it bounds;
- ``report.py``: ``record`` (the parity figures ``conftest.py`` prints at the end of a run) and
  ``REQUIRE_BIRDER``;
- ``birder_ref.py``: birder's networks run beside ours on the same numpy inputs, for the parity tests;
- ``birder_files.py``: files birder writes itself (tiny ``.pt`` / ``.json`` / ``.safetensors``), legacy key
  layouts, files whose pickle would run code and damaged files, for the converter's tests;
- ``legacy_birder.py``: where the old birder release lives; ``legacy_birder_writer.py``: the script run under
  it (by path, in its own process) to write that release's files;
- ``torch_pt_reader.py``: ``torch.load`` in a child process, the reference and the former path of the reader
  (``python -m tests.support.torch_pt_reader``, also used by ``benchmarks/convert.py``);
- ``fuzz_support.py``: the hypothesis profile and the property every mutated input must meet;
- ``hf_mirror.py``: a local Hugging Face hub mirror on 127.0.0.1;
- ``mae_mapping.py``: birder's MAE state dict to ours and back;
- ``pretrain_cli.py``: the tiny MAE's ``vitreg-jax pretrain`` arguments, runs and one-line error check;
- ``kill_run.py``: a command that kills itself at a given training step or embed part
  (``python -m tests.support.kill_run``);
- ``search_reference.py``: the float64 brute force for the exact search, and the check against it;
- ``embed_folders.py``, ``labelled_images.py``: ``embed``-like output folders and labelled image folders.
"""
