"""The whole shipped Classifier on real radiographs of ../shared/data/cxr (skipped with a reason when absent)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from patchflannel.data import CLASSES, load_records
from patchflannel.io import read_image
from patchflannel.pipeline import Classifier

ROOT = Path(__file__).resolve().parent.parent
ENSEMBLE = ROOT / "weights" / "ensemble"
K = 8

pytestmark = [pytest.mark.data, pytest.mark.usefixtures("single_thread")]


@pytest.fixture(scope="module")
def clf() -> Classifier:
    if not (ENSEMBLE / "config.json").is_file():
        pytest.skip(f"shipped classifier {ENSEMBLE} absent")
    return Classifier.from_pretrained(ENSEMBLE)


@pytest.fixture(scope="module")
def images(cxr_dir: Path) -> list[np.ndarray]:
    """Three real radiographs of different classes and sources (the first record of each of three classes)."""
    records = load_records([cxr_dir])
    picked = [next(r for r in records if r.label == c) for c in ("covid", "normal", "virus")]
    assert len({r.source for r in picked}) >= 2
    return [read_image(r.file) for r in picked]


def test_an_image_gets_the_same_answer_alone_and_inside_a_batch(clf: Classifier, images: list[np.ndarray]) -> None:
    alone = [clf.predict([im], k=K, seed=0)[0] for im in images]
    order = [2, 0, 1]
    batch = clf.predict([images[i] for i in order], k=K, seed=0, batch_size=3)
    for pos, i in enumerate(order):
        a, b = alone[i], batch[pos]
        assert a.status == b.status == "ok"
        np.testing.assert_array_equal(a.centres, b.centres)  # per-image crop seeds: the same crops
        np.testing.assert_array_equal(a.mask, b.mask)
        np.testing.assert_allclose(b.learner_probs, a.learner_probs, rtol=0, atol=1e-6)
        np.testing.assert_allclose(b.probs, a.probs, rtol=0, atol=1e-6)
        assert a.label == b.label
    # the crops depend on the image: different images, different centres
    assert not np.array_equal(alone[0].centres, alone[1].centres)


def test_probabilities_are_distributions(clf: Classifier, images: list[np.ndarray]) -> None:
    preds = clf.predict(images, k=K, seed=0, batch_size=3)
    assert clf.classes == CLASSES and len(preds) == 3
    for p in preds:
        assert p.probs.shape == (4,) and (p.probs >= 0).all()
        assert abs(float(p.probs.sum()) - 1) < 1e-6 and abs(float(p.raw_probs.sum()) - 1) < 1e-6
        np.testing.assert_allclose(p.learner_probs.sum(1), 1, atol=1e-5)
        assert p.learner_probs.shape == (len(clf.names), 4)
        assert p.learner_weights is not None and p.learner_weights.shape == (len(clf.names),)
        assert p.centres.shape == (K, 2) and bool(p.mask[p.centres[:, 0], p.centres[:, 1]].all())  # crops in the lungs
        assert p.label == CLASSES[int(np.argmax(p.probs))] and p.confidence == pytest.approx(float(p.probs.max()))
    # another seed draws other crops
    other = clf.predict(images[:1], k=K, seed=1)[0]
    assert not np.array_equal(other.centres, preds[0].centres)
