"""Real-data checks on ../shared/data (skipped with a reason when it is absent)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from patchflannel.segment import LungSegmenter, discover_jsrt, jaccard_dice, load_case

ROOT = Path(__file__).resolve().parent.parent
SEG = ROOT / "weights" / "lung_unet"


@pytest.mark.data
def test_shipped_segmenter_on_held_out_jsrt(jsrt_dir: Path) -> None:
    cfg = json.loads(SEG.with_suffix(".json").read_text())
    held_out = cfg["split"]["test"]
    assert held_out and not set(held_out) & set(cfg["split"]["train"]), "the test part must be disjoint from training"
    cases = {c.case_id: c for c in discover_jsrt(jsrt_dir)}
    # A deterministic spread of 8 held-out images.
    ids = [held_out[i] for i in np.linspace(0, len(held_out) - 1, 8).astype(int)]
    seg = LungSegmenter.from_pretrained(SEG)
    scores = []
    for cid in ids:
        img, truth = load_case(cases[cid])
        pred = seg.predict([img])[0]
        scores.append(jaccard_dice(pred, truth)[0])
    assert np.mean(scores) >= 0.93, f"mean Jaccard {np.mean(scores):.4f} on {ids}"


@pytest.mark.data
def test_real_cxr_records_and_grouped_split(cxr_dir: Path) -> None:
    from patchflannel.cxr import CLASSES, check_grouped, load_records, make_splits

    recs = load_records([cxr_dir])
    assert len(recs) > 500 and {r.label for r in recs} == set(CLASSES)
    assert all(r.file.exists() for r in recs[:50])
    labels = np.array([CLASSES.index(r.label) for r in recs])
    groups = [r.patient_id for r in recs]
    split = make_splits(labels, groups, seed=0, test_frac=0.2, n_folds=3)
    check_grouped(split, groups)
