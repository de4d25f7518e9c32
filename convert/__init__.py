"""The bridge to PyTorch / birder files, installed as ``vitreg_jax.convert``.

The only code in vitreg-jax that touches torch, and only inside the functions that read or write ``.pt``.
"""
