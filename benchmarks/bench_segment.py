"""Lung segmentation throughput at 1024², from the file on disk to the cleaned mask.

For N JSRT radiographs, per batch of B images: ``read_images`` from disk (on
the CPUs' threads, as ``segment`` reads), ``resize`` to 1024² (area; a no-op for
the 1024² JSRT PNGs, kept because other inputs need it, as ``Pipeline.predict``
does), then ``LungSegmenter.predict`` with ``batch_size=B`` (preprocess to the
net's size + CLAHE, U-Net forward, bilinear upsample to 1024², threshold, two
largest components, holes filled; the per-image steps on threads) →
``(1024,1024) bool`` masks. Writing the masks and overlays (what ``segment``
also does) is not timed. The reported time is the median of ``--repeats`` full
passes over the N images, after ``--warmup`` untimed batches. Files are re-read
from disk on every pass (warm OS cache after the first pass, as in any
repeated run).

The time split (read / resize / preprocess (resize to the net's size +
CLAHE) / forward (U-Net) / upsample (bilinear to 1024²: PyTorch + sigmoid, or
OpenCV on the logits with ONNX Runtime) / postprocess (threshold, components,
holes), in ms per image) comes from one extra instrumented pass per batch size
that runs the same steps one stage at a time (mirroring ``LungSegmenter.segment``);
``split_total_ms`` lets you check that it adds up to the end-to-end time.
``--no-split`` skips it.

Backends (``--backends``, default ``torch onnx``): the U-Net forward in PyTorch (what training and
``eval-seg`` use) and in ONNX Runtime (``segment``'s default when onnxruntime is installed), timed
round-robin in the same run so their ratio (``ratio_to_torch``) is fair on a noisy machine;
``min_jaccard_vs_torch`` is the lowest Jaccard between a backend's mask and PyTorch's over the images.

Goal: >= 10 images/s on the project's 2-core CPU (issue 9).

Weights: ``segment``'s ``scr`` default by default (``patchflannel.segment.DEFAULT_SEGMENTER``, ``lung_unet_v7c``
since v0.6; ``--weights NAME_OR_PATH``, resolved like the CLI's, e.g. ``--weights lung_unet_jsrt``). ``--random-weights`` uses a randomly
initialised U-Net of the shipped architecture (``build_unet('resnet18',
(128,64,32,16,16), 2)`` for the scr + full conventions + ``Preprocess(size=256)``, CLAHE):
same shapes, same timing, meaningless masks (postprocessing time can differ somewhat, since it
depends on how many connected components the masks have).

Usage (full settings: all ~200 JSRT images; a few minutes on 2 CPU cores)::

    python benchmarks/bench_segment.py
    python benchmarks/bench_segment.py --random-weights --images 2 --batch-sizes 1 2   # smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

from patchflannel.errors import PatchflannelError
from patchflannel.io import default_threads, read_images, resize
from patchflannel.segment import (
    CONVENTIONS,
    DEFAULT_SEGMENTER,
    WORK_SIZE,
    LungSegmenter,
    Preprocess,
    _logit,
    build_unet,
    postprocess,
)

NAME = "segment"
GOAL_IMAGES_PER_S = 10.0  # issue 9: at least 10 images/s at 1024² on the project's 2-core CPU
RANDOM_ENCODER = "resnet18"
RANDOM_DECODER = (128, 64, 32, 16, 16)
RANDOM_NET_SIZE = 256
STAGES = ("read", "resize", "preprocess", "forward", "upsample", "postprocess")

COLUMNS = [
    "path", "backend", "batch_size", "images", "seconds", "images_per_s", "ratio_to_torch", "min_jaccard_vs_torch",
    "goal_images_per_s", "meets_goal", "repeats", "seconds_min",
    *(f"{s}_ms" for s in STAGES), "split_total_ms",
    "weights", "encoder", "net_size", "preprocess", "output_size",
    "device", "device_name", "cpu_count", "threads", "torch", "torchvision", "python", "note",
]
TABLE_COLUMNS = ["backend", "batch_size", "images", "seconds", "images_per_s", "ratio_to_torch", "min_jaccard_vs_torch",
                 "meets_goal", *(f"{s}_ms" for s in STAGES),
                 "split_total_ms"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=Path(__file__).name, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", type=Path, default=common.default_jsrt_dir(), help="JSRT folder (images + SCR lung masks)")
    p.add_argument("--images", type=int, default=None, help="number of JSRT images (default: all)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8], help="images per LungSegmenter.predict call")
    p.add_argument("--weights", default=DEFAULT_SEGMENTER,
                   help="segmenter weights: a name (default: segment's scr default, lung_unet_v7c; lung_unet_jsrt, …) "
                        "or a path (folder or .safetensors)")
    p.add_argument("--random-weights", action="store_true",
                   help=f"random U-Net of the shipped architecture ({RANDOM_ENCODER}, {list(RANDOM_DECODER)}, "
                        f"input {RANDOM_NET_SIZE}) instead of --weights; same timing")
    p.add_argument("--backends", nargs="+", default=["torch", "onnx"], choices=["torch", "onnx"],
                   help="what runs the U-Net, timed side by side (round-robin) in this run; onnx is skipped with a "
                        "message when it cannot run (no onnxruntime, not on the CPU)")
    p.add_argument("--no-split", dest="split", action="store_false", help="skip the instrumented pass that splits the time")
    common.add_run_options(p, "untimed batches before timing each batch size", "timed passes over all images (median reported)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random U-Net")
    args = p.parse_args(argv)
    if min(args.batch_sizes) < 1:
        p.error("--batch-sizes must be >= 1")
    if args.images is not None and max(args.batch_sizes) > args.images:
        p.error(f"--batch-sizes {max(args.batch_sizes)} is larger than --images {args.images}")
    return args


def build_segmenter(args: argparse.Namespace, device: torch.device) -> tuple[LungSegmenter, str, str]:
    """→ (segmenter, weights description, encoder name)."""
    if args.random_weights:
        torch.manual_seed(args.seed)
        model = build_unet(RANDOM_ENCODER, RANDOM_DECODER, len(CONVENTIONS))
        return (LungSegmenter(model, Preprocess(size=RANDOM_NET_SIZE), CONVENTIONS, 0.5, device=device), "random",
                RANDOM_ENCODER)
    try:
        seg = LungSegmenter.from_pretrained(args.weights, device=device)
    except PatchflannelError as exc:
        raise SystemExit(f"error: {exc}\nFor timing only, --random-weights uses a random U-Net of the same architecture.") from None
    return seg, str(args.weights), str(seg.config.get("encoder", "?"))


def read_files(paths: Sequence[Path]) -> list[np.ndarray]:
    """Read on the CPUs' threads, as ``segment``'s CLI does (``io.read_images``); any unreadable file stops the run."""
    images = read_images(paths)
    for im in images:
        if isinstance(im, Exception):
            raise SystemExit(f"error: {im}")
    return images


def segment_files(seg: LungSegmenter, paths: Sequence[Path], batch_size: int) -> list[np.ndarray]:
    """The timed path: files → ``(1024,1024) bool`` masks, ``batch_size`` images per predict call."""
    masks: list[np.ndarray] = []
    for start in range(0, len(paths), batch_size):
        images = [resize(im, WORK_SIZE, "area") for im in read_files(paths[start:start + batch_size])]
        masks += seg.predict(images, batch_size=batch_size)
    return masks


def split_pass(seg: LungSegmenter, paths: Sequence[Path], batch_size: int, device: torch.device) -> dict[str, float]:
    """One instrumented pass: seconds spent in each stage (summed over all images)."""
    channel = seg.conventions.index("scr")
    clock = common.StageClock(STAGES, device)
    spent, tick = clock.spent, clock.tick
    onnx = seg.backend_used() == "onnx"
    cut = _logit(seg.threshold) if onnx else seg.threshold

    def clean(im: np.ndarray, m: np.ndarray) -> np.ndarray:
        mask, _ = postprocess(m, cut)
        return resize(mask, im.shape, "nearest") if mask.shape != im.shape else mask

    with ThreadPoolExecutor(default_threads()) as pool:
        for start in range(0, len(paths), batch_size):
            t = time.perf_counter()
            raw = read_files(paths[start:start + batch_size])
            t = tick("read", t)
            images = [resize(im, WORK_SIZE, "area") for im in raw]
            t = tick("resize", t)
            # From here on: LungSegmenter.segment, one step at a time (threads where it uses them).
            batch = np.stack(list(pool.map(seg.preprocess, images)) if onnx else [seg.preprocess(im) for im in images])
            t = tick("preprocess", t)
            with torch.inference_mode():
                logits = seg.predict_logits(batch)[:, channel:channel + 1]
                t = tick("forward", t)
                if onnx:  # bilinear on the logits with OpenCV; the cut is the matching logit
                    maps = list(pool.map(lambda lg: cv2.resize(lg, (WORK_SIZE, WORK_SIZE), interpolation=cv2.INTER_LINEAR),
                                         logits[:, 0].numpy()))
                else:
                    up = F.interpolate(logits, size=(WORK_SIZE, WORK_SIZE), mode="bilinear", align_corners=False)
                    maps = list(torch.sigmoid(up)[:, 0].float().cpu().numpy())
            t = tick("upsample", t)
            list(pool.map(clean, images, maps))
            tick("postprocess", t)
    return spent


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Run the benchmark, print the table, write the CSV; returns the CSV rows."""
    args = parse_args(argv)
    device = common.resolve_device(args.device)
    with common.torch_threads(args.threads):
        return _run(args, device, argv)


def _run(args: argparse.Namespace, device: torch.device, argv: list[str] | None) -> list[dict[str, Any]]:
    cases = common.find_jsrt_or_exit(args.data, args.images)
    if max(args.batch_sizes) > len(cases):
        raise SystemExit(f"error: --batch-sizes {max(args.batch_sizes)} is larger than the {len(cases)} images found")
    paths = [c.image for c in cases]
    seg, weights, encoder = build_segmenter(args, device)
    info = common.machine_info(device)
    pre = seg.preprocess
    pre_desc = f"{pre.method} clip {pre.clip_limit} tiles {pre.tile_grid} gamma {pre.gamma}"
    print(f"segmentation benchmark — {info['device']} ({info['device_name']}), {info['threads']} threads, "
          f"torch {info['torch']}, torchvision {info['torchvision']}")
    print(f"weights={weights}, encoder={encoder}, net input {pre.size}² ({pre_desc}), output {WORK_SIZE}², "
          f"images={len(paths)}, batch sizes={args.batch_sizes}, warmup={args.warmup} batches, repeats={args.repeats}, "
          f"data={args.data}")
    print(f"goal: >= {GOAL_IMAGES_PER_S:g} images/s on the project's 2-core CPU", flush=True)

    base = {"path": "read+segment", "weights": weights, "encoder": encoder, "net_size": pre.size, "preprocess": pre_desc,
            "output_size": WORK_SIZE, "goal_images_per_s": GOAL_IMAGES_PER_S, "ratio_to_torch": "", **info}
    segs: dict[str, LungSegmenter] = {}
    for bk in dict.fromkeys(args.backends):
        candidate = dataclasses.replace(seg, backend=bk)
        try:
            if candidate.backend_used() == bk:
                segs[bk] = candidate
        except PatchflannelError as exc:
            print(f"backend {bk} skipped: {exc}", flush=True)
    if not segs:
        raise SystemExit(f"error: none of the backends {args.backends} can run here")
    # Masks of every backend against PyTorch's on the same images (ONNX Runtime's logits differ by ~2e-5,
    # which can move a pixel at the threshold; two empty masks agree).
    agree: dict[str, float] = {}
    if "torch" in segs:
        ref = segment_files(segs["torch"], paths, max(args.batch_sizes))
        for bk, s in segs.items():
            got = segment_files(s, paths, max(args.batch_sizes))
            agree[bk] = min(float((a & b).sum() / (a | b).sum()) if (a | b).any() else 1.0 for a, b in zip(ref, got))
    rows: list[dict[str, Any]] = []
    for b in args.batch_sizes:
        print(f"batch size {b} ...", flush=True)
        for _ in range(args.warmup):
            for s in segs.values():
                segment_files(s, paths[:b], b)
        timings = common.time_interleaved({bk: lambda s=s, b=b: segment_files(s, paths, b) for bk, s in segs.items()},
                                          device, 0, args.repeats)
        for bk, timing in timings.items():
            row: dict[str, Any] = {**base, "backend": bk, "batch_size": b, "images": len(paths), "seconds": timing.median,
                                   "images_per_s": len(paths) / timing.median, "repeats": timing.repeats,
                                   "seconds_min": timing.min, "min_jaccard_vs_torch": agree.get(bk, "")}
            if "torch" in timings:
                row["ratio_to_torch"] = timings["torch"].median / timing.median
            row["meets_goal"] = row["images_per_s"] >= GOAL_IMAGES_PER_S
            note = (f"read_images from disk → resize 1024² → LungSegmenter.predict ({bk}) → 1024² bool masks; "
                    "backends timed round-robin in one run")
            if args.split:
                spent = split_pass(segs[bk], paths, b, device)
                for stage in STAGES:
                    row[f"{stage}_ms"] = 1e3 * spent[stage] / len(paths)
                row["split_total_ms"] = 1e3 * sum(spent.values()) / len(paths)
                note += "; *_ms: per image, from one extra instrumented pass"
            row["note"] = note
            rows.append(row)

    print()
    print(common.format_table(rows, TABLE_COLUMNS))
    print()
    for row in rows:
        verdict = "met" if row["meets_goal"] else "NOT met"
        line = (f"{row['backend']}, batch size {row['batch_size']}: {row['images_per_s']:.2f} images/s "
                f"(goal >= {GOAL_IMAGES_PER_S:g}: {verdict})")
        if row.get("ratio_to_torch", "") != "" and row["backend"] != "torch":
            line += f", {row['ratio_to_torch']:.2f}× torch, masks' Jaccard with torch's ≥ {row['min_jaccard_vs_torch']:.4f}"
        if args.split:
            total = row["split_total_ms"]
            line += "; split " + ", ".join(f"{s} {100 * row[f'{s}_ms'] / total:.0f}%" for s in STAGES)
            line += f" (split sums to {total:.1f} ms/image vs {1e3 * row['seconds'] / row['images']:.1f} end to end)"
        print(line)
    if weights == "random":
        print("note: random U-Net weights (--random-weights); timing as for trained weights, masks meaningless.")
    common.finish(NAME, device, args.out_dir, rows, COLUMNS, __file__, argv)
    return rows


if __name__ == "__main__":
    main()
