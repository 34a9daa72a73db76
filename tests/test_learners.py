"""Tests for patchflannel.learners: shapes, gradients, weights without network, saved learner
folders, and the one input function (make_inputs)."""

from __future__ import annotations

import json
import re
import socket
import urllib.request
from pathlib import Path

import pytest
import torch
import torchvision.models as tvm
from torch import nn

from patchflannel.errors import WeightsError, WeightsNotFoundError
from patchflannel.learners import (
    LEARNERS,
    InputSpec,
    Learner,
    create_learner,
    learner_info,
    list_learners,
    load_backbone_state_dict,
    make_inputs,
)

LIGHT = list_learners(light_only=True)
PAPER = list_learners(paper_only=True)


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to download fails the test loudly."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("network access attempted")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_registry_lists() -> None:
    assert PAPER == ["inception_v3", "vgg19_bn", "resnext101_32x8d", "resnet152", "densenet161"]
    assert {"resnet18", "mobilenet_v3_small", "efficientnet_b0", "shufflenet_v2_x1_0"} <= set(LIGHT)
    assert set(list_learners()) == set(PAPER) | set(LIGHT) == set(LEARNERS)
    assert not set(PAPER) & set(LIGHT)


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="unknown learner 'resnet9000'") as info:
        create_learner("resnet9000")
    for name in LEARNERS:
        assert name in str(info.value)
    with pytest.raises(ValueError, match="valid names"):
        learner_info("nope")


@pytest.mark.parametrize("name", LIGHT)
def test_light_learner_forward_backward(name: str) -> None:
    torch.manual_seed(0)
    model = create_learner(name).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 1, 224, 224))
    assert out.shape == (2, 4)
    assert bool(torch.isfinite(out).all())

    # Gradient coverage does not depend on resolution, so the (costlier)
    # backward pass runs on small crops, in train mode.
    model.train()
    out = model(torch.rand(2, 1, 64, 64))
    assert out.shape == (2, 4) and bool(torch.isfinite(out).all())
    out.square().mean().backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    no_grad = [n for n, p in trainable if p.grad is None or not bool(torch.isfinite(p.grad).all())]
    assert not no_grad, f"parameters without finite gradient: {no_grad[:5]}"
    assert model.classifier.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", PAPER)
def test_paper_learner_builds_with_new_head(name: str) -> None:
    # Built on the meta device: the real shapes and forward-shape inference,
    # without allocating hundreds of MB of weights or computing anything.
    spec = learner_info(name)
    with torch.device("meta"):
        model = create_learner(name, num_classes=4)
        out = model(torch.empty(2, 1, 224, 224))
    assert out.shape == (2, 4)
    head = model.classifier
    assert isinstance(head, nn.Linear) and head.out_features == 4
    assert spec.paper and not spec.light


@pytest.mark.parametrize("name", [n for n in LEARNERS if n not in ("inception_v3", "regnet_x_400mf")])
def test_imagenet_architecture_matches_weights_metadata(name: str) -> None:
    # With 1000 classes the parameter count must equal the ImageNet file's, or
    # pretrained=True could not load. (Inception: its aux head is disabled here;
    # regnet's builder computes widths with tensors, so it cannot run on meta and
    # is covered by the forward test and the pretrained round trip instead.)
    with torch.device("meta"):
        model = create_learner(name, num_classes=1000)
    assert sum(p.numel() for p in model.parameters()) == learner_info(name).num_params


def test_inception_works_on_224_and_rejects_below_minimum() -> None:
    spec = learner_info("inception_v3")
    assert spec.input_size == 299 and spec.min_input_size == 75
    with torch.device("meta"):
        model = create_learner("inception_v3").train()
        assert model(torch.empty(2, 1, 224, 224)).shape == (2, 4)  # no aux tuple in train mode
        assert model(torch.empty(2, 1, 75, 75)).shape == (2, 4)
        with pytest.raises(ValueError, match="smaller than its minimum"):
            model(torch.empty(2, 1, 74, 74))


def test_gray_input_equals_repeated_normalised_rgb() -> None:
    torch.manual_seed(0)
    model = create_learner("squeezenet1_1").eval()
    x = torch.rand(2, 1, 64, 64)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(model(x), model.backbone((x.repeat(1, 3, 1, 1) - mean) / std), atol=1e-6)


def test_rgb_learner_and_input_checks() -> None:
    model = create_learner("mobilenet_v3_small", num_classes=3, in_chans=3).eval()
    assert model(torch.rand(2, 3, 96, 96)).shape == (2, 3)
    with pytest.raises(ValueError, match=r"expected input \(N,3,H,W\)"):
        model(torch.rand(2, 1, 96, 96))
    with pytest.raises(ValueError, match="float input"):
        create_learner("mobilenet_v3_small")(torch.zeros(2, 1, 96, 96, dtype=torch.uint8))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"in_chans": 2}, "in_chans"),
        ({"num_classes": 0}, "num_classes"),
        ({"pretrained": 1}, "pretrained must be"),
        ({"aux_logits": True}, "aux_logits"),
        ({"weights": "DEFAULT"}, "pretrained=..."),
    ],
)
def test_create_learner_bad_arguments(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        create_learner("resnet18", **kwargs)  # type: ignore[arg-type]


def test_builder_kwargs_pass_through_and_none_dropped() -> None:
    model = create_learner("mobilenet_v3_small", dropout=0.0, norm_layer=None)
    assert model.backbone.classifier[2].p == 0.0


def test_data_config_is_json_ready() -> None:
    config = create_learner("squeezenet1_1").data_config()
    # The default input: 224 px patches of the 1024² image, seen at 112 px.
    assert json.loads(json.dumps(config))["input_size"] == [1, 112, 112]
    assert config["architecture"] == "squeezenet1_1" and config["num_classes"] == 4
    assert config["task"] == "cxr_learner" and config["classes"] == ["class0", "class1", "class2", "class3"]
    assert config["input"] == InputSpec().to_dict()
    spec = InputSpec(mode="global", global_size=256)
    assert create_learner("squeezenet1_1", input_spec=spec).data_config()["input_size"] == [1, 256, 256]


# ------------------------------------------------------------------- weights


def test_pretrained_true_without_cache_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    spec = learner_info("resnet18")
    with pytest.raises(WeightsNotFoundError) as info:
        create_learner("resnet18", pretrained=True)
    message = str(info.value)
    assert spec.weights_file == "resnet18-f37072fd.pth"
    assert str(tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in message
    assert "never" in message and "TORCH_HOME" in message
    assert isinstance(info.value, FileNotFoundError)


@pytest.mark.parametrize("name", ["resnet18", "regnet_x_400mf"])
def test_pretrained_true_reads_the_hub_cache(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A stand-in for the ImageNet file: a torchvision-layout 1000-class state dict.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    spec = learner_info(name)
    reference = getattr(tvm, name)(weights=None)
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(reference.state_dict(), tmp_path / "hub" / "checkpoints" / spec.weights_file)

    model = create_learner(name, pretrained=True)  # 4 classes: head skipped
    loaded = model.backbone.state_dict()
    for key, value in reference.state_dict().items():
        if key.startswith(spec.head + "."):
            assert loaded[key].shape[0] == 4
        else:
            assert torch.equal(loaded[key], value), key

    full = create_learner(name, num_classes=1000, pretrained=True)  # head fits: loaded too
    assert all(torch.equal(full.backbone.state_dict()[k], v) for k, v in reference.state_dict().items())


def test_pretrained_path_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    trained = create_learner("resnet18").eval()
    path = tmp_path / "resnet18.pth"
    torch.save(trained.state_dict(), path)  # Learner layout: backbone.* keys
    torch.manual_seed(1)
    loaded = create_learner("resnet18", pretrained=str(path)).eval()
    for (k1, v1), (k2, v2) in zip(trained.state_dict().items(), loaded.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2), k1
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(trained(x), loaded(x))


def test_pretrained_path_other_class_count_skips_only_head(tmp_path: Path) -> None:
    torch.manual_seed(0)
    trained = create_learner("mobilenet_v3_small", num_classes=4)
    path = tmp_path / "m.pth"
    torch.save({"state_dict": trained.backbone.state_dict()}, path)  # checkpoint-style wrapper
    loaded = create_learner("mobilenet_v3_small", num_classes=2, pretrained=path)
    assert loaded.classifier.out_features == 2
    for key, value in trained.backbone.state_dict().items():
        if not key.startswith("classifier.3."):
            assert torch.equal(loaded.backbone.state_dict()[key], value), key


def test_pretrained_safetensors_file(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    trained = create_learner("squeezenet1_1")
    path = tmp_path / "sq.safetensors"
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(path))
    loaded = create_learner("squeezenet1_1", pretrained=path)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in trained.state_dict().items())


def test_pretrained_path_errors(tmp_path: Path) -> None:
    with pytest.raises(WeightsNotFoundError, match="not found"):
        create_learner("resnet18", pretrained=tmp_path / "missing.pth")
    wrong = tmp_path / "wrong.pth"
    torch.save(create_learner("squeezenet1_1").state_dict(), wrong)
    with pytest.raises(ValueError, match="does not fit resnet18"):
        create_learner("resnet18", pretrained=wrong)
    junk = tmp_path / "junk.pth"
    torch.save([1, 2, 3], junk)
    with pytest.raises(ValueError, match="not a state dict"):
        create_learner("resnet18", pretrained=junk)


def test_backbone_shape_mismatch_outside_head_is_an_error() -> None:
    spec = learner_info("resnet18")
    state = tvm.resnet18(weights=None).state_dict()
    state["conv1.weight"] = torch.zeros(64, 1, 7, 7)
    with pytest.raises(ValueError, match=r"shape mismatch: conv1\.weight"):
        load_backbone_state_dict(tvm.resnet18(weights=None), state, spec, "test")


def test_densenet_old_checkpoint_keys_are_renamed() -> None:
    # torchvision's DenseNet ImageNet files use "norm.1"-style keys. A tiny
    # DenseNet stands in for densenet161 (the loader only needs its family/head).
    def tiny() -> nn.Module:
        return tvm.DenseNet(growth_rate=4, block_config=(1, 1), num_init_features=8, bn_size=2, num_classes=4)

    torch.manual_seed(0)
    source = tiny()
    old_style = {
        re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k): v for k, v in source.state_dict().items()
    }
    assert any(".norm.1." in k for k in old_style)
    target = tiny()
    load_backbone_state_dict(target, old_style, learner_info("densenet161"), "old-style")
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in source.state_dict().items())


def test_learner_is_a_module_with_spec() -> None:
    model = create_learner("shufflenet_v2_x1_0", num_classes=3)
    assert isinstance(model, Learner) and model.spec is LEARNERS["shufflenet_v2_x1_0"]
    assert model.num_classes == 3 and model.in_chans == 1
    # mean/std are constants of the input contract, not saved weights.
    assert all(k.startswith("backbone.") for k in model.state_dict())


def test_squeezenet_logits_are_not_clipped_at_zero() -> None:
    from patchflannel.learners import create_learner

    torch.manual_seed(0)
    m = create_learner("squeezenet1_1", num_classes=4).eval()
    with torch.no_grad():
        out = m(torch.rand(4, 1, 112, 112))
    assert (out < 0).any(), "a final ReLU would make every logit >= 0"


@pytest.mark.parametrize("name", ["mnasnet0_5", "mobilenet_v3_small"])
def test_safetensors_roundtrip_same_output(tmp_path: Path, name: str) -> None:
    """safetensors drops module versions; MNASNet refuses a state dict without them unless we restore them."""
    from patchflannel.hub import load_pretrained, load_state_dict, save_pretrained

    torch.manual_seed(0)
    m = create_learner(name, num_classes=4).eval()
    save_pretrained(tmp_path / "w", m, {"task": "cxr_learner", "architecture": name})
    state, cfg = load_pretrained(tmp_path / "w", task="cxr_learner")
    assert cfg["architecture"] == name
    m2 = create_learner(name, num_classes=4).eval()
    load_state_dict(m2, state, tmp_path / "w")
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(m(x), m2(x))
    m3 = create_learner(name, num_classes=4, pretrained=str(tmp_path / "w" / "model.safetensors")).eval()
    with torch.no_grad():
        torch.testing.assert_close(m(x), m3(x))


# ------------------------------------------------------------------- saved learner folders

CLASSES = ("normal", "bacteria", "virus", "covid")


def test_learner_save_from_pretrained_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    spec = InputSpec(patch_size=128, learner_input=32, mask_outside=False, normalise="lung_zscore")
    m = create_learner("mnasnet0_5", num_classes=4, classes=CLASSES, input_spec=spec,
                       info={"training": {"epochs": 3}, "metrics": {"macro_f1": 0.5}, "ignored": 1}).eval()
    folder = m.save_pretrained(tmp_path / "best", extra={"member": "fold1"})
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["task"] == "cxr_learner" and cfg["architecture"] == "mnasnet0_5" and cfg["classes"] == list(CLASSES)
    assert cfg["input"]["normalise"] == "lung_zscore" and cfg["member"] == "fold1" and "code_version" in cfg

    torch.manual_seed(1)  # another init: every tensor must come from the file
    loaded = Learner.from_pretrained(folder)
    assert isinstance(loaded, Learner) and not loaded.training
    assert loaded.classes == CLASSES and loaded.input_spec == spec and loaded.name == "mnasnet0_5"
    assert loaded.info == {"training": {"epochs": 3}, "metrics": {"macro_f1": 0.5}, "member": "fold1"}
    for key, value in m.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(m(x), loaded(x))


def test_learner_global_name_and_float16_folder(tmp_path: Path) -> None:
    from patchflannel.hub import save_pretrained

    m = create_learner("squeezenet1_1", num_classes=4, classes=CLASSES, input_spec=InputSpec(mode="global"))
    assert m.name == "global-squeezenet1_1"
    half = {k: v.half() if v.is_floating_point() else v for k, v in m.state_dict().items()}
    save_pretrained(tmp_path / "h", half, m.data_config())
    loaded = Learner.from_pretrained(tmp_path / "h")  # float16 tensors load as float32
    for key, value in m.state_dict().items():
        v = loaded.state_dict()[key]
        assert v.dtype == value.dtype and (not value.is_floating_point() or torch.equal(v, value.half().float())), key


def test_learner_from_pretrained_errors(tmp_path: Path) -> None:
    with pytest.raises(WeightsNotFoundError):
        Learner.from_pretrained(tmp_path / "nothing")
    m = create_learner("squeezenet1_1", num_classes=4)
    folder = m.save_pretrained(tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "task": "combiner"}))
    with pytest.raises(WeightsError, match="not 'cxr_learner'"):
        Learner.from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({**cfg, "architecture": "resnet9000"}))
    with pytest.raises(WeightsError, match="not a usable learner config"):
        Learner.from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({**cfg, "num_classes": 3, "classes": ["a", "b", "c"]}))
    with pytest.raises(WeightsError, match="do not fit"):
        Learner.from_pretrained(folder)
    with pytest.raises(ValueError, match="class names"):
        create_learner("squeezenet1_1", num_classes=4, classes=["a", "b"])


# ------------------------------------------------------------------- input spec and make_inputs


def test_input_spec_validation_and_keys() -> None:
    spec = InputSpec(patch_size=224, learner_input=56)
    assert spec.factor == 4 and spec.side == 56
    assert InputSpec(mode="global", global_size=300).side == 300
    with pytest.raises(ValueError, match="multiple"):
        InputSpec(patch_size=224, learner_input=100)
    with pytest.raises(ValueError, match="multiple"):
        InputSpec(patch_size=64, learner_input=8)
    with pytest.raises(ValueError, match="mode"):
        InputSpec(mode="tiles")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="normalise"):
        InputSpec(normalise="minmax")  # type: ignore[arg-type]
    # Crops can be shared exactly when everything that shapes them is equal.
    assert InputSpec().crops_key() == InputSpec().crops_key()
    assert InputSpec().crops_key() != InputSpec(mask_outside=False).crops_key()
    assert InputSpec(**InputSpec(normalise="lung_zscore").to_dict()) == InputSpec(normalise="lung_zscore")


def _work(b: int = 3, size: int = 128, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Small work images (uint8, random) with two rectangular 'lungs' each, shifted per image."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (b, 1, size, size), dtype=torch.uint8, generator=g)
    masks = torch.zeros(b, 1, size, size, dtype=torch.bool)
    for i in range(b):
        masks[i, 0, 20 + 4 * i : 100, 10:50] = True
        masks[i, 0, 24:96 - 4 * i, 70:118] = True
    return images, masks


def test_make_inputs_patch_mode_crops_the_shrunk_image() -> None:
    images, masks = _work()
    spec = InputSpec(patch_size=32, learner_input=16, work_size=128)
    x, centres, cm = make_inputs(images, masks, spec, k=5, seeds=[1, 2, 3], with_masks=True)
    assert x.shape == (3, 5, 1, 16, 16) and x.dtype == torch.float32
    assert centres.shape == (3, 5, 2) and centres.dtype == torch.int64 and cm.shape == (3, 5, 1, 16, 16)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    # centres are reported at work-image coordinates (a multiple of the shrink factor) and lie in the lungs
    assert bool((centres % 2 == 0).all())
    b = torch.arange(3)[:, None]
    small = torch.nn.functional.avg_pool2d(masks.float(), 2) >= 0.5
    assert bool(small[b, 0, centres[..., 0] // 2, centres[..., 1] // 2].all())
    # by hand: crop (b,k) is the 2× area-shrunk image around its centre, zero outside the lungs
    shrunk = torch.nn.functional.avg_pool2d(images.float(), 2).round()
    for i in range(3):
        for j in range(5):
            r, c = (int(v) // 2 for v in centres[i, j])
            expect = torch.zeros(16, 16)
            r0, c0 = r - 8, c - 8
            for rr in range(16):
                for cc in range(16):
                    y, xx = r0 + rr, c0 + cc
                    if 0 <= y < 64 and 0 <= xx < 64 and small[i, 0, y, xx]:
                        expect[rr, cc] = shrunk[i, 0, y, xx]
            torch.testing.assert_close(x[i, j, 0] * 255, expect, atol=1e-3, rtol=0)
            assert torch.equal(cm[i, j, 0], _small_window(small[i, 0], r, c))


def _small_window(mask: torch.Tensor, r: int, c: int, size: int = 16) -> torch.Tensor:
    out = torch.zeros(size, size, dtype=torch.bool)
    for rr in range(size):
        for cc in range(size):
            y, x = r - size // 2 + rr, c - size // 2 + cc
            if 0 <= y < mask.shape[0] and 0 <= x < mask.shape[1]:
                out[rr, cc] = mask[y, x]
    return out


def test_make_inputs_each_image_depends_only_on_its_own_seed() -> None:
    images, masks = _work(b=3)
    spec = InputSpec(patch_size=32, learner_input=16, work_size=128)
    x, centres, _ = make_inputs(images, masks, spec, k=6, seeds=[10, 20, 30])
    # the same image with the same seed, alone or in another batch order, gets the same crops
    for i, seed in enumerate([10, 20, 30]):
        xi, ci, _ = make_inputs(images[i : i + 1], masks[i : i + 1], spec, k=6, seeds=[seed])
        assert torch.equal(xi[0], x[i]) and torch.equal(ci[0], centres[i])
    order = [2, 0, 1]
    xr, cr, _ = make_inputs(images[order], masks[order], spec, k=6, seeds=[30, 10, 20])
    assert torch.equal(xr, x[order]) and torch.equal(cr, centres[order])
    # another seed, other crops
    _, c2, _ = make_inputs(images, masks, spec, k=6, seeds=[11, 20, 30])
    assert not torch.equal(c2[0], centres[0]) and torch.equal(c2[1:], centres[1:])


def test_make_inputs_generators_continue_in_chunks() -> None:
    from patchflannel.sampler import image_generators

    images, masks = _work(b=2)
    spec = InputSpec(patch_size=32, learner_input=16, work_size=128)
    x, centres, _ = make_inputs(images, masks, spec, k=8, seeds=[5, 6])
    gens = image_generators([5, 6])
    parts = [make_inputs(images, masks, spec, k=k, generators=gens) for k in (3, 5)]
    assert torch.equal(torch.cat([p[1] for p in parts], 1), centres)
    assert torch.equal(torch.cat([p[0] for p in parts], 1), x)


def test_make_inputs_global_mode() -> None:
    images, masks = _work(b=2)
    spec = InputSpec(mode="global", global_size=32, mask_outside=True, work_size=128)
    x, centres, cm = make_inputs(images, masks, spec, k=7, seeds=[0, 0], with_masks=True)
    assert x.shape == (2, 1, 1, 32, 32) and centres is None and cm.shape == (2, 1, 1, 32, 32)
    # area-resized lungs-only image: each output pixel is the mean of its 4×4 block
    masked = torch.where(masks, images, torch.zeros((), dtype=torch.uint8)).float()
    expected = masked.view(2, 1, 32, 4, 32, 4).mean(dim=(3, 5)) / 255
    torch.testing.assert_close(x[:, 0], expected, atol=1e-6, rtol=0)
    unmasked, _, _ = make_inputs(images, masks, InputSpec(mode="global", global_size=32, mask_outside=False), k=1)
    torch.testing.assert_close(unmasked[:, 0], images.float().view(2, 1, 32, 4, 32, 4).mean(dim=(3, 5)) / 255,
                               atol=1e-6, rtol=0)


def test_make_inputs_lung_zscore() -> None:
    images, masks = _work(b=2)
    # the second image is a darker, low-contrast copy of the first: after normalising they look alike
    images[1] = (images[0].float() * 0.3 + 20).round().to(torch.uint8)
    masks[1] = masks[0]
    spec = InputSpec(mode="global", global_size=128, mask_outside=False, normalise="lung_zscore", work_size=128)
    x, _, _ = make_inputs(images, masks, spec)
    lung = masks[0, 0]
    for i in range(2):
        vals = x[i, 0, 0][lung].double()
        assert vals.mean().item() == pytest.approx(0.5, abs=0.02)
        assert vals.std().item() == pytest.approx(0.2, abs=0.02)
    assert (x[0] - x[1]).abs().mean().item() < 0.01
    # an image without lung pixels keeps its intensities
    none = torch.zeros_like(masks[:1])
    y, _, _ = make_inputs(images[:1], none, spec)
    torch.testing.assert_close(y[0, 0, 0] * 255, images[0, 0].float(), atol=1e-3, rtol=0)


def test_make_inputs_rejects_float_images() -> None:
    images, masks = _work(b=1)
    with pytest.raises(ValueError, match="uint8"):
        make_inputs(images.float(), masks, InputSpec())
    with pytest.raises(ValueError, match="one per image"):
        make_inputs(images, masks, InputSpec(patch_size=32, learner_input=16), k=2,
                    generators=[torch.Generator(), torch.Generator()])


def test_lung_zscore_matches_the_float_formula() -> None:
    """The histogram/lookup-table version gives what the per-pixel float formula gives (to one grey
    level at a rounding tie), keeps images without lung pixels, and floors the std."""
    from patchflannel.learners import lung_zscore

    def reference(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        x, m = images.double(), masks.double()
        n = m.sum(dim=(1, 2, 3), keepdim=True).clamp_min(1)
        mean = (x * m).sum(dim=(1, 2, 3), keepdim=True) / n
        std = ((((x - mean) * m) ** 2).sum(dim=(1, 2, 3), keepdim=True) / n).sqrt().clamp_min(1.0)
        z = ((x - mean) / std * 0.2 * 255 + 0.5 * 255).round().clamp(0, 255)
        return torch.where(n > 1, z, x).to(torch.uint8)

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (5, 1, 64, 64), generator=g, dtype=torch.uint8)
    images[3] = 90  # constant lung: std floored at one grey level
    masks = torch.rand(5, 1, 64, 64, generator=g) < 0.4
    masks[1] = False  # no lung pixel: unchanged
    masks[2] = False
    masks[2, 0, 10, 10] = True  # one lung pixel: unchanged
    out = lung_zscore(images, masks)
    ref = reference(images, masks)
    assert out.dtype == torch.uint8 and out.shape == images.shape
    assert torch.equal(out[1], images[1]) and torch.equal(out[2], images[2])
    assert torch.equal(out[3], torch.full_like(out[3], 128))  # (90 − 90) / 1 · 51 + 127.5 → 128
    assert (out.int() - ref.int()).abs().max() <= 1 and (out == ref).float().mean() > 0.999
    lung = out[0][masks[0]].double()
    assert abs(lung.mean().item() - 127.5) < 1.0 and abs(lung.std().item() - 51.0) < 1.0


def test_blank_lungs_global_input_keeps_everything_but_the_lungs() -> None:
    """The ablation input (`input.blank_lungs_global`): lungs 0, the rest as without masking; patch mode refuses it."""
    images, masks = _work(size=128)
    plain_spec = InputSpec(mode="global", global_size=128, mask_outside=False, work_size=128)
    blank = InputSpec(mode="global", global_size=128, mask_outside=False, blank_lungs=True, work_size=128)
    full, _, _ = make_inputs(images, masks, plain_spec, k=1)
    x, _, keep = make_inputs(images, masks, blank, k=1, with_masks=True)
    m = masks.unsqueeze(1)  # (B,1,1,H,W) like x
    assert torch.all(x[m] == 0) and torch.equal(x[~m], full[~m])
    assert torch.equal(keep, ~m)  # training re-blanks the lungs after augmentation
    assert blank.crops_key() != plain_spec.crops_key()
    assert InputSpec(**blank.to_dict()) == blank
    with pytest.raises(ValueError, match="blank_lungs"):
        InputSpec(mode="patch", mask_outside=False, blank_lungs=True)
    with pytest.raises(ValueError, match="blank_lungs"):
        InputSpec(mode="global", mask_outside=True, blank_lungs=True)
