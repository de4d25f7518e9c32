"""The parity figures a test run measured, printed at its end by ``conftest.py``, and whether birder must be
there (``VITREG_JAX_REQUIRE_BIRDER=1``, as ``make test`` sets it: a missing reference fails the run)."""

from __future__ import annotations

import os

REQUIRE_BIRDER = os.environ.get("VITREG_JAX_REQUIRE_BIRDER") == "1"
MEASURED: list[tuple[str, str, float]] = []  # (case, quantity, max |diff|) reported at the end of the run


def record(case: str, quantity: str, value: float) -> None:
    """Keep one measured difference for the summary at the end of the run."""
    MEASURED.append((case, quantity, float(value)))
