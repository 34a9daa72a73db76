"""Explanations (probabilistic Grad-CAM): target layers, batching, coverage, placement, FLANNEL weights, CLI."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from patchflannel.calibrate import Calibrator
from patchflannel.ensemble import FlannelWeights
from patchflannel.explain import (
    explain,
    find_target_layer,
    gradcam,
    learner_maps,
    paste,
)
from patchflannel.io import read_image, resize
from patchflannel.learners import InputSpec, Learner, create_learner, learner_info
from patchflannel.pipeline import Classifier
from conftest import shipped_patch_member

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples"
SAMPLE_A = SAMPLES / "kcx-IM-0117-0001.jpg"
SAMPLE_B = SAMPLES / "kcx-person1008_bacteria_2939.jpg"
CLASSES = ("normal", "bacteria", "virus", "covid")
W = 1024

pytestmark = pytest.mark.usefixtures("single_thread")


# --------------------------------------------------------------------------- synthetic tiny learners


class _Region(nn.Module):
    def __init__(self, region: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("region", region.float())

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return a * self.region


class _Tiny(nn.Module):
    """1×1 conv features (full resolution, so the Grad-CAM grid is the input grid), optionally zero
    outside a known region, then mean pooling and a linear head."""

    def __init__(self, side: int, region: torch.Tensor | None = None, conv_weight: float = 1.0,
                 fc_weight: float = 1.0, fc_bias: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0)) -> None:
        super().__init__()
        conv = nn.Conv2d(3, 2, 1)
        nn.init.constant_(conv.weight, conv_weight)
        nn.init.constant_(conv.bias, 3.0)  # A > 0 everywhere, whatever the normalised input
        self.features = nn.Sequential(conv, nn.ReLU(), _Region(region if region is not None else torch.ones(side, side)))
        self.fc = nn.Linear(2, 4)
        with torch.no_grad():
            self.fc.weight.fill_(0.0)
            self.fc.weight[0] = fc_weight  # only class 0 looks at the features
            self.fc.bias.copy_(torch.tensor(fc_bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


def _tiny_learner(spec: InputSpec, **kw: object) -> Learner:
    return Learner(_Tiny(spec.side, **kw), learner_info("mnasnet0_5"), num_classes=4, classes=CLASSES,
                   input_spec=spec).eval()


def _work(mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(0)
    img = torch.from_numpy(rng.integers(0, 256, (1, 1, W, W), dtype=np.uint8))
    return img, torch.from_numpy(mask)[None, None]


def _windows(centres: np.ndarray, fov: int) -> tuple[np.ndarray, np.ndarray]:
    """Union and coverage count of the crops' fields of view (computed independently of `paste`)."""
    count = np.zeros((W, W), np.int32)
    for r, c in centres:
        count[max(0, r - fov // 2):max(0, r - fov // 2 + fov), max(0, c - fov // 2):max(0, c - fov // 2 + fov)] += 1
    return count > 0, count


# --------------------------------------------------------------------------- target layers and batching


@pytest.mark.parametrize(("name", "layer"), [("mnasnet0_5", "layers"), ("mobilenet_v3_small", "features"),
                                             ("shufflenet_v2_x1_0", "conv5"), ("resnet18", "layer4"),
                                             ("squeezenet1_1", "features")])
def test_target_layer_is_the_last_conv_block(name: str, layer: str) -> None:
    assert find_target_layer(create_learner(name))[0] == layer


def test_batched_equals_per_crop_loop() -> None:
    model = Learner.from_pretrained(shipped_patch_member()[1])
    x = torch.rand(6, 1, 112, 112, generator=torch.Generator().manual_seed(0))
    cams, logits = gradcam(model, x)
    assert cams.shape[:2] == (6, 4) and cams.min() >= 0 and cams.max() <= 1
    peaks = cams.amax(dim=(2, 3))
    assert torch.all((peaks == 0) | (peaks == 1)) and peaks.sum() > 12  # each map's peak is 1 (or it is all 0)
    for i in range(6):
        c1, l1 = gradcam(model, x[i:i + 1])
        assert torch.allclose(c1[0], cams[i], atol=1e-5)
        assert torch.allclose(l1[0], logits[i], atol=1e-5)
    with torch.inference_mode():  # the logits are predict's
        assert torch.allclose(model(x), logits, atol=1e-5)


# --------------------------------------------------------------------------- coverage, placement, zeros


def test_coverage_normalisation_and_uncovered_pixels_are_zero() -> None:
    """An input-ignoring learner whose features are constant: every crop's Grad-CAM is 1 everywhere, so
    with coverage normalisation the map is exactly that crop probability on every covered pixel, however
    many crops overlap there, and 0 where no crop reached."""
    spec = InputSpec(mode="patch", patch_size=64, learner_input=32, mask_outside=False)
    model = _tiny_learner(spec, conv_weight=0.0, fc_bias=(0.5, 0.0, -0.2, 0.1))
    mask = np.zeros((W, W), bool)
    mask[400:440, 600:640] = True
    img, m = _work(mask)
    out = learner_maps([model], img, m, k=8, seeds=[3], targets=[0])
    p0 = float(torch.softmax(out.logits[0, 0, 0], 0)[0])
    covered, count = _windows(out.centres[0].numpy(), 64)
    assert count.max() > 1  # the crops overlap: without normalisation the map would not be flat
    got = out.maps[0].numpy()
    np.testing.assert_allclose(got[covered], p0, atol=1e-6)
    assert np.all(got[~covered] == 0)


def test_uncovered_and_unseen_pixels_are_zero_with_mask_outside() -> None:
    spec = InputSpec(mode="patch", patch_size=64, learner_input=32, mask_outside=True)
    model = _tiny_learner(spec, conv_weight=0.0)
    mask = np.zeros((W, W), bool)
    mask[400:440, 600:640] = True
    img, m = _work(mask)
    got = learner_maps([model], img, m, k=8, seeds=[3], targets=[0]).maps[0].numpy()
    assert got[mask].min() > 0 and np.all(got[~mask] == 0)


def test_learner_that_ignores_the_input_gives_a_zero_map() -> None:
    spec = InputSpec(mode="patch", patch_size=64, learner_input=32, mask_outside=False)
    model = _tiny_learner(spec, fc_weight=0.0, fc_bias=(1.0, 0.0, 0.0, 0.0))  # constant logits: no gradient at all
    mask = np.zeros((W, W), bool)
    mask[300:500, 300:500] = True
    img, m = _work(mask)
    assert torch.count_nonzero(learner_maps([model], img, m, k=4, seeds=[1], targets=[0]).maps) == 0


def test_patch_map_lands_where_the_evidence_was() -> None:
    """A patch learner whose logit depends only on a known (asymmetric) square of its crop: ≥ 80 % of the
    map's mass lies inside that square's place in the work image (catches flips, transposes, offsets)."""
    spec = InputSpec(mode="patch", patch_size=64, learner_input=32, mask_outside=False)
    region = torch.zeros(32, 32)
    region[0:8, 20:32] = 1  # crop rows 0-7, cols 20-31 → work rows top+0…15, cols left+40…63
    model = _tiny_learner(spec, region=region)
    mask = np.zeros((W, W), bool)
    mask[500:502, 300:302] = True  # one pixel at the crops' scale: the centre is (500, 300)
    img, m = _work(mask)
    out = learner_maps([model], img, m, k=1, seeds=[0], targets=[0])
    assert out.centres[0, 0].tolist() == [500, 300]
    got = out.maps[0].numpy()
    inside = np.zeros((W, W), bool)
    inside[468:484, 308:332] = True
    assert got[inside].sum() / got.sum() >= 0.8


def test_global_map_lands_where_the_evidence_was() -> None:
    spec = InputSpec(mode="global", global_size=64, mask_outside=False)
    region = torch.zeros(64, 64)
    region[8:24, 40:56] = 1  # → work rows 128-383, cols 640-895
    model = _tiny_learner(spec, region=region)
    img, m = _work(np.ones((W, W), bool))
    out = learner_maps([model], img, m, k=5, seeds=[0], targets=[0])
    assert out.centres is None and out.logits.shape[2] == 1  # one "crop": the image
    got = out.maps[0].numpy()
    inside = np.zeros((W, W), bool)
    inside[128:384, 640:896] = True
    assert got[inside].sum() / got.sum() >= 0.8


def test_paste_places_and_counts() -> None:
    spec = InputSpec(mode="patch", patch_size=32, learner_input=16, mask_outside=False)  # field of view 32 px
    cams = torch.ones(1, 2, 2, 2)
    total, count = paste(cams, torch.tensor([[1.0, 3.0]]), torch.tensor([[[0, 0], [20, 20]]]), spec)
    # crop 1: rows/cols -16…15 (the part beyond the border is dropped); crop 2: rows/cols 4…35
    assert count[0, 0, 0] == 1 and count[0, 10, 10] == 2 and count[0, 30, 30] == 1
    assert count[0, 36:].sum() == 0 and count[0, :, 36:].sum() == 0 and count[0, 0:4, 16:].sum() == 0
    assert count[0].sum() == 16 * 16 + 32 * 32
    assert total[0, 0, 0] == 1.0 and total[0, 10, 10] == 4.0 and total[0, 30, 30] == 3.0


# --------------------------------------------------------------------------- the ensemble (FLANNEL weights, global)


def _tiny_classifier(segmenter: object) -> Classifier:
    patch = _tiny_learner(InputSpec(mode="patch", patch_size=224, learner_input=112))
    region = torch.zeros(64, 64)
    region[10:40, 10:30] = 1
    glob = _tiny_learner(InputSpec(mode="global", global_size=64), region=region)
    comb = FlannelWeights(2, 4)
    with torch.no_grad():  # fixed weights, one of them negative: w = (0.8, -0.5)
        comb.dense[-1].weight.zero_()
        comb.dense[-1].bias.copy_(torch.tensor([math.atanh(0.8), math.atanh(-0.5)]))
    return Classifier(segmenter, {"tiny": [patch], "global-tiny": [glob]}, comb, Calibrator(),
                      {"classes": list(CLASSES), "learners": ["tiny", "global-tiny"]})


def test_negative_flannel_weights_subtract_and_map_is_clipped(shipped: Classifier) -> None:
    clf = _tiny_classifier(shipped.segmenter)
    e = explain(clf, str(SAMPLE_A), k=4, target="normal")[0]
    assert e.weights == pytest.approx({"tiny": 0.8, "global-tiny": -0.5}, abs=1e-6)
    signed = 0.8 * e.learner_maps["tiny"] - 0.5 * e.learner_maps["global-tiny"]
    np.testing.assert_allclose(e.signed, signed, atol=1e-5)
    assert e.signed.min() < 0  # the global learner's evidence outweighs the patch learner's somewhere
    pos = np.clip(e.signed, 0, None)
    np.testing.assert_allclose(e.map, pos / pos.max(), atol=1e-5)
    assert e.map.max() == pytest.approx(1.0) and e.map.min() == 0
    assert e.learner_maps["global-tiny"].max() > 0 and "global-tiny" not in e.centres


# --------------------------------------------------------------------------- the shipped ensemble


@pytest.fixture(scope="module")
def shipped() -> Classifier:
    return Classifier.from_pretrained()


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    return [read_image(SAMPLE_A), read_image(SAMPLE_B)]


@pytest.fixture(scope="module")
def explained(shipped: Classifier, images: list[np.ndarray]) -> list:
    return explain(shipped, images, k=4, batch_size=2)


def test_explain_uses_predicts_crops_and_prediction(shipped: Classifier, images: list[np.ndarray],
                                                    explained: list) -> None:
    p = shipped.predict(images[:1], k=4, keep_crops=True, exact=True)[0]  # explain runs the exact path
    e = explained[0]
    assert e.prediction.label == p.label and e.target == p.label
    np.testing.assert_array_equal(e.prediction.centres, p.centres)
    np.testing.assert_allclose(e.prediction.probs, p.probs, atol=1e-6)
    np.testing.assert_allclose(e.prediction.learner_weights, p.learner_weights, atol=1e-6)
    for n in shipped.names:
        if shipped.learners[n][0].input_spec.mode == "patch":  # a whole-image learner has no crop centres
            np.testing.assert_array_equal(e.centres[n], p.centres)
        np.testing.assert_allclose(e.prediction.crop_probs[n], p.crop_probs[n], atol=1e-6)
    assert set(e.learner_maps) == set(shipped.names)
    assert e.map.shape == images[0].shape and e.map.dtype == np.float32
    # max(S, 0) / max: in [0, 1] with its peak at 1 (a whole-image learner's map can be > 0 everywhere)
    assert e.map.min() >= 0 and e.map.max() == pytest.approx(1.0)
    for m in e.learner_maps.values():
        assert m.shape == images[0].shape and 0 <= m.min() and m.max() <= 1


def test_same_map_alone_or_with_other_images(shipped: Classifier, images: list[np.ndarray], explained: list) -> None:
    alone = explain(shipped, images[1:], k=4)[0]
    np.testing.assert_allclose(alone.map, explained[1].map, atol=1e-6)


def test_patch_learners_maps_lie_in_the_lungs(shipped: Classifier, explained: list, images: list[np.ndarray]) -> None:
    # Patch learners see lung crops only, so their maps stay in the lungs; a whole-image learner's map
    # may not (that is what it shows: where a whole-image model looks, lungs or not).
    patch = [n for n in shipped.names if shipped.learners[n][0].input_spec.mode == "patch"]
    assert patch
    for e, im in zip(explained, images):
        lungs = resize(cv2.dilate(e.prediction.mask.astype(np.uint8), np.ones((9, 9), np.uint8)) > 0, im.shape, "nearest")
        for n in patch:
            m = e.learner_maps[n]
            assert m.sum() > 0 and m[lungs].sum() / m.sum() >= 0.95, n
        if len(patch) == len(shipped.names):
            assert e.mass_inside(lungs) >= 0.95


def test_class_argument_changes_the_map(shipped: Classifier, images: list[np.ndarray], explained: list) -> None:
    other = next(c for c in CLASSES if c != explained[0].target)
    e = explain(shipped, images[:1], k=4, target=other)[0]
    assert e.target == other and e.prediction.label == explained[0].prediction.label
    assert np.abs(e.map - explained[0].map).max() > 0.05
    with pytest.raises(ValueError, match="unknown class"):
        explain(shipped, images[:1], k=1, target="flu")


# --------------------------------------------------------------------------- CLI


def test_cli_explain_and_predict_explain(tmp_path: Path, images: list[np.ndarray]) -> None:
    from patchflannel.cli import app

    runner = CliRunner()
    bad = tmp_path / "in" / "broken.png"
    bad.parent.mkdir()
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "ex"
    res = runner.invoke(app, ["explain", str(SAMPLES), str(bad), "--out", str(out), "--k", "4", "--device", "cpu"])
    assert res.exit_code == 1, res.output  # the bad file is an error row; the others are explained
    with open(out / "explanations.csv", encoding="utf-8") as fh:
        rows = {r["name"]: r for r in csv.DictReader(fh)}
    assert rows["broken"]["status"] == "error" and rows["broken"]["error"]
    for path, im in zip((SAMPLE_A, SAMPLE_B), images):
        stem = path.stem
        assert rows[stem]["status"] == "ok" and rows[stem]["explained"] == rows[stem]["label"]
        heat = cv2.imread(str(out / "heatmaps" / f"{stem}.png"), cv2.IMREAD_UNCHANGED)
        assert heat.dtype == np.uint8 and heat.shape == im.shape and heat.max() == 255 and heat.min() < 255
        assert (out / "overlays" / f"{stem}_explain.png").stat().st_size > 10_000
        doc = json.loads((out / "json" / f"{stem}.json").read_text(encoding="utf-8"))
        assert len(doc["crop_probabilities"][shipped_patch_member()[0]]["probs"]) == 4
    assert not (out / "heatmaps" / "broken.png").exists()

    out2 = tmp_path / "pr"
    res = runner.invoke(app, ["predict", str(SAMPLE_A), "--out", str(out2), "--k", "4", "--explain", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    doc = json.loads((out2 / "json" / f"{SAMPLE_A.stem}.json").read_text(encoding="utf-8"))
    assert doc["explanation"]["class"] == doc["label"]
    probs = doc["crop_probabilities"][shipped_patch_member()[0]]["probs"]
    assert len(probs) == 4 and all(abs(sum(p) - 1) < 1e-4 for p in probs)
    assert cv2.imread(str(out2 / "heatmaps" / f"{SAMPLE_A.stem}.png"), cv2.IMREAD_UNCHANGED).shape == images[0].shape
    assert (out2 / "overlays" / f"{SAMPLE_A.stem}_explain.png").is_file()

    res = runner.invoke(app, ["explain", str(SAMPLE_A), "--out", str(tmp_path / "x"), "--class", "flu", "--device", "cpu"])
    assert res.exit_code == 2 and "flu" in res.output
