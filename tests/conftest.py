"""Shared test set-up: fp32 parity settings, birder helpers, and a summary of measured differences."""

from __future__ import annotations

import os

import jax
import pytest

# Parity is tested at full fp32 matmul precision (it changes nothing on CPU; on GPU/TPU it disables TF32/bf16).
jax.config.update("jax_default_matmul_precision", "highest")

REQUIRE_BIRDER = os.environ.get("VITREG_JAX_REQUIRE_BIRDER") == "1"
MEASURED: list[tuple[str, str, float]] = []  # (case, quantity, max |diff|) reported at the end of the run


def pytest_configure(config: pytest.Config) -> None:
    if REQUIRE_BIRDER:  # CI: a missing reference must fail, never turn parity tests into skips
        import birder  # noqa: F401
        import torch  # noqa: F401


def record(case: str, quantity: str, value: float) -> None:
    MEASURED.append((case, quantity, float(value)))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not MEASURED:
        return
    terminalreporter.section("parity against birder 0.8.4 (max |diff|)")
    width = max(len(c) for c, _, _ in MEASURED)
    for case, quantity, value in MEASURED:
        terminalreporter.write_line(f"{case:<{width}}  {quantity:<22} {value:.2e}")
