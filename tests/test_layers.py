"""Dependencies run one way: the CLI on top, ``vitreg_jax.convert`` under it, the core library at the bottom.

The core is every module of ``vitreg_jax/`` but ``cli.py``, ``__main__.py`` and ``commands/``; it never imports
``vitreg_jax.convert``, not even inside a function (only the lazy name table of ``vitreg_jax/__init__.py``
names it, as a string). ``convert/`` never imports the CLI. Imports are read with ``ast``, so an import inside
a function, a method or an ``if TYPE_CHECKING:`` block counts like any other.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORE = sorted(p for p in (ROOT / "vitreg_jax").glob("*.py") if p.name not in ("cli.py", "__main__.py"))
CONVERT = sorted((ROOT / "convert").glob("*.py"))
CONVERT_PACKAGE = "vitreg_jax.convert"
CLI_MODULES = ("vitreg_jax.cli.main", "vitreg_jax.cli")


def package_of(path: Path) -> str:
    return CONVERT_PACKAGE if path.parent.name == "convert" else "vitreg_jax"


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, wherever it sits; ``from X import a``
    gives both ``X`` and ``X.a`` (``a`` may be a module)."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the file's package
                parts = package_of(path).split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def named(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def test_the_parser_sees_imports_inside_functions_and_type_checking(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from vitreg_jax import convert\n"
                     "def f():\n    import vitreg_jax.convert.hub\n    from vitreg_jax.convert.load import x\n")
    hits = [m for _, m in imported_modules(probe) if named(m, (CONVERT_PACKAGE,))]
    assert hits == ["vitreg_jax.convert", "vitreg_jax.convert.hub", "vitreg_jax.convert.load",
                    "vitreg_jax.convert.load.x"]


@pytest.mark.parametrize("path", CORE, ids=lambda p: p.name)
def test_the_core_never_imports_convert(path: Path) -> None:
    bad = [f"line {line}: {m}" for line, m in imported_modules(path) if named(m, (CONVERT_PACKAGE, *CLI_MODULES))]
    assert not bad, f"vitreg_jax/{path.name} imports the layers above the core: {bad}"


def test_only_the_lazy_name_table_names_convert() -> None:
    """No core module reaches convert through importlib with a string, except the lazy name table."""
    for path in CORE:
        strings = [n.value for n in ast.walk(ast.parse(path.read_text()))
                   if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value.startswith(CONVERT_PACKAGE)]
        if path.name == "__init__.py":
            import vitreg_jax

            assert set(strings) <= set(vitreg_jax._EXPORTS.values())
        else:
            assert not strings, f"vitreg_jax/{path.name} names {strings}"


@pytest.mark.parametrize("path", CONVERT, ids=lambda p: p.name)
def test_convert_never_imports_the_cli(path: Path) -> None:
    bad = [f"line {line}: {m}" for line, m in imported_modules(path) if named(m, CLI_MODULES)]
    assert not bad, f"convert/{path.name} imports the command line: {bad}"


def test_importing_the_core_loads_no_convert_module() -> None:
    code = ("import sys, vitreg_jax.model.build, vitreg_jax.model.checkpoint, vitreg_jax.pretraining.mae, vitreg_jax.model.vit\n"
            f"print(sorted(m for m in sys.modules if m.startswith({CONVERT_PACKAGE!r})))\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_load_model_with_cfg_is_the_converter_s() -> None:
    import vitreg_jax
    from vitreg_jax.convert import load

    assert vitreg_jax.load_model_with_cfg is load.load_model_with_cfg
