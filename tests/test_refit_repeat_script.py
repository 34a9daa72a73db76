"""scripts/refit_repeat.py copies a run without its refit models, never writes the source run, and puts a
new refit model's votes where train-patch puts them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml
from conftest import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "refit_repeat.py"


def _module():
    return load_script(SCRIPT)


def _fake_run(root: Path) -> Path:
    run = root / "run"
    ldir = run / "global-shufflenet_v2_x1_0"
    (ldir / "fold0" / "best").mkdir(parents=True)
    (ldir / "refit" / "best").mkdir(parents=True)
    (ldir / "fold0" / "best" / "model.safetensors").write_bytes(b"fold")
    (ldir / "refit" / "best" / "model.safetensors").write_bytes(b"old refit")
    (run / "config.yaml").write_text(yaml.safe_dump({"learners": ["global-shufflenet_v2_x1_0"]}))
    y = np.array([0, 1, 2, 3, 3])
    old = np.full((5, 4), 0.25, np.float32)
    np.savez(ldir / "test.npz", y=y, soft=old[:, None], soft_refit=old, hard_refit=old)
    np.savez(ldir / "external.npz", y=np.zeros(2, int), soft=old[:2, None], soft_refit=old[:2],
             sources=np.array(["jsrt", "jsrt"]))
    (ldir / "metrics.json").write_text(json.dumps({"refit_epochs": 22, "test_refit": {"macro_f1": 0.1},
                                                   "external": {"predicted": {"normal": 2}}}))
    (ldir / "confusion_test.png").write_bytes(b"old")
    return run


def test_copy_leaves_out_refit_and_new_votes_never_touch_the_source(tmp_path: Path) -> None:
    mod = _module()
    run = _fake_run(tmp_path)
    out = tmp_path / "out"
    mod.copy_run(run, out, ["global-shufflenet_v2_x1_0"])
    ldir = out / "global-shufflenet_v2_x1_0"
    assert (ldir / "fold0" / "best" / "model.safetensors").read_bytes() == b"fold"
    assert (ldir / "fold0" / "best" / "model.safetensors").stat().st_nlink == 2  # linked, not copied
    assert not (ldir / "refit").exists()
    # until the new refit model has voted, the copy holds no trace of the old one (nothing to export)
    with np.load(ldir / "test.npz") as z:
        assert "soft_refit" not in z.files and "soft" in z.files
    with np.load(ldir / "external.npz") as z:
        assert "soft_refit" not in z.files
    assert not {"test_refit", "external"} & set(json.loads((ldir / "metrics.json").read_text()))
    assert not (ldir / "confusion_test.png").exists()
    eye = np.eye(4, dtype=np.float32)[[0, 1, 2, 3, 0]]
    metrics = mod.update_outputs(ldir, {"soft_refit": eye, "hard_refit": eye, "ext_refit": eye[:2], "epochs": 22}, 1007)
    assert metrics["refit_seed"] == 1007 and metrics["test_refit"]["macro_f1"] < 1.0
    assert metrics["test_refit"]["accuracy"] == 0.8
    with np.load(ldir / "test.npz") as z:
        np.testing.assert_array_equal(z["soft_refit"], eye)
        assert z["soft"].shape == (5, 1, 4)  # the fold models' votes are kept
    with np.load(ldir / "external.npz") as z:
        np.testing.assert_array_equal(z["soft_refit"], eye[:2])
    assert metrics["external"]["predicted"] == {"normal": 1, "bacteria": 1, "virus": 0, "covid": 0}
    assert (ldir / "confusion_test.png").stat().st_size > 100
    src = run / "global-shufflenet_v2_x1_0"
    with np.load(src / "test.npz") as z:  # hard-linked before, replaced (not rewritten) in the copy
        assert float(z["soft_refit"].max()) == 0.25
    assert json.loads((src / "metrics.json").read_text())["test_refit"]["macro_f1"] == 0.1
    assert (src / "confusion_test.png").read_bytes() == b"old" and (src / "refit" / "best").is_dir()
    with np.load(src / "external.npz") as z:
        assert float(z["soft_refit"].max()) == 0.25


def test_refuses_a_run_without_refit_and_a_foreign_out(tmp_path: Path, capsys) -> None:
    mod = _module()
    run = _fake_run(tmp_path)
    (run / "global-shufflenet_v2_x1_0" / "metrics.json").write_text("{}")
    assert mod.main([str(run), "--repeat", "1", "--out", str(tmp_path / "o")]) == 2
    assert "no finished refit model" in capsys.readouterr().err
    assert mod.main([str(run), "--repeat", "0", "--out", str(tmp_path / "o")]) == 2
    run2 = _fake_run(tmp_path / "b")
    (tmp_path / "taken").mkdir()
    assert mod.main([str(run2), "--repeat", "1", "--out", str(tmp_path / "taken")]) == 2
    assert "is not this repeat" in capsys.readouterr().err
