"""Aspect ratio (width / height) of the original radiographs by source and class: what keeping it
(letterboxing) instead of stretching every image to 1024² could change about the source confound.

    python scripts/aspect_ratio.py --out docs/results/aspect_ratio

Reads only the sizes (``orig_width``/``orig_height`` of ../shared/data/cxr/metadata.csv, the image
headers of ../shared/data/jsrt/images). Writes ``summary.md`` and ``aspect_ratio.csv`` (one row per
source × class): how far the aspect ratio alone separates COVID-19 from the rest *within adults* (the
confound's question), pneumonia from normal within the pediatric images, and pediatric from adult images (what a letterbox's bars would show), as ROC AUCs
with patient-bootstrap intervals, for the ratio and for |log ratio| (distance from square either way).
An AUC near 0.5 within adults means that letterboxing would reveal no COVID cue that stretching hides.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from patchflannel._files import write_csv, write_text
from patchflannel.stats import auc_with_ci, sample_age_group

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the image file's header (the pixels are not decoded)."""
    from PIL import Image

    with Image.open(path) as im:
        return im.size


def load(cxr: Path, jsrt: Path | None) -> list[dict]:
    rows = []
    with (cxr / "metadata.csv").open(encoding="utf-8") as f:
        for r in csv.DictReader(f):
            w, h = int(r["orig_width"]), int(r["orig_height"])
            rows.append({"source": r["source"], "label": r["label"], "patient": r["patient_id"], "ar": w / h,
                         "age_group": sample_age_group(r["image_id"], r["patient_id"], r["source"], r.get("age"))})
    if jsrt is not None and (jsrt / "images").is_dir():
        for p in sorted((jsrt / "images").glob("*.png")):
            w, h = png_size(p)
            rows.append({"source": "JSRT (adult, train-only normals)", "label": "normal", "patient": p.stem,
                         "ar": w / h, "age_group": "adult"})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cxr", type=Path, default=DATA / "cxr")
    ap.add_argument("--jsrt", type=Path, default=DATA / "jsrt")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--resamples", type=int, default=2000)
    args = ap.parse_args(argv)
    if not (args.cxr / "metadata.csv").is_file():
        print(f"{args.cxr / 'metadata.csv'}: not found (the labelled CXR data)", file=sys.stderr)
        return 2
    rows = load(args.cxr, args.jsrt)
    groups: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in rows:
        groups[(r["source"], r["label"])].append(r["ar"])
    table = []
    for (src, lab), v in sorted(groups.items()):
        a = np.array(v)
        table.append({"source": src, "label": lab, "n": a.size, "median": round(float(np.median(a)), 3),
                      "q25": round(float(np.quantile(a, 0.25)), 3), "q75": round(float(np.quantile(a, 0.75)), 3),
                      "min": round(float(a.min()), 3), "max": round(float(a.max()), 3)})
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / "aspect_ratio.csv", table)

    def auc(sel: list[dict], truth: list[int], square: bool = False) -> str:
        ar = np.array([r["ar"] for r in sel])
        res = auc_with_ci(np.array(truth), np.abs(np.log(ar)) if square else ar,
                          np.array([r["patient"] for r in sel]), args.resamples, 0)
        return (f"{res['value']:.3f} [{res['ci_low']:.3f}, {res['ci_high']:.3f}] "
                f"({res['n_positive']} vs {res['n_negative']} images)")

    cxr_rows = [r for r in rows if not r["source"].startswith("JSRT")]
    adults = [r for r in cxr_rows if r["age_group"] == "adult"]
    lines = ["# Aspect ratio (width / height) of the original radiographs", "",
             f"`python scripts/aspect_ratio.py --out {args.out}` (sizes only; {len(rows)} images).", "",
             "| source | class | n | median | IQR | range |", "|---|---|---:|---:|---|---|"]
    lines += [f"| {t['source']} | {t['label']} | {t['n']} | {t['median']:.2f} | {t['q25']:.2f}–{t['q75']:.2f} | "
              f"{t['min']:.2f}–{t['max']:.2f} |" for t in table]
    n = len(cxr_rows)
    lines += ["", "ROC AUC of the aspect ratio alone (patient-bootstrap 95 % CI; 0.5 = no information); "
              "|log| = distance from square, wider or taller:", ""]
    lines.append(f"- COVID-19 vs the rest, within the adults of the {n} labelled images: "
                 f"{auc(adults, [r['label'] == 'covid' for r in adults])}; |log| "
                 f"{auc(adults, [r['label'] == 'covid' for r in adults], True)}")
    for src in sorted({r["source"] for r in adults}):
        sel = [r for r in adults if r["source"] == src]
        if len({r["label"] == "covid" for r in sel}) == 2:
            lines.append(f"- … within {src}: {auc(sel, [r['label'] == 'covid' for r in sel])}")
    all_adults = [r for r in rows if r["age_group"] == "adult"]
    if len(all_adults) > len(adults):
        lines.append(f"- … the same with the JSRT normals added (140 of them join every training part): "
                     f"{auc(all_adults, [r['label'] == 'covid' for r in all_adults])}; |log| "
                     f"{auc(all_adults, [r['label'] == 'covid' for r in all_adults], True)}")
    kids = [r for r in cxr_rows if r["age_group"] == "pediatric"]
    lines.append(f"- pneumonia (bacterial or viral) vs normal, within the pediatric images: "
                 f"{auc(kids, [r['label'] != 'normal' for r in kids])}")
    known = [r for r in rows if r["age_group"] in ("adult", "pediatric")]
    lines.append(f"- pediatric vs adult (the {n} labelled images + JSRT): "
                 f"{auc(known, [r['age_group'] == 'pediatric' for r in known])}")
    write_text(args.out / "summary.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
