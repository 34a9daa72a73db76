"""scripts/scr_miss_where.py puts every reference pixel the scr mask misses in exactly one place."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from conftest import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "scr_miss_where.py"


def _module():
    return load_script(SCRIPT)


def test_places_partition_the_miss_and_sit_where_drawn() -> None:
    mod = _module()
    ref = np.zeros((100, 100), bool)
    ref[20:80, 10:45] = True          # image-left lung
    ref[20:80, 55:90] = True          # image-right lung
    scr = np.zeros_like(ref)
    scr[30:70, 15:38] = True          # left: misses 5 lateral, 7 medial columns, 10 rows above and below
    scr[30:70, 60:85] = True
    scr[50, 20] = False               # a hole inside the left scr lung: "inside" (it is also missed)
    ref[50, 20] = True
    p = mod.miss_places(ref, scr)
    assert mod.midline(ref) == 49.5
    stacked = np.stack([p[k] for k in mod.PLACES])
    assert (stacked.sum(0) <= 1).all()                               # no pixel in two places
    np.testing.assert_array_equal(stacked.any(0), ref & ~scr)        # every missed pixel in one
    assert p["medial"][40, 40] and p["medial"][40, 57]               # toward the midline, both sides
    assert p["lateral"][40, 12] and p["lateral"][40, 88]             # chest-wall side, both sides
    assert p["apical"][22, 20] and p["basal"][75, 20] and p["basal"][75, 70]
    assert p["inside"][50, 20] and p["inside"].sum() == 1
    assert p["medial"][30:70, 38:45].all() and p["medial"].sum() == 40 * 7 + 40 * 5
    # a speck below the lung does not stretch its extent; a side without any scr lung is its own place
    specked = scr.copy()
    specked[95, 20] = True
    ps = mod.miss_places(ref, specked)
    assert ps["basal"][75, 20] and ps["basal"].sum() == p["basal"].sum()
    one_side = scr.copy()
    one_side[:, 50:] = False
    po = mod.miss_places(ref, one_side)
    assert po["no_mask_side"].sum() == ref[:, 50:].sum() and not po["basal"][:, 50:].any()
    # a mask that misses nothing: all places empty
    q = mod.miss_places(ref, ref)
    assert not any(v.any() for v in q.values())


def test_added_places_partition_what_the_mask_adds() -> None:
    mod = _module()
    ref = np.zeros((100, 100), bool)
    ref[20:80, 10:45] = True
    ref[20:80, 55:90] = True
    scr = ref.copy()
    scr[5:12, 25:30] = True           # a blob in the neck, above the left reference lung: apical
    scr[40:50, 90:95] = True          # past the right lung's chest-wall edge: lateral
    scr[85:90, 60:70] = True          # below the right lung: basal
    scr[40:45, 45:48] = True          # past the left lung's medial edge, short of the midline: medial
    a = mod.added_places(ref, scr)
    stacked = np.stack([a[k] for k in mod.PLACES])
    assert (stacked.sum(0) <= 1).all()
    np.testing.assert_array_equal(stacked.any(0), scr & ~ref)
    assert a["apical"].sum() == 7 * 5 and a["lateral"].sum() == 10 * 5
    assert a["basal"].sum() == 5 * 10 and a["medial"].sum() == 5 * 3
    assert not a["inside"].any() and not a["no_mask_side"].any()
    assert not any(v.any() for v in mod.added_places(ref, ref).values())


def test_added_places_a_leak_under_the_dome_is_basal_not_medial() -> None:
    """The reference's lowest pixel differs by column (a sloped diaphragm): a leak below it, medial to the
    costophrenic angle, in rows that still hold reference lung farther out, is basal."""
    mod = _module()
    ref = np.zeros((100, 100), bool)
    for c in range(10, 45):               # left lung: its base rises from row 90 (chest wall) to row 70 (medial)
        ref[20:90 - (c - 10) * 20 // 35, c] = True
    ref[20:80, 55:90] = True
    scr = ref.copy()
    scr[75:85, 35:44] = True              # under the left dome, rows the lateral lung still reaches
    scr[30:35, 45:48] = True              # past the left lung's medial edge, above its base: medial
    a = mod.added_places(ref, scr)
    leak = np.zeros_like(ref)
    leak[75:85, 35:44] = True
    leak &= ~ref
    np.testing.assert_array_equal(a["basal"], leak)
    assert a["medial"].sum() == 5 * 3 and not a["inside"].any()
    # miss_places keeps its row rule (what session 9 measured): the same pixels count as medial there
    assert mod.miss_places(scr, ref, mid=mod.midline(ref))["medial"][leak].all()
