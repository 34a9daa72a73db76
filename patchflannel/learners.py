"""Base learners: a registry of torchvision backbones, one factory, and the inputs they see.

``create_learner(name)`` builds any registered backbone with an ``num_classes``
head, wrapped in :class:`Learner`, which takes gray (or RGB) crops as float in
[0,1] and does the channel repeat and ImageNet normalisation itself, so callers
never normalise. Each registry entry is a :class:`LearnerSpec` that carries the
backbone's data config (input size, mean/std, interpolation), in the spirit of
timm's ``PretrainedCfg``; each trained learner carries its :class:`InputSpec`
(patch or whole image, field of view, resolution, masking) and class names,
saved beside its weights by :meth:`Learner.save_pretrained`.

:func:`make_inputs` is the one function that turns work images (1024² uint8)
and lung masks into what a learner sees — in training, out-of-fold voting and
``predict`` alike — so the three can never drift apart.

Weights never download: ``pretrained=True`` reads torchvision's file from the
torch hub cache (``$TORCH_HOME/hub/checkpoints/``) and fails with a message
saying which file to put where; ``pretrained=<path>`` loads a local file.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
import torchvision.models as tvm
from torch import Tensor, nn
from torchvision.models import WeightsEnum

from .errors import WeightsError, WeightsNotFoundError
from .hub import load_pretrained, load_state_dict, save_pretrained
from .sampler import extract_patches, image_generators, sample_centres

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LEARNERS",
    "InputSpec",
    "Learner",
    "LearnerSpec",
    "create_learner",
    "learner_info",
    "list_learners",
    "load_backbone_state_dict",
    "make_inputs",
    "crop_source",
    "draw_crops",
]

logger = logging.getLogger(__name__)

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class LearnerSpec:
    """What the registry knows about one backbone.

    ``head`` is the dotted path of the classifier layer inside the torchvision
    model (the one whose output size is ``num_classes``); its weights are
    the ones skipped when a checkpoint's class count differs.
    ``num_params`` is the ImageNet (1000-class) parameter count from the weights'
    metadata. ``input_size`` is the size the ImageNet weights were trained at;
    patches are 224 regardless, which every learner accepts (``min_input_size``).
    """

    name: str
    family: str
    builder: Callable[..., nn.Module]
    weights: WeightsEnum
    head: str
    input_size: int = 224
    min_input_size: int = 1
    interpolation: str = "bilinear"
    num_params: int = 0
    light: bool = False
    paper: bool = False
    builder_kwargs: Mapping[str, Any] = field(default_factory=dict)

    @property
    def weights_file(self) -> str:
        """File name of the ImageNet weights in torch's hub cache."""
        return os.path.basename(urlparse(self.weights.url).path)


def _spec(
    name: str,
    family: str,
    weights: WeightsEnum,
    head: str,
    *,
    light: bool = False,
    paper: bool = False,
    builder_kwargs: Mapping[str, Any] | None = None,
) -> LearnerSpec:
    meta = weights.meta
    transforms = getattr(weights.transforms, "keywords", {})
    interpolation = transforms.get("interpolation")
    return LearnerSpec(
        name=name,
        family=family,
        builder=getattr(tvm, name),
        weights=weights,
        head=head,
        input_size=int(transforms.get("crop_size", 224)),
        min_input_size=int(meta.get("min_size", (1, 1))[0]),
        interpolation=interpolation.value if interpolation is not None else "bilinear",
        num_params=int(meta.get("num_params", 0)),
        light=light,
        paper=paper,
        builder_kwargs=dict(builder_kwargs or {}),
    )


# The paper's five use the original (V1) ImageNet weights, as in 2020; the
# light learners use torchvision's current best tag. Pinned, not DEFAULT, so a
# torchvision upgrade cannot silently change which file is expected.
LEARNERS: dict[str, LearnerSpec] = {
    spec.name: spec
    for spec in (
        # Inception: aux head off (we return plain logits); transform_input on
        # because Google's weights expect [-1,1] input, which it derives from
        # the ImageNet-normalised input; explicit init avoids torchvision's
        # FutureWarning. Expects 299 but works on 224 crops (min 75).
        _spec(
            "inception_v3",
            "inception",
            tvm.Inception_V3_Weights.IMAGENET1K_V1,
            "fc",
            paper=True,
            builder_kwargs={"aux_logits": False, "transform_input": True, "init_weights": True},
        ),
        _spec("vgg19_bn", "vgg", tvm.VGG19_BN_Weights.IMAGENET1K_V1, "classifier.6", paper=True),
        _spec("resnext101_32x8d", "resnet", tvm.ResNeXt101_32X8D_Weights.IMAGENET1K_V1, "fc", paper=True),
        _spec("resnet152", "resnet", tvm.ResNet152_Weights.IMAGENET1K_V1, "fc", paper=True),
        _spec("densenet161", "densenet", tvm.DenseNet161_Weights.IMAGENET1K_V1, "classifier", paper=True),
        _spec("resnet18", "resnet", tvm.ResNet18_Weights.IMAGENET1K_V1, "fc", light=True),
        _spec(
            "mobilenet_v3_small", "mobilenet", tvm.MobileNet_V3_Small_Weights.IMAGENET1K_V1, "classifier.3", light=True
        ),
        _spec(
            "mobilenet_v3_large", "mobilenet", tvm.MobileNet_V3_Large_Weights.IMAGENET1K_V2, "classifier.3", light=True
        ),
        _spec("efficientnet_b0", "efficientnet", tvm.EfficientNet_B0_Weights.IMAGENET1K_V1, "classifier.1", light=True),
        _spec("shufflenet_v2_x1_0", "shufflenet", tvm.ShuffleNet_V2_X1_0_Weights.IMAGENET1K_V1, "fc", light=True),
        _spec("regnet_x_400mf", "regnet", tvm.RegNet_X_400MF_Weights.IMAGENET1K_V2, "fc", light=True),
        _spec("squeezenet1_1", "squeezenet", tvm.SqueezeNet1_1_Weights.IMAGENET1K_V1, "classifier.1", light=True),
        _spec("mnasnet0_5", "mnasnet", tvm.MNASNet0_5_Weights.IMAGENET1K_V1, "classifier.1", light=True),
        _spec("shufflenet_v2_x0_5", "shufflenet", tvm.ShuffleNet_V2_X0_5_Weights.IMAGENET1K_V1, "fc", light=True),
    )
}


def list_learners(light_only: bool = False, paper_only: bool = False) -> list[str]:
    """Registered learner names, paper's five first, then the light ones."""
    return [
        name
        for name, spec in LEARNERS.items()
        if (spec.light or not light_only) and (spec.paper or not paper_only)
    ]


def learner_info(name: str) -> LearnerSpec:
    """The registry entry for `name`; ValueError listing valid names if unknown."""
    try:
        return LEARNERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown learner {name!r}; valid names: {', '.join(LEARNERS)}") from None


@dataclass(frozen=True)
class InputSpec:
    """What one learner sees, from a 1024² work image and its lung mask; saved with its weights.

    ``mode="patch"``: K crops whose centres lie inside the lungs, each covering
    ``patch_size`` px of the 1024² image (the field of view), seen at
    ``learner_input`` px (the image is area-shrunk once by
    ``patch_size / learner_input``, then cropped); with ``mask_outside`` the
    pixels outside the lungs are 0. ``mode="global"``: the whole image
    area-resized to ``global_size`` (lungs only when ``mask_outside``).
    ``normalise="lung_zscore"`` maps each image's intensities so that its lung
    pixels have mean 0.5 and standard deviation 0.2 (clipped to [0,1]) — the
    same radiograph from different devices then looks alike.
    ``blank_lungs`` (global mode, an ablation): the lungs are 0 and everything
    else is kept — what a learner can tell from outside the lungs alone.
    """

    mode: Literal["patch", "global"] = "patch"
    patch_size: int = 224
    learner_input: int = 112
    global_size: int = 224
    mask_outside: bool = True
    normalise: Literal["none", "lung_zscore"] = "none"
    work_size: int = 1024
    blank_lungs: bool = False

    def __post_init__(self) -> None:
        if self.mode not in ("patch", "global"):
            raise ValueError(f"mode must be 'patch' or 'global', got {self.mode!r}")
        if self.mode == "patch" and (self.patch_size % self.learner_input or self.learner_input < 16):
            raise ValueError(f"patch_size {self.patch_size} must be a multiple of learner_input {self.learner_input} (≥ 16)")
        if self.normalise not in ("none", "lung_zscore"):
            raise ValueError(f"normalise must be 'none' or 'lung_zscore', got {self.normalise!r}")
        if self.blank_lungs and (self.mode != "global" or self.mask_outside):
            raise ValueError("blank_lungs is for global learners without mask_outside (the lungs or the rest, not both)")

    @property
    def factor(self) -> int:
        """Integer shrink factor between the 1024² image and the crops (patch mode)."""
        return self.patch_size // self.learner_input

    @property
    def side(self) -> int:
        """Side of the learner's input in pixels."""
        return self.learner_input if self.mode == "patch" else self.global_size

    def crops_key(self) -> tuple[Any, ...]:
        """Learners with equal keys can share one set of crops."""
        return (self.mode, self.patch_size, self.learner_input, self.global_size, self.mask_outside, self.normalise,
                self.blank_lungs)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if not self.blank_lungs:  # written only when set: learners saved without it load in older versions too
            del d["blank_lungs"]
        return d


def shrink(images: Tensor, masks: Tensor, factor: int) -> tuple[Tensor, Tensor]:
    """Area-shrink ``images (B,1,H,W) uint8`` and ``masks (B,1,H,W) bool`` by an integer ``factor``
    (a mask pixel is lung when at least half its block is)."""
    if factor == 1:
        return images, masks
    img = F.avg_pool2d(images.float(), factor).round_().to(torch.uint8)
    msk = F.avg_pool2d(masks.float(), factor) >= 0.5
    return img, msk


def lung_zscore(images: Tensor, masks: Tensor) -> Tensor:
    """Per image: intensities mapped so that lung pixels have mean 0.5, std 0.2 (uint8 in, uint8 out).

    The lung statistics come from a 256-bin histogram and the map is a 256-entry lookup table, so
    an image costs a few milliseconds at 1024² (float maths over every pixel took ~80 ms).
    Images without lung pixels keep their intensities; the std is floored at one grey level.
    """
    if images.dtype != torch.uint8:
        raise ValueError(f"lung_zscore expects uint8 images, got {images.dtype}")
    out = torch.empty_like(images)
    levels = torch.arange(256, dtype=torch.float64)
    for i in range(images.shape[0]):
        img = images[i]
        hist = torch.bincount(img[masks[i]].flatten(), minlength=256).to(torch.float64).cpu()
        n = float(hist.sum())
        if n <= 1:
            out[i] = img
            continue
        mean = float((hist * levels).sum()) / n
        std = max(math.sqrt(float((hist * (levels - mean) ** 2).sum()) / n), 1.0)
        lut = ((levels - mean) / std * (0.2 * 255) + 0.5 * 255).round_().clamp_(0, 255).to(torch.uint8)
        out[i] = lut.to(img.device)[img.long()]
    return out


def make_inputs(images: Tensor, masks: Tensor, spec: InputSpec, k: int = 1, seeds: Sequence[int] | None = None,
                generators: Sequence[torch.Generator] | None = None, with_masks: bool = False
                ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Work images and lung masks → a learner's inputs.

    Args:
        images: (B,1,W,W) uint8 work images (W = ``spec.work_size``).
        masks: (B,1,W,W) bool lung masks.
        k: crops per image (patch mode).
        seeds / generators: one per image; each image's crops depend only on
            its own seed (or generator state), never on the other images.
            Pass generators to continue a stream in chunks (sequential voting).
        with_masks: also return the crops' visible-region masks — the lungs, or with ``blank_lungs`` everything
            but the lungs (training re-blanks the rest after augmentation).

    Returns:
        ``(x, centres, crop_masks)``: x (B,K,1,P,P) float [0,1] (K = 1 in
        global mode), centres (B,K,2) int64 at work-image coordinates (None in
        global mode), crop masks (B,K,1,P,P) bool or None.
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"images must be (B,1,H,W) uint8 work images, got {tuple(images.shape)} {images.dtype}")
    if spec.mode == "global":
        img = lung_zscore(images, masks) if spec.normalise == "lung_zscore" else images
        if spec.mask_outside or spec.blank_lungs:
            keep = masks if spec.mask_outside else ~masks
            img = torch.where(keep, img, torch.zeros((), dtype=torch.uint8, device=images.device))
        x = F.interpolate(img.float(), size=(spec.global_size, spec.global_size), mode="area").div_(255.0)
        cm = None
        if with_masks:  # what stays visible (the lungs, or with blank_lungs everything else)
            keep = ~masks if spec.blank_lungs else masks
            cm = F.interpolate(keep.float(), size=(spec.global_size, spec.global_size), mode="area").unsqueeze(1) >= 0.5
        return x.unsqueeze(1), None, cm
    small, small_masks = crop_source(images, masks, spec)
    if generators is None:
        generators = image_generators(seeds if seeds is not None else [0] * images.shape[0])
    crops, centres = draw_crops(small, small_masks, spec, k, generators)
    cm = extract_patches(small_masks.to(torch.uint8), centres // spec.factor, size=spec.learner_input).bool() if with_masks else None
    return crops, centres, cm


def crop_source(images: Tensor, masks: Tensor, spec: InputSpec) -> tuple[Tensor, Tensor]:
    """Work images and masks → what a patch learner's crops are cut from: normalised
    (``spec.normalise``) and shrunk by ``spec.factor`` (uint8 images, bool masks)."""
    if spec.normalise == "lung_zscore":
        images = lung_zscore(images, masks)
    return shrink(images, masks, spec.factor)


def draw_crops(small: Tensor, small_masks: Tensor, spec: InputSpec, k: int,
               generators: Sequence[torch.Generator]) -> tuple[Tensor, Tensor]:
    """The next ``k`` crops of each image's stream, from images already shrunk by :func:`shrink`
    (and normalised): ``(x (B,k,1,P,P) float [0,1], centres (B,k,2) at work-image coordinates)``.

    Drawing 100 crops at once or in chunks of 20 from the same generators gives
    the same crops (the sequential vote of ``Classifier.predict`` relies on it).
    """
    centres = sample_centres(small_masks, k, generator=list(generators))
    crops = extract_patches(small, centres, size=spec.learner_input, masks=small_masks if spec.mask_outside else None)
    return crops.float().div_(255.0), centres * spec.factor


class Learner(nn.Module):
    """A torchvision backbone behind a fixed input contract, with its classes and :class:`InputSpec`.

    forward: x (N,in_chans,H,W) float in [0,1], H,W >= ``spec.min_input_size``
    → logits (N,num_classes) in x's dtype. Gray input is repeated to 3
    channels (a view, no copy) and ImageNet mean/std normalisation happens
    here, once, so the same crops feed every learner.
    """

    def __init__(self, backbone: nn.Module, spec: LearnerSpec, num_classes: int, in_chans: int = 1,
                 classes: Sequence[str] | None = None, input_spec: InputSpec | None = None,
                 info: dict[str, Any] | None = None) -> None:
        super().__init__()
        if in_chans not in (1, 3):
            raise ValueError(f"in_chans must be 1 (gray) or 3 (RGB), got {in_chans}")
        self.backbone = backbone
        self.spec = spec
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.classes = tuple(classes) if classes is not None else tuple(f"class{i}" for i in range(num_classes))
        if len(self.classes) != num_classes:
            raise ValueError(f"{len(self.classes)} class names for {num_classes} outputs")
        self.input_spec = input_spec or InputSpec()
        self.info = dict(info or {})
        # Non-persistent: constants of the contract, not learnt weights, so a
        # state dict holds only backbone.* keys.
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def name(self) -> str:
        """``NAME`` for patch learners, ``global-NAME`` for whole-image ones."""
        return self.spec.name if self.input_spec.mode == "patch" else f"global-{self.spec.name}"

    @property
    def classifier(self) -> nn.Module:
        """The head layer (e.g. for a separate learning rate)."""
        return self.backbone.get_submodule(self.spec.head)

    def data_config(self) -> dict[str, Any]:
        """JSON-ready description of the model and its expected input (saved as its config)."""
        side = self.input_spec.side
        return {
            "task": "cxr_learner",
            "architecture": self.spec.name,
            "classes": list(self.classes),
            "num_classes": self.num_classes,
            "in_chans": self.in_chans,
            "input": self.input_spec.to_dict(),
            "input_size": [self.in_chans, side, side],
            "min_input_size": self.spec.min_input_size,
            "input_range": [0.0, 1.0],
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
            **self.info,
        }

    def save_pretrained(self, directory: str | os.PathLike[str], extra: dict[str, Any] | None = None) -> Path:
        """``DIR/config.json`` (architecture, classes, input spec, …) + ``DIR/model.safetensors``."""
        return save_pretrained(directory, self, {**self.data_config(), **(extra or {})})

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], device: str | torch.device = "cpu") -> Learner:
        """Rebuild a learner saved by :meth:`save_pretrained` (float16 tensors are loaded as float32)."""
        state, cfg = load_pretrained(path, task="cxr_learner")
        try:
            spec = learner_info(cfg["architecture"])
            input_spec = InputSpec(**cfg["input"])
            info = {k: v for k, v in cfg.items() if k in ("training", "metrics", "member")}
            model = create_learner(spec.name, num_classes=int(cfg["num_classes"]), in_chans=int(cfg.get("in_chans", 1)),
                                   classes=cfg["classes"], input_spec=input_spec, info=info)
        except (KeyError, TypeError, ValueError) as exc:
            raise WeightsError(f"{path}: not a usable learner config ({exc})") from None
        load_state_dict(model, {k: v.float() if v.is_floating_point() else v for k, v in state.items()}, path)
        return model.to(device).eval()

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        return self.backbone(self.normalise(x))

    def check_input(self, x: Tensor) -> None:
        """Raise ValueError unless ``x`` is ``(N,in_chans,H,W)`` float with H,W ≥ the backbone's minimum."""
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"{self.spec.name}: expected input (N,{self.in_chans},H,W), got {tuple(x.shape)}")
        if not x.dtype.is_floating_point:
            raise ValueError(f"{self.spec.name}: expected float input in [0,1], got {x.dtype}")
        if min(x.shape[2:]) < self.spec.min_input_size:
            raise ValueError(
                f"{self.spec.name}: input {tuple(x.shape[2:])} is smaller than its minimum "
                f"{self.spec.min_input_size}×{self.spec.min_input_size}"
            )

    def normalise(self, x: Tensor) -> Tensor:
        """Checked input → what the backbone sees: gray repeated to 3 channels, ImageNet mean/std."""
        if self.in_chans == 1:
            x = x.expand(-1, 3, -1, -1)
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


# Old torchvision DenseNet checkpoints (including the ImageNet ones) name layers
# "norm.1" etc., which modules can no longer be called; torchvision renames them
# the same way when it loads them.
_DENSENET_OLD_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$")


def _unwrap_state_dict(obj: Any, source: str) -> dict[str, Tensor]:
    """Accept a bare state dict, common training checkpoints, or a Learner's own."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model_state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, Mapping):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{source}: not a state dict (a mapping of names to tensors)")
    state: dict[str, Tensor] = {}
    for key, value in obj.items():
        for prefix in ("module.", "backbone."):  # DataParallel, our Learner wrapper
            if key.startswith(prefix):
                key = key[len(prefix) :]
        state[key] = value
    return state


def load_backbone_state_dict(backbone: nn.Module, state: Mapping[str, Tensor], spec: LearnerSpec, source: str) -> None:
    """Load `state` into a torchvision `backbone` built from `spec`.

    Head tensors whose shape differs (another class count) are skipped and keep
    their fresh initialisation; a state without a head leaves it fresh too.
    Any other missing, unexpected or mis-shaped tensor is a ValueError, since it
    means the file is for a different architecture.
    """
    state = dict(state)
    if spec.family == "densenet":
        for key in list(state):
            match = _DENSENET_OLD_KEY.match(key)
            if match:
                state[match.group(1) + match.group(2)] = state.pop(key)
    target = backbone.state_dict()
    head_prefix = spec.head + "."
    skipped_head: list[str] = []
    mismatched: list[str] = []
    unexpected: list[str] = []
    to_load: dict[str, Tensor] = {}
    for key, value in state.items():
        if key not in target:
            # Inception's auxiliary classifier exists in the ImageNet file but is
            # disabled here; it is not part of our model.
            if not key.startswith("AuxLogits."):
                unexpected.append(key)
        elif value.shape != target[key].shape:
            (skipped_head if key.startswith(head_prefix) else mismatched).append(key)
        else:
            to_load[key] = value
    missing = [
        key
        for key in target
        if key not in to_load
        and not key.startswith(head_prefix)
        # Very old BatchNorm checkpoints lack the counter; it is not a weight.
        and not key.endswith("num_batches_tracked")
    ]
    problems = []
    if mismatched:
        problems.append(
            "shape mismatch: "
            + ", ".join(f"{k} {tuple(state[k].shape)} vs {tuple(target[k].shape)}" for k in mismatched[:5])
        )
    if missing:
        problems.append(f"{len(missing)} missing, e.g. {missing[:5]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected, e.g. {unexpected[:5]}")
    if problems:
        raise ValueError(f"{source} does not fit {spec.name}: " + "; ".join(problems))
    meta = getattr(backbone.state_dict(), "_metadata", None)
    if meta is not None:  # keeps module versions (MNASNet needs them)
        to_load = type(backbone.state_dict())(to_load)
        to_load._metadata = meta  # type: ignore[attr-defined]
    backbone.load_state_dict(to_load, strict=False)
    if skipped_head:
        logger.info("%s: head %s skipped (class count differs); it keeps its fresh init", source, skipped_head)
    logger.info("loaded %d tensors into %s from %s", len(to_load), spec.name, source)


def _imagenet_file(spec: LearnerSpec) -> Path:
    path = Path(torch.hub.get_dir()) / "checkpoints" / spec.weights_file
    if not path.is_file():
        raise WeightsNotFoundError(
            f"ImageNet weights for {spec.name} ({spec.weights}) are not cached and patchflannel never "
            f"downloads at run time. Put {spec.weights_file} (from {spec.weights.url}) at {path}, "
            f"or set TORCH_HOME to a folder whose hub/checkpoints/ holds it."
        )
    return path


def _read_state_file(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise WeightsNotFoundError(f"pretrained weights file {path} not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return _unwrap_state_dict(load_file(str(path)), str(path))
    # weights_only: a checkpoint must not be able to run code on load.
    return _unwrap_state_dict(torch.load(path, map_location="cpu", weights_only=True), str(path))


def create_learner(
    name: str,
    num_classes: int = 4,
    in_chans: int = 1,
    pretrained: bool | str | os.PathLike[str] = False,
    classes: Sequence[str] | None = None,
    input_spec: InputSpec | None = None,
    info: dict[str, Any] | None = None,
    **kwargs: Any,
) -> Learner:
    """Build a registered learner: (N,in_chans,H,W) float [0,1] → (N,num_classes) logits.

    Args:
        name: a key of ``LEARNERS`` (see ``list_learners()``).
        num_classes: size of the new classifier head.
        in_chans: 1 for gray crops (repeated to RGB inside), 3 for RGB.
        pretrained: False = torchvision's random init; True = torchvision's
            ImageNet weights from the torch hub cache (never downloaded;
            WeightsNotFoundError says which file to put where); a path = a
            local ``.pth``/``.pt``/``.safetensors`` state dict (torchvision
            layout, or a Learner's own). Head tensors of another class count
            are skipped, the rest must match exactly.
        **kwargs: passed to the torchvision builder (e.g. ``dropout``); options
            left at None are dropped.
    """
    spec = learner_info(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
    if in_chans not in (1, 3):
        raise ValueError(f"in_chans must be 1 (gray) or 3 (RGB), got {in_chans!r}")
    if kwargs.get("aux_logits"):
        raise ValueError("aux_logits=True is not supported: a Learner returns a single logits tensor")
    if "weights" in kwargs or "num_classes" in kwargs:
        raise ValueError("pass pretrained=... and num_classes=... to create_learner, not to the builder")
    builder_kwargs = {**spec.builder_kwargs, **{k: v for k, v in kwargs.items() if v is not None}}

    state: dict[str, Tensor] | None = None
    source = ""
    if pretrained is True:
        path = _imagenet_file(spec)  # before building: fail fast, no wasted init
        state, source = _read_state_file(path), f"ImageNet weights {path}"
    elif isinstance(pretrained, (str, os.PathLike)):
        path = Path(pretrained).expanduser()
        state, source = _read_state_file(path), str(path)
    elif pretrained is not False:
        raise ValueError(f"pretrained must be True, False or a file path, got {pretrained!r}")

    # weights=None always: torchvision would otherwise download, and we load
    # the state dict ourselves so the head can be skipped by shape.
    backbone = spec.builder(weights=None, num_classes=num_classes, **builder_kwargs)
    if spec.family == "squeezenet":
        # SqueezeNet ends in Conv → ReLU → pool, so its logits are clipped at 0; trained from random
        # init on 4 classes every unit died within an epoch here (loss stuck at ln 4). Logits must be free.
        backbone.classifier[2] = nn.Identity()
    if state is not None:
        load_backbone_state_dict(backbone, state, spec, source)
    return Learner(backbone, spec, num_classes=num_classes, in_chans=in_chans, classes=classes, input_spec=input_spec,
                   info=info)
