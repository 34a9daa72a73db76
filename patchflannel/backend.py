"""Fast CPU forwards for the learners: ONNX Runtime, with PyTorch as the reference and the fallback.

PyTorch's eager CPU kernels are slow for the depthwise/grouped convolutions
of the small mobile backbones the ensemble ships (mnasnet0_5, mobilenet_v3_small,
shufflenet_v2_x1_0); ONNX Runtime runs the same graphs 1.8–6.6× faster on
2 CPU cores (per model, batches of 100 crops; docs/results.md §6). The graphs are
the learners themselves (input normalisation included), exported once with
``torch.onnx.export`` and cached on disk, so the answers are the PyTorch
answers up to float rounding (max |Δlogit| ≈ 1e-3, checked on every build).

* :func:`runner` wraps the models that share one set of crops (every member
  of every learner with the same input spec) into one graph:
  ``runner(models, size)[0](x)`` maps crops ``(N,1,P,P)`` float [0,1] to
  logits ``(len(models),N,M)``, i.e. ``torch.stack([m(x) for m in models])``.
  One ONNX Runtime graph for all of them, not one per model: nine sessions
  each with their own thread pool cost 35 % more on 2 cores.
* ``backend``: ``auto`` = ONNX Runtime on the CPU when ``onnxruntime`` and
  ``onnx`` import, else PyTorch; ``onnx`` insists (error if unavailable);
  ``torch`` is the reference path (and the only one on GPUs).
* Cache: ``$PATCHFLANNEL_CACHE`` or ``~/.cache/patchflannel``, file
  ``onnx/<key>.onnx`` where the key hashes the weights, the architecture, the
  input size and the torch/opset versions; written atomically; an unwritable
  cache only costs the export (≈0.4 s per model) on every run.

Every build checks the ONNX graph against PyTorch on a fixed probe batch and
falls back to PyTorch (with a warning) if the logits differ by more than
``TOLERANCE``: a fast wrong answer is never served.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import threading
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ._files import atomic_path
from .errors import PatchflannelError

log = logging.getLogger(__name__)

__all__ = ["BACKENDS", "TOLERANCE", "Stacked", "bind_session", "cache_dir", "onnx_available", "runner"]

BACKENDS = ("auto", "onnx", "torch")
OPSET = 17
TOLERANCE = 1e-2  # max |Δlogit| between the ONNX graph and PyTorch on the probe batch
GRAPH_VERSION = 2  # bumped when Stacked's graph changes for the same weights (2: input normalised once)
Runner = Callable[[Tensor], Tensor]
_bound = threading.local()


def bind_session(slot: int | None) -> None:
    """Pin the calling thread to ONNX Runtime session ``slot`` of every runner (None: unpin).

    A pinned thread runs its whole batch on that one single-threaded session
    instead of splitting it over all of them: what the image-parallel workers
    of :meth:`patchflannel.pipeline.Classifier.predict` do, one session each.
    """
    _bound.slot = slot


def onnx_available() -> bool:
    try:
        import onnx  # noqa: F401  (torch.onnx.export needs it)
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def cache_dir() -> Path:
    root = os.environ.get("PATCHFLANNEL_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "patchflannel"


class Stacked(nn.Module):
    """Models that see the same input, as one module: x → ``stack([m(x) for m in models])``.

    When every model is a :class:`~patchflannel.learners.Learner` with the same
    input normalisation, the input is normalised once for all of them (the same
    numbers: the normalisation is an exact function of the input) and fed to
    each backbone: 8 of the 9 expand/subtract/divide passes over the crops saved.
    """

    def __init__(self, models: list[nn.Module]) -> None:
        super().__init__()
        self.models = nn.ModuleList(models)
        from .learners import Learner

        first = models[0] if models else None
        self.shared = isinstance(first, Learner) and all(
            isinstance(m, Learner) and m.in_chans == first.in_chans and torch.equal(m.mean, first.mean)
            and torch.equal(m.std, first.std) for m in models)

    def forward(self, x: Tensor) -> Tensor:
        if self.shared:
            self.models[0].check_input(x)
            x = self.models[0].normalise(x)
            return torch.stack([m.backbone(x) for m in self.models])
        return torch.stack([m(x) for m in self.models])


def _key(model: nn.Module, size: int) -> str:
    h = hashlib.blake2b(digest_size=16)
    names = [getattr(getattr(m, "spec", None), "name", type(m).__name__) for m in model.modules()]
    h.update(f"{'/'.join(names)}|{size}|{torch.__version__}|{OPSET}|{GRAPH_VERSION}".encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _export(model: nn.Module, size: int, in_chans: int) -> bytes:
    buf = io.BytesIO()
    x = torch.zeros(2, in_chans, size, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about the input checks in Learner.forward
        torch.onnx.export(model, (x,), buf, input_names=["x"], output_names=["logits"],
                          dynamic_axes={"x": {0: "n"}, "logits": {1: "n"}}, opset_version=OPSET, dynamo=False)
    return buf.getvalue()


def _graph(model: nn.Module, size: int, in_chans: int) -> bytes:
    path = cache_dir() / "onnx" / f"{_key(model, size)}.onnx"
    if path.is_file():
        try:
            return path.read_bytes()
        except OSError:
            pass
    data = _export(model, size, in_chans)
    try:
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
    except OSError as exc:
        log.info("ONNX cache %s not writable (%s); the graph is exported again next run", path.parent, exc)
    return data


class _OnnxRunner:
    """ONNX Runtime sessions of one graph; a batch is split over ``workers`` single-threaded sessions
    run side by side (the small convolutions of these backbones do not parallelise within an op:
    on 2 cores, 2 × 1 thread ran 8-crop chunks 28 % faster than 1 × 2 threads)."""

    def __init__(self, graph: bytes, threads: int) -> None:
        import onnxruntime as ort

        self.workers = max(1, min(threads, 4))
        per = max(1, threads // self.workers)

        def session() -> Any:
            so = ort.SessionOptions()
            so.intra_op_num_threads = per
            so.inter_op_num_threads = 1
            so.log_severity_level = 3
            # Idle workers must not spin: they share the cores with torch (segmenter, sampling).
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            return ort.InferenceSession(graph, so, providers=["CPUExecutionProvider"])

        self.sessions = [session() for _ in range(self.workers)]
        self.pool = ThreadPoolExecutor(self.workers) if self.workers > 1 else None

    def __call__(self, x: Tensor) -> Tensor:
        return torch.from_numpy(self.run_array(x.detach().cpu().numpy()))

    def run_array(self, x: np.ndarray) -> np.ndarray:
        """The same forward, numpy in and out: no PyTorch op runs (none wakes PyTorch's OpenMP threads,
        whose spinning slowed ONNX Runtime's sessions by ≈ 1.5× in benchmarks/bench_segment.py)."""
        arr = np.ascontiguousarray(x, dtype=np.float32)
        slot = getattr(_bound, "slot", None)
        if slot is not None:  # an image-parallel worker: its own session (shared if workers > sessions), its whole batch
            return self.sessions[slot % self.workers].run(None, {"x": arr})[0]
        parts = np.array_split(arr, min(self.workers, len(arr))) if len(arr) else [arr]
        if self.pool is None or len(parts) == 1:
            return self.sessions[0].run(None, {"x": arr})[0]
        futures = [self.pool.submit(s.run, None, {"x": part}) for s, part in zip(self.sessions, parts)]
        return np.concatenate([f.result()[0] for f in futures], axis=1)


def _torch_runner(model: nn.Module) -> Runner:
    def run(x: Tensor) -> Tensor:
        with torch.inference_mode():
            return model(x)
    return run


def runner(models: list[nn.Module], size: int, backend: str = "auto", device: torch.device | str = "cpu",
           in_chans: int = 1) -> tuple[Runner, str]:
    """One fast forward for ``models`` (eval mode) on inputs of ``size``² → (callable, backend actually used).

    The callable maps ``x (N,in_chans,size,size)`` to ``stack([m(x) for m in models])``.
    """
    if backend not in BACKENDS:
        raise PatchflannelError(f"--backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    device = torch.device(device)
    model = Stacked(list(models)).eval()
    if backend == "torch" or (backend == "auto" and (device.type != "cpu" or not onnx_available())):
        return _torch_runner(model), "torch"
    if device.type != "cpu":
        raise PatchflannelError(f"--backend onnx runs on the CPU only; use --backend torch on {device}")
    if not onnx_available():
        raise PatchflannelError("--backend onnx needs onnxruntime and onnx: pip install onnxruntime onnx")
    try:
        run = _OnnxRunner(_graph(model, size, in_chans), max(1, torch.get_num_threads()))
        probe = torch.rand(4, in_chans, size, size, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            ref = model(probe).float()
        diff = float((run(probe) - ref).abs().max())
    except Exception as exc:  # noqa: BLE001 - any exporter/runtime failure means: use PyTorch
        if backend == "onnx":
            raise PatchflannelError(f"ONNX export/run failed: {exc}") from None
        log.warning("ONNX Runtime could not run the learners (%s); using PyTorch", exc)
        return _torch_runner(model), "torch"
    if not diff <= TOLERANCE:
        msg = f"the ONNX graph differs from PyTorch by {diff:.2e} (> {TOLERANCE}) on the probe batch"
        if backend == "onnx":
            raise PatchflannelError(msg)
        log.warning("%s; using PyTorch", msg)
        return _torch_runner(model), "torch"
    return run, "onnx"
