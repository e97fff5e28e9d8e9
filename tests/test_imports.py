"""The package's layering, read statically from the source with `ast`: the kernels and formats
never import the layers above them, and lutlm's modules import each other without a circle.

Only module-level imports count (including those under `if`/`try` at module level): an import
inside a function runs when it is called, after every module has loaded, so it cannot circle.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "lutlm"

# Layer rules: modules under the first prefix never import, at module level, those under the second.
HIGHER_LAYERS = ("lutlm.model", "lutlm.generate", "lutlm.serve", "lutlm.cli", "lutlm.bench", "lutlm.decode",
                 "lutlm.fast_decode", "lutlm.gpu_decode", "lutlm.loader")
RULES = {
    "lutlm.kernels": HIGHER_LAYERS,
    "lutlm.formats": HIGHER_LAYERS + ("lutlm.kernels",),
}

# Known violations in files that other work is moving under issue 30: module -> why. Each is an
# expected failure, strictly: once fixed it fails until its line here goes too. None today.
KNOWN_LAYER_VIOLATIONS: dict[str, str] = {}
# Known circles, as cycles() spells them; none today (bench.e2e <-> bench.e2e_gguf was the last).
KNOWN_CYCLES: set[str] = set()


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py"))}


def module_level_nodes(tree: ast.Module):
    """Every statement that runs at import: the module's body and the bodies of its top-level
    `if`, `try` and `with` blocks, not function or class bodies (a class body does run at import,
    but lutlm's classes import nothing)."""
    pending = list(tree.body)
    while pending:
        node = pending.pop()
        yield node
        if isinstance(node, (ast.If, ast.Try, ast.With)):
            for field in ("body", "orelse", "finalbody"):
                pending.extend(getattr(node, field, []))
            for handler in getattr(node, "handlers", []):
                pending.extend(handler.body)


def resolve(importer: str, node: ast.ImportFrom) -> str:
    """The absolute module a `from ... import` names, for relative imports too."""
    if not node.level:
        return node.module or ""
    is_package = MODULES[importer].name == "__init__.py"
    base = importer.split(".")[: len(importer.split(".")) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def imported_modules(importer: str) -> set[str]:
    """The lutlm modules `importer` imports at module level (`from lutlm.x import y` counts as
    lutlm.x.y where y is a module, else as lutlm.x)."""
    tree = ast.parse(MODULES[importer].read_text(), filename=str(MODULES[importer]))
    found = set()
    for node in module_level_nodes(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = resolve(importer, node)
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return {name for name in found if name in MODULES and name != importer}


GRAPH = {name: imported_modules(name) for name in MODULES}


def in_layer(module: str, layers: tuple[str, ...]) -> bool:
    return any(module == layer or module.startswith(layer + ".") for layer in layers)


def higher_layer_imports(module: str) -> set[str]:
    """What `module` imports at module level that its layer's rule forbids."""
    forbidden = tuple(layer for lower, higher in RULES.items() if in_layer(module, (lower,)) for layer in higher)
    return {imported for imported in GRAPH[module] if in_layer(imported, forbidden)}


def cycles() -> set[str]:
    """Each circle of module-level imports once, as "a -> b -> a" starting from its smallest name
    (Tarjan's strongly connected components; a component of several modules holds a circle)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(GRAPH[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for name in sorted(GRAPH):
        if name not in index:
            visit(name)
    return {" -> ".join(component + component[:1]) for component in components}


def test_the_graph_reads_the_imports_it_should():
    """The reader itself: known edges of the package appear, imports inside functions do not."""
    assert "lutlm.kernels.gpu_tuning" in GRAPH["lutlm.kernels.gpu"]
    assert "lutlm.formats.packed" in GRAPH["lutlm.kernels.reference"]
    assert "lutlm.serve" not in GRAPH["lutlm.cli"]  # cmd_serve imports it when serving
    tree = ast.parse("import lutlm.model\nif True:\n    from lutlm import cli\ndef f():\n    import lutlm.serve\n")
    names = {getattr(n, "module", None) or n.names[0].name for n in module_level_nodes(tree)
             if isinstance(n, (ast.Import, ast.ImportFrom))}
    assert names == {"lutlm.model", "lutlm"}


@pytest.mark.parametrize("module", [
    pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=KNOWN_LAYER_VIOLATIONS[name]))
    if name in KNOWN_LAYER_VIOLATIONS else name
    for name in sorted(MODULES) if in_layer(name, tuple(RULES))
])
def test_kernels_and_formats_never_import_higher_layers(module):
    assert higher_layer_imports(module) == set()


def test_no_import_cycles():
    assert cycles() == KNOWN_CYCLES


def test_a_circle_would_be_found(monkeypatch):
    """The cycle finder itself: config importing model, which imports config, is a circle."""
    monkeypatch.setitem(GRAPH, "lutlm.config", GRAPH["lutlm.config"] | {"lutlm.model"})
    assert any("lutlm.config" in cycle and "lutlm.model" in cycle for cycle in cycles())


def test_the_gpu_tuning_table_does_not_import_its_timing_code():
    """The runtime table lookup stays in kernels/; the code that times kernels is bench code, and
    even inside functions the table never reaches back into the dispatcher it serves."""
    source = (PACKAGE_DIR / "kernels" / "gpu_tuning.py").read_text()
    imported = {node.module for node in ast.walk(ast.parse(source)) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Import)
                 for alias in node.names}
    assert not {"lutlm.kernels.gpu", "lutlm.bench", "lutlm.bench.gpu_timing"} & imported, imported
    assert "from lutlm.kernels import gpu" not in source


OPTIONAL_IMPORTS = {"triton", "fastapi", "uvicorn", "llama_cpp", "matplotlib"}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_imports(name):
    """Every module loads, so a name moved between modules is caught before a command runs it;
    modules whose optional extra is not installed are skipped."""
    try:
        importlib.import_module(name)
    except ImportError as e:
        if e.name and e.name.split(".")[0] in OPTIONAL_IMPORTS:
            pytest.skip(f"{name} needs {e.name}, an optional extra")
        raise
