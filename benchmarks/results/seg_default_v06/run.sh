#!/usr/bin/env bash
# Session 12 (v0.6): segment's scr default changed from lung_unet_jsrt to lung_unet_v7c. Issue 9 asks that
# segmentation throughput not drop below 10 images/s at 1024² and for the ratio to the previous default.
# One fresh process per measurement, old and new default alternating 6 rounds (order flipped every round),
# nothing else running: bench_segment.py, ONNX Runtime (segment's default backend), 32 JSRT images, batch 4,
# median of 2 passes.        bash benchmarks/results/seg_default_v06/run.sh
set -eu
cd "$(dirname "$0")/../../.."
OUT="$PWD/benchmarks/results/seg_default_v06"
DATA="$(cd ../shared/data/jsrt && pwd)"
run() {  # $1 weights  $2 round
  python benchmarks/bench_segment.py --weights "$1" --images 32 --data "$DATA" --batch-sizes 4 --repeats 2 --no-split \
      --backends onnx --out-dir "$OUT/$1_r$2" > /dev/null
}
for r in 1 2 3 4 5 6; do
  if [ $((r % 2)) = 1 ]; then order="lung_unet_jsrt lung_unet_v7c"; else order="lung_unet_v7c lung_unet_jsrt"; fi
  for w in $order; do run "$w" "$r"; done
done
python - "$OUT" <<'PY'
import csv, glob, statistics, sys
out = sys.argv[1]
ips = {}
for w in ("lung_unet_jsrt", "lung_unet_v7c"):
    for r in range(1, 7):
        [f] = glob.glob(f"{out}/{w}_r{r}/*.csv")
        [row] = [x for x in csv.DictReader(open(f)) if x["batch_size"] == "4"]
        ips[w, r] = float(row["images_per_s"])
ratios = [ips["lung_unet_v7c", r] / ips["lung_unet_jsrt", r] for r in range(1, 7)]
with open(f"{out}/summary.csv", "w", newline="") as fh:
    w = csv.writer(fh)
    w.writerow(["round", "lung_unet_jsrt_images_per_s", "lung_unet_v7c_images_per_s", "ratio_v7c_over_jsrt"])
    for r in range(1, 7):
        w.writerow([r, f"{ips['lung_unet_jsrt', r]:.2f}", f"{ips['lung_unet_v7c', r]:.2f}", f"{ratios[r - 1]:.3f}"])
for name in ("lung_unet_jsrt", "lung_unet_v7c"):
    v = [ips[name, r] for r in range(1, 7)]
    print(f"{name}: {min(v):.2f}–{max(v):.2f} images/s, median {statistics.median(v):.2f}")
print(f"ratio v7c / jsrt: median {statistics.median(ratios):.3f} ({min(ratios):.3f}–{max(ratios):.3f})")
PY
