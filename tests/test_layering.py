"""The package's layering: the product never imports the research folder (research/NOTES.md
lives beside it), the editing engine never imports the service, and no part imports the
top-level command line."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "factpatch"


def test_factpatch_never_imports_research():
    offenders = [
        f"{path}: {name}"
        for path in PACKAGE.rglob("*.py")
        for name in _imports(path)
        if name.split(".")[0] == "research"
    ]
    assert not offenders, offenders
    assert any(PACKAGE.rglob("*.py"))


def _imports(path: Path) -> list[str]:
    """Every module named by an import in ``path`` (lazy imports inside functions included)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
    return names


def test_the_editing_engine_stands_alone():
    """``factpatch.editing`` (the maths) needs models, not the service around it."""
    service = ("server", "worker", "queue", "runtime", "ledger", "evaluation", "client", "cli")
    offenders = [
        f"{path.name}: {name}"
        for path in (PACKAGE / "editing").rglob("*.py")
        for name in _imports(path)
        if name.startswith("factpatch.") and name.split(".")[1] in service
    ]
    assert not offenders, offenders


def test_only_the_entry_point_imports_the_top_level_cli():
    """Sub-command modules take the shared options from factpatch.models.options, so the
    top-level ``factpatch.cli`` is imported by nobody inside the package (no cycle)."""
    offenders = [
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if path != PACKAGE / "cli.py" and "factpatch.cli" in _imports(path)
    ]
    assert not offenders, offenders


def test_no_module_imports_another_modules_private_names():
    """The engine's interface is its public names (editing/keys.py, targets.py, solve.py …):
    nothing in the package, the benchmarks, the research code or the tests imports a
    ``_private`` name from another module."""
    root = PACKAGE.parent
    offenders = [
        f"{path.relative_to(root)}: {node.module}.{alias.name}"
        for folder in ("factpatch", "bench", "research", "tests")
        for path in (root / folder).rglob("*.py")
        if "_gen" not in path.parts
        for node in ast.walk(ast.parse(path.read_text(), str(path)))
        if isinstance(node, ast.ImportFrom) and node.module
        for alias in node.names
        if alias.name.startswith("_") and not alias.name.startswith("__")
    ]
    assert not offenders, offenders
