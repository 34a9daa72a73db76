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


def copy_run(run: Path, out: Path, learners: list[str]) -> None:
    """RUN → OUT without the refit models and every trace of them (hard links: RUN's files are only ever
    replaced, never rewritten), so that until a new refit model has voted, OUT has no refit to export."""
    from patchflannel._files import write_json, write_npz

    shutil.copytree(run, out, copy_function=_link_or_copy,
                    ignore=lambda d, names: ["refit"] if Path(d).parent == run and "refit" in names else [])
    for name in learners:
        ldir = out / name
        for npz, keys in (("test.npz", ("soft_refit", "hard_refit")), ("external.npz", ("soft_refit",))):
            if (ldir / npz).is_file():
                with np.load(ldir / npz, allow_pickle=False) as z:
                    kept = {k: z[k] for k in z.files if k not in keys}
                write_npz(ldir / npz, **kept)
        metrics = json.loads((ldir / "metrics.json").read_text())
        for key in ("test_refit", "external", "refit_seed"):
            metrics.pop(key, None)
        write_json(ldir / "metrics.json", metrics)
        (ldir / "confusion_test.png").unlink(missing_ok=True)


def update_outputs(ldir: Path, refit: dict, seed: int) -> dict:
    """Put a new refit model's votes into ``ldir``'s test.npz, external.npz and metrics.json (atomically), as
    ``train-patch`` writes them."""
    from patchflannel._files import write_json, write_npz
    from patchflannel.data import CLASSES
    from patchflannel.metrics import classification_report_dict

    with np.load(ldir / "test.npz", allow_pickle=False) as z:
        test = {k: z[k] for k in z.files}
    if test["soft"].shape[::2] != refit["soft_refit"].shape:
        raise ValueError(f"{ldir / 'test.npz'}: {test['soft'].shape[0]} test images, the new refit voted on "
                         f"{refit['soft_refit'].shape[0]}")
    test.update(soft_refit=refit["soft_refit"], hard_refit=refit["hard_refit"])
    write_npz(ldir / "test.npz", **test)
    metrics = json.loads((ldir / "metrics.json").read_text())
    if (ldir / "external.npz").is_file():
        with np.load(ldir / "external.npz", allow_pickle=False) as z:
            ext = {k: z[k] for k in z.files}
        if ext["soft"].shape[0] != refit["ext_refit"].shape[0]:
            raise ValueError(f"{ldir / 'external.npz'}: {ext['soft'].shape[0]} external images, the new refit voted "
                             f"on {refit['ext_refit'].shape[0]}")
        ext["soft_refit"] = refit["ext_refit"]
        write_npz(ldir / "external.npz", **ext)
        pred = refit["ext_refit"].argmax(1)
        metrics["external"] = {"n": int(pred.size), "sources": sorted({str(s) for s in ext.get("sources", [])}),
                               "predicted": {c: int((pred == j).sum()) for j, c in enumerate(CLASSES)}}
    metrics["test_refit"] = classification_report_dict(test["y"], refit["soft_refit"], list(CLASSES), positive="covid")
    metrics["refit_seed"] = seed
    write_json(ldir / "metrics.json", metrics)
    try:
        from patchflannel.plots import plot_confusion

        plot_confusion(np.array(metrics["test_refit"]["confusion_matrix"]), list(CLASSES), ldir / "confusion_test.png",
                       title=f"{ldir.name}: held-out test (refit model, seed {seed})")
    except Exception as exc:  # noqa: BLE001 — a plot must never lose the numbers above
        print(f"confusion plot for {ldir} failed: {exc}", file=sys.stderr)
    return metrics


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a finished train-patch run folder with refit models")
    ap.add_argument("--repeat", type=int, required=True, help="1, 2, …: the refit seed is seed + 7 + 1000 × REPEAT")
    ap.add_argument("--out", type=Path, required=True, help="new run folder (a copy of RUN with the new refit models)")
    args = ap.parse_args(argv)
    from patchflannel._files import write_json

    if args.repeat < 1:
        print("--repeat must be ≥ 1 (repeat 0 is the run's own refit)", file=sys.stderr)
        return 2
    cfg_file = args.run / "config.yaml"
    from pydantic import ValidationError

    from patchflannel.patch_train import PatchTrainConfig, prepare_split, refit_learner

    try:
        cfg = PatchTrainConfig.model_validate(yaml.safe_load(cfg_file.read_text()))
    except (OSError, yaml.YAMLError, ValidationError) as e:
        print(f"{cfg_file}: cannot read the run's config ({e})", file=sys.stderr)
        return 2
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
    info = {"source_run": str(args.run.resolve()), "repeat": args.repeat, "seed": cfg.seed + 7 + 1000 * args.repeat,
            "refit_epochs": epochs}
    if args.out.exists():
        try:
            old = json.loads(marker.read_text())
        except (OSError, ValueError):
            old = None
        if isinstance(old, dict) and "source_run" in old:  # written relative by the first version of this script
            old = {**old, "source_run": str(Path(old["source_run"]).resolve())}
        if not isinstance(old, dict) or {k: v for k, v in old.items() if k != "done"} != info:
            print(f"{args.out} exists and is not this repeat of {args.run} ({marker}: {old}); choose another --out "
                  "(or delete it if it is a copy cut short)", file=sys.stderr)
            return 2
    else:
        copy_run(args.run, args.out, cfg.learners)
        write_json(marker, info)

    import logging

    from patchflannel.cli import _load_cxr_data, _progress, _tracker
    from patchflannel.errors import PatchflannelError
    from patchflannel.runtime import Dist

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    dist = Dist()
    try:
        with _progress() as progress:
            track = _tracker(progress)
            data = _load_cxr_data(cfg, Path.cwd(), False, dist, track)
            split = prepare_split(data, cfg, args.out, dist)
            for name in cfg.learners:
                refit = refit_learner(name, data, split, cfg, args.out / name / "refit", dist, epochs[name],
                                      info["seed"], track=track)
                metrics = update_outputs(args.out / name, refit, info["seed"])
                print(f"{name} refit, seed {info['seed']}, {epochs[name]} epochs: test macro-F1 "
                      f"{metrics['test_refit']['macro_f1']:.3f} (the learner alone; {args.out / name})", flush=True)
    except (PatchflannelError, ValueError) as e:
        print(f"{args.out}: {e}", file=sys.stderr)
        return 2
    write_json(marker, {**info, "done": True})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
