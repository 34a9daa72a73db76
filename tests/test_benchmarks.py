"""Smoke tests of the benchmark scripts (benchmarks/*.py) on tiny settings.

They check that each script runs end to end on real JSRT data, writes a CSV
named by device and versions with the documented columns, and that the
derived columns (rates, ratios, extrapolation) follow from the timed ones.
The numbers themselves are not checked: timings on tiny settings mean nothing.
"""

from __future__ import annotations

import csv
import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

BENCH_DIR = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str) -> ModuleType:
    """Import benchmarks/<name>.py (a script folder, not a package)."""
    module_name = f"_bench_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, BENCH_DIR / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def patch_bench() -> ModuleType:
    return _load("bench_patch_inference")


@pytest.fixture(scope="module")
def seg_bench() -> ModuleType:
    return _load("bench_segment")


@pytest.fixture(scope="module")
def common() -> ModuleType:
    _load("bench_segment")  # puts benchmarks/ on sys.path
    import common as mod

    return mod


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


def _only_csv(folder: Path, name: str) -> Path:
    files = list(folder.glob("*.csv"))
    assert len(files) == 1, files
    assert re.fullmatch(rf"{name}_(cpu|cuda)_torch[0-9A-Za-z.\-]+_tv[0-9A-Za-z.\-]+\.csv", files[0].name), files[0].name
    return files[0]


# --------------------------------------------------------------------------- helpers that need no data


def test_results_path_names_device_and_versions(common: ModuleType, tmp_path: Path) -> None:
    import torchvision

    path = common.results_path("demo", torch.device("cpu"), tmp_path)
    assert path.parent == tmp_path
    assert path.name.startswith("demo_cpu_torch")
    assert torch.__version__.split("+")[0] in path.name and torchvision.__version__.split("+")[0] in path.name
    assert "+" not in path.name and path.suffix == ".csv"


def test_write_csv_is_atomic_and_complete(common: ModuleType, tmp_path: Path) -> None:
    path = tmp_path / "sub" / "x.csv"
    common.write_csv(path, [{"a": 1, "b": 0.123456789}, {"a": 2}], ["a", "b"])
    header, rows = _read_csv(path)
    assert header == ["a", "b"]
    assert rows == [{"a": "1", "b": "0.123457"}, {"a": "2", "b": ""}]
    assert [p.name for p in path.parent.iterdir()] == ["x.csv"]  # no temp file left


def test_time_interleaved_warms_up_then_alternates(common: ModuleType) -> None:
    calls: list[str] = []
    timings = common.time_interleaved({"a": lambda: calls.append("a"), "c": lambda: calls.append("c")},
                                      torch.device("cpu"), warmup=1, repeats=2)
    assert calls == ["a", "c"] * 3
    assert timings["a"].repeats == 2 and timings["c"].repeats == 2
    assert all(t >= 0 for t in timings["a"].times)


@pytest.mark.parametrize("row,col", [(0, 0), (5, 1020), (512, 300), (1023, 1023), (111, 112)])
def test_reference_crop_equals_sampler_crop(patch_bench: ModuleType, row: int, col: int) -> None:
    from patchflannel.sampler import extract_patches

    img = torch.rand(1, 1, 1024, 1024)
    ours = patch_bench.crop_padded(img[0, 0].numpy(), row, col, 224)
    theirs = extract_patches(img, torch.tensor([[[row, col]]]), size=224)[0, 0, 0].numpy()
    assert ours.shape == (224, 224)
    np.testing.assert_array_equal(ours, theirs)


def test_reference_centres_independent_can_leave_the_lung(patch_bench: ModuleType) -> None:
    # An L-shaped "lung": drawing row and column independently lands in the
    # empty corner, drawing one mask pixel never does.
    mask = np.zeros((100, 100), dtype=bool)
    mask[:, :20] = True
    mask[80:, :] = True
    rng = np.random.default_rng(0)
    joint = [patch_bench.reference_centre(mask, rng, "joint") for _ in range(300)]
    independent = [patch_bench.reference_centre(mask, rng, "independent") for _ in range(300)]
    assert all(mask[r, c] for r, c in joint)
    assert sum(not mask[r, c] for r, c in independent) > 30


def test_missing_data_exits_with_a_clear_message(patch_bench: ModuleType, seg_bench: ModuleType, tmp_path: Path) -> None:
    for main in (patch_bench.main, seg_bench.main):
        with pytest.raises(SystemExit) as info:
            main(["--data", str(tmp_path / "absent"), "--images", "2", "--batch-sizes", "1", "--out-dir", str(tmp_path)])
        assert "--data" in str(info.value) and "absent" in str(info.value)
    assert not list(tmp_path.glob("*.csv"))


# --------------------------------------------------------------------------- the scripts on real data


@pytest.mark.data
def test_patch_inference_smoke(patch_bench: ModuleType, jsrt_dir: Path, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--data", str(jsrt_dir), "--images", "2", "--k", "4", "--batch-sizes", "1", "2", "--ref-images", "1",
            "--ref-k", "2", "--warmup", "0", "--repeats", "1", "--threads", "1", "--out-dir", str(tmp_path)]
    # One thread: a smoke test must stay fast on a machine whose cores are busy
    # (two torch threads fighting another job for 2 cores slow tiny forwards ~100×).
    threads_before = torch.get_num_threads()
    returned = patch_bench.main(argv)
    assert torch.get_num_threads() == threads_before  # --threads is restored
    out = capsys.readouterr().out
    path = _only_csv(tmp_path, "patch_inference")
    header, rows = _read_csv(path)
    assert header == patch_bench.COLUMNS
    assert len(rows) == len(returned) == 2 * 2 + 2
    assert f"CSV: {path}" in out and "command: python benchmarks/bench_patch_inference.py --data" in out
    assert "learner_input=112 (default" in out

    by_path: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        by_path.setdefault(r["path"], []).append(r)
        assert int(r["patches"]) == int(r["images"]) * int(r["k"])
        assert float(r["seconds"]) > 0
        assert float(r["patches_per_s"]) == pytest.approx(int(r["patches"]) / float(r["seconds"]), rel=1e-4)
        assert r["learner"] == "mobilenet_v3_small" and r["learner_input"] == "112" and r["device"] in ("cpu", "cuda")
        assert r["threads"] == "1"
    measured, extrapolated = by_path["b_reference"]
    assert (measured["extrapolated"], extrapolated["extrapolated"]) == ("False", "True")
    assert (int(measured["patches"]), int(extrapolated["patches"])) == (2, 8)
    assert float(extrapolated["seconds"]) == pytest.approx(4 * float(measured["seconds"]), rel=1e-4)
    for a, c in zip(by_path["a_batched"], by_path["c_forward"]):
        assert a["batch_size"] == c["batch_size"]
        assert float(a["ratio_a_over_c"]) == pytest.approx(float(a["seconds"]) / float(c["seconds"]), rel=1e-4)
        assert float(a["speedup_a_vs_b"]) == pytest.approx(float(extrapolated["seconds"]) / float(a["seconds"]), rel=1e-4)
    assert sorted(int(r["batch_size"]) for r in by_path["a_batched"]) == [1, 2]


@pytest.mark.data
def test_segment_smoke(seg_bench: ModuleType, jsrt_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--data", str(jsrt_dir), "--random-weights", "--images", "2", "--batch-sizes", "1", "2", "--warmup", "0",
            "--repeats", "1", "--threads", "1", "--out-dir", str(tmp_path)]
    seg_bench.main(argv)
    out = capsys.readouterr().out
    path = _only_csv(tmp_path, "segment")
    header, rows = _read_csv(path)
    assert header == seg_bench.COLUMNS
    assert [int(r["batch_size"]) for r in rows] == [1, 2]
    assert f"CSV: {path}" in out and "goal: >= 4 images/s" in out
    for r in rows:
        assert r["weights"] == "random" and r["images"] == "2"
        assert float(r["images_per_s"]) == pytest.approx(2 / float(r["seconds"]), rel=1e-4)
        stages = [float(r[f"{s}_ms"]) for s in seg_bench.STAGES]
        assert all(v >= 0 for v in stages) and float(r["forward_ms"]) > 0
        assert float(r["split_total_ms"]) == pytest.approx(sum(stages), rel=1e-3)
