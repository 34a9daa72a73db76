#!/bin/bash
# Score the refit repeats as a user runs the classifier, once docs/results/refit_repeat/run.sh has finished them.
# score.sh [R ...] scores repeats R (default: 1 2); the spread table covers every repeat scored so far.
set -euo pipefail
cd "$(dirname "$0")/../../.." && . .venv/bin/activate
check_same_combiner() {  # PLAN.md: the rerun ensemble must be v0.5's (same out-of-fold votes), else not scored
  python - "$1" <<'PY'
import json, sys
from safetensors.numpy import load_file
new, ref = sys.argv[1], "runs/refit/ens"
a, b = load_file(f"{new}/flannel/model.safetensors"), load_file(f"{ref}/flannel/model.safetensors")
same = a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
t_new, t_ref = (json.load(open(f"{d}/calibration.json"))["temperature"] for d in (new, ref))
print(f"{new}: FLANNEL tensors {'equal' if same else 'DIFFERENT'}; temperature {t_new} vs {t_ref}")
sys.exit(0 if same and t_new == t_ref else 1)
PY
}
for r in ${@:-1 2}; do
  for l in global patch; do
    python -c "import json,sys; sys.exit(0 if json.load(open('runs/repeat/${l}_r$r/REPEAT.json')).get('done') else 1)" \
      || { echo "runs/repeat/${l}_r$r has not finished (REPEAT.json has no done): run run.sh first"; exit 1; }
  done
  patchflannel ensemble runs/repeat/patch_r$r runs/repeat/global_r$r --out runs/repeat/ens_r$r
  check_same_combiner runs/repeat/ens_r$r
  patchflannel export-ensemble runs/repeat/ens_r$r --to runs/repeat/ensemble_r$r --members refit
  patchflannel predict $(cat docs/results/v03_vs_v01/test193_files.txt) --weights runs/repeat/ensemble_r$r --out runs/repeat/pred_r$r
  patchflannel predict $(cat docs/results/v03_vs_v01/jsrt_external.txt) --weights runs/repeat/ensemble_r$r --out runs/repeat/jsrt_r$r
  cp runs/repeat/pred_r$r/predictions.csv docs/results/refit_repeat/predictions_r${r}_test193.csv
  cp runs/repeat/jsrt_r$r/predictions.csv docs/results/refit_repeat/predictions_r${r}_jsrt60.csv
  python scripts/compare_predictions.py runs/repeat/pred_r$r/predictions.csv docs/results/refit_v05/predictions_v05_test193.csv \
      --labels ../shared/data/cxr/metadata.csv --names r$r v0.5 --out docs/results/refit_repeat/paired_r${r}_vs_v05.md
done
# the spread table over v0.5 and every repeat scored so far (r1 and r2 in session 10; r3 and r4 in session 11)
runs=(--run "r0 (v0.5)" docs/results/refit_v05/predictions_v05_test193.csv docs/results/refit_v05/predictions_jsrt60_v05.csv)
for r in 1 2 3 4 5 6 7 8 9; do
  [ -f docs/results/refit_repeat/predictions_r${r}_jsrt60.csv ] || continue
  runs+=(--run r$r docs/results/refit_repeat/predictions_r${r}_test193.csv docs/results/refit_repeat/predictions_r${r}_jsrt60.csv)
done
[ ${#runs[@]} -ge 12 ] || exit 0   # at least two repeats besides v0.5
python scripts/repeat_spread.py --labels ../shared/data/cxr/metadata.csv --out docs/results/refit_repeat/spread.md "${runs[@]}"
