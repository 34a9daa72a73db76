"""Tests for patchflannel.vote: hand-computed votes, chunking invariance."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from patchflannel.vote import predict_distribution, vote


pytestmark = pytest.mark.usefixtures("single_thread")


def test_vote_hand_computed() -> None:
    logits = torch.tensor(
        [
            [[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.5, 0.1], [1.0, 1.0, 5.0]],
            [[0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0]],
        ]
    )
    hard, soft = vote(logits)
    assert torch.equal(hard, torch.tensor([[0.25, 0.5, 0.25], [0.0, 0.0, 1.0]]))

    def softmax(row: list[float]) -> list[float]:
        z = sum(math.exp(v) for v in row)
        return [math.exp(v) / z for v in row]

    expected = [
        [sum(col) / 4 for col in zip(*(softmax(p) for p in image))]
        for image in logits.tolist()
    ]
    assert torch.allclose(soft, torch.tensor(expected), atol=1e-6)
    assert soft[1, 2].item() == pytest.approx(math.e / (2 + math.e))


def test_vote_ties_go_to_lowest_class() -> None:
    hard, soft = vote(torch.zeros(1, 3, 4))
    assert torch.equal(hard, torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    assert torch.allclose(soft, torch.full((1, 4), 0.25))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_vote_rows_sum_to_one_and_are_float32(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    for k in (1, 2, 7, 100):
        logits = (torch.randn(5, k, 4, generator=g) * 3).to(dtype)
        hard, soft = vote(logits)
        assert hard.shape == soft.shape == (5, 4)
        assert hard.dtype == soft.dtype == torch.float32
        assert torch.allclose(hard.sum(1), torch.ones(5), atol=1e-6)
        assert torch.allclose(soft.sum(1), torch.ones(5), atol=1e-5)
        # Hard votes are counts / K and agree with the per-patch argmax.
        counts = torch.stack([torch.bincount(row, minlength=4) for row in logits.float().argmax(2)])
        assert torch.equal(hard, counts.float() / k)
        assert bool((soft >= 0).all())


@pytest.mark.parametrize(
    ("logits", "match"),
    [
        (torch.zeros(2, 4), r"\(B,K,M\)"),
        (torch.zeros(2, 0, 4), "K >= 1"),
        (torch.zeros(2, 3, 4, dtype=torch.int64), "float"),
        (torch.tensor([[[0.0, float("nan")]]]), "NaN"),
        (torch.tensor([[[0.0, float("inf")]]]), "NaN or inf"),
    ],
)
def test_vote_bad_inputs(logits: Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        vote(logits)


class _TinyNet(nn.Module):
    """Conv + BatchNorm + Dropout: mode matters, so eval must be enforced."""

    def __init__(self, n_classes: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4, n_classes)
        self.batch_sizes: list[int] = []

    def forward(self, x: Tensor) -> Tensor:
        self.batch_sizes.append(x.shape[0])
        return self.fc(self.drop(self.features(x).flatten(1)))


def _crops(b: int = 3, k: int = 5, p: int = 12) -> Tensor:
    return torch.rand(b, k, 1, p, p, generator=torch.Generator().manual_seed(1))


def test_predict_chunked_equals_unchunked_and_bounds_chunks() -> None:
    torch.manual_seed(0)
    model = _TinyNet()
    crops = _crops()
    full = predict_distribution(model, crops, chunk_size=10_000)
    assert full.shape == (3, 5, 3) and full.dtype == torch.float32
    for chunk in (1, 4, 7, 15):
        model.batch_sizes.clear()
        chunked = predict_distribution(model, crops, chunk_size=chunk)
        assert torch.allclose(chunked, full, atol=1e-6)
        assert max(model.batch_sizes) <= chunk
        assert len(model.batch_sizes) == math.ceil(15 / chunk)
    # Row (b,k) of the output is the model's output on crop (b,k).
    model.eval()
    with torch.no_grad():
        assert torch.allclose(full[2, 4], model(crops[2, 4:5]).squeeze(0), atol=1e-6)


def test_predict_restores_mode_and_returns_normal_tensor() -> None:
    model = _TinyNet().train()
    out = predict_distribution(model, _crops(), chunk_size=4)
    assert model.training
    assert not out.is_inference() and not out.requires_grad
    out += 1  # usable downstream (an inference tensor would refuse this)
    model.eval()
    predict_distribution(model, _crops(), chunk_size=4)
    assert not model.training


def test_predict_uint8_crops_equal_scaled_float() -> None:
    model = _TinyNet()
    crops8 = (_crops() * 255).to(torch.uint8)
    a = predict_distribution(model, crops8, chunk_size=4)
    b = predict_distribution(model, crops8.float() / 255, chunk_size=4)
    assert torch.allclose(a, b, atol=1e-6)


def test_predict_bad_inputs() -> None:
    model = _TinyNet()
    with pytest.raises(ValueError, match=r"\(B,K,C,P,P\)"):
        predict_distribution(model, torch.zeros(3, 1, 12, 12))
    with pytest.raises(ValueError, match="chunk_size"):
        predict_distribution(model, _crops(), chunk_size=0)
    with pytest.raises(ValueError, match="float in"):
        predict_distribution(model, _crops().to(torch.int32))
    with pytest.raises(ValueError, match="empty"):
        predict_distribution(model, torch.zeros(0, 5, 1, 12, 12))
    with pytest.raises(ValueError, match=r"\(N,M\) logits"):
        predict_distribution(nn.Flatten(0), _crops())


def test_sample_predict_vote_pipeline_with_a_real_learner() -> None:
    from patchflannel.learners import create_learner
    from patchflannel.sampler import sample_patches

    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 1, 96, 80, generator=g)
    masks = torch.zeros(2, 1, 96, 80, dtype=torch.bool)
    masks[:, :, 20:70, 10:30] = True
    crops, _ = sample_patches(images, masks, k=3, size=64, generator=g)
    logits = predict_distribution(create_learner("mobilenet_v3_small"), crops, chunk_size=4)
    hard, soft = vote(logits)
    assert logits.shape == (2, 3, 4) and hard.shape == soft.shape == (2, 4)
    assert torch.allclose(soft.sum(1), torch.ones(2), atol=1e-5)
