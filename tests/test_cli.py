from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from patchflannel.cli import app

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples"
SEG_WEIGHTS = ROOT / "weights" / "lung_unet.safetensors"
ENSEMBLE = ROOT / "weights" / "ensemble" / "flannel.safetensors"
runner = CliRunner()


def plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def test_help_lists_commands() -> None:
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for cmd in ("segment", "train-seg", "eval-seg", "train-patch", "ensemble", "predict"):
        assert cmd in res.output


def test_segment_shipped_sample(tmp_path: Path) -> None:
    assert SEG_WEIGHTS.exists(), "shipped lung U-Net weights are missing from weights/"
    sample = SAMPLES / "kcx-IM-0117-0001.jpg"
    res = runner.invoke(app, ["segment", str(sample), "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    mask = cv2.imread(str(tmp_path / "masks" / "kcx-IM-0117-0001.png"), cv2.IMREAD_UNCHANGED)
    img = cv2.imread(str(sample), cv2.IMREAD_UNCHANGED)
    assert mask.shape == img.shape[:2] and mask.dtype == np.uint8
    assert set(np.unique(mask)) <= {0, 255}
    frac = (mask > 0).mean()
    assert 0.1 < frac < 0.6, f"lung fraction {frac:.2f} is implausible"
    ov = cv2.imread(str(tmp_path / "overlays" / "kcx-IM-0117-0001.png"))
    assert ov.shape[:2] == img.shape[:2]
    assert "1/1 segmented" in plain(res.output)


def test_segment_folder_with_bad_file_reports_and_continues(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "good.jpg").write_bytes((SAMPLES / "kcx-person1008_bacteria_2939.jpg").read_bytes())
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 50)
    store = tmp_path / "store.h5"
    res = runner.invoke(app, ["segment", str(folder), "--out", str(tmp_path / "out"), "--store", str(store)])
    text = plain(res.output)
    assert res.exit_code == 1
    assert "broken.png" in text and "Traceback" not in text
    assert (tmp_path / "out" / "masks" / "good.png").exists()
    assert not (tmp_path / "out" / "masks" / "broken.png").exists()
    from patchflannel.store import Store

    with Store(store) as s:
        assert s.ids == ["good"] and s.mask(0).any()


def test_missing_weights_is_a_clear_error(tmp_path: Path) -> None:
    res = runner.invoke(app, ["segment", str(SAMPLES), "--out", str(tmp_path), "--weights", str(tmp_path / "nope")])
    assert res.exit_code == 2
    assert "not found" in plain(res.output) and "Traceback" not in plain(res.output)


def test_no_inputs_found(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    res = runner.invoke(app, ["segment", str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "no image files" in plain(res.output)


def test_unknown_config_and_learner(tmp_path: Path) -> None:
    res = runner.invoke(app, ["train-seg", "--config", "nope", "--run-dir", str(tmp_path)])
    assert res.exit_code == 2 and "config nope not found" in plain(res.output)
    res = runner.invoke(app, ["train-patch", "--learner", "alexnet9000", "--run-dir", str(tmp_path)])
    assert res.exit_code == 2 and "unknown learner" in plain(res.output)


@pytest.mark.slow
def test_predict_shipped_sample(tmp_path: Path) -> None:
    assert ENSEMBLE.exists(), "shipped FLANNEL ensemble is missing from weights/ensemble"
    res = runner.invoke(app, ["predict", str(SAMPLES), "--out", str(tmp_path), "--k", "8"])
    assert res.exit_code == 0, res.output
    lines = (tmp_path / "predictions.csv").read_text().strip().splitlines()
    assert lines[0] == "file,label,p_normal,p_bacteria,p_virus,p_covid" and len(lines) == 3
    for line in lines[1:]:
        cells = line.split(",")
        probs = np.array(cells[2:], float)
        assert abs(probs.sum() - 1) < 1e-4 and cells[1] in ("normal", "bacteria", "virus", "covid")
    import json

    j = json.loads((tmp_path / "json" / "kcx-IM-0117-0001.json").read_text())
    assert j["k"] == 8 and len(j["learners"]) >= 2
    assert (tmp_path / "overlays" / "kcx-IM-0117-0001.png").exists()
