"""Whole-pipeline throughput of ``patchflannel predict``, from the file on disk to the class distribution.

For N real chest radiographs, per batch of B images: ``read_image`` from disk,
then ``Pipeline.predict(images, k=K)`` with the shipped weights — resize to
1024² (area), lung mask (``LungSegmenter.predict_prob`` + ``postprocess``),
uint8, shrink once by ``patch_size / learner_input`` (``patch_train.downscale``),
K in-lung crops drawn once and shared by every learner, every learner's fold
models forward the K crops and vote (``predict_distribution`` + ``vote``), the
learner's distribution is the mean over its fold models, then FLANNEL
(``ŷ = softmax(Σ w_i P_i)``) — down to each image's class distribution
``Prediction.probs``. This is ``patchflannel predict`` minus writing its
outputs (CSV, per-image JSON, overlay PNGs). The reported time is the median of
``--repeats`` full passes over the N images after ``--warmup`` untimed
batches; files are re-read on every pass (warm OS cache after the first).

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
``Pipeline.predict``: read (``read_image``), resize (to 1024²), segment
(U-Net preprocessing + forward + upsample + ``postprocess``), sample
(uint8, ``downscale``, ``sample_patches``, uint8 → float; "sampling+crop"),
forward (every learner's fold models: chunked forward + vote + mean over fold
models; per learner in the console and the CSV note), flannel (FLANNEL weights,
softmax, copies to the CPU). ``split_total_ms`` lets you check that the split
adds up to the end-to-end time, and ``split_matches_predict`` that the
instrumented pass produced the same distributions as ``Pipeline.predict``
(if it says False, ``Pipeline.predict`` has changed and this split no longer
mirrors it). ``--no-split`` skips the pass.

Weights: the shipped ``weights/ensemble`` (``flannel.safetensors/.json`` +
``learners/<learner>_fold<f>.safetensors/.json``; ``--weights DIR``) and
``weights/lung_unet`` (``--seg-weights``). There is no random-weights mode: the
learner set, fold count, patch size and learner input all come from the
shipped ensemble. Without ``flannel.safetensors`` the script exits saying so.

Usage (full settings: 16 images, K=100, batch sizes 1 and 4; several minutes
on 2 CPU cores, depending on the number of learners × fold models)::

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

from patchflannel.io import read_image, resize, to_uint8
from patchflannel.patch_train import downscale, patch_scale
from patchflannel.pipeline import DEFAULT_ENSEMBLE, Pipeline, Prediction
from patchflannel.sampler import sample_patches
from patchflannel.segment import DEFAULT_WEIGHTS, WORK_SIZE, postprocess
from patchflannel.vote import predict_distribution, vote
from patchflannel.weights import WeightsNotFoundError

NAME = "predict"
STAGES = ("read", "resize", "segment", "sample", "forward", "flannel")

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
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4], help="images per Pipeline.predict call")
    p.add_argument("--weights", type=Path, default=DEFAULT_ENSEMBLE, help="ensemble folder (flannel + learners/)")
    p.add_argument("--seg-weights", type=Path, default=DEFAULT_WEIGHTS, help="lung U-Net weights (.safetensors + .json)")
    p.add_argument("--chunk-size", type=int, default=256, help="crops per learner forward (Pipeline.predict's chunk)")
    p.add_argument("--no-split", dest="split", action="store_false", help="skip the instrumented pass that splits the time")
    common.add_run_options(p, "untimed batches before timing each batch size", "timed passes over all images (median reported)")
    p.add_argument("--seed", type=int, default=0, help="seed of the patch centres (predict --seed)")
    args = p.parse_args(argv)
    for name in ("images", "k", "chunk_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if min(args.batch_sizes) < 1:
        p.error("--batch-sizes must be >= 1")
    if max(args.batch_sizes) > args.images:
        p.error(f"--batch-sizes {max(args.batch_sizes)} is larger than --images {args.images}")
    return args


# --------------------------------------------------------------------------- setup


def check_ensemble(weights: Path) -> Path:
    """``weights/flannel.safetensors``, or exit saying that the ensemble is not there (yet)."""
    flannel = Path(weights) / "flannel.safetensors"
    if not flannel.is_file():
        raise SystemExit(
            f"error: no FLANNEL ensemble at {flannel}.\n"
            f"This benchmark times the shipped predict pipeline, so it needs the exported ensemble "
            f"(flannel.safetensors/.json + learners/<learner>_fold<f>.safetensors/.json). Ship one with "
            f"`patchflannel export-ensemble ENSEMBLE_OUT` (after train-patch and ensemble), or pass --weights DIR.")
    return flannel


def pick_files(data: Path, n: int) -> tuple[list[Path], list[Any], str]:
    """N files spread evenly over ``data/metadata.csv`` (rows i·R // N) → (paths, records, description)."""
    from patchflannel.cxr import DataError, load_records

    if not (Path(data) / "metadata.csv").is_file():
        raise SystemExit(
            f"error: no metadata.csv in {data}.\nThe benchmark needs the CXR radiographs with their metadata.csv "
            f"(columns image_id, file, label, patient_id). Put them at {common.default_cxr_dir()}, set "
            f"PATCHFLANNEL_DATA to the folder holding cxr/, or pass --data DIR.")
    try:
        records = load_records([data])
    except DataError as exc:
        raise SystemExit(f"error: {exc} (--data {data})") from None
    if n > len(records):
        raise SystemExit(f"error: --images {n} requested but {data / 'metadata.csv'} lists only {len(records)} images")
    picked = [records[i * len(records) // n] for i in range(n)]
    missing = [str(r.file) for r in picked if not r.file.is_file()]
    if missing:
        raise SystemExit(f"error: {len(missing)} of the selected files are missing, e.g. {missing[0]} (--data {data})")
    selection = f"metadata.csv rows i*{len(records)}//{n}, i=0..{n - 1} ({len(records)} rows)"
    return [r.file for r in picked], picked, selection


def load_pipeline(args: argparse.Namespace, device: torch.device) -> Pipeline:
    try:
        return Pipeline.from_weights(args.weights, args.seg_weights, device=device)
    except (WeightsNotFoundError, FileNotFoundError, ValueError, KeyError) as exc:
        raise SystemExit(f"error: cannot load the pipeline from --weights {args.weights} and --seg-weights "
                         f"{args.seg_weights}: {exc}") from None


# --------------------------------------------------------------------------- timed path and split


def predict_files(pipe: Pipeline, paths: Sequence[Path], batch_size: int, k: int, seed: int, chunk: int) -> list[np.ndarray]:
    """The timed path: files → class distributions ``(M,)``, ``batch_size`` images per ``Pipeline.predict`` call."""
    out: list[np.ndarray] = []
    for start in range(0, len(paths), batch_size):
        images = [read_image(p) for p in paths[start:start + batch_size]]
        out += [pred.probs for pred in pipe.predict(images, k=k, seed=seed, chunk=chunk)]
    return out


@torch.inference_mode()
def split_pass(pipe: Pipeline, paths: Sequence[Path], batch_size: int, k: int, seed: int, chunk: int,
               device: torch.device) -> tuple[dict[str, float], dict[str, float], list[np.ndarray]]:
    """One instrumented pass, ``Pipeline.predict`` one step at a time.

    Returns (seconds per stage, seconds per learner within ``forward``, class
    distributions), all summed over the images.
    """
    clock = common.StageClock(STAGES, device)
    spent, tick = clock.spent, clock.tick
    per_learner = dict.fromkeys(pipe.names, 0.0)
    out: list[np.ndarray] = []
    dist_key = pipe.flannel_cfg.get("distribution", "soft")
    factor = patch_scale(pipe.patch_size, pipe.learner_input)

    for start in range(0, len(paths), batch_size):
        t = time.perf_counter()
        raw = [read_image(p) for p in paths[start:start + batch_size]]
        t = tick("read", t)
        # From here on: Pipeline.predict, one step at a time.
        work = [resize(im, WORK_SIZE, "area") for im in raw]
        t = tick("resize", t)
        probs = pipe.segmenter.predict_prob(work)
        masks = [postprocess(p, pipe.segmenter.threshold) for p in probs]
        t = tick("segment", t)
        imgs = torch.from_numpy(np.stack([to_uint8(w) for w in work])).unsqueeze(1).to(device)
        msk = torch.from_numpy(np.stack(masks)).unsqueeze(1).to(device)
        imgs, msk = downscale(imgs, msk, factor)
        gen = torch.Generator().manual_seed(seed)
        crops, centres = sample_patches(imgs, msk, k, size=pipe.learner_input, generator=gen,
                                        mask_outside=pipe.mask_outside)
        centres = centres * factor
        x = crops.float().div_(255.0)
        t = tick("sample", t)
        learner_dists = []
        for name in pipe.names:
            t_learner = t
            fold_dists = []
            for model in pipe.learners[name]:
                hard, soft = vote(predict_distribution(model, x, chunk_size=chunk))
                fold_dists.append(soft if dist_key == "soft" else hard)
            learner_dists.append(torch.stack(fold_dists).mean(0))
            t = tick("forward", t)
            per_learner[name] += t - t_learner
        P = torch.stack(learner_dists, dim=1).float()
        z, w = pipe.flannel(P)
        y = torch.softmax(z, dim=1)
        preds = [Prediction(y[i].cpu().numpy(), P[i].cpu().numpy(), w[i].cpu().numpy(), masks[i], centres[i].cpu().numpy())
                 for i in range(len(raw))]
        tick("flannel", t)
        out += [p.probs for p in preds]
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
    pipe = load_pipeline(args, device)
    info = common.machine_info(device)
    folds = [len(pipe.learners[n]) for n in pipe.names]
    n_models = sum(folds)
    factor = patch_scale(pipe.patch_size, pipe.learner_input)
    seg_cfg = pipe.segmenter.config
    ensemble_k = pipe.flannel_cfg.get("k")
    dist_key = pipe.flannel_cfg.get("distribution", "soft")
    print(f"predict benchmark — {info['device']} ({info['device_name']}), {info['threads']} threads, "
          f"torch {info['torch']}, torchvision {info['torchvision']}")
    print(f"ensemble {args.weights}: {len(pipe.names)} learners × fold models = "
          + " + ".join(f"{n} ×{f}" for n, f in zip(pipe.names, folds))
          + f" = {n_models} models; FLANNEL on '{dist_key}' distributions (trained with K={ensemble_k})")
    print(f"patches: K={args.k} per image, patch_size={pipe.patch_size} at 1024², learner_input={pipe.learner_input} "
          f"(images shrunk ×{factor} once), mask_outside={pipe.mask_outside}, chunk={args.chunk_size} → "
          f"{args.k * n_models} crop forwards per image")
    print(f"segmenter {args.seg_weights}: encoder {seg_cfg.get('encoder', '?')}, net input {pipe.segmenter.preprocess.size}²")
    print(f"images={len(paths)} from {args.data} ({selection}); labels: "
          + ", ".join(f"{c} {v}" for c, v in sorted(Counter(r.label for r in records).items()))
          + "; sources: " + ", ".join(f"{c} {v}" for c, v in sorted(Counter(r.source or '?' for r in records).items())))
    print(f"batch sizes={args.batch_sizes}, warmup={args.warmup} batches, repeats={args.repeats}", flush=True)

    base = {"path": "read+predict", "learners": "+".join(pipe.names), "n_learners": len(pipe.names),
            "fold_models": n_models, "models_per_learner": "/".join(map(str, folds)),
            "crop_forwards_per_image": args.k * n_models, "ensemble_k": ensemble_k, "distribution": dist_key,
            "patch_size": pipe.patch_size, "learner_input": pipe.learner_input, "shrink_factor": factor,
            "mask_outside": pipe.mask_outside, "chunk_size": args.chunk_size,
            "seg_encoder": seg_cfg.get("encoder"), "seg_net_size": pipe.segmenter.preprocess.size,
            "weights": str(args.weights), "seg_weights": str(args.seg_weights), "data": str(args.data),
            "selection": selection, **info}
    rows: list[dict[str, Any]] = []
    learner_notes: dict[int, str] = {}
    for b in args.batch_sizes:
        print(f"batch size {b} ...", flush=True)
        for _ in range(args.warmup):
            predict_files(pipe, paths[:b], b, args.k, args.seed, args.chunk_size)
        last: dict[str, list[np.ndarray]] = {}

        def run(b: int = b, last: dict[str, list[np.ndarray]] = last) -> None:
            last["probs"] = predict_files(pipe, paths, b, args.k, args.seed, args.chunk_size)  # kept for the split check

        timing = common.time_interleaved({"e2e": run}, device, 0, args.repeats)["e2e"]
        row: dict[str, Any] = {**base, "batch_size": b, "images": len(paths), "k": args.k, "seconds": timing.median,
                               "images_per_s": len(paths) / timing.median,
                               "ms_per_image": 1e3 * timing.median / len(paths),
                               "repeats": timing.repeats, "seconds_min": timing.min}
        note = "read_image from disk → Pipeline.predict → class distribution (no output files written)"
        if args.split:
            spent, per_learner, probs = split_pass(pipe, paths, b, args.k, args.seed, args.chunk_size, device)
            for stage in STAGES:
                row[f"{stage}_ms"] = 1e3 * spent[stage] / len(paths)
            row["split_total_ms"] = 1e3 * sum(spent.values()) / len(paths)
            row["split_matches_predict"] = bool(np.allclose(np.stack(probs), np.stack(last["probs"]), atol=1e-5))
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
                line += ("\n  WARNING: the instrumented pass gave other distributions than Pipeline.predict; "
                         "Pipeline.predict has changed and split_pass no longer mirrors it")
        print(line)
    if ensemble_k is not None and ensemble_k != args.k:
        print(f"note: K={args.k} here; the FLANNEL weights were trained on distributions from K={ensemble_k}.")
    common.finish(NAME, device, args.out_dir, rows, COLUMNS, __file__, argv)
    return rows


if __name__ == "__main__":
    main()
