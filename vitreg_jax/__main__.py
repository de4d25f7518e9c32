import sys

from vitreg_jax.cli import main

sys.exit(main())
