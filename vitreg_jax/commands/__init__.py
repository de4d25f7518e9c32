"""The ``vitreg-jax`` sub-commands other than the converter's (which live in ``vitreg_jax.convert.commands``)."""
