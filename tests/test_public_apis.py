"""raysd builds on Ray's and Optuna's public interfaces: no attribute whose name starts with an
underscore is read or written on their objects, in raysd or in its tests, and a subclass of one of
their classes uses no ``self._x`` (it would be, or shadow, the parent's private state). An upgrade
of either library changes private attributes without notice."""

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LIBRARIES = ("ray", "optuna")


def _sources() -> dict[Path, ast.Module]:
    files = sorted((REPO / "raysd").rglob("*.py")) + sorted((REPO / "tests").rglob("*.py")) + sorted(
        (REPO / "benchmarks").rglob("*.py"))
    return {f: ast.parse(f.read_text(), str(f)) for f in files}


def _library_private_names() -> set[str]:
    """Every ``_name`` Ray's and Optuna's own code defines or uses on its objects (``self._x``, ``def _x``)."""
    import optuna
    import ray

    names: set[str] = set()
    for mod in (ray, optuna):
        for f in Path(mod.__file__).parent.rglob("*.py"):
            text = f.read_text(errors="ignore")
            names.update(re.findall(r"self\.(_[A-Za-z][A-Za-z0-9_]*)\b", text))
            names.update(re.findall(r"def (_[A-Za-z][A-Za-z0-9_]*)\(", text))
    return {n for n in names if not n.startswith("__")}


def _raysd_own_names(sources: dict[Path, ast.Module]) -> set[str]:
    """Private names raysd defines itself (its own attributes, methods and module functions)."""
    own: set[str] = set()
    for tree in sources.values():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name.startswith("_"):
                own.add(node.name)
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and node.attr.startswith("_"):
                own.add(node.attr)
            if isinstance(node, ast.Assign):
                own.update(t.id for t in node.targets if isinstance(t, ast.Name) and t.id.startswith("_"))
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id.startswith("_"):
                own.add(node.target.id)
    return own


def _library_bases(tree: ast.Module) -> set[str]:
    """Names bound by imports from Ray or Optuna in a module."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in LIBRARIES:
            names.update(a.asname or a.name for a in node.names)
        if isinstance(node, ast.Import):
            names.update((a.asname or a.name).split(".")[0] for a in node.names if a.name.split(".")[0] in LIBRARIES)
    return names


def _other_modules(tree: ast.Module) -> set[str]:
    """Names bound to modules of other libraries (``os``, ``torch``...): their private names are theirs."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update((a.asname or a.name).split(".")[0] for a in node.names
                         if a.name.split(".")[0] not in LIBRARIES)
    return names


def _root(node: ast.AST) -> str | None:
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def violations(sources: dict[Path, ast.Module]) -> list[str]:
    private, own = _library_private_names(), _raysd_own_names(sources)
    out = []
    for path, tree in sources.items():
        where = path.relative_to(REPO)
        bases, others = _library_bases(tree), _other_modules(tree)
        for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
            parents = {ast.unparse(b).split(".")[0] for b in cls.bases}
            if parents & bases:  # a subclass of a Ray or Optuna class: no self._x at all
                for node in ast.walk(cls):
                    if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                            and node.value.id == "self" and node.attr.startswith("_")
                            and not node.attr.startswith("__")):
                        out.append(f"{where}:{node.lineno}: {cls.name} uses self.{node.attr}")
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and node.attr in private and node.attr not in own and _root(node) not in others):
                out.append(f"{where}:{node.lineno}: .{node.attr} is private to Ray or Optuna")
    return out


def test_no_private_attribute_of_ray_or_optuna():
    assert violations(_sources()) == []


@pytest.mark.parametrize("code, what", [
    ("def f(tune_controller):\n    return tune_controller._search_alg\n", "._search_alg"),
    ("from ray.tune.search.optuna import OptunaSearch\nclass S(OptunaSearch):\n"
     "    def g(self):\n        return len(self._completed_trials)\n", "self._completed_trials"),
    ("from ray.tune.schedulers import HyperBandScheduler\nclass H(HyperBandScheduler):\n"
     "    def g(self, t):\n        return self._trial_info[t]\n", "self._trial_info"),
])
def test_the_check_finds_what_the_old_searcher_did(code, what):
    found = violations({REPO / "raysd" / "probe.py": ast.parse(code)})
    assert any(what in v for v in found), found
