"""Every Python example runs: the README's (and docs/'s) ``python`` blocks, then every ``>>>`` example in
cnnkit's docstrings, in a folder of tiny generated data laid out as the examples assume::

    dataset/train/<class>/  dataset/test/<class>/  some.jpg  other_folder/  runs/first  runs/second

An example's printed output is checked only where the docstring states it.
"""

from __future__ import annotations

import doctest
import os
import pkgutil
import re
import shutil
from pathlib import Path

import pytest

import cnnkit
from tests.conftest import write_class_folder

REPO = Path(__file__).resolve().parents[1]
MARKDOWN = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(encoding="utf-8"), flags=re.S | re.M)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """The folder the examples run in, after the README's own example trained runs/first."""
    root = tmp_path_factory.mktemp("examples")
    write_class_folder(root / "dataset" / "train", per_class=12, size=32, seed=1)
    write_class_folder(root / "dataset" / "test", per_class=4, size=32, seed=2)
    shutil.copy(root / "dataset" / "test" / "red" / "red_000.png", root / "some.jpg")  # a PNG named .jpg, as in life
    write_class_folder(root / "other_folder", per_class=2, size=48, seed=3, ext="jpg")
    saved = os.getcwd()
    os.chdir(root)
    try:
        for path in MARKDOWN:
            for block in _python_blocks(path):
                exec(compile(block, f"{path.name} python block", "exec"), {"__name__": "__example__"})
    finally:
        os.chdir(saved)
    shutil.copytree(root / "runs" / "first", root / "runs" / "second")
    return root


def test_readme_python_examples_run(world):
    assert _python_blocks(REPO / "README.md"), "the README has no Python example"
    assert (world / "runs" / "first" / "model.keras").is_file()
    assert (world / "runs" / "first" / "eval" / "test" / "metrics.json").is_file()  # cnnkit.evaluate ran


# Packages that only optional extras bring; a module that needs one is skipped where it is missing.
OPTIONAL_PACKAGES = {"torch", "jax", "jaxlib", "ray", "onnxruntime", "tf2onnx", "onnx"}


def _docstring_examples() -> list[doctest.DocTest]:
    finder = doctest.DocTestFinder(exclude_empty=True)
    tests = []
    for info in pkgutil.walk_packages(cnnkit.__path__, prefix="cnnkit."):
        if ".registry.migrations" in info.name:
            continue
        try:
            module = __import__(info.name, fromlist=["_"])
        except ModuleNotFoundError as error:  # a shim for a backend or extra this machine lacks
            if (error.name or "").split(".")[0] in OPTIONAL_PACKAGES:
                continue
            raise
        tests += [t for t in finder.find(module, info.name, extraglobs={"cnnkit": cnnkit}) if t.examples]
    tests += [t for t in finder.find(cnnkit, "cnnkit") if t.examples and t.name == "cnnkit"]
    return sorted(tests, key=lambda t: t.name)


class _Checker(doctest.OutputChecker):
    """Where an example states no output, any output passes: it must run, not print something exact."""

    def check_output(self, want: str, got: str, optionflags: int) -> bool:
        return not want.strip() or super().check_output(want, got, optionflags)


EXAMPLES = _docstring_examples()


def test_the_public_api_has_examples():
    documented = {t.name.rsplit(".", 1)[-1] for t in EXAMPLES}
    for name in ("train", "evaluate", "Predictor", "Registry", "calibrate", "review", "compare", "explain", "export",
                 "lr_find", "doctor", "load_config", "build_model", "create_app"):
        assert name in documented, f"{name} has no >>> example"


@pytest.mark.parametrize("example", EXAMPLES, ids=[t.name for t in EXAMPLES])
def test_docstring_example_runs(example, world, monkeypatch):
    monkeypatch.chdir(world)
    runner = doctest.DocTestRunner(checker=_Checker(), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report: list[str] = []
    runner.run(example, out=report.append, clear_globs=True)
    assert runner.failures == 0, "".join(report)
