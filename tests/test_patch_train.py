from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from patchflannel.cxr import CLASSES, check_grouped, load_records, make_splits
from patchflannel.patch_train import train_patch_run
from patchflannel.store import StoreWriter


def fake_store(path: Path, n: int = 48, size: int = 256) -> None:
    """Images whose class is drawn as a texture inside two lung ellipses; 2 images per patient."""
    rng = np.random.default_rng(0)
    with StoreWriter(path, size=size) as w:
        for i in range(n):
            label = CLASSES[i % 4]
            mask = np.zeros((size, size), np.uint8)
            cv2.ellipse(mask, (size * 3 // 10, size // 2), (size // 8, size // 4), 0, 0, 360, 1, -1)
            cv2.ellipse(mask, (size * 7 // 10, size // 2), (size // 8, size // 4), 0, 0, 360, 1, -1)
            img = rng.integers(60, 90, (size, size)).astype(np.uint8)
            img[mask > 0] = 20 + 40 * (i % 4)
            w.add(f"img{i:02d}", img, mask > 0, {"label": label, "patient_id": f"p{i // 8}-{i % 4}", "source": "fake"})


def test_splits_grouped_and_stratified() -> None:
    labels = np.repeat(np.arange(4), 30)
    groups = [f"p{i // 2}" for i in range(len(labels))]
    s = make_splits(labels, groups, seed=0, test_frac=0.2, n_folds=3)
    check_grouped(s, groups)
    assert 0.15 < len(s["test"]) / len(labels) < 0.25
    assert sorted(s["test"] + [i for f in s["folds"] for i in f]) == list(range(len(labels)))
    for part in [s["test"], *s["folds"]]:
        assert set(labels[part]) == {0, 1, 2, 3}
    bad = {"test": [0], "folds": [[1]]}
    with pytest.raises(AssertionError, match="patient"):
        check_grouped(bad, ["a", "a"])


def test_records_from_kaggle_and_ieee_layouts(tmp_path: Path) -> None:
    k = tmp_path / "chest_xray" / "train"
    (k / "NORMAL").mkdir(parents=True)
    (k / "PNEUMONIA").mkdir()
    for f in ("NORMAL/IM-0117-0001.jpeg", "NORMAL/NORMAL2-IM-1427-0001.jpeg", "PNEUMONIA/person1008_bacteria_2939.jpeg",
              "PNEUMONIA/person1008_virus_2940.jpeg"):
        (k / f).write_bytes(b"x")
    recs = load_records([tmp_path / "chest_xray"])
    assert {(r.label, r.patient_id) for r in recs} == {("normal", "kcx-IM-0117"), ("normal", "kcx-NORMAL2-IM-1427"),
                                                       ("bacteria", "kcx-person1008"), ("virus", "kcx-person1008")}
    ieee = tmp_path / "covid-chestxray-dataset"
    ieee.mkdir()
    (ieee / "metadata.csv").write_text(
        "patientid,finding,view,folder,filename\n"
        "1,COVID-19,PA,images,a.jpg\n2,Pneumonia/Bacterial/Streptococcus,AP,images,b.jpg\n"
        "3,SARS,PA,images,c.jpg\n4,No Finding,PA,images,d.jpg\n5,COVID-19,L,images,e.jpg\n6,Unknown,PA,images,f.jpg\n")
    recs = load_records([ieee])
    assert [(r.image_id, r.label) for r in recs] == [("ccx-a", "covid"), ("ccx-b", "bacteria"), ("ccx-c", "virus"),
                                                     ("ccx-d", "normal")]


@pytest.mark.slow
def test_train_patch_run_writes_oof_votes_and_resumes(tmp_path: Path) -> None:
    store = tmp_path / "cache.h5"
    fake_store(store)
    cfg = {"cache": str(store), "seed": 0, "test_frac": 0.25, "folds": 2, "val_frac": 0.34,
           "learners": ["mobilenet_v3_small"], "global_learners": ["mobilenet_v3_small"], "pretrained": None,
           "patch_size": 64, "global_size": 64, "mask_outside": True, "k": 6, "k_val": 2, "patches_per_image": 2,
           "batch_size": 16, "epochs": 1, "patience": 2, "lr": 1e-3, "lr_patience": 1, "weight_decay": 0.0,
           "balanced_sampling": True, "class_weighted_loss": False}
    run = tmp_path / "run"
    res = train_patch_run(cfg, run, torch.device("cpu"))
    assert set(res) == {"mobilenet_v3_small", "global-mobilenet_v3_small"}
    oof = np.load(run / "mobilenet_v3_small" / "oof.npz")
    test = np.load(run / "mobilenet_v3_small" / "test.npz")
    assert oof["soft"].shape[1] == 4 and test["soft"].shape[1:] == (2, 4)
    np.testing.assert_allclose(oof["soft"].sum(1), 1, atol=1e-5)
    np.testing.assert_allclose(oof["hard"].sum(1), 1, atol=1e-5)
    # hard votes are fractions of K=6 patches
    np.testing.assert_allclose(oof["hard"] * 6, np.round(oof["hard"] * 6), atol=1e-4)
    assert set(oof["ids"]).isdisjoint(test["ids"]) and len(oof["ids"]) + len(test["ids"]) == 48
    # out-of-fold: each image's fold model never trained on it
    for f in (0, 1):
        done = np.load(run / "mobilenet_v3_small" / f"fold{f}" / "done.npz")
        fold_ids = set(oof["ids"][oof["fold"] == f])
        trained = {f"img{i:02d}" for i in np.concatenate([done["train_idx"], done["val_idx"]])}
        assert fold_ids.isdisjoint(trained)
    before = (run / "mobilenet_v3_small" / "oof.npz").read_bytes()
    train_patch_run(cfg, run, torch.device("cpu"))  # resumes: every fold is done, votes reused
    np.testing.assert_array_equal(np.load(run / "mobilenet_v3_small" / "oof.npz")["soft"], oof["soft"])
    assert (run / "mobilenet_v3_small" / "confusion_test.png").stat().st_size > 0 and before


def test_downscaled_crop_equals_shrunk_full_crop() -> None:
    """A learner_input crop from the shrunk image = the patch_size crop at 1024² shrunk (same field of view)."""
    import torch.nn.functional as F

    from patchflannel.patch_train import downscale, patch_scale
    from patchflannel.sampler import extract_patches

    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (1, 1, 64, 64), generator=g, dtype=torch.uint8)
    mask = torch.ones(1, 1, 64, 64, dtype=torch.bool)
    f = patch_scale(16, 8)
    small, small_mask = downscale(img, mask, f)
    assert small.shape == (1, 1, 32, 32) and small_mask.all()
    centres = torch.tensor([[[10, 12], [4, 4], [20, 7]]])
    got = extract_patches(small, centres, size=8)
    full = extract_patches(img, centres * f, size=16)
    want = F.avg_pool2d(full.flatten(0, 1).float(), f).round().to(torch.uint8).view_as(got)
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="multiple"):
        patch_scale(224, 100)
