"""Model card for the shipped ``weights/``, generated from the weights' own configs so that
every number in it comes from the run that produced the weights (training side: never imported
by inference code)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ._files import write_text
from .config import shipped_dir
from .hub import CONFIG_NAME

DATA_LICENCES = """## Training data and their terms

The weights were trained on public data; their terms travel with the weights:

- **JSRT** radiographs (Shiraishi et al., AJR 2000) with **SCR** lung masks (van Ginneken et al., Medical
  Image Analysis 2006): free for research and education with citation of both papers.
- **V7 Labs lung annotations** of ieee8023 covid-chestxray-dataset images (as distributed in the
  torchxrayvision 1.5.7 wheel): per-image licences of the ieee8023 collection (see its `license` column).
- **Kaggle "Chest X-Ray Images (Pneumonia)"** (Kermany et al., Cell 2018): CC BY 4.0.
- **ieee8023 covid-chestxray-dataset** (Cohen et al., snapshot 2020-06-22): per-image licences
  (CC BY, CC BY-NC-SA, Apache 2.0, … recorded per image in the data's `license` column).
- **Actualmed COVID-19 chest X-ray dataset**: its repository's terms.

The code is MIT-licensed (`LICENSE`); the weights are research artefacts derived from the data above
and are not a medical device.
"""


def _fmt(x: Any, digits: int = 4) -> str:
    return f"{x:.{digits}f}" if isinstance(x, (int, float)) else str(x)


def _pct(x: Any) -> str:
    return f"{100 * x:.1f} %" if isinstance(x, (int, float)) else ""


def _seg_config(path: Path) -> dict[str, Any] | None:
    if (path / CONFIG_NAME).is_file():
        return json.loads((path / CONFIG_NAME).read_text(encoding="utf-8"))
    if path.with_suffix(".json").is_file():
        return json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
    return None


# What each shipped segmenter is for (the numbers below come from its own config).
SEGMENTER_ROLES = {
    "lung_unet_v7c": "the default `scr` segmenter since v0.6 (`segment`, `eval-seg`, the segmentation benchmark): "
                     "`lung_unet_v7b` fine-tuned 8 epochs more with a quarter of each batch from V7, lr 1e-4 (`train-seg "
                     "--set model.init=lung_unet_v7b …`, docs/results.md §1b), best validation at epoch 6. Its `scr` "
                     "mask puts 0.8 % of its area outside the V7 test lungs (`lung_unet_jsrt`: 4.9 %) at a JSRT cost "
                     "of −0.0026 Jaccard (paired, 40 images); chosen by docs/results/seg_v4/DECISION.md.",
    "lung_unet_jsrt": "the `scr` default until v0.5, JSRT/SCR only (`--weights lung_unet_jsrt` gives its masks; "
                      "`train-patch` uses it when a config names no segmenter).",
    "lung_unet_v7": "the shipped classifier's segmenter (its learners were trained on these `scr` masks; "
                    "`weights/ensemble` pins it by sha256).",
    "lung_unet_v7b": "the default for `segment --convention full`: `lung_unet_v7` trained 12 epochs more, "
                     "from lr 1e-4 (halved to 5e-5 at epoch 6 by the plateau schedule; `train-seg --set "
                     "model.init=lung_unet_v7 …`, docs/results.md §1b), best validation at the last epoch.",
}


def segmenter_section(name: str, cfg: dict[str, Any]) -> str:
    pre = cfg.get("preprocess", {})
    convs = cfg.get("conventions") or ["scr"]
    lines = [f"## `{name}` — lung segmentation", "",
             *([f"- Role: {SEGMENTER_ROLES[name]}"] if name in SEGMENTER_ROLES else []),
             f"- segmentation-models-pytorch U-Net, encoder `{cfg.get('encoder')}`, decoder {cfg.get('decoder_channels')}, "
             f"1 gray input channel, outputs: {', '.join(f'`{c}`' for c in convs)} "
             "(`scr`: SCR lungs without the region behind the heart; `full`: the whole lung field, V7 style).",
             f"- Input: radiograph area-resized to {pre.get('size')}², contrast `{pre.get('method')}`, then x − 0.5; "
             "output upsampled to 1024², thresholded, anatomy-aware clean-up (two largest plausible components, holes "
             "filled, neck/shoulder/outside-thorax components dropped).",
             f"- Training data: {json.dumps(cfg.get('training_data'), ensure_ascii=False)}; split seed {cfg.get('split_seed')}; "
             "the held-out ids are in the config (`split.<domain>.test`) so `eval-seg` re-checks the same images."]
    test = cfg.get("test_metrics") or {}
    rows = []
    for key, s in test.items():
        if not isinstance(s, dict) or "by_convention" not in s:
            continue
        for conv, m in s["by_convention"].items():
            if m.get("n"):
                rows.append(f"| {s['domain']} | {conv}{' (own)' if conv == s.get('own_convention') else ''} | {m['n']} | "
                            f"{_fmt(m['jaccard_mean'])} ± {_fmt(m['jaccard_std'])} | {_fmt(m['jaccard_median'])} | "
                            f"{_fmt(m['jaccard_min'])} | {m['below_0.75']} | {_fmt(m['dice_mean'])} | "
                            f"{_pct(m.get('coverage_mean'))} | {_pct(m.get('added_mean'))} |")
    if "jaccard_mean" in test:  # v0.1 JSRT-only weights
        rows.append(f"| jsrt | scr (own) | {test['n']} | {_fmt(test['jaccard_mean'])} ± {_fmt(test['jaccard_std'])} | | "
                    f"{_fmt(test['jaccard_min'])} | | {_fmt(test['dice_mean'])} | | |")
    if rows:
        lines += ["", "Held-out test parts (never used for training or model selection), masks at 1024²:", "",
                  "| data | convention | n | Jaccard mean ± std | median | worst | < 0.75 | Dice | reference covered "
                  "| mask outside the reference |",
                  "|---|---|---:|---|---:|---:|---:|---:|---:|---:|", *rows]
    return "\n".join(lines) + "\n"


def _members(names: list[str]) -> str:
    if list(names) == ["refit"]:
        return "1 model refit on every non-test image"
    return f"{len(names)} members" if len(names) != 1 else "1 member"


def classifier_section(name: str, cfg: dict[str, Any]) -> str:
    tr = cfg.get("training") or {}
    seg = cfg.get("segmenter") or {}
    lines = [f"## `{name}/` — patch learners + FLANNEL", "",
             "- Learners: " + ", ".join(f"`{n}` ({_members(cfg['members'][n])}"
                                        f"{', whole image' if n.startswith('global-') else ''})" for n in cfg["learners"]) + "; "
             f"distribution `{cfg.get('distribution')}`, K = {(cfg.get('defaults') or {}).get('k')} crops per image.",
             f"- Combiner: `{cfg.get('combiner')}`; calibration: `{(cfg.get('calibration') or {}).get('kind', 'none')}`.",
             f"- Lung masks from `{seg.get('name')}` ({seg.get('convention', 'scr')} convention); the classifier loads "
             "that segmenter by default, since its learners saw those masks.",
             f"- Training: {tr.get('data') or tr.get('runs')}.",
             "- **Known confound**: nearly all non-COVID images are pediatric (Kaggle) and nearly all COVID images adult; "
             "COVID-vs-rest scores partly measure age/source — judge them by the within-adult figures (see `docs/results.md`). "
             "Not for clinical use."]
    if tr.get("note"):
        lines.append(f"- Note: {tr['note']}.")
    if tr.get("calibration"):
        cal = cfg.get("calibration") or {}
        lines.append(f"- Calibration: temperature {cal.get('temperature', 1.0):.3f}; {tr['calibration']}.")
    for label, text in (tr.get("results") or {}).items():  # what `ensemble` measured for this model (export-ensemble copies it into training.results)
        lines.append(f"- {label}: {text}.")
    if "test_macro_f1_v01" in tr:
        lines.append(f"- Held-out test macro-F1 of this model in v0.1 (127 images of the 630): {_fmt(tr['test_macro_f1_v01'], 3)}.")
    return "\n".join(lines) + "\n"


def write_model_card(weights_dir: Path | None = None) -> Path:
    """(Re)write ``weights_dir/README.md`` from the configs of the weights present."""
    weights_dir = Path(weights_dir or shipped_dir("weights"))
    parts = ["# Shipped weights — model card", "",
             "Trained by this project on a 2-core CPU from random initialisation (no ImageNet checkpoint was "
             "available). Research use only; not a medical device. Generated by "
             "`python -m patchflannel.card` from the weights' own configs.", ""]
    for stem in ("lung_unet_v7c", "lung_unet_jsrt", "lung_unet_v7", "lung_unet_v7b"):
        cfg = _seg_config(weights_dir / stem)
        if cfg:
            parts.append(segmenter_section(stem, cfg))
    ens = weights_dir / "ensemble" / CONFIG_NAME
    if ens.is_file():
        parts.append(classifier_section("ensemble", json.loads(ens.read_text(encoding="utf-8"))))
    parts.append(DATA_LICENCES)
    path = weights_dir / "README.md"
    write_text(path, "\n".join(parts))
    return path


if __name__ == "__main__":  # pragma: no cover
    print(write_model_card())
