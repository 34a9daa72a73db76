"""Which adult non-COVID images a learner calls COVID-19, by finding and source (out of fold).

    python scripts/calls_by_finding.py runs/r_global_b16/global-shufflenet_v2_x1_0/oof.npz \
        --out docs/results/recipe_screen/adult_non_covid_calls.md

Reads a `train-patch` ``oof.npz`` (every image scored by the fold model that did not train on it)
and counts, for each (label, finding, source) of the adult images that are not COVID, how many the
learner calls COVID. Adult normals called COVID by a model that calls other hospitals' adult
normals normal point at the source, not the lungs.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from patchflannel._files import write_text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("oof", type=Path)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if not args.oof.is_file():
        print(f"{args.oof}: no such file", file=sys.stderr)
        return 2
    o = np.load(args.oof, allow_pickle=False)
    classes = [str(c) for c in o["classes"]]
    covid = classes.index("covid")
    pred = o["soft"].argmax(1)
    sel = (o["age_groups"].astype(str) == "adult") & (o["y"] != covid)
    n, called = Counter(), Counter()
    for lab, finding, source, p in zip(o["y"][sel], o["findings"][sel], o["sources"][sel], pred[sel]):
        key = (classes[lab], str(finding) or "–", str(source).split("/")[-1])
        n[key] += 1
        called[key] += int(p == covid)
    lines = [f"Adult non-COVID images out of fold ({args.oof}): {int(sel.sum())} images, "
             f"{sum(called.values())} called COVID.", "",
             "| label | finding | source | called COVID |", "|---|---|---|---:|"]
    for key in sorted(n, key=lambda k: (k[0], -n[k])):
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {called[key]}/{n[key]} |")
    for lab in sorted({k[0] for k in n}):
        tot = sum(v for k, v in n.items() if k[0] == lab)
        hit = sum(v for k, v in called.items() if k[0] == lab)
        lines.append(f"| **{lab}, all** | | | **{hit}/{tot}** |")
    text = "\n".join(lines) + "\n"
    if args.out:
        write_text(args.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
