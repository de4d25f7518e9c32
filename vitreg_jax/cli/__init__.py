"""The ``vitreg-jax`` command line: each command parses its options, loads what it needs, calls one library
function and prints. ``main.py`` dispatches; one module per command (``convert.py`` holds ``convert``,
``export`` and ``info``); ``_options.py`` holds the options several commands share. A command module imports
neither JAX nor torch until it runs, so that every ``--help`` stays fast (tested).
"""
