#!/bin/bash
# v0.5 (refit members) against v0.4 (fold members), alternating in one run on a quiet machine.
# V04 is v0.4's classifier folder: git archive a1f29eb weights/ensemble | tar -x -C /tmp/v04 (→ /tmp/v04/weights/ensemble)
set -euo pipefail
cd "$(dirname "$0")/../../.."
V04=${V04:-/tmp/v04/weights/ensemble}
OUT=benchmarks/results/v05
head -n 32 docs/results/v03_vs_v01/test193_files.txt > /tmp/v05_files.txt
: > $OUT/predict_times.csv
echo "round,classifier,seconds,images" >> $OUT/predict_times.csv
for r in 1 2 3; do
  for name in v04 v05; do
    w=$([ $name = v04 ] && echo "$V04" || echo ensemble)
    rm -rf /tmp/v05_pred_$name
    s=$(date +%s.%N)
    patchflannel predict $(cat /tmp/v05_files.txt) --weights "$w" --out /tmp/v05_pred_$name > /dev/null 2>&1
    e=$(date +%s.%N)
    echo "$r,$name,$(echo "$e - $s" | bc),32" >> $OUT/predict_times.csv
  done
done
for r in 1 2; do
  python benchmarks/bench_predict.py --weights "$V04" --images 8 --batch-sizes 1 --repeats 2 --warmup 1 --threads 2 --no-split --out-dir $OUT/exact_v04_round$r
  python benchmarks/bench_predict.py --weights ensemble --images 8 --batch-sizes 1 --repeats 2 --warmup 1 --threads 2 --no-split --out-dir $OUT/exact_v05_round$r
done
cat $OUT/predict_times.csv
# the fast path step by step with v0.5 (run after the above, same session)
python benchmarks/bench_fast_predict.py --images 8 --repeats 2 --warmup 1 --threads 2 --out-dir $OUT/fast_v05
