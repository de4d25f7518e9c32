import sys

from vitreg_jax.cli.main import main

sys.exit(main())
