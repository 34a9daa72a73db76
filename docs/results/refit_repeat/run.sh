#!/bin/bash
# two refit repeats of each v0.5 learner; one core per learner, the repeats one after the other
# (run from anywhere; session 10 ran the same loops from runs/repeat/run.sh)
cd "$(dirname "$0")/../../.." && mkdir -p runs/repeat
export OMP_NUM_THREADS=1
( for r in 1 2; do .venv/bin/python scripts/refit_repeat.py runs/refit/r_global_b16_e24 --repeat $r --out runs/repeat/global_r$r > runs/repeat/global_r$r.log 2>&1; done ) &
( for r in 1 2; do .venv/bin/python scripts/refit_repeat.py runs/refit/p965_patch --repeat $r --out runs/repeat/patch_r$r > runs/repeat/patch_r$r.log 2>&1; done ) &
wait
