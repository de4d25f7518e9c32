"""birder's file formats, read and written without torch.

- ``birder_file.py``: a ``.pt`` or ``.safetensors`` file as a flat state dict (``BirderFile``), by extension;
- ``pt_reader.py`` / ``pt_writer.py``: the zip archive ``torch.save`` writes, read through ``_pt_pickle.py``
  (an interpreter of the few pickle records a state dict is made of, never Python's unpickler), whose
  allowed globals are in ``_pt_globals.py`` and dtypes and storage layout in ``_pt_format.py``;
- ``safetensors_io.py``: the ``.safetensors`` format.
"""
