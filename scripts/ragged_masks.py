"""How well a low convexity of an `scr` mask marks the masks that leave lung out.

    python scripts/ragged_masks.py --cache runs/cache/cxr_1024_v7.h5 --out docs/results/ragged_masks

For each U-Net's `scr` output, on the validation and test parts of the U-Nets' split
(docs/results/seg_v2/split.json: JSRT/SCR and V7, grouped by patient): the mask's convexity
(`patchflannel.segment.convexity`, what `segment`'s quality line reports), whether it is below
``--threshold`` (0.88: just under the lowest value of `lung_unet_jsrt`'s masks on the JSRT validation part), and the Jaccard and share of the reference
lung covered (JSRT: the SCR reference; V7: the V7 whole-lung reference, which the `scr` convention does
not aim to cover behind the heart). With ``--cache`` (a `train-patch` mask cache, e.g.
runs/cache/cxr_1024_v7.h5, the classifier's `lung_unet_v7` masks) also the share of ragged masks per
source of the classification images (no reference masks there). The U-Nets run in PyTorch here (what
`eval-seg` uses; `segment`'s ONNX Runtime masks agree to a few border pixels). Writes ``OUT/ragged_masks.csv`` (per
image), ``OUT/summary.md`` and ``OUT/most_ragged_v7_test.png`` (the first weights' six most ragged
masks on the V7 test part, with the reference).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from patchflannel._files import write_csv, write_text
from patchflannel.data import discover_jsrt, discover_v7, load_seg_case
from patchflannel.errors import DataError
from patchflannel.segment import LungSegmenter
from patchflannel.segment_train import mask_scores, plot_worst


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--split", type=Path, default=Path("docs/results/seg_v2/split.json"))
    ap.add_argument("--weights", nargs="+", default=["lung_unet_jsrt", "lung_unet_v7", "lung_unet_v7b"])
    ap.add_argument("--out", type=Path, default=Path("docs/results/ragged_masks"))
    ap.add_argument("--threshold", type=float, default=0.88, help="convexity below which a mask counts as ragged")
    ap.add_argument("--cache", type=Path, help="a train-patch mask cache (.h5): count ragged masks per source")
    args = ap.parse_args(argv)
    split = json.loads(args.split.read_text(encoding="utf-8"))
    if args.cache and not args.cache.is_file():
        print(f"{args.cache}: mask cache not found (train-patch writes it)", file=sys.stderr)
        return 2
    try:
        cases = {"jsrt": {c.case_id: c for c in discover_jsrt(split["data"]["jsrt"])},
                 "v7": {c.case_id: c for c in discover_v7(split["data"]["v7"])}}
    except (DataError, KeyError) as e:  # a missing data folder or split part is reported, not raised
        print(f"data not found: {e}", file=sys.stderr)
        return 2
    loaded = {(d, p): [load_seg_case(cases[d][i]) + (i,) for i in split[d][p]] for d in ("jsrt", "v7") for p in ("val", "test")}
    rows, shown = [], []
    for w in args.weights:
        seg = LungSegmenter.from_pretrained(w, backend="torch")
        for (domain, part), items in loaded.items():
            for img, ref, _, cid in items:
                res = seg.segment([img], "scr")[0]
                sc = mask_scores(res.mask_work, ref)  # no reference here is empty (eval-seg skips such images)
                if w == args.weights[0] and (domain, part) == ("v7", "test"):
                    shown.append((res.quality.convexity, cid, img, ref, res.mask_work, sc["jaccard"]))
                rows.append({"weights": w, "domain": domain, "part": part, "id": cid,
                             "jaccard": round(sc["jaccard"], 4), "covered": round(1 - sc["missed"], 4),
                             "convexity": res.quality.convexity, "ragged": int(res.quality.convexity < args.threshold),
                             "suspicious": int(res.quality.suspicious), "reason": res.quality.reason})
    args.out.mkdir(parents=True, exist_ok=True)

    low = sorted(shown, key=lambda t: t[0])[:6]  # the most ragged masks of the first weights on the V7 test part
    plot_worst([t[2] for t in low], [t[3] for t in low], [t[4] for t in low],
               [f"{t[1][-34:]}\nconvexity {t[0]:.2f}, Jaccard {t[5]:.2f}" for t in low], args.out / "most_ragged_v7_test.png",
               f"{args.weights[0]} scr (red) against the V7 reference (green): the 6 lowest convexities, V7 test part")
    write_csv(args.out / "ragged_masks.csv", rows)
    lines = [f"`scr` masks with a ragged outline (convexity < {args.threshold:g}); Jaccard and covered share against "
             "each domain's reference (V7: the whole lung field, which `scr` does not aim to cover behind the heart).", "",
             "| weights | domain | part | n | lowest convexity | ragged | Jaccard < 0.75 (of them ragged) | mean Jaccard ragged / not | mean covered ragged / not |",
             "|---|---|---|---:|---:|---:|---:|---|---|"]
    for w in args.weights:
        for domain, part in loaded:
            g = [r for r in rows if (r["weights"], r["domain"], r["part"]) == (w, domain, part)]
            f = np.array([r["ragged"] for r in g], bool)
            j, c = np.array([r["jaccard"] for r in g]), np.array([r["covered"] for r in g])
            lines.append(f"| `{w}` | {domain} | {part} | {len(g)} | {min(r['convexity'] for r in g):.3f} | {int(f.sum())} | "
                         f"{int((j < 0.75).sum())} ({int(((j < 0.75) & f).sum())}) | {_means(j, f)} | {_means(c, f)} |")
    if args.cache:
        lines += ["", *_by_source(args.cache, args.threshold)]
    write_text(args.out / "summary.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def _means(v: np.ndarray, ragged: np.ndarray) -> str:
    """Mean of ``v`` over the ragged masks / over the rest ("—" for an empty side)."""
    return " / ".join(f"{v[s].mean():.3f}" if s.any() else "—" for s in (ragged, ~ragged))


def _by_source(cache: Path, threshold: float) -> list[str]:
    from collections import Counter

    from patchflannel.segment import convexity
    from patchflannel.store import Store

    n, ragged = Counter(), Counter()
    with Store(cache) as store:
        for i, meta in enumerate(store.meta):
            src = str(meta.get("source") or "?")
            n[src] += 1
            ragged[src] += convexity(store.mask(i) > 0) < threshold
    out = [f"Masks in `{cache}` with convexity < {threshold:g}, per source (no reference masks: how often, not how wrong):", "",
           "| source | images | ragged |", "|---|---:|---:|"]
    return out + [f"| {s} | {n[s]} | {ragged[s]} ({100 * ragged[s] / n[s]:.0f} %) |" for s in sorted(n)]


if __name__ == "__main__":
    raise SystemExit(main())
