#!/usr/bin/env bash
# Session 7: segment's ONNX Runtime path before (e8d4022, a git worktree at /tmp/old_e8d4022) and after
# (this commit), one fresh process per measurement, alternating old/new 6 times (order flipped every
# round), nothing else running. Each: bench_segment.py --backends onnx, 32 JSRT images, batch 4, median of 2 passes;
# then `patchflannel segment` on the same 32 images (--convention full: lung_unet_v7b, ONNX Runtime, masks + overlays
# written) with the old code, the new code and the new code with --no-overlays (the time it prints, startup excluded).
#   git worktree add /tmp/old_e8d4022 e8d4022 && bash benchmarks/results/seg_threads/run_alternating.sh
set -eu
cd "$(dirname "$0")/../../.."
OUT="$PWD/benchmarks/results/seg_threads/alternating"
DATA="$(cd ../shared/data/jsrt && pwd)"
mkdir -p "$OUT"
run() {  # $1 old|new  $2 round
  local args=(--weights lung_unet_v7b --images 32 --data "$DATA" --batch-sizes 4 --repeats 2 --no-split --backends onnx
              --out-dir "$OUT/$1_r$2")
  if [ "$1" = old ]; then
    (cd /tmp/old_e8d4022 && PYTHONPATH=/tmp/old_e8d4022 python benchmarks/bench_segment.py "${args[@]}") > /dev/null
  else
    python benchmarks/bench_segment.py "${args[@]}" > /dev/null
  fi
}
IMGS=$(mktemp -d)
for f in $(ls "$DATA"/images/*.png | head -32); do ln -s "$f" "$IMGS/"; done
cli() {  # $1 old|new|new_no_overlays  $2 round
  local extra=() root=$PWD
  [ "$1" = new_no_overlays ] && extra=(--no-overlays)
  [ "$1" = old ] && root=/tmp/old_e8d4022
  (cd "$root" && PYTHONPATH="$root" COLUMNS=400 python -m patchflannel segment "$IMGS" --out "$IMGS.out_$1" --convention full \
     --overwrite "${extra[@]}" 2>&1) | grep segmented | sed -E "s/.* in ([0-9.]+) s.*/$1,$2,32,\1/" >> "$OUT/cli_segment_32.csv"
}
echo "code,round,images,seconds" > "$OUT/cli_segment_32.csv"
for r in 1 2 3 4 5 6; do
  if [ $((r % 2)) = 1 ]; then order="old new"; else order="new old"; fi
  for c in $order; do run "$c" "$r"; done
  for c in $order new_no_overlays; do cli "$c" "$r"; done
done
python - "$OUT" <<'PY'
import csv, glob, statistics, sys
out = sys.argv[1]
rows = []
for r in range(1, 7):
    ips = {c: float(next(csv.DictReader(open(glob.glob(f"{out}/{c}_r{r}/*.csv")[0])))["images_per_s"]) for c in ("old", "new")}
    rows.append({"round": r, "old_images_per_s": f"{ips['old']:.2f}", "new_images_per_s": f"{ips['new']:.2f}",
                 "ratio_new_to_old": f"{ips['new'] / ips['old']:.3f}"})
with open(f"{out}/summary.csv", "w", newline="") as fh:
    w = csv.DictWriter(fh, fieldnames=list(rows[0])); w.writeheader(); w.writerows(rows)
ratios = [float(r["ratio_new_to_old"]) for r in rows]
print(*(f"{r['round']}: old {r['old_images_per_s']}  new {r['new_images_per_s']}  ratio {r['ratio_new_to_old']}" for r in rows), sep="\n")
print(f"bench_segment, ONNX Runtime: median ratio new/old {statistics.median(ratios):.3f} (range {min(ratios):.3f}–{max(ratios):.3f})")
cli = list(csv.DictReader(open(f"{out}/cli_segment_32.csv")))
sec = {(r["code"], r["round"]): float(r["seconds"]) for r in cli}
for code in ("old", "new", "new_no_overlays"):
    v = [sec[(code, str(r))] for r in range(1, 7)]
    print(f"segment CLI, {code}: median {statistics.median(v):.1f} s for 32 images ({32 / statistics.median(v):.1f} images/s)")
for a, b in (("old", "new"), ("new", "new_no_overlays")):
    q = [sec[(a, str(r))] / sec[(b, str(r))] for r in range(1, 7)]
    print(f"segment CLI, {b} vs {a}: median speed-up {statistics.median(q):.2f}× (range {min(q):.2f}–{max(q):.2f})")
PY
