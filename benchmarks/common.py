"""Shared helpers for the benchmark scripts in this folder.

* where things are: the repository root, the default JSRT folder
  (``../shared/data/jsrt`` beside the repository, or ``$PATCHFLANNEL_DATA/jsrt``),
  the default labelled CXR folder (``…/cxr``, used by ``bench_predict.py``)
  and the results folder;
* the CSV record: named by benchmark, device and library versions
  (``benchmarks/results/<name>_<device>_torch<ver>_tv<ver>.csv``) and written
  atomically (temp file in the same folder, then rename), in the spirit of
  timm's ``benchmark.py``;
* timing: untimed warm-up runs, then timed repeats, CUDA synchronised around
  every timed run; several functions can be timed *interleaved* (a, c, a, c, …)
  so that a slow drift of the machine's load biases their ratio as little as
  possible;
* machine information recorded in every CSV row;
* a plain fixed-width table printer.

Imported by the scripts as ``common`` (each script puts this folder first on
``sys.path``); it is not part of the ``patchflannel`` package.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import platform
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"


def default_data_root() -> Path:
    """``$PATCHFLANNEL_DATA`` if set (as the tests use it), else ``<repo>/../shared/data``."""
    env = os.environ.get("PATCHFLANNEL_DATA")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"


def default_jsrt_dir() -> Path:
    """The JSRT images + SCR lung masks folder used by default."""
    return default_data_root() / "jsrt"


def default_cxr_dir() -> Path:
    """The labelled chest X-ray folder (``metadata.csv`` + ``images/``) used by default."""
    return default_data_root() / "cxr"


def find_jsrt_or_exit(data: Path, n_images: int | None) -> list[Any]:
    """``discover_jsrt(data)[:n_images]``, or exit with a message saying what to pass.

    Returns a list of ``patchflannel.data.SegCase``. There is deliberately no
    fallback to other images: every benchmark number comes from the JSRT
    radiographs and their SCR masks, so runs on different machines compare.
    """
    from patchflannel.data import discover_jsrt
    from patchflannel.errors import DataError

    try:
        cases = discover_jsrt(data)
    except DataError as exc:
        raise SystemExit(
            f"error: {exc}.\nThe benchmarks need the JSRT radiographs with SCR lung masks "
            f"(images/*.png, masks/left_lung/*.png, masks/right_lung/*.png, or the original .IMG/.gif layout). "
            f"Put them at {default_jsrt_dir()}, set PATCHFLANNEL_DATA to the folder holding jsrt/, "
            f"or pass --data DIR."
        ) from None
    if n_images is not None:
        if n_images < 1:
            raise SystemExit(f"error: --images must be >= 1, got {n_images}")
        if n_images > len(cases):
            raise SystemExit(f"error: --images {n_images} requested but only {len(cases)} JSRT cases found under {data}")
        cases = cases[:n_images]
    return cases


# --------------------------------------------------------------------------- device, threads, machine


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; anything else must exist here (as the CLI's ``--device``)."""
    from patchflannel.errors import DeviceError
    from patchflannel.runtime import resolve_device as _resolve

    try:
        return _resolve(name)
    except DeviceError as exc:
        raise SystemExit(f"error: {exc}") from None


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work so a wall-clock reading covers it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[int]:
    """Run with ``n`` intra-op threads (``None``: leave torch's setting); restore afterwards."""
    before = torch.get_num_threads()
    if n is not None:
        if n < 1:
            raise SystemExit(f"error: --threads must be >= 1, got {n}")
        torch.set_num_threads(n)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict[str, Any]:
    """What a CSV row needs to say where it was measured."""
    import torchvision

    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = _cpu_name()
    return {
        "device": device.type,
        "device_name": device_name,
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
    }


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text)


def results_path(name: str, device: torch.device, out_dir: Path | None = None) -> Path:
    """``<out_dir>/<name>_<device>_torch<ver>_tv<ver>.csv`` ('+' in versions becomes '-')."""
    import torchvision

    out_dir = RESULTS_DIR if out_dir is None else Path(out_dir)
    stem = f"{name}_{device.type}_torch{torch.__version__}_tv{torchvision.__version__}"
    return out_dir / f"{_safe(stem)}.csv"


# --------------------------------------------------------------------------- CSV and table


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else value


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]], fieldnames: Sequence[str] | None = None) -> Path:
    """Write ``rows`` as CSV to ``path`` atomically (floats to 6 significant digits)."""
    from patchflannel._files import write_text

    if not rows:
        raise ValueError("no rows to write")
    if fieldnames is None:
        fieldnames = list(dict.fromkeys(k for row in rows for k in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(fieldnames), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _cell(row.get(k)) for k in fieldnames})
    write_text(path, buf.getvalue())
    return Path(path)


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """Fixed-width text table of the given columns (floats to 4 significant digits)."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def add_run_options(p: Any, warmup_help: str, repeats_help: str) -> None:
    """The options every benchmark shares: --warmup, --repeats, --device, --threads, --out-dir."""
    p.add_argument("--warmup", type=int, default=1, help=warmup_help)
    p.add_argument("--repeats", type=int, default=3, help=repeats_help)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's own choice)")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="folder of the CSV")


def finish(name: str, device: torch.device, out_dir: Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str],
           script: str | Path, argv: Sequence[str] | None) -> Path:
    """Write the CSV and print the command that reproduces it and where it went."""
    path = write_csv(results_path(name, device, out_dir), rows, columns)
    print(f"command: {command_line(script, argv)}")
    print(f"CSV: {path}")
    return path


def command_line(script: str | Path, argv: Sequence[str] | None) -> str:
    """The command that reproduces this run: ``python benchmarks/<script> <args>``.

    ``argv`` is what the script's ``main`` received (``None``: ``sys.argv[1:]``).
    """
    args = sys.argv[1:] if argv is None else list(argv)
    return shlex.join(["python", f"benchmarks/{Path(script).name}", *args])


# --------------------------------------------------------------------------- timing


@dataclass
class Timing:
    """Wall-clock seconds of the timed repeats of one function."""

    times: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def min(self) -> float:
        return min(self.times)

    @property
    def repeats(self) -> int:
        return len(self.times)


def time_interleaved(fns: Mapping[str, Callable[[], Any]], device: torch.device, warmup: int = 1,
                     repeats: int = 3) -> dict[str, Timing]:
    """Time each function ``repeats`` times, round-robin, after ``warmup`` untimed rounds.

    One round calls every function once, in order; CUDA is synchronised before
    and after each timed call so queued work is neither charged to the next
    function nor left out. Returns the timings by name; report the median.
    """
    if repeats < 1:
        raise SystemExit(f"error: --repeats must be >= 1, got {repeats}")
    if warmup < 0:
        raise SystemExit(f"error: --warmup must be >= 0, got {warmup}")
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    synchronize(device)
    out = {name: Timing() for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            synchronize(device)
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            out[name].times.append(time.perf_counter() - t0)
    return out


class StageClock:
    """Seconds spent per stage, summed over calls: ``t = clock.tick("read", t)``."""

    def __init__(self, stages: Sequence[str], device: torch.device) -> None:
        self.spent: dict[str, float] = dict.fromkeys(stages, 0.0)
        self.device = device

    def tick(self, stage: str, t0: float) -> float:
        """Charge the time since ``t0`` to ``stage`` (CUDA synchronised); returns now."""
        synchronize(self.device)
        now = time.perf_counter()
        self.spent[stage] += now - t0
        return now


def time_once(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds of one synchronised call of ``fn``."""
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0
