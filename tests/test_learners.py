"""Tests for patchflannel.learners: shapes, gradients, weights without network."""

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

from patchflannel.learners import (
    LEARNERS,
    Learner,
    create_learner,
    learner_info,
    list_learners,
    load_backbone_state_dict,
)
from patchflannel.weights import WeightsNotFoundError

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
    assert json.loads(json.dumps(config))["input_size"] == [1, 224, 224]
    assert config["architecture"] == "squeezenet1_1" and config["num_classes"] == 4


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
def test_safetensors_roundtrip_same_output(tmp_path, name: str) -> None:
    """safetensors drops module versions; MNASNet refuses a state dict without them unless we restore them."""
    from patchflannel.learners import create_learner
    from patchflannel.weights import load_state, load_weights, save_weights

    torch.manual_seed(0)
    m = create_learner(name, num_classes=4).eval()
    save_weights(m, tmp_path / "w", {"learner": name})
    state, _ = load_weights(tmp_path / "w")
    m2 = create_learner(name, num_classes=4).eval()
    load_state(m2, state)
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(m(x), m2(x))
    m3 = create_learner(name, num_classes=4, pretrained=str(tmp_path / "w.safetensors")).eval()
    with torch.no_grad():
        assert m3(x).shape == (2, 4)
