from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("PATCHFLANNEL_DATA", ROOT.parent / "shared" / "data"))

# Two cores: keep the tests from oversubscribing them.
torch.set_num_threads(min(2, torch.get_num_threads()))


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
