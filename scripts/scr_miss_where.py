"""Where, relative to the ``scr`` mask, does the V7 lung it misses lie? What that says of issue 9's 85 %.

    python scripts/scr_miss_where.py --out docs/results/scr_miss_where

Issue 9 asks the default ``scr`` mask to cover ≥ 85 % of the V7 whole-lung reference. SCR leaves
out the lung behind the heart and the mediastinum, which V7 includes. Every reference pixel the
``scr`` mask misses is put in one of five places, per image side (left/right of the midline between
the reference's two lungs), by the ``scr`` mask's extent on the same side:

* ``medial``: in a row where the ``scr`` lung has pixels, between its medial edge and the midline —
  behind the heart and the mediastinum: where the SCR convention itself stops;
* ``lateral``: in such a row, outside the ``scr`` lung's lateral edge (the chest wall side);
* ``basal`` / ``apical``: below the ``scr`` lung's lowest row / above its highest;
* ``inside``: between the ``scr`` lung's edges in a row (notches and holes), or in a row gap;
* ``no_mask_side``: on a side where the ``scr`` mask has no lung at all.

The ``scr`` lung of a side is its largest component there (a speck must not stretch the extent).

The same places say where the ``scr`` mask's pixels *outside* the reference lie (issue 9's "≤ 4 % of
its area outside"), against the reference lung on each side (:func:`added_places`): ``basal`` below
the reference lung in its column or below its lowest row (diaphragm, abdomen), ``apical`` above it
(neck, shoulders), then by row ``lateral`` beyond its chest-wall edge, ``medial`` past its medial edge
(mediastinum, spine), ``inside`` between its edges; as shares of the ``scr`` mask's area.

``1 − medial`` is then what a mask with this mask's medial edge that missed nothing else would
cover: an estimate of what the SCR convention leaves for the target, biased both ways (opacified lung
an SCR outline would include but this mask's medial edge leaves out counts as medial, lowering it;
lung behind the heart below the ``scr`` lung's lowest row counts as basal, raising it). The U-Nets run in PyTorch
(what ``eval-seg`` uses). Writes ``OUT/scr_miss_where.csv`` (per image and weights),
``OUT/summary.md``, ``OUT/examples.png`` (the first weights' four largest misses, by place) and
``OUT/added_examples.png`` (the first weights' four largest shares outside the reference).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from patchflannel._files import write_csv, write_text
from patchflannel.data import discover_jsrt, discover_v7, load_seg_case
from patchflannel.errors import DataError
from patchflannel.segment import LungSegmenter, _components

PLACES = ("medial", "lateral", "basal", "apical", "inside", "no_mask_side")


def _components_by_area(mask: np.ndarray) -> tuple[np.ndarray, list]:
    """8-connected components (`segment`'s own labelling), largest first."""
    labels, comps = _components(mask)
    return labels, sorted(comps, key=lambda c: -c.area)


def _largest(mask: np.ndarray) -> np.ndarray:
    """The largest component (a stray speck must not stretch a lung's extent)."""
    labels, comps = _components_by_area(mask)
    return labels == comps[0].label if len(comps) > 1 else mask


def midline(ref: np.ndarray) -> float:
    """Column halfway between the centroids of the reference's two largest components (image centre
    if it has fewer than two)."""
    _, comps = _components_by_area(ref)
    if len(comps) < 2:
        return (ref.shape[1] - 1) / 2
    return float(np.mean([c.cx for c in comps[:2]]) * ref.shape[1])


def _sides(pixels: np.ndarray, lung: np.ndarray, mid: float, out: dict[str, np.ndarray]):
    """For each side of the midline: (is the image-left side, the side's ``pixels``, the side's largest
    ``lung`` component). A side without lung puts its pixels in ``out["no_mask_side"]`` and is skipped."""
    cols = np.arange(pixels.shape[1])[None, :]
    for side_is_left in (True, False):
        side = cols < mid if side_is_left else cols >= mid
        m = pixels & side
        s = _largest(lung & side)   # the side's lung; pixels of its other components still count as lung
        if not s.any():
            out["no_mask_side"] |= m
            continue
        yield side_is_left, m, s


def _by_row(m: np.ndarray, s: np.ndarray, side_is_left: bool) -> dict[str, np.ndarray]:
    """Pixels ``m`` placed by row against one side's lung ``s``: past its medial or lateral edge in their
    row, below (basal) or above (apical) its rows, or between its edges (inside)."""
    h, w = s.shape
    cols = np.arange(w)[None, :]
    rows = np.arange(h)[:, None]
    has = s.any(1)
    lo = np.where(has, np.argmax(s, 1), -1)[:, None]                       # first lung column in the row
    hi = np.where(has, w - 1 - np.argmax(s[:, ::-1], 1), -1)[:, None]      # last lung column in the row
    med_side = cols > hi if side_is_left else cols < lo                     # toward the midline
    lat_side = cols < lo if side_is_left else cols > hi
    in_row = has[:, None]
    r_has = np.flatnonzero(has)
    top, bottom = r_has.min(), r_has.max()
    out = {"medial": m & in_row & med_side, "lateral": m & in_row & lat_side,
           "basal": m & ~in_row & (rows > bottom)}
    out["apical"] = m & ~in_row & (rows < top) & ~out["basal"]
    out["inside"] = m & ~(out["medial"] | out["lateral"] | out["basal"] | out["apical"])
    return out


def miss_places(ref: np.ndarray, scr: np.ndarray, mid: float | None = None) -> dict[str, np.ndarray]:
    """Boolean maps, one per place in :data:`PLACES`, that together partition ``ref & ~scr``."""
    miss = ref & ~scr
    out = {p: np.zeros_like(miss) for p in PLACES}
    for side_is_left, m, s in _sides(miss, scr, midline(ref) if mid is None else mid, out):
        for name, part in _by_row(m, s, side_is_left).items():
            out[name] |= part
    return out


def added_places(ref: np.ndarray, scr: np.ndarray) -> dict[str, np.ndarray]:
    """Boolean maps, one per place in :data:`PLACES`, that together partition ``scr & ~ref``: where the
    mask's pixels outside the reference lie against the *reference* lung on each side (the midline is
    the reference's, as for :func:`miss_places`).

    Column first: in a column the side's reference lung spans, a pixel below its lowest pixel there is
    ``basal`` (under the diaphragm, also under the dome medial to the costophrenic angle, where the row
    still holds reference lung) and one above its highest is ``apical``; the rest is placed by row as in
    :func:`miss_places` (``medial``/``lateral`` of the reference's edges in its row, ``basal``/``apical``
    beyond its rows, ``inside`` between its edges)."""
    h = ref.shape[0]
    rows = np.arange(h)[:, None]
    added = scr & ~ref
    out = {p: np.zeros_like(added) for p in PLACES}
    for side_is_left, m, r in _sides(added, ref, midline(ref), out):
        col_has = r.any(0)[None, :]
        col_top = np.where(col_has, np.argmax(r, 0), h)                  # highest reference row per column
        col_bottom = np.where(col_has, h - 1 - np.argmax(r[::-1], 0), -1)  # lowest
        basal = m & col_has & (rows > col_bottom)
        apical = m & col_has & (rows < col_top)
        by_row = _by_row(m & ~basal & ~apical, r, side_is_left)   # the remaining pixels, placed by row
        out["basal"] |= basal | by_row["basal"]
        out["apical"] |= apical | by_row["apical"]
        for name in ("medial", "lateral", "inside"):
            out[name] |= by_row[name]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--split", type=Path, default=Path("docs/results/seg_v2/split.json"))
    ap.add_argument("--weights", nargs="+", default=["lung_unet_jsrt", "lung_unet_v7b"])
    ap.add_argument("--part", default="test", choices=("val", "test"))
    ap.add_argument("--out", type=Path, default=Path("docs/results/scr_miss_where"))
    args = ap.parse_args(argv)
    if not args.split.is_file():
        print(f"{args.split}: no such split file", file=sys.stderr)
        return 2
    split = json.loads(args.split.read_text(encoding="utf-8"))
    try:
        cases = {"v7": {c.case_id: c for c in discover_v7(split["data"]["v7"])},
                 "jsrt": {c.case_id: c for c in discover_jsrt(split["data"]["jsrt"])}}
        loaded = {d: [load_seg_case(cases[d][i]) + (i,) for i in split[d][args.part]] for d in ("v7", "jsrt")}
    except (DataError, KeyError) as e:  # a missing data folder or split part is reported, not raised
        print(f"data not found: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    rows, shown, shown_added = [], [], []
    for w in args.weights:
        seg = LungSegmenter.from_pretrained(w, backend="torch")
        for domain, items in loaded.items():
            for img, ref, _, cid in items:
                if not ref.any():
                    continue
                scr = seg.segment([img], "scr")[0].mask_work
                places = miss_places(ref, scr)
                n = np.count_nonzero(ref)
                row = {"weights": w, "domain": domain, "image": cid, "ref_area": int(n),
                       "covered": np.count_nonzero(ref & scr) / n,
                       **{f"miss_{p}": np.count_nonzero(places[p]) / n for p in PLACES}}
                row["one_minus_medial"] = 1 - row["miss_medial"]
                a = max(np.count_nonzero(scr), 1)
                added = added_places(ref, scr)
                row["added"] = np.count_nonzero(scr & ~ref) / a
                row.update({f"add_{p}": np.count_nonzero(added[p]) / a for p in PLACES})
                rows.append(row)
                if w == args.weights[0] and domain == "v7":
                    shown.append((1 - row["covered"], cid, img, ref, scr, places))
                    shown_added.append((row["added"], cid, img, ref, scr, added))
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / "scr_miss_where.csv", [{k: round(v, 5) if isinstance(v, float) else v for k, v in r.items()}
                                               for r in rows])
    write_text(args.out / "summary.md", _summary(rows, args, time.perf_counter() - t0))
    _figure(sorted(shown, key=lambda e: -e[0])[:4], args.out / "examples.png")
    _figure(sorted(shown_added, key=lambda e: -e[0])[:4], args.out / "added_examples.png", added=True)
    print((args.out / "summary.md").read_text(encoding="utf-8"))
    return 0


def _groups(rows: list[dict], weights: list[str]):
    """(weights, domain, rows) for every weights × domain with rows, in table order."""
    for w in weights:
        for domain in ("v7", "jsrt"):
            rs = [r for r in rows if r["weights"] == w and r["domain"] == domain]
            if rs:
                yield w, domain, rs


def _cell(rs: list[dict], key: str) -> str:
    """Mean over images (median in brackets) of a share."""
    v = np.array([r[key] for r in rs])
    return f"{v.mean():.1%} ({np.median(v):.1%})"


def _summary(rows: list[dict], args: argparse.Namespace, seconds: float) -> str:
    lines = [f"# Where the `scr` mask misses the reference lung ({args.part} parts of {args.split})", "",
             f"`python scripts/scr_miss_where.py --weights {' '.join(args.weights)} --part {args.part}` "
             f"({seconds:.0f} s). Shares of the reference lung area, mean over images (median in brackets); "
             "V7: whole-lung reference, JSRT: the SCR reference.", "",
             "| weights | part | n | covered | missed: medial | lateral | basal | apical | inside | no mask on that side "
             "| 1 − medial: mean (median) | images with 1 − medial ≥ 0.85 |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for w, domain, rs in _groups(rows, args.weights):
        ceil = np.array([r["one_minus_medial"] for r in rs])
        lines.append(f"| `{w}` | {domain} | {len(rs)} | {_cell(rs, 'covered')} | "
                     + " | ".join(_cell(rs, f"miss_{p}") for p in PLACES)
                     + f" | {_cell(rs, 'one_minus_medial')} | {int((ceil >= 0.85).sum())} of {len(rs)} |")
    lines += ["", "Where the `scr` mask's pixels outside the reference lie, against the reference lung on each side "
              "(column first: below or above it in its column; then by row): shares of the `scr` mask's area, mean "
              "over images (median in brackets).", "",
              "| weights | part | n | outside the reference | beyond its lateral edge | below it (basal) | "
              "above it (apical) | past its medial edge | between its edges (inside) | on a side without reference lung |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    order = ("lateral", "basal", "apical", "medial", "inside", "no_mask_side")
    for w, domain, rs in _groups(rows, args.weights):
        lines.append(f"| `{w}` | {domain} | {len(rs)} | {_cell(rs, 'added')} | "
                     + " | ".join(_cell(rs, f"add_{p}") for p in order) + " |")
    return "\n".join(lines) + "\n"


def _figure(examples: list, path: Path, added: bool = False) -> None:
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    from patchflannel.plots import new_figure, save_figure

    colours = ["#1f77b4", "#ff7f0e", "#d62728", "#9467bd", "#e377c2", "#8c564b"]
    fig = new_figure(4 * max(1, len(examples)), 4.6)
    axes = fig.subplots(1, max(1, len(examples)), squeeze=False)[0]
    for ax, (miss, cid, img, ref, scr, places) in zip(axes, examples):
        lab = np.zeros(ref.shape, np.int8)
        for i, p in enumerate(PLACES, 1):
            lab[places[p]] = i
        ax.imshow(img, cmap="gray", vmin=0, vmax=1)
        ax.imshow(np.ma.masked_where(lab == 0, lab - 1), cmap=ListedColormap(colours), vmin=0, vmax=len(PLACES) - 1,
                  alpha=0.55, interpolation="nearest")
        ax.contour(ref, levels=[0.5], colors=["lime"], linewidths=0.8)
        ax.contour(scr, levels=[0.5], colors=["white"], linewidths=0.8)
        what = "scr mask outside the V7 lung" if added else "V7 lung missed by scr"
        ax.set_title(f"{cid}\n{what}: {miss:.1%}", fontsize=6.5)
        ax.axis("off")
    handles = [Patch(color=c, label=p) for c, p in zip(colours, PLACES)]
    fig.legend(handles=handles, loc="lower center", ncol=len(PLACES), fontsize=8, frameon=False)
    fig.suptitle("V7 test: the scr mask (white) outside the V7 reference (green), by place against the reference"
                 if added else "V7 test: the lung the scr mask (white) misses of the V7 reference (green), by place",
                 fontsize=9)
    save_figure(fig, path, dpi=80)


if __name__ == "__main__":
    raise SystemExit(main())
