"""Where and how computations run: device names, precision, threads, torch.distributed.

* :func:`resolve_device` turns what a user typed (``auto``, ``cpu``, ``cuda``,
  ``cuda:1``, ``mps``) into a ``torch.device`` that exists on this machine, or
  raises :class:`~patchflannel.errors.DeviceError` with a one-line reason.
* :func:`resolve_precision` picks ``fp32`` / ``bf16`` / ``fp16``: mixed precision
  on CUDA by default, full precision on CPU (this project's CPUs have no bf16
  units; autocast there only costs time).
* :class:`Dist` describes the process's place in a ``torchrun`` job (rank,
  world size, device) and offers the few collectives the training loop needs.
  Outside torchrun it is the trivial world of one.

Leaf module: imports torch and the standard library only.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .errors import DeviceError

log = logging.getLogger(__name__)

__all__ = ["Dist", "autocast", "init_distributed", "resolve_device", "resolve_precision"]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DEVICE = re.compile(r"^(cpu|cuda|mps)(?::(\d+))?$")


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """``auto`` → ``cuda`` when available, else ``cpu``; anything else must exist here."""
    if isinstance(name, torch.device):
        name = str(name)
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    m = _DEVICE.match(name)
    if m is None:
        raise DeviceError(f"--device {name!r} is not a device; use auto, cpu, cuda, cuda:N or mps")
    kind, index = m.group(1), m.group(2)
    if kind == "cpu":
        if index not in (None, "0"):
            raise DeviceError(f"--device {name}: there is one CPU device; use --device cpu")
        return torch.device("cpu")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {name}: CUDA is not available on this machine (use --device cpu or auto)")
        n = torch.cuda.device_count()
        if index is not None and int(index) >= n:
            raise DeviceError(f"--device {name}: this machine has {n} CUDA device(s), cuda:0 … cuda:{n - 1}")
        return torch.device(name)
    if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise DeviceError(f"--device {name}: Apple MPS is not available on this machine (use --device cpu or auto)")
    return torch.device("mps")


def resolve_precision(precision: str | None, device: torch.device) -> str:
    """``auto`` → ``bf16`` on CUDA devices that support it, else ``fp16`` on CUDA, ``fp32`` elsewhere."""
    p = (precision or "auto").lower()
    if p not in PRECISIONS:
        raise DeviceError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if p == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    if p == "fp16" and device.type == "cpu":
        raise DeviceError("--precision fp16 is for GPUs; on the CPU use fp32 (or bf16 where the CPU supports it)")
    return p


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """The autocast context for ``precision`` (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@dataclass(frozen=True)
class Dist:
    """This process's place in a (possibly trivial) distributed job."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        """Only the main process (rank 0) writes checkpoints, logs, plots and results."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (``[obj]`` in a world of one)."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=src)
        return box[0]

    def shard(self, n: int) -> range:
        """This rank's share of ``n`` items, as contiguous as possible (rank r gets r, r+world, …)."""
        return range(self.rank, n, self.world)


def init_distributed(device: str | torch.device | None = "auto", timeout_minutes: float = 30.0) -> Dist:
    """Join the ``torchrun`` job described by the environment, or return the world of one.

    Under ``torchrun`` (``WORLD_SIZE`` > 1): NCCL on CUDA (each rank on
    ``cuda:LOCAL_RANK``), gloo on CPU. An explicit ``cuda:N`` is refused there,
    since torchrun assigns the devices.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(device=resolve_device(device))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    want = resolve_device(device)
    if want.type == "cuda":
        if want.index is not None:
            raise DeviceError("under torchrun the GPUs are assigned by rank; use --device cuda or auto, not cuda:N")
        torch.cuda.set_device(local_rank)
        dev, backend = torch.device("cuda", local_rank), "nccl"
    else:
        dev, backend = want, "gloo"
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend=backend, timeout=_dt.timedelta(minutes=timeout_minutes))
    log.info("distributed: rank %d of %d (%s, %s)", rank, world, backend, dev)
    return Dist(rank=rank, world=world, local_rank=local_rank, device=dev)


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Temporarily use ``n`` intra-op threads (None: leave as is)."""
    if n is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        torch.set_num_threads(previous)
