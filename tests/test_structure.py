"""The architecture, checked: no import cycle among our modules (imports inside functions count),
`fer/` never imports Ray, and INTERNALS.md's module map names every module. Reads the source with
`ast` only."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fer", "study")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {
        _module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))
    }


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Every module of ours that `path` imports, at any depth (function bodies included). `from a
    import b` counts as importing `a.b` when that is a module, else `a`; a package import also
    imports its parents."""
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                for alias in node.names
            ]
        for target in targets:
            parts = target.split(".")
            for i in range(
                1, len(parts) + 1
            ):  # importing a.b.c runs a/__init__ and a/b/__init__ first
                candidate = ".".join(parts[:i])
                if candidate in known and candidate != name:
                    out.add(candidate)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    graph = {name: _imports(path, name, known) for name, path in modules.items()}
    # a package's own __init__ importing its submodules is not a cycle with them (Python runs
    # __init__ first and the submodule does not need the package's names), so parents are ignored in
    # submodule edges
    for name, edges in graph.items():
        graph[name] = {e for e in edges if not name.startswith(e + ".")}
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_graph_sees_imports_inside_functions():
    graph = _graph()
    assert "fer.explain.gradcam" in graph["fer.evaluate.predict"]  # imported inside a function only
    assert (
        "study.tune.cluster" in graph["study.tune.driver"]
    )  # `from study.tune import cluster as ...`


def test_no_import_cycle():
    cycle = _find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_one():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize(
    "path", sorted((ROOT / "fer").rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT))
)
def test_fer_never_imports_ray(path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = (
            [a.name for a in node.names]
            if isinstance(node, ast.Import)
            else [node.module or ""]
            if isinstance(node, ast.ImportFrom)
            else []
        )
        assert not any(n == "ray" or n.startswith("ray.") for n in names), (
            f"{path} imports Ray (line {node.lineno})"
        )


def test_internals_module_map_names_every_module():
    text = (ROOT / "INTERNALS.md").read_text()

    def named(path: Path) -> bool:
        rel = path.relative_to(ROOT)
        return f"`{rel}`" in text or (path.name == "__init__.py" and f"`{rel.parent}/`" in text)

    missing = [
        str(p.relative_to(ROOT))
        for package in PACKAGES
        for p in sorted((ROOT / package).rglob("*.py"))
        if p.name != "__main__.py" and not named(p)
    ]
    assert not missing, f"modules not named in INTERNALS.md's module map: {', '.join(missing)}"
