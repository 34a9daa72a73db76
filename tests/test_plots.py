"""Tests for patchflannel.plots: every figure is a valid, non-empty PNG written atomically."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from patchflannel.errors import OutputError
from patchflannel.plots import plot_confusion, plot_roc_pr, plot_training_history, plot_weight_distribution

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CLASSES = ["normal", "bacterial", "viral", "covid"]


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC
    img = imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert img.std() > 0, "blank image"
    assert [p.name for p in path.parent.iterdir()] == [path.name], "temp file left behind"


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 80)
    proba = rng.dirichlet(np.ones(4), 80) + 0.8 * np.eye(4)[y]
    return y, proba / proba.sum(1, keepdims=True)


def test_confusion(tmp_path: Path) -> None:
    cm = np.array([[10, 2, 0, 0], [1, 8, 3, 0], [0, 2, 7, 1], [0, 0, 0, 0]])  # an empty row
    t0 = time.perf_counter()
    out = plot_confusion(cm, CLASSES, tmp_path / "cm.png", title="test")
    assert time.perf_counter() - t0 < 5
    assert_png(out)
    with pytest.raises(ValueError, match="cm must be"):
        plot_confusion(cm[:3], CLASSES, tmp_path / "bad.png")


def test_roc_pr_single_and_overlaid(tmp_path: Path, data: tuple[np.ndarray, np.ndarray]) -> None:
    y, proba = data
    assert_png(plot_roc_pr(y, proba, CLASSES, "COVID", tmp_path / "a" / "roc.png"))
    noisy = np.random.default_rng(1).dirichlet(np.ones(4), y.size)
    out = plot_roc_pr(y, {"flannel": proba, "noise": noisy}, CLASSES, "covid", tmp_path / "b" / "roc.png", title="t")
    assert_png(out)


def test_roc_pr_without_positives_still_writes(tmp_path: Path, data: tuple[np.ndarray, np.ndarray]) -> None:
    y, proba = data
    keep = y != 3
    assert_png(plot_roc_pr(y[keep], proba[keep], CLASSES, "covid", tmp_path / "roc.png"))


def test_weight_distribution(tmp_path: Path) -> None:
    w = np.tanh(np.random.default_rng(0).normal(size=(50, 5)))
    w[:, 2] = 0.5  # a constant column must not break the plot
    assert_png(plot_weight_distribution(w, [f"learner{i}" for i in range(5)], tmp_path / "w.png"))
    with pytest.raises(ValueError, match="w must be"):
        plot_weight_distribution(w, ["a", "b"], tmp_path / "bad.png")


def test_training_history(tmp_path: Path) -> None:
    history = {
        "epoch": [1.0, 2.0, 3.0],
        "train_loss": [1.0, 0.7, 0.5],
        "val_loss": [1.1, 0.8, 0.9],
        "val_macro_f1": [0.4, 0.6, 0.55],
    }
    assert_png(plot_training_history(history, tmp_path / "h.png", best_epoch=2))
    with pytest.raises(ValueError, match="history has none"):
        plot_training_history({"lr": [0.1]}, tmp_path / "bad.png")


def test_roc_pr_rejects_bad_input(tmp_path: Path, data: tuple[np.ndarray, np.ndarray]) -> None:
    y, proba = data
    with pytest.raises(ValueError, match="not one of"):
        plot_roc_pr(y, proba, CLASSES, "sars", tmp_path / "x.png")
    with pytest.raises(ValueError, match="proba of 'model' must be"):
        plot_roc_pr(y, proba[:, :3], CLASSES, "covid", tmp_path / "x.png")
    assert list(tmp_path.iterdir()) == []  # nothing written, no temp left


def test_replacing_a_figure_and_folder_in_the_way(tmp_path: Path) -> None:
    out = tmp_path / "cm.png"
    out.write_bytes(b"old")
    plot_confusion(np.eye(2, dtype=int) * 3, ["a", "b"], out)
    assert_png(out)
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(OutputError, match="is a folder"):
        plot_confusion(np.eye(2, dtype=int), ["a", "b"], tmp_path / "dir.png")


def test_history_without_epochs_or_best(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "No artists with labels" warning for an empty loss panel
        assert_png(plot_training_history({"val_macro_f1": [0.2, 0.5, 0.4, 0.6]}, tmp_path / "h.png"))
