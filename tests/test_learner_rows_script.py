"""scripts/learner_rows.py rebuilds soft voting and each learner alone from predict's JSON files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from conftest import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "learner_rows.py"
CLASSES = ("normal", "bacteria", "virus", "covid")


def _module():
    return load_script(SCRIPT)


def test_soft_voting_is_the_mean_of_the_learners(tmp_path: Path) -> None:
    pred = tmp_path / "pred"
    (pred / "json").mkdir(parents=True)
    dists = {"a": (0.1, 0.5, 0.3, 0.1), "global-b": (0.1, 0.1, 0.2, 0.6)}
    with (pred / "predictions.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "name", "status", "label", "confidence", *[f"p_{c}" for c in CLASSES]])
        w.writerow(["x/im1.png", "im1", "ok", "covid", "0.5", 0.1, 0.2, 0.2, 0.5])
        w.writerow(["x/bad.png", "bad", "error", "", "", "", "", "", ""])
    learners = {n: {"distribution": dict(zip(CLASSES, d)), "weight": 1.0} for n, d in dists.items()}
    (pred / "json" / "im1.json").write_text(json.dumps({"learners": learners}))
    assert _module().main([str(pred), "--out", str(tmp_path / "rows")]) == 0
    soft = list(csv.DictReader((tmp_path / "rows" / "soft_voting.csv").open()))
    assert len(soft) == 1 and soft[0]["label"] == "covid" and float(soft[0]["p_bacteria"]) == 0.3
    alone = list(csv.DictReader((tmp_path / "rows" / "learner_a.csv").open()))
    assert alone[0]["label"] == "bacteria" and (tmp_path / "rows" / "learner_global-b.csv").is_file()
    (pred / "json" / "im1.json").write_text("{}")
    assert _module().main([str(pred), "--out", str(tmp_path / "rows2")]) == 2
