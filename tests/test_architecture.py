"""The package layering: modules/ is the bottom (layers and methods' parts), models/ builds GPT-2 and applies
methods, tasks/ trains; data/ is read by all and reads none of them. No import cycles; the base model and the
task code name no method."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from models.methods import method_names

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("modules", "models", "tasks", "data")
# What each package may import from the project (beyond itself).
ALLOWED = {"modules": set(), "data": set(), "models": {"modules", "data"}, "tasks": {"modules", "models", "data"}}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(path: Path) -> set[str]:
    """Project modules imported anywhere in the file (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(name for name in names if name.split(".")[0] in PACKAGES + ("compare",))
    return found


def source_files():
    return sorted(path for package in PACKAGES for path in (ROOT / package).glob("*.py"))


GRAPH = {module_name(path): project_imports(path) for path in source_files()}


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_point_down(module):
    package = module.split(".")[0]
    upward = sorted(name for name in GRAPH[module]
                    if name.split(".")[0] != package and name.split(".")[0] not in ALLOWED[package])
    assert not upward, f"{module} imports {upward}: {package}/ may import only {sorted(ALLOWED[package]) or 'itself'}"


def test_no_import_cycles():
    edges = {module: {name for name in imports if name in GRAPH} for module, imports in GRAPH.items()}

    def visit(module, trail):
        if module in trail:
            return trail[trail.index(module):] + [module]
        for name in sorted(edges[module]):
            cycle = visit(name, trail + [module])
            if cycle:
                return cycle
        return None

    for module in edges:
        cycle = visit(module, [])
        assert cycle is None, " -> ".join(cycle)


def string_constants(path: Path) -> set[str]:
    return {node.value for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)}


@pytest.mark.parametrize("path", [ROOT / "models" / "gpt2.py", *sorted((ROOT / "tasks").glob("*.py"))],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_the_base_model_and_the_tasks_name_no_method(path):
    named = sorted(set(method_names()) & string_constants(path))
    assert not named, f"{path.relative_to(ROOT)} names methods {named}: declare what it needs in the registry"
    assert not {"modules.lora", "modules.reft"} & project_imports(path)
