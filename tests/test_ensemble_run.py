"""Tests for patchflannel.ensemble_run: loading and aligning votes, the comparison rows,
outputs, the saved FLANNEL model, calibration, the exported Classifier, and that the
test votes never influence training."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from patchflannel.calibrate import Calibrator
from patchflannel.ensemble import FlannelWeights, combiner_logits
from patchflannel.ensemble_run import (
    EnsembleConfig,
    export_classifier,
    load_flannel,
    load_votes,
    paired_verdict,
    resolve_config,
    run_ensemble,
    source_confound,
)
from patchflannel.errors import ConfigError, DataError, WeightsError
from patchflannel.learners import InputSpec, Learner, create_learner, make_inputs
from patchflannel.pipeline import Classifier, Prepared, image_seed
from patchflannel.segment import LungSegmenter, MaskQuality, Preprocess, build_unet
from patchflannel.vote import predict_distribution, vote

pytestmark = pytest.mark.usefixtures("single_thread")

CLASSES = ["normal", "bacteria", "virus", "covid"]
PEDIATRIC = "kaggle-chest-xray-pneumonia (pediatric, Guangzhou)"
ADULT_COVID = "ieee8023/covid-chestxray-dataset (adult)"
ADULT_OTHER = "Actualmed-COVID-chestxray-dataset (adult)"
N_OOF, N_TEST, F, K = 120, 40, 2, 20
# Small but real training: every row trains 2 seeds; the whole run takes a few seconds.
CFG = {"seeds": 2, "epochs": 20, "patience": 6, "lr": 0.01, "batch_size": 32, "gamma": 3.0}
PATCH_ROWS = ["good", "noisy", "anti", "soft voting", "hard voting", "stacking MLP (1 layer)",
              "stacking MLP (2 layers)", "FLANNEL (focal γ=3)", "FLANNEL (CE)", "FLANNEL (CE + resampling)",
              "FLANNEL (weighted CE β=2)"]
ALL_ROWS = PATCH_ROWS + ["global-good", "FLANNEL over global learners (focal)"]
PATCH_LEARNERS = ["good", "noisy", "anti"]
# A tiny patch view so the exported learners run in milliseconds: 64 px field of view seen at 32 px.
SPEC = InputSpec(mode="patch", patch_size=64, learner_input=32)


# --------------------------------------------------------------------------- synthetic runs


def _images(rng: np.random.Generator, n: int, prefix: str) -> dict[str, np.ndarray]:
    y = rng.choice(4, size=n, p=[0.35, 0.3, 0.2, 0.15])
    y[:4] = [0, 1, 2, 3]  # every class present
    adult_other = rng.random(n) < 0.3
    sources = np.where(y == 3, ADULT_COVID, np.where(adult_other, ADULT_OTHER, PEDIATRIC))
    return {"ids": np.array([f"{prefix}{i:03d}" for i in range(n)]), "y": y.astype(np.int64),
            "patients": np.array([f"{prefix}p{i // 2}" for i in range(n)]), "sources": sources,
            "groups": np.array([f"{prefix}p{i // 2}" for i in range(n)]),
            "age_groups": np.where(sources == PEDIATRIC, "pediatric", "adult"),
            "views": np.where(np.arange(n) % 3 == 0, "AP", "PA"), "findings": np.array([CLASSES[c] for c in y])}


def _decide(rng: np.random.Generator, y: np.ndarray, kind: str) -> np.ndarray:
    """Each image's class as the learner sees it (before per-fold-model noise)."""
    n = len(y)
    other = (y + rng.integers(1, 4, n)) % 4
    if kind == "good":
        return np.where(rng.random(n) < 0.85, y, other)
    if kind == "global":
        return np.where(rng.random(n) < 0.65, y, other)
    if kind == "anti":
        return np.where(rng.random(n) < 0.9, (y + 1) % 4, other)
    return rng.integers(0, 4, n)  # noisy: unrelated to y


def _dist(rng: np.random.Generator, label: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(soft, hard) distributions (n,M) peaked on ``label`` (noisy: random)."""
    n = len(label)
    if kind == "noisy":
        soft = rng.dirichlet(np.ones(4), n)
    else:
        logits = 2.5 * np.eye(4)[label] + rng.normal(0, 0.7, (n, 4))
        soft = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    hard = np.stack([rng.multinomial(K, p / p.sum()) for p in soft]).astype(np.float32) / K
    return soft.astype(np.float32), hard


def write_learner(folder: Path, kind: str, oof: dict[str, np.ndarray], test: dict[str, np.ndarray], seed: int,
                  n_folds: int = F) -> None:
    """``oof.npz`` and ``test.npz`` with the keys documented in :mod:`patchflannel.patch_train`."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    k = 1 if kind == "global" else K
    soft, hard = _dist(rng, _decide(rng, oof["y"], kind), kind)
    np.savez(folder / "oof.npz", **oof, fold=np.arange(len(oof["y"])) % n_folds, soft=soft, hard=hard,
             classes=np.array(CLASSES), k=np.array(k))
    decided = _decide(rng, test["y"], kind)
    per_fold = [_dist(rng, decided, kind) for _ in range(n_folds)]
    np.savez(folder / "test.npz", **test, fold=np.full(len(test["y"]), -1), soft=np.stack([s for s, _ in per_fold], 1),
             hard=np.stack([h for _, h in per_fold], 1), classes=np.array(CLASSES), k=np.array(k))


def write_fold_models(folder: Path, seed: int, n_folds: int = F) -> None:
    """``folder/fold<f>/best``: Learner folders as train-patch writes them."""
    for f in range(n_folds):
        torch.manual_seed(seed * 10 + f)
        m = create_learner("squeezenet1_1", num_classes=4, classes=CLASSES, input_spec=SPEC,
                           info={"training": {"fold": f}})
        m.save_pretrained(folder / f"fold{f}" / "best")


def make_runs(root: Path, test_labels: np.ndarray | None = None, segmenter: Path | None = None) -> list[Path]:
    """Two train-patch run layouts: runA = good, noisy; runB = anti, global-good.

    With ``segmenter``, each run also gets a ``config.yaml`` naming it and the
    patch learners get their fold models (what :func:`export_classifier` reads).
    """
    rng = np.random.default_rng(0)
    oof, test = _images(rng, N_OOF, "o"), _images(rng, N_TEST, "t")
    if test_labels is not None:
        test["y"] = test_labels
    # Learners list images in different orders, as separate runs may.
    perm = np.random.default_rng(1).permutation(N_OOF)
    oof_shuffled = {k: v[perm] for k, v in oof.items()}
    run_a, run_b = root / "runA", root / "runB"
    write_learner(run_a / "good", "good", oof, test, 1)
    write_learner(run_a / "noisy", "noisy", oof_shuffled, test, 2)
    write_learner(run_b / "anti", "anti", oof, test, 3)
    write_learner(run_b / "global-good", "global", oof_shuffled, test, 4)
    (run_b / "logs").mkdir()  # stray folders must not confuse discovery
    if segmenter is None:
        (run_a / "good" / "fold0").mkdir()  # nor learner subfolders
    else:
        for i, (run, name) in enumerate([(run_a, "good"), (run_a, "noisy"), (run_b, "anti")]):
            write_fold_models(run / name, i + 1)
        for run in (run_a, run_b):
            (run / "config.yaml").write_text(yaml.safe_dump({"data": {"segmenter": str(segmenter)}}))
    return [run_a, run_b]


@pytest.fixture(scope="module")
def segmenter_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small random lung U-Net saved as a weights folder (nothing shipped or downloaded)."""
    torch.manual_seed(0)
    seg = LungSegmenter(build_unet("resnet18", (16, 8, 8, 8, 8), 1), Preprocess(size=64), ("scr",),
                        config={"encoder": "resnet18", "decoder_channels": [16, 8, 8, 8, 8]})
    return seg.save_pretrained(tmp_path_factory.mktemp("seg") / "tiny_unet")


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory, segmenter_dir: Path) -> tuple[list[Path], Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("ens")
    runs = make_runs(root, segmenter=segmenter_dir)
    out = root / "out"
    seen: list[str] = []

    def track(it: Any, description: str = "", total: int | None = None) -> Any:
        seen.append(description)
        return it

    results = run_ensemble(CFG, runs, out, track=track)
    assert seen, "track was never used"
    return runs, out, results


# --------------------------------------------------------------------------- config


def test_config_defaults_and_unknown_keys(tmp_path: Path) -> None:
    cfg = resolve_config({"seeds": 2})
    assert cfg["seeds"] == 2 and cfg["gamma"] == EnsembleConfig().gamma and cfg["distribution"] == "soft"
    assert resolve_config(EnsembleConfig(epochs=7))["epochs"] == 7
    with pytest.raises(ConfigError, match="epochz"):
        resolve_config({"epochz": 3})
    with pytest.raises(ConfigError, match="seeds"):
        resolve_config({"seeds": 0})
    with pytest.raises(ConfigError, match="distribution"):
        resolve_config({"distribution": "median"})
    # run_ensemble checks its config before touching any file.
    with pytest.raises(ConfigError, match="epochz"):
        run_ensemble({"epochz": 3}, [tmp_path], tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- loading


def test_load_votes_aligns_by_id(ran: tuple[list[Path], Path, dict[str, Any]]) -> None:
    runs, _, _ = ran
    lset, oof, test = load_votes(runs)
    assert lset.names == ["good", "noisy", "anti", "global-good"]
    assert oof.P.shape == (N_OOF, 4, 4) and test.P.shape == (N_TEST, F, 4, 4)
    assert list(oof.ids) == sorted(oof.ids)
    # "noisy" was written in a shuffled order: after alignment its row i is image oof.ids[i].
    with np.load(runs[0] / "noisy" / "oof.npz") as z:
        where = {i: j for j, i in enumerate(z["ids"])}
        np.testing.assert_allclose(oof.P[:, 1], z["soft"][[where[i] for i in oof.ids]])
    sub, _, _ = load_votes(runs, learners=["anti", "good"], distribution="hard")
    assert sub.names == ["anti", "good"] and sub.distribution == "hard" and sub.k["good"] == K
    assert sub.k["anti"] == K and lset.k["global-good"] == 1


def test_mismatched_ids_raise(tmp_path: Path) -> None:
    runs = make_runs(tmp_path)
    path = runs[1] / "anti" / "oof.npz"
    with np.load(path) as z:
        d = {k: z[k] for k in z.files}
    d["ids"] = d["ids"].copy()
    d["ids"][:3] = ["x1", "x2", "x3"]
    np.savez(path, **d)
    with pytest.raises(DataError, match=r"'anti'.*3 missing, 3 extra"):
        load_votes(runs)
    with pytest.raises(DataError, match="not found"):
        load_votes(runs, learners=["nope"])


def test_missing_vote_keys_and_no_learners_raise(tmp_path: Path) -> None:
    runs = make_runs(tmp_path)
    path = runs[0] / "good" / "oof.npz"
    with np.load(path) as z:
        d = {k: z[k] for k in z.files if k != "patients"}
    np.savez(path, **d)
    with pytest.raises(DataError, match="lacks.*patients"):
        load_votes(runs)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no learner folders"):
        load_votes([empty])


def test_different_fold_counts_raise(tmp_path: Path) -> None:
    runs = make_runs(tmp_path)
    rng = np.random.default_rng(0)
    oof, test = _images(rng, N_OOF, "o"), _images(rng, N_TEST, "t")
    write_learner(runs[1] / "three", "good", oof, test, 5, n_folds=3)
    with pytest.raises(DataError, match="'three'.*3 fold models"):
        load_votes(runs)


# --------------------------------------------------------------------------- outputs


def test_outputs_and_rows(ran: tuple[list[Path], Path, dict[str, Any]]) -> None:
    _, out, results = ran
    for name in ("config.yaml", "split.json", "table.md", "results.json", "results.csv", "claims.md",
                 "calibration.json", "predictions_test.npz", "flannel/config.json", "flannel/model.safetensors",
                 "confusion_flannel_focal.png", "confusion_best_single.png", "roc_pr_covid.png",
                 "weights_flannel_focal.png", "history_flannel_focal.png", "reliability_test.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert not list(out.rglob(".*.tmp")) and not list(out.rglob("*.tmp")), "temp file left behind"
    table = (out / "table.md").read_text()
    body = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| Model")]
    assert [line.split(" | ")[0][2:] for line in body] == ALL_ROWS  # all rows, in order
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["row_order"] == ALL_ROWS == [r["name"] for r in results["rows"]]
    assert on_disk["n_images"]["test"] == N_TEST and on_disk["n_images"]["oof"] == N_OOF
    assert on_disk["n_images"]["ensemble_train"] + on_disk["n_images"]["ensemble_val"] == N_OOF
    for row in on_disk["rows"]:
        assert row["n_evaluations"] == (F * CFG["seeds"] if row["trainable"] else F)
        for key, s in row["summary"].items():
            if key.startswith(("confusion_matrix", "n_samples")) or key.endswith("support"):
                continue
            assert s["mean"] is not None and 0.0 <= s["mean"] <= 1.0, (row["name"], key, s)
            assert math.isfinite(s["std"])
    assert set(on_disk["flannel_weights"]["per_learner"]) == set(PATCH_LEARNERS)
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert csv_lines[0] == "model,key,metric,mean,std,n"
    assert sum(line.startswith("FLANNEL (CE),") for line in csv_lines) == len(on_disk["rows"][0]["summary"])
    # The resolved config records the run folders, so the output can be exported later.
    saved_cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert saved_cfg["runs"] == [str(r.resolve()) for r in ran[0]] and saved_cfg["seeds"] == CFG["seeds"]


def test_split_is_grouped_by_patient(ran: tuple[list[Path], Path, dict[str, Any]]) -> None:
    _, out, _ = ran
    split = json.loads((out / "split.json").read_text())
    tr, va = set(split["train"]), set(split["val"])
    assert not tr & va and len(tr | va) == N_OOF
    patient = {f"o{i:03d}": f"op{i // 2}" for i in range(N_OOF)}
    assert not {patient[i] for i in tr} & {patient[i] for i in va}


def test_flannel_beats_noise_and_uses_the_good_learner(ran: tuple[list[Path], Path, dict[str, Any]]) -> None:
    _, _, results = ran
    f1 = {r["name"]: r["summary"]["macro_f1"]["mean"] for r in results["rows"]}
    assert f1["FLANNEL (focal γ=3)"] > f1["noisy"] + 0.3
    assert f1["FLANNEL (focal γ=3)"] > 0.6
    w = results["flannel_weights"]["per_learner"]
    assert w["good"]["mean"] > w["noisy"]["mean"]
    assert results["claims"]["best_single_learner"] == "good"


def test_claims_and_confound(ran: tuple[list[Path], Path, dict[str, Any]]) -> None:
    _, out, results = ran
    claims = (out / "claims.md").read_text()
    assert "macro-F1" in claims and "soft voting" in claims and "FLANNEL (CE)" in claims
    assert "Source-confound" in claims
    conf = results["source_confound"]["models"]["FLANNEL (focal γ=3)"]
    adult = conf["adult_non_covid"]
    test = np.load(out / "predictions_test.npz")
    expected = int(((test["y"] != 3) & (test["sources"] == ADULT_OTHER)).sum())
    assert adult["n"] == expected and 0 <= adult["predicted_covid"] <= adult["n"]
    assert conf["pediatric_non_covid"]["n"] == int((test["sources"] == PEDIATRIC).sum())
    assert ("too few" in conf["verdict"]) == (expected < 10)


def test_claims_wording_follows_the_paired_tests(ran: tuple[list[Path], Path, dict[str, Any]]) -> None:
    _, out, results = ran
    claims = (out / "claims.md").read_text()
    assert "paired bootstrap" in claims
    for pair, d in results["shipped_configuration"]["paired"].items():
        m = d["macro_f1"]
        verdict = paired_verdict(m)
        assert verdict.startswith("yes") == (m["ci_low"] > 0) and verdict.startswith("no:") == (m["ci_high"] < 0)
        assert f"{m['diff']:+.3f} [{m['ci_low']:+.3f}, {m['ci_high']:+.3f}]" in claims and verdict in claims


def test_paired_verdict_rules() -> None:
    assert paired_verdict({"ci_low": 0.01, "ci_high": 0.2}).startswith("yes")
    assert paired_verdict({"ci_low": -0.2, "ci_high": -0.001}).startswith("no:")
    assert paired_verdict({"ci_low": -0.01, "ci_high": 0.1}).startswith("not demonstrated")
    assert paired_verdict({"ci_low": float("nan"), "ci_high": 0.1}).startswith("undefined")


def test_source_confound_rules() -> None:
    y = np.array([0] * 30 + [3] * 5)
    src = np.array([ADULT_OTHER] * 15 + [PEDIATRIC] * 15 + [ADULT_COVID] * 5)
    pred = np.array([3] * 12 + [0] * 3 + [0] * 15 + [3] * 5)  # adults called COVID, children not
    res = source_confound(pred, y, src, covid=3)
    assert res["adult_non_covid"] | {"ci95": None} == {"n": 15, "predicted_covid": 12, "fraction": 0.8, "ci95": None}
    assert "consistent with" in res["verdict"]
    few = source_confound(pred[10:], y[10:], src[10:], covid=3)
    assert few["adult_non_covid"]["n"] == 5 and "too few" in few["verdict"]
    none = source_confound(pred, y, np.array([""] * 35), covid=3)
    assert none["unknown_source"] == 35 and "cannot be checked" in none["verdict"]


# --------------------------------------------------------------------------- saved model, calibration and leakage


def test_saved_flannel_reproduces_predictions(ran: tuple[list[Path], Path, dict[str, Any]]) -> None:
    _, out, _ = ran
    model, sidecar = load_flannel(out / "flannel")
    assert isinstance(model, FlannelWeights) and not model.training
    assert sidecar["task"] == "combiner" and sidecar["combiner"] == "flannel"
    assert sidecar["learners"] == PATCH_LEARNERS and sidecar["classes"] == CLASSES
    assert sidecar["n_learners"] == 3 and sidecar["n_classes"] == 4
    assert sidecar["k"] == K and sidecar["gamma"] == 3.0 and sidecar["distribution"] == "soft"
    assert len(sidecar["alpha"]) == 4 and abs(sum(sidecar["alpha"]) - 1) < 1e-6
    assert len(sidecar["source_runs"]) == 2 and "mean" in sidecar["test_macro_f1"]
    pred = np.load(out / "predictions_test.npz")
    P = torch.as_tensor(pred["P_mean_of_fold_models"][:, :3])
    with torch.no_grad():
        z, w = model(P)
    np.testing.assert_allclose(torch.softmax(z.double(), 1).numpy(), pred["proba_flannel_focal"], atol=1e-6)
    np.testing.assert_allclose(w.numpy(), pred["flannel_focal_weights"], atol=1e-6)


def test_calibration_json(ran: tuple[list[Path], Path, dict[str, Any]]) -> None:
    _, out, results = ran
    cal = json.loads((out / "calibration.json").read_text())
    assert cal == json.loads(json.dumps(results["calibration"]))
    assert cal["kind"] == "temperature" and cal["temperature"] > 0
    calibrator = Calibrator.from_dict(cal)
    # The numbers it reports are the ones its temperature gives on the test votes (mean of fold models).
    model, _ = load_flannel(out / "flannel")
    pred = np.load(out / "predictions_test.npz")
    with torch.no_grad():
        z = combiner_logits(model, torch.as_tensor(pred["P_mean_of_fold_models"][:, :3])).double()
    from patchflannel.calibrate import brier_score, expected_calibration_error

    y = pred["y"]
    raw, calibrated = torch.softmax(z, 1).numpy(), calibrator.probabilities(z.numpy())
    assert cal["test_ece_raw"] == pytest.approx(expected_calibration_error(raw, y), abs=1e-9)
    assert cal["test_ece_calibrated"] == pytest.approx(expected_calibration_error(calibrated, y), abs=1e-9)
    assert cal["test_brier_calibrated"] == pytest.approx(brier_score(calibrated, y), abs=1e-9)
    # ... and the ECE floor is the calibrated confidences' own (labels drawn from them), on the same images
    from patchflannel.calibrate import ece_noise_floor

    assert cal["test_ece_floor"] == pytest.approx(ece_noise_floor(calibrated, seed=0, observed=cal["test_ece_calibrated"]))
    assert 0 <= cal["test_ece_floor"]["p_observed_or_more"] <= 1
    assert cal["test_ece_floor"]["n_images"] == len(y)
    assert cal["test_top_probability_quantiles_calibrated"] == pytest.approx(
        np.quantile(calibrated.max(1), [0, 0.1, 0.25, 0.5, 0.75, 0.9, 1]).tolist())
    # A temperature never changes the predicted class.
    assert cal["test_accuracy"] == pytest.approx(float((calibrated.argmax(1) == y).mean()))
    assert str(len(json.loads((out / "split.json").read_text())["val"])) in cal["fitted_on"]
    # One entry per fold model: the calibrated FLANNEL fed that fold model's test votes alone.
    runs = ran[0]
    _, _, test = load_votes(runs, None, "soft")
    per_fold = cal["test_per_fold_model_calibrated"]
    assert [r["fold_model"] for r in per_fold] == list(range(test.P.shape[1]))
    for r in per_fold:
        with torch.no_grad():
            zf = combiner_logits(model, torch.as_tensor(test.P[:, r["fold_model"], :3], dtype=torch.float32)).double()
        pf = calibrator.probabilities(zf.numpy())
        assert r["accuracy"] == pytest.approx(float((pf.argmax(1) == test.y).mean()))
        assert r["mean_confidence"] == pytest.approx(float(pf.max(1).mean()), abs=1e-6)
        assert r["ece"] == pytest.approx(expected_calibration_error(pf, test.y), abs=1e-6)
    # ... and the model card's calibration line says it
    from patchflannel.ensemble_run import _measured_figures

    line = _measured_figures(out)["Calibration (test)"]
    first = per_fold[0]
    assert f"one fold model alone: {first['mean_confidence']:.3f} vs {first['accuracy']:.3f}" in line


def _no_plots(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reruns skip the figures (a third of a run's time); the numbers are what they compare."""
    import patchflannel.ensemble_run as er

    monkeypatch.setattr(er, "_plots", lambda *args, **kwargs: None)


def test_rerun_with_other_test_labels_trains_the_same(ran: tuple[list[Path], Path, dict[str, Any]],
                                                      tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The test votes never influence training; rerunning over an existing output folder rewrites it."""
    runs, out, results = ran
    _no_plots(monkeypatch)
    flipped = (np.load(runs[0] / "good" / "test.npz")["y"] + 1) % 4
    out2 = tmp_path / "out"
    shutil.copytree(out, out2)  # an earlier run's output is overwritten in place
    table_before = (out2 / "table.md").read_text()
    results2 = run_ensemble(CFG, make_runs(tmp_path, test_labels=flipped), out2)
    a, b = load_file(out / "flannel" / "model.safetensors"), load_file(out2 / "flannel" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # Every combiner, every seed: same best epochs, validation scores, class weights.
    assert [r.get("fit") for r in results["rows"]] == [r.get("fit") for r in results2["rows"]]
    assert json.loads((out / "split.json").read_text()) == json.loads((out2 / "split.json").read_text())
    # The temperature is fitted on out-of-fold votes only.
    assert results["calibration"]["temperature"] == results2["calibration"]["temperature"]
    # ... while the test metrics did change, and the files say so.
    good = [{r["name"]: r for r in res["rows"]}["good"]["summary"]["macro_f1"]["mean"] for res in (results, results2)]
    assert good[0] != good[1]
    assert (out2 / "table.md").read_text() != table_before
    on_disk = json.loads((out2 / "results.json").read_text())
    assert on_disk["rows"] == json.loads(json.dumps(results2["rows"]))
    np.testing.assert_array_equal(np.load(out2 / "predictions_test.npz")["y"], flipped)  # ids t000… are in order
    assert not list(out2.rglob("*.tmp"))


# --------------------------------------------------------------------------- export


def _prepared(n: int = 2) -> Prepared:
    g = torch.Generator().manual_seed(5)
    work = torch.randint(0, 256, (n, 1, 1024, 1024), dtype=torch.uint8, generator=g)
    masks = torch.zeros(n, 1, 1024, 1024, dtype=torch.bool)
    masks[:, :, 200:800, 150:450] = True
    masks[:, :, 220:780, 580:880] = True
    q = MaskQuality(lung_fraction=0.3, components=2, removed=0, balance=1.0, suspicious=False, reason="")
    return Prepared(work, masks, [q] * n, [(1024, 1024)] * n)


def _expected_P(runs: list[Path], prep: Prepared, k: int, seed: int) -> torch.Tensor:
    """Each patch learner's distribution from its fold models, computed from the run folders directly."""
    seeds = [image_seed(w, seed) for w in prep.work[:, 0].numpy()]
    folders = {"good": runs[0] / "good", "noisy": runs[0] / "noisy", "anti": runs[1] / "anti"}
    per = []
    for name in PATCH_LEARNERS:
        dists = []
        for f in range(F):
            m = Learner.from_pretrained(folders[name] / f"fold{f}" / "best")
            x, _, _ = make_inputs(prep.work, prep.masks, m.input_spec, k, seeds=seeds)
            dists.append(vote(predict_distribution(m, x))[1])
        per.append(torch.stack(dists).mean(0))
    return torch.stack(per, dim=1)


@pytest.fixture(scope="module")
def exported(ran: tuple[list[Path], Path, dict[str, Any]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ensemble run exported with float32 learners, over a folder left by an earlier export."""
    dest = tmp_path_factory.mktemp("export") / "clf"
    dest.mkdir()
    (dest / "stale.txt").write_text("from an earlier export")
    assert export_classifier(ran[1], dest, members="folds", half=False) == dest
    return dest


def test_export_classifier_round_trip(ran: tuple[list[Path], Path, dict[str, Any]], exported: Path,
                                      segmenter_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    runs, out, _ = ran
    dest = exported
    assert not (dest / "stale.txt").exists(), "the destination must be replaced whole"
    cfg = json.loads((dest / "config.json").read_text())
    assert cfg["task"] == "cxr_classifier" and cfg["classes"] == CLASSES and cfg["learners"] == PATCH_LEARNERS
    assert cfg["members"] == {n: ["fold0", "fold1"] for n in PATCH_LEARNERS}
    assert cfg["defaults"]["k"] == K and cfg["training"]["members"] == "folds"
    # run folders recorded as given: relative to the working directory when inside it, else absolute
    assert [Path(r).resolve() for r in cfg["training"]["runs"]] == [r.resolve() for r in runs]
    assert Path(cfg["training"]["ensemble_dir"]).resolve() == out.resolve()
    measured = cfg["training"]["results"]  # what ensemble measured travels with the weights
    assert any(k.startswith("Held-out test part") and v.startswith("macro-F1 ") for k, v in measured.items())
    assert any(k.startswith("All ") and "within-adult COVID-vs-rest AUC" in v for k, v in measured.items())
    calibration = json.loads((out / "calibration.json").read_text())
    assert cfg["calibration"]["kind"] == "temperature"
    assert cfg["calibration"]["temperature"] == pytest.approx(calibration["temperature"])

    with caplog.at_level(logging.WARNING, logger="patchflannel"):
        clf = Classifier.from_pretrained(dest, segmenter=str(segmenter_dir))
    assert not [r for r in caplog.records if "another lung segmenter" in r.getMessage()]
    assert clf.names == tuple(PATCH_LEARNERS) and clf.classes == tuple(CLASSES) and clf.default_k == K
    assert clf.calibrator.temperature == pytest.approx(calibration["temperature"])
    assert all(m.input_spec == SPEC and len(ms) == F for ms in clf.learners.values() for m in ms)
    # The combiner is the ensemble run's FLANNEL, tensor for tensor.
    flannel, _ = load_flannel(out / "flannel")
    for key, value in flannel.state_dict().items():
        assert torch.equal(clf.combiner.state_dict()[key], value), key

    # The learners' distributions are the mean over each learner's fold models, crops drawn per image.
    prep, k, seed = _prepared(), 3, 11
    P, centres, _ = clf.learner_distributions(prep, k, seed)
    torch.testing.assert_close(P, _expected_P(runs, prep, k, seed), atol=1e-6, rtol=1e-5)
    assert centres.shape == (2, k, 2)
    probs, raw, w = clf.combine(P)
    with torch.no_grad():
        z, w_ref = flannel(P)
    np.testing.assert_allclose(raw, torch.softmax(z.double(), 1).numpy(), atol=1e-6)
    np.testing.assert_allclose(probs, torch.softmax(z.double() / calibration["temperature"], 1).numpy(), atol=1e-6)
    np.testing.assert_allclose(w, w_ref.double().numpy(), atol=1e-6)
    np.testing.assert_array_equal(probs.argmax(1), raw.argmax(1))


def test_export_half_and_segmenter_object(ran: tuple[list[Path], Path, dict[str, Any]], segmenter_dir: Path,
                                          tmp_path: Path) -> None:
    runs, out, _ = ran
    dest = export_classifier(out, tmp_path / "clf")  # default: float16 learners
    member = dest / "learners" / "anti" / "fold1"
    with safe_open(str(member / "model.safetensors"), "pt") as fh:
        assert {fh.get_tensor(k).dtype for k in fh.keys() if fh.get_tensor(k).is_floating_point()} == {torch.float16}
    assert json.loads((member / "config.json").read_text())["stored_dtype"] == "float16"
    clf = Classifier.from_pretrained(dest, segmenter=LungSegmenter.from_pretrained(segmenter_dir, backend="auto"))
    assert clf.segmenter.backend == "torch"  # a classifier's masks are the training cache's: PyTorch U-Net only
    original = Learner.from_pretrained(runs[1] / "anti" / "fold1" / "best")
    loaded = clf.learners["anti"][1]
    assert loaded.info["member"] == "fold1"
    for key, value in original.state_dict().items():
        v = loaded.state_dict()[key]
        assert v.dtype == value.dtype, key  # loaded back as float32
        if value.is_floating_point():
            assert torch.equal(v, value.half().float()), key


def test_export_refit_members_and_their_card_lines(ran: tuple[list[Path], Path, dict[str, Any]],
                                                   tmp_path: Path) -> None:
    """members=refit ships each learner's one refit model, and the config does not present the fold
    models' test figures (what `ensemble` measured) as the exported classifier's."""
    runs, out, _ = ran
    learners = [d for run in runs for d in run.iterdir() if (d / "fold0" / "best").is_dir()]
    saved = {d: (d / "test.npz").read_bytes() for d in learners}
    try:
        for learner in learners:
            shutil.copytree(learner / "fold0" / "best", learner / "refit" / "best")  # stands in for a refit model
        # refit/ without refit votes in test.npz is not a finished refit: refused
        with pytest.raises(DataError, match="no finished refit model"):
            export_classifier(out, tmp_path / "unfinished", members="refit")
        # ... and the default (auto) takes the fold models then
        unfinished = json.loads((export_classifier(out, tmp_path / "auto_unfinished") / "config.json").read_text())
        assert unfinished["training"]["members"] == "folds"
        for learner in learners:
            with np.load(learner / "test.npz") as z:
                votes = {k: z[k] for k in z.files}
            np.savez(learner / "test.npz", **votes, soft_refit=votes["soft"][:, 0])
        dest = export_classifier(out, tmp_path / "clf", members="refit")
        # the default (auto) takes the refit models once every learner has finished one
        auto = json.loads((export_classifier(out, tmp_path / "clf_auto") / "config.json").read_text())
        assert auto["training"]["members"] == "refit"
        # one learner's refit votes without its weights (e.g. a partly copied run): auto falls back to the folds
        (learners[0] / "refit" / "best").rename(learners[0] / "refit" / "moved")
        partial = json.loads((export_classifier(out, tmp_path / "clf_partial") / "config.json").read_text())
        assert partial["training"]["members"] == "folds"
    finally:
        for learner, raw in saved.items():
            shutil.rmtree(learner / "refit", ignore_errors=True)
            (learner / "test.npz").write_bytes(raw)
    cfg = json.loads((dest / "config.json").read_text())
    assert cfg["training"]["members"] == "refit"
    assert set(cfg["members"]) == set(cfg["learners"]) and all(m == ["refit"] for m in cfg["members"].values())
    results = cfg["training"].get("results", {})
    assert not any(k.endswith("as shipped") for k in results) and "Calibration (test)" not in results
    assert "predict" in results["Held-out test part, refit members"]
    assert "test_macro_f1" not in cfg["training"]["combiner"]
    from patchflannel.card import classifier_section

    assert "1 model refit on every non-test image" in classifier_section("clf", cfg)
    folds = json.loads((export_classifier(out, tmp_path / "clf_folds") / "config.json").read_text())
    assert folds["training"]["members"] == "folds"   # auto, with no refit model left: the fold models
    assert any(k.endswith("as shipped") for k in folds["training"]["results"])


def test_export_refuses_unsafe_or_missing_members(ran: tuple[list[Path], Path, dict[str, Any]],
                                                  tmp_path: Path) -> None:
    _, out, _ = ran
    with pytest.raises(ConfigError, match="members"):
        export_classifier(out, tmp_path / "a", members="all")
    # No refit models were trained in these runs.
    with pytest.raises(DataError, match="refit"):
        export_classifier(out, tmp_path / "b", members="refit")
    assert not (tmp_path / "b").exists()
    with pytest.raises(DataError, match="not an ensemble output folder"):
        export_classifier(tmp_path, tmp_path / "c")

    # A crafted combiner config naming a learner outside the runs must not be followed.
    crafted = tmp_path / "crafted"
    shutil.copytree(out, crafted)
    cfg_path = crafted / "flannel" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    for bad in ("../runA/anti", "runB/anti", ".hidden"):
        cfg["learners"] = ["good", "noisy", bad]
        cfg_path.write_text(json.dumps(cfg))
        with pytest.raises(DataError, match="not a safe file name"):
            export_classifier(crafted, tmp_path / "d")
        assert not (tmp_path / "d").exists()


def test_classifier_folder_with_unsafe_learner_name_is_refused(exported: Path, segmenter_dir: Path,
                                                               tmp_path: Path) -> None:
    dest = tmp_path / "clf"
    shutil.copytree(exported, dest)
    cfg_path = dest / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["learners"][0] = "../good"
    cfg["members"]["../good"] = cfg["members"].pop("good")
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match="not a safe file name"):
        Classifier.from_pretrained(dest, segmenter=str(segmenter_dir))


def test_shipped_configuration_has_bootstrap_cis(ran: tuple[list[Path], Path, dict[str, Any]]) -> None:
    """The row predict ships (FLANNEL on the mean of fold models) is reported with patient-level
    bootstrap CIs recomputable from predictions_test.npz, and paired against soft voting."""
    from sklearn.metrics import f1_score

    _, out, results = ran
    ship = results["shipped_configuration"]
    pred = np.load(out / "predictions_test.npz")
    m = ship["rows"]["flannel_focal"]["macro_f1"]
    assert m["value"] == pytest.approx(f1_score(pred["y"], pred["proba_flannel_focal"].argmax(1), average="macro"), abs=1e-9)
    assert m["ci_low"] <= m["value"] <= m["ci_high"] and m["ci_high"] - m["ci_low"] > 0
    d = ship["paired"]["flannel_focal - soft_voting"]["macro_f1"]
    assert d["diff"] == pytest.approx(m["value"] - ship["rows"]["soft_voting"]["macro_f1"]["value"], abs=1e-12)
    assert 0 <= d["p"] <= 1
    text = (out / "table_shipped.md").read_text()
    assert "(shipped)" in text and f"{m['value']:.3f} [{m['ci_low']:.3f}, {m['ci_high']:.3f}]" in text
    assert "Within-adult" in text and "per source, age group, view" in text
    assert set(ship["strata"]) == {"source", "age_group", "view"} and "within_adults" in ship["confound"]
    views = np.load(next(out.parent.rglob("test.npz")))["views"]  # the view strata are the test images' views
    assert sorted(r["stratum"] for r in ship["strata"]["view"]) == sorted({v or "unknown" for v in views.astype(str)})


def test_inputs_all_combines_patch_and_global_learners(ran: tuple[list[Path], Path, dict[str, Any]],
                                                       tmp_path: Path) -> None:
    runs, _, _ = ran
    results = run_ensemble({**CFG, "inputs": "all"}, runs, tmp_path / "all")
    assert results["combined_learners"] == ["good", "noisy", "anti", "global-good"]
    fl = next(r for r in results["rows"] if r["key"] == "flannel_focal")
    assert fl["learners"] == results["combined_learners"]
    assert set(results["flannel_weights"]["per_learner"]) == {"good", "noisy", "anti", "global-good"}
    saved = json.loads((tmp_path / "all" / "flannel" / "config.json").read_text())
    assert saved["learners"] == ["good", "noisy", "anti", "global-good"] and saved["n_learners"] == 4
    # one global learner: its single row is there, a FLANNEL over it alone is not
    names = [r["name"] for r in results["rows"]]
    assert "global-good" in names and "FLANNEL over global learners (focal)" not in names
    # the best single learner is chosen among every learner the ensemble combines
    assert results["claims"]["best_single_learner"] == "good"  # the most accurate learner of the synthetic runs


def test_all_images_report_scores_every_image_out_of_fold(ran: tuple[list[Path], Path, dict[str, Any]],
                                                          tmp_path: Path) -> None:
    runs, out, results = ran
    rep = results["all_images"]
    assert rep["n_images"] == N_OOF + N_TEST and rep["n_out_of_fold"] == N_OOF
    assert (out / "all_images.md").is_file() and json.loads((out / "all_images.json").read_text())["n_images"] == N_OOF + N_TEST
    assert (out / "all_images_strata.png").stat().st_size > 10_000  # accuracy per stratum, p_covid by group
    fl = rep["models"]["flannel_focal"]
    assert set(rep["models"]) >= {"flannel_focal", "soft_voting"}
    # Adult non-COVID images over both parts: the synthetic data has ~30 % adults among non-COVID.
    ages = np.concatenate([np.load(runs[0] / "good" / f)["age_groups"] for f in ("oof.npz", "test.npz")])
    ys = np.concatenate([np.load(runs[0] / "good" / f)["y"] for f in ("oof.npz", "test.npz")])
    assert fl["adult_non_covid_called_covid"]["n"] == int(((ages == "adult") & (ys != 3)).sum())
    wa = fl["confound"]["within_adults"]
    assert wa["n"] == int((ages == "adult").sum()) and 0.0 <= wa["ci_low"] <= wa["value"] <= wa["ci_high"] <= 1.0
    parts = {r["stratum"]: r["n"] for r in fl["strata"]["part"]}
    assert parts == {"out-of-fold": N_OOF, "test": N_TEST}
    assert "external" not in fl  # no train-only hold-out in these runs
    # With a held-out train-only part (external.npz for every learner) its calls are counted.
    copies = [tmp_path / r.name for r in runs]
    for src, dst in zip(runs, copies):
        shutil.copytree(src, dst)
    rng = np.random.default_rng(5)
    for d in copies:
        for learner in d.iterdir():
            if (learner / "oof.npz").is_file():
                soft = rng.dirichlet(np.ones(4), (7, F)).astype(np.float32)
                np.savez(learner / "external.npz", ids=np.array([f"e{i}" for i in range(7)]), soft=soft,
                         y=np.zeros(7, np.int64), classes=np.array(CLASSES))
    res2 = run_ensemble({**CFG, "seeds": 1}, copies, tmp_path / "out2")
    ext = res2["all_images"]["models"]["flannel_focal"]["external"]
    assert ext["n"] == 7 and sum(ext["predicted"].values()) == 7
