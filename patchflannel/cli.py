"""Command-line interface: wires the stages together; the only module that imports typer and rich.

Every command turns :class:`~patchflannel.errors.PatchflannelError` into one
red line and exit code 2; batch commands report bad files, carry on and exit
1 if any failed; Ctrl-C exits 130 with what was kept. Anything else is a bug
and is shown as one, with its traceback.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any, Optional, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from . import __version__

app = typer.Typer(
    name="patchflannel",
    help="Patched FLANNEL for chest X-ray research: lung segmentation, in-lung patch learners, FLANNEL ensemble.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
out = Console()
T = TypeVar("T")

DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")]
PrecisionOpt = Annotated[str, typer.Option(help="auto (mixed precision on CUDA, fp32 on CPU), fp32, bf16 or fp16.")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override any config value: --set train.epochs=40 (repeatable).")]
RestartOpt = Annotated[bool, typer.Option("--restart/--resume", help="Discard the run folder's checkpoint and start over "
                                                                    "(default: resume from it if the config is the same).")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite/--no-overwrite", help="Replace an earlier run's results in --out.")]


def _version(value: bool) -> None:
    if value:
        out.print(f"patchflannel {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version and exit.")] = False) -> None:
    """Patched FLANNEL for chest X-ray research. Research software, not a medical device."""


# --------------------------------------------------------------------------- plumbing


def _setup_logging(verbose: bool, rank: int = 0) -> None:
    level = logging.DEBUG if verbose else logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(message)s", datefmt="[%X]",
                        handlers=[RichHandler(console=console, show_path=False)], force=True)
    for noisy in ("matplotlib", "PIL", "h5py"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@contextlib.contextmanager
def _guard(resume_hint: str = "") -> Iterator[None]:
    """User errors → one red line, exit 2; Ctrl-C → exit 130; bugs keep their traceback."""
    from .errors import PatchflannelError

    try:
        yield
    except PatchflannelError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)  # one line, never wrapped
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: finished outputs are kept (written atomically)" +
                      (f"; {resume_hint}" if resume_hint else ""))
        raise typer.Exit(130) from None
    except (typer.Exit, SystemExit):
        raise
    except Exception:
        console.print(f"[bold red]internal error[/] in patchflannel {__version__}: this is a bug, not a problem with "
                      "your input; please report it with the traceback below.")
        raise


def _progress() -> Progress:
    return Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True,
                    disable=not console.is_terminal)


def _tracker(progress: Progress) -> Callable[[Iterable[T], str, Optional[int]], Iterable[T]]:
    def track(it: Iterable[T], description: str = "", total: int | None = None) -> Iterable[T]:
        return progress.track(it, total=total, description=description)

    return track


def _config_base(config: str) -> Path:
    """Relative data paths in a config resolve from the current folder, else from the config's project folder."""
    from .config import resolve_config_path

    return resolve_config_path(config).resolve().parent.parent


def _resolve_path(value: str | None, base: Path) -> str | None:
    if value is None:
        return None
    if value.startswith("jsrt:"):
        return "jsrt:" + str(_resolve_path(value[5:], base))
    p = Path(value).expanduser()
    if p.is_absolute() or p.exists():
        return str(p)
    cand = base / p
    return str(cand) if cand.exists() else str(p)


def _input_files(inputs: list[Path]) -> list[Path]:
    from .errors import DataError
    from .io import list_images

    files = list_images([str(p) for p in inputs])
    if not files:
        raise DataError(f"no image files found in {', '.join(map(str, inputs))}")
    return files


def _write_mask(mask_path: Path, overlay_path: Path | None, image: Any, mask: Any) -> None:
    from .io import to_uint8, write_png
    from .segment import overlay

    write_png(mask_path, to_uint8(mask))
    if overlay_path is not None:
        write_png(overlay_path, overlay(image, mask))


def _read_batch(files: list[Path], od: Any, csv_name: str, columns: list[str], names: dict[Path, str],
                results: list[dict[str, Any]], advance: Callable[[], None],
                deferred: list[Callable[[], None]] | None = None) -> tuple[list[Path], list[Any]]:
    """Read a batch of inputs for segment/predict/explain: each unreadable file gets its one-line message,
    its ``status=error`` row in ``csv_name`` and its summary entry (now, or, with ``deferred``, when the
    caller runs the callables appended there: rows stay in input order when batches are read ahead);
    the readable ones are returned."""
    from .errors import ImageReadError
    from .io import read_images

    batch, images = [], []
    for f, got in zip(files, read_images(files)):
        if not isinstance(got, ImageReadError):
            images.append(got)
            batch.append(f)
        else:
            def report(f: Path = f, exc: ImageReadError = got) -> None:
                console.print(f"[red]✗[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
                od.append_row(csv_name, {"file": str(f), "name": names[f], "status": "error", "error": exc.problem},
                              columns)
                results.append({"file": f, "status": "error", "detail": exc.problem})
                advance()

            if deferred is None:
                report()
            else:
                deferred.append(report)
    return batch, images


@contextlib.contextmanager
def _unreadable_rows_kept(deferred: list[Callable[[], None]]) -> Iterator[None]:
    """Around a batch's computation: should it fail, the batch's unreadable files still get their rows
    (the deferred reports of :func:`_read_batch`) before the error propagates."""
    try:
        yield
    except BaseException:
        for report in deferred:
            report()
        raise


def _in_input_order(chunk: list[Path], batch: list[Path], deferred: list[Callable[[], None]],
                    write_read: Callable[[int], None]) -> None:
    """Write a batch's rows in input order: an unreadable file's deferred report (from :func:`_read_batch`)
    in its turn, ``write_read(i)`` for the i-th file that was read. Should a write fail, the unreadable
    files' reports not yet run are run before the error propagates, so their rows are not lost."""
    readable = set(batch)
    failed = iter(deferred)
    steps = [None if f in readable else next(failed) for f in chunk]
    i = 0
    for n, report in enumerate(steps):
        try:
            if report is None:
                write_read(i)
                i += 1
            else:
                report()
        except BaseException:
            for later in steps[n + 1:]:
                if later is not None:
                    later()
            raise


def _summary_table(results: list[dict[str, Any]], title: str, limit: int = 40) -> None:
    n_ok = sum(r["status"] == "ok" for r in results)
    table = Table(title=f"{title}: {n_ok} ok, {len(results) - n_ok} failed", show_lines=False)
    table.add_column("file", overflow="fold")
    table.add_column("status")
    table.add_column("detail", overflow="fold")
    shown = [r for r in results if r["status"] != "ok"] + [r for r in results if r["status"] == "ok"]
    for r in shown[:limit]:
        table.add_row(escape(str(r["file"])), "[green]ok[/]" if r["status"] == "ok" else "[red]failed[/]", r["detail"])
    if len(results) > limit:
        table.caption = f"… {len(results) - limit} more rows in the CSV"
    out.print(table)


# --------------------------------------------------------------------------- segment


SEG_COLUMNS = ["file", "name", "status", "error", "width", "height", "convention", "lung_fraction", "components",
               "removed", "balance", "convexity", "suspicious", "reason"]


@app.command()
def segment(
    inputs: Annotated[list[Path], typer.Argument(help="Radiograph files or folders (PNG, JPEG, DICOM, JSRT .IMG, …).")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Output folder: masks/, overlays/ (unless --no-overlays), masks.csv.")] = Path("out"),
    convention: Annotated[str, typer.Option(help="scr (SCR lungs, without the region behind the heart; the "
                                                  "convention the classifier samples from, with its own pinned "
                                                  "U-Net lung_unet_v7) or full (whole lung field, V7 style).")] = "scr",
    weights: Annotated[Optional[str], typer.Option("--weights", help="Lung U-Net weights: a folder or a name. Default: "
                                                    "lung_unet_v7c for --convention scr, lung_unet_v7b for full "
                                                    "(lung_unet_jsrt: the JSRT-only scr U-Net of v0.1–v0.5).")] = None,
    store: Annotated[Optional[Path], typer.Option(help="Also write images + masks at 1024² to this HDF5 store.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, max=256)] = 4,
    overlays: Annotated[bool, typer.Option("--overlays/--no-overlays", help="Write OUT/overlays/NAME.png (the outline "
                                                                            "on the radiograph; about a third of "
                                                                            "segment's time per image here).")] = True,
    backend: Annotated[str, typer.Option("--backend", help="What runs the U-Net: auto (ONNX Runtime on the CPU when "
                                                           "installed; 1.2–1.5× PyTorch's images/s here, docs/results.md §1b), onnx or torch (what "
                                                           "eval-seg measures; masks agree to a few border pixels).")] = "auto",
    overwrite: OverwriteOpt = False,
    device: DeviceOpt = "auto",
    verbose: VerboseOpt = False,
) -> None:
    """Lung masks: OUT/masks/NAME.png (255 = lung, input size), OUT/overlays/NAME.png (unless --no-overlays) and a quality line per image in OUT/masks.csv."""
    _setup_logging(verbose)
    with _guard():
        from .errors import OutputError
        from .io import default_threads, resize
        from .outputs import OutputDir, unique_names
        from .runtime import resolve_device
        from .segment import CONVENTIONS, DEFAULT_SEGMENTER, FULL_SEGMENTER, WORK_SIZE, LungSegmenter
        from .store import StoreWriter

        from .backend import BACKENDS

        if convention not in CONVENTIONS:
            raise OutputError(f"--convention {convention!r}: choose {' or '.join(CONVENTIONS)}")
        if backend not in BACKENDS:
            raise OutputError(f"--backend {backend!r}: choose one of {', '.join(BACKENDS)}")
        if weights is None:
            weights = FULL_SEGMENTER if convention == "full" else DEFAULT_SEGMENTER
        dev = resolve_device(device)
        files = _input_files(inputs)
        names = unique_names(files)
        with OutputDir(out_dir, "segment", overwrite) as od:
            od.inputs = [str(f) for f in files]
            seg = LungSegmenter.from_pretrained(weights, device=dev, backend=backend)
            if convention not in seg.conventions:
                raise OutputError(f"--convention {convention}: the weights {weights} produce only "
                                  f"{', '.join(seg.conventions)} masks (the two-convention U-Net is {FULL_SEGMENTER})")
            used = seg.backend_used()  # export/check the ONNX graph now: a failure stops before any file is read
            writer = StoreWriter(store, provenance={"command": "segment", "weights": str(weights),
                                                    "convention": convention}) if store else None
            results: list[dict[str, Any]] = []
            t0 = time.perf_counter()
            try:
                with _progress() as progress:
                    task = progress.add_task("segmenting", total=len(files))
                    for start in range(0, len(files), batch_size):
                        chunk, deferred = files[start:start + batch_size], []
                        batch, images = _read_batch(chunk, od, "masks.csv", SEG_COLUMNS, names,
                                                    results, lambda: progress.advance(task), deferred)
                        with _unreadable_rows_kept(deferred):
                            segs = seg.segment(images, convention, batch_size) if images else []
                            jobs = [(od.file("masks", f"{names[f]}.png"), od.file("overlays", f"{names[f]}.png") if overlays
                                     else None, im, res.mask) for f, im, res in zip(batch, images, segs)]
                            if jobs:
                                with ThreadPoolExecutor(max(1, min(len(jobs), default_threads()))) as pool:  # PNG encoding releases the GIL
                                    list(pool.map(_write_mask, *zip(*jobs)))  # all files of the batch written before its rows

                        def write_row(i: int, batch: list[Path] = batch, images: list[Any] = images,
                                      segs: list[Any] = segs) -> None:
                            f, im, res = batch[i], images[i], segs[i]
                            name, q = names[f], res.quality
                            if writer is not None:
                                writer.add(name, resize(im, WORK_SIZE, "area"), res.mask_work,
                                           {"source_file": str(f), "orig_height": im.shape[0], "orig_width": im.shape[1]})
                            od.append_row("masks.csv", {"file": str(f), "name": name, "status": "ok", "width": im.shape[1],
                                                        "height": im.shape[0], "convention": convention,
                                                        "lung_fraction": f"{q.lung_fraction:.4f}", "components": q.components,
                                                        "removed": q.removed, "balance": f"{q.balance:.3f}",
                                                        "convexity": f"{q.convexity:.3f}",
                                                        "suspicious": int(q.suspicious), "reason": q.reason}, SEG_COLUMNS)
                            detail = f"{im.shape[1]}×{im.shape[0]}, lungs {100 * q.lung_fraction:.1f} %"
                            if q.suspicious:
                                detail += f" [yellow](check the {'overlay' if overlays else 'mask'}: {q.reason})[/]"
                            results.append({"file": f, "status": "ok", "detail": detail, "suspicious": q.suspicious})
                            progress.advance(task)

                        _in_input_order(chunk, batch, deferred, write_row)
            except BaseException:
                if writer is not None:
                    writer.abort()
                raise
            if writer is not None:
                writer.close() if len(writer) else writer.abort()
        elapsed = time.perf_counter() - t0
        _summary_table(results, "segment")
        n_ok = sum(r["status"] == "ok" for r in results)
        n_sus = sum(bool(r.get("suspicious")) for r in results)
        out.print(f"{n_ok}/{len(results)} segmented in {elapsed:.1f} s ({convention} convention, {weights}, {used}) "
                  f"→ {out_dir / 'masks'}, "
                  + (f"{out_dir / 'overlays'}, " if overlays else "") + f"quality lines in {out_dir / 'masks.csv'}"
                  + (f"; {n_sus} flagged suspicious" if n_sus else "") + (f", store: {store}" if store and n_ok else ""))
        if n_ok < len(results):
            raise typer.Exit(1)


# --------------------------------------------------------------------------- train / evaluate / export the segmenter


def _dist_and_logging(device: str, verbose: bool) -> Any:
    from .runtime import init_distributed

    dist = init_distributed(device)
    _setup_logging(verbose, dist.rank)
    return dist


@app.command("train-seg")
def train_seg(
    config: Annotated[str, typer.Option(help="Config name (configs/NAME.yaml) or a YAML path.")] = "seg_cpu",
    run_dir: Annotated[Path, typer.Option(help="Run folder: config, split, checkpoint, history, best/, test metrics.")] = Path("runs/seg"),
    set_: SetOpt = None,
    restart: RestartOpt = False,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    verbose: VerboseOpt = False,
) -> None:
    """Train the lung U-Net on JSRT/SCR + V7 (one output per convention); evaluates the best checkpoint on the held-out test parts."""
    with _guard("rerun the same command to resume from the last checkpoint"):
        dist = _dist_and_logging(device, verbose)
        from .config import load_config
        from .runtime import resolve_precision
        from .segment_train import SegTrainConfig, train_segmenter

        cfg = load_config(SegTrainConfig, config, sets=set_)
        base = _config_base(config)
        cfg.data.jsrt = _resolve_path(cfg.data.jsrt, base)
        cfg.data.v7 = _resolve_path(cfg.data.v7, base)
        with _progress() as progress:
            summary = train_segmenter(cfg, run_dir, dist, resolve_precision(precision, dist.device), restart,
                                      _tracker(progress))
        if dist.is_main:
            for key in ("test_jsrt", "test_v7"):
                if key in summary:
                    _print_seg_summary(summary[key], run_dir, key)
            out.print(f"best weights: {run_dir / 'best'}; ship them with `patchflannel export-seg {run_dir} --to DIR`")


def _print_seg_summary(summary: dict[str, Any], where: Path, prefix: str) -> None:
    table = Table(title=f"{summary['domain']}: {prefix} (masks at 1024²)")
    for col in ("convention", "n", "Jaccard mean ± std", "median", "worst", "< 0.75", "Dice", "missed", "added"):
        table.add_column(col)
    for conv, s in summary["by_convention"].items():
        if not s.get("n"):
            continue
        table.add_row(conv + (" (own)" if conv == summary["own_convention"] else ""), str(s["n"]),
                      f"{s['jaccard_mean']:.4f} ± {s['jaccard_std']:.4f}", f"{s['jaccard_median']:.4f}",
                      f"{s['jaccard_min']:.4f} ({s['worst_image'][:20]})", str(s["below_0.75"]),
                      f"{s['dice_mean']:.4f}", f"{100 * s['missed_mean']:.1f} %", f"{100 * s['added_mean']:.1f} %")
    out.print(table)
    skipped = next(iter(summary["by_convention"].values())).get("n_skipped_empty_reference", 0)
    if skipped:
        out.print(f"[yellow]{skipped} images skipped: empty reference mask[/]")
    out.print(f"per image: {where / f'{prefix}_metrics.csv'}; worst cases: {where / f'{prefix}_worst_cases.png'}")


@app.command("eval-seg")
def eval_seg(
    data: Annotated[Path, typer.Option(help="A JSRT/SCR folder or a V7 folder (images/, masks/, metadata.csv).")] = Path("../shared/data/jsrt"),
    weights: Annotated[str, typer.Option("--weights", help="Lung U-Net weights: a folder or a name "
                                                           "(lung_unet_v7c, lung_unet_jsrt, …).")] = "lung_unet_v7c",
    split: Annotated[Optional[Path], typer.Option(help="A train-seg split.json; evaluates its test part. "
                                                       "Default: the test part saved with the weights.")] = None,
    all_images: Annotated[bool, typer.Option("--all", help="Evaluate every image found (ignores the split).")] = False,
    out_dir: Annotated[Path, typer.Option("--out", "-o")] = Path("runs/seg_eval"),
    device: DeviceOpt = "auto",
    verbose: VerboseOpt = False,
) -> None:
    """Jaccard/Dice per image and convention, mean ± std, median, worst images (figure), missed and added lung."""
    _setup_logging(verbose)
    with _guard():
        import json

        from .data import discover_seg
        from .errors import DataError
        from .runtime import resolve_device
        from .segment import LungSegmenter
        from .segment_train import eval_seg_data

        seg = LungSegmenter.from_pretrained(weights, device=resolve_device(device))
        domain = discover_seg(data)[0].domain
        ids = None
        if not all_images:
            if split is not None:
                try:
                    saved = json.loads(split.read_text())
                except (OSError, json.JSONDecodeError) as exc:
                    raise DataError(f"--split {split}: not a readable split.json ({exc})") from None
            else:
                saved = seg.config.get("split") or {}
            part = saved.get(domain, saved) if isinstance(saved, dict) else {}
            if not isinstance(part, dict) or "test" not in part:
                raise DataError(f"no {domain} test part in {'--split ' + str(split) if split else 'the weights'}; "
                                "pass --split RUN/split.json or --all")
            ids = part["test"]
        with _progress() as progress:
            summary = eval_seg_data(seg, data, ids, out_dir, _tracker(progress))
        _print_seg_summary(summary, out_dir, f"eval_{domain}")


@app.command("export-seg")
def export_seg(
    run_dir: Annotated[Path, typer.Argument(help="A train-seg run folder.")],
    to: Annotated[Path, typer.Option(help="Destination weights folder, e.g. weights/lung_unet_v7.")],
    half: Annotated[bool, typer.Option("--half/--full-precision", help="Store float16 tensors (half the size).")] = False,
) -> None:
    """Ship a run's best lung U-Net with its split, test metrics and training data in its config."""
    _setup_logging(False)
    with _guard():
        from .segment_train import export_segmenter

        dest = export_segmenter(run_dir, to, half=half)
        out.print(f"exported {dest} (config.json + model.safetensors)")


# --------------------------------------------------------------------------- patch learners


def _segmenter_identity(ref: str) -> tuple[Path, str]:
    from ._files import file_sha256
    from .hub import WEIGHTS_NAME, resolve_weights

    path = resolve_weights(ref, option="--set data.segmenter=PATH")
    f = path / WEIGHTS_NAME if path.is_dir() else path.with_suffix(".safetensors")
    return path, file_sha256(f)


def _load_cxr_data(cfg: Any, base: Path, rebuild: bool, dist: Any, track: Any) -> Any:
    """Records of the config's sources → the cache (built when missing or with --rebuild) → CxrData."""
    from .data import build_cache, load_cache, load_records
    from .runtime import resolve_device
    from .segment import LungSegmenter

    cfg.data.sources = [_resolve_path(x, base) for x in cfg.data.sources]
    cfg.data.train_only = [_resolve_path(x, base) for x in cfg.data.train_only]
    cache = Path(cfg.data.cache)
    if not cache.is_absolute() and not cache.parent.exists() and (base / cache.parent).exists():
        cache = base / cache
    cfg.data.cache = str(cache)
    main = load_records(cfg.data.sources, cfg.data.exclude_findings)
    extra = load_records(cfg.data.train_only, cfg.data.exclude_findings) if cfg.data.train_only else []
    records = main + extra
    seg_path, seg_sha = _segmenter_identity(cfg.data.segmenter)
    if (rebuild or not cache.exists()) and dist.is_main:
        seg = LungSegmenter.from_pretrained(seg_path, device=resolve_device("auto") if not dist.enabled else dist.device)
        console.print(f"building the cache {cache} ({len(records)} images; reading and segmenting each once)")
        _, errors = build_cache(records, seg, cache, cfg.data.segmenter, seg_sha, track=track)
        for e in errors:
            console.print(f"[red]✗[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        if errors:
            console.print(f"[yellow]{len(errors)} unreadable images left out of the cache[/]")
    dist.barrier()
    data = load_cache(cache, records, seg_sha, cfg.data.dedup)
    extra_ids = {r.image_id for r in extra}
    data.roles = ["train_only" if i in extra_ids else "main" for i in data.ids]
    if data.duplicates:
        console.print(f"{len(data.duplicates)} near-identical image pairs under different patient ids: their patients "
                      "are grouped together in every split")
    return data


@app.command("train-patch")
def train_patch(
    config: Annotated[str, typer.Option(help="Config name (configs/NAME.yaml) or a YAML path.")] = "patch_cpu",
    run_dir: Annotated[Path, typer.Option(help="Run folder (resumable: finished folds are reused).")] = Path("runs/patch"),
    k: Annotated[Optional[int], typer.Option("--k", min=1, max=2000, help="Crops per image when voting (paper: 100).")] = None,
    learner: Annotated[Optional[list[str]], typer.Option("--learner", help="Learner (repeatable); global-NAME for a "
                                                         "whole-image learner. Default: the config's.")] = None,
    set_: SetOpt = None,
    rebuild: Annotated[bool, typer.Option("--rebuild", help="Rebuild the cache and make a new split.")] = False,
    restart: RestartOpt = False,
    parallel: Annotated[str, typer.Option(help="Under torchrun: ddp (every rank trains each model together) or jobs "
                                               "(each rank trains whole learners alone).")] = "ddp",
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    verbose: VerboseOpt = False,
) -> None:
    """Train learners on in-lung patches (or whole images) over patient-grouped folds; write out-of-fold and test votes."""
    with _guard("rerun the same command: finished folds are reused and the running one resumes from its checkpoint"):
        dist = _dist_and_logging(device, verbose)
        from .config import load_config
        from .errors import ConfigError
        from .patch_train import PatchTrainConfig, train_patch_run
        from .runtime import resolve_precision

        if parallel not in ("ddp", "jobs"):
            raise ConfigError(f"--parallel {parallel!r}: choose ddp or jobs")
        cfg = load_config(PatchTrainConfig, config, sets=set_, overrides={"k": k, "learners": list(learner) if learner else None})
        if not cfg.pretrained:
            console.print("[yellow]note:[/] learners start from random weights (no ImageNet checkpoint); "
                          "--set pretrained=true uses torchvision's from $TORCH_HOME/hub/checkpoints")
        with _progress() as progress:
            track = _tracker(progress)
            data = _load_cxr_data(cfg, _config_base(config), rebuild, dist, track)
            results = train_patch_run(cfg, data, run_dir, dist, resolve_precision(precision, dist.device), restart,
                                      rebuild, parallel, track)
        if not dist.is_main:
            return
        from .data import CLASSES

        refit = any(m.get("test_refit") for m in results.values())
        table = Table(title=f"held-out test part, K={cfg.k}: "
                            + ("refit model (mean of fold models)" if refit else "mean of fold models"))
        table.add_column("learner")
        for c in CLASSES:
            table.add_column(f"F1 {c}")
        table.add_column("macro-F1")
        table.add_column("OOF macro-F1")
        for name, m in results.items():
            main = m.get("test_refit") or m["test_mean_of_fold_models"]
            folds = m["test_mean_of_fold_models"]
            table.add_row(name, *[f"{main['per_class'][c]['f1']:.3f}" for c in CLASSES],
                          f"{main['macro_f1']:.3f}" + (f" ({folds['macro_f1']:.3f})" if refit else ""),
                          f"{m['oof']['macro_f1']:.3f}")
        out.print(table)
        out.print(f"run folder: {run_dir} (per learner: oof.npz, test.npz, metrics.json, confusion_test.png)")


# --------------------------------------------------------------------------- ensemble


@app.command()
def ensemble(
    runs: Annotated[list[Path], typer.Argument(help="train-patch run folder(s) with <learner>/oof.npz and test.npz.")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Output folder (FLANNEL, table, claims, plots).")] = Path("runs/ensemble"),
    config: Annotated[str, typer.Option(help="Config name (configs/NAME.yaml) or a YAML path.")] = "ensemble_cpu",
    learner: Annotated[Optional[list[str]], typer.Option("--learner", help="Restrict to these learners (repeatable).")] = None,
    set_: SetOpt = None,
    device: DeviceOpt = "auto",
    verbose: VerboseOpt = False,
) -> None:
    """Train FLANNEL on out-of-fold learner distributions, with every baseline, and evaluate on the held-out test part."""
    with _guard():
        # The combiners are seconds-long full-batch fits: under torchrun, rank 0 does the work and
        # writes the report while the other ranks wait (nothing is written twice).
        dist = _dist_and_logging(device, verbose)
        if not dist.is_main:
            dist.barrier()
            return
        from .config import load_config
        from .ensemble_run import EnsembleConfig, run_ensemble
        from .errors import DataError
        from .runtime import resolve_device

        cfg = load_config(EnsembleConfig, config, sets=set_, overrides={"learners": list(learner) if learner else None})
        for r in runs:
            if not r.is_dir():
                raise DataError(f"run folder {r} not found")
        with _progress() as progress:
            res = run_ensemble(cfg, [r.resolve() for r in runs], out_dir, device=resolve_device(device),
                               track=_tracker(progress))
        out.print((out_dir / "table.md").read_text(encoding="utf-8"))
        if (out_dir / "table_shipped.md").exists():
            out.print((out_dir / "table_shipped.md").read_text(encoding="utf-8"))
        if (out_dir / "claims.md").exists():
            out.print((out_dir / "claims.md").read_text(encoding="utf-8"))
        cal = res.get("calibration") or {}
        if cal:
            fl = cal.get("test_ece_floor") or {}
            floor = (f" (a perfectly calibrated model: {fl['median']:.3f} [{fl['low']:.3f}, {fl['high']:.3f}] "
                     f"on {fl['n_images']} images)" if fl else "")
            out.print(f"calibration (temperature {cal['temperature']:.3f}, fitted out of fold): test ECE "
                      f"{cal['test_ece_raw']:.3f} → {cal['test_ece_calibrated']:.3f}{floor}")
        out.print(f"ensemble folder: {out_dir}; ship it with `patchflannel export-ensemble {out_dir} --to DIR`")
        dist.barrier()


@app.command("export-ensemble")
def export_ensemble(
    ensemble_dir: Annotated[Path, typer.Argument(help="An `ensemble` output folder.")],
    to: Annotated[Path, typer.Option(help="Destination classifier folder (replaced whole), e.g. weights/ensemble.")],
    members: Annotated[str, typer.Option(help="auto (refit when every learner has a finished refit model, else "
                                              "folds), folds (each learner's fold models, averaged) or refit (one "
                                              "model per learner retrained on all non-test images: what ships).")] = "auto",
    half: Annotated[bool, typer.Option("--half/--full-precision", help="Store learner tensors as float16.")] = True,
) -> None:
    """Ship a FLANNEL model with its learners, segmenter reference and calibration as one classifier folder (used by `predict`)."""
    _setup_logging(False)
    with _guard():
        from .ensemble_run import export_classifier

        dest = export_classifier(ensemble_dir, to, members=members, half=half)
        import json

        chosen = json.loads((dest / "config.json").read_text(encoding="utf-8"))["training"]["members"]
        out.print(f"exported the classifier to {dest} with {chosen} members (load it with Classifier.from_pretrained "
                  "or predict --weights)")


# --------------------------------------------------------------------------- predict


def _predict_columns(classes: tuple[str, ...]) -> list[str]:
    return ["file", "name", "status", "error", "label", "confidence", *[f"p_{c}" for c in classes], "lung_fraction",
            "mask_suspicious", "k", "k_max", "path", "seed"]


@app.command()
def predict(
    inputs: Annotated[list[Path], typer.Argument(help="Radiograph files or folders (PNG, JPEG, DICOM, JSRT .IMG, …).")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Output folder: predictions.csv, json/, overlays/.")] = Path("out"),
    k: Annotated[Optional[int], typer.Option("--k", min=1, max=2000, help="In-lung crops per image (default: the weights'); "
                                                                      "the fast path stops early once more crops would "
                                                                      "not change the answer.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the crop centres (each image's crops also depend on its content only).")] = 0,
    batch_size: Annotated[int, typer.Option(min=1, max=64, help="Images per forward batch (1 measured fastest on 2 CPU cores).")] = 1,
    exact: Annotated[bool, typer.Option("--exact", help="The reference path: PyTorch models, all K crops of every image "
                                                        "(5–6× slower than the default fast path on a 2-core CPU, same labels; docs/results.md §8).")] = False,
    backend: Annotated[str, typer.Option("--backend", help="What runs the learners on the fast path: auto (ONNX Runtime "
                                                           "on the CPU when installed), onnx or torch.")] = "auto",
    workers: Annotated[Optional[int], typer.Option("--workers", min=1, max=64, help="Batches predicted side by side, one "
                                                   "thread each (default: one per CPU thread, at most 4; 1 with --explain "
                                                   "or on a GPU). Answers do not depend on it beyond float rounding.")] = None,
    weights: Annotated[str, typer.Option("--weights", help="Classifier folder or name (export-ensemble writes one).")] = "ensemble",
    seg_weights: Annotated[Optional[str], typer.Option("--seg-weights", help="Lung U-Net (default: the one the classifier "
                                                                           "was trained with).")] = None,
    explain_maps: Annotated[bool, typer.Option("--explain", help="Also write Grad-CAM heat-maps (heatmaps/NAME.png), "
                                                                 "overlays/NAME_explain.png and per-crop probabilities "
                                                                 "in the JSON (see `explain`).")] = False,
    overwrite: OverwriteOpt = False,
    device: DeviceOpt = "auto",
    verbose: VerboseOpt = False,
) -> None:
    """Whole pipeline: lung mask → K in-lung crops → learners → FLANNEL → calibrated probabilities per image."""
    _setup_logging(verbose)
    # PyTorch's idle OpenMP threads must sleep, not spin, while ONNX Runtime's sessions use the cores
    # (measured 10 % faster on the fast path, no slower on --exact). Read when torch loads: set it first.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    with _guard():
        from ._files import write_json
        from .io import resize, write_png
        from .outputs import OutputDir, unique_names
        from .pipeline import Classifier
        from .runtime import resolve_device
        from .segment import overlay

        dev = resolve_device(device)  # before the output folder is created: a bad --device leaves nothing behind
        from .backend import BACKENDS
        from .errors import ConfigError

        if backend not in BACKENDS:
            raise ConfigError(f"--backend {backend!r}: choose one of {', '.join(BACKENDS)}")
        files = _input_files(inputs)
        names = unique_names(files)
        with OutputDir(out_dir, "predict", overwrite) as od:
            od.inputs = [str(f) for f in files]
            clf = Classifier.from_pretrained(weights, device=dev, segmenter=seg_weights, backend=backend)
            cols = _predict_columns(clf.classes)
            kk = clf.default_k if k is None else k
            results: list[dict[str, Any]] = []
            n_run = 0  # batches predicted
            t0 = time.perf_counter()
            with _progress() as progress:
                task = progress.add_task("predicting", total=len(files))

                def batches() -> Iterator[tuple[Any, list[Any]]]:
                    """Read lazily (ahead of the workers); an unreadable file is reported in its turn."""
                    for start in range(0, len(files), batch_size):
                        chunk, deferred = files[start:start + batch_size], []
                        batch, images = _read_batch(chunk, od, "predictions.csv", cols, names,
                                                    results, lambda: progress.advance(task), deferred)
                        yield (chunk, batch, images, deferred), images

                stream: Iterator[tuple[Any, list[Any]]]
                if explain_maps:  # Grad-CAM: the exact path, one batch at a time
                    stream = ((tag, _predict_maybe_explain(clf, images, kk, seed, batch_size, True) if images else [])
                              for tag, images in batches())
                    done = stream
                else:
                    stream = clf.predict_stream(batches(), kk, seed, exact=exact, workers=workers, converted=True)
                    done = ((tag, [(p, None) for p in preds]) for tag, preds in stream)
                with contextlib.closing(stream):  # on an error here, the workers stop now, not at exit
                    for (chunk, batch, images, deferred), pairs in done:
                        n_run += bool(images)

                        def write_result(i: int, batch: list[Path] = batch, images: list[Any] = images,
                                         pairs: list[Any] = pairs) -> None:
                            f, im, (p, ex) = batch[i], images[i], pairs[i]
                            name = names[f]
                            ok = p.status == "ok"
                            od.append_row("predictions.csv", {
                                "file": str(f), "name": name, "status": p.status, "error": p.message,
                                "label": p.label, "confidence": f"{p.confidence:.4f}" if ok else "",
                                **{f"p_{c}": f"{v:.6f}" if ok else "" for c, v in zip(clf.classes, p.probs)},
                                "lung_fraction": f"{p.quality.lung_fraction:.4f}", "mask_suspicious": int(p.quality.suspicious),
                                "k": p.k, "k_max": kk, "path": p.path, "seed": seed}, cols)
                            write_json(od.file("json", f"{name}.json"), {
                                "file": str(f), "status": p.status, "message": p.message, "label": p.label,
                                "probabilities": dict(zip(clf.classes, map(float, p.probs))) if ok else None,
                                "probabilities_uncalibrated": dict(zip(clf.classes, map(float, p.raw_probs))) if ok else None,
                                "calibration": clf.calibrator.to_dict(), "k": p.k, "k_max": kk, "path": p.path,
                                "backend": p.backend, "seed": seed,
                                "mask": {"lung_fraction": p.quality.lung_fraction, "suspicious": p.quality.suspicious,
                                         "reason": p.quality.reason},
                                "learners": {n: {"distribution": dict(zip(clf.classes, map(float, p.learner_probs[i]))),
                                                 "weight": None if p.learner_weights is None else float(p.learner_weights[i])}
                                             for i, n in enumerate(clf.names)},
                                "crop_centres_1024": None if p.centres is None else p.centres.tolist(),
                                **(_explanation_json(clf, p, ex) if ex is not None else {}),
                                "note": "research software, not a medical device"})
                            write_png(od.file("overlays", f"{name}.png"), overlay(im, resize(p.mask, im.shape, "nearest")))
                            if ex is not None and ok:
                                _write_explanation(od, name, im, ex)
                            if ok:
                                detail = f"{p.label} ({p.confidence:.2f})  " + " ".join(
                                    f"{c}={v:.2f}" for c, v in zip(clf.classes, p.probs))
                                if p.quality.suspicious:
                                    detail += f" [yellow](mask: {p.quality.reason})[/]"
                                results.append({"file": f, "status": "ok", "detail": detail})
                            else:
                                console.print(f"[red]✗[/] {escape(str(f))}: {escape(p.message)}", highlight=False, soft_wrap=True)
                                results.append({"file": f, "status": p.status, "detail": p.message})
                            progress.advance(task)

                        _in_input_order(chunk, batch, deferred, write_result)
        elapsed = time.perf_counter() - t0
        _summary_table(results, "predict")
        n_ok = sum(r["status"] == "ok" for r in results)
        n_workers = 1 if explain_maps or n_run < 2 else clf.resolve_workers(workers)
        path = "exact path" if exact or explain_maps else f"fast path: {clf.backend_used()}"
        path += f", {n_workers} workers" if n_workers > 1 else ""
        if n_run:
            out.print(f"{n_ok}/{len(results)} predicted in {elapsed:.1f} s (K≤{kk}, {path}) → {out_dir / 'predictions.csv'}, "
                      f"per-image JSON in {out_dir / 'json'}, overlays in {out_dir / 'overlays'}")
        else:  # every file failed to read: nothing ran, and only the CSV was written
            out.print(f"0/{len(results)} predicted: no input could be read → {out_dir / 'predictions.csv'}")
        out.print("[dim]research software: not for clinical use[/]")
        if n_ok < len(results):
            raise typer.Exit(1)


@app.command()
def evaluate(
    predictions: Annotated[Path, typer.Argument(help="A predict predictions.csv (file,name,status,label,confidence,p_<class>…).")],
    labels: Annotated[Path, typer.Option("--labels", help="Labels CSV: label and file or image_id; patient_id, source, view, "
                                                          "age, age_group used when present (e.g. metadata.csv).")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Output folder: report.json, report.md, reliability.png, strata.png.")] = Path("eval"),
    bootstrap: Annotated[int, typer.Option("--bootstrap", min=0, max=100_000, help="Bootstrap resamples (of patients when "
                                                                                  "patient_id is given, else of images).")] = 2000,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap.")] = 0,
    overwrite: OverwriteOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Score predictions against labels: metrics with bootstrap 95 % CIs, per source / view / age group, the age confound."""
    _setup_logging(verbose)
    with _guard():
        from .outputs import OutputDir
        from .stats import build_evaluation, write_evaluation

        t0 = time.perf_counter()
        report, data, meta = build_evaluation(predictions, labels, n_resamples=bootstrap, seed=seed)
        with OutputDir(out_dir, "evaluate", overwrite) as od:
            od.inputs = [str(predictions), str(labels)]
            write_evaluation(report, data, meta, od.file)
        src, met = report["source"], report["metrics"]
        skipped = ", ".join(f"{v} {k}" for k, v in src["skipped"].items())
        out.print(f"evaluated {src['evaluated']} of {src['prediction_rows']} prediction rows"
                  + (f" (skipped: {skipped})" if skipped else "") + f"; {report['patients']} patients")

        def ci(m: dict[str, Any]) -> str:
            if m["value"] is None or m["value"] != m["value"]:
                return "undefined"
            if m["ci_low"] != m["ci_low"]:
                return f"{m['value']:.3f} (no CI)"
            return f"{m['value']:.3f} [{m['ci_low']:.3f}, {m['ci_high']:.3f}]"

        pos = report["positive"].lower()
        out.print(f"macro-F1 {ci(met['macro_f1'])}, accuracy {ci(met['accuracy'])}, {pos}-vs-rest AUC "
                  f"{ci(met[pos + '_auc'])}, ECE {ci(met['ece'])}  (95 % bootstrap CIs, {bootstrap} resamples)")
        conf = report.get("confound") or {}
        if conf:
            out.print(f"within adults {pos}-vs-rest AUC {ci(conf['within_adults'])}; p_{pos} adult vs pediatric "
                      f"(non-{pos}) AUC {ci(conf['adult_vs_pediatric_negatives'])}")
        out.print(f"report: {out_dir / 'report.md'} ({time.perf_counter() - t0:.1f} s)")


# --------------------------------------------------------------------------- explain


def _predict_maybe_explain(clf: Any, images: list[Any], k: int, seed: int, batch_size: int, explain: bool,
                           target: str | None = None, exact: bool = False) -> list[tuple[Any, Any]]:
    """(prediction, explanation or None) per image; with ``explain`` both come from the same forward pass
    (the exact path: Grad-CAM needs the PyTorch models and every crop)."""
    if not explain:
        return [(p, None) for p in clf.predict(images, k=k, seed=seed, batch_size=batch_size, exact=exact)]
    from .explain import explain as explain_images

    return [(e.prediction, e) for e in explain_images(clf, images, k=k, seed=seed, target=target, batch_size=batch_size)]


def _explanation_json(clf: Any, p: Any, e: Any) -> dict[str, Any]:
    """What ``--explain`` adds to the per-image JSON: the class explained, the weights used, per-crop probabilities."""
    return {"explanation": {"class": e.target, "learner_weights": e.weights, "target_layers": e.layers,
                            "scale": e.scale, "heatmap_max_means": "255 in heatmaps/NAME.png = this value of "
                            "max(Σ w_i L_i, 0); maps of different images are not on one scale"},
            "crop_probabilities": {n: {"classes": list(clf.classes), "centres_1024": e.centres[n].tolist()
                                       if n in e.centres else None, "probs": p.crop_probs[n].round(6).tolist()}
                                   for n in clf.names if n in p.crop_probs}}


def _write_explanation(od: Any, name: str, image: Any, e: Any) -> None:
    from .explain import heatmap_uint8, plot_explanation
    from .io import write_png

    write_png(od.file("heatmaps", f"{name}.png"), heatmap_uint8(e))
    plot_explanation(image, e, od.file("overlays", f"{name}_explain.png"))


EXPLAIN_COLUMNS = ["file", "name", "status", "error", "label", "confidence", "explained", "scale", "k", "seed"]


@app.command()
def explain(
    inputs: Annotated[list[Path], typer.Argument(help="Radiograph files or folders (PNG, JPEG, DICOM, JSRT .IMG, …).")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Output folder: heatmaps/, overlays/, json/, "
                                                              "explanations.csv.")] = Path("out"),
    class_name: Annotated[Optional[str], typer.Option("--class", help="Class to explain (default: each image's "
                                                                      "predicted class).")] = None,
    k: Annotated[Optional[int], typer.Option("--k", min=1, max=2000, help="In-lung crops per image (default: the weights').")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the crop centres (the same crops as predict with this seed).")] = 0,
    batch_size: Annotated[int, typer.Option(min=1, max=64, help="Images per forward batch.")] = 1,
    weights: Annotated[str, typer.Option("--weights", help="Classifier folder or name (export-ensemble writes one).")] = "ensemble",
    seg_weights: Annotated[Optional[str], typer.Option("--seg-weights", help="Lung U-Net (default: the one the classifier "
                                                                           "was trained with).")] = None,
    overwrite: OverwriteOpt = False,
    device: DeviceOpt = "auto",
    verbose: VerboseOpt = False,
) -> None:
    """Probabilistic Grad-CAM of the ensemble: OUT/heatmaps/NAME.png (8-bit, input size, 255 = the image's maximum) and OUT/overlays/NAME_explain.png."""
    _setup_logging(verbose)
    with _guard():
        from ._files import write_json
        from .errors import ConfigError
        from .outputs import OutputDir, unique_names
        from .pipeline import Classifier
        from .runtime import resolve_device

        dev = resolve_device(device)
        files = _input_files(inputs)
        names = unique_names(files)
        clf = Classifier.from_pretrained(weights, device=dev, segmenter=seg_weights)
        if class_name is not None and class_name not in clf.classes:
            raise ConfigError(f"--class {class_name!r}: the classifier's classes are {', '.join(clf.classes)}")
        kk = clf.default_k if k is None else k
        with OutputDir(out_dir, "explain", overwrite) as od:
            od.inputs = [str(f) for f in files]
            results: list[dict[str, Any]] = []
            t0 = time.perf_counter()
            with _progress() as progress:
                task = progress.add_task("explaining", total=len(files))
                for start in range(0, len(files), batch_size):
                    chunk, deferred = files[start:start + batch_size], []
                    batch, images = _read_batch(chunk, od, "explanations.csv", EXPLAIN_COLUMNS, names,
                                                results, lambda: progress.advance(task), deferred)
                    with _unreadable_rows_kept(deferred):
                        pairs = _predict_maybe_explain(clf, images, kk, seed, batch_size, True, class_name) if images else []

                    def write_result(i: int, batch: list[Path] = batch, images: list[Any] = images,
                                     pairs: list[Any] = pairs) -> None:
                        f, im, (p, e) = batch[i], images[i], pairs[i]
                        name = names[f]
                        ok = p.status == "ok"
                        od.append_row("explanations.csv", {
                            "file": str(f), "name": name, "status": p.status, "error": p.message, "label": p.label,
                            "confidence": f"{p.confidence:.4f}" if ok else "", "explained": e.target if ok else "",
                            "scale": f"{e.scale:.6f}" if ok else "", "k": kk, "seed": seed}, EXPLAIN_COLUMNS)
                        write_json(od.file("json", f"{name}.json"), {
                            "file": str(f), "status": p.status, "message": p.message, "label": p.label,
                            "probabilities": dict(zip(clf.classes, map(float, p.probs))) if ok else None,
                            "k": kk, "seed": seed, **_explanation_json(clf, p, e),
                            "note": "research software, not a medical device"})
                        if ok:
                            _write_explanation(od, name, im, e)
                            results.append({"file": f, "status": "ok",
                                            "detail": f"{p.label} ({p.confidence:.2f}); map: evidence for {e.target}"})
                        else:
                            console.print(f"[red]✗[/] {escape(str(f))}: {escape(p.message)}", highlight=False, soft_wrap=True)
                            results.append({"file": f, "status": p.status, "detail": p.message})
                        progress.advance(task)

                    _in_input_order(chunk, batch, deferred, write_result)
        elapsed = time.perf_counter() - t0
        _summary_table(results, "explain")
        n_ok = sum(r["status"] == "ok" for r in results)
        out.print(f"{n_ok}/{len(results)} explained in {elapsed:.1f} s (K={kk}) → heat-maps in {out_dir / 'heatmaps'}, "
                  f"overlays in {out_dir / 'overlays'}, {out_dir / 'explanations.csv'}")
        out.print("[dim]research software: not for clinical use[/]")
        if n_ok < len(results):
            raise typer.Exit(1)



def main() -> None:  # pragma: no cover
    app(prog_name="patchflannel")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
