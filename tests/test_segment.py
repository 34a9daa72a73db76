from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from patchflannel.segment import (LungSegmenter, Preprocess, build_unet, discover_jsrt, jaccard_dice, postprocess,
                                  save_segmenter, train_segmenter)

ROOT = Path(__file__).resolve().parent.parent


def small_cfg(data: Path, **kw: object) -> dict:
    cfg = {"data": str(data), "seed": 0, "val_frac": 0.25, "test_frac": 0.25, "encoder": "resnet18",
           "decoder_channels": [16, 16, 8, 8, 8], "preprocess": {"size": 64, "method": "clahe", "clip_limit": 2.0,
                                                                    "tile_grid": 4, "gamma": 1.0},
           "threshold": 0.5, "epochs": 1, "batch_size": 2, "lr": 1e-3, "patience": 5, "lr_patience": 2, "augment": 1.0}
    cfg.update(kw)
    return cfg


def test_forward_backward_random_input() -> None:
    model = build_unet("resnet18", (16, 16, 8, 8, 8))
    x = torch.randn(2, 1, 64, 64)
    y = model(x)
    assert y.shape == (2, 1, 64, 64) and torch.isfinite(y).all()
    y.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing


def test_save_load_identical_output(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_unet("resnet18", (16, 16, 8, 8, 8)).eval()
    pre = Preprocess(size=64)
    cfg = {"encoder": "resnet18", "decoder_channels": [16, 16, 8, 8, 8]}
    save_segmenter(model, tmp_path / "w", cfg, pre)
    seg = LungSegmenter(model, pre)
    loaded = LungSegmenter.from_pretrained(tmp_path / "w")
    img = np.random.default_rng(0).random((100, 120), dtype=np.float32)
    np.testing.assert_array_equal(seg.predict_prob([img]), loaded.predict_prob([img]))
    assert json.loads((tmp_path / "w.json").read_text())["preprocess"]["size"] == 64


def test_postprocess_keeps_two_largest_and_fills_holes() -> None:
    prob = np.zeros((200, 200), np.float32)
    prob[20:180, 20:90] = 0.9   # left lung
    prob[20:180, 110:180] = 0.9  # right lung
    prob[5:10, 5:10] = 0.9      # speck
    prob[80:100, 40:60] = 0.1   # hole inside the left lung
    m = postprocess(prob, 0.5)
    assert not m[5:10, 5:10].any()
    assert m[80:100, 40:60].all()
    assert m[20:180, 110:180].all()


def test_jaccard_dice() -> None:
    a = np.zeros((10, 10), bool)
    b = np.zeros((10, 10), bool)
    a[:, :5] = True
    b[:, :4] = True
    j, d = jaccard_dice(a, b)
    assert j == pytest.approx(40 / 50) and d == pytest.approx(80 / 90)
    assert jaccard_dice(a & False, b & False) == (1.0, 1.0)


def _fake_jsrt(root: Path, n: int, original_layout: bool) -> None:
    """Synthetic radiographs with two dark elliptical 'lungs' and their masks."""
    rng = np.random.default_rng(1)
    for i in range(n):
        h = w = 1024
        img = np.full((h, w), 0.7, np.float32) + rng.normal(0, 0.02, (h, w)).astype(np.float32)
        left = np.zeros((h, w), np.uint8)
        right = np.zeros((h, w), np.uint8)
        dx = int(rng.integers(-40, 40))
        cv2.ellipse(right, (300 + dx, 500), (130, 300), 0, 0, 360, 255, -1)
        cv2.ellipse(left, (720 + dx, 500), (130, 300), 0, 0, 360, 255, -1)
        img[(left > 0) | (right > 0)] = 0.25
        name = f"JPCNN{i:03d}"
        if original_layout:
            raw = np.rint((1 - np.clip(cv2.resize(img, (2048, 2048)), 0, 1)) * 4095).astype(">u2")
            (root / "All247images").mkdir(parents=True, exist_ok=True)
            (root / "All247images" / f"{name}.IMG").write_bytes(raw.tobytes())
            for side, m in (("left lung", left), ("right lung", right)):
                d = root / "scr" / "fold1" / "masks" / side
                d.mkdir(parents=True, exist_ok=True)
                from PIL import Image

                Image.fromarray(m).save(d / f"{name}.gif")
        else:
            for sub in ("images", "masks/left_lung", "masks/right_lung"):
                (root / sub).mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(root / "images" / f"{name}.png"), np.rint(np.clip(img, 0, 1) * 255).astype(np.uint8))
            cv2.imwrite(str(root / "masks/left_lung" / f"{name}.png"), left)
            cv2.imwrite(str(root / "masks/right_lung" / f"{name}.png"), right)


@pytest.mark.parametrize("original_layout", [False, True])
def test_discover_both_layouts(tmp_path: Path, original_layout: bool) -> None:
    _fake_jsrt(tmp_path, 2, original_layout)
    cases = discover_jsrt(tmp_path)
    assert [c.case_id for c in cases] == ["JPCNN000", "JPCNN001"]
    assert all(len(c.masks) == 2 for c in cases)


def test_discover_empty_is_clear(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no JSRT images"):
        discover_jsrt(tmp_path)


@pytest.mark.slow
def test_train_then_resume(tmp_path: Path) -> None:
    data = tmp_path / "jsrt"
    _fake_jsrt(data, 8, original_layout=False)
    run = tmp_path / "run"
    s1 = train_segmenter(small_cfg(data, epochs=1), run)
    assert s1["epochs_run"] == 1 and (run / "checkpoint.pt").exists() and (run / "best.safetensors").exists()
    split = json.loads((run / "split.json").read_text())
    assert not set(split["train"]) & set(split["test"])
    s2 = train_segmenter(small_cfg(data, epochs=2), run, resume=True)
    assert s2["epochs_run"] == 2
    hist = (run / "history.csv").read_text().strip().splitlines()
    assert len(hist) == 3 and (run / "test_worst_cases.png").stat().st_size > 0
