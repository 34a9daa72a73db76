"""The command line: commands, exit codes, one-line user errors, output folders of `predict` and `segment`.

Runs in process through typer's CliRunner with the shipped weights
(``weights/ensemble``; the legacy ``lung_unet_jsrt`` U-Net for ``segment``).
"""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner, Result

from patchflannel import __version__
from patchflannel.cli import app
from conftest import shipped_classifier

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples"
SAMPLE_A = SAMPLES / "kcx-IM-0117-0001.jpg"
SAMPLE_B = SAMPLES / "kcx-person1008_bacteria_2939.jpg"
ENSEMBLE = ROOT / "weights" / "ensemble"
SEG = "lung_unet_jsrt"  # one-output legacy U-Net, passed explicitly (the scr default is lung_unet_v7c since v0.6)
CLASSES = ("normal", "bacteria", "virus", "covid")
runner = CliRunner()

pytestmark = pytest.mark.usefixtures("single_thread")


def plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def assert_one_line_error(res: Result, code: int, *needles: str) -> str:
    """Exit ``code``, exactly one non-empty line on stderr starting with ``error:``, no traceback."""
    assert res.exit_code == code, res.output
    lines = [ln for ln in plain(res.stderr).splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert "Traceback" not in res.output and isinstance(res.exception, SystemExit)  # no bug escaped
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def predict(*args: str) -> Result:
    return runner.invoke(app, ["predict", *args, "--k", "8", "--device", "cpu"])


@pytest.fixture(scope="module")
def predicted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Result]:
    """One `predict samples/ --out OUT --k 8` run with the shipped classifier, shared by the tests below."""
    if not (ENSEMBLE / "config.json").is_file():
        pytest.skip(f"shipped classifier {ENSEMBLE} absent")
    out = tmp_path_factory.mktemp("predict") / "out"
    return out, predict(str(SAMPLES), "--out", str(out))


# --------------------------------------------------------------------------- no work


def test_help_lists_every_command() -> None:
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    listed = set(re.findall(r"^│ (\S+)\s", plain(res.output), flags=re.MULTILINE))
    assert {"segment", "train-seg", "eval-seg", "export-seg", "train-patch", "ensemble", "export-ensemble",
            "predict"} <= listed, listed


def test_version() -> None:
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and plain(res.stdout).strip() == f"patchflannel {__version__}"


def test_out_that_is_a_file_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "results.txt"
    target.write_text("keep me")
    res = predict(str(SAMPLE_A), "--out", str(target))
    assert_one_line_error(res, 2, str(target), "is a file")
    assert target.read_text() == "keep me"


def test_unknown_device_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = runner.invoke(app, ["predict", str(SAMPLE_A), "--out", str(out), "--device", "nonsense"])
    assert_one_line_error(res, 2, "--device 'nonsense'", "cpu")
    assert not out.exists()


@pytest.mark.parametrize("item,section,valid", [
    ("train.epochz=3", "train.epochz", ("epochs", "patience", "batch_size")),
    ("trian.epochs=3", "trian", ("seed", "data", "split", "input", "learners", "train")),
])
def test_config_typo_names_the_valid_keys(tmp_path: Path, item: str, section: str, valid: tuple[str, ...]) -> None:
    res = runner.invoke(app, ["train-patch", "--set", item, "--run-dir", str(tmp_path / "run"), "--device", "cpu"])
    line = assert_one_line_error(res, 2, f"unknown key '{section}'", "valid keys:")
    listed = line.split("valid keys:")[1]
    assert all(k in listed for k in valid), line
    assert not (tmp_path / "run").exists()


def test_unknown_learner_is_a_config_error(tmp_path: Path) -> None:
    res = runner.invoke(app, ["train-patch", "--learner", "alexnet9000", "--run-dir", str(tmp_path), "--device", "cpu"])
    assert_one_line_error(res, 2, "unknown learner", "shufflenet_v2_x1_0")


def test_missing_weights_is_a_clear_error(tmp_path: Path) -> None:
    res = predict(str(SAMPLE_A), "--out", str(tmp_path / "o"), "--weights", str(tmp_path / "nope"))
    assert_one_line_error(res, 2, "not found", "--weights")


def test_no_inputs_found(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    res = predict(str(tmp_path / "empty"), "--out", str(tmp_path / "o"))
    assert_one_line_error(res, 2, "no image files")


# --------------------------------------------------------------------------- predict


def test_predict_writes_a_row_json_and_overlay_per_image(predicted: tuple[Path, Result]) -> None:
    out, res = predicted
    assert res.exit_code == 0, res.output
    table = rows(out / "predictions.csv")
    assert sorted(Path(r["file"]).name for r in table) == sorted(p.name for p in SAMPLES.glob("*.jpg"))
    for r in table:
        assert r["status"] == "ok" and r["error"] == "" and r["k"] == "8" and r["seed"] == "0"
        probs = np.array([float(r[f"p_{c}"]) for c in CLASSES])
        assert abs(probs.sum() - 1) < 1e-4 and (probs >= 0).all()
        assert r["label"] == CLASSES[int(probs.argmax())] and float(r["confidence"]) == pytest.approx(probs.max(), abs=1e-4)
        assert 0.05 < float(r["lung_fraction"]) < 0.8
        j = json.loads((out / "json" / f"{r['name']}.json").read_text())
        assert j["status"] == "ok" and j["k"] == 8 and j["label"] == r["label"]
        assert set(j["learners"]) == set(shipped_classifier()["learners"])
        assert len(j["crop_centres_1024"]) == 8
        assert j["probabilities"][r["label"]] == pytest.approx(float(r["confidence"]), abs=1e-4)
        img = cv2.imread(str(Path(r["file"])), cv2.IMREAD_GRAYSCALE)
        ov = cv2.imread(str(out / "overlays" / f"{r['name']}.png"))
        assert ov is not None and ov.shape[:2] == img.shape[:2]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "finished" and "predictions.csv" in manifest["files"]
    assert "2/2 predicted" in plain(res.stdout)


def test_bad_files_get_error_rows_and_the_rest_is_predicted(tmp_path: Path) -> None:
    if not (ENSEMBLE / "config.json").is_file():
        pytest.skip(f"shipped classifier {ENSEMBLE} absent")
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(SAMPLE_A, folder / "good.jpg")
    data = SAMPLE_B.read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (folder / "x.png").write_text("this is not an image\n")
    out = tmp_path / "out"
    res = predict(str(folder), "--out", str(out))
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output and isinstance(res.exception, SystemExit)
    by_name = {Path(r["file"]).name: r for r in rows(out / "predictions.csv")}
    assert set(by_name) == {"good.jpg", "truncated.jpg", "x.png"}
    assert by_name["good.jpg"]["status"] == "ok" and by_name["good.jpg"]["label"] in CLASSES
    for bad in ("truncated.jpg", "x.png"):
        assert by_name[bad]["status"] == "error" and by_name[bad]["error"], by_name[bad]
        assert by_name[bad]["label"] == "" and by_name[bad]["p_normal"] == ""
        assert bad in plain(res.stderr)
    assert (out / "json" / "good.json").is_file() and (out / "overlays" / "good.png").is_file()
    assert not (out / "json" / "x.json").exists() and not (out / "overlays" / "truncated.png").exists()
    assert "1/3 predicted" in plain(res.stdout)


def test_second_run_into_the_same_out_needs_overwrite(predicted: tuple[Path, Result]) -> None:
    out, first = predicted
    assert first.exit_code == 0, first.output
    before = {r["name"]: r for r in rows(out / "predictions.csv")}
    res = predict(str(SAMPLES), "--out", str(out))
    assert_one_line_error(res, 2, "--overwrite", str(out))
    assert {r["name"]: r for r in rows(out / "predictions.csv")} == before  # untouched

    # --overwrite: the earlier run's files go (no stale JSON of an image not in this run), the new ones are written;
    # an image's result does not depend on the other images of the run.
    res = predict(str(SAMPLE_A), "--out", str(out), "--overwrite")
    assert res.exit_code == 0, res.output
    after = rows(out / "predictions.csv")
    assert [r["name"] for r in after] == [SAMPLE_A.stem]
    assert after[0] == before[SAMPLE_A.stem]
    assert not (out / "json" / f"{SAMPLE_B.stem}.json").exists()
    assert not (out / "overlays" / f"{SAMPLE_B.stem}.png").exists()
    assert sorted(p.name for p in (out / "json").iterdir()) == [f"{SAMPLE_A.stem}.json"]


# --------------------------------------------------------------------------- segment


def test_segment_writes_masks_overlays_and_quality_lines(tmp_path: Path) -> None:
    out = tmp_path / "seg"
    res = runner.invoke(app, ["segment", str(SAMPLE_A), str(SAMPLE_B), "--out", str(out), "--weights", SEG,
                              "--device", "cpu", "--backend", "torch"])
    assert res.exit_code == 0, res.output
    assert f"(scr convention, {SEG}, torch)" in plain(res.stdout)
    table = rows(out / "masks.csv")
    assert [r["name"] for r in table] == [SAMPLE_A.stem, SAMPLE_B.stem]
    for r, sample in zip(table, (SAMPLE_A, SAMPLE_B)):
        assert r["status"] == "ok" and r["convention"] == "scr"
        img = cv2.imread(str(sample), cv2.IMREAD_GRAYSCALE)
        mask = cv2.imread(str(out / "masks" / f"{sample.stem}.png"), cv2.IMREAD_UNCHANGED)
        assert mask.shape == img.shape and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
        assert (int(r["width"]), int(r["height"])) == (img.shape[1], img.shape[0])
        frac = float((mask > 0).mean())
        assert 0.1 < frac < 0.6, f"lung fraction {frac:.2f} is implausible"
        assert float(r["lung_fraction"]) == pytest.approx(frac, abs=0.03)
        assert 0.5 < float(r["convexity"]) <= 1
        ov = cv2.imread(str(out / "overlays" / f"{sample.stem}.png"))
        assert ov.shape[:2] == img.shape
    assert "2/2 segmented" in plain(res.stdout)


def test_segment_no_overlays_writes_masks_and_rows_only(tmp_path: Path) -> None:
    out = tmp_path / "seg"
    res = runner.invoke(app, ["segment", str(SAMPLE_A), str(SAMPLE_B), str(tmp_path / "missing.png"), "--out", str(out),
                              "--weights", SEG, "--no-overlays", "--batch-size", "2"])
    assert res.exit_code == 1, res.output  # the missing file: reported, the others done
    table = rows(out / "masks.csv")
    assert [r["status"] for r in table] == ["ok", "ok", "error"]
    assert sorted(p.name for p in (out / "masks").iterdir()) == sorted([f"{SAMPLE_A.stem}.png", f"{SAMPLE_B.stem}.png"])
    assert not (out / "overlays").exists()
    assert "seg/overlays" not in plain(res.stdout).replace("\n", "")


def test_segment_full_convention_uses_the_two_convention_unet(tmp_path: Path) -> None:
    res = runner.invoke(app, ["segment", str(SAMPLES / "kcx-IM-0117-0001.jpg"), "--out", str(tmp_path / "o"),
                              "--convention", "full"])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader((tmp_path / "o" / "masks.csv").open()))
    assert [r["convention"] for r in rows] == ["full"] and rows[0]["status"] == "ok"
    assert "(full convention, lung_unet_v7b, " in plain(res.stdout)  # the default full-convention U-Net
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["status"] == "finished"
    # the v0.1 U-Net has no full output: a clear refusal naming the one that has
    res = runner.invoke(app, ["segment", str(SAMPLES / "kcx-IM-0117-0001.jpg"), "--out", str(tmp_path / "o2"),
                              "--convention", "full", "--weights", "lung_unet_jsrt"])
    assert res.exit_code == 2 and "lung_unet_v7b" in plain(res.output + (res.stderr or ""))


def test_segment_and_eval_seg_default_to_the_scr_default(tmp_path: Path) -> None:
    """`segment` (scr) and `eval-seg` load the one scr default `segment.DEFAULT_SEGMENTER` names."""
    import inspect

    from patchflannel.cli import eval_seg
    from patchflannel.segment import DEFAULT_SEGMENTER

    assert DEFAULT_SEGMENTER == "lung_unet_v7c"  # issue 9 / docs/results/seg_v4/DECISION.md
    res = runner.invoke(app, ["segment", str(SAMPLE_A), "--out", str(tmp_path / "o"), "--no-overlays"])
    assert res.exit_code == 0, res.output
    assert f"(scr convention, {DEFAULT_SEGMENTER}, " in plain(res.stdout)
    default = inspect.signature(eval_seg).parameters["weights"].default
    assert default == DEFAULT_SEGMENTER


def test_segment_refuses_an_unknown_backend(tmp_path: Path) -> None:
    res = runner.invoke(app, ["segment", str(SAMPLE_A), "--out", str(tmp_path / "o"), "--backend", "tensorrt"])
    text = plain(res.output + (res.stderr or ""))
    assert res.exit_code == 2 and "--backend 'tensorrt'" in text and "auto, onnx, torch" in text
    assert not (tmp_path / "o" / "masks.csv").exists()
