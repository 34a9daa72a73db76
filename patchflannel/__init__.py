"""patchflannel: Patched FLANNEL for chest X-ray diagnosis research.

Stages, in the order data flows (inference code never imports training code)::

    io ─▶ segment ─▶ sampler ─▶ learners ─▶ vote ─▶ ensemble ─▶ calibrate ─▶ pipeline (Classifier)
    training: data, training, segment_train, patch_train, ensemble_run, metrics, card

The public API is importable from the top level::

    from patchflannel import LungSegmenter, Classifier, read_image
    clf = Classifier.from_pretrained()            # the shipped ensemble (weights/ensemble)
    [p.label for p in clf.predict(["a.png"])]

Names are imported lazily, so ``import patchflannel`` is cheap.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.6.0"

_EXPORTS = {
    "LungSegmenter": "segment",
    "Segmentation": "segment",
    "MaskQuality": "segment",
    "Classifier": "pipeline",
    "Prediction": "pipeline",
    "Learner": "learners",
    "InputSpec": "learners",
    "create_learner": "learners",
    "list_learners": "learners",
    "FlannelWeights": "ensemble",
    "explain": "explain",
    "Explanation": "explain",
    "read_image": "io",
    "as_images": "io",
    "list_images": "io",
    "sample_centres": "sampler",
    "PatchflannelError": "errors",
    "ImageReadError": "errors",
    "WeightsNotFoundError": "errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'patchflannel' has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
