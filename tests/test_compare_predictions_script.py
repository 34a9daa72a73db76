"""scripts/compare_predictions.py pairs two predictions.csv by image, whatever their row order."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from conftest import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compare_predictions.py"
CLASSES = ("normal", "bacteria", "virus", "covid")


def _module():
    return load_script(SCRIPT)


def _write(path: Path, rows: list[tuple[str, np.ndarray]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["file", "name", "status", "label", "confidence", *[f"p_{c}" for c in CLASSES]])
        for name, p in rows:
            w.writerow([f"{name}.png", name, "ok", CLASSES[int(np.argmax(p))], f"{p.max():.4f}", *[f"{v:.4f}" for v in p]])
    return path


def test_pairs_by_image_and_reports_the_gap(tmp_path: Path) -> None:
    mod = _module()
    rng = np.random.default_rng(0)
    n = 40
    y = rng.integers(0, 4, n)
    labels = tmp_path / "labels.csv"
    with labels.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image_id", "label", "patient_id"])
        for i in range(n):
            w.writerow([f"im{i}", CLASSES[y[i]], f"p{i // 2}"])
    good = [np.eye(4)[y[i]] * 0.7 + 0.075 for i in range(n)]      # always right, confidence 0.775
    bad = [np.roll(g, 1) for g in good]                            # always wrong
    a = _write(tmp_path / "a.csv", [(f"im{i}", good[i]) for i in range(n)])
    b = _write(tmp_path / "b.csv", [(f"im{i}", good[i]) for i in reversed(range(n))])  # same, other order
    c = _write(tmp_path / "c.csv", [(f"im{i}", bad[i]) for i in range(n)])
    same = mod.compare(a, b, labels, resamples=200)
    assert same["metrics"]["macro_f1"]["diff"] == 0 and same["metrics"]["accuracy"]["ci_high"] == 0
    worse = mod.compare(c, a, labels, resamples=200)
    assert worse["metrics"]["accuracy"]["diff"] == -1 and worse["metrics"]["accuracy"]["ci_high"] == -1
    assert worse["calibration"]["b"]["gap"] == pytest.approx(0.775 - 1.0, abs=1e-3)
    assert worse["calibration"]["a"]["accuracy"] == 0 and worse["patients"] == 20
    gd = worse["calibration"]["abs_gap_diff"]   # |0.775 − 0| − |0.775 − 1|: no spread (every image alike)
    assert gd["diff"] == pytest.approx(0.775 - 0.225, abs=1e-3) and gd["ci_low"] == pytest.approx(gd["diff"], abs=1e-6)
    short = _write(tmp_path / "short.csv", [(f"im{i}", good[i]) for i in range(n - 1)])
    with pytest.raises(mod.DataError, match="same labelled images"):
        mod.compare(a, short, labels, resamples=50)
    out = tmp_path / "paired.md"
    assert mod.main([str(c), str(a), "--labels", str(labels), "--names", "bad", "good", "--out", str(out),
                     "--resamples", "100"]) == 0
    assert "| accuracy | 0.0000 | 1.0000 | -1.0000" in out.read_text() and out.with_suffix(".json").is_file()
