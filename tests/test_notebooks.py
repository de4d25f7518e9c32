"""Every notebook runs top to bottom (CPU, small settings) and draws its figures; the .ipynb match their .py.

The notebooks are kept as jupytext percent-format sources (``notebooks/NN_name.py``) paired with ``.ipynb``
files committed without outputs. Here each ``.py`` is read with jupytext and executed by nbclient in a fresh
kernel of this interpreter, with ``VITREG_JAX_NOTEBOOK_QUICK=1`` (tiny stand-in models) and a per-notebook
timeout. Regenerate the ``.ipynb`` after editing a ``.py``::

    .venv/bin/jupytext --to ipynb notebooks/NN_name.py
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
jupytext = pytest.importorskip("jupytext")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("matplotlib")
pytest.importorskip("ipykernel")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
KERNEL = "vitreg-jax-tests"
# name -> (time limit in seconds for the whole notebook (and for each cell), figures it must draw, needs
# birder)
EXPECTED: dict[str, tuple[int, int, bool]] = {
    "01_embeddings": (240, 3, False),
    "02_port_weights": (300, 2, True),
    "03_mae_pretraining": (300, 2, False),
    "04_batch_embedding_at_scale": (240, 1, False),
    "05_evaluating_an_encoder": (240, 2, False),
}


def _sources() -> list[str]:
    return sorted(p.stem for p in NOTEBOOKS.glob("[0-9][0-9]_*.py"))


def test_every_notebook_is_listed() -> None:
    assert set(_sources()) <= set(EXPECTED), (
        f"add new notebooks to EXPECTED: {set(_sources()) - set(EXPECTED)}"
    )


@pytest.mark.parametrize("name", _sources())
def test_ipynb_is_paired_with_its_py_and_has_no_outputs(name: str) -> None:
    ipynb = NOTEBOOKS / f"{name}.ipynb"
    assert ipynb.is_file(), f"{ipynb.name} missing: run `jupytext --to ipynb notebooks/{name}.py`"
    committed = nbformat.read(ipynb, as_version=4)
    source = jupytext.read(NOTEBOOKS / f"{name}.py")
    pair = [(c.cell_type, c.source) for c in committed.cells]
    expected = [(c.cell_type, c.source) for c in source.cells]
    assert pair == expected, (
        f"{ipynb.name} differs from {name}.py: run `jupytext --to ipynb notebooks/{name}.py`"
    )
    for cell in committed.cells:
        if cell.cell_type == "code":
            assert not cell.get("outputs") and cell.get("execution_count") is None, (
                f"{ipynb.name} is committed with outputs: clear them"
            )


def _figures(nb) -> int:
    return sum(
        1
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if out.get("output_type") in ("display_data", "execute_result") and "image/png" in out.get("data", {})
    )


@pytest.fixture(scope="module")
def kernel_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A JUPYTER_PATH whose kernel runs this very interpreter (never some other python3 kernelspec)."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "vitreg-jax tests",
                "language": "python",
            }
        )
    )
    return str(root)


@pytest.mark.parametrize("name", _sources())
def test_notebook_runs_and_draws_its_figures(
    name: str, kernel_path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    timeout, min_figures, needs_birder = EXPECTED[name]
    if needs_birder:
        pytest.importorskip("birder")
    monkeypatch.setenv("JUPYTER_PATH", kernel_path)
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebooks' scratch folders go away with pytest's
    monkeypatch.setenv(
        "VITREG_JAX_CACHE", str(tmp_path / "cache")
    )  # no published weights: the same run everywhere
    monkeypatch.setenv("VITREG_JAX_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    nb = jupytext.read(NOTEBOOKS / f"{name}.py")
    client = nbclient.NotebookClient(
        nb,
        timeout=timeout,
        kernel_name=KERNEL,
        allow_errors=False,
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    start = time.perf_counter()
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as e:  # the cell and the traceback, not nbclient's frames
        pytest.fail(f"{name}: a cell failed:\n{str(e)[-4000:]}", pytrace=False)
    seconds = time.perf_counter() - start
    figures = _figures(nb)
    print(f"{name}: ran in {seconds:.1f} s, {figures} figures")
    assert figures >= min_figures, f"{name}: drew {figures} figures, expected at least {min_figures}"
    assert seconds <= timeout, f"{name}: took {seconds:.0f} s, over its {timeout} s budget"
