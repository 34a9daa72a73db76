#!/bin/bash
# refit repeats R of each v0.5 learner (run.sh [R ...], default: 1 2); one core per learner, the repeats
# one after the other (run from anywhere; session 10 ran repeats 1 and 2 from runs/repeat/run.sh, session 11 3 and 4)
cd "$(dirname "$0")/../../.." && mkdir -p runs/repeat
export OMP_NUM_THREADS=1
repeats="${*:-1 2}"
( for r in $repeats; do .venv/bin/python scripts/refit_repeat.py runs/refit/r_global_b16_e24 --repeat $r --out runs/repeat/global_r$r > runs/repeat/global_r$r.log 2>&1; done ) &
( for r in $repeats; do .venv/bin/python scripts/refit_repeat.py runs/refit/p965_patch --repeat $r --out runs/repeat/patch_r$r > runs/repeat/patch_r$r.log 2>&1; done ) &
wait
