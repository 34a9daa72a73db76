"""scripts/repeat_spread.py: per-repeat figures, their spread, and refusal of repeats on other images."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from conftest import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "repeat_spread.py"
CLASSES = ("normal", "bacteria", "virus", "covid")


def _write(path: Path, rows: list[tuple[str, str, tuple[float, ...]]]) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "name", "status", "label", "confidence", *[f"p_{c}" for c in CLASSES]])
        for name, lab, p in rows:
            w.writerow([f"x/{name}.png", name, "ok", lab, max(p), *p])
    return path


def test_spread(tmp_path: Path) -> None:
    labels = tmp_path / "meta.csv"
    with labels.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_id", "file", "label", "patient_id", "source"])
        for i, (lab, src) in enumerate([("covid", "ieee8023/covid-chestxray-dataset (adult)"),
                                        ("normal", "ieee8023/covid-chestxray-dataset (adult)"),
                                        ("bacteria", "kaggle-chest-xray-pneumonia (pediatric, Guangzhou)"),
                                        ("virus", "kaggle-chest-xray-pneumonia (pediatric, Guangzhou)"),
                                        ("normal", "kaggle-chest-xray-pneumonia (pediatric, Guangzhou)")]):
            w.writerow([f"i{i}", f"images/i{i}.png", lab, f"p{i}", src])
    right = [("i0", "covid", (0.1, 0.0, 0.0, 0.9)), ("i1", "normal", (0.78, 0.0, 0.0, 0.22)),
             ("i2", "bacteria", (0.0, 0.69, 0.31, 0.0)), ("i3", "virus", (0.0, 0.38, 0.62, 0.0)),
             ("i4", "covid", (0.05, 0.0, 0.0, 0.95))]  # a child called COVID: neither adult count nor adult AUC
    wrong = right[:1] + [("i1", "covid", (0.3, 0.0, 0.0, 0.7))] + right[2:]  # an adult normal called COVID
    ext_ok = _write(tmp_path / "e1.csv", [("j1", "normal", (0.9, 0.1, 0, 0)), ("j2", "normal", (0.6, 0.4, 0, 0))])
    ext_bad = _write(tmp_path / "e2.csv", [("j1", "normal", (0.9, 0.1, 0, 0)), ("j2", "covid", (0.2, 0, 0, 0.8))])
    out = tmp_path / "spread.md"
    mod = load_script(SCRIPT)
    assert mod.main(["--labels", str(labels), "--out", str(out), "--run", "a", str(_write(tmp_path / "a.csv", right)),
                     str(ext_ok), "--run", "b", str(_write(tmp_path / "b.csv", wrong)), str(ext_bad)]) == 0
    m = json.loads(out.with_suffix(".json").read_text())["metrics"]
    assert m["accuracy"]["values"] == {"a": 0.8, "b": 0.6}
    assert m["adult_called_covid"]["values"] == {"a": 0.0, "b": 1.0}
    assert m["external_normal"]["values"] == {"a": 2.0, "b": 1.0} and m["external_normal"]["mean"] == 1.5
    assert m["adult_auc"]["values"]["a"] == 1.0 and m["adult_auc"]["values"]["b"] == 1.0  # p_covid still ranks them
    assert m["covid_auc"]["values"]["a"] < 1.0  # over every image the child ranks above the adult COVID case
    # one image per confidence bin: (|1 − 0.9| + |1 − 0.78| + |1 − 0.69| + |1 − 0.62| + |0 − 0.95|) / 5
    assert abs(m["ece"]["values"]["a"] - 0.392) < 1e-9 and abs(m["gap"]["values"]["a"] - (0.788 - 0.8)) < 1e-9
    short = _write(tmp_path / "c.csv", right[:3])
    assert mod.main(["--labels", str(labels), "--out", str(out), "--run", "a", str(tmp_path / "a.csv"), str(ext_ok),
                     "--run", "c", str(short), str(ext_ok)]) == 2
    other_ext = _write(tmp_path / "e3.csv", [("j1", "normal", (0.9, 0.1, 0, 0)), ("j9", "normal", (0.9, 0.1, 0, 0))])
    assert mod.main(["--labels", str(labels), "--out", str(out), "--run", "a", str(tmp_path / "a.csv"), str(ext_ok),
                     "--run", "d", str(tmp_path / "a.csv"), str(other_ext)]) == 2
    assert mod.main(["--labels", str(labels), "--out", str(out), "--run", "a", str(tmp_path / "a.csv"), str(ext_ok),
                     "--run", "a", str(tmp_path / "a.csv"), str(ext_ok)]) == 2
