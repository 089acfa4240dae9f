"""The architecture, checked: no import cycle among our modules (imports inside functions count),
the layers of `fer/` (INTERNALS.md), `fer/` never imports Ray or `study`, inference never loads
training, data preparation or Ray, unique module names, and INTERNALS.md's module map names every
module. Reads the source with `ast`, except the import closure of a real `fer-study predict`."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
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
    # `from study.tune import cluster as ...`
    assert "study.tune.cluster" in graph["study.tune.driver"]


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


# The layers of fer/, bottom up (INTERNALS.md): a module imports its own package or a LOWER layer.
# The three inference packages form one layer and may use each other (predict draws Grad-CAM and
# runs exports); import cycles between their modules are still refused above.
LAYERS = {
    "fer.core": 0,
    "fer.runtime": 1,
    "fer.data": 1,
    "fer.model": 1,
    "fer.prepare": 2,
    "fer.evaluate": 2,
    "fer.explain": 2,
    "fer.deploy": 2,
    "fer.train": 3,
    "study": 4,
}
INFERENCE = {"fer.evaluate", "fer.explain", "fer.deploy"}
# the trial config checks a backbone name against the registry (a late import, no Keras)
# (importing fer.model.backbones runs fer/model/__init__ too)
ALLOWED_UPWARD = {("fer.core.config", "fer.model.backbones"), ("fer.core.config", "fer.model")}


def _package(module: str) -> str | None:
    return next((p for p in LAYERS if module == p or module.startswith(p + ".")), None)


def _layer_violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for module, targets in graph.items():
        own = _package(module)
        for target in targets:
            theirs = _package(target)
            if own is None or theirs is None or own == theirs:
                continue
            if LAYERS[theirs] < LAYERS[own] or {own, theirs} <= INFERENCE:
                continue
            if (module, target) not in ALLOWED_UPWARD:
                bad.append(f"{module} imports {target}")
    return sorted(bad)


def test_layers_hold():
    bad = _layer_violations(_graph())
    assert not bad, "imports against the layers (INTERNALS.md): " + "; ".join(bad)


def test_layer_check_finds_an_upward_import():
    graph = {"fer.data.study_data": {"fer.train.trial"}, "fer.evaluate.predict": {"fer.explain.x"}}
    assert _layer_violations(graph) == ["fer.data.study_data imports fer.train.trial"]


def test_fer_never_imports_study():
    bad = [
        f"{m} imports {t}"
        for m, ts in _graph().items()
        if m.startswith("fer")
        for t in ts
        if t == "study" or t.startswith("study.")
    ]
    assert not bad, "; ".join(bad)


def test_module_basenames_are_unique():
    seen: dict[str, list[str]] = {}
    for folder in ("fer", "study", "benchmarks", "scripts", "tests"):
        for p in sorted((ROOT / folder).rglob("*.py")):
            if p.name not in ("__init__.py", "__main__.py", "conftest.py"):
                seen.setdefault(p.name, []).append(str(p.relative_to(ROOT)))
    repeated = {name: paths for name, paths in seen.items() if len(paths) > 1}
    assert not repeated, f"module names used twice: {repeated}"


# What running inference must never load: training, data preparation (the duplicate detector
# among it), the study layer, Ray and Optuna.
INFERENCE_FORBIDDEN = (
    "fer.train",
    "fer.prepare",
    "study.tune",
    "study.report",
    "study.space",
    "ray",
    "optuna",
)


def _forbidden(modules: list[str]) -> list[str]:
    return sorted(
        m for m in modules for f in INFERENCE_FORBIDDEN if m == f or m.startswith(f + ".")
    )


def test_trial_data_does_not_import_the_duplicate_detector():
    code = "import sys, fer.data; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert not _forbidden(out.stdout.split())


@pytest.mark.slow
def test_predict_import_closure(tmp_path):
    """A real `fer-study predict` of a saved model on an image; every module it loaded is read at
    exit."""
    import numpy as np
    from PIL import Image

    from fer.core.config import make_config
    from fer.model.build import build_model

    config = make_config({"backbone": "smallcnn", "image_size": 32, "weights": "none"})
    build_model(config, 5).save(tmp_path / "model.keras")
    (tmp_path / "classes.json").write_text('["angry", "fear", "happy", "sad", "surprise"]')
    image = tmp_path / "face.png"
    Image.fromarray(np.full((40, 40, 3), 128, np.uint8)).save(image)
    loaded = tmp_path / "modules.txt"
    dump = f"open({str(loaded)!r}, 'w').write(' '.join(sorted(sys.modules)))"
    code = (
        "import atexit, sys\n"
        f"atexit.register(lambda: {dump})\n"
        "from study.cli import main\n"
        f"main(['predict', {str(tmp_path / 'model.keras')!r}, {str(image)!r}])\n"
    )
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "face.png" in out.stdout
    modules = loaded.read_text().split()
    assert "fer.evaluate.predict" in modules and "keras" in modules  # it did run the model
    assert not _forbidden(modules), f"predict loaded {_forbidden(modules)}"
    others = [m for m in modules if m.startswith("study.cli.") and m != "study.cli.inference_cmds"]
    assert not others, f"predict imported other commands' modules: {others}"


def test_every_command_is_in_the_cli_map():
    """`fer-study` imports a command's module only when it is wanted, from COMMAND_MODULES: a
    command defined in study/cli but missing from the map would never be offered."""
    import importlib

    from study.cli import COMMAND_MODULES

    defined = {}
    for path in sorted((ROOT / "study" / "cli").glob("*.py")):
        if path.stem.startswith("_"):
            continue
        module = importlib.import_module(f"study.cli.{path.stem}")
        for command in getattr(module, "COMMANDS", []):
            defined[command.name] = path.stem
    assert defined == COMMAND_MODULES
