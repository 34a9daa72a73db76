#!/bin/bash
# Score the refit repeats as a user runs the classifier (after runs/repeat/run.sh finished); from the project folder.
set -euo pipefail
for r in 1 2; do
  patchflannel ensemble runs/repeat/patch_r$r runs/repeat/global_r$r --out runs/repeat/ens_r$r
  patchflannel export-ensemble runs/repeat/ens_r$r --to runs/repeat/ensemble_r$r --members refit
  patchflannel predict $(cat docs/results/v03_vs_v01/test193_files.txt) --weights runs/repeat/ensemble_r$r --out runs/repeat/pred_r$r
  patchflannel predict $(cat docs/results/v03_vs_v01/jsrt_external.txt) --weights runs/repeat/ensemble_r$r --out runs/repeat/jsrt_r$r
  cp runs/repeat/pred_r$r/predictions.csv docs/results/refit_repeat/predictions_r${r}_test193.csv
  cp runs/repeat/jsrt_r$r/predictions.csv docs/results/refit_repeat/predictions_r${r}_jsrt60.csv
  python scripts/compare_predictions.py runs/repeat/pred_r$r/predictions.csv docs/results/refit_v05/predictions_v05_test193.csv \
      --labels ../shared/data/cxr/metadata.csv --names r$r v0.5 --out docs/results/refit_repeat/paired_r${r}_vs_v05.md
done
python scripts/repeat_spread.py --labels ../shared/data/cxr/metadata.csv --out docs/results/refit_repeat/spread.md \
    --run "r0 (v0.5)" docs/results/refit_v05/predictions_v05_test193.csv docs/results/refit_v05/predictions_jsrt60_v05.csv \
    --run r1 docs/results/refit_repeat/predictions_r1_test193.csv docs/results/refit_repeat/predictions_r1_jsrt60.csv \
    --run r2 docs/results/refit_repeat/predictions_r2_test193.csv docs/results/refit_repeat/predictions_r2_jsrt60.csv
