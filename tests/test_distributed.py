"""torchrun with two CPU processes (gloo) through the one Trainer: identical parameters on both
ranks, equal to one process on the same global batches, and a killed run resumes from its checkpoint."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("ddp_worker.py")
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _launch(run_dir: Path, out: Path, epochs: int, nproc: int, kill_at: int) -> subprocess.CompletedProcess[str]:
    args = [str(WORKER), str(run_dir), str(out), str(epochs)] + ([str(kill_at)] if kill_at else [])
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
               "127.0.0.1", "--master_port", str(_free_port()), *args]
    else:
        cmd = [sys.executable, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)


# torchrun's summary of a rank that died from a signal, e.g. "exitcode  : -6 (pid: 11931) (SIGABRT)"
_SIGNAL_DEATH = re.compile(r"exitcode\s*:\s*-\d+ \(pid: \d+\)\s*\(SIG(?!TERM)")


def _run(run_dir: Path, out: Path, epochs: int, nproc: int, kill_at: int = 0) -> subprocess.CompletedProcess[str]:
    """One launch; relaunched once (with a warning) if a rank was killed by a signal other than the launcher's
    SIGTERM. gloo can abort a rank from its own socket threads on a loaded machine (seen once in CI: rank 1
    SIGABRT, torch 2.14.1); that is not this code's doing, and the relaunch resumes from the run's checkpoint,
    which is what the rest of this test checks anyway. A Python error or a wrong number still fails."""
    res = _launch(run_dir, out, epochs, nproc, kill_at)
    if nproc > 1 and res.returncode != 0 and _SIGNAL_DEATH.search(res.stderr):
        why = [ln for ln in res.stderr.splitlines() if re.search(r"terminate|what\(\)|gloo|Abort|SIG[A-Z]+", ln)]
        warnings.warn("a torchrun rank died from a signal; relaunching once:\n" + "\n".join(why[-12:]), stacklevel=2)
        res = _launch(run_dir, out, epochs, nproc, kill_at)
    return res


def _why(res: subprocess.CompletedProcess[str]) -> str:
    """The lines that say why a launch failed (C++ aborts print them early, before torchrun's long summary)."""
    key = [ln for ln in res.stderr.splitlines() if re.search(r"Error|terminate|what\(\)|Abort", ln)]
    return "\n".join(key[:20]) + "\n...\n" + res.stderr[-1500:]


def _load(out: Path, rank: int) -> dict:
    return torch.load(out.with_name(f"{out.stem}_rank{rank}.pt"), weights_only=True)


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol, rtol=0), f"{k}: max diff {(a[k] - b[k]).abs().max():.2e}"


def test_two_ranks_equal_one_process_and_resume_after_kill(tmp_path: Path, jsrt_dir: Path) -> None:
    single = _run(tmp_path / "single", tmp_path / "single.pt", 3, 1)
    assert single.returncode == 0, _why(single)

    ddp = _run(tmp_path / "ddp", tmp_path / "ddp.pt", 3, 2)
    assert ddp.returncode == 0, _why(ddp)
    r0, r1, one = _load(tmp_path / "ddp.pt", 0), _load(tmp_path / "ddp.pt", 1), _load(tmp_path / "single.pt", 0)
    assert (r0["world"], r1["world"], one["world"]) == (2, 2, 1)
    _assert_close(r0["state"], r1["state"], atol=0)          # DDP keeps the ranks identical
    _assert_close(r0["state"], one["state"], atol=1e-5)      # and equal to one process on the same global batches
    assert not torch.equal(one["state"]["0.weight"], _initial_conv()), "training changed nothing"

    # A 2-process run dies during epoch 3 (after epoch 2's checkpoint); the rerun resumes and ends where
    # the uninterrupted run ended.
    killed = _run(tmp_path / "killed", tmp_path / "killed.pt", 3, 2, kill_at=3)
    assert killed.returncode != 0 and re.search(r"exitcode\s*:\s*17\b", killed.stderr), _why(killed)
    assert (tmp_path / "killed" / "checkpoint.pt").exists()
    assert torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=True)["epoch"] == 2
    resumed = _run(tmp_path / "killed", tmp_path / "resumed.pt", 3, 2)
    assert resumed.returncode == 0, _why(resumed)
    res = _load(tmp_path / "resumed.pt", 0)
    assert res["resumed"] and res["epochs"] == 3
    _assert_close(res["state"], r0["state"], atol=1e-5)


def _initial_conv() -> torch.Tensor:
    from torch import nn

    torch.manual_seed(0)
    return nn.Conv2d(1, 4, 3, padding=1).weight.detach()
