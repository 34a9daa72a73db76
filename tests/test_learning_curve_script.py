"""scripts/learning_curve.py reads a recipe screen's rows as they are and summarises draws per share."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from conftest import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "learning_curve.py"


def _module():
    return load_script(SCRIPT)


def _screen(path: Path) -> Path:
    rows = [("0", "all", 0.70, 0.74), ("0", "third", 0.50, 0.55), ("0", "third-b", 0.56, 0.61),
            ("0+1+2", "all", 0.64, 0.63), ("0+1+2", "third", 0.54, 0.55), ("0+1+2", "third-b", 0.58, 0.61)]
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, ["fold", "recipe", "macro_f1", "ci_low", "ci_high", "adult_covid_auc", "adult_auc_ci",
                               "adult_non_covid_called_covid", "n_train"])
        w.writeheader()
        for fold, recipe, f1, auc in rows:
            w.writerow({"fold": fold, "recipe": recipe, "macro_f1": f1, "ci_low": f1 - 0.04, "ci_high": f1 + 0.04,
                        "adult_covid_auc": auc, "adult_auc_ci": f"[{auc - 0.08:.3f}, {auc + 0.08:.3f}]",
                        "adult_non_covid_called_covid": "10/76", "n_train": "580/581/580"})
    return path


def test_summary_reports_each_draw_and_their_spread(tmp_path: Path) -> None:
    mod = _module()
    screen = _screen(tmp_path / "screen.csv")
    assert mod.main([str(screen), "1=all", "0.3333=third", "0.3333=third-b"]) == 0
    md = (tmp_path / "learning_curve.md").read_text(encoding="utf-8")
    assert "| 0.33 | mean of 2 draws (range) | | 0.560 (0.540–0.580) | 0.580 (0.550–0.610) | |" in md
    assert "| 1.00 | all | 580/581/580 | 0.640 [0.600, 0.680] | 0.630 [0.550, 0.710] | 10/76 |" in md
    assert "per doubling of the share of patients: macro-F1 +0.050, within-adult AUC +0.032" in md  # (0.64 − 0.56) / log2(3), (0.63 − 0.58) / log2(3)
    assert (tmp_path / "learning_curve.png").stat().st_size > 0


def test_unknown_recipe_or_share_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mod = _module()
    screen = _screen(tmp_path / "screen.csv")
    assert mod.main([str(screen), "1=all", "0.5=half"]) == 2
    assert "no rows for half" in capsys.readouterr().err
    for bad in (["one=all"], ["0=all"], ["1.5=all"], ["0.5"], ["1=all", "0.5=all"]):
        with pytest.raises(SystemExit):
            mod.main([str(screen), *bad])
    old = tmp_path / "old.csv"  # a screen from before the AUC interval column
    old.write_text("fold,recipe,macro_f1\n0,all,0.5\n", encoding="utf-8")
    assert mod.main([str(old), "1=all"]) == 2
    assert "no column" in capsys.readouterr().err
