"""predict's fast path: ONNX Runtime learners and the sequential vote, against the exact path.

Unit tests on random-weight learners (no data needed) and real-image tests on
the shipped classifier and the shipped samples: the rule the fast path must
keep is "same label, mean |Δp| ≤ 0.01 as the exact path" (docs/results.md §6
measures it on all 965 development images).
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from patchflannel import backend
from patchflannel.errors import PatchflannelError
from patchflannel.learners import InputSpec, create_learner, crop_source, draw_crops, make_inputs
from patchflannel.pipeline import Classifier, StopRule
from patchflannel.sampler import image_generators

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = sorted((ROOT / "samples").glob("*.jpg"))
ENSEMBLE = ROOT / "weights" / "ensemble"

needs_onnx = pytest.mark.skipif(not backend.onnx_available(), reason="onnxruntime/onnx not installed")


def _learner(name: str = "mobilenet_v3_small"):
    torch.manual_seed(0)
    spec = InputSpec(mode="patch", patch_size=64, learner_input=32)
    return create_learner(name, num_classes=4, input_spec=spec, pretrained=False).eval()


# --------------------------------------------------------------------------- crops


def test_crops_drawn_in_chunks_are_the_prefix_of_one_draw() -> None:
    g = torch.Generator().manual_seed(3)
    work = torch.randint(0, 256, (2, 1, 256, 256), generator=g, dtype=torch.uint8)
    masks = torch.zeros(2, 1, 256, 256, dtype=torch.bool)
    masks[0, :, 40:200, 30:120] = True
    masks[1, :, 60:220, 100:240] = True
    spec = InputSpec(mode="patch", patch_size=64, learner_input=32, work_size=256)
    x_all, c_all, _ = make_inputs(work, masks, spec, 40, seeds=[11, 12])
    small, small_masks = crop_source(work, masks, spec)
    gens = image_generators([11, 12])
    parts = [draw_crops(small, small_masks, spec, c, gens) for c in (16, 16, 8)]
    torch.testing.assert_close(torch.cat([p[0] for p in parts], 1), x_all, rtol=0, atol=0)
    torch.testing.assert_close(torch.cat([p[1] for p in parts], 1), c_all, rtol=0, atol=0)


def test_stop_rule_schedule_and_validation() -> None:
    rule = StopRule(chunk=16, min_k=24)
    assert [rule.next_chunk(d, 100) for d in (0, 24, 40, 88, 96)] == [24, 16, 16, 12, 4]
    with pytest.raises(ValueError):
        StopRule(chunk=0)
    with pytest.raises(ValueError):
        StopRule(flip=1.5)


# --------------------------------------------------------------------------- backend


@needs_onnx
@pytest.mark.parametrize("name", ["mobilenet_v3_small", "shufflenet_v2_x1_0", "mnasnet0_5"])
def test_onnx_runner_matches_torch(name: str) -> None:
    models = [_learner(name), _learner(name)]
    run, used = backend.runner(models, 32, "onnx")
    assert used == "onnx"
    x = torch.rand(5, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = torch.stack([m(x) for m in models])
    out = run(x)
    assert out.shape == (2, 5, 4)
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)


@needs_onnx
def test_onnx_graph_is_cached_and_reused(onnx_cache: Path) -> None:
    model = _learner()
    backend.runner([model], 32, "onnx")
    files = sorted((onnx_cache / "onnx").glob("*.onnx"))
    assert files, "no graph written to the cache"
    stamps = {f: f.stat().st_mtime_ns for f in files}
    backend.runner([model], 32, "onnx")
    assert {f: f.stat().st_mtime_ns for f in files} == stamps  # read back, not written again
    with torch.no_grad():
        next(model.parameters()).add_(1.0)  # other weights, another graph
    backend.runner([model], 32, "onnx")
    assert len(list((onnx_cache / "onnx").glob("*.onnx"))) == len(files) + 1


def test_torch_backend_and_bad_names() -> None:
    model = _learner()
    run, used = backend.runner([model], 32, "torch")
    assert used == "torch" and run(torch.rand(2, 1, 32, 32)).shape == (1, 2, 4)
    with pytest.raises(PatchflannelError, match="--backend 'tensorrt'"):
        backend.runner([model], 32, "tensorrt")


@needs_onnx
def test_a_graph_that_disagrees_with_torch_is_never_served(monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(backend, "TOLERANCE", -1.0)  # any difference is too much
    model = _learner()
    with caplog.at_level(logging.WARNING):
        _, used = backend.runner([model], 32, "auto")
    assert used == "torch" and "differs from PyTorch" in caplog.text
    with pytest.raises(PatchflannelError, match="differs from PyTorch"):
        backend.runner([model], 32, "onnx")


def test_auto_without_onnxruntime_is_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backend, "onnx_available", lambda: False)
    assert backend.runner([_learner()], 32, "auto")[1] == "torch"
    with pytest.raises(PatchflannelError, match="pip install onnxruntime"):
        backend.runner([_learner()], 32, "onnx")


# --------------------------------------------------------------------------- shipped classifier, real images


@pytest.fixture(scope="module")
def shipped() -> Classifier:
    if not (ENSEMBLE / "config.json").is_file():
        pytest.skip(f"shipped classifier {ENSEMBLE} absent")
    return Classifier.from_pretrained(ENSEMBLE)


@needs_onnx
def test_fast_default_agrees_with_exact_on_the_samples(shipped: Classifier) -> None:
    exact = shipped.predict(SAMPLES, exact=True)
    fast = shipped.predict(SAMPLES)
    for e, f in zip(exact, fast):
        assert (e.path, e.backend, e.k, e.k_max) == ("exact", "torch", 100, 100)
        assert f.path == "fast" and f.backend == "onnx" and 32 <= f.k <= 100 and f.k_max == 100
        assert f.label == e.label
        # the stop rule aims at a mean |Δp| of 0.007 per image (calibrated); over the 193 test images the
        # v0.3 and v0.4 classifiers' mean is 0.004 / 0.003 and their worst single class difference 0.038 (results §7, §8)
        assert float(np.abs(f.probs - e.probs).mean()) <= 0.02
        np.testing.assert_array_equal(f.centres, e.centres[:f.k])  # the first k crops of the exact path's


@needs_onnx
def test_onnx_backend_with_every_crop_is_the_exact_answer(shipped: Classifier) -> None:
    exact = shipped.predict(SAMPLES[:1], k=40, exact=True)[0]
    full = shipped.predict(SAMPLES[:1], k=40, sequential=False)[0]
    never = shipped.predict(SAMPLES[:1], k=40, stop=StopRule(flip=0.0, tol=0.0))[0]  # can only stop at k
    assert full.k == never.k == 40
    np.testing.assert_allclose(full.probs, exact.probs, rtol=0, atol=1e-4)
    np.testing.assert_allclose(never.probs, full.probs, rtol=0, atol=1e-6)


@needs_onnx
def test_fast_path_answer_depends_only_on_the_image(shipped: Classifier) -> None:
    imgs = [*SAMPLES, SAMPLES[0]]
    alone = [shipped.predict([p], k=64)[0] for p in SAMPLES]
    batch = shipped.predict(imgs, k=64, batch_size=3)  # an image twice, stopping at different times than its neighbour
    for a, b in zip([*alone, alone[0]], batch):
        assert a.k == b.k
        np.testing.assert_array_equal(a.centres, b.centres)
        np.testing.assert_allclose(b.probs, a.probs, rtol=0, atol=1e-6)


@needs_onnx
def test_image_workers_change_nothing_but_the_speed(shipped: Classifier, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    from patchflannel.errors import ImageReadError

    imgs = [*SAMPLES, SAMPLES[0]]
    threads = torch.get_num_threads()
    serial = shipped.predict(imgs, k=64, workers=1)
    ran_in: list[str] = []
    batch = Classifier._predict_batch

    def spy(self: Classifier, *args: object, **kwargs: object) -> object:
        ran_in.append(threading.current_thread().name)
        return batch(self, *args, **kwargs)

    monkeypatch.setattr(Classifier, "_predict_batch", spy)
    for workers in (2, 3):
        ran_in.clear()
        side = shipped.predict(imgs, k=64, workers=workers)
        assert torch.get_num_threads() == threads  # PyTorch's thread count is restored
        assert len(ran_in) == 3 and all(n.startswith("patchflannel-predict") for n in ran_in)  # really in workers
        for a, b in zip(serial, side):
            assert (a.k, a.label) == (b.k, b.label)
            np.testing.assert_array_equal(a.centres, b.centres)
            np.testing.assert_allclose(b.probs, a.probs, rtol=0, atol=1e-6)
    # a batch that fails in a worker surfaces as its error, in order, and leaves the process as it was
    stream = shipped.predict_stream([("a", [SAMPLES[0]]), ("b", [np.zeros((3, 3))]), ("c", [SAMPLES[1]])], k=32, workers=2)
    assert next(stream)[0] == "a"
    with pytest.raises(ImageReadError):
        next(stream)
    assert torch.get_num_threads() == threads
    # a stream the caller stops early restores the threads too
    stream = shipped.predict_stream([(i, [p]) for i, p in enumerate(imgs)], k=32, workers=2)
    assert next(stream)[0] == 0
    assert torch.get_num_threads() == max(1, threads // 2)  # divided while the stream runs
    stream.close()
    assert torch.get_num_threads() == threads
    with pytest.raises(ValueError, match="workers must be"):
        shipped.predict_stream([], workers=0)  # checked when called, not when iterated


@needs_onnx
def test_a_pinned_thread_runs_its_whole_batch_on_one_session() -> None:
    models = [_learner(), _learner("mnasnet0_5")]
    run, _ = backend.runner(models, 32, "onnx")
    if len(run.sessions) < 2:
        pytest.skip("one CPU thread: the runner has a single session")
    calls: list[tuple[int, int]] = []

    class Recorder:
        def __init__(self, i: int, session: object) -> None:
            self.i, self.session = i, session

        def run(self, out: object, feed: dict[str, np.ndarray]) -> object:
            calls.append((self.i, len(feed["x"])))
            return self.session.run(out, feed)

    run.sessions = [Recorder(i, s) for i, s in enumerate(run.sessions)]
    x = torch.rand(6, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    split = run(x)
    assert sorted(calls) == [(0, 3), (1, 3)]  # unpinned: the batch split over the sessions
    calls.clear()
    backend.bind_session(1)
    try:
        pinned = run(x)
    finally:
        backend.bind_session(None)
    assert calls == [(1, 6)]  # pinned: the whole batch on session 1
    torch.testing.assert_close(pinned, split, rtol=1e-5, atol=1e-5)


def test_cli_predict_exact_and_fast_columns(tmp_path: Path, shipped: Classifier) -> None:
    from typer.testing import CliRunner

    from patchflannel.cli import app

    runner = CliRunner()
    for flag, out in (([], "fast"), (["--exact"], "exact")):
        res = runner.invoke(app, ["predict", str(SAMPLES[0]), "--out", str(tmp_path / out), "--k", "48", *flag])
        assert res.exit_code == 0, res.output
        with open(tmp_path / out / "predictions.csv", newline="") as fh:
            row = next(csv.DictReader(fh))
        j = json.loads((tmp_path / out / "json" / f"{row['name']}.json").read_text())
        assert row["path"] == j["path"] == out and row["k_max"] == "48" and j["k_max"] == 48
        assert int(row["k"]) == j["k"] == len(j["crop_centres_1024"]) and 32 <= j["k"] <= 48
        assert j["backend"] == ("torch" if out == "exact" else shipped.backend_used() or "onnx")
        if out == "exact":
            assert row["k"] == "48"


def test_cli_bad_backend_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from patchflannel.cli import app

    res = CliRunner().invoke(app, ["predict", str(SAMPLES[0]), "--out", str(tmp_path / "o"), "--backend", "tpu"])
    assert res.exit_code == 2 and "--backend 'tpu'" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "o").exists()
