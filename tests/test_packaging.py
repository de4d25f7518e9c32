"""pyproject.toml lists every package: a regular (non-editable) install must ship all sub-commands."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_is_listed_in_pyproject() -> None:
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(tool["packages"])
    dirs = {"vitreg_jax": ROOT / "vitreg_jax", **{k: ROOT / v for k, v in tool["package-dir"].items()}}

    def folder(package: str) -> Path:  # a package's folder, through the longest package-dir mapping
        mapped = max((k for k in dirs if package == k or package.startswith(k + ".")), key=len)
        return dirs[mapped].joinpath(*package[len(mapped) :].split(".")[1:])

    found = {
        ".".join((name, *p.parent.relative_to(root).parts))
        for name, root in dirs.items()
        for p in root.rglob("__init__.py")
    }
    assert found <= listed, f"packages missing from pyproject.toml: {sorted(found - listed)}"
    assert all((folder(name) / "__init__.py").is_file() for name in listed)
