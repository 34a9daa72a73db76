#!/usr/bin/env bash
# Session 7: segment's throughput before (e8d4022, worktree /tmp/old_e8d4022) and after (HEAD), alternating in one run.
set -u
cd /work/main
. .venv/bin/activate
OUT=benchmarks/results/seg_threads
mkdir -p "$OUT"
bench() {  # $1 old|new  $2 weights  $3 round
  if [ "$1" = old ]; then
    (cd /tmp && PYTHONPATH=/tmp/old_e8d4022 python /tmp/old_e8d4022/benchmarks/bench_segment.py --weights "$2" --images 64 --data /work/shared/data/jsrt --batch-sizes 4 \
      --repeats 3 --no-split --out-dir "/work/main/$OUT/$1_$2_r$3")
  else
    python benchmarks/bench_segment.py --weights "$2" --images 64 --data /work/shared/data/jsrt --batch-sizes 4 --repeats 3 --no-split --out-dir "$OUT/$1_$2_r$3"
  fi
}
cli() {  # $1 old|new  $2 round
  local line
  if [ "$1" = old ]; then
    line=$(cd /tmp && PYTHONPATH=/tmp/old_e8d4022 COLUMNS=400 python -m patchflannel segment /tmp/seg32 --out /tmp/cli_$1 --convention full --overwrite 2>&1 | grep segmented)
  else
    line=$(COLUMNS=400 python -m patchflannel segment /tmp/seg32 --out /tmp/cli_$1 --convention full --overwrite 2>&1 | grep segmented)
  fi
  echo "$1,$2,32,$(echo "$line" | sed -E 's/.* in ([0-9.]+) s.*/\1/')" >> "$OUT/cli_segment_32.csv"
}
echo "code,round,images,seconds" > "$OUT/cli_segment_32.csv"
for r in 1 2; do
  if [ $r = 1 ]; then order="old new"; else order="new old"; fi
  for w in lung_unet_v7b lung_unet_jsrt; do for c in $order; do bench $c $w $r; done; done
  for c in $order; do cli $c $r; done
done
python benchmarks/bench_segment.py --weights lung_unet_v7b --images 32 --batch-sizes 4 --repeats 2 --out-dir "$OUT/split_new_lung_unet_v7b"
echo done
