from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("PATCHFLANNEL_DATA", ROOT.parent / "shared" / "data"))

# Two cores: keep the tests from oversubscribing them.
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True, scope="session")
def onnx_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The fast backend's exported graphs go to a temporary cache, not the user's ~/.cache."""
    old = os.environ.get("PATCHFLANNEL_CACHE")
    path = tmp_path_factory.mktemp("cache")
    os.environ["PATCHFLANNEL_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("PATCHFLANNEL_CACHE", None)
    else:
        os.environ["PATCHFLANNEL_CACHE"] = old


@pytest.fixture(scope="module")
def single_thread() -> Iterator[None]:
    """For modules of many small ops: with other jobs on the 2 cores, a 2-thread
    OpenMP pool spends its time in barriers (measured 5× slower)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (set PATCHFLANNEL_DATA or put shared/ beside the project)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def jsrt_dir(shared_data: Path) -> Path:
    p = shared_data / "jsrt"
    if not p.is_dir():
        pytest.skip(f"JSRT data not found at {p}")
    return p


@pytest.fixture(scope="session")
def cxr_dir(shared_data: Path) -> Path:
    p = shared_data / "cxr"
    if not (p / "metadata.csv").is_file():
        pytest.skip(f"CXR data not found at {p}")
    return p


@pytest.fixture(scope="session")
def v7_dir(shared_data: Path) -> Path:
    p = shared_data / "v7"
    if not (p / "metadata.csv").is_file():
        pytest.skip(f"V7 data not found at {p}")
    return p


def load_script(path: Path) -> ModuleType:
    """Import a script file (scripts/, benchmarks/: folders, not packages) once per session."""
    name = f"_script_{path.parent.name}_{path.stem}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up here
        spec.loader.exec_module(module)
    return sys.modules[name]


def shipped_classifier() -> dict:
    """``weights/ensemble/config.json`` (learners, members), so tests follow whatever classifier ships."""
    import json

    path = ROOT / "weights" / "ensemble" / "config.json"
    if not path.is_file():
        pytest.skip(f"no shipped classifier ({path} absent)")
    return json.loads(path.read_text(encoding="utf-8"))


def shipped_patch_member() -> tuple[str, Path]:
    """The first patch learner of the shipped classifier and its first member model's folder."""
    import json

    cfg = shipped_classifier()
    for name in cfg["learners"]:
        member = ROOT / "weights" / "ensemble" / "learners" / name / cfg["members"][name][0]
        spec = json.loads((member / "config.json").read_text(encoding="utf-8")).get("input", {})
        if spec.get("mode", "patch") == "patch":
            return name, member
    raise LookupError("the shipped classifier has no patch learner")
