"""The house rules (docs/design.md): stages in data-flow order, no import cycles, one name per thing,
a public API that resolves, and ``import cnnkit`` that stays cheap."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import pkgutil
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import cnnkit

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "cnnkit"
STAGE_PACKAGES = ("data", "models", "training", "evaluation", "registry", "serve", "deploy")


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    """import-linter's contracts (``root/pyproject.toml``) on the package under ``root``."""
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run([sys.executable, "-c", code, "pyproject.toml"], cwd=root, capture_output=True, text=True,
                          timeout=300, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})


def test_import_contracts_are_kept():
    result = _lint_imports(REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_an_upward_import_breaks_the_contract(tmp_path):
    """The contract can fail: the data stage importing the server, even lazily inside a function."""
    shutil.copytree(PACKAGE, tmp_path / "cnnkit", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    scan = tmp_path / "cnnkit" / "data" / "scan.py"
    scan.write_text(scan.read_text() + "\n\ndef _upward():\n    from cnnkit.serve import create_app\n")
    result = _lint_imports(tmp_path)
    assert result.returncode != 0 and "BROKEN" in result.stdout, result.stdout[-2000:]
    assert "cnnkit.data.scan -> cnnkit.serve" in result.stdout


def test_every_module_sits_in_a_layer():
    """A new top-level module or subpackage must be placed in the data flow, not slip past the contract."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    layers = next(c for c in config["contracts"] if c["type"] == "layers")["layers"]
    placed = {name.strip() for layer in layers for name in layer.split("|")}
    top = {f"cnnkit.{m.name}" for m in pkgutil.iter_modules([str(PACKAGE)])}
    assert top - placed == set(), f"add these to a layer in pyproject.toml: {sorted(top - placed)}"
    assert placed - top == set(), f"layers name modules that do not exist: {sorted(placed - top)}"


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

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
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_has_no_cycle():
    """Module by module, lazy imports included (the layers contract sees only imports between layers)."""
    import grimp

    built = grimp.build_graph("cnnkit", exclude_type_checking_imports=True)
    graph = {m: {i for i in built.find_modules_directly_imported_by(m) if i.startswith("cnnkit")}
             for m in built.modules if m.startswith("cnnkit")}
    assert _strongly_connected({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]  # the check itself works
    assert _strongly_connected(graph) == []


def _all_modules() -> list[str]:
    """Every cnnkit module, less the migrations and the shims of backends this machine lacks."""
    def importable(name: str) -> bool:
        if name.startswith("cnnkit._backends."):  # cnnkit._backends.torch needs torch installed
            return importlib.util.find_spec(name.rsplit(".", 1)[-1]) is not None
        return ".registry.migrations" not in name
    return [m.name for m in pkgutil.walk_packages([str(PACKAGE)], prefix="cnnkit.") if importable(m.name)]


def test_no_module_shares_its_name_with_a_function_in_it():
    """``cnnkit.X`` is never both a module and a function, so no module-class tricks are needed."""
    clashes = []
    for name in _all_modules():
        module = importlib.import_module(name)
        value = getattr(module, name.rsplit(".", 1)[-1], None)
        if inspect.isfunction(value):
            clashes.append(name)
    assert clashes == []


def test_the_public_api_resolves_and_stays_functions():
    importlib.import_module("cnnkit.training.run")  # importing submodules must not shadow the functions
    importlib.import_module("cnnkit.evaluation.scoring")
    for name in cnnkit.__all__:
        assert getattr(cnnkit, name) is not None, name
    for name in ("train", "evaluate", "calibrate", "review", "compare", "explain", "export", "lr_find", "doctor"):
        assert inspect.isfunction(getattr(cnnkit, name)), name
    assert inspect.isclass(cnnkit.Registry) and inspect.isclass(cnnkit.Predictor)
    with pytest.raises(AttributeError, match="no attribute 'trian'"):
        cnnkit.trian  # noqa: B018


@pytest.mark.parametrize("stage", STAGE_PACKAGES)
def test_each_stage_says_what_enters_and_what_leaves(stage):
    doc = importlib.import_module(f"cnnkit.{stage}").__doc__ or ""
    assert "In:" in doc and "Out:" in doc, doc


def test_import_cnnkit_is_cheap():
    code = ("import sys, cnnkit, cnnkit.cli; heavy = ['keras', 'tensorflow', 'jax', 'torch', 'sqlalchemy', "
            "'fastapi', 'matplotlib', 'sklearn']; print([m for m in heavy if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
