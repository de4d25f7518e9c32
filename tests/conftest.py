"""pytest's hooks and the shared fixtures: fp32 parity settings, the birder requirement, the summary of the
measured differences (:mod:`tests.support.report`) and the tiny birder files several test files use."""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import pytest

from tests.support.report import MEASURED, REQUIRE_BIRDER

if TYPE_CHECKING:
    from tests.support.birder_files import Tiny

# Parity is tested at full fp32 matmul precision (it changes nothing on CPU; on GPU/TPU it disables
# TF32/bf16).
jax.config.update("jax_default_matmul_precision", "highest")


def pytest_configure(config: pytest.Config) -> None:
    if REQUIRE_BIRDER:  # CI: a missing reference must fail, never turn parity tests into skips
        import birder  # noqa: F401
        import torch  # noqa: F401


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not MEASURED:
        return
    terminalreporter.section("parity against birder 0.8.4 (max |diff|)")
    width = max(len(c) for c, _, _ in MEASURED)
    for case, quantity, value in MEASURED:
        terminalreporter.write_line(f"{case:<{width}}  {quantity:<22} {value:.2e}")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    """A tiny birder vit_reg4_b16 saved by birder as .pt (with and without its config), .json and
    .safetensors."""
    from tests.support.birder_files import Tiny, birder_net, birder_save, birder_save_st
    from tests.support.tiny_models import TINY_BIRDER

    folder = tmp_path_factory.mktemp("birder")
    net = birder_net()
    pt, js = birder_save(net, folder, "vit_reg4_b16_tiny", external_config=TINY_BIRDER)
    bare, _ = birder_save(net, folder / "bare", "vit_reg4_b16_tiny")
    st = birder_save_st(net, folder / "vit_reg4_b16_tiny_1.safetensors", external_config=TINY_BIRDER)
    return Tiny(net=net, pt=pt, pt_bare_meta=bare, json=js, st=st)
