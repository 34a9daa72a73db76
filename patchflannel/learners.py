"""Base learners: a registry of torchvision backbones and one factory.

``create_learner(name)`` builds any registered backbone with an ``num_classes``
head, wrapped in :class:`Learner`, which takes gray (or RGB) crops as float in
[0,1] and does the channel repeat and ImageNet normalisation itself, so callers
never normalise. Each registry entry is a :class:`LearnerSpec` that carries the
learner's data config (input size, mean/std, interpolation), in the spirit of
timm's ``PretrainedCfg``.

Weights never download: ``pretrained=True`` reads torchvision's file from the
torch hub cache (``$TORCH_HOME/hub/checkpoints/``) and fails with a message
saying which file to put where; ``pretrained=<path>`` loads a local file.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torchvision.models as tvm
from torch import Tensor, nn
from torchvision.models import WeightsEnum

from .weights import WeightsNotFoundError, load_state

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LEARNERS",
    "Learner",
    "LearnerSpec",
    "create_learner",
    "learner_info",
    "list_learners",
    "load_backbone_state_dict",
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


class Learner(nn.Module):
    """A torchvision backbone behind a fixed input contract.

    forward: x (N,in_chans,H,W) float in [0,1], H,W >= ``spec.min_input_size``
    → logits (N,num_classes) in x's dtype. Gray input is repeated to 3
    channels (a view, no copy) and ImageNet mean/std normalisation happens
    here, once, so the same crops feed every learner.
    """

    def __init__(self, backbone: nn.Module, spec: LearnerSpec, num_classes: int, in_chans: int = 1) -> None:
        super().__init__()
        if in_chans not in (1, 3):
            raise ValueError(f"in_chans must be 1 (gray) or 3 (RGB), got {in_chans}")
        self.backbone = backbone
        self.spec = spec
        self.num_classes = num_classes
        self.in_chans = in_chans
        # Non-persistent: constants of the contract, not learnt weights, so a
        # state dict holds only backbone.* keys.
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def classifier(self) -> nn.Module:
        """The head layer (e.g. for a separate learning rate)."""
        return self.backbone.get_submodule(self.spec.head)

    def data_config(self) -> dict[str, Any]:
        """JSON-ready description of the expected input (for weight sidecars)."""
        return {
            "architecture": self.spec.name,
            "num_classes": self.num_classes,
            "in_chans": self.in_chans,
            "input_size": [self.in_chans, 224, 224],
            "native_input_size": [3, self.spec.input_size, self.spec.input_size],
            "min_input_size": self.spec.min_input_size,
            "input_range": [0.0, 1.0],
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
            "interpolation": self.spec.interpolation,
        }

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"{self.spec.name}: expected input (N,{self.in_chans},H,W), got {tuple(x.shape)}")
        if not x.dtype.is_floating_point:
            raise ValueError(f"{self.spec.name}: expected float input in [0,1], got {x.dtype}")
        if min(x.shape[2:]) < self.spec.min_input_size:
            raise ValueError(
                f"{self.spec.name}: input {tuple(x.shape[2:])} is smaller than its minimum "
                f"{self.spec.min_input_size}×{self.spec.min_input_size}"
            )
        if self.in_chans == 1:
            x = x.expand(-1, 3, -1, -1)
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        return self.backbone(x)


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
    load_state(backbone, to_load, strict=False)  # keeps module versions (MNASNet needs them)
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
    return Learner(backbone, spec, num_classes=num_classes, in_chans=in_chans)
