"""Patch inference: the batched path vs a faithful per-patch reference loop vs the network alone.

One run times, for the same learner, K, patch size and learner input:

(a) ``batched`` — the project's path, making the learner inputs exactly as
    ``Classifier.predict`` and training do (``learners.make_inputs`` with one
    seed per image, ``pipeline.image_seed``: hashed from the image's content). Images are already
    decoded (uint8 ``(N,1,1024,1024)``) and lung masks already in memory, as in
    the training cache. Per batch of B images: move the images/masks to the
    device (a no-op on CPU); shrink them ONCE by the integer factor
    ``patch_size / learner_input`` (224 / 112 = 2 by default) with
    ``learners.shrink`` (area average of the uint8 image, rounded; a
    mask pixel stays lung when at least half its block is); ``sample_centres`` + ``extract_patches``
    with ``size=learner_input`` on the shrunk images (K in-lung centres per
    image, one gather, image zeroed outside the shrunk lungs) — the field of
    view of a 224 crop at 1024², at the learner's resolution; uint8 crops →
    ``.float().div_(255)``; ``predict_distribution`` (chunked forward) and
    ``vote``; the votes are copied to the CPU. There is no per-crop
    interpolation. The ``shrink`` call is inside the timed region, once per
    batch, because ``Classifier.predict`` shrinks the images of every call, so
    at prediction time it is a per-image cost; so is the per-image seed hash.
    ``--learner-input 224`` means factor 1: no shrink, crops of 224 at 1024².
(b) ``reference`` — a reimplementation of the reference method's loop: for each
    of K passes, for each image, decode the image file (``read_image``), resize
    it to 1024², read the SCR mask files and resize them to 1024² (both via
    ``load_seg_case``), ``np.nonzero`` the mask, pick one centre, crop one padded
    224 patch at 1024², area-resize it to the learner input (the reference has
    no shrunk image to crop from), forward it with batch size 1 and keep the
    logits; then a per-image vote. It is slow, so it runs on
    ``--ref-images`` × ``--ref-k`` patches and is *extrapolated* linearly per
    image·patch (every step of the loop is per patch) to the full images × K;
    the CSV marks such rows ``extrapolated=True``.
    Centres: the reference drew the row and the column independently from the
    mask's pixel lists, which puts some centres outside the lungs; that is the
    default (``--ref-centres independent``) and the run reports how many landed
    outside. ``--ref-centres joint`` draws one mask pixel instead (correct).
    Where the reference's details are unknown the reimplementation takes the
    cheaper choice (crop first, then zero it outside the lungs; crop by slicing
    into a zero array rather than padding the whole image), which can only make
    it faster, i.e. the measured speed-up conservative. The loop runs in one
    process, like a ``DataLoader(batch_size=1, num_workers=0)``; with 2 cores,
    loader workers could only overlap decoding with a forward that itself
    wants both cores.
(c) ``forward`` — the learner's bare forward on the same number of crops: random
    float crops of the learner-input shape made before timing, already on the
    device, split into the same chunks as (a) (B·K crops per batch, at most
    ``--chunk-size`` per forward).

(a) and (c) are timed interleaved (a, c, a, c, …) after a warm-up, and the
median of ``--repeats`` is reported. ratio_a_over_c = time a / time c: the
design target is <= 1.05 (shrinking, sampling, cropping, uint8 → float and
voting cost a few percent of the forward). speedup_a_vs_b = time b / time a for the same
images × K: target >= 10.

Weights: random init by default (timing does not depend on the values);
``--weights DIR`` loads a learner folder saved by ``train-patch`` (``RUN/<learner>/fold0/best``, or a member
folder of a shipped classifier, ``weights/ensemble/learners/<learner>/<member>``).

Usage (full settings; takes a few minutes on 2 CPU cores)::

    python benchmarks/bench_patch_inference.py
    python benchmarks/bench_patch_inference.py --images 2 --k 4 --ref-images 1 --ref-k 2   # smoke run
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

from patchflannel.data import SegCase, load_seg_case
from patchflannel.errors import PatchflannelError
from patchflannel.io import resize, to_uint8
from patchflannel.learners import InputSpec, Learner, create_learner, list_learners, make_inputs
from patchflannel.pipeline import image_seed
from patchflannel.segment import WORK_SIZE
from patchflannel.vote import predict_distribution, vote

NAME = "patch_inference"
PATCH_SIZE = 224
DEFAULT_LEARNER_INPUT = 112  # configs/patch_cpu.yaml: learner_input
NUM_CLASSES = 4
GOAL_RATIO = 1.05
GOAL_SPEEDUP = 10.0

COLUMNS = [
    "path", "batch_size", "images", "k", "patches", "seconds", "images_per_s", "patches_per_s",
    "ratio_a_over_c", "speedup_a_vs_b", "extrapolated", "repeats", "seconds_min",
    "learner", "learner_input", "patch_size", "shrink_factor", "chunk_size", "mask_outside", "amp", "ref_centres",
    "device", "device_name", "cpu_count", "threads", "torch", "torchvision", "python", "note",
]
TABLE_COLUMNS = ["path", "batch_size", "images", "k", "patches", "seconds", "images_per_s", "patches_per_s",
                 "ratio_a_over_c", "speedup_a_vs_b", "extrapolated"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=Path(__file__).name, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", type=Path, default=common.default_jsrt_dir(), help="JSRT folder (images + SCR lung masks)")
    p.add_argument("--images", type=int, default=16, help="real images timed in paths a and c")
    p.add_argument("--k", type=int, default=100, help="patches per image")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8], help="images per batch in paths a and c")
    p.add_argument("--learner", default="mobilenet_v3_small", help=f"one of: {', '.join(list_learners())}")
    p.add_argument("--learner-input", type=int, default=None,
                   help=f"learner input side, a divisor of {PATCH_SIZE}: images are shrunk once by {PATCH_SIZE}/side and "
                        f"crops of this side taken there; {PATCH_SIZE} = no shrink "
                        f"(default: the --weights sidecar's value, else {DEFAULT_LEARNER_INPUT} as configs/patch_cpu.yaml)")
    p.add_argument("--weights", type=Path, default=None,
                   help="learner folder (config.json + model.safetensors) from train-patch; default random init")
    p.add_argument("--chunk-size", type=int, default=256, help="crops per forward (predict_distribution's chunk_size)")
    p.add_argument("--no-mask-outside", dest="mask_outside", action="store_false",
                   help="do not zero the image outside the lungs in each crop (default: zero it, as configs/patch_cpu.yaml)")
    p.add_argument("--amp", action="store_true", help="mixed precision (torch.autocast) in all three paths")
    p.add_argument("--ref-images", type=int, default=4, help="images timed in the reference loop (b)")
    p.add_argument("--ref-k", type=int, default=25, help="patches per image timed in the reference loop (b)")
    p.add_argument("--ref-centres", choices=["independent", "joint"], default="independent",
                   help="reference centre draw: row and column independently (faithful) or one mask pixel (correct)")
    common.add_run_options(p, "untimed full runs of a and c before timing", "timed runs of a and c (median reported)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name in ("images", "k", "chunk_size", "ref_images", "ref_k"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if min(args.batch_sizes) < 1:
        p.error("--batch-sizes must be >= 1")
    if max(args.batch_sizes) > args.images:
        p.error(f"--batch-sizes {max(args.batch_sizes)} is larger than --images {args.images}")
    if args.learner_input is not None and not (1 <= args.learner_input <= PATCH_SIZE and PATCH_SIZE % args.learner_input == 0):
        p.error(f"--learner-input must divide {PATCH_SIZE} (e.g. 224, 112, 56), got {args.learner_input}")
    return args


# --------------------------------------------------------------------------- setup


def build_learner(args: argparse.Namespace, device: torch.device) -> tuple[nn.Module, str, int, str]:
    """→ (model in eval mode on device, learner name, learner input side, where the input side came from)."""
    sidecar_input: int | None = None
    if args.weights is not None:
        try:
            model = Learner.from_pretrained(args.weights)
        except PatchflannelError as exc:
            raise SystemExit(f"error: --weights {args.weights}: {exc}") from None
        name = model.name
        if model.input_spec.mode != "patch":
            raise SystemExit(f"error: --weights {args.weights}: a whole-image learner; this benchmark times patch learners")
        sidecar_input = model.input_spec.learner_input
    else:
        name = args.learner
        try:
            model = create_learner(name, num_classes=NUM_CLASSES, in_chans=1)
        except (KeyError, ValueError) as exc:
            raise SystemExit(f"error: {exc}") from None
    if args.learner_input is not None:
        side, source = args.learner_input, "--learner-input"
        if sidecar_input is not None and int(sidecar_input) != side:
            print(f"warning: --learner-input {side} differs from the weights' learner_input {sidecar_input}")
    elif sidecar_input is not None:
        side, source = int(sidecar_input), f"from {args.weights}"
    else:
        side, source = DEFAULT_LEARNER_INPUT, "default, as configs/patch_cpu.yaml learner_input"
    try:
        InputSpec("patch", PATCH_SIZE, side)
    except ValueError as exc:
        raise SystemExit(f"error: learner input {side} ({source}): {exc}") from None
    return model.to(device).eval(), name, side, source


def load_decoded(cases: list[SegCase]) -> tuple[Tensor, Tensor]:
    """Decode once (untimed): uint8 images ``(N,1,1024,1024)`` and bool masks ``(N,1,1024,1024)`` on the CPU."""
    images, masks = [], []
    for case in cases:
        img, mask, _ = load_seg_case(case, WORK_SIZE)
        images.append(to_uint8(img))
        masks.append(mask)
    return torch.from_numpy(np.stack(images)).unsqueeze(1), torch.from_numpy(np.stack(masks)).unsqueeze(1)


# --------------------------------------------------------------------------- (a) batched path


@dataclass
class BatchedPath:
    """The project's path over all images, B at a time (see module docstring, (a))."""

    model: nn.Module
    images: Tensor  # (N,1,1024,1024) uint8, CPU
    masks: Tensor  # (N,1,1024,1024) bool, CPU
    batch_size: int
    k: int
    learner_input: int
    chunk_size: int
    mask_outside: bool
    amp: bool
    device: torch.device
    seed: int = 0

    def __post_init__(self) -> None:
        self.spec = InputSpec("patch", PATCH_SIZE, self.learner_input, mask_outside=self.mask_outside)
        self.factor = self.spec.factor  # 1 for learner_input 224: no shrink

    def make_inputs(self, imgs: Tensor, msk: Tensor) -> Tensor:
        """One batch's learner inputs ``(B,K,1,s,s)`` float [0,1], s = learner input, as ``Classifier.predict``:
        per-image seeds from the image content, shrink once by the integer factor, crop at the learner's size
        there, uint8 → float (``learners.make_inputs``)."""
        seeds = [image_seed(w, self.seed) for w in imgs[:, 0].cpu().numpy()]
        x, _, _ = make_inputs(imgs, msk, self.spec, self.k, seeds=seeds)
        return x

    def __call__(self) -> list[tuple[Tensor, Tensor]]:
        out = []
        for start in range(0, self.images.shape[0], self.batch_size):
            imgs = self.images[start:start + self.batch_size].to(self.device)
            msk = self.masks[start:start + self.batch_size].to(self.device)
            x = self.make_inputs(imgs, msk)  # shrink timed here, per batch (predict does it per call)
            hard, soft = vote(predict_distribution(self.model, x, chunk_size=self.chunk_size, amp=self.amp))
            out.append((hard.cpu(), soft.cpu()))
        return out


# --------------------------------------------------------------------------- (c) bare forward


@dataclass
class ForwardOnly:
    """The learner alone on pre-made crops, chunked exactly as (a) chunks them."""

    model: nn.Module
    n_images: int
    batch_size: int
    k: int
    learner_input: int
    chunk_size: int
    amp: bool
    device: torch.device
    seed: int = 0

    def __post_init__(self) -> None:
        gen = torch.Generator().manual_seed(self.seed)
        side = self.learner_input
        self.batch_sizes = [min(self.batch_size, self.n_images - s) for s in range(0, self.n_images, self.batch_size)]
        # One tensor per distinct batch size, reused: same shapes and chunks as (a).
        self.crops = {b: torch.rand((b * self.k, 1, side, side), generator=gen).to(self.device) for b in set(self.batch_sizes)}

    def __call__(self) -> None:
        autocast = torch.autocast(device_type=self.device.type) if self.amp else torch.autocast(self.device.type, enabled=False)
        with torch.inference_mode(), autocast:
            for b in self.batch_sizes:
                for chunk in self.crops[b].split(self.chunk_size):
                    self.model(chunk)


# --------------------------------------------------------------------------- (b) reference loop


def crop_padded(img: np.ndarray, row: int, col: int, size: int) -> np.ndarray:
    """``size``×``size`` crop of ``(H,W)`` ``img`` around (row, col), zeros beyond the border.

    Rows ``row - size//2 … row - size//2 + size - 1`` (same for columns): the
    convention of ``patchflannel.sampler.extract_patches``.
    """
    h, w = img.shape
    top, left = row - size // 2, col - size // 2
    out = np.zeros((size, size), dtype=img.dtype)
    r0, r1 = max(top, 0), min(top + size, h)
    c0, c1 = max(left, 0), min(left + size, w)
    out[r0 - top:r1 - top, c0 - left:c1 - left] = img[r0:r1, c0:c1]
    return out


def reference_centre(mask: np.ndarray, rng: np.random.Generator, mode: str) -> tuple[int, int]:
    """One centre from a ``(H,W) bool`` mask: row and column drawn independently, or one mask pixel ('joint')."""
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return int(rng.integers(mask.shape[0])), int(rng.integers(mask.shape[1]))
    if mode == "independent":
        return int(rng.choice(rows)), int(rng.choice(cols))
    j = int(rng.integers(rows.size))
    return int(rows[j]), int(cols[j])


@dataclass
class ReferenceLoop:
    """The reference's per-patch loop (see module docstring, (b)); counts centres outside the lungs."""

    model: nn.Module
    cases: list[SegCase]
    k: int
    learner_input: int
    mask_outside: bool
    amp: bool
    centres: str
    device: torch.device
    seed: int = 0
    outside: int = 0
    drawn: int = 0

    def __call__(self) -> tuple[Tensor, Tensor]:
        rng = np.random.default_rng(self.seed)
        logits: list[list[Tensor]] = [[] for _ in self.cases]
        autocast = torch.autocast(device_type=self.device.type) if self.amp else torch.autocast(self.device.type, enabled=False)
        for _ in range(self.k):
            for i, case in enumerate(self.cases):
                img, mask, _ = load_seg_case(case, WORK_SIZE)  # decode + resize image and mask files, every patch
                row, col = reference_centre(mask, rng, self.centres)
                self.drawn += 1
                self.outside += int(not mask[row, col])
                crop = crop_padded(img, row, col, PATCH_SIZE)
                if self.mask_outside:
                    crop = crop * crop_padded(mask, row, col, PATCH_SIZE)
                crop = resize(crop, self.learner_input, "area")
                x = torch.from_numpy(crop).reshape(1, 1, *crop.shape).to(self.device)
                with torch.inference_mode(), autocast:
                    out = self.model(x)
                logits[i].append(out[0].float().cpu())
        return vote(torch.stack([torch.stack(per_image) for per_image in logits]))


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Run the benchmark, print the table, write the CSV; returns the CSV rows."""
    args = parse_args(argv)
    device = common.resolve_device(args.device)
    with common.torch_threads(args.threads):
        return _run(args, device, argv)


def _run(args: argparse.Namespace, device: torch.device, argv: list[str] | None) -> list[dict[str, Any]]:
    cases = common.find_jsrt_or_exit(args.data, max(args.images, args.ref_images))
    model, learner, side, side_source = build_learner(args, device)
    info = common.machine_info(device)
    factor = PATCH_SIZE // side
    shrink = f"images shrunk ×{factor} once, then {side}px crops" if factor > 1 else f"no shrink: {side}px crops at 1024²"
    print(f"patch inference benchmark — {info['device']} ({info['device_name']}), {info['threads']} threads, "
          f"torch {info['torch']}, torchvision {info['torchvision']}")
    print(f"learner={learner} ({'weights ' + str(args.weights) if args.weights else 'random init'}), "
          f"learner_input={side} ({side_source}), patch_size={PATCH_SIZE} ({shrink}), K={args.k}, images={args.images}, "
          f"batch sizes={args.batch_sizes}, chunk_size={args.chunk_size}, mask_outside={args.mask_outside}, amp={args.amp}, "
          f"warmup={args.warmup}, repeats={args.repeats}, data={args.data}")

    images, masks = load_decoded(cases[:args.images])
    n_patches = args.images * args.k
    base = {"learner": learner, "learner_input": side, "patch_size": PATCH_SIZE, "shrink_factor": factor,
            "chunk_size": args.chunk_size,
            "mask_outside": args.mask_outside, "amp": args.amp, **info}

    # (b) first: it decides the speed-up of every (a) row.
    ref = ReferenceLoop(model, cases[:args.ref_images], args.ref_k, side, args.mask_outside, args.amp, args.ref_centres,
                        device, args.seed)
    ReferenceLoop(model, cases[:1], 1, side, args.mask_outside, args.amp, args.ref_centres, device, args.seed)()  # warm-up
    print(f"(b) reference loop on {args.ref_images} images × {args.ref_k} patches ...", flush=True)
    ref_seconds = common.time_once(ref, device)
    ref_patches = args.ref_images * args.ref_k
    per_patch = ref_seconds / ref_patches
    outside_note = (f"centres: row and column drawn independently (as the reference); {ref.outside}/{ref.drawn} "
                    f"({100 * ref.outside / ref.drawn:.1f}%) outside the lungs" if args.ref_centres == "independent"
                    else f"centres: one mask pixel drawn jointly; {ref.outside}/{ref.drawn} outside the lungs")
    basis = f"extrapolated linearly per image·patch from {args.ref_images} images × {args.ref_k} patches ({ref_seconds:.3g} s)"
    ref_rows = [
        {"path": "b_reference", "batch_size": 1, "images": args.ref_images, "k": args.ref_k, "patches": ref_patches,
         "seconds": ref_seconds, "extrapolated": False, "repeats": 1, "seconds_min": ref_seconds,
         "ref_centres": args.ref_centres, "note": f"measured; {outside_note}"},
        {"path": "b_reference", "batch_size": 1, "images": args.images, "k": args.k, "patches": n_patches,
         "seconds": per_patch * n_patches, "extrapolated": True, "repeats": 1, "ref_centres": args.ref_centres,
         "note": f"{basis}; {outside_note}"},
    ]
    ref_full_seconds = per_patch * n_patches

    rows: list[dict[str, Any]] = []
    for b in args.batch_sizes:
        print(f"(a) batched and (c) forward-only, batch size {b} ...", flush=True)
        batched = BatchedPath(model, images, masks, b, args.k, side, args.chunk_size, args.mask_outside, args.amp, device,
                              args.seed)
        forward = ForwardOnly(model, args.images, b, args.k, side, args.chunk_size, args.amp, device, args.seed)
        timing = common.time_interleaved({"a": batched, "c": forward}, device, args.warmup, args.repeats)
        ta, tc = timing["a"].median, timing["c"].median
        rows.append({"path": "a_batched", "batch_size": b, "images": args.images, "k": args.k, "patches": n_patches,
                     "seconds": ta, "ratio_a_over_c": ta / tc, "speedup_a_vs_b": ref_full_seconds / ta,
                     "extrapolated": False, "repeats": timing["a"].repeats, "seconds_min": timing["a"].min,
                     "note": f"decoded uint8 images + masks in memory; per batch: image seeds + downscale x{factor} "
                             f"(timed) + in-lung crops {side}px (make_inputs) + predict_distribution + vote; "
                             "speedup vs the extrapolated b row"})
        rows.append({"path": "c_forward", "batch_size": b, "images": args.images, "k": args.k, "patches": n_patches,
                     "seconds": tc, "extrapolated": False, "repeats": timing["c"].repeats, "seconds_min": timing["c"].min,
                     "note": "bare learner forward on pre-made random crops, same chunks as a"})
        del forward
    rows += ref_rows
    for row in rows:
        row.update({k: v for k, v in base.items() if k not in row})
        row["images_per_s"] = row["images"] / row["seconds"]
        row["patches_per_s"] = row["patches"] / row["seconds"]

    print()
    print(common.format_table(rows, TABLE_COLUMNS))
    print()
    for row in rows:
        if row["path"] == "a_batched":
            ok_r = "met" if row["ratio_a_over_c"] <= GOAL_RATIO else "NOT met"
            ok_s = "met" if row["speedup_a_vs_b"] >= GOAL_SPEEDUP else "NOT met"
            print(f"batch size {row['batch_size']}: a/c = {row['ratio_a_over_c']:.3f} (goal <= {GOAL_RATIO}: {ok_r}); "
                  f"a vs b = {row['speedup_a_vs_b']:.1f}× (goal >= {GOAL_SPEEDUP:g}×: {ok_s})")
    print(f"b: {basis}.")
    print(f"b: {outside_note}.")
    common.finish(NAME, device, args.out_dir, rows, COLUMNS, __file__, argv)
    return rows


if __name__ == "__main__":
    main()
