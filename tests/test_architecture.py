"""The layering rules of docs/architecture.md, checked on the source: who may import whom, no private reaches,
no import cycles, no oversized modules. Static (ast), so it runs in milliseconds and imports nothing."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "attnpatch"
MAX_LINES = 500

# layer -> the layers its modules may import (a layer may always import itself).
ALLOWED = {
    "base": set(),  # errors, env: the standard library only
    "core": {"base"},
    "backends": {"base", "core"},
    "patchers": {"base", "core"},
    "api": {"base", "core", "patchers"},
    "tools": {"base", "core", "tools"},  # report, verify, autotune: core's public functions and each other
    "testing": {"base", "core"},
    "startup": {"base", "api", "core", "tools"},
    "package": {"base", "api", "core"},  # attnpatch/__init__.py: lazy re-exports of the public names
    "cli": {"base", "api", "core", "tools", "testing", "startup", "package", "backends"},
}


def layer_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "package"
    top = parts[1]
    if top in ("errors", "env"):
        return "base"
    if top in ("core", "backends", "patchers", "cli", "testing"):
        return top
    if top in ("report", "verify", "autotune"):
        return "tools"
    if top in ("api", "startup"):
        return top
    if top == "__main__":
        return "cli"
    raise AssertionError(f"{module}: no layer; add it to tests/test_architecture.py and docs/architecture.md")


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imports(module: str, path: Path) -> list[tuple[int, str, str | None]]:
    """(line, imported attnpatch module, name taken from it or None) for every import, at any depth."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name, None) for a in node.names if a.name.split(".")[0] == "attnpatch"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                kept = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*kept, base]).strip(".")
            if base.split(".")[0] != "attnpatch":
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((node.lineno, sub if sub in MODULES else base, None if sub in MODULES else alias.name))
    return found


MODULES = modules()


def test_every_module_has_a_layer() -> None:
    for module in MODULES:
        layer_of(module)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_down_the_layers(module: str) -> None:
    layer = layer_of(module)
    wrong = [
        f"line {line}: {target} ({layer_of(target)})"
        for line, target, name in imports(module, MODULES[module])
        if layer_of(target) != layer and layer_of(target) not in ALLOWED[layer] and name != "__version__"
    ]
    assert not wrong, f"{module} ({layer}) may import only {sorted(ALLOWED[layer])}: " + "; ".join(wrong)


def _same_package(module: str, target: str) -> bool:
    # A package's own _helpers module (attnpatch.backends._probe) is there for its siblings.
    return module.rsplit(".", 1)[0] == target.rsplit(".", 1)[0]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_private_names_of_other_modules(module: str) -> None:
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    aliases = {}  # local name -> attnpatch module it is bound to
    reaches = []
    for line, target, name in imports(module, path):
        if name is not None and name.startswith("_") and not name.startswith("__") and target != module:
            reaches.append(f"line {line}: from {target} import {name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom | ast.Import):
            for alias in node.names:
                local = alias.asname or alias.name.split(".")[0]
                base = node.module if isinstance(node, ast.ImportFrom) else None
                full = f"{base}.{alias.name}" if base else alias.name
                if full in MODULES:
                    aliases[local] = full
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            target = aliases[node.value.id]
            private = node.attr.startswith("_") and not node.attr.startswith("__")
            if private and target != module and not _same_package(module, target):
                reaches.append(f"line {node.lineno}: {node.value.id}.{node.attr}")
    assert not reaches, f"{module} reaches into private names: " + "; ".join(reaches)


def test_no_import_cycles() -> None:
    graph = {m: {t for _, t, _ in imports(m, p) if t != m and t in MODULES} for m, p in MODULES.items()}
    # A package's __init__ importing its own submodules (lazy re-exports) is not a cycle of the layering.
    for module in graph:
        graph[module] = {t for t in graph[module] if not t.startswith(module + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles: " + " | ".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_stay_small(module: str) -> None:
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{module} has {lines} lines (limit {MAX_LINES}): split it by concern"


def test_the_checks_can_fail() -> None:
    # The rules above would pass vacuously on a parser that found nothing: prove they see real imports.
    found = imports("attnpatch.core.dispatch", MODULES["attnpatch.core.dispatch"])
    assert ("attnpatch.core.selection", None) in {(t, n) for _, t, n in found}
    assert layer_of("attnpatch.patchers.diffusers") not in ALLOWED["core"]
