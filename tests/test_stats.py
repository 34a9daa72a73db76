"""Bootstrap CIs, paired tests, strata and the `evaluate` command (patchflannel.stats), on hand-checkable cases."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score
from typer.testing import CliRunner, Result

from patchflannel.calibrate import expected_calibration_error
from patchflannel.cli import app
from patchflannel.stats import (
    EvalData,
    bootstrap_metrics,
    cluster_weights,
    confound_report,
    paired_bootstrap,
    point_metrics,
    sample_age_group,
    stratified_report,
    weighted_auc,
)

CLASSES = ("normal", "bacteria", "virus", "covid")
runner = CliRunner()


def onehot_probs(pred: np.ndarray, sharp: float = 1.0) -> np.ndarray:
    """Probabilities whose argmax is ``pred``: ``sharp`` on it, the rest spread evenly."""
    p = np.full((pred.size, 4), (1 - sharp) / 3)
    p[np.arange(pred.size), pred] = sharp
    return p


def random_set(n: int = 200, acc: float = 0.7, seed: int = 0, clusters: np.ndarray | None = None) -> EvalData:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    pred = np.where(rng.random(n) < acc, y, rng.integers(0, 4, n))
    probs = rng.dirichlet(np.ones(4), n)
    probs[np.arange(n), pred] += 1.0
    return EvalData(y, probs / probs.sum(axis=1, keepdims=True), CLASSES, pred, clusters)


# --------------------------------------------------------------------------- point estimates


def test_point_metrics_equal_sklearn() -> None:
    d = random_set(150, seed=3)
    m = point_metrics(d)
    assert m["accuracy"] == pytest.approx(accuracy_score(d.y, d.pred))
    assert m["macro_f1"] == pytest.approx(f1_score(d.y, d.pred, average="macro"))
    for i, c in enumerate(CLASSES):
        assert m[f"f1_{c}"] == pytest.approx(f1_score(d.y == i, d.pred == i))
    assert m["covid_auc"] == pytest.approx(roc_auc_score(d.y == 3, d.probs[:, 3]))
    assert m["ece"] == pytest.approx(expected_calibration_error(d.probs, d.y))


def test_weighted_auc_equals_sklearn_with_ties_and_weights() -> None:
    rng = np.random.default_rng(1)
    score = rng.integers(0, 5, 60).astype(float)  # many ties
    truth = rng.random(60) < 0.4
    w = rng.integers(0, 4, (3, 60)).astype(float)
    got = weighted_auc(w * truth, w * ~truth, score)
    for b in range(3):
        assert got[b] == pytest.approx(roc_auc_score(truth, score, sample_weight=w[b]))
    assert np.isnan(weighted_auc(np.ones((1, 4)), np.zeros((1, 4)), np.arange(4.0)))[0]  # no negatives: undefined


def test_macro_f1_averages_only_classes_present_in_truth() -> None:
    y = np.array([0, 0, 1, 1])  # no virus, no covid
    d = EvalData(y, onehot_probs(y), CLASSES)
    assert point_metrics(d)["macro_f1"] == 1.0
    assert math.isnan(point_metrics(d)["f1_covid"])  # neither present nor predicted


# --------------------------------------------------------------------------- bootstrap


def test_perfect_predictions_collapse_the_interval_at_one() -> None:
    y = np.repeat(np.arange(4), 10)
    d = EvalData(y, onehot_probs(y), CLASSES)
    res = bootstrap_metrics(d, 500, seed=0)
    for name in ("macro_f1", "accuracy", "covid_auc", "f1_normal", "f1_covid"):
        assert (res[name]["value"], res[name]["ci_low"], res[name]["ci_high"]) == (1.0, 1.0, 1.0), name
    assert res["ece"]["value"] == res["ece"]["ci_high"] == 0.0


def test_accuracy_interval_matches_the_binomial() -> None:
    n = 400
    y = np.zeros(n, dtype=int)
    pred = np.where(np.arange(n) % 2 == 0, 0, 1)  # accuracy exactly 0.5
    d = EvalData(y, onehot_probs(pred, 0.7), CLASSES, pred)
    r = bootstrap_metrics(d, 2000, seed=0)["accuracy"]
    half = 1.96 * math.sqrt(0.25 / n)  # 0.049
    assert r["value"] == 0.5
    assert r["ci_low"] == pytest.approx(0.5 - half, abs=0.01) and r["ci_high"] == pytest.approx(0.5 + half, abs=0.01)


def test_cluster_weights_keep_a_patients_images_together() -> None:
    clusters = np.array(["a", "a", "a", "b", "c", "c"])
    w = cluster_weights(clusters, 300, np.random.default_rng(0))
    assert w.shape == (300, 6)
    assert (w[:, 0] == w[:, 1]).all() and (w[:, 1] == w[:, 2]).all() and (w[:, 4] == w[:, 5]).all()
    assert (w[:, [0, 3, 4]].sum(axis=1) == 3).all()  # 3 patients drawn per resample
    assert (w[:, 0] == 0).any() and (w[:, 0] >= 2).any()  # a patient is sometimes out, sometimes twice


def test_duplicated_images_of_one_patient_add_no_information() -> None:
    base = random_set(60, seed=5)
    rep = 5  # every patient has 5 identical images
    dup = EvalData(np.repeat(base.y, rep), np.repeat(base.probs, rep, axis=0), CLASSES, np.repeat(base.pred, rep),
                   np.repeat(np.arange(60), rep))
    by_patient = bootstrap_metrics(dup, 400, seed=0)["accuracy"]
    single = bootstrap_metrics(base, 400, seed=0)["accuracy"]
    assert (by_patient["ci_low"], by_patient["ci_high"]) == pytest.approx((single["ci_low"], single["ci_high"]))
    naive = bootstrap_metrics(EvalData(dup.y, dup.probs, CLASSES, dup.pred), 400, seed=0)["accuracy"]
    assert naive["ci_high"] - naive["ci_low"] < 0.6 * (by_patient["ci_high"] - by_patient["ci_low"])


def test_bootstrap_is_seeded() -> None:
    d = random_set(80, seed=2)
    assert bootstrap_metrics(d, 200, seed=7) == bootstrap_metrics(d, 200, seed=7)
    assert bootstrap_metrics(d, 200, seed=7)["accuracy"] != bootstrap_metrics(d, 200, seed=8)["accuracy"]


# --------------------------------------------------------------------------- paired test


def test_paired_bootstrap_detects_a_real_difference() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 200)
    good = EvalData(y, onehot_probs(y, 0.8), CLASSES)
    wrong = np.where(rng.random(200) < 0.5, (y + 1) % 4, y)
    bad = EvalData(y, onehot_probs(wrong, 0.8), CLASSES)
    r = paired_bootstrap(good, bad, ["accuracy", "macro_f1"], 1000, seed=0)["accuracy"]
    assert r["diff"] == pytest.approx(1 - (wrong == y).mean())
    assert r["ci_low"] > 0 and r["p"] < 0.01


def test_paired_bootstrap_finds_no_difference_where_there_is_none() -> None:
    y = np.repeat(np.arange(4), 50)
    # Two sets, each right on 70 % of the images, wrong on different images.
    right_a = np.arange(200) % 10 < 7
    right_b = (np.arange(200) + 3) % 10 < 7
    a = EvalData(y, onehot_probs(np.where(right_a, y, (y + 1) % 4), 0.8), CLASSES)
    b = EvalData(y, onehot_probs(np.where(right_b, y, (y + 2) % 4), 0.8), CLASSES)
    r = paired_bootstrap(a, b, ["accuracy"], 1000, seed=0)["accuracy"]
    assert r["diff"] == 0.0 and r["ci_low"] < 0 < r["ci_high"] and r["p"] > 0.5
    same = paired_bootstrap(a, a, ["accuracy"], 200, seed=0)["accuracy"]
    assert (same["ci_low"], same["ci_high"], same["p"]) == (0.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="same images"):
        paired_bootstrap(a, EvalData(y[:10], a.probs[:10], CLASSES), ["accuracy"], 10)


# --------------------------------------------------------------------------- strata and confound


def test_strata_counts_and_ci_only_where_n_allows() -> None:
    y = np.array([0] * 12 + [3] * 6 + [1] * 3)
    clusters = np.array([f"p{i // 2}" for i in range(21)])  # 2 images per patient (last patient: 1)
    d = EvalData(y, onehot_probs(y, 0.9), CLASSES, clusters=clusters)
    source = ["kaggle"] * 12 + ["ieee"] * 6 + ["kaggle"] * 3
    rep = stratified_report(d, {"source": source, "view": ["AP"] * 20 + [""]}, 200, seed=0)
    kag, ieee = rep["source"]
    assert (kag["stratum"], kag["n"], kag["patients"], kag["ci"]) == ("kaggle", 15, 8, True)
    assert kag["classes"] == {"normal": 12, "bacteria": 3, "virus": 0, "covid": 0}
    assert (ieee["stratum"], ieee["n"], ieee["patients"], ieee["ci"]) == ("ieee", 6, 3, False)
    assert ieee["metrics"]["accuracy"]["value"] == 1.0 and math.isnan(ieee["metrics"]["accuracy"]["ci_low"])
    assert [(r["stratum"], r["n"]) for r in rep["view"]] == [("AP", 20), ("(unknown)", 1)]


def test_confound_measures_age_not_disease() -> None:
    # p_covid = 0.8 for every adult, 0.1 for every child: it knows age, nothing about COVID.
    ages = ["adult"] * 20 + ["pediatric"] * 20
    y = np.array([3] * 10 + [0] * 10 + [0] * 10 + [1] * 10)
    probs = np.tile([0.1, 0.1, 0.1, 0.7], (40, 1))
    probs[20:] = [0.5, 0.3, 0.1, 0.1]
    d = EvalData(y, probs, CLASSES)
    c = confound_report(d, ages, 300, seed=0)
    assert c["adult_vs_pediatric_negatives"]["value"] == 1.0
    assert (c["adult_vs_pediatric_negatives"]["n_positive"], c["adult_vs_pediatric_negatives"]["n_negative"]) == (10, 20)
    assert c["within_adults"]["value"] == 0.5  # all adults tie
    assert c["within_adults"]["ci_low"] == c["within_adults"]["ci_high"] == 0.5
    assert math.isnan(c["within_pediatric"]["value"]) and "no positive" in c["within_pediatric"]["note"]
    assert point_metrics(d)["covid_auc"] > 0.8  # the headline AUC looks good anyway


def test_age_group_rule() -> None:
    assert sample_age_group("kcx-person1_bacteria_1", "kcx-person1", "", "") == "pediatric"
    assert sample_age_group("x", "p", "ieee8023/covid-chestxray-dataset (adult)", "") == "adult"
    assert sample_age_group("x", "p", "my hospital", "12") == "pediatric"
    assert sample_age_group("x", "p", "my hospital", "44") == "adult"
    assert sample_age_group("x", "p", "my hospital", "") == ""


# --------------------------------------------------------------------------- the evaluate command


def plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def write_csv(path: Path, rows: list[dict[str, object]]) -> Path:
    cols: dict[str, None] = {}
    for r in rows:
        cols.update(dict.fromkeys(r))
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(cols), restval="")
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.fixture()
def synthetic(tmp_path: Path) -> tuple[Path, Path]:
    """40 labelled images (10 per class; COVID adult, the rest half pediatric), predictions for 38 of them
    plus one error row and one image without a label."""
    rng = np.random.default_rng(0)
    meta, preds = [], []
    for i in range(40):
        label = CLASSES[i % 4]
        kid = label != "covid" and i % 8 < 4
        iid = f"kcx-im{i}" if kid else f"ccx-im{i}"
        meta.append({"image_id": iid, "file": f"images/{iid}.jpg", "label": label, "patient_id": f"p{i // 2}",
                     "source": "kaggle (pediatric)" if kid else "ieee8023 (adult)", "view": "PA" if i % 3 else "AP",
                     "age": "" if kid else "50"})
        if i >= 38:
            continue
        p = rng.dirichlet(np.ones(4))
        p[i % 4 if rng.random() < 0.75 else (i + 1) % 4] += 1.5
        p /= p.sum()
        preds.append({"file": f"/somewhere/{iid}.jpg", "name": iid, "status": "ok", "error": "",
                      "label": CLASSES[int(p.argmax())], "confidence": f"{p.max():.4f}",
                      **{f"p_{c}": f"{v:.6f}" for c, v in zip(CLASSES, p)}})
    preds.append({"file": "/somewhere/broken.jpg", "name": "broken", "status": "error", "error": "truncated"})
    preds.append({"file": "/somewhere/stranger.jpg", "name": "stranger", "status": "ok", "label": "normal",
                  **{f"p_{c}": "0.25" for c in CLASSES}})
    return write_csv(tmp_path / "predictions.csv", preds), write_csv(tmp_path / "metadata.csv", meta)


def evaluate(*args: str) -> Result:
    return runner.invoke(app, ["evaluate", *args, "--bootstrap", "200"])


def test_evaluate_end_to_end(synthetic: tuple[Path, Path], tmp_path: Path) -> None:
    pred, meta = synthetic
    out = tmp_path / "eval"
    res = evaluate(str(pred), "--labels", str(meta), "--out", str(out))
    assert res.exit_code == 0, res.output
    text = plain(res.stdout)
    assert "evaluated 38 of 40 prediction rows" in text and "1 status error" in text and "1 no label" in text
    for name in ("report.json", "report.md", "reliability.png", "strata.png"):
        assert (out / name).stat().st_size > 0, name
    rep = json.loads((out / "report.json").read_text())
    assert rep["n"] == 38 and rep["patients"] == 19 and rep["bootstrap"]["unit"] == "patient"
    assert rep["source"]["skipped"] == {"status error": 1, "no label": 1}
    assert rep["class_counts"] == {"normal": 10, "bacteria": 10, "virus": 9, "covid": 9}
    m = rep["metrics"]["macro_f1"]
    assert m["ci_low"] <= m["value"] <= m["ci_high"]
    assert {s["stratum"]: s["n"] for s in rep["strata"]["age_group"]} == {"adult": 23, "pediatric": 15}
    assert sum(s["n"] for s in rep["strata"]["view"]) == sum(s["n"] for s in rep["strata"]["source"]) == 38
    assert rep["confound"]["within_adults"]["n_positive"] == 9
    assert rep["confound"]["adult_vs_pediatric_negatives"]["n"] == 29
    md = (out / "report.md").read_text()
    assert "## Source / age confound" in md and "## By view" in md and "Reading:" in md
    again = evaluate(str(pred), "--labels", str(meta), "--out", str(out))
    assert again.exit_code == 2 and "--overwrite" in plain(again.stderr)
    assert evaluate(str(pred), "--labels", str(meta), "--out", str(out), "--overwrite").exit_code == 0


def assert_one_line_error(res: Result, *needles: str) -> None:
    assert res.exit_code == 2, res.output
    lines = [ln for ln in plain(res.stderr).splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for n in needles:
        assert n in lines[0], lines[0]


def test_evaluate_errors(synthetic: tuple[Path, Path], tmp_path: Path) -> None:
    pred, meta = synthetic
    out = str(tmp_path / "e")
    assert_one_line_error(evaluate(str(tmp_path / "nope.csv"), "--labels", str(meta), "--out", out), "not found")
    no_p = write_csv(tmp_path / "no_p.csv", [{"file": "a.jpg", "status": "ok", "label": "covid"}])
    assert_one_line_error(evaluate(str(no_p), "--labels", str(meta), "--out", out), "p_<class>")
    no_label = write_csv(tmp_path / "no_label.csv", [{"file": "images/ccx-im3.jpg", "finding": "x"}])
    assert_one_line_error(evaluate(str(pred), "--labels", str(no_label), "--out", out), "no 'label' column")
    other = write_csv(tmp_path / "other.csv", [{"file": "images/zzz.jpg", "label": "covid"}])
    assert_one_line_error(evaluate(str(pred), "--labels", str(other), "--out", out), "no overlap")
    odd = write_csv(tmp_path / "odd.csv", [{"file": "images/ccx-im3.jpg", "label": "fungus"}])
    assert_one_line_error(evaluate(str(pred), "--labels", str(odd), "--out", out), "'fungus'")
    assert not (tmp_path / "e").exists()  # nothing written on a data error
