"""The public API: top-level exports, the README's Python example, the import rules between stages."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import patchflannel

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "patchflannel"

# Inference code never imports training code (DESIGN: one way to do each thing; a user's predict
# must not pull in training loops, data loaders or report writers).
INFERENCE = {"io", "segment", "sampler", "learners", "vote", "ensemble", "calibrate", "pipeline", "hub", "errors", "backend",
             "_files", "runtime", "config", "outputs", "store", "plots", "explain"}
TRAINING = {"data", "training", "segment_train", "patch_train", "ensemble_run", "metrics", "card",
            "stats"}


def _package_imports(module: Path) -> set[str]:
    """Modules of this package imported by ``module`` (any depth: inside functions too)."""
    tree = ast.parse(module.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("patchflannel."):
            found.add(node.module.split(".")[1])
    return found


def test_every_module_is_classified() -> None:
    modules = {p.stem for p in PKG.glob("*.py")} - {"__init__", "__main__", "cli"}
    assert modules == INFERENCE | TRAINING, f"classify new modules as inference or training: {modules ^ (INFERENCE | TRAINING)}"


@pytest.mark.parametrize("name", sorted(INFERENCE))
def test_inference_never_imports_training(name: str) -> None:
    bad = _package_imports(PKG / f"{name}.py") & TRAINING
    assert not bad, f"patchflannel/{name}.py (inference) imports training module(s) {sorted(bad)}"


def test_top_level_exports_resolve() -> None:
    for name in patchflannel.__all__:
        assert getattr(patchflannel, name) is not None
    with pytest.raises(AttributeError):
        patchflannel.not_a_name  # noqa: B018


def test_import_is_light() -> None:
    """`import patchflannel` (and so `patchflannel --version`) must not import torch."""
    code = "import sys, patchflannel; print('torch' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "False"


def _readme_python_block() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Python", 1)[1]
    m = re.search(r"```python\n(.*?)```", section, re.S)
    assert m, "README.md has no ```python block under '## Python'"
    return m.group(1)


@pytest.mark.slow
def test_readme_python_example_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cwd = os.getcwd()
    os.chdir(ROOT)  # the example uses paths relative to the repository, as a user in a clone would
    try:
        namespace: dict[str, object] = {}
        exec(compile(_readme_python_block(), "README.md", "exec"), namespace)  # noqa: S102
    finally:
        os.chdir(cwd)
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("(") and "bool" in printed[0]
    pred = namespace["pred"]
    assert pred.label in pred.classes
    assert np.isclose(float(np.sum(pred.probs)), 1.0, atol=1e-6)
    assert 0.0 < namespace["result"].quality.lung_fraction < 0.6
