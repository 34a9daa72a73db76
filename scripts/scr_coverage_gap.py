"""Where the default ``scr`` mask misses annotated V7 lung: convention or disease?

    python scripts/scr_coverage_gap.py --weights lung_unet_v7 --split docs/results/seg_v2/split.json \
        --out docs/results/seg_v2/scr_gap

Issue 9 asks the ``scr`` mask to cover ≥ 85 % of the V7 lung. SCR leaves out the lung behind the
heart; V7 includes it. This splits what the ``scr`` mask misses of each V7 test reference into the
part the same network's ``full`` mask has (the region between the conventions) and the part both
miss; and, on the JSRT test part, how much of the ``full`` mask lies outside the *human* SCR
reference — an upper bound for what any SCR-convention mask can cover of a whole-lung-field
outline on these adults.

Writes ``OUT/v7_gap.csv``, ``OUT/jsrt_gap.csv``, ``OUT/summary.json`` and ``OUT/gap_examples.png``
(green: V7 reference, red: ``scr`` mask, blue fill: ``full`` minus ``scr``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from patchflannel._files import write_csv, write_json
from patchflannel.data import discover_jsrt, discover_v7, load_seg_case
from patchflannel.segment import LungSegmenter


def _share(part: np.ndarray, whole: np.ndarray) -> float:
    n = np.count_nonzero(whole)
    return float(np.count_nonzero(part & whole) / n) if n else float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", default="lung_unet_v7")
    ap.add_argument("--split", type=Path, default=Path("docs/results/seg_v2/split.json"))
    ap.add_argument("--out", type=Path, default=Path("docs/results/seg_v2/scr_gap"))
    ap.add_argument("--show", type=int, default=4)
    args = ap.parse_args(argv)
    if not args.split.is_file():
        print(f"{args.split}: no such split file", file=sys.stderr)
        return 2
    split = json.loads(args.split.read_text(encoding="utf-8"))
    seg = LungSegmenter.from_pretrained(args.weights)
    if set(seg.conventions) != {"scr", "full"}:
        print(f"{args.weights}: needs both scr and full outputs, has {seg.conventions}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    rows: dict[str, list[dict]] = {"v7": [], "jsrt": []}
    examples = []
    for domain, discover in (("v7", discover_v7), ("jsrt", discover_jsrt)):
        cases = {c.case_id: c for c in discover(split["data"][domain])}
        for cid in split[domain]["test"]:
            im, ref, _ = load_seg_case(cases[cid])
            if not ref.any():
                continue
            s = seg.segment([im], "scr")[0].mask_work
            f = seg.segment([im], "full")[0].mask_work
            row = {"image": cid, "ref_area": int(np.count_nonzero(ref)),
                   "scr_covers": _share(s, ref),                       # share of the reference inside scr
                   "gap_covers": _share(f & ~s, ref),                  # inside full but not scr
                   "both_miss": _share(~(s | f), ref),                 # outside both masks
                   "full_outside_scr_share": _share(~s, f)}            # share of the full mask outside scr
            if domain == "jsrt":                                       # ref = human SCR: bound for any scr mask
                row["full_outside_ref_share"] = _share(~ref, f)
            rows[domain].append(row)
            if domain == "v7":
                examples.append((row["gap_covers"], cid, im, ref, s, f))
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {"weights": args.weights, "split": str(args.split), "seconds": round(time.perf_counter() - t0, 1)}
    for domain, rs in rows.items():
        write_csv(args.out / f"{domain}_gap.csv", rs)
        keys = [k for k in rs[0] if k not in ("image", "ref_area")]
        summary[domain] = {"n": len(rs), **{f"{k}_mean": float(np.mean([r[k] for r in rs])) for k in keys},
                           **{f"{k}_median": float(np.median([r[k] for r in rs])) for k in keys}}
    write_json(args.out / "summary.json", summary)
    _figure(sorted(examples, key=lambda e: -e[0])[: args.show], args.out / "gap_examples.png")
    print(json.dumps(summary, indent=1))
    return 0


def _figure(examples: list, path: Path) -> None:
    from patchflannel.plots import new_figure, save_figure

    fig = new_figure(4 * len(examples), 4.4)
    axes = fig.subplots(1, len(examples), squeeze=False)[0]
    for ax, (gap, cid, im, ref, s, f) in zip(axes, examples):
        ax.imshow(im, cmap="gray", vmin=0, vmax=1)
        ax.imshow(np.ma.masked_where(~(f & ~s), np.ones_like(im)), cmap="winter", alpha=0.45, vmin=0, vmax=1)
        ax.contour(ref, levels=[0.5], colors=["lime"], linewidths=1.0)
        ax.contour(s, levels=[0.5], colors=["red"], linewidths=1.0)
        ax.set_title(f"{cid[:22]}\nV7 lung in full−scr: {gap:.1%}", fontsize=8)
        ax.axis("off")
    fig.suptitle("V7 test, largest gaps: green V7 reference, red scr mask, blue full − scr "
                 "(behind the heart; on some images also opacified lung the scr output leaves out)", fontsize=9)
    save_figure(fig, path, dpi=80)


if __name__ == "__main__":
    raise SystemExit(main())
