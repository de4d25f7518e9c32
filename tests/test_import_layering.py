"""Imports run one way: the command line on top, ``vitreg_jax.convert`` under it, then pre-training,
evaluation, embedding, the model, the data pipeline, and the utilities at the bottom (``RANKS``).

Every module of ``vitreg_jax/`` and ``convert/`` is read with ``ast``, so an import inside a function, a
method or an ``if TYPE_CHECKING:`` block counts like any other. A module may import its own layer or the
layers below; no module imports upward, and no chain of imports, through any layer, comes back to where it
started. Only the lazy name tables (a package ``__init__``'s ``_EXPORTS``) name modules as strings.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONVERT_PACKAGE = "vitreg_jax.convert"

# layer -> rank; a module imports only modules of its own rank or lower (the longest prefix names the layer)
RANKS: dict[str, int] = {
    "vitreg_jax": 0,  # the utilities: errors, fileio, tree, parallel, the lazy namespaces, locks
    "vitreg_jax.data": 1,
    "vitreg_jax.model": 2,
    "vitreg_jax.embedding": 3,
    "vitreg_jax.evaluation": 4,
    "vitreg_jax.pretraining": 5,
    CONVERT_PACKAGE: 6,
    "vitreg_jax.cli": 7,
    "vitreg_jax.__main__": 7,
}
# modules that must not import JAX (the data pipeline serves any framework), not even inside a function
JAX_FREE = ("vitreg_jax.data", "vitreg_jax.errors", "vitreg_jax.fileio", "vitreg_jax._lazy")
COMMANDS = ("convert", "export", "info", "embed", "knn", "eval", "pretrain", "demo")


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "convert":
        parts = ["vitreg_jax", *parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES: dict[str, Path] = {
    module_name(p): p for folder in ("vitreg_jax", "convert") for p in sorted((ROOT / folder).rglob("*.py"))
}


def is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def imported_modules(module: str, path: Path | None = None) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the module (its source: ``path``, by default the
    module's file), wherever it sits; ``from X import a`` gives both ``X`` and ``X.a`` (``a`` may be a
    module)."""
    path = MODULES[module] if path is None else path
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the module's package
                package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                parts = package[: len(package) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def internal_imports(module: str, path: Path | None = None) -> list[tuple[int, str]]:
    """The imports of modules of this project (a name imported from a module counts as that module)."""
    found = []
    for line, name in imported_modules(module, path):
        if name in MODULES:
            found.append((line, name))
    return sorted(set(found))


def rank(module: str) -> int:
    layer = max((k for k in RANKS if module == k or module.startswith(k + ".")), key=len)
    return RANKS[layer]


def test_every_module_has_a_layer() -> None:
    assert len(MODULES) > 60
    for module in MODULES:
        assert rank(module) >= 0


def test_the_parser_sees_imports_inside_functions_and_type_checking(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from vitreg_jax import convert\n"
        "def f():\n    import vitreg_jax.convert.hub\n    from vitreg_jax.cli.main import main\n"
        "    from .precision import ComputePolicy\n"
    )
    hits = [m for _, m in internal_imports("vitreg_jax.model.probe", probe)]
    assert "vitreg_jax.model.precision" in hits
    hits.remove("vitreg_jax.model.precision")
    assert sorted(hits) == [
        "vitreg_jax",
        "vitreg_jax.cli.main",
        "vitreg_jax.convert",
        "vitreg_jax.convert.hub",
    ]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_imports_upward(module: str) -> None:
    bad = [
        f"line {line}: {m} (rank {rank(m)})"
        for line, m in internal_imports(module)
        if rank(m) > rank(module) and not is_package(m)
    ]
    # a package __init__ above this layer counts too: importing it would run it
    bad += [
        f"line {line}: {m} (rank {rank(m)})"
        for line, m in internal_imports(module)
        if is_package(m) and rank(m) > rank(module)
    ]
    assert not bad, f"{module} (rank {rank(module)}) imports a layer above it: {bad}"


def test_no_import_cycle() -> None:
    """No cycle among the modules, imports inside functions included (Tarjan's strongly connected parts)."""
    graph = {m: sorted({n for _, n in internal_imports(m) if n != m and not is_package(n)}) for m in MODULES}
    assert any(graph.values())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                part.append(w)
                if w == v:
                    break
            if len(part) > 1:
                cycles.append(sorted(part))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith(JAX_FREE)))
def test_the_data_pipeline_never_imports_jax(module: str) -> None:
    bad = [
        f"line {line}: {m}"
        for line, m in imported_modules(module)
        if m.split(".")[0] in ("jax", "jaxlib", "flax", "optax", "orbax")
    ]
    assert not bad, f"{module} imports JAX: {bad}"


def string_module_names(module: str) -> list[str]:
    tree = ast.parse(MODULES[module].read_text())
    return [
        n.value
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant)
        and isinstance(n.value, str)
        and n.value.startswith("vitreg_jax.")
        and n.value.split(":")[0] in MODULES
    ]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_only_the_lazy_name_tables_name_modules_as_strings(module: str) -> None:
    names = string_module_names(module)
    if module == "vitreg_jax":  # the top-level API may point anywhere, the converter included
        return
    if module == "vitreg_jax.cli.main":  # the command table: one module per command
        assert all(n.startswith("vitreg_jax.cli.") for n in names)
        return
    if is_package(module):  # a package's table points into the package itself
        assert all(n.startswith(module + ".") for n in names), names
        return
    assert not names, f"{module} names modules as strings: {names}"


def test_lazy_tables_name_what_their_modules_define() -> None:
    import importlib

    for module in sorted(m for m in MODULES if is_package(m)):
        exports = getattr(importlib.import_module(module), "_EXPORTS", {})
        for name, where in exports.items():
            assert hasattr(importlib.import_module(where), name), f"{module}: {name} is not in {where}"


def test_top_level_modules_stay_few() -> None:
    plain = sorted(p.name for p in (ROOT / "vitreg_jax").glob("*.py"))
    assert len(plain) <= 10, plain


def test_importing_the_library_loads_no_convert_module() -> None:
    code = (
        "import sys, vitreg_jax.model.build, vitreg_jax.model.checkpoint, vitreg_jax.pretraining.mae, "
        "vitreg_jax.embedding.dataset, vitreg_jax.evaluation.report\n"
        f"print(sorted(m for m in sys.modules if m.startswith({CONVERT_PACKAGE!r})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_imports_neither_jax_nor_torch(command: str | None) -> None:
    code = (
        "import sys\n"
        "for name in ('jax', 'jaxlib', 'flax', 'torch'):\n"
        "    sys.modules[name] = None  # any import of them raises ImportError\n"
        "from vitreg_jax.cli.main import main\n"
        "try:\n"
        f"    main({[command, '--help'] if command else ['--help']!r})\n"
        "except SystemExit as e:\n"
        "    sys.exit(e.code)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False)
    assert done.returncode == 0, done.stderr
    assert "usage: vitreg-jax" in done.stdout


def test_load_model_with_cfg_is_the_converter_s() -> None:
    import vitreg_jax
    from vitreg_jax.convert import load

    assert vitreg_jax.load_model_with_cfg is load.load_model_with_cfg
