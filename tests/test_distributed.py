"""torchrun with two CPU processes (gloo) through the one Trainer: identical parameters on both
ranks, equal to one process on the same global batches, and a killed run resumes from its checkpoint."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("ddp_worker.py")
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(run_dir: Path, out: Path, epochs: int, nproc: int, kill_at: int = 0) -> subprocess.CompletedProcess[str]:
    args = [str(WORKER), str(run_dir), str(out), str(epochs)] + ([str(kill_at)] if kill_at else [])
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
               "127.0.0.1", "--master_port", str(_free_port()), *args]
    else:
        cmd = [sys.executable, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)


def _load(out: Path, rank: int) -> dict:
    return torch.load(out.with_name(f"{out.stem}_rank{rank}.pt"), weights_only=True)


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol, rtol=0), f"{k}: max diff {(a[k] - b[k]).abs().max():.2e}"


def test_two_ranks_equal_one_process_and_resume_after_kill(tmp_path: Path, jsrt_dir: Path) -> None:
    single = _run(tmp_path / "single", tmp_path / "single.pt", 3, 1)
    assert single.returncode == 0, single.stderr[-2000:]

    ddp = _run(tmp_path / "ddp", tmp_path / "ddp.pt", 3, 2)
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    r0, r1, one = _load(tmp_path / "ddp.pt", 0), _load(tmp_path / "ddp.pt", 1), _load(tmp_path / "single.pt", 0)
    assert (r0["world"], r1["world"], one["world"]) == (2, 2, 1)
    _assert_close(r0["state"], r1["state"], atol=0)          # DDP keeps the ranks identical
    _assert_close(r0["state"], one["state"], atol=1e-5)      # and equal to one process on the same global batches
    assert not torch.equal(one["state"]["0.weight"], _initial_conv()), "training changed nothing"

    # A 2-process run dies during epoch 3 (after epoch 2's checkpoint); the rerun resumes and ends where
    # the uninterrupted run ended.
    killed = _run(tmp_path / "killed", tmp_path / "killed.pt", 3, 2, kill_at=3)
    assert killed.returncode != 0
    assert (tmp_path / "killed" / "checkpoint.pt").exists()
    assert torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=True)["epoch"] == 2
    resumed = _run(tmp_path / "killed", tmp_path / "resumed.pt", 3, 2)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    res = _load(tmp_path / "resumed.pt", 0)
    assert res["resumed"] and res["epochs"] == 3
    _assert_close(res["state"], r0["state"], atol=1e-5)


def _initial_conv() -> torch.Tensor:
    from torch import nn

    torch.manual_seed(0)
    return nn.Conv2d(1, 4, 3, padding=1).weight.detach()
