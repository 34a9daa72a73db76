"""Tests for patchflannel.metrics against hand-computed values."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from patchflannel.metrics import (
    classification_report_dict,
    flatten_report,
    format_table,
    summarise,
)

CLASSES = ["normal", "pneumonia", "COVID"]
# 6 samples; predictions (argmax) = [0, 1, 1, 1, 2, 0]
Y = np.array([0, 0, 1, 1, 2, 2])
PROBA = np.array(
    [
        [0.7, 0.2, 0.1],
        [0.3, 0.6, 0.1],
        [0.1, 0.8, 0.1],
        [0.2, 0.5, 0.3],
        [0.1, 0.1, 0.8],
        [0.5, 0.25, 0.25],
    ]
)


def test_report_by_hand() -> None:
    r = classification_report_dict(Y, PROBA, CLASSES, positive="covid")
    # confusion: true 0 → {0,1}; true 1 → {1,1}; true 2 → {2,0}
    assert r["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    pc = r["per_class"]
    # normal: TP 1, FP 1, FN 1 | pneumonia: TP 2, FP 1, FN 0 | COVID: TP 1, FP 0, FN 1
    expected = {"normal": (0.5, 0.5, 0.5), "pneumonia": (2 / 3, 1.0, 0.8), "COVID": (1.0, 0.5, 2 / 3)}
    for name, (p, rec, f1) in expected.items():
        assert (pc[name]["precision"], pc[name]["recall"], pc[name]["f1"]) == pytest.approx((p, rec, f1))
        assert pc[name]["support"] == 2
    assert r["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert r["accuracy"] == pytest.approx(4 / 6)
    pos = r["positive"]
    assert pos["name"] == "COVID"
    # COVID vs rest: TP 1, FN 1, FP 0, TN 4; one of six predicted COVID
    assert pos["sensitivity"] == pytest.approx(0.5)
    assert pos["specificity"] == pytest.approx(1.0)
    assert pos["balanced_accuracy"] == pytest.approx(0.75)
    assert pos["ppcr"] == pytest.approx(1 / 6)
    # COVID scores: positives 0.8, 0.25; negatives 0.1, 0.1, 0.1, 0.3 → 7 of 8 pairs ordered
    assert pos["roc_auc"] == pytest.approx(7 / 8)
    # ranking pos, neg, pos, … → AP = ½·1 + ½·⅔
    assert pos["average_precision"] == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert r["notes"] == []


def test_absent_class_does_not_crash() -> None:
    y = np.array([0, 0, 1, 1, 1, 0])  # no COVID
    r = classification_report_dict(y, PROBA, CLASSES)
    assert math.isnan(r["per_class"]["COVID"]["roc_auc"])
    assert math.isnan(r["positive"]["sensitivity"])
    # one sample wrongly predicted COVID → specificity 5/6
    assert r["positive"]["specificity"] == pytest.approx(5 / 6)
    assert r["per_class"]["COVID"]["f1"] == 0.0
    assert any("COVID" in note for note in r["notes"])
    assert r["macro_f1"] == pytest.approx(np.mean([r["per_class"][c]["f1"] for c in CLASSES]))


def test_report_checks_inputs() -> None:
    with pytest.raises(ValueError, match="not one of"):
        classification_report_dict(Y, PROBA, CLASSES, positive="sars")
    with pytest.raises(ValueError, match="columns"):
        classification_report_dict(Y, PROBA[:, :2], CLASSES)
    with pytest.raises(ValueError, match="integer"):
        classification_report_dict(Y.astype(float), PROBA, CLASSES)
    bad = PROBA.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        classification_report_dict(Y, bad, CLASSES)
    assert classification_report_dict(Y, PROBA, CLASSES, positive=None).get("positive") is None


def test_flatten_and_summarise_by_hand() -> None:
    a = {"macro_f1": 0.6, "per_class": {"x": {"f1": 0.2, "auc": math.nan}}, "name": "m", "confusion_matrix": [[1, 2]]}
    b = {"macro_f1": 0.8, "per_class": {"x": {"f1": 0.4, "auc": 0.9}}, "name": "m", "confusion_matrix": [[3, 4]]}
    assert flatten_report(a)["confusion_matrix.0.1"] == 2.0
    s = summarise([a, b])
    assert s["macro_f1"]["mean"] == pytest.approx(0.7)
    assert s["macro_f1"]["std"] == pytest.approx(math.sqrt(2 * 0.1**2 / 1))  # ddof = 1
    assert s["macro_f1"]["n"] == 2
    assert s["per_class.x.auc"] == {"mean": 0.9, "std": 0.0, "n": 1}  # NaN left out; n = 1 → std 0
    assert "name" not in s
    assert s["confusion_matrix.0.0"]["mean"] == pytest.approx(2.0)


def test_summarise_real_reports_use_class_names() -> None:
    r = classification_report_dict(Y, PROBA, CLASSES)
    s = summarise([r, r])
    assert s["per_class.COVID.f1"]["mean"] == pytest.approx(2 / 3)
    assert s["per_class.COVID.f1"]["std"] == 0.0
    assert s["confusion_matrix.COVID.normal"]["mean"] == 1.0
    assert s["positive.ppcr"]["mean"] == pytest.approx(1 / 6)


def test_format_table() -> None:
    good = summarise([{"macro_f1": 0.6, "accuracy": 0.7}, {"macro_f1": 0.8, "accuracy": 0.7}])
    weak = summarise([{"macro_f1": 0.5, "accuracy": 0.9}])
    table = format_table({"FLANNEL": good, "Soft vote": weak}, ["a"])
    lines = table.strip().splitlines()
    assert lines[0] == "| Model | a F1 | Macro-F1 | Accuracy |"
    assert len(lines) == 4
    assert "| FLANNEL | – | **0.700 (0.141)** | 0.700 (0.000) |" in lines
    assert "| Soft vote | – | 0.500 (0.000) | **0.900 (0.000)** |" in lines
    r = summarise([classification_report_dict(Y, PROBA, CLASSES)])
    assert "COVID sens." in format_table({"m": r}, CLASSES, positive="COVID")


def test_report_with_nan_writes_strict_json(tmp_path: Path) -> None:
    """A report of a fold without COVID holds NaN; written through _files.write_json it is strict JSON."""
    from patchflannel._files import write_json

    r = classification_report_dict(np.array([0, 0, 1, 1, 1, 0]), PROBA, CLASSES)
    out = write_json(tmp_path / "metrics.json", r)
    loaded = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert loaded["per_class"]["COVID"]["roc_auc"] is None
    assert loaded["positive"]["sensitivity"] is None
    assert loaded["confusion_matrix"] == r["confusion_matrix"]
    assert loaded["accuracy"] == pytest.approx(r["accuracy"])


def test_logits_and_argmax() -> None:
    """Scores need not be probabilities: logits give the same report (prediction = argmax)."""
    logits = np.log(PROBA) * 3.0 - 7.0
    a = classification_report_dict(Y, PROBA, CLASSES)
    b = classification_report_dict(Y, logits, CLASSES)
    assert a["confusion_matrix"] == b["confusion_matrix"]
    assert a["positive"]["roc_auc"] == pytest.approx(b["positive"]["roc_auc"])
    assert a["macro_f1"] == pytest.approx(b["macro_f1"])


def test_report_shape_and_range_errors() -> None:
    with pytest.raises(ValueError, match="expected y_true"):
        classification_report_dict(Y[:5], PROBA, CLASSES)
    with pytest.raises(ValueError, match="zero samples"):
        classification_report_dict(np.array([], dtype=int), np.zeros((0, 3)), CLASSES)
    with pytest.raises(ValueError, match=r"lie in \[0, 3\)"):
        classification_report_dict(np.array([0, 0, 1, 1, 2, 3]), PROBA, CLASSES)
    with pytest.raises(ValueError, match="NaN or inf"):
        classification_report_dict(Y, np.where(PROBA > 0.7, np.inf, PROBA), CLASSES)


def test_summarise_edge_cases() -> None:
    with pytest.raises(ValueError, match="at least one"):
        summarise([])
    s = summarise([{"auc": math.nan, "f1": 0.5}, {"auc": math.nan, "f1": 0.7}, {"f1": 0.9}])
    assert math.isnan(s["auc"]["mean"]) and math.isnan(s["auc"]["std"]) and s["auc"]["n"] == 0
    assert s["f1"]["mean"] == pytest.approx(0.7) and s["f1"]["std"] == pytest.approx(0.2) and s["f1"]["n"] == 3
    assert flatten_report({"flag": True, "x": None, "m": {"a": np.float32(0.5)}}) == {"m.a": 0.5}


def test_format_table_dash_ties_and_no_bold_for_one_row() -> None:
    a = summarise([{"macro_f1": 0.8, "accuracy": math.nan}])
    b = summarise([{"macro_f1": 0.8, "accuracy": 0.5}])
    lines = format_table({"A": a, "B": b}, []).strip().splitlines()
    assert lines[2] == "| A | **0.800 (0.000)** | – |"  # NaN → dash; ties are all bold
    assert lines[3] == "| B | **0.800 (0.000)** | **0.500 (0.000)** |"
    single = format_table({"A": b}, [], bold_best=True, digits=2)
    assert "**" not in single and "| A | 0.80 (0.00) | 0.50 (0.00) |" in single
