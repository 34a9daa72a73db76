"""scripts/paired_seg.py: the paired difference of two segmenters' per-image metric, resampled by patient."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "paired_seg.py"


def _metrics(path: Path, values: dict[str, float], convention: str = "scr") -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "convention", "jaccard", "dice", "missed", "added", "suspicious"])
        for name, v in values.items():
            w.writerow([name, convention, v, v, 0.0, 0.0, False])
            w.writerow([name, "full", 0.5, 0.5, 0.0, 0.0, False])  # another convention: never paired with scr
    return path


def test_paired_difference_and_patient_resampling(tmp_path: Path) -> None:
    mod = load_script(SCRIPT)
    a = _metrics(tmp_path / "a.csv", {f"i{k}": 0.90 + 0.01 * (k % 3) for k in range(12)})
    b = _metrics(tmp_path / "b.csv", {**{f"i{k}": 0.92 + 0.01 * (k % 3) for k in range(12)}, "only_b": 0.1})
    meta = tmp_path / "meta.csv"
    meta.write_text("image_id,patient_id\n" + "".join(f"i{k},p{k // 4}\n" for k in range(12)))
    out = tmp_path / "r.json"
    assert mod.main([str(a), str(b), "--metadata", str(meta), "--json", str(out), "--resamples", "500"]) == 0
    r = json.loads(out.read_text())
    assert r["n_images"] == 12 and r["n_patients"] == 3  # only_b is not in A; 4 images per patient
    assert r["mean_a_minus_b"] == pytest.approx(-0.02)
    assert r["ci95"][0] == pytest.approx(-0.02) and r["ci95"][1] == pytest.approx(-0.02)  # a constant difference
    assert r["a_lower"] == 12 and r["a_higher"] == 0


def test_dotted_ids_keep_their_own_patient(tmp_path: Path) -> None:
    """V7 ids contain dots (``1-s2.0-…``): each must find its own patient. Cut at the first dot, all four
    ids below would read ``1-s2`` and the two patients would merge into one."""
    mod = load_script(SCRIPT)
    ids = ["1-s2.0-S22-gr1-a", "1-s2.0-S22-gr1-b", "1-s2.0-S99-fig3a", "1-s2.0-S99-fig3b"]
    a = _metrics(tmp_path / "a.csv", dict(zip(ids, [0.9, 0.9, 0.7, 0.7])))
    b = _metrics(tmp_path / "b.csv", dict(zip(ids, [0.8, 0.8, 0.8, 0.8])))
    meta = tmp_path / "meta.csv"
    meta.write_text("image_id,image,patient_id\n" + "".join(
        f"{i},images/{i}.jpg,{p}\n" for i, p in zip(ids, ["ccx-316", "ccx-316", "ccx-9", "ccx-9"])))
    out = tmp_path / "r.json"
    assert mod.main([str(a), str(b), "--metadata", str(meta), "--json", str(out), "--resamples", "400"]) == 0
    r = json.loads(out.read_text())
    assert r["n_patients"] == 2 and r["n_images"] == 4
    assert r["mean_a_minus_b"] == pytest.approx(0.0)
    assert r["ci95"] == pytest.approx([-0.1, 0.1])  # two patients, each +0.1 or −0.1 on both images
    meta.write_text("image_id,patient_id\n" + "".join(f"{i},p\n" for i in ids[:3]))
    with pytest.raises(SystemExit, match="no patient for 1 image"):
        mod.main([str(a), str(b), "--metadata", str(meta)])


def test_refuses_a_file_that_is_not_eval_seg_output(tmp_path: Path) -> None:
    mod = load_script(SCRIPT)
    bad = tmp_path / "bad.csv"
    bad.write_text("file,label\nx.png,covid\n")
    good = _metrics(tmp_path / "a.csv", {"i0": 0.9})
    with pytest.raises(SystemExit, match="not an eval-seg metrics CSV"):
        mod.main([str(bad), str(good)])
    with pytest.raises(SystemExit, match="no image scored"):
        mod.main([str(good), str(good), "--convention", "lateral"])
