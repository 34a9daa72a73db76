"""scripts/aspect_ratio.py: sizes from the metadata and PNG headers, AUCs of the aspect ratio alone."""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
from conftest import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "aspect_ratio.py"


def test_table_and_aucs(tmp_path: Path) -> None:
    mod = load_script(SCRIPT)
    cxr, jsrt = tmp_path / "cxr", tmp_path / "jsrt"
    cxr.mkdir()
    (jsrt / "images").mkdir(parents=True)
    cv2.imwrite(str(jsrt / "images" / "J1.png"), np.zeros((30, 60), np.uint8))
    assert mod.png_size(jsrt / "images" / "J1.png") == (60, 30)
    rows = [("a1", "covid", "ieee8023/covid-chestxray-dataset (adult)", 1200, 1000),
            ("a2", "covid", "ieee8023/covid-chestxray-dataset (adult)", 1300, 1000),
            ("a3", "normal", "ieee8023/covid-chestxray-dataset (adult)", 1000, 1000),
            ("k1", "normal", "kaggle-chest-xray-pneumonia (pediatric, Guangzhou)", 1200, 1000),
            ("k2", "virus", "kaggle-chest-xray-pneumonia (pediatric, Guangzhou)", 1500, 1000)]
    with (cxr / "metadata.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_id", "label", "patient_id", "source", "age", "orig_width", "orig_height"])
        for i, lab, src, wd, ht in rows:
            w.writerow([i, lab, f"p{i}", src, "", wd, ht])
    out = tmp_path / "out"
    assert mod.main(["--cxr", str(cxr), "--jsrt", str(jsrt), "--out", str(out), "--resamples", "50"]) == 0
    table = {(r["source"], r["label"]): r for r in csv.DictReader((out / "aspect_ratio.csv").open())}
    assert float(table[("JSRT (adult, train-only normals)", "normal")]["median"]) == 2.0
    assert float(table[("ieee8023/covid-chestxray-dataset (adult)", "covid")]["median"]) == 1.25
    text = (out / "summary.md").read_text()
    assert "within the adults of the 5 labelled images: 1.000" in text  # both COVID images are wider than the normal one
    assert "within the pediatric images: 1.000" in text
    assert mod.main(["--cxr", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
