"""Smoke tests of the benchmark scripts (benchmarks/*.py) on tiny settings.

Each script runs end to end through its ``main(argv)`` on real data (JSRT; the
CXR images for ``bench_predict.py``), writes one CSV named by device and
versions with the documented columns, and the derived columns (rates, ratios,
extrapolation, time split) follow from the timed ones. The timings themselves
are not checked: on tiny settings they mean nothing. ``--help`` is checked as
a subprocess (what a user runs).
"""

from __future__ import annotations

import csv
import re
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from patchflannel.backend import onnx_available
from conftest import load_script, shipped_classifier, shipped_patch_member

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "benchmarks"
SHIPPED_ENSEMBLE = ROOT / "weights" / "ensemble"
SEG = "lung_unet_jsrt"  # a shipped one-output U-Net, passed explicitly (the scr default is lung_unet_v7c since v0.6)


def _load(name: str) -> ModuleType:
    """Import benchmarks/<name>.py (a script folder, not a package)."""
    return load_script(BENCH_DIR / f"{name}.py")


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


@pytest.mark.parametrize("script", ["bench_patch_inference", "bench_predict", "bench_segment", "bench_fast_predict"])
def test_help(script: str, capsys: pytest.CaptureFixture[str]) -> None:
    # In process: a subprocess per script would spend ~10 s importing torch on the busy 2 cores.
    with pytest.raises(SystemExit) as info:
        _load(script).main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: {script}.py") and "--out-dir" in out and "--threads" in out and "--data" in out


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


def test_device_errors_are_one_line_exits(common: ModuleType) -> None:
    assert common.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(SystemExit, match="not a device"):
        common.resolve_device("nonsense")


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


@pytest.mark.parametrize("side", [112, 224])
def test_batched_inputs_are_what_predict_feeds_the_learner(patch_bench: ModuleType, side: int) -> None:
    # Path (a) must feed the learner exactly what Classifier.predict feeds it: learners.make_inputs with one
    # content-keyed seed per image (pipeline.image_seed); 224 = no shrink.
    from patchflannel.learners import InputSpec, make_inputs
    from patchflannel.pipeline import image_seed

    gen = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (3, 1, 256, 256), generator=gen, dtype=torch.uint8)
    masks = torch.zeros(3, 1, 256, 256, dtype=torch.bool)
    masks[:, :, 60:200, 30:110] = True
    masks[:, :, 70:190, 150:230] = True
    batched = patch_bench.BatchedPath(None, images, masks, 2, 5, side, 256, True, False, torch.device("cpu"), seed=3)
    assert batched.factor == 224 // side
    ours = batched.make_inputs(images[:2], masks[:2])
    spec = InputSpec("patch", 224, side, mask_outside=True, work_size=256)
    theirs, _, _ = make_inputs(images[:2], masks[:2], spec, 5, seeds=[image_seed(w, 3) for w in images[:2, 0].numpy()])
    assert ours.shape == (2, 5, 1, side, side) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_learner_input_must_divide_the_patch(patch_bench: ModuleType) -> None:
    with pytest.raises(SystemExit):
        patch_bench.parse_args(["--learner-input", "100"])
    assert patch_bench.parse_args(["--learner-input", "224"]).learner_input == 224


def test_missing_data_exits_with_a_clear_message(patch_bench: ModuleType, seg_bench: ModuleType,
                                                  predict_bench: ModuleType, tmp_path: Path) -> None:
    argv = ["--data", str(tmp_path / "absent"), "--images", "2", "--batch-sizes", "1", "--out-dir", str(tmp_path)]
    for main, extra in ((patch_bench.main, []), (seg_bench.main, ["--random-weights"]), (predict_bench.main, [])):
        with pytest.raises(SystemExit) as info:
            main(argv + extra)
        assert "--data" in str(info.value) and "absent" in str(info.value)
    assert not list(tmp_path.glob("*.csv"))


def test_predict_without_a_classifier_exits_with_a_clear_message(predict_bench: ModuleType, tmp_path: Path) -> None:
    (tmp_path / "ens" / "learners").mkdir(parents=True)  # learners but no config.json
    with pytest.raises(SystemExit) as info:
        predict_bench.main(["--weights", str(tmp_path / "ens"), "--images", "2", "--batch-sizes", "1",
                            "--out-dir", str(tmp_path)])
    msg = str(info.value)
    assert str(tmp_path / "ens") in msg and "--weights" in msg and "export-ensemble" in msg
    assert not list(tmp_path.glob("*.csv"))


def test_segment_with_missing_weights_exits_with_a_clear_message(seg_bench: ModuleType, jsrt_dir: Path,
                                                                 tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as info:
        seg_bench.main(["--data", str(jsrt_dir), "--weights", str(tmp_path / "nope"), "--images", "1",
                        "--batch-sizes", "1", "--out-dir", str(tmp_path)])
    assert "not found" in str(info.value) and "--random-weights" in str(info.value)
    assert not list(tmp_path.glob("*.csv"))


# --------------------------------------------------------------------------- the scripts on real data


@pytest.mark.data
def test_patch_inference_smoke(patch_bench: ModuleType, jsrt_dir: Path, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--data", str(jsrt_dir), "--images", "2", "--k", "4", "--batch-sizes", "1", "2", "--ref-images", "1",
            "--ref-k", "2", "--warmup", "0", "--repeats", "1", "--threads", "1", "--out-dir", str(tmp_path)]
    threads_before = torch.get_num_threads()
    returned = patch_bench.main(argv)
    assert torch.get_num_threads() == threads_before  # --threads is restored
    out = capsys.readouterr().out
    path = _only_csv(tmp_path, "patch_inference")
    header, rows = _read_csv(path)
    assert header == patch_bench.COLUMNS
    assert len(rows) == len(returned) == 2 * 2 + 2
    assert f"CSV: {path}" in out and "command: python benchmarks/bench_patch_inference.py --data" in out
    assert "learner_input=112 (default" in out and "images shrunk ×2 once, then 112px crops" in out

    by_path: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        by_path.setdefault(r["path"], []).append(r)
        assert int(r["patches"]) == int(r["images"]) * int(r["k"])
        assert float(r["seconds"]) > 0
        assert float(r["patches_per_s"]) == pytest.approx(int(r["patches"]) / float(r["seconds"]), rel=1e-4)
        assert r["learner"] == "mobilenet_v3_small" and r["learner_input"] == "112" and r["shrink_factor"] == "2"
        assert r["threads"] == "1" and r["device"] in ("cpu", "cuda")
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
def test_patch_inference_with_a_saved_learner(patch_bench: ModuleType, jsrt_dir: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    # --weights: a learner folder as train-patch and export-ensemble write it; its input spec sets the side.
    name, member = shipped_patch_member()
    if not (member / "model.safetensors").is_file():
        pytest.skip(f"shipped learner {member} absent")
    from patchflannel.learners import Learner

    side = Learner.from_pretrained(member).input_spec.learner_input
    rows = patch_bench.main(["--data", str(jsrt_dir), "--weights", str(member), "--images", "1", "--k", "2",
                             "--batch-sizes", "1", "--ref-images", "1", "--ref-k", "1", "--warmup", "0", "--repeats", "1",
                             "--threads", "1", "--out-dir", str(tmp_path)])
    assert f"learner_input={side} (from {member})" in capsys.readouterr().out
    assert {r["learner"] for r in rows} == {name} and {r["learner_input"] for r in rows} == {side}
    assert _only_csv(tmp_path, "patch_inference").is_file()


@pytest.mark.data
@pytest.mark.parametrize("weights", ["random", SEG])
def test_segment_smoke(seg_bench: ModuleType, jsrt_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                       weights: str) -> None:
    argv = ["--data", str(jsrt_dir), "--images", "2", "--batch-sizes", "1", "2", "--warmup", "0",
            "--repeats", "1", "--threads", "1", "--out-dir", str(tmp_path)]
    argv += ["--random-weights"] if weights == "random" else ["--weights", weights]
    seg_bench.main(argv)
    out = capsys.readouterr().out
    path = _only_csv(tmp_path, "segment")
    header, rows = _read_csv(path)
    assert header == seg_bench.COLUMNS
    backends = ["torch", "onnx"] if onnx_available() else ["torch"]
    assert [(r["backend"], int(r["batch_size"])) for r in rows] == [(bk, b) for b in (1, 2) for bk in backends]
    assert f"CSV: {path}" in out and "goal: >= 10 images/s" in out
    for r in rows:
        assert float(r["ratio_to_torch"]) > 0 and (r["backend"] != "torch" or float(r["min_jaccard_vs_torch"]) == 1.0)
        if weights != "random":  # a trained U-Net's masks barely move with the backend (random logits sit near 0)
            assert float(r["min_jaccard_vs_torch"]) >= 0.99
        assert r["weights"] == weights and r["images"] == "2" and r["encoder"] == "resnet18"
        assert float(r["images_per_s"]) == pytest.approx(2 / float(r["seconds"]), rel=1e-4)
        stages = [float(r[f"{s}_ms"]) for s in seg_bench.STAGES]
        assert all(v >= 0 for v in stages) and float(r["forward_ms"]) > 0
        assert float(r["split_total_ms"]) == pytest.approx(sum(stages), rel=1e-3)


@pytest.mark.data
@pytest.mark.slow
def test_predict_smoke(predict_bench: ModuleType, cxr_dir: Path, tmp_path: Path,
                       capsys: pytest.CaptureFixture[str]) -> None:
    if not (SHIPPED_ENSEMBLE / "config.json").is_file():
        pytest.skip(f"shipped classifier {SHIPPED_ENSEMBLE} absent")
    argv = ["--weights", str(SHIPPED_ENSEMBLE), "--data", str(cxr_dir), "--images", "2", "--k", "2",
            "--batch-sizes", "2", "--warmup", "0", "--repeats", "1", "--threads", "1", "--out-dir", str(tmp_path)]
    threads_before = torch.get_num_threads()
    returned = predict_bench.main(argv)
    assert torch.get_num_threads() == threads_before  # --threads is restored
    out = capsys.readouterr().out
    path = _only_csv(tmp_path, "predict")
    header, rows = _read_csv(path)
    assert header == predict_bench.COLUMNS
    assert len(rows) == len(returned) == 1 and rows[0]["batch_size"] == "2"
    assert f"CSV: {path}" in out and "command: python benchmarks/bench_predict.py --weights" in out
    assert "WARNING" not in out
    r = rows[0]
    assert r["images"] == "2" and r["k"] == "2" and r["threads"] == "1"
    shipped = shipped_classifier()
    assert r["learners"] == "+".join(shipped["learners"])
    assert r["models_per_learner"] == "/".join(str(len(shipped["members"][n])) for n in shipped["learners"])
    assert float(r["images_per_s"]) == pytest.approx(2 / float(r["seconds"]), rel=1e-4)
    assert float(r["ms_per_image"]) == pytest.approx(1e3 * float(r["seconds"]) / 2, rel=1e-4)
    folds = [int(f) for f in r["models_per_learner"].split("/")]
    assert len(folds) == int(r["n_learners"]) and sum(folds) == int(r["fold_models"])
    per_image = sum((1 if n.startswith("global-") else 2) * len(shipped["members"][n]) for n in shipped["learners"])
    assert int(r["crop_forwards_per_image"]) == per_image  # K = 2 crops per patch member, one image per whole-image member
    assert int(r["shrink_factor"]) == int(r["patch_size"]) // int(r["learner_input"])
    stages = [float(r[f"{s}_ms"]) for s in predict_bench.STAGES]
    assert all(v >= 0 for v in stages) and float(r["forward_ms"]) > 0 and float(r["segment_ms"]) > 0
    assert float(r["split_total_ms"]) == pytest.approx(sum(stages), rel=1e-3)
    assert r["split_matches_predict"] == "True"  # the instrumented pass still mirrors Classifier.predict


def test_fast_predict_smoke(cxr_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if not (SHIPPED_ENSEMBLE / "config.json").is_file():
        pytest.skip(f"shipped classifier {SHIPPED_ENSEMBLE} absent")
    bench = _load("bench_fast_predict")
    threads_before = torch.get_num_threads()
    bench.main(["--weights", str(SHIPPED_ENSEMBLE), "--data", str(cxr_dir), "--images", "2", "--k", "8",
                "--warmup", "0", "--repeats", "1", "--threads", "2", "--out-dir", str(tmp_path)])
    assert torch.get_num_threads() == threads_before
    header, rows = _read_csv(_only_csv(tmp_path, "fast_predict"))
    assert header == bench.COLUMNS and [r["config"] for r in rows] == list(bench.CONFIGS)
    by = {r["config"]: r for r in rows}
    assert by["exact"]["workers"] == "1" and by["fast"]["workers"] == by["floor"]["workers"] == "2"
    assert float(by["exact"]["speedup_vs_exact"]) == float(by["exact"]["speedup_round_median"]) == 1.0
    for r in rows:
        if r["config"] != "floor":  # K = 8 < the stop rule's first 32: every row uses all 8 crops, exact's answer
            assert float(r["mean_k"]) == 8 and float(r["label_agreement"]) == 1.0 and float(r["mean_abs_dp"]) < 1e-5
    assert by["fast"]["mean_k"] == by["fast_1worker"]["mean_k"]
    assert float(by["fast"]["mean_abs_dp"]) == pytest.approx(float(by["fast_1worker"]["mean_abs_dp"]), abs=1e-7)
