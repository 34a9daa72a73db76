"""Smoke tests of the benchmark scripts (benchmarks/*.py) on tiny settings.

They check that each script runs end to end on real data (JSRT; the CXR
images for ``bench_predict.py``), writes a CSV named by device and versions
with the documented columns, and that the derived columns (rates, ratios,
extrapolation, time split) follow from the timed ones. The numbers themselves
are not checked: timings on tiny settings mean nothing.

``bench_predict.py`` needs the shipped FLANNEL ensemble (``weights/ensemble``);
its smoke test on those weights is skipped while they are absent, and a second
one runs it on a tiny random-weights ensemble of the same layout, built here.
"""

from __future__ import annotations

import csv
import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import numpy as np
import pytest
import torch

BENCH_DIR = Path(__file__).resolve().parent.parent / "benchmarks"
SHIPPED_ENSEMBLE = Path(__file__).resolve().parent.parent / "weights" / "ensemble"


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
def predict_bench() -> ModuleType:
    return _load("bench_predict")


@pytest.fixture(scope="module")
def tiny_ensemble(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An exported-ensemble folder of the shipped layout (as ``export_ensemble`` writes it): FLANNEL over one
    random-init patch learner with 2 fold models (float16, as shipped), patch 224 → learner input 112."""
    from patchflannel.cxr import CLASSES
    from patchflannel.ensemble import FlannelWeights
    from patchflannel.learners import create_learner
    from patchflannel.patch_train import learner_sidecar
    from patchflannel.weights import save_weights

    dest = tmp_path_factory.mktemp("tiny_ensemble")
    name = "mobilenet_v3_small"
    cfg = {"patch_size": 224, "learner_input": 112, "global_size": 224, "mask_outside": True, "pretrained": None}
    torch.manual_seed(0)
    for fold in range(2):
        model = create_learner(name, num_classes=len(CLASSES), in_chans=1, pretrained=False)
        state = {k: (v.half() if v.is_floating_point() else v) for k, v in model.state_dict().items()}
        save_weights(state, dest / "learners" / f"{name}_fold{fold}",
                     {**learner_sidecar(name, "patch", cfg), "stored_dtype": "float16"})
    save_weights(FlannelWeights(1, len(CLASSES)), dest / "flannel",
                 {"task": "flannel_ensemble", "learners": [name], "classes": list(CLASSES), "distribution": "soft",
                  "k": 100, "n_learners": 1, "n_classes": len(CLASSES), "hidden": None})
    return dest


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


def test_missing_data_exits_with_a_clear_message(patch_bench: ModuleType, seg_bench: ModuleType,
                                                  predict_bench: ModuleType, tiny_ensemble: Path, tmp_path: Path) -> None:
    argv = ["--data", str(tmp_path / "absent"), "--images", "2", "--batch-sizes", "1", "--out-dir", str(tmp_path)]
    for main, extra in ((patch_bench.main, []), (seg_bench.main, []), (predict_bench.main, ["--weights", str(tiny_ensemble)])):
        with pytest.raises(SystemExit) as info:
            main(argv + extra)
        assert "--data" in str(info.value) and "absent" in str(info.value)
    assert not list(tmp_path.glob("*.csv"))


def test_predict_without_ensemble_exits_with_a_clear_message(predict_bench: ModuleType, tmp_path: Path) -> None:
    (tmp_path / "ens" / "learners").mkdir(parents=True)  # learners but no FLANNEL yet
    with pytest.raises(SystemExit) as info:
        predict_bench.main(["--weights", str(tmp_path / "ens"), "--images", "2", "--batch-sizes", "1",
                            "--out-dir", str(tmp_path)])
    msg = str(info.value)
    assert str(tmp_path / "ens" / "flannel.safetensors") in msg and "--weights" in msg and "export-ensemble" in msg
    assert not list(tmp_path.glob("*.csv"))


@pytest.mark.parametrize("side", [112, 224])
def test_batched_inputs_are_the_input_makers(patch_bench: ModuleType, side: int) -> None:
    # Path (a) must feed the learner exactly what training (InputMaker) and Pipeline.predict feed it:
    # shrink by 224/side once, crop side×side there, uint8 → float/255; 224 = no shrink.
    from patchflannel.patch_train import InputMaker

    gen = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (3, 1, 256, 256), generator=gen, dtype=torch.uint8)
    masks = torch.zeros(3, 1, 256, 256, dtype=torch.bool)
    masks[:, :, 60:200, 30:110] = True
    masks[:, :, 70:190, 150:230] = True
    data = SimpleNamespace(images=images, masks=masks, ids=["a", "b", "c"])
    maker = InputMaker(data, "patch", 224, 224, True, torch.device("cpu"), learner_input=side)
    batched = patch_bench.BatchedPath(None, images, masks, 2, 5, side, 256, True, False, torch.device("cpu"))
    assert batched.factor == 224 // side
    ours = batched.make_inputs(images[:2], masks[:2], torch.Generator().manual_seed(7))
    theirs = maker.make([0, 1], 5, torch.Generator().manual_seed(7))
    assert ours.shape == (2, 5, 1, side, side) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_learner_input_must_divide_the_patch(patch_bench: ModuleType, tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        patch_bench.parse_args(["--learner-input", "100", "--out-dir", str(tmp_path)])
    assert patch_bench.parse_args(["--learner-input", "224"]).learner_input == 224


# --------------------------------------------------------------------------- the scripts on real data


@pytest.mark.data
@pytest.mark.parametrize("side", [None, 224])
def test_patch_inference_smoke(patch_bench: ModuleType, jsrt_dir: Path, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str], side: int | None) -> None:
    argv = ["--data", str(jsrt_dir), "--images", "2", "--k", "4", "--batch-sizes", "1", "2", "--ref-images", "1",
            "--ref-k", "2", "--warmup", "0", "--repeats", "1", "--threads", "1", "--out-dir", str(tmp_path)]
    if side is not None:
        argv += ["--learner-input", str(side)]
    expect_side = side or 112
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
    if side is None:
        assert "learner_input=112 (default" in out and "images shrunk ×2 once, then 112px crops" in out
    else:
        assert "learner_input=224 (--learner-input)" in out and "no shrink: 224px crops at 1024²" in out

    by_path: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        by_path.setdefault(r["path"], []).append(r)
        assert int(r["patches"]) == int(r["images"]) * int(r["k"])
        assert float(r["seconds"]) > 0
        assert float(r["patches_per_s"]) == pytest.approx(int(r["patches"]) / float(r["seconds"]), rel=1e-4)
        assert r["learner"] == "mobilenet_v3_small" and r["learner_input"] == str(expect_side)
        assert r["shrink_factor"] == str(224 // expect_side) and r["device"] in ("cpu", "cuda")
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
    assert all(f"downscale x{224 // expect_side} (timed)" in r["note"] for r in by_path["a_batched"])


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


def _check_predict_run(predict_bench: ModuleType, weights: Path, cxr_dir: Path, tmp_path: Path,
                       capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--weights", str(weights), "--data", str(cxr_dir), "--images", "2", "--k", "4", "--batch-sizes", "1", "2",
            "--warmup", "0", "--repeats", "1", "--threads", "1", "--out-dir", str(tmp_path)]
    threads_before = torch.get_num_threads()
    returned = predict_bench.main(argv)
    assert torch.get_num_threads() == threads_before  # --threads is restored
    out = capsys.readouterr().out
    path = _only_csv(tmp_path, "predict")
    header, rows = _read_csv(path)
    assert header == predict_bench.COLUMNS
    assert len(rows) == len(returned) == 2 and [int(r["batch_size"]) for r in rows] == [1, 2]
    assert f"CSV: {path}" in out and "command: python benchmarks/bench_predict.py --weights" in out
    assert "WARNING" not in out
    for r in rows:
        assert r["images"] == "2" and r["k"] == "4" and r["threads"] == "1" and r["device"] in ("cpu", "cuda")
        assert float(r["images_per_s"]) == pytest.approx(2 / float(r["seconds"]), rel=1e-4)
        assert float(r["ms_per_image"]) == pytest.approx(1e3 * float(r["seconds"]) / 2, rel=1e-4)
        folds = [int(f) for f in r["models_per_learner"].split("/")]
        assert len(folds) == int(r["n_learners"]) == len(r["learners"].split("+")) and sum(folds) == int(r["fold_models"])
        assert int(r["crop_forwards_per_image"]) == 4 * int(r["fold_models"])
        assert int(r["shrink_factor"]) == int(r["patch_size"]) // int(r["learner_input"])
        stages = [float(r[f"{s}_ms"]) for s in predict_bench.STAGES]
        assert all(v >= 0 for v in stages) and float(r["forward_ms"]) > 0 and float(r["segment_ms"]) > 0
        assert float(r["split_total_ms"]) == pytest.approx(sum(stages), rel=1e-3)
        assert r["split_matches_predict"] == "True"  # the instrumented pass still mirrors Pipeline.predict


@pytest.mark.data
def test_predict_smoke(predict_bench: ModuleType, cxr_dir: Path, tmp_path: Path,
                       capsys: pytest.CaptureFixture[str]) -> None:
    if not (SHIPPED_ENSEMBLE / "flannel.safetensors").is_file():
        pytest.skip(f"shipped FLANNEL ensemble not exported yet ({SHIPPED_ENSEMBLE / 'flannel.safetensors'} absent); "
                    "bench_predict.py needs it (test_predict_smoke_tiny_ensemble covers the script meanwhile)")
    _check_predict_run(predict_bench, SHIPPED_ENSEMBLE, cxr_dir, tmp_path, capsys)


@pytest.mark.data
def test_predict_smoke_tiny_ensemble(predict_bench: ModuleType, tiny_ensemble: Path, cxr_dir: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    _check_predict_run(predict_bench, tiny_ensemble, cxr_dir, tmp_path, capsys)
    _, rows = _read_csv(_only_csv(tmp_path, "predict"))
    assert rows[0]["learners"] == "mobilenet_v3_small" and rows[0]["models_per_learner"] == "2"
    assert (rows[0]["patch_size"], rows[0]["learner_input"], rows[0]["shrink_factor"]) == ("224", "112", "2")
