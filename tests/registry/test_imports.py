"""Import rules of the registry package, read from the source with ``ast`` (nothing imported):
no import circle between its modules, and only composer's public names."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import composer

ROOT = Path(__file__).resolve().parents[2]

# Public composer modules the registry may import besides the package itself: the fixture
# builders and the trained test bed (for `brickyard demo`), and composer's command line (mounted as `brickyard compose`,
# kept out of composer/__init__ so that importing composer does not import typer).
PUBLIC_COMPOSER_MODULES = {"composer.testing", "composer.testbed", "composer.cli"}


def _modules(package: str) -> dict[str, Path]:
    modules = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _imports(path: Path) -> list[tuple[str, tuple[str, ...]]]:
    """(module, names) of every absolute import in the file, at any depth (function-level and
    TYPE_CHECKING imports included: a circle hidden in a function is still a circle)."""
    found: list[tuple[str, tuple[str, ...]]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.extend((alias.name, ()) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import"
            assert node.module is not None
            found.append((node.module, tuple(alias.name for alias in node.names)))
    return found


def import_graph(package: str) -> dict[str, set[str]]:
    """Module -> the modules of ``package`` it imports (``from a import b`` counts as ``a.b``
    when ``b`` is a module)."""
    modules = _modules(package)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for module, names in _imports(path):
            if module.split(".")[0] != package:
                continue
            targets = [f"{module}.{n}" for n in names if f"{module}.{n}" in modules]
            edges.update(targets or ([module] if module in modules else []))
        edges.discard(name)
        graph[name] = edges
    return graph


def test_the_graph_sees_imports_at_every_depth() -> None:
    graph = import_graph("registry")
    assert "registry.search.ranking" in graph["registry.search.index"]  # module level
    assert "registry.search.onnx_export" in graph["registry.search.embed"]  # inside a method
    assert "registry.storage.store" in graph["registry.fsck"]  # under TYPE_CHECKING
    assert "registry.domain" in graph["registry.service"]  # ``from registry import domain``


def test_no_import_circle_in_registry() -> None:
    graph = import_graph("registry")
    try:
        order = list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as exc:
        raise AssertionError(f"import circle: {' -> '.join(exc.args[1])}") from None
    assert len(order) == len(graph)


def test_a_circle_would_be_found() -> None:
    graph = import_graph("registry")
    graph["registry.domain"] = graph["registry.domain"] | {"registry.service"}
    try:
        list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError:
        return
    raise AssertionError("the circle domain -> service -> domain went unnoticed")


def test_registry_imports_only_composers_public_names() -> None:
    public = set(composer.__all__)
    offending = []
    for name, path in _modules("registry").items():
        for module, names in _imports(path):
            if module == "composer":
                offending.extend(f"{name}: composer.{n}" for n in names if n not in public)
            elif module.startswith("composer.") and module not in PUBLIC_COMPOSER_MODULES:
                offending.append(f"{name}: {module}")
    assert offending == []


def test_composer_imports_nothing_from_registry_including_its_testing_module() -> None:
    offending = [
        f"{name}: {module}"
        for name, path in _modules("composer").items()
        for module, _ in _imports(path)
        if module.split(".")[0] == "registry"
    ]
    assert offending == []


def test_composer_tests_import_nothing_from_registry() -> None:
    offending = [
        f"{path.name}: {module}"
        for path in sorted((ROOT / "tests" / "composer").glob("*.py"))
        for module, _ in _imports(path)
        if module.split(".")[0] == "registry"
    ]
    assert offending == []
