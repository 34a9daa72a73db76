"""Whole-pipeline throughput of ``patchflannel predict --exact``, from the file on disk to the class distribution.

The exact path (PyTorch models, every one of the K crops) is the reference
the default fast path is measured against; ``bench_fast_predict.py`` times
both side by side.

For N real chest radiographs, per batch of B images: ``read_image`` from disk,
then ``Classifier.predict(images, k=K, batch_size=B, exact=True, workers=1)`` with the shipped
classifier — area-resize to the 1024² uint8 work image, lung mask
(``LungSegmenter.predict_prob`` + ``postprocess``, scr convention), per-image
crop seeds hashed from the image content (``pipeline.image_seed``), K in-lung
crops per group of learners with the same input spec (``learners.make_inputs``:
shrink once by ``patch_size / learner_input``, crop there), every learner's
member models forward the K crops and vote (``predict_distribution`` +
``vote``), the learner's distribution is the mean over its members, then the
combiner (FLANNEL: ``z = Σ w_i P_i``) and the calibration — down to each
image's class probabilities ``Prediction.probs``. This is ``patchflannel
predict`` minus writing its outputs (CSV, per-image JSON, overlay PNGs). The
reported time is the median of ``--repeats`` full passes over the N images
after ``--warmup`` untimed batches; files are re-read on every pass (warm OS
cache after the first).

Images: ``--images`` radiographs (default 16) from ``<data>/metadata.csv``
(default ``../shared/data/cxr`` beside the repository, or
``$PATCHFLANNEL_DATA/cxr``), a deterministic spread over the file: rows
``i·R // N`` for i = 0…N-1 of its R rows (the rows are grouped by source, so
every source is represented roughly in proportion). The CXR images come in
their original sizes (about 1–3k px a side, JPEG/PNG), so reading and the
resize to 1024² are real costs here, unlike the 1024² JSRT PNGs of
``bench_segment.py``.

The time split (in ms per image) comes from one extra instrumented pass per
batch size that calls the same steps one at a time, mirroring
``Classifier.predict``: read (``read_image``), resize (to the 1024² uint8 work
image), segment (U-Net preprocessing + forward + upsample + ``postprocess``),
sample (seed hash + ``make_inputs``: shrink, in-lung crops, uint8 → float;
"sampling+crop"), forward (every learner's member models: chunked forward +
vote + mean over members; per learner in the console and the CSV note),
flannel (combiner, calibration, softmax, copies to the CPU).
``split_total_ms`` lets you check that the split adds up to the end-to-end
time, and ``split_matches_predict`` that the instrumented pass produced the
same probabilities as ``Classifier.predict`` (if it says False,
``Classifier.predict`` has changed and this split no longer mirrors it).
``--no-split`` skips the pass.

Weights: the shipped classifier ``weights/ensemble`` (a folder written by
``export-ensemble``: ``config.json``, ``combiner/``,
``learners/<learner>/<member>/``; ``--weights NAME_OR_DIR``) with the lung
U-Net it names (``--seg-weights`` overrides it). There is no random-weights
mode: the learner set, member count, patch size and learner input all come
from the classifier. Without a classifier folder the script exits saying so.

Usage (full settings: 16 images, K=100, batch sizes 1 and 4; several minutes
on 2 CPU cores, depending on the number of learners × member models)::

    python benchmarks/bench_predict.py
    python benchmarks/bench_predict.py --images 2 --k 4 --batch-sizes 1 2 --warmup 0 --repeats 1 --threads 1   # smoke run
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

from patchflannel.errors import PatchflannelError
from patchflannel.io import read_image, resize, to_uint8
from patchflannel.learners import InputSpec, make_inputs
from patchflannel.pipeline import DEFAULT_CLASSIFIER, Classifier
from patchflannel.segment import WORK_SIZE, postprocess
from patchflannel.vote import predict_distribution, vote

NAME = "predict"
STAGES = ("read", "resize", "segment", "sample", "forward", "flannel")
CHUNK = 256  # crops per learner forward (Classifier.learner_distributions' chunk)

COLUMNS = [
    "path", "batch_size", "images", "k", "seconds", "images_per_s", "ms_per_image", "repeats", "seconds_min",
    *(f"{s}_ms" for s in STAGES), "split_total_ms", "split_matches_predict",
    "learners", "n_learners", "fold_models", "models_per_learner", "crop_forwards_per_image", "ensemble_k",
    "distribution", "patch_size", "learner_input", "shrink_factor", "mask_outside", "chunk_size",
    "seg_encoder", "seg_net_size", "weights", "seg_weights", "data", "selection",
    "device", "device_name", "cpu_count", "threads", "torch", "torchvision", "python", "note",
]
TABLE_COLUMNS = ["batch_size", "images", "k", "seconds", "images_per_s", *(f"{s}_ms" for s in STAGES), "split_total_ms"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=Path(__file__).name, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", type=Path, default=common.default_cxr_dir(),
                   help="CXR folder with metadata.csv (columns image_id, file, label, patient_id) and the image files")
    p.add_argument("--images", type=int, default=16, help="radiographs, spread evenly over metadata.csv")
    p.add_argument("--k", type=int, default=100, help="in-lung patches per image (predict --k)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4], help="images per Classifier.predict batch")
    p.add_argument("--weights", default=DEFAULT_CLASSIFIER, help="classifier: a name or a folder written by export-ensemble")
    p.add_argument("--seg-weights", default=None, help="lung U-Net name or path (default: the one the classifier names)")
    p.add_argument("--no-split", dest="split", action="store_false", help="skip the instrumented pass that splits the time")
    common.add_run_options(p, "untimed batches before timing each batch size", "timed passes over all images (median reported)")
    p.add_argument("--seed", type=int, default=0, help="seed of the patch centres (predict --seed)")
    args = p.parse_args(argv)
    for name in ("images", "k"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if min(args.batch_sizes) < 1:
        p.error("--batch-sizes must be >= 1")
    if max(args.batch_sizes) > args.images:
        p.error(f"--batch-sizes {max(args.batch_sizes)} is larger than --images {args.images}")
    return args


# --------------------------------------------------------------------------- setup


def check_ensemble(weights: str | Path) -> Path:
    """The classifier folder ``weights`` resolves to, or exit saying that it is not there (yet)."""
    from patchflannel.hub import CONFIG_NAME, resolve_weights

    try:
        root = resolve_weights(weights, option="--weights")
    except PatchflannelError as exc:
        root, problem = None, str(exc)
    if root is not None and (root / CONFIG_NAME).is_file():
        return root
    if root is not None:
        problem = f"{root / CONFIG_NAME} not found"
    raise SystemExit(
        f"error: no classifier at --weights {weights}: {problem}.\n"
        f"This benchmark times the shipped predict pipeline, so it needs a classifier folder "
        f"(config.json, combiner/, learners/<learner>/<member>/). Ship one with "
        f"`patchflannel export-ensemble ENSEMBLE_OUT --to DIR` (after train-patch and ensemble), or pass --weights DIR.")


def pick_files(data: Path, n: int) -> tuple[list[Path], list[Any], str]:
    """N files spread evenly over ``data/metadata.csv`` (rows i·R // N) → (paths, records, description)."""
    from patchflannel.data import load_records

    if not (Path(data) / "metadata.csv").is_file():
        raise SystemExit(
            f"error: no metadata.csv in {data}.\nThe benchmark needs the CXR radiographs with their metadata.csv "
            f"(columns image_id, file, label, patient_id). Put them at {common.default_cxr_dir()}, set "
            f"PATCHFLANNEL_DATA to the folder holding cxr/, or pass --data DIR.")
    try:
        records = load_records([data])
    except PatchflannelError as exc:
        raise SystemExit(f"error: {exc} (--data {data})") from None
    if n > len(records):
        raise SystemExit(f"error: --images {n} requested but {data / 'metadata.csv'} lists only {len(records)} images")
    picked = [records[i * len(records) // n] for i in range(n)]
    missing = [str(r.file) for r in picked if not r.file.is_file()]
    if missing:
        raise SystemExit(f"error: {len(missing)} of the selected files are missing, e.g. {missing[0]} (--data {data})")
    selection = f"metadata.csv rows i*{len(records)}//{n}, i=0..{n - 1} ({len(records)} rows)"
    return [r.file for r in picked], picked, selection


def load_classifier(args: argparse.Namespace, device: torch.device) -> Classifier:
    try:
        return Classifier.from_pretrained(args.weights, device=device, segmenter=args.seg_weights)
    except PatchflannelError as exc:
        raise SystemExit(f"error: cannot load the classifier from --weights {args.weights}"
                         + (f" and --seg-weights {args.seg_weights}" if args.seg_weights else "") + f": {exc}") from None


def crop_groups(clf: Classifier) -> dict[tuple[Any, ...], list[str]]:
    """Learners that share one set of crops (same input spec), in the classifier's order."""
    groups: dict[tuple[Any, ...], list[str]] = {}
    for n in clf.names:
        groups.setdefault(clf.learners[n][0].input_spec.crops_key(), []).append(n)
    return groups


def first_patch_spec(clf: Classifier) -> InputSpec:
    specs = [clf.learners[n][0].input_spec for n in clf.names]
    return next((s for s in specs if s.mode == "patch"), specs[0])


# --------------------------------------------------------------------------- timed path and split


def predict_files(clf: Classifier, paths: Sequence[Path], batch_size: int, k: int, seed: int) -> list[np.ndarray]:
    """The timed path: files → class probabilities ``(M,)``, ``batch_size`` images per ``Classifier.predict`` batch."""
    out: list[np.ndarray] = []
    for start in range(0, len(paths), batch_size):
        images = [read_image(p) for p in paths[start:start + batch_size]]
        out += [pred.probs for pred in clf.predict(images, k=k, seed=seed, batch_size=batch_size, exact=True,
                                                   workers=1)]
    return out


@torch.inference_mode()
def split_pass(clf: Classifier, paths: Sequence[Path], batch_size: int, k: int, seed: int,
               device: torch.device) -> tuple[dict[str, float], dict[str, float], list[np.ndarray]]:
    """One instrumented pass, ``Classifier.predict`` one step at a time.

    Returns (seconds per stage, seconds per learner within ``forward``, class
    probabilities), all summed over the images.
    """
    from patchflannel.pipeline import image_seed

    clock = common.StageClock(STAGES, device)
    spent, tick = clock.spent, clock.tick
    per_learner = dict.fromkeys(clf.names, 0.0)
    out: list[np.ndarray] = []
    seg = clf.segmenter
    groups = crop_groups(clf)

    for start in range(0, len(paths), batch_size):
        t = time.perf_counter()
        raw = [read_image(p) for p in paths[start:start + batch_size]]
        t = tick("read", t)
        # From here on: Classifier.predict(exact=True) (pipeline.prepare, the exact votes, combine), one step at a time.
        work = [to_uint8(resize(im, WORK_SIZE, "area")) for im in raw]
        t = tick("resize", t)
        probs = seg.predict_prob([w.astype(np.float32) / np.float32(255.0) for w in work], "scr", WORK_SIZE)
        post = [postprocess(p, seg.threshold) for p in probs]
        t = tick("segment", t)
        work_t = torch.from_numpy(np.stack(work)).unsqueeze(1).to(device)
        masks_t = torch.from_numpy(np.stack([m for m, _ in post])).unsqueeze(1).to(device)
        seeds = [image_seed(w, seed) for w in work]
        inputs = {}
        for key, names in groups.items():
            spec = clf.learners[names[0]][0].input_spec
            inputs[key], _, _ = make_inputs(work_t, masks_t, spec, k if spec.mode == "patch" else 1, seeds=seeds)
        t = tick("sample", t)
        dists: dict[str, torch.Tensor] = {}
        for key, names in groups.items():
            for name in names:
                t_learner = t
                member = []
                for model in clf.learners[name]:
                    hard, soft = vote(predict_distribution(model, inputs[key], chunk_size=CHUNK))
                    member.append(soft if clf.distribution == "soft" else hard)
                dists[name] = torch.stack(member).mean(0)
                t = tick("forward", t)
                per_learner[name] += t - t_learner
        P = torch.stack([dists[n] for n in clf.names], dim=1).float()
        calibrated, _, _ = clf.combine(P)
        tick("flannel", t)
        for i, (_, q) in enumerate(post):
            out.append(calibrated[i] if q.lung_fraction > 0 else np.full(len(clf.classes), np.nan))
    return spent, per_learner, out


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Run the benchmark, print the table, write the CSV; returns the CSV rows."""
    args = parse_args(argv)
    check_ensemble(args.weights)
    device = common.resolve_device(args.device)
    with common.torch_threads(args.threads):
        return _run(args, device, argv)


def _run(args: argparse.Namespace, device: torch.device, argv: list[str] | None) -> list[dict[str, Any]]:
    paths, records, selection = pick_files(args.data, args.images)
    clf = load_classifier(args, device)
    info = common.machine_info(device)
    folds = [len(clf.learners[n]) for n in clf.names]
    n_models = sum(folds)
    # a patch member forwards K crops per image, a whole-image member one image
    forwards = sum((1 if clf.learners[n][0].input_spec.mode == "global" else args.k) * f for n, f in zip(clf.names, folds))
    spec = first_patch_spec(clf)
    factor = spec.factor if spec.mode == "patch" else 1
    seg_cfg = clf.segmenter.config
    seg_name = args.seg_weights or (clf.config.get("segmenter") or {}).get("name", "?")
    ensemble_k = clf.default_k
    dist_key = clf.distribution
    print(f"predict benchmark — {info['device']} ({info['device_name']}), {info['threads']} threads, "
          f"torch {info['torch']}, torchvision {info['torchvision']}")
    print(f"classifier {args.weights}: {len(clf.names)} learners × member models = "
          + " + ".join(f"{n} ×{f}" for n, f in zip(clf.names, folds))
          + f" = {n_models} models; {clf.config.get('combiner', 'flannel')} on '{dist_key}' distributions "
            f"(default K={ensemble_k}); calibration {clf.calibrator.to_dict().get('kind')}")
    print(f"patches: K={args.k} per image, patch_size={spec.patch_size} at 1024², learner_input={spec.learner_input} "
          f"(images shrunk ×{factor} once), mask_outside={spec.mask_outside}, chunk={CHUNK} → "
          f"{forwards} crop/image forwards per image")
    print(f"segmenter {seg_name}: encoder {seg_cfg.get('encoder', '?')}, net input {clf.segmenter.preprocess.size}²")
    print(f"images={len(paths)} from {args.data} ({selection}); labels: "
          + ", ".join(f"{c} {v}" for c, v in sorted(Counter(r.label for r in records).items()))
          + "; sources: " + ", ".join(f"{c} {v}" for c, v in sorted(Counter(r.source or '?' for r in records).items())))
    print(f"batch sizes={args.batch_sizes}, warmup={args.warmup} batches, repeats={args.repeats}", flush=True)

    base = {"path": "read+predict", "learners": "+".join(clf.names), "n_learners": len(clf.names),
            "fold_models": n_models, "models_per_learner": "/".join(map(str, folds)),
            "crop_forwards_per_image": forwards, "ensemble_k": ensemble_k, "distribution": dist_key,
            "patch_size": spec.patch_size, "learner_input": spec.learner_input, "shrink_factor": factor,
            "mask_outside": spec.mask_outside, "chunk_size": CHUNK,
            "seg_encoder": seg_cfg.get("encoder"), "seg_net_size": clf.segmenter.preprocess.size,
            "weights": str(args.weights), "seg_weights": str(seg_name), "data": str(args.data),
            "selection": selection, **info}
    rows: list[dict[str, Any]] = []
    learner_notes: dict[int, str] = {}
    for b in args.batch_sizes:
        print(f"batch size {b} ...", flush=True)
        for _ in range(args.warmup):
            predict_files(clf, paths[:b], b, args.k, args.seed)
        last: dict[str, list[np.ndarray]] = {}

        def run(b: int = b, last: dict[str, list[np.ndarray]] = last) -> None:
            last["probs"] = predict_files(clf, paths, b, args.k, args.seed)  # kept for the split check

        timing = common.time_interleaved({"e2e": run}, device, 0, args.repeats)["e2e"]
        row: dict[str, Any] = {**base, "batch_size": b, "images": len(paths), "k": args.k, "seconds": timing.median,
                               "images_per_s": len(paths) / timing.median,
                               "ms_per_image": 1e3 * timing.median / len(paths),
                               "repeats": timing.repeats, "seconds_min": timing.min}
        note = "read_image from disk → Classifier.predict → class probabilities (no output files written)"
        if args.split:
            spent, per_learner, probs = split_pass(clf, paths, b, args.k, args.seed, device)
            for stage in STAGES:
                row[f"{stage}_ms"] = 1e3 * spent[stage] / len(paths)
            row["split_total_ms"] = 1e3 * sum(spent.values()) / len(paths)
            row["split_matches_predict"] = bool(np.allclose(np.stack(probs), np.stack(last["probs"]), atol=1e-5,
                                                            equal_nan=True))
            learner_notes[b] = ", ".join(f"{n} {1e3 * s / len(paths):.4g}" for n, s in per_learner.items())
            note += f"; *_ms: per image, from one extra instrumented pass; forward per learner (ms/image): {learner_notes[b]}"
        row["note"] = note
        rows.append(row)

    print()
    print(common.format_table(rows, TABLE_COLUMNS))
    print()
    for row in rows:
        line = f"batch size {row['batch_size']}: {row['images_per_s']:.3g} images/s ({row['ms_per_image']:.4g} ms/image)"
        if args.split:
            total = row["split_total_ms"]
            line += "; split " + ", ".join(f"{s} {100 * row[f'{s}_ms'] / total:.0f}%" for s in STAGES)
            line += f" (sums to {total:.4g} ms/image); forward per learner (ms/image): {learner_notes[row['batch_size']]}"
            if not row["split_matches_predict"]:
                line += ("\n  WARNING: the instrumented pass gave other probabilities than Classifier.predict; "
                         "Classifier.predict has changed and split_pass no longer mirrors it")
        print(line)
    if ensemble_k is not None and ensemble_k != args.k:
        print(f"note: K={args.k} here; the classifier's default (the K its combiner was trained with) is K={ensemble_k}.")
    common.finish(NAME, device, args.out_dir, rows, COLUMNS, __file__, argv)
    return rows


if __name__ == "__main__":
    main()
