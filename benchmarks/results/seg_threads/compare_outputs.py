"""Compare two `patchflannel segment` output folders image by image: mask pixels that differ and whether the
masks.csv rows match (every column). Used on the folders run_alternating.sh's last round left behind:

    python benchmarks/results/seg_threads/compare_outputs.py OLD_OUT NEW_OUT > masks_old_vs_new.csv
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import cv2


def main(old: Path, new: Path) -> None:
    rows_old = {r["name"]: r for r in csv.DictReader((old / "masks.csv").open(encoding="utf-8"))}
    rows_new = {r["name"]: r for r in csv.DictReader((new / "masks.csv").open(encoding="utf-8"))}
    out = csv.writer(sys.stdout)
    out.writerow(["name", "pixels_differing", "lung_pixels_old", "masks_csv_row_identical"])
    for name in sorted(rows_old):
        a = cv2.imread(str(old / "masks" / f"{name}.png"), cv2.IMREAD_GRAYSCALE) > 0
        b = cv2.imread(str(new / "masks" / f"{name}.png"), cv2.IMREAD_GRAYSCALE) > 0
        out.writerow([name, int((a ^ b).sum()), int(a.sum()), int(rows_old[name] == rows_new.get(name))])


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
