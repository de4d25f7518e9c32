"""pyproject.toml lists every package: a regular (non-editable) install must ship all sub-commands."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_is_listed_in_pyproject() -> None:
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(tool["packages"])
    dirs = {"vitreg_jax": ROOT / "vitreg_jax", **{k: ROOT / v for k, v in tool["package-dir"].items()}}
    found = {"vitreg_jax.convert"} | {
        ".".join(p.parent.relative_to(ROOT).parts) for p in dirs["vitreg_jax"].rglob("__init__.py")
    }
    assert found <= listed, f"packages missing from pyproject.toml: {sorted(found - listed)}"
    assert all((dirs.get(name, ROOT / name.replace(".", "/")) / "__init__.py").is_file() for name in listed)
