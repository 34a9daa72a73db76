"""Retrain a finished run's refit models with another seed: the spread of what ships.

    OMP_NUM_THREADS=1 python scripts/refit_repeat.py runs/refit/r_global_b16_e24 --repeat 1 --out runs/repeat/global_r1

A refit model (`train-patch` with `train.refit=true`) is trained once, with seed ``seed + 7``; its
test figures are one draw. This copies the run folder RUN to OUT (hard links where possible; RUN is
never written), retrains each learner's refit model there for the same number of epochs on the same
images with seed ``seed + 7 + 1000 × REPEAT``, and writes its votes where `train-patch` writes them
(``OUT/<learner>/refit/``, ``soft_refit``/``hard_refit`` in ``test.npz``, ``external.npz``,
``metrics.json``), so ``patchflannel ensemble`` and ``export-ensemble --members refit`` read OUT as
they read RUN. The crops are drawn with the run's seed as before: only the training draw changes.
Interrupted, it resumes from the refit's last checkpoint when run again with the same arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import yaml


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def copy_run(run: Path, out: Path) -> None:
    """RUN → OUT without the refit folders (hard links: RUN's files are only ever replaced, never rewritten)."""
    shutil.copytree(run, out, copy_function=_link_or_copy,
                    ignore=lambda d, names: ["refit"] if Path(d).parent == run and "refit" in names else [])


def update_outputs(ldir: Path, refit: dict, seed: int) -> dict:
    """Put a new refit model's votes into ``ldir``'s test.npz, external.npz and metrics.json (atomically)."""
    from patchflannel._files import write_json, write_npz
    from patchflannel.data import CLASSES
    from patchflannel.metrics import classification_report_dict

    with np.load(ldir / "test.npz", allow_pickle=False) as z:
        test = {k: z[k] for k in z.files}
    if test["soft_refit"].shape != refit["soft_refit"].shape:
        raise ValueError(f"{ldir / 'test.npz'}: soft_refit {test['soft_refit'].shape} vs new {refit['soft_refit'].shape}")
    test.update(soft_refit=refit["soft_refit"], hard_refit=refit["hard_refit"])
    write_npz(ldir / "test.npz", **test)
    if (ldir / "external.npz").is_file():
        with np.load(ldir / "external.npz", allow_pickle=False) as z:
            ext = {k: z[k] for k in z.files}
        ext["soft_refit"] = refit["ext_refit"]
        write_npz(ldir / "external.npz", **ext)
    metrics = json.loads((ldir / "metrics.json").read_text())
    metrics["test_refit"] = classification_report_dict(test["y"], refit["soft_refit"], list(CLASSES), positive="covid")
    metrics["refit_seed"] = seed
    write_json(ldir / "metrics.json", metrics)
    return metrics


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a finished train-patch run folder with refit models")
    ap.add_argument("--repeat", type=int, required=True, help="1, 2, …: the refit seed is seed + 7 + 1000 × REPEAT")
    ap.add_argument("--out", type=Path, required=True, help="new run folder (a copy of RUN with the new refit models)")
    args = ap.parse_args(argv)
    if args.repeat < 1:
        print("--repeat must be ≥ 1 (repeat 0 is the run's own refit)", file=sys.stderr)
        return 2
    cfg_file = args.run / "config.yaml"
    try:
        raw = yaml.safe_load(cfg_file.read_text())
    except (OSError, yaml.YAMLError) as e:
        print(f"{cfg_file}: cannot read the run's config ({e})", file=sys.stderr)
        return 2
    from patchflannel.patch_train import PatchTrainConfig, prepare_split, refit_learner

    cfg = PatchTrainConfig.model_validate(raw)
    epochs = {}
    for name in cfg.learners:
        try:
            m = json.loads((args.run / name / "metrics.json").read_text())
            epochs[name] = int(m["refit_epochs"])
        except (OSError, ValueError, KeyError):
            print(f"{args.run / name}: no finished refit model (metrics.json has no refit_epochs); run train-patch "
                  "with train.refit=true first", file=sys.stderr)
            return 2
    marker = args.out / "REPEAT.json"
    info = {"source_run": str(args.run), "repeat": args.repeat, "seed": cfg.seed + 7 + 1000 * args.repeat,
            "refit_epochs": epochs}
    if args.out.exists():
        try:
            old = json.loads(marker.read_text())
        except (OSError, ValueError):
            old = None
        if old != info:
            print(f"{args.out} exists and is not this repeat of {args.run} ({marker}: {old}); choose another --out",
                  file=sys.stderr)
            return 2
    else:
        copy_run(args.run, args.out)
        from patchflannel._files import write_json

        write_json(marker, info)

    import logging

    from patchflannel.cli import _load_cxr_data, _progress, _tracker
    from patchflannel.runtime import Dist

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    dist = Dist()
    with _progress() as progress:
        track = _tracker(progress)
        data = _load_cxr_data(cfg, Path.cwd(), False, dist, track)
        split = prepare_split(data, cfg, args.out, dist)
        for name in cfg.learners:
            refit = refit_learner(name, data, split, cfg, args.out / name / "refit", dist, epochs[name], info["seed"],
                                  track=track)
            metrics = update_outputs(args.out / name, refit, info["seed"])
            print(f"{name} refit, seed {info['seed']}, {epochs[name]} epochs: test macro-F1 "
                  f"{metrics['test_refit']['macro_f1']:.3f} (the learner alone; {args.out / name})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
