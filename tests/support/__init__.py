"""What the tests share (never a test module: no test file imports another):

- ``report.py``: ``record`` (the parity figures printed at the end of a run) and ``REQUIRE_BIRDER``;
- ``tolerances.py``: every tolerance of the suite, one named constant each, with what it bounds;
- ``birder_ref.py``: birder's networks, run on numpy inputs, for the parity tests (``TINY_MODEL_CONFIG``);
- ``birder_files.py``: files birder writes itself (tiny ``.pt`` / ``.json`` / ``.safetensors``), legacy key
  layouts, files whose pickle would run code and damaged files, for the converter's tests;
- ``legacy_birder.py`` and ``legacy_birder_writer.py``: files written by an old birder release;
- ``torch_pt_reader.py``: ``torch.load`` in a child process, the reference and the former path of the reader;
- ``fuzz_support.py``: the hypothesis profile and the property every mutated input must meet;
- ``hf_mirror.py``: a local Hugging Face hub mirror on 127.0.0.1;
- ``mae_mapping.py``: birder's MAE state dict to ours and back;
- ``pretrain_cli.py``: a tiny MAE's ``vitreg-jax pretrain`` arguments and runs; ``kill_run.py``: a run that
  kills itself at a given step or part;
- ``search_reference.py``: the float64 brute force for the exact search;
- ``embed_folders.py``, ``labelled_images.py``: ``embed``-like output folders and labelled image folders.

Shared fixtures (the tiny birder files) are in ``tests/conftest.py``.
"""
