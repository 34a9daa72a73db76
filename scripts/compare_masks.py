"""Compare the lung masks of two segmenters on a folder of radiographs (the classifier's view:
``scr`` masks of the 1024² work image, exactly as ``predict`` and the training cache make them).

    python scripts/compare_masks.py --old lung_unet_jsrt --new lung_unet \
        --data ../shared/data/cxr --out docs/results/mask_change

Writes ``OUT/mask_change.csv`` (per image: lung fraction old/new, changed area as a share of the
old lung area, Jaccard old↔new, source, label), ``OUT/summary.json`` and
``OUT/before_after.png`` (the images with the largest change: old outline red, new green).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from patchflannel._files import write_csv, write_json
from patchflannel.io import read_image
from patchflannel.pipeline import prepare
from patchflannel.segment import LungSegmenter


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", default="lung_unet_jsrt")
    ap.add_argument("--new", default="lung_unet")
    ap.add_argument("--data", type=Path, default=Path("../shared/data/cxr"))
    ap.add_argument("--out", type=Path, default=Path("docs/results/mask_change"))
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--threshold", type=float, default=0.05, help="changed share of the old lung area that counts")
    ap.add_argument("--show", type=int, default=6)
    args = ap.parse_args(argv)
    meta = args.data / "metadata.csv"
    if not meta.is_file():
        print(f"no metadata.csv in {args.data}", file=sys.stderr)
        return 2
    rows = list(csv.DictReader(meta.open(encoding="utf-8")))[: args.limit]
    old, new = LungSegmenter.from_pretrained(args.old), LungSegmenter.from_pretrained(args.new)
    torch.set_num_threads(1)
    out_rows, keep = [], []
    t0 = time.perf_counter()
    for i, r in enumerate(rows):
        im = read_image(args.data / r["file"])
        a, b = prepare([im], old), prepare([im], new)
        mo, mn = a.masks[0, 0].numpy(), b.masks[0, 0].numpy()
        changed = np.count_nonzero(mo ^ mn) / max(np.count_nonzero(mo), 1)
        union = np.count_nonzero(mo | mn)
        out_rows.append({"image_id": r["image_id"], "label": r["label"], "source": r["source"],
                         "adult": int(not r["patient_id"].startswith("kcx-")),
                         "lung_fraction_old": round(float(mo.mean()), 4), "lung_fraction_new": round(float(mn.mean()), 4),
                         "changed_share": round(float(changed), 4),
                         "jaccard_old_new": round(np.count_nonzero(mo & mn) / union, 4) if union else 1.0})
        keep.append((changed, a.work[0, 0].numpy(), mo, mn, r))
        keep = sorted(keep, key=lambda t: -t[0])[: args.show]
        if (i + 1) % 100 == 0:
            print(f"{i + 1}/{len(rows)} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / "mask_change.csv", out_rows)
    ch = np.array([r["changed_share"] for r in out_rows])
    adult = np.array([r["adult"] for r in out_rows], bool)
    summary = {"old": args.old, "new": args.new, "n": len(out_rows), "threshold": args.threshold,
               "changed_more_than_threshold": int((ch > args.threshold).sum()),
               "changed_more_than_threshold_adult": int((ch[adult] > args.threshold).sum()), "n_adult": int(adult.sum()),
               "changed_more_than_threshold_pediatric": int((ch[~adult] > args.threshold).sum()),
               "median_changed_share": float(np.median(ch)),
               "mean_lung_fraction_old": float(np.mean([r["lung_fraction_old"] for r in out_rows])),
               "mean_lung_fraction_new": float(np.mean([r["lung_fraction_new"] for r in out_rows])),
               "seconds": time.perf_counter() - t0}
    write_json(args.out / "summary.json", summary)
    _figure(keep, args.out / "before_after.png", args.old, args.new)
    print(json.dumps(summary, indent=1))
    return 0


def _figure(keep: list, path: Path, old: str, new: str) -> None:
    import cv2

    from patchflannel.plots import new_figure, save_figure

    fig = new_figure(3.2 * len(keep), 3.6)
    axes = fig.subplots(1, len(keep), squeeze=False)[0]
    for ax, (changed, work, mo, mn, r) in zip(axes, keep):
        rgb = np.repeat(work[..., None], 3, axis=2).copy()
        for m, colour in ((mo, (255, 0, 0)), (mn, (0, 255, 0))):
            contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
            cv2.drawContours(rgb, contours, -1, colour, 5)
        ax.imshow(rgb)
        ax.set_title(f"{r['image_id'][:22]}\n{r['label']}, changed {100 * changed:.0f} %", fontsize=8)
        ax.axis("off")
    fig.suptitle(f"largest mask changes: red = {old}, green = {new}", fontsize=9)
    save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
