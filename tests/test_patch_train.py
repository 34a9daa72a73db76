"""Patch-learner training: config validation, real records and grouped splits, the cache's data fingerprint,
and one small real end-to-end `train_patch_run` on a tiny cache of real radiographs."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml

from patchflannel.config import load_config, validate_config
from patchflannel.data import (
    CLASSES,
    Record,
    build_cache,
    check_grouped,
    find_duplicates,
    load_cache,
    load_records,
    make_splits,
    merge_groups,
    subsample_groups,
)
from patchflannel.errors import ConfigError, DataError, ResumeError
from patchflannel.patch_train import PatchTrainConfig

SEG = "lung_unet_jsrt"  # a shipped one-output scr U-Net (the shipped classifier uses lung_unet_v7)
LEARNER = "mobilenet_v3_small"


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize("raw,key,valid", [
    ({"train": {"epochz": 3}}, "train.epochz", ["epochs", "patience", "batch_size", "refit"]),
    ({"trian": {"epochs": 3}}, "trian", ["seed", "data", "split", "input", "learners", "k", "train"]),
    ({"input": {"patch_sise": 64}}, "input.patch_sise", ["patch_size", "learner_input", "mask_outside"]),
])
def test_config_typo_names_the_valid_keys(raw: dict, key: str, valid: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        validate_config(PatchTrainConfig, raw, "test.yaml")
    msg = str(info.value)
    assert msg.startswith("test.yaml: ") and f"unknown key '{key}'" in msg
    listed = msg.split("valid keys:")[1]
    assert all(v in listed for v in valid), msg


def test_config_values_are_checked() -> None:
    with pytest.raises(ConfigError, match="multiple of learner_input"):
        validate_config(PatchTrainConfig, {"input": {"patch_size": 224, "learner_input": 100}}, "x")
    with pytest.raises(ConfigError, match="unknown learner"):
        validate_config(PatchTrainConfig, {"learners": ["alexnet9000"]}, "x")
    with pytest.raises(ConfigError, match="split.folds"):
        validate_config(PatchTrainConfig, {"split": {"folds": 1}}, "x")
    with pytest.raises(ConfigError, match="train.epochs"):
        load_config(PatchTrainConfig, "patch_cpu", sets=["train.epochs=0"])


def test_ablation_and_learning_curve_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="exclude each other"):
        validate_config(PatchTrainConfig, {"input": {"mask_global": True, "blank_lungs_global": True}}, "x")
    with pytest.raises(ConfigError, match="train.refit=false"):
        validate_config(PatchTrainConfig, {"split": {"train_fraction": 0.5}}, "x")
    with pytest.raises(ConfigError, match="train_fraction"):
        validate_config(PatchTrainConfig, {"split": {"train_fraction": 0}, "train": {"refit": False}}, "x")
    ok = validate_config(PatchTrainConfig, {"split": {"train_fraction": 0.5}, "train": {"refit": False}}, "x")
    assert ok.split.train_fraction == 0.5


def test_subsample_groups_keeps_whole_patients_a_class_share_and_nests() -> None:
    rng = np.random.default_rng(0)
    groups = [f"p{i // 2}" for i in range(600)]  # two images per patient
    labels = np.repeat(rng.integers(0, 4, 300), 2)  # a patient's images share the label
    idx = list(range(0, 600))
    for frac, share in ((1 / 3, 1 / 3), (0.5, 0.5), (2 / 3, 2 / 3)):
        kept = subsample_groups(idx, labels, groups, frac, seed=3)
        assert kept == subsample_groups(idx, labels, groups, frac, seed=3)  # seeded
        assert abs(len(kept) / 600 - share) < 0.03
        assert {groups[i] for i in kept}.isdisjoint({groups[i] for i in set(idx) - set(kept)})  # patients whole
        for c in range(4):  # stratified by class
            assert abs(np.mean(labels[kept] == c) - np.mean(labels == c)) < 0.03
    small, large = (set(subsample_groups(idx, labels, groups, f, seed=3)) for f in (0.25, 0.7))
    assert small < large  # nested: a learning curve's smaller points are subsets of its larger ones
    assert subsample_groups(idx, labels, groups, 1.0, seed=0) == idx
    with pytest.raises(DataError, match="train_fraction"):
        subsample_groups(idx, labels, groups, 1.5 - 2, seed=0)


def test_subset_seed_draws_other_patients_and_defaults_to_seed() -> None:
    from patchflannel.patch_train import learning_curve_subset

    groups = [f"p{i // 2}" for i in range(400)]
    labels = np.repeat(np.arange(200) % 4, 2)
    idx = list(range(400))

    def kept(**split: object) -> set[int]:
        cfg = validate_config(PatchTrainConfig, {"seed": 5, "split": {"train_fraction": 0.5, **split},
                                                 "train": {"refit": False}}, "x")
        return set(learning_curve_subset(idx, labels, groups, cfg, fold=1))

    assert kept() == kept(subset_seed=5) == set(subsample_groups(idx, labels, groups, 0.5, seed=6))
    other = kept(subset_seed=9)
    assert other != kept() and len(other) == len(kept())  # another draw of the same size
    full = validate_config(PatchTrainConfig, {}, "x")
    assert learning_curve_subset(idx, labels, groups, full, fold=0) == idx  # no share, no draw
    with pytest.raises(ConfigError, match="subset_seed"):  # a draw without a share would change nothing
        validate_config(PatchTrainConfig, {"split": {"subset_seed": 9}}, "x")
    with pytest.raises(ConfigError, match="subset_seed"):
        validate_config(PatchTrainConfig, {"split": {"train_fraction": 0.5, "subset_seed": -1}, "train": {"refit": False}}, "x")


@pytest.mark.parametrize("name", ["patch_cpu", "patch_paper"])
def test_shipped_configs_validate_and_take_overrides(name: str) -> None:
    cfg = load_config(PatchTrainConfig, name, sets=["train.epochs=2", f"learners=[{LEARNER}]"])
    assert cfg.train.epochs == 2 and cfg.learners == [LEARNER]
    assert cfg.input.patch_size % cfg.input.learner_input == 0


@pytest.mark.parametrize("rule", ["none", "class", "class_age", "class_source"])
def test_sample_weights_balance_what_they_name(rule: str) -> None:
    from types import SimpleNamespace

    from patchflannel.patch_train import sample_weights

    # class 0: 90 pediatric images of source A, 10 adult of B; class 1: 30 adult of B, 10 adult of C
    labels = np.array([0] * 100 + [1] * 40)
    sources = ["A"] * 90 + ["B"] * 40 + ["C"] * 10
    ages = ["pediatric"] * 90 + ["adult"] * 50
    data = SimpleNamespace(labels=labels, sources=sources, age_groups=ages)
    idx = list(range(140))
    w = sample_weights(data, idx, rule)  # type: ignore[arg-type]
    if rule == "none":
        assert w is None
        return
    assert w.shape == (140,) and (w > 0).all()

    def mass(sel: np.ndarray) -> float:
        return float(w[sel].sum() / w.sum())

    src = np.array(sources)
    if rule == "class":  # each class half the mass
        assert mass(labels == 0) == pytest.approx(0.5) and mass(labels == 1) == pytest.approx(0.5)
    elif rule == "class_age":  # each (class, age group) cell the same mass: 3 cells
        assert mass((labels == 0) & (src == "A")) == pytest.approx(1 / 3)
        assert mass(labels == 1) == pytest.approx(1 / 3)
    else:  # each class half, shared equally by its sources
        for c, s in [(0, "A"), (0, "B"), (1, "B"), (1, "C")]:
            assert mass((labels == c) & (src == s)) == pytest.approx(0.25), (c, s)


# --------------------------------------------------------------------------- real records and splits


@pytest.fixture(scope="module")
def records(cxr_dir: Path) -> list[Record]:
    return load_records([cxr_dir])


@pytest.mark.data
def test_real_records(records: list[Record]) -> None:
    assert len(records) == 965
    assert len({r.patient_id for r in records}) == 776
    assert {r.label for r in records} == set(CLASSES)
    assert min(Counter(r.label for r in records).values()) > 100
    assert len({r.image_id for r in records}) == len(records)
    assert all(r.file.is_file() for r in records)
    assert {r.age_group for r in records} <= {"adult", "pediatric", ""}


@pytest.mark.data
def test_real_split_is_grouped_stratified_and_complete(records: list[Record]) -> None:
    labels = np.array([CLASSES.index(r.label) for r in records])
    groups = [r.patient_id for r in records]
    split = make_splits(labels, groups, seed=0, test_frac=0.2, n_folds=3)
    parts = [split["test"], *split["folds"]]
    assert sorted(i for p in parts for i in p) == list(range(len(records)))  # every image exactly once
    owner: dict[str, int] = {}
    for k, part in enumerate(parts):
        for i in part:
            assert owner.setdefault(groups[i], k) == k, f"patient {groups[i]} in parts {owner[groups[i]]} and {k}"
    assert 0.15 < len(split["test"]) / len(records) < 0.25
    for part in parts:
        assert set(labels[part]) == {0, 1, 2, 3}
    assert make_splits(labels, groups, seed=0, test_frac=0.2, n_folds=3) == split  # seeded


def test_check_grouped_refuses_a_patient_in_two_parts() -> None:
    check_grouped({"test": [0], "folds": [[1], [2]]}, ["a", "b", "c"])
    with pytest.raises(DataError, match="patient a"):
        check_grouped({"test": [0], "folds": [[1], [2]]}, ["a", "a", "c"])


def test_near_duplicates_of_different_patients_are_split_together() -> None:
    rng = np.random.default_rng(0)
    n = 48
    thumbs = rng.standard_normal((n, 64 * 64)).astype(np.float32)
    thumbs = (thumbs - thumbs.mean(1, keepdims=True)) / thumbs.std(1, keepdims=True)
    groups = [f"p{i}" for i in range(n)]
    # image 5 re-uploaded as image 30 under another patient id (slightly recompressed)
    thumbs[30] = thumbs[5] + 0.01 * rng.standard_normal(64 * 64).astype(np.float32)
    thumbs[30] = (thumbs[30] - thumbs[30].mean()) / thumbs[30].std()
    pairs = find_duplicates(thumbs, groups)
    assert [(i, j) for i, j, _ in pairs] == [(5, 30)] and pairs[0][2] > 0.99
    merged = merge_groups(groups, pairs)
    assert merged[5] == merged[30] == "p30" and len(set(merged)) == n - 1
    labels = np.arange(n) % 4
    labels[30] = labels[5]
    for seed in range(5):
        split = make_splits(labels, merged, seed=seed, test_frac=0.25, n_folds=2)
        part = {i: k for k, p in enumerate([split["test"], *split["folds"]]) for i in p}
        assert part[5] == part[30]
    # a pair within one patient is no cross-patient duplicate
    assert find_duplicates(thumbs, ["p5" if i == 30 else g for i, g in enumerate(groups)]) == []


# --------------------------------------------------------------------------- tiny real cache


@pytest.fixture(scope="module")
def tiny(records: list[Record], tmp_path_factory: pytest.TempPathFactory, single_thread: None) -> dict:
    """A cache of 40 real radiographs (10 per class, distinct patients, smallest files first) plus one exact
    copy of an image under a new id and patient (a cross-patient duplicate), masks by the shipped U-Net."""
    from patchflannel._files import file_sha256
    from patchflannel.hub import resolve_weights
    from patchflannel.segment import LungSegmenter

    chosen: list[Record] = []
    seen: set[str] = set()
    for label in CLASSES:
        cands = sorted((r for r in records if r.label == label), key=lambda r: (r.file.stat().st_size, r.image_id))
        picked = []
        for r in cands:
            if r.patient_id not in seen:
                picked.append(r)
                seen.add(r.patient_id)
            if len(picked) == 10:
                break
        chosen += picked
    dup = dataclasses.replace(chosen[3], image_id="dup-" + chosen[3].image_id, patient_id="dup-patient")
    recs = chosen + [dup]
    seg_path = resolve_weights(SEG)
    sha = file_sha256(seg_path.with_suffix(".safetensors"))
    seg = LungSegmenter.from_pretrained(SEG)
    cache = tmp_path_factory.mktemp("cache") / "tiny.h5"
    path, errors = build_cache(recs, seg, cache, SEG, sha)
    return {"records": recs, "dup": (chosen[3].image_id, dup.image_id), "cache": path, "errors": errors, "sha": sha}


@pytest.mark.data
def test_cache_holds_every_image_with_lungs_and_finds_the_duplicate(tiny: dict) -> None:
    assert tiny["errors"] == []
    data = load_cache(tiny["cache"], tiny["records"], tiny["sha"])
    assert data.ids == [r.image_id for r in tiny["records"]]
    assert tuple(data.images.shape) == (41, 1, 1024, 1024) and str(data.images.dtype) == "torch.uint8"
    fractions = data.masks.float().mean(dim=(1, 2, 3))
    assert bool((fractions > 0.05).all()) and bool((fractions < 0.7).all())
    a, b = tiny["dup"]
    assert [(d["a"], d["b"]) for d in data.duplicates] == [(a, b)]
    ia, ib = data.ids.index(a), data.ids.index(b)
    assert data.patients[ia] != data.patients[ib] and data.groups[ia] == data.groups[ib]
    assert len(set(data.groups)) == 40
    undeduped = load_cache(tiny["cache"], tiny["records"], tiny["sha"], dedup=False)
    assert undeduped.groups[ia] != undeduped.groups[ib]


@pytest.mark.data
def test_cache_of_other_data_or_segmenter_is_refused(tiny: dict, records: list[Record]) -> None:
    recs = tiny["records"]
    relabelled = [dataclasses.replace(r, label="virus") if i == 0 else r for i, r in enumerate(recs)]
    assert relabelled[0].label != recs[0].label
    with pytest.raises(DataError, match="changed label") as info:
        load_cache(tiny["cache"], relabelled, tiny["sha"])
    assert "--rebuild" in str(info.value)
    extra = next(r for r in records if r.image_id not in {x.image_id for x in recs})
    with pytest.raises(DataError, match=r"1 images added.*--rebuild"):
        load_cache(tiny["cache"], recs + [extra], tiny["sha"])
    moved = [dataclasses.replace(r, patient_id="someone-else") if i == 1 else r for i, r in enumerate(recs)]
    with pytest.raises(DataError, match="changed patient id"):
        load_cache(tiny["cache"], moved, tiny["sha"])
    with pytest.raises(DataError, match="another lung segmenter.*--rebuild"):
        load_cache(tiny["cache"], recs, "0" * 64)
    # a subset of the cached images is fine: only those are loaded
    assert load_cache(tiny["cache"], recs[:5], tiny["sha"]).ids == [r.image_id for r in recs[:5]]


# --------------------------------------------------------------------------- end to end


@pytest.mark.data
@pytest.mark.slow
def test_train_patch_run_end_to_end_and_rerun_reuses_folds(tiny: dict, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from patchflannel import patch_train
    from patchflannel.patch_train import train_patch_run

    k = 4
    cfg = validate_config(PatchTrainConfig, {
        "seed": 0,
        "data": {"cache": str(tiny["cache"]), "segmenter": SEG},
        "split": {"test_frac": 0.25, "folds": 2, "val_frac": 0.34},
        "input": {"patch_size": 64, "learner_input": 32},
        "learners": [LEARNER], "k": k, "k_val": 2,
        "train": {"epochs": 1, "batch_size": 16, "patches_per_image": 4, "refit": True},
    }, "test")
    data = load_cache(tiny["cache"], tiny["records"], tiny["sha"])
    run = tmp_path / "run"
    res = train_patch_run(cfg, data, run)
    ldir = run / LEARNER
    for f in ("oof.npz", "test.npz", "metrics.json", "fold0/best/config.json", "fold1/best/model.safetensors",
              "refit/best/config.json", "confusion_test.png"):
        assert (ldir / f).is_file(), f

    split = json.loads((run / "split.json").read_text())
    oof, test = np.load(ldir / "oof.npz"), np.load(ldir / "test.npz")
    assert set(oof["ids"]).isdisjoint(test["ids"]) and len(oof["ids"]) + len(test["ids"]) == 41
    assert sorted(test["ids"]) == sorted(split["test"])
    assert oof["soft"].shape == (len(oof["ids"]), 4) and test["soft"].shape == (len(test["ids"]), 2, 4)
    assert test["soft_refit"].shape == (len(test["ids"]), 4)
    np.testing.assert_allclose(oof["soft"].sum(1), 1, atol=1e-5)
    np.testing.assert_allclose(test["soft"].sum(2), 1, atol=1e-5)
    np.testing.assert_allclose(oof["hard"] * k, np.round(oof["hard"] * k), atol=1e-4)  # fractions of K patches
    assert [str(c) for c in oof["classes"]] == list(CLASSES) and int(oof["k"]) == k
    np.testing.assert_array_equal(oof["y"], [CLASSES.index(r.label) for r in (
        next(x for x in tiny["records"] if x.image_id == i) for i in oof["ids"])])

    # out of fold: each image's fold model neither trained nor early-stopped on it, nor on a test image
    for f in (0, 1):
        fold_cfg = yaml.safe_load((ldir / f"fold{f}" / "config.yaml").read_text())
        seen = set(fold_cfg["train_ids"]) | set(fold_cfg["val_ids"])
        assert set(oof["ids"][oof["fold"] == f]) == set(split["folds"][f])
        assert seen.isdisjoint(split["folds"][f]) and seen.isdisjoint(split["test"])
    # the duplicate pair sits in one part of the split
    a, b = tiny["dup"]
    parts = [split["test"], *split["folds"]]
    assert [a in p for p in parts] == [b in p for p in parts]

    metrics = json.loads((ldir / "metrics.json").read_text())
    assert len(metrics["test_per_fold_model"]) == 2 and metrics["refit_epochs"] == 1
    assert 0 <= metrics["test_refit"]["macro_f1"] <= 1 and 0 <= metrics["oof"]["macro_f1"] <= 1
    assert res[LEARNER]["oof"]["macro_f1"] == metrics["oof"]["macro_f1"]

    # rerun: every fold and the refit are finished, so nothing trains and nothing votes again
    stamps = {p: p.stat().st_mtime_ns for p in ldir.rglob("*") if p.name in ("checkpoint.pt", "votes.npz", "history.csv")}
    assert len(stamps) == 9

    def no_votes(*args: object, **kwargs: object) -> None:
        raise AssertionError("votes were recomputed on a rerun")

    monkeypatch.setattr(patch_train, "votes", no_votes)
    again = train_patch_run(cfg, data, run)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    np.testing.assert_array_equal(np.load(ldir / "oof.npz")["soft"], oof["soft"])
    assert again[LEARNER]["test_refit"] == metrics["test_refit"]

    # a run folder of another config is refused
    other = cfg.model_copy(update={"k": k + 1})
    with pytest.raises(ResumeError, match="another config"):
        train_patch_run(other, data, run)
    assert os.path.getsize(ldir / "oof.npz") > 0

    # train longer: a larger train.epochs resumes every fold from its checkpoint (the folder is not refused),
    # votes are redone only for a fold whose best model changed, and the refit follows the new median best epoch
    monkeypatch.undo()
    import hashlib

    def digest(path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()

    before = {f: digest(ldir / f"fold{f}" / "best" / "model.safetensors") for f in (0, 1)}
    voted: list[str] = []
    real_votes = patch_train.votes

    def counting_votes(*args: object, **kwargs: object) -> object:
        voted.append(str(kwargs.get("what", "")))
        return real_votes(*args, **kwargs)

    monkeypatch.setattr(patch_train, "votes", counting_votes)
    longer = cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": 2, "patience": 5})})
    res2 = train_patch_run(longer, data, run)
    for f in (0, 1):
        hist = list(csv.DictReader((ldir / f"fold{f}" / "history.csv").open()))
        assert [int(h["epoch"]) for h in hist] == [1, 2]
        changed = digest(ldir / f"fold{f}" / "best" / "model.safetensors") != before[f]
        assert any(f"fold {f} " in w for w in voted) == changed, (f, changed, voted)
    assert json.loads((ldir / "metrics.json").read_text())["best_epochs"] == res2[LEARNER]["best_epochs"]
    assert res2[LEARNER]["refit_epochs"] == int(np.median(res2[LEARNER]["best_epochs"]))
    # epochs can be raised, not lowered; a full run is not cut down to a one-fold screen
    with pytest.raises(ResumeError, match="not lowered"):
        train_patch_run(cfg, data, run)
    screen = longer.model_copy(update={"split": longer.split.model_copy(update={"run_folds": [0]})})
    with pytest.raises(ResumeError, match="run_folds"):
        train_patch_run(screen, data, run)


@pytest.mark.data
@pytest.mark.slow
def test_refit_switched_on_for_a_finished_fold_run_adds_the_refit_model_only(tiny: dict, tmp_path: Path) -> None:
    """A fold run trained with train.refit=false can be given its refit model later: the folder is not
    refused, no fold model trains again (weights and history unchanged), and the refit model and its test
    votes are added. Any other change is still refused."""
    import hashlib

    from patchflannel.patch_train import train_patch_run

    cfg = validate_config(PatchTrainConfig, {
        "seed": 0,
        "data": {"cache": str(tiny["cache"]), "segmenter": SEG},
        "split": {"test_frac": 0.25, "folds": 2, "val_frac": 0.34},
        "input": {"patch_size": 64, "learner_input": 32},
        "learners": [LEARNER], "k": 2, "k_val": 2,
        "train": {"epochs": 1, "batch_size": 16, "patches_per_image": 4, "refit": False},
    }, "test")
    data = load_cache(tiny["cache"], tiny["records"], tiny["sha"])
    run, ldir = tmp_path / "run", tmp_path / "run" / LEARNER
    train_patch_run(cfg, data, run)
    assert not (ldir / "refit").exists() and "soft_refit" not in np.load(ldir / "test.npz").files

    def state() -> dict[str, str]:
        return {str(p.relative_to(ldir)): hashlib.sha256(p.read_bytes()).hexdigest()
                for f in (0, 1) for p in (ldir / f"fold{f}" / "best" / "model.safetensors", ldir / f"fold{f}" / "history.csv")}

    before = state()
    oof_before = np.load(ldir / "oof.npz")["soft"]
    with_refit = cfg.model_copy(update={"train": cfg.train.model_copy(update={"refit": True})})
    res = train_patch_run(with_refit, data, run)
    assert state() == before
    np.testing.assert_array_equal(np.load(ldir / "oof.npz")["soft"], oof_before)
    assert (ldir / "refit" / "best" / "model.safetensors").is_file() and res[LEARNER]["refit_epochs"] == 1
    assert np.load(ldir / "test.npz")["soft_refit"].shape == (len(np.load(ldir / "test.npz")["ids"]), 4)
    other = with_refit.model_copy(update={"train": with_refit.train.model_copy(update={"lr": 0.5})})
    with pytest.raises(ResumeError, match="another config"):
        train_patch_run(other, data, run)
    # switching it off again would leave refit/ behind, out of step with the folds: refused
    with pytest.raises(ResumeError, match="train.refit: True → False"):
        train_patch_run(cfg, data, run)


@pytest.mark.data
def test_predict_builds_the_training_inputs_bit_for_bit(tiny: dict) -> None:
    """What a learner was trained and voted on (the cache: work image, mask, crops) is exactly what
    `predict` builds from the same file: same work image and mask, same crop seeds, same crops."""
    import torch

    from patchflannel.io import read_image
    from patchflannel.learners import InputSpec, make_inputs
    from patchflannel.pipeline import image_seed, prepare
    from patchflannel.segment import LungSegmenter

    data = load_cache(tiny["cache"], tiny["records"], tiny["sha"])
    seg = LungSegmenter.from_pretrained(SEG)
    spec = InputSpec("patch", 224, 112, mask_outside=True)
    for i in (0, 17, 33):
        rec = tiny["records"][i]
        prep = prepare([read_image(rec.file)], seg)
        assert torch.equal(prep.work[0], data.images[i]) and torch.equal(prep.masks[0], data.masks[i])
        seed = image_seed(prep.work[0, 0].numpy(), 0)
        assert seed == image_seed(data.images[i, 0].numpy(), 0)
        x_pred, c_pred, _ = make_inputs(prep.work, prep.masks, spec, 16, seeds=[seed])
        x_train, c_train, _ = make_inputs(data.images[i:i + 1], data.masks[i:i + 1], spec, 16, seeds=[seed])
        assert torch.equal(c_pred, c_train) and torch.equal(x_pred, x_train)


def test_run_folders_from_before_an_added_key_still_resume() -> None:
    """A config key added later (split.train_fraction, split.subset_seed, input.blank_lungs_global) at its default hashes and compares
    as absent, so older run folders resume (and keep their cached votes); any other value is a change."""
    from patchflannel.config import ADDED_DEFAULTS, config_hash, diff_configs

    now = PatchTrainConfig().model_dump(mode="json")
    old = json.loads(json.dumps(now))
    for key in ADDED_DEFAULTS:
        section, name = key.split(".")
        del old[section][name]
    assert config_hash(old) == config_hash(now) and diff_configs(old, now) == []
    nested_old, nested_now = {"config": old, "learner": "x"}, {"config": now, "learner": "x"}  # a checkpoint's config
    assert config_hash(nested_old) == config_hash(nested_now) and diff_configs(nested_old, nested_now) == []
    changed = json.loads(json.dumps(now))
    changed["split"]["train_fraction"] = 0.5
    assert config_hash(changed) != config_hash(old)
    assert diff_configs(old, changed) == ["split.train_fraction: '<missing>' → 0.5"]
    assert "train_fraction" in now["split"]  # the callers' dicts are not changed
