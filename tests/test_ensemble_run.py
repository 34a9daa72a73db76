"""Tests for patchflannel.ensemble_run: loading and aligning votes, the comparison rows,
outputs, the saved FLANNEL model, and that the test votes never influence training."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from patchflannel.ensemble_run import load_flannel, load_votes, run_ensemble, source_confound

torch.set_num_threads(1)

CLASSES = ["normal", "bacteria", "virus", "covid"]
PEDIATRIC = "kaggle-chest-xray-pneumonia (pediatric, Guangzhou)"
ADULT_COVID = "ieee8023/covid-chestxray-dataset (adult)"
ADULT_OTHER = "Actualmed-COVID-chestxray-dataset (adult)"
N_OOF, N_TEST, F, K = 120, 40, 2, 20
# Small but real training: every row trains 2 seeds; the whole module runs in a few seconds.
CFG = {"seeds": 2, "epochs": 40, "patience": 10, "lr": 0.01, "batch_size": 32, "gamma": 3.0}
PATCH_ROWS = ["good", "noisy", "anti", "soft voting", "hard voting", "stacking MLP (1 layer)",
              "stacking MLP (2 layers)", "FLANNEL (focal γ=3)", "FLANNEL (CE)", "FLANNEL (CE + resampling)",
              "FLANNEL (weighted CE β=2)"]
ALL_ROWS = PATCH_ROWS + ["global-good", "FLANNEL over global learners (focal)"]


# --------------------------------------------------------------------------- synthetic runs


def _images(rng: np.random.Generator, n: int, prefix: str) -> dict[str, np.ndarray]:
    y = rng.choice(4, size=n, p=[0.35, 0.3, 0.2, 0.15])
    y[:4] = [0, 1, 2, 3]  # every class present
    adult_other = rng.random(n) < 0.3
    sources = np.where(y == 3, ADULT_COVID, np.where(adult_other, ADULT_OTHER, PEDIATRIC))
    return {"ids": np.array([f"{prefix}{i:03d}" for i in range(n)]), "y": y.astype(np.int64),
            "patients": np.array([f"{prefix}p{i // 2}" for i in range(n)]), "sources": sources}


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
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    k = 1 if kind == "global" else K
    soft, hard = _dist(rng, _decide(rng, oof["y"], kind), kind)
    np.savez(folder / "oof.npz", **oof, fold=np.arange(len(oof["y"])) % n_folds, soft=soft, hard=hard,
             classes=np.array(CLASSES), k=np.array(k))
    decided = _decide(rng, test["y"], kind)
    per_fold = [_dist(rng, decided, kind) for _ in range(n_folds)]
    np.savez(folder / "test.npz", **test, soft=np.stack([s for s, _ in per_fold], 1),
             hard=np.stack([h for _, h in per_fold], 1), classes=np.array(CLASSES), k=np.array(k))


def make_runs(root: Path, test_labels: np.ndarray | None = None) -> list[Path]:
    """Two train-patch run layouts: runA = good, noisy; runB = anti, global-good."""
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
    (run_a / "good" / "fold0").mkdir()  # learner subfolders and stray folders must not confuse discovery
    (run_b / "logs").mkdir()
    return [run_a, run_b]


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("ens")
    runs = make_runs(root)
    out = root / "out"
    seen: list[str] = []

    def track(it: Any, description: str = "", total: int | None = None) -> Any:
        seen.append(description)
        return it

    results = run_ensemble(CFG, runs, out, track=track)
    assert seen, "track was never used"
    return runs, out, results


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


def test_mismatched_ids_raise(tmp_path: Path) -> None:
    runs = make_runs(tmp_path)
    path = runs[1] / "anti" / "oof.npz"
    with np.load(path) as z:
        d = {k: z[k] for k in z.files}
    d["ids"] = d["ids"].copy()
    d["ids"][:3] = ["x1", "x2", "x3"]
    np.savez(path, **d)
    with pytest.raises(ValueError, match=r"'anti'.*3 missing, 3 extra"):
        load_votes(runs)
    with pytest.raises(ValueError, match="not found"):
        load_votes(runs, learners=["nope"])


def test_different_fold_counts_raise(tmp_path: Path) -> None:
    runs = make_runs(tmp_path)
    rng = np.random.default_rng(0)
    oof, test = _images(rng, N_OOF, "o"), _images(rng, N_TEST, "t")
    write_learner(runs[1] / "three", "good", oof, test, 5, n_folds=3)
    with pytest.raises(ValueError, match="'three'.*3 fold models"):
        load_votes(runs)


# --------------------------------------------------------------------------- outputs


def test_outputs_and_rows(ran: tuple[list[Path], Path, dict[str, Any]]) -> None:
    _, out, results = ran
    for name in ("config.yaml", "split.json", "table.md", "results.json", "results.csv", "claims.md",
                 "predictions_test.npz", "flannel.safetensors", "flannel.json", "confusion_flannel_focal.png",
                 "confusion_best_single.png", "roc_pr_covid.png", "weights_flannel_focal.png",
                 "history_flannel_focal.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert not list(out.glob(".*.tmp")), "temp file left behind"
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
    assert set(on_disk["flannel_weights"]["per_learner"]) == {"good", "noisy", "anti"}
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert csv_lines[0] == "model,key,metric,mean,std,n"
    assert sum(line.startswith("FLANNEL (CE),") for line in csv_lines) == len(on_disk["rows"][0]["summary"])


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


# --------------------------------------------------------------------------- saved model and leakage


def test_saved_flannel_reproduces_predictions(ran: tuple[list[Path], Path, dict[str, Any]]) -> None:
    _, out, _ = ran
    model, sidecar = load_flannel(out / "flannel.safetensors")
    assert sidecar["task"] == "flannel_ensemble" and sidecar["learners"] == ["good", "noisy", "anti"]
    assert sidecar["n_learners"] == 3 and sidecar["n_classes"] == 4 and sidecar["classes"] == CLASSES
    assert sidecar["k"] == K and sidecar["gamma"] == 3.0 and sidecar["distribution"] == "soft"
    assert len(sidecar["alpha"]) == 4 and abs(sum(sidecar["alpha"]) - 1) < 1e-6
    assert len(sidecar["source_runs"]) == 2 and "mean" in sidecar["test_macro_f1"]
    pred = np.load(out / "predictions_test.npz")
    P = torch.as_tensor(pred["P_mean_of_fold_models"][:, :3])
    with torch.no_grad():
        z, w = model(P)
    np.testing.assert_allclose(torch.softmax(z.double(), 1).numpy(), pred["proba_flannel_focal"], atol=1e-6)
    np.testing.assert_allclose(w.numpy(), pred["flannel_focal_weights"], atol=1e-6)


def test_test_labels_do_not_change_training(ran: tuple[list[Path], Path, dict[str, Any]], tmp_path: Path) -> None:
    runs, out, results = ran
    flipped = (np.load(runs[0] / "good" / "test.npz")["y"] + 1) % 4
    out2 = tmp_path / "out"
    results2 = run_ensemble(CFG, make_runs(tmp_path, test_labels=flipped), out2)
    a, b = load_file(out / "flannel.safetensors"), load_file(out2 / "flannel.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # Every combiner, every seed: same best epochs, validation scores, class weights.
    assert [r.get("fit") for r in results["rows"]] == [r.get("fit") for r in results2["rows"]]
    assert json.loads((out / "split.json").read_text()) == json.loads((out2 / "split.json").read_text())
    # ... while the test metrics did change.
    good = [{r["name"]: r for r in res["rows"]}["good"]["summary"]["macro_f1"]["mean"] for res in (results, results2)]
    assert good[0] != good[1]


def test_rerun_is_idempotent(ran: tuple[list[Path], Path, dict[str, Any]]) -> None:
    runs, out, _ = ran
    before = (out / "table.md").read_text()
    run_ensemble({**CFG, "learners": ["good", "noisy", "anti", "global-good"]}, runs, out)
    assert (out / "table.md").read_text() == before
    assert not list(out.glob(".*.tmp"))
