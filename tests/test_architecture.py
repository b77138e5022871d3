"""The layout is the architecture: checked by reading the source (AST), not by grepping it.

- only ``raysd.stages`` imports Ray;
- the layers import downwards only: core -> (config, errors); data -> core; run -> data, core;
  stages -> run, data, core; pipeline, commands, cli on top;
- no import cycles between raysd's modules (imports inside functions count too);
- no file over 400 lines, no function over 60 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PKG = REPO / "raysd"
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports(path: Path) -> list[tuple[str, int]]:
    """(imported module, line) for every import statement, at any depth."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.module, node.lineno))
            out += [(f"{node.module}.{a.name}", node.lineno) for a in node.names]  # `from raysd.data import x`
    return out


def raysd_edges() -> dict[str, set[str]]:
    mods = modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, path in mods.items():
        for name, _ in imports(path):
            target = name if name in mods else name.rsplit(".", 1)[0] if name.rsplit(".", 1)[0] in mods else None
            if target and target != m and target != "raysd":  # the package's lazy public API is not a layer
                edges[m].add(target)
    return edges


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "raysd"


ALLOWED = {  # what each layer may import from raysd
    "raysd": {"errors"}, "__main__": {"cli"}, "errors": set(), "faults": set(), "config": {"config", "errors"},
    "core": {"core", "config", "errors"},
    "data": {"data", "core", "config", "errors"},
    "run": {"run", "data", "core", "config", "errors", "faults"},
    "stages": {"stages", "run", "data", "core", "config", "errors", "faults"},
    "pipeline": {"stages", "run", "data", "core", "config", "errors"},
    "commands": {"stages", "run", "data", "core", "config", "errors", "pipeline"},
    "cli": {"commands", "config", "errors", "run"},
}


def test_only_the_stages_import_ray():
    offenders = [f"{m}:{line} imports {name}" for m, path in modules().items() if not m.startswith("raysd.stages")
                 for name, line in imports(path) if name == "ray" or name.startswith("ray.")]
    assert offenders == []


def test_layers_import_downwards_only():
    wrong = [f"{m} -> {t}" for m, targets in raysd_edges().items() for t in targets
             if layer(t) not in ALLOWED.get(layer(m), set())]
    assert wrong == []


def test_no_import_cycles():
    edges = raysd_edges()
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t] if t in stack else [m, t])
            elif t not in state:
                visit(t, stack + [t])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert cycles == []


def test_files_and_functions_stay_small():
    long_files = [f"{p.relative_to(REPO)}: {n}" for p in PKG.rglob("*.py")
                  if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES]
    long_functions = []
    for p in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long_functions.append(f"{p.relative_to(REPO)}:{node.lineno} {node.name}: {n} lines")
    assert long_files == [] and long_functions == []


def test_the_guards_see_what_they_guard():
    """The scans themselves work: they find Ray in the stages and the known layers in the graph."""
    stage_imports = [n for n, _ in imports(PKG / "stages" / "train.py")]
    assert "ray.train" in stage_imports
    edges = raysd_edges()
    assert "raysd.core.cas" in edges["raysd.stages.evaluate"] and "raysd.data.storage" in edges["raysd.run.rundir"]
    assert {layer(m) for m in edges} >= {"core", "data", "run", "stages", "config", "cli", "pipeline"}
