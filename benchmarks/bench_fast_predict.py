"""``patchflannel predict``'s fast path against the exact path, step by step, in one run.

The same N radiographs (``--images``, spread over ``<data>/metadata.csv`` as in
``bench_predict.py``), end to end from the file on disk to the calibrated
class probabilities (``read_image`` → ``Classifier.predict``: segment → sample
→ learners → FLANNEL → calibration), batch size 1 (predict's default), timed
round-robin (``--repeats`` rounds after ``--warmup``; median reported):

* ``exact``: the reference, ``predict --exact --workers 1``: PyTorch models,
  all K crops, one image at a time: the path as it was before the fast path.
  Every ``speedup_vs_exact`` is over this row.
* ``exact_workers``: ``predict --exact`` as it runs now, images side by side
  (one worker per CPU thread): what predicting images side by side alone gives.
* ``backend``: ONNX Runtime instead of PyTorch, still all K crops, one worker.
* ``sequential``: PyTorch models, sequential vote (:class:`~patchflannel.pipeline.StopRule`), one worker.
* ``fast_1worker``: ONNX Runtime + sequential vote, one image at a time.
* ``fast``: all three, the default ``predict`` (one worker per CPU thread).
* ``floor``: the bare network forwards of the fast path on the same images —
  the lung U-Net on its input plus one ONNX Runtime forward of the learners
  on exactly the crops the fast path used, spread over the same workers —
  with reading, resizing, sampling, the stop rule and FLANNEL left out: what
  no amount of plumbing can beat without doing less network work.

Each row reports its speed-up over ``exact`` measured in this run (ratio of
the medians, and the median/min/max over rounds of the ratio within one
round, which the machine's drift affects least), the mean
number of crops used, and its agreement with ``exact`` on these images (labels,
mean and max |Δp|); the agreement on all 965 development images is
``scripts/fast_path_agreement.py``'s job.

    python benchmarks/bench_fast_predict.py                 # 16 images, ~15 min on 2 CPU cores
    python benchmarks/bench_fast_predict.py --images 2 --k 8 --warmup 0 --repeats 1   # smoke run
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

# As `patchflannel predict` runs (see cli.predict): PyTorch's idle OpenMP threads sleep while ONNX
# Runtime works. Set before torch loads; it applies to every row, the exact path included.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
from bench_predict import check_ensemble, pick_files

from patchflannel.backend import bind_session
from patchflannel.io import read_image, resize, to_uint8
from patchflannel.learners import make_inputs
from patchflannel.pipeline import DEFAULT_CLASSIFIER, Classifier, StopRule, image_seed, prepare
from patchflannel.segment import WORK_SIZE

NAME = "fast_predict"
CONFIGS = ("exact", "exact_workers", "backend", "sequential", "fast_1worker", "fast", "floor")
COLUMNS = ["config", "backend", "sequential", "workers", "images", "k_max", "mean_k", "seconds", "images_per_s", "ms_per_image",
           "speedup_vs_exact", "speedup_round_median", "speedup_round_min", "speedup_round_max", "label_agreement", "mean_abs_dp", "max_abs_dp", "repeats", "seconds_min", "stop_rule",
           "omp_wait_policy",
           "weights", "data", "selection", "device", "device_name", "cpu_count", "threads", "torch", "torchvision",
           "python", "note"]
TABLE = ["config", "backend", "workers", "mean_k", "ms_per_image", "images_per_s", "speedup_vs_exact",
         "speedup_round_min", "speedup_round_max", "label_agreement",
         "mean_abs_dp", "max_abs_dp"]
NOTES = {
    "exact": "predict --exact --workers 1: PyTorch models, all K crops, one image at a time (the reference)",
    "exact_workers": "predict --exact: the reference path with images side by side (one worker per CPU thread)",
    "backend": "ONNX Runtime learners, all K crops (sequential=False), one worker",
    "sequential": "PyTorch learners, sequential vote (StopRule), one worker",
    "fast_1worker": "ONNX Runtime learners + sequential vote, one image at a time (predict --workers 1)",
    "fast": "default predict: ONNX Runtime learners + sequential vote + one worker per CPU thread",
    "floor": "bare forwards only: lung U-Net + one ONNX Runtime forward of all members on the crops the fast path "
             "used, over the same workers",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=Path(__file__).name, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", type=Path, default=common.default_cxr_dir(), help="CXR folder with metadata.csv")
    p.add_argument("--images", type=int, default=16, help="radiographs, spread evenly over metadata.csv")
    p.add_argument("--k", type=int, default=100, help="crops per image of the exact path (predict --k)")
    p.add_argument("--weights", default=DEFAULT_CLASSIFIER, help="classifier name or folder")
    p.add_argument("--seed", type=int, default=0)
    common.add_run_options(p, "untimed rounds before timing", "timed rounds (median reported)")
    args = p.parse_args(argv)
    if args.images < 1 or args.k < 1:
        p.error("--images and --k must be >= 1")
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    check_ensemble(args.weights)
    device = common.resolve_device(args.device)
    if device.type != "cpu":
        raise SystemExit("error: this benchmark compares CPU backends; run it with --device cpu")
    with common.torch_threads(args.threads):
        return _run(args, device, argv)


def _run(args: argparse.Namespace, device: torch.device, argv: list[str] | None) -> list[dict[str, Any]]:
    paths, _, selection = pick_files(args.data, args.images)
    ref = Classifier.from_pretrained(args.weights, device=device, backend="torch")
    fast = Classifier.from_pretrained(args.weights, device=device, backend="auto")
    rule = StopRule()
    info = common.machine_info(device)
    print(f"fast predict benchmark — {info['device_name']}, {info['threads']} threads, torch {info['torch']}; "
          f"{len(paths)} images ({selection}), K={args.k}, {rule}", flush=True)
    results: dict[str, list[Any]] = {}

    n_workers = fast.resolve_workers(None)
    used: dict[str, int] = {}

    def run(clf: Classifier, name: str, workers: int = 1, **kw: Any) -> None:
        results[name] = clf.predict([str(p) for p in paths], k=args.k, seed=args.seed, workers=workers, **kw)
        used[name] = workers

    fns = {
        "exact": lambda: run(ref, "exact", exact=True),
        "exact_workers": lambda: run(ref, "exact_workers", n_workers, exact=True),
        "backend": lambda: run(fast, "backend", sequential=False),
        "sequential": lambda: run(ref, "sequential", stop=rule),
        "fast_1worker": lambda: run(fast, "fast_1worker", stop=rule),
        "fast": lambda: run(fast, "fast", n_workers, stop=rule),
    }
    # floor: the network work of the fast path alone, on inputs prepared outside the clock.
    images = [read_image(p) for p in paths]
    fns["fast"]()
    seg = fast.segmenter
    seg_inputs = [torch.from_numpy(np.stack([seg.preprocess(prepare_work(im))])) for im in images]
    groups = list(fast._groups().values())
    crops = []  # per image: one input tensor per crop group, as many crops as the fast path used
    for im, pred in zip(images, results["fast"]):
        prep = prepare([im], seg)
        seeds = [image_seed(prep.work[0, 0].numpy(), args.seed)]
        per_group = []
        for names in groups:
            spec = fast.learners[names[0]][0].input_spec
            x, _, _ = make_inputs(prep.work, prep.masks, spec, pred.k if spec.mode == "patch" else 1, seeds=seeds)
            per_group.append(x[0])
        crops.append(per_group)

    def forwards(slot: int) -> None:
        bind_session(slot if n_workers > 1 else None)
        try:
            for xs, per_group in list(zip(seg_inputs, crops))[slot::n_workers]:
                seg.predict_logits(xs.numpy())
                for names, xc in zip(groups, per_group):
                    fast._group_logits(names, xc, exact=False)
        finally:
            bind_session(None)

    def floor() -> None:
        if n_workers == 1:
            forwards(0)
            return
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with ThreadPoolExecutor(n_workers) as pool:
                list(pool.map(forwards, range(n_workers)))
        finally:
            torch.set_num_threads(threads)

    fns["floor"] = floor
    timing = common.time_interleaved(fns, device, args.warmup, args.repeats)
    exact_probs = np.stack([p.probs for p in results["exact"]])
    base = {"images": len(paths), "k_max": args.k, "weights": str(args.weights), "data": str(args.data),
            "selection": selection, "stop_rule": str(rule), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
            **info}
    rows = []
    for name in CONFIGS:
        t = timing[name]
        row = {**base, "config": name, "seconds": t.median, "seconds_min": t.min, "repeats": t.repeats,
               "images_per_s": len(paths) / t.median, "ms_per_image": 1e3 * t.median / len(paths),
               "speedup_vs_exact": timing["exact"].median / t.median, "note": NOTES[name]}
        per_round = np.array(timing["exact"].times) / np.array(t.times)  # the same round: the same machine state
        row.update(speedup_round_median=float(np.median(per_round)), speedup_round_min=float(per_round.min()),
                   speedup_round_max=float(per_round.max()))
        if name == "floor":
            row.update(backend=fast.backend_used(), sequential=True, workers=n_workers,
                       mean_k=float(np.mean([p.k for p in results["fast"]])))
        else:
            preds = results[name]
            probs = np.stack([p.probs for p in preds])
            d = np.abs(probs - exact_probs)
            row.update(backend=preds[0].backend, sequential=name in ("sequential", "fast_1worker", "fast"),
                       workers=used[name],
                       mean_k=float(np.mean([p.k for p in preds])),
                       label_agreement=float(np.mean(probs.argmax(1) == exact_probs.argmax(1))),
                       mean_abs_dp=float(d.mean()), max_abs_dp=float(d.max()))
        rows.append(row)
    print()
    print(common.format_table(rows, TABLE))
    print()
    common.finish(NAME, device, args.out_dir, rows, COLUMNS, __file__, argv)
    return rows


def prepare_work(im: np.ndarray) -> np.ndarray:
    """The segmenter's input image, as ``pipeline.prepare`` makes it."""
    return to_uint8(resize(im, WORK_SIZE, "area")).astype(np.float32) / np.float32(255.0)


if __name__ == "__main__":
    main()
