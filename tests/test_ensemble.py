"""Tests for patchflannel.ensemble (losses, FLANNEL module, baselines, the combiner registry and its
files) and for fitting a combiner (patchflannel.ensemble_run.fit_combiner)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score

from patchflannel.ensemble import (
    COMBINERS,
    FlannelWeights,
    HardVoting,
    SoftVoting,
    StackingMLP,
    build_combiner,
    class_balanced_alpha,
    combiner_logits,
    focal_loss,
    hard_vote,
    load_combiner,
    macro_f1,
    minority_class_weights,
    save_combiner,
    soft_vote,
)
from patchflannel.ensemble_run import FitResult, fit_combiner
from patchflannel.errors import WeightsError, WeightsNotFoundError

pytestmark = pytest.mark.usefixtures("single_thread")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def random_P(b: int, n: int, m: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(3 * torch.randn(b, n, m, generator=g), dim=2)


def synthetic_task(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """3 learners, 3 imbalanced classes: learner 0 right 70 % of the time,
    learner 1 confidently wrong (always says (y+1) mod 3), learner 2 noise."""
    g = torch.Generator().manual_seed(seed)
    m = 3
    y = torch.multinomial(torch.tensor([0.6, 0.3, 0.1]), n, replacement=True, generator=g)
    wrong = (y + torch.randint(1, m, (n,), generator=g)) % m
    lab0 = torch.where(torch.rand(n, generator=g) < 0.7, y, wrong)

    def peaked(labels: torch.Tensor) -> torch.Tensor:
        p = 0.2 * torch.rand(n, m, generator=g) + F.one_hot(labels, m)
        return p / p.sum(1, keepdim=True)

    noise = torch.softmax(torch.randn(n, m, generator=g), dim=1)
    return torch.stack([peaked(lab0), peaked((y + 1) % m), noise], dim=1), y


# --------------------------------------------------------------------------- #
# focal loss and class weights
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("device", DEVICES)
def test_focal_gamma0_alpha_ones_is_cross_entropy(device: str) -> None:
    g = torch.Generator().manual_seed(1)
    z = (4 * torch.randn(32, 5, generator=g)).to(device)
    y = torch.randint(0, 5, (32,), generator=g).to(device)
    expected = F.cross_entropy(z, y)
    torch.testing.assert_close(focal_loss(z, y, torch.ones(5), 0.0), expected)
    torch.testing.assert_close(focal_loss(z, y, None, 0.0), expected)


def test_focal_hand_value_and_mean_reduction() -> None:
    # Two samples, two classes: p_t = sigmoid(2) and sigmoid(-1).
    z = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    y = torch.tensor([0, 0])
    alpha = torch.tensor([0.25, 0.75], dtype=torch.float32)  # float32 α with float64 z
    p = [1 / (1 + math.exp(-2.0)), 1 / (1 + math.exp(1.0))]
    expected = sum(-0.25 * (1 - q) ** 2 * math.log(q) for q in p) / 2
    out = focal_loss(z, y, alpha, 2.0)
    assert out.dtype == torch.float64 and out.ndim == 0
    assert out.item() == pytest.approx(expected, rel=1e-12)
    # weighted: a plain batch mean of α_y·CE_i, not sklearn/PyTorch's Σα-normalised mean
    w = torch.tensor([1.0, 5.0])
    z2, y2 = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1])
    ce = F.cross_entropy(z2, y2, reduction="none")
    torch.testing.assert_close(focal_loss(z2, y2, w, 0.0), (ce * w[y2]).mean())


def test_focal_downweights_easy_examples() -> None:
    z = torch.tensor([[6.0, 0.0, 0.0], [0.2, 0.0, 0.0]])  # easy, hard
    y = torch.tensor([0, 0])
    ratios = [
        (focal_loss(z[i : i + 1], y[i : i + 1], None, 2.0) / focal_loss(z[i : i + 1], y[i : i + 1], None, 0.0)).item()
        for i in range(2)
    ]
    assert ratios[0] < 1e-4 < 0.3 < ratios[1] < 1.0
    assert focal_loss(z, y, None, 1.0) < focal_loss(z, y, None, 0.5) < focal_loss(z, y, None, 0.0)


def test_focal_finite_gradient_when_confident() -> None:
    z = torch.tensor([[80.0, -80.0, 0.0]], requires_grad=True)
    loss = focal_loss(z, torch.tensor([0]), None, 0.5)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()


def test_focal_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="alpha"):
        focal_loss(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), torch.ones(4), 1.0)
    with pytest.raises(ValueError, match="gamma"):
        focal_loss(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), None, -1.0)


def test_class_balanced_alpha_by_hand() -> None:
    alpha = class_balanced_alpha(torch.tensor([0, 0, 0, 1]), 3)
    # inverse counts 1/3, 1/1, absent → 0; sum 4/3
    torch.testing.assert_close(alpha, torch.tensor([0.25, 0.75, 0.0]))
    with pytest.raises(ValueError, match="labels must lie"):
        class_balanced_alpha(torch.tensor([0, 3]), 3)


def test_minority_class_weights() -> None:
    torch.testing.assert_close(minority_class_weights([0, 0, 1, 2, 2, 2], 4, 5.0), torch.tensor([1.0, 5.0, 1.0, 1.0]))
    # ties: every class with the smallest count
    torch.testing.assert_close(minority_class_weights([0, 1, 2, 2], 3, 3.0), torch.tensor([3.0, 3.0, 1.0]))


# --------------------------------------------------------------------------- #
# FLANNEL module and baselines
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize(("n", "m", "hidden"), [(1, 2, None), (5, 4, None), (3, 7, 16)])
def test_flannel_shapes_init_and_gradients(n: int, m: int, hidden: int | None) -> None:
    torch.manual_seed(0)
    model = FlannelWeights(n, m, hidden)
    P = random_P(8, n, m)
    z, w = model(P)
    assert z.shape == (8, m) and w.shape == (8, n)
    # starts near soft voting: every weight ≈ 0.5, same argmax as the mean
    assert torch.allclose(w, torch.full_like(w, 0.5), atol=0.05)
    assert torch.equal(z.argmax(1), soft_vote(P).argmax(1))
    focal_loss(z, torch.arange(8) % m, None, 2.0).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, f"{name} gets no gradient"


def test_flannel_rejects_wrong_shape() -> None:
    with pytest.raises(ValueError, match="learners"):
        FlannelWeights(3, 4)(random_P(2, 2, 4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flannel_cpu_cuda_agree() -> None:
    torch.manual_seed(0)
    model = FlannelWeights(4, 3)
    P = random_P(16, 4, 3)
    z_cpu, _ = model(P)
    z_gpu, _ = model.to("cuda")(P.cuda())
    torch.testing.assert_close(z_gpu.cpu(), z_cpu, atol=1e-5, rtol=1e-5)


def test_soft_and_hard_vote_by_hand() -> None:
    # tie 1–1 in votes; summed probability favours class 1 (0.8 vs 0.7)
    tie = torch.tensor([[[0.6, 0.3, 0.1], [0.1, 0.5, 0.4]]])
    # majority (class 0, two votes) beats the larger summed probability (class 1)
    majority = torch.tensor([[[0.34, 0.33, 0.33], [0.34, 0.33, 0.33], [0.0, 1.0, 0.0]]])
    assert hard_vote(tie).argmax(1).item() == 1
    assert hard_vote(majority).argmax(1).item() == 0
    assert soft_vote(majority).argmax(1).item() == 1
    torch.testing.assert_close(soft_vote(tie), torch.tensor([[0.35, 0.4, 0.25]]))
    P = random_P(50, 5, 4)
    torch.testing.assert_close(hard_vote(P).sum(1), torch.ones(50))
    assert (hard_vote(P) >= 0).all()


@pytest.mark.parametrize("layers", [1, 2])
def test_stacking_mlp_and_combiner_logits(layers: int) -> None:
    torch.manual_seed(0)
    mlp = StackingMLP(4, 3, hidden_layers=layers, width=8)
    P = random_P(5, 4, 3)
    assert combiner_logits(mlp, P).shape == (5, 3)
    assert sum(isinstance(x, torch.nn.Linear) for x in mlp.modules()) == layers + 1
    flannel = FlannelWeights(4, 3)
    torch.testing.assert_close(combiner_logits(flannel, P), flannel(P)[0])


def test_voting_combiners_score_log_of_their_vote() -> None:
    P = random_P(20, 3, 4, seed=5)
    soft, hard = SoftVoting(3, 4), HardVoting(3, 4)
    assert not list(soft.parameters()) and not list(hard.parameters())
    torch.testing.assert_close(torch.softmax(soft(P), 1), soft_vote(P))
    torch.testing.assert_close(torch.softmax(hard(P), 1), hard_vote(P))
    torch.testing.assert_close(combiner_logits(soft, P), soft_vote(P).log())
    # by hand: the majority class wins hard voting, the larger mean wins soft voting
    majority = torch.tensor([[[0.34, 0.33, 0.33], [0.34, 0.33, 0.33], [0.0, 1.0, 0.0]]])
    assert HardVoting(3, 3)(majority).argmax(1).item() == 0 and SoftVoting(3, 3)(majority).argmax(1).item() == 1
    # a zero probability gives a finite score
    assert torch.isfinite(SoftVoting(1, 2)(torch.tensor([[[1.0, 0.0]]]))).all()
    with pytest.raises(ValueError, match="classes"):
        soft(random_P(2, 3, 5))


def test_build_combiner_registry() -> None:
    assert set(COMBINERS) == {"flannel", "stacking", "soft_voting", "hard_voting"}
    P = random_P(6, 3, 4)
    for name, cls in COMBINERS.items():
        model = build_combiner(name, 3, 4)
        assert type(model) is cls and model.n_learners == 3 and model.n_classes == 4
        assert combiner_logits(model, P).shape == (6, 4)
    # options reach the class; options left at None are dropped (the class default applies)
    assert build_combiner("flannel", 3, 4, hidden=8).dense[0].out_features == 8
    assert len(build_combiner("flannel", 3, 4, hidden=None).dense) == 1
    mlp = build_combiner("stacking", 3, 4, hidden_layers=2, width=5)
    assert [m.out_features for m in mlp.modules() if isinstance(m, torch.nn.Linear)] == [5, 5, 4]
    with pytest.raises(ValueError, match="unknown combiner 'mlp'.*flannel"):
        build_combiner("mlp", 3, 4)


@pytest.mark.parametrize(("name", "options"), [("flannel", {"hidden": 6}), ("stacking", {"width": 8}),
                                               ("hard_voting", {})])
def test_save_load_combiner_round_trip(tmp_path: Path, name: str, options: dict) -> None:
    torch.manual_seed(0)
    model = build_combiner(name, 3, 4, **options)
    save_combiner(model, tmp_path / "c", name, options, {"learners": ["a", "b", "c"]})
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    assert cfg["task"] == "combiner" and cfg["combiner"] == name and cfg["options"] == options
    assert (tmp_path / "c" / "model.safetensors").is_file()
    torch.manual_seed(1)  # a different init: the loaded tensors must come from the file
    loaded, loaded_cfg = load_combiner(tmp_path / "c")
    assert type(loaded) is type(model) and not loaded.training
    assert loaded_cfg["learners"] == ["a", "b", "c"] and loaded_cfg["n_learners"] == 3
    P = random_P(7, 3, 4)
    with torch.no_grad():
        torch.testing.assert_close(combiner_logits(loaded, P), combiner_logits(model.eval(), P))


def test_load_combiner_errors(tmp_path: Path) -> None:
    with pytest.raises(WeightsNotFoundError):
        load_combiner(tmp_path / "missing")
    save_combiner(FlannelWeights(3, 4), tmp_path / "c", "flannel", {})
    cfg_path = tmp_path / "c" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    # another task's weights are refused
    cfg_path.write_text(json.dumps({**cfg, "task": "cxr_learner"}))
    with pytest.raises(WeightsError, match="not 'combiner'"):
        load_combiner(tmp_path / "c")
    # a config that does not fit the tensors is a one-line WeightsError
    cfg_path.write_text(json.dumps({**cfg, "n_learners": 2}))
    with pytest.raises(WeightsError, match="do not fit"):
        load_combiner(tmp_path / "c")
    cfg_path.write_text(json.dumps({**cfg, "combiner": "nope"}))
    with pytest.raises(WeightsError, match="not a usable combiner config"):
        load_combiner(tmp_path / "c")


def test_macro_f1_matches_sklearn() -> None:
    g = torch.Generator().manual_seed(3)
    y = torch.randint(0, 3, (40,), generator=g)  # class 3 absent
    pred = torch.randint(0, 4, (40,), generator=g)
    expected = f1_score(y.numpy(), pred.numpy(), labels=range(4), average="macro", zero_division=0)
    assert macro_f1(y, pred, 4) == pytest.approx(expected)


# --------------------------------------------------------------------------- #
# training
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def task() -> tuple[torch.Tensor, ...]:
    P_tr, y_tr = synthetic_task(300, 1)
    P_va, y_va = synthetic_task(150, 2)
    return P_tr, y_tr, P_va, y_va


def _fit(task: tuple[torch.Tensor, ...], model_seed: int = 0, **kw: object) -> FitResult:
    torch.manual_seed(model_seed)
    make = kw.pop("model", lambda: FlannelWeights(3, 3))
    model = make()  # type: ignore[operator]
    args = dict(epochs=15, lr=1e-2, batch_size=32, patience=5, seed=0)
    args.update(kw)
    return fit_combiner(model, *task, **args)


def test_fit_flannel_learns_negative_weight_and_restores_best(task: tuple[torch.Tensor, ...]) -> None:
    P_tr, y_tr, P_va, y_va = task
    soft_f1 = macro_f1(y_va, soft_vote(P_va).argmax(1), 3)
    res = _fit(task)
    assert res.best_val_macro_f1 > max(soft_f1, macro_f1(y_va, P_va[:, 0].argmax(1), 3)) + 0.1
    # the confidently wrong learner is voted against
    _, w = res.model(P_va)
    assert w[:, 1].mean() < 0 < w[:, 0].mean()
    # the returned model is the best epoch's, not the last one's
    with torch.no_grad():
        assert macro_f1(y_va, combiner_logits(res.model, P_va).argmax(1), 3) == pytest.approx(res.best_val_macro_f1)
    h = res.history
    assert len(h["epoch"]) == len(h["train_loss"]) == len(h["val_loss"]) == len(h["val_macro_f1"])
    assert res.best_val_macro_f1 == max(h["val_macro_f1"])
    assert res.class_weights is not None and res.class_weights.sum().item() == pytest.approx(1.0)


def test_fit_is_deterministic(task: tuple[torch.Tensor, ...]) -> None:
    a = _fit(task, epochs=4, resample=True, loss="ce")
    b = _fit(task, epochs=4, resample=True, loss="ce")
    assert a.history == b.history
    for (k, va), vb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(va, vb), k
    c = _fit(task, epochs=4, resample=True, loss="ce", seed=1)
    assert c.history["train_loss"] != a.history["train_loss"]


@pytest.mark.parametrize(
    "kw",
    [
        dict(loss="weighted_ce", beta=3.0),
        dict(loss="focal", alpha=None, gamma=1.0),
        dict(model=lambda: StackingMLP(3, 3, hidden_layers=2, width=16), loss="ce"),
    ],
    ids=["weighted_ce", "focal-no-alpha", "stacking-mlp"],
)
def test_fit_variants_learn(task: tuple[torch.Tensor, ...], kw: dict) -> None:
    res = _fit(task, epochs=8, **dict(kw))
    assert res.best_val_macro_f1 > 0.6
    if kw.get("loss") == "weighted_ce":
        torch.testing.assert_close(res.class_weights, torch.tensor([1.0, 1.0, 3.0]))


def test_fit_stops_early(task: tuple[torch.Tensor, ...]) -> None:
    # lr = 0 never improves after epoch 1: stop after `patience` more epochs
    res = _fit(task, epochs=50, lr=0.0, patience=3)
    assert res.stopped_early and res.best_epoch == 1 and len(res.history["epoch"]) == 4


def test_fit_rejects_mismatched_inputs(task: tuple[torch.Tensor, ...]) -> None:
    P_tr, y_tr, P_va, y_va = task
    with pytest.raises(ValueError, match="labels must be"):
        fit_combiner(FlannelWeights(3, 3), P_tr, y_tr[:-1], P_va, y_va)
    with pytest.raises(ValueError, match="loss must be"):
        fit_combiner(FlannelWeights(3, 3), P_tr, y_tr, P_va, y_va, loss="mse")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="labels must lie"):
        fit_combiner(FlannelWeights(3, 3), P_tr, y_tr + 3, P_va, y_va)
