"""Command-line interface: wires the stages together; the only module that
imports typer and rich."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Optional, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

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

ROOT = Path(__file__).resolve().parent.parent
SAMPLES_DIR = ROOT / "samples"
SHARED_DATA = ROOT.parent / "shared" / "data"


class UserError(Exception):
    """An error the user can fix; printed without a traceback."""


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", datefmt="[%X]",
                        handlers=[RichHandler(console=console, show_path=False)], force=True)
    for noisy in ("matplotlib", "PIL", "h5py"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@contextmanager
def _user_errors() -> Iterator[None]:
    """Turn the library's user-facing errors into a red message and exit code 2."""
    from .config import ConfigError
    from .io import ImageReadError
    from .store import StoreError
    from .weights import WeightsNotFoundError

    try:
        yield
    except (UserError, ConfigError, ImageReadError, StoreError, WeightsNotFoundError, FileNotFoundError, ValueError) as exc:
        console.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]; completed outputs are kept (written atomically); to continue, rerun the same command (train-seg: with --resume)")
        raise typer.Exit(130) from None


def _progress() -> Progress:
    return Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True,
                    disable=not console.is_terminal)


def _track_factory(progress: Progress) -> Callable[[Iterable[T], str, Optional[int]], Iterable[T]]:
    def track(it: Iterable[T], description: str = "", total: int | None = None) -> Iterable[T]:
        return progress.track(it, total=total, description=description)

    return track


def _device(device: str | None) -> str:
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device} requested but CUDA is not available on this machine")
    return device


def _set_threads() -> None:
    import torch

    # OpenCV and torch would otherwise oversubscribe the cores.
    torch.set_num_threads(max(1, torch.get_num_threads()))


# --------------------------------------------------------------------------- segment


@app.command()
def segment(
    inputs: Annotated[list[Path], typer.Argument(help="Radiograph files or folders (PNG, JPEG, DICOM, JSRT .IMG, …).")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Output folder: masks/ and overlays/ go here.")] = Path("out"),
    weights: Annotated[Optional[Path], typer.Option(help="Lung U-Net weights (.safetensors with its .json).")] = None,
    store: Annotated[Optional[Path], typer.Option(help="Also write images + masks at 1024² to this HDF5 store.")] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 8,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1 …")] = "auto",
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Segment the lungs: writes OUT/masks/X.png (255 = lung, input size) and OUT/overlays/X.png."""
    _setup_logging(verbose)
    with _user_errors():
        import numpy as np

        from .io import resize, to_uint8, write_png
        from .segment import DEFAULT_WEIGHTS, WORK_SIZE, LungSegmenter, overlay
        from .store import StoreWriter

        files = _input_files(inputs)
        seg = LungSegmenter.from_pretrained(weights or DEFAULT_WEIGHTS, device=_device(device))
        names = _unique_names(files)
        writer = StoreWriter(store, provenance={"command": "segment", "weights": str(weights or DEFAULT_WEIGHTS)}) if store else None
        results: list[dict[str, Any]] = []
        t0 = time.perf_counter()
        try:
            with _progress() as progress:
                task = progress.add_task("segmenting", total=len(files))
                for ok_files, images in _read_batches(files, batch_size, results, progress, task):
                    masks = seg.predict(images, batch_size=batch_size)
                    for f, im, m in zip(ok_files, images, masks):
                        name = names[f]
                        write_png(out_dir / "masks" / f"{name}.png", to_uint8(m))
                        write_png(out_dir / "overlays" / f"{name}.png", overlay(im, m))
                        if writer is not None:
                            writer.add(name, resize(im, WORK_SIZE, "area"), resize(m, WORK_SIZE, "nearest"),
                                       {"source_file": str(f), "orig_height": im.shape[0], "orig_width": im.shape[1]})
                        frac = float(np.count_nonzero(m)) / m.size
                        detail = f"{im.shape[1]}×{im.shape[0]}, lungs {100 * frac:.1f} %"
                        if frac < 0.05:
                            detail += " [yellow](very small lung area: check the overlay)[/]"
                        results.append({"file": f, "status": "ok", "detail": detail})
                        progress.advance(task)
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        if writer is not None:
            if len(writer):
                writer.close()
            else:
                writer.abort()
        elapsed = time.perf_counter() - t0
        _summary_table(results, "segment")
        n_ok = sum(r["status"] == "ok" for r in results)
        out.print(f"{n_ok}/{len(results)} segmented in {elapsed:.1f} s → masks: {out_dir / 'masks'}, overlays: {out_dir / 'overlays'}"
                  + (f", store: {store}" if store and n_ok else ""))
        if n_ok < len(results):
            raise typer.Exit(1)


def _input_files(inputs: list[Path]) -> list[Path]:
    """Files and folders → candidate image files; none at all is a user error."""
    from .io import list_images

    files = list_images([str(p) for p in inputs])
    if not files:
        raise UserError(f"no image files found in {', '.join(map(str, inputs))}")
    return files


def _read_batches(files: list[Path], batch_size: int, results: list[dict[str, Any]], progress: Progress,
                  task: Any) -> Iterator[tuple[list[Path], list[Any]]]:
    """Yield ``(files, images)`` batches of readable files; each unreadable file
    is reported, recorded in ``results`` and skipped."""
    from .io import ImageReadError, read_image

    for start in range(0, len(files), batch_size):
        images, ok_files = [], []
        for f in files[start:start + batch_size]:
            try:
                images.append(read_image(f))
                ok_files.append(f)
            except ImageReadError as exc:
                results.append({"file": f, "status": "error", "detail": exc.problem})
                console.print(f"[red]✗[/] {exc}")
                progress.advance(task)
        if images:
            yield ok_files, images


def _unique_names(files: list[Path]) -> dict[Path, str]:
    """Output names = input stems, disambiguated when two inputs share a stem."""
    names: dict[Path, str] = {}
    seen: dict[str, int] = {}
    for f in files:
        stem = f.stem or f.name
        n = seen.get(stem, 0)
        seen[stem] = n + 1
        names[f] = stem if n == 0 else f"{stem}_{n}"
    return names


def _summary_table(results: list[dict[str, Any]], title: str) -> None:
    table = Table(title=f"{title}: {sum(r['status'] == 'ok' for r in results)} ok, "
                        f"{sum(r['status'] != 'ok' for r in results)} failed", show_lines=False)
    table.add_column("file", overflow="fold")
    table.add_column("status")
    table.add_column("detail", overflow="fold")
    for r in results:
        table.add_row(str(r["file"]), "[green]ok[/]" if r["status"] == "ok" else "[red]failed[/]", r["detail"])
    out.print(table)


# --------------------------------------------------------------------------- train / evaluate the segmenter


@app.command("train-seg")
def train_seg(
    config: Annotated[str, typer.Option(help="Config name in configs/ or a YAML path.")] = "seg_cpu",
    run_dir: Annotated[Path, typer.Option(help="Run folder (config, split, checkpoints, metrics).")] = Path("runs/seg"),
    data: Annotated[Optional[Path], typer.Option(help="JSRT folder (images + SCR masks).")] = None,
    epochs: Annotated[Optional[int], typer.Option()] = None,
    encoder: Annotated[Optional[str], typer.Option(help="smp encoder name, e.g. resnet18, resnet34.")] = None,
    size: Annotated[Optional[int], typer.Option(help="Net input resolution.")] = None,
    preprocess: Annotated[Optional[str], typer.Option(help="clahe, equalize or none.")] = None,
    batch_size: Annotated[Optional[int], typer.Option()] = None,
    lr: Annotated[Optional[float], typer.Option()] = None,
    seed: Annotated[Optional[int], typer.Option()] = None,
    limit: Annotated[Optional[int], typer.Option(help="Use only the first N cases (smoke tests).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from RUN_DIR/checkpoint.pt.")] = False,
    device: Annotated[str, typer.Option()] = "auto",
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Train the lung U-Net on JSRT/SCR; evaluates the best checkpoint on the held-out test part."""
    _setup_logging(verbose)
    with _user_errors():
        from .config import load_config
        from .segment import train_segmenter

        cfg = load_config(config, {"data": str(data) if data else None, "epochs": epochs, "encoder": encoder,
                                   "preprocess.size": size, "preprocess.method": preprocess, "batch_size": batch_size,
                                   "lr": lr, "seed": seed, "limit": limit})
        cfg["data"] = str(_resolve_data(cfg["data"]))
        with _progress() as progress:
            summary = train_segmenter(cfg, run_dir, resume=resume, track=_track_factory(progress), device=_device(device))
        _print_seg_summary(summary, run_dir, "test")
        out.print(f"best weights: {run_dir / 'best.safetensors'} (+ .json); copy both to weights/ to ship them")


def _resolve_data(path: str | Path) -> Path:
    """Config data paths are relative to the project root when not found from the cwd."""
    p = Path(path)
    if p.exists() or p.is_absolute():
        return p
    cand = ROOT / p
    return cand if cand.exists() else p


def _print_seg_summary(summary: dict[str, Any], where: Path, prefix: str) -> None:
    table = Table(title=f"lung segmentation, {summary['n']} held-out images at 1024²")
    for col in ("metric", "mean", "std", "worst"):
        table.add_column(col)
    table.add_row("Jaccard", f"{summary['jaccard_mean']:.4f}", f"{summary['jaccard_std']:.4f}",
                  f"{summary['jaccard_min']:.4f} ({summary['worst_image']})")
    table.add_row("Dice", f"{summary['dice_mean']:.4f}", f"{summary['dice_std']:.4f}", "")
    out.print(table)
    out.print(f"per-image: {where / f'{prefix}_metrics.csv'}; worst cases: {where / f'{prefix}_worst_cases.png'}")


@app.command("eval-seg")
def eval_seg(
    weights: Annotated[Optional[Path], typer.Option(help="Lung U-Net weights; default: shipped weights/lung_unet.")] = None,
    data: Annotated[Path, typer.Option(help="JSRT folder (images + SCR masks).")] = SHARED_DATA / "jsrt",
    split: Annotated[Optional[Path], typer.Option(help="split.json of a training run; evaluates its 'test' part. "
                                                       "Default: the split saved with the weights.")] = None,
    all_images: Annotated[bool, typer.Option("--all", help="Evaluate on every image found (ignores the split).")] = False,
    out_dir: Annotated[Path, typer.Option("--out", "-o")] = Path("runs/seg_eval"),
    device: Annotated[str, typer.Option()] = "auto",
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Jaccard/Dice per image (mean ± std, worst) and a figure of the worst cases."""
    _setup_logging(verbose)
    with _user_errors():
        import json

        from .segment import DEFAULT_WEIGHTS, LungSegmenter, discover_jsrt, evaluate_split

        seg = LungSegmenter.from_pretrained(weights or DEFAULT_WEIGHTS, device=_device(device))
        cases = discover_jsrt(data)
        if all_images:
            ids = [c.case_id for c in cases]
        else:
            if split is not None:
                ids = json.loads(Path(split).read_text())["test"]
            elif "split" in seg.config:
                ids = seg.config["split"]["test"]
            else:
                raise UserError("these weights carry no split; pass --split RUN/split.json or --all")
            known = {c.case_id for c in cases}
            ids = [i for i in ids if i in known]
            if not ids:
                raise UserError(f"none of the split's test images are in {data}")
        out_dir.mkdir(parents=True, exist_ok=True)
        with _progress() as progress:
            summary = evaluate_split(seg, cases, ids, out_dir, track=_track_factory(progress))
        _print_seg_summary(summary, out_dir, "test")


@app.command("export-seg")
def export_seg(
    run_dir: Annotated[Path, typer.Argument(help="A train-seg run folder.")],
    to: Annotated[Path, typer.Option(help="Destination stem (writes .safetensors + .json).")] = ROOT / "weights" / "lung_unet",
) -> None:
    """Ship a run's best lung U-Net: copies its weights with split, metrics and training time in the sidecar."""
    _setup_logging(False)
    with _user_errors():
        from .segment import export_segmenter

        from .card import write_model_card

        stem = export_segmenter(run_dir, to)
        out.print(f"exported {stem}.safetensors and {stem}.json")
        if stem.parent == ROOT / "weights":
            out.print(f"model card: {write_model_card(stem.parent)}")


# --------------------------------------------------------------------------- patch learners


@app.command("train-patch")
def train_patch(
    k: Annotated[Optional[int], typer.Option("--k", help="Patches per image when voting (paper: 100).")] = None,
    learner: Annotated[Optional[list[str]], typer.Option("--learner", help="Learner name (repeatable); "
                                                         "global-NAME for a whole-image baseline. Default: from the config.")] = None,
    config: Annotated[str, typer.Option(help="Config name in configs/ or a YAML path.")] = "patch_cpu",
    run_dir: Annotated[Path, typer.Option(help="Run folder (resumable: finished folds are reused).")] = Path("runs/patch"),
    data: Annotated[Optional[list[Path]], typer.Option(help="Data source(s): metadata.csv, Kaggle folder, ieee8023 CSV.")] = None,
    cache: Annotated[Optional[Path], typer.Option(help="HDF5 cache of images + lung masks (built if missing).")] = None,
    seg_weights: Annotated[Optional[Path], typer.Option(help="Lung U-Net used to build the cache.")] = None,
    folds: Annotated[Optional[int], typer.Option()] = None,
    epochs: Annotated[Optional[int], typer.Option()] = None,
    seed: Annotated[Optional[int], typer.Option()] = None,
    pretrained: Annotated[Optional[str], typer.Option(help="'true' = torchvision ImageNet weights from $TORCH_HOME, or a checkpoint path.")] = None,
    no_global: Annotated[bool, typer.Option("--no-global", help="Skip the whole-image baselines.")] = False,
    device: Annotated[str, typer.Option()] = "auto",
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Train patch learners over patient-grouped folds; write out-of-fold and test vote distributions."""
    _setup_logging(verbose)
    with _user_errors():
        from .config import load_config
        from .cxr import DataError, build_cache, load_records
        from .patch_train import train_patch_run
        from .segment import DEFAULT_WEIGHTS, LungSegmenter

        pre = {"true": True, "false": None, "none": None}.get(str(pretrained).lower(), pretrained) if pretrained else None
        cfg = load_config(config, {"k": k, "data": [str(d) for d in data] if data else None,
                                   "cache": str(cache) if cache else None, "folds": folds, "epochs": epochs, "seed": seed,
                                   "pretrained": pre})
        if learner:
            cfg["learners"] = [n for n in learner if not n.startswith("global-")]
            cfg["global_learners"] = [n[len("global-"):] for n in learner if n.startswith("global-")]
        if no_global:
            cfg["global_learners"] = []
        _check_learners(cfg["learners"] + (cfg.get("global_learners") or []))
        cfg["cache"] = str(_resolve_data(cfg["cache"]) if not Path(cfg["cache"]).is_absolute() else cfg["cache"])
        cfg["data"] = [str(_resolve_data(d)) for d in cfg["data"]]
        dev = _device(device)
        cache_path = Path(cfg["cache"])
        if not cache_path.exists():
            try:
                records = load_records(cfg["data"])
            except DataError as exc:
                raise UserError(str(exc)) from None
            seg = LungSegmenter.from_pretrained(seg_weights or DEFAULT_WEIGHTS, device=dev)
            console.print(f"building the cache {cache_path} ({len(records)} images; segmenting each once)")
            with _progress() as progress:
                _, errors = build_cache(records, seg, cache_path, track=_track_factory(progress))
            for e in errors:
                console.print(f"[red]✗[/] {e}")
            if errors:
                console.print(f"[yellow]{len(errors)} unreadable images left out of the cache[/]")
        if not cfg.get("pretrained"):
            console.print("[yellow]note:[/] learners start from random weights (no ImageNet checkpoint); "
                          "pass --pretrained true with weights in $TORCH_HOME/hub/checkpoints for pretrained starts")
        with _progress() as progress:
            results = train_patch_run(cfg, run_dir, device=__import__("torch").device(dev), track=_track_factory(progress))
        table = Table(title=f"held-out test, mean (std) over {cfg['folds']} fold models, K={cfg['k']}")
        table.add_column("learner")
        from .cxr import CLASSES

        for c in CLASSES:
            table.add_column(f"F1 {c}")
        table.add_column("macro-F1")
        for spec, m in results.items():
            s = m["test_summary"]
            cells = [f"{s[f'per_class.{c}.f1']['mean']:.3f} ({s[f'per_class.{c}.f1']['std']:.3f})" for c in CLASSES]
            table.add_row(spec, *cells, f"{s['macro_f1']['mean']:.3f} ({s['macro_f1']['std']:.3f})")
        out.print(table)
        out.print(f"run folder: {run_dir} (votes: <learner>/oof.npz, test.npz; metrics.json; confusion_test.png)")


# --------------------------------------------------------------------------- ensemble + predict


@app.command()
def ensemble(
    runs: Annotated[list[Path], typer.Argument(help="train-patch run folder(s) with <learner>/oof.npz and test.npz.")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Output folder (weights, table, plots).")] = Path("runs/ensemble"),
    config: Annotated[str, typer.Option(help="Config name in configs/ or a YAML path.")] = "ensemble_cpu",
    learner: Annotated[Optional[list[str]], typer.Option("--learner", help="Restrict to these learners (repeatable).")] = None,
    gamma: Annotated[Optional[float], typer.Option(help="Focal-loss γ (paper text 3, reference code 10).")] = None,
    seeds: Annotated[Optional[int], typer.Option(help="Training seeds per trainable model.")] = None,
    distribution: Annotated[Optional[str], typer.Option(help="soft (mean patch softmax) or hard (vote fractions).")] = None,
    device: Annotated[str, typer.Option()] = "auto",
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Train FLANNEL on out-of-fold learner distributions, with every baseline, and evaluate on the held-out test part."""
    _setup_logging(verbose)
    with _user_errors():
        from .config import load_config
        from .ensemble_run import run_ensemble

        cfg = load_config(config, {"gamma": gamma, "seeds": seeds, "distribution": distribution})
        if learner:
            cfg["learners"] = list(learner)
        for r in runs:
            if not r.is_dir():
                raise UserError(f"run folder {r} not found")
        with _progress() as progress:
            run_ensemble(cfg, [r.resolve() for r in runs], out_dir, device=_device(device), track=_track_factory(progress))
        out.print((out_dir / "table.md").read_text())
        if (out_dir / "claims.md").exists():
            out.print((out_dir / "claims.md").read_text())
        out.print(f"ensemble folder: {out_dir} (flannel.safetensors, table.md, results.json/csv, plots)")


@app.command("export-ensemble")
def export_ensemble_cmd(
    ensemble_dir: Annotated[Path, typer.Argument(help="An `ensemble` output folder.")],
    to: Annotated[Path, typer.Option(help="Destination folder.")] = ROOT / "weights" / "ensemble",
    full_precision: Annotated[bool, typer.Option(help="Store learner weights in float32 (default float16).")] = False,
) -> None:
    """Ship a FLANNEL model with its learners' fold models (used by `predict`)."""
    _setup_logging(False)
    with _user_errors():
        from .pipeline import export_ensemble

        from .card import write_model_card

        dest = export_ensemble(ensemble_dir, to, half=not full_precision)
        out.print(f"exported FLANNEL and its learners to {dest}")
        if dest.parent == ROOT / "weights":
            out.print(f"model card: {write_model_card(dest.parent)}")


@app.command()
def predict(
    inputs: Annotated[list[Path], typer.Argument(help="Radiograph files or folders.")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("out"),
    k: Annotated[int, typer.Option("--k", min=1, help="In-lung patches per image.")] = 100,
    seed: Annotated[int, typer.Option(help="Seed of the patch centres.")] = 0,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per batch.")] = 4,
    weights: Annotated[Optional[Path], typer.Option(help="Ensemble folder (flannel + learners).")] = None,
    seg_weights: Annotated[Optional[Path], typer.Option(help="Lung U-Net weights.")] = None,
    device: Annotated[str, typer.Option()] = "auto",
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Whole pipeline: lung mask → K patches → learners → FLANNEL → OUT/predictions.csv, OUT/json/, OUT/overlays/."""
    _setup_logging(verbose)
    with _user_errors():
        from .cxr import CLASSES
        from .io import resize, write_png
        from .pipeline import DEFAULT_ENSEMBLE, Pipeline
        from .segment import DEFAULT_WEIGHTS, overlay
        from .weights import atomic_write_text, write_json

        files = _input_files(inputs)
        pipe = Pipeline.from_weights(weights or DEFAULT_ENSEMBLE, seg_weights or DEFAULT_WEIGHTS, device=_device(device))
        names = _unique_names(files)
        rows: list[str] = ["file,label," + ",".join(f"p_{c}" for c in CLASSES)]
        results: list[dict[str, Any]] = []
        t0 = time.perf_counter()
        with _progress() as progress:
            task = progress.add_task("predicting", total=len(files))
            for ok, imgs in _read_batches(files, batch_size, results, progress, task):
                for f, im, p in zip(ok, imgs, pipe.predict(imgs, k=k, seed=seed)):
                    name = names[f]
                    rows.append(f"{f},{p.label}," + ",".join(f"{v:.6f}" for v in p.probs))
                    write_json(out_dir / "json" / f"{name}.json", {
                        "file": str(f), "label": p.label, "probabilities": dict(zip(CLASSES, map(float, p.probs))),
                        "k": k, "seed": seed, "lung_fraction": float(p.mask.mean()),
                        "learners": {n: {"distribution": dict(zip(CLASSES, map(float, p.learner_probs[i]))),
                                         "weight": float(p.learner_weights[i])} for i, n in enumerate(pipe.names)},
                        "note": "research software, not a diagnostic device"})
                    mask = resize(p.mask, im.shape, "nearest")
                    write_png(out_dir / "overlays" / f"{name}.png", overlay(im, mask))
                    results.append({"file": f, "status": "ok", "detail": f"{p.label} ({p.probs.max():.2f})  " +
                                    " ".join(f"{c}={v:.2f}" for c, v in zip(CLASSES, p.probs))})
                    progress.advance(task)
        atomic_write_text(out_dir / "predictions.csv", "\n".join(rows) + "\n")
        elapsed = time.perf_counter() - t0
        _summary_table(results, "predict")
        n_ok = sum(r["status"] == "ok" for r in results)
        out.print(f"{n_ok}/{len(results)} predicted in {elapsed:.1f} s (K={k}) → {out_dir / 'predictions.csv'}, "
                  f"per-image JSON in {out_dir / 'json'}, overlays in {out_dir / 'overlays'}")
        out.print("[dim]research software: not for clinical use[/]")
        if n_ok < len(results):
            raise typer.Exit(1)


def _check_learners(names: list[str]) -> None:
    from .learners import list_learners

    known = set(list_learners())
    bad = [n for n in names if n not in known]
    if bad:
        raise UserError(f"unknown learner(s) {', '.join(bad)}; choose from {', '.join(sorted(known))}")


def main() -> None:  # pragma: no cover
    app(prog_name="patchflannel")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
