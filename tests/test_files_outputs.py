"""Tests for patchflannel._files (atomic writes, JSON/CSV/NPZ, safe names) and patchflannel.outputs (OutputDir)."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from patchflannel._files import (atomic_path, check_name, file_sha256, write_bytes, write_csv, write_json, write_npz,
                                 write_text)
from patchflannel.errors import OutputError, PatchflannelError
from patchflannel.outputs import LOCK, MANIFEST, OutputDir, unique_names


def names_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --------------------------------------------------------------------------- atomic_path


def test_atomic_path_replaces_target_with_normal_permissions(tmp_path: Path) -> None:
    target = tmp_path / "new" / "sub" / "f.txt"  # parents are created
    old_mask = os.umask(0o022)
    try:
        with atomic_path(target) as tmp:
            assert tmp.parent == target.parent and tmp.name.startswith(".f.txt.") and tmp.name.endswith(".tmp")
            assert not target.exists()  # nothing visible until the block succeeds
            tmp.write_text("one")
        assert target.read_text() == "one"
        assert (target.stat().st_mode & 0o777) == 0o644  # 0666 & ~umask, not mkstemp's 0600
        write_text(target, "two")
        assert target.read_text() == "two"
    finally:
        os.umask(old_mask)
    assert names_in(target.parent) == ["f.txt"]


def test_atomic_path_failure_keeps_old_file_and_no_temp(tmp_path: Path) -> None:
    target = write_bytes(tmp_path / "f.bin", b"old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half of the new")
            raise RuntimeError("boom")
    assert target.read_bytes() == b"old"
    assert names_in(tmp_path) == ["f.bin"]


def test_atomic_path_oserror_becomes_output_error(tmp_path: Path) -> None:
    target = tmp_path / "f.bin"
    with pytest.raises(OutputError, match="cannot write") as err:
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"x")
            raise OSError(28, "No space left on device")
    assert str(target) in str(err.value) and "No space left" in str(err.value)
    assert isinstance(err.value, PatchflannelError) and isinstance(err.value, OSError)
    assert names_in(tmp_path) == []


def test_atomic_path_folder_or_file_in_the_way(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    with pytest.raises(OutputError, match="is a folder"):
        write_bytes(tmp_path / "dir", b"x")
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="cannot create the output folder") as err:
        write_bytes(tmp_path / "file" / "below.txt", b"x")
    assert str(tmp_path / "file") in str(err.value)
    assert (tmp_path / "file").read_text() == "x"


# --------------------------------------------------------------------------- write_json / write_csv / write_npz


def test_write_json_strict_and_converted(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    out = tmp_path / "a.json"
    write_json(out, {"nan": math.nan, "inf": -math.inf, "f32": np.float32(0.25), "i64": np.int64(3),
                     "b": np.bool_(True), "arr": np.arange(3), "path": Path("x/y.png"), "t": torch.tensor([1.5, 2.0]),
                     "tuple": (1, np.float64(math.nan)), 7: "int key"})
    text = out.read_text()
    assert text.endswith("\n") and "NaN" not in text and "Infinity" not in text
    loaded = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert loaded == {"nan": None, "inf": None, "f32": 0.25, "i64": 3, "b": True, "arr": [0, 1, 2], "path": "x/y.png",
                      "t": [1.5, 2.0], "tuple": [1, None], "7": "int key"}
    assert loaded["b"] is True


def test_write_json_unserialisable_leaves_old_file(tmp_path: Path) -> None:
    out = write_json(tmp_path / "a.json", {"v": 1})
    with pytest.raises(TypeError):
        write_json(out, {"v": object()})
    assert json.loads(out.read_text()) == {"v": 1}
    assert names_in(tmp_path) == ["a.json"]


def test_write_csv_quotes_and_columns(tmp_path: Path) -> None:
    out = tmp_path / "r.csv"
    rows = [{"file": "a, b.png", "note": 'say "hi"\nthen go'}, {"score": math.nan, "file": "c.png", "note": None}]
    write_csv(out, rows)
    with open(out, newline="") as fh:
        assert fh.readline().strip() == "file,note,score"  # union of keys, first-seen order
    with open(out, newline="") as fh:
        got = list(csv.DictReader(fh))
    assert got == [{"file": "a, b.png", "note": 'say "hi"\nthen go', "score": ""},  # missing → empty
                   {"file": "c.png", "note": "", "score": "nan"}]  # None → empty; NaN stays visible as nan
    write_csv(out, rows, columns=["score", "file"])  # explicit columns: order kept, others dropped
    with open(out, newline="") as fh:
        got = list(csv.DictReader(fh))
    assert got == [{"score": "", "file": "a, b.png"}, {"score": "nan", "file": "c.png"}]


def test_write_npz_loads_without_pickle(tmp_path: Path) -> None:
    out = write_npz(tmp_path / "a.npz", ids=["x", "y"], soft=np.eye(2, dtype=np.float32), k=3)
    with np.load(out, allow_pickle=False) as z:
        assert sorted(z.files) == ["ids", "k", "soft"]
        assert z["ids"].tolist() == ["x", "y"]
        np.testing.assert_array_equal(z["soft"], np.eye(2))
        assert z["soft"].dtype == np.float32 and int(z["k"]) == 3
    assert names_in(tmp_path) == ["a.npz"]


def test_file_sha256(tmp_path: Path) -> None:
    data = os.urandom(3000)
    p = write_bytes(tmp_path / "x", data)
    assert file_sha256(p, chunk=1024) == hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- check_name


@pytest.mark.parametrize("name", ["resnet18", "m0", "densenet-161", "a.b+c_d", "X" * 128])
def test_check_name_accepts(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["", ".", "..", "../x", "/abs", "a/b", "a\\b", ".hidden", "-flag", "a b", "x" * 129,
                                  "abc\n", "ok\x00", "é", 5, None])
def test_check_name_refuses(name: object) -> None:
    with pytest.raises(ValueError, match="learner name .* is not a safe file name"):
        check_name(name, "learner name")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- unique_names


def test_unique_names_collisions_never_hit_another_input() -> None:
    files = [Path("a/x.jpg"), Path("b/x.jpg"), Path("a/x_1.png"), Path("c/y.png")]
    names = unique_names(files)
    assert names == {Path("a/x.jpg"): "a_x", Path("b/x.jpg"): "b_x", Path("a/x_1.png"): "x_1", Path("c/y.png"): "y"}


def test_unique_names_parent_prefix_taken_by_another_stem() -> None:
    files = [Path("a/x.jpg"), Path("b/x.jpg"), Path("c/a_x.png"), Path("a/x.png")]
    names = unique_names(files)
    assert len(set(names.values())) == len(files)
    assert names[Path("c/a_x.png")] == "a_x"  # the unique stem keeps its own name
    assert names[Path("a/x.jpg")] == "a_x-2" and names[Path("b/x.jpg")] == "b_x"
    assert names[Path("a/x.png")] == "a_x-3"


def test_unique_names_same_folder_and_no_folder() -> None:
    files = [Path("x.jpg"), Path("x.png"), Path("d/x.dcm")]
    names = unique_names(files)
    assert names == {Path("x.jpg"): "x", Path("x.png"): "x-2", Path("d/x.dcm"): "d_x"}


# --------------------------------------------------------------------------- OutputDir


def manifest(folder: Path) -> dict:
    return json.loads((folder / MANIFEST).read_text())


def test_output_dir_lock_manifest_and_rows(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cols = ["file", "status", "error"]
    with OutputDir(out, "segment") as od:
        assert (out / LOCK).read_text() == str(os.getpid())
        m = manifest(out)
        assert m["command"] == "segment" and m["status"] == "running" and m["files"] == []
        assert not [p for p in out.iterdir() if p.name.startswith(".probe")]  # probe removed
        od.inputs = ["in/a.png", "in/b, c.png"]
        od.file("masks", "a.png").parent.mkdir()
        od.append_row("masks.csv", {"file": "in/a.png", "status": "ok", "extra": "ignored"}, cols)
        # flushed at once: a crash now would keep this row
        with open(out / "masks.csv", newline="") as fh:
            assert list(csv.DictReader(fh)) == [{"file": "in/a.png", "status": "ok", "error": ""}]
        od.append_row("masks.csv", {"file": "in/b, c.png", "status": "error", "error": 'bad "x"\nline'}, cols)
    assert not (out / LOCK).exists()
    m = manifest(out)
    assert m["status"] == "finished" and m["inputs"] == ["in/a.png", "in/b, c.png"]
    assert m["files"] == ["masks.csv", "masks/a.png"]
    with open(out / "masks.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows[1] == {"file": "in/b, c.png", "status": "error", "error": 'bad "x"\nline'}


def test_output_dir_crash_keeps_rows_and_says_failed(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        with OutputDir(out, "predict") as od:
            od.append_row("predictions.csv", {"file": "a.png", "status": "ok"}, ["file", "status"])
            raise KeyboardInterrupt
    assert manifest(out)["status"] == "failed"
    assert not (out / LOCK).exists()
    assert (out / "predictions.csv").read_text().splitlines() == ["file,status", "a.png,ok"]


def test_output_dir_refuses_earlier_run_unless_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "out"
    outside = tmp_path / "outside.txt"
    outside.write_text("keep me")
    with OutputDir(out, "segment") as od:
        od.file("masks", "old.png").parent.mkdir()
        (out / "masks" / "old.png").write_bytes(b"old")
        od.append_row("masks.csv", {"file": "old"}, ["file"])
    (out / "notes.txt").write_text("the user's own file")
    # a crafted manifest must not make --overwrite delete outside the folder
    m = manifest(out)
    m["files"] += ["../outside.txt", str(outside)]
    (out / MANIFEST).write_text(json.dumps(m))

    with pytest.raises(OutputError, match="earlier run.*--overwrite") as err:
        OutputDir(out, "segment").open()
    assert str(out) in str(err.value)
    assert not (out / LOCK).exists()  # refusal releases the lock
    assert (out / "masks" / "old.png").exists() and manifest(out)["status"] == "finished"

    with OutputDir(out, "segment", overwrite=True) as od:
        assert not (out / "masks" / "old.png").exists() and not (out / "masks.csv").exists()
        assert manifest(out)["files"] == [] and manifest(out)["status"] == "running"
        od.file("new.png").write_bytes(b"new")
    assert manifest(out)["files"] == ["new.png"]
    assert (out / "notes.txt").read_text() == "the user's own file"  # not listed → not ours to delete
    assert outside.read_text() == "keep me"


def test_output_dir_refuses_a_live_lock_and_takes_a_stale_one(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK).write_text(str(os.getppid()))  # a live process that is not us
    with pytest.raises(OutputError, match=f"PID {os.getppid()}"):
        OutputDir(out, "segment").open()
    assert (out / LOCK).read_text() == str(os.getppid())  # someone else's lock is left alone
    assert not (out / MANIFEST).exists()

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    (out / LOCK).write_text(dead.stdout.strip())
    with OutputDir(out, "segment"):
        assert (out / LOCK).read_text() == str(os.getpid())
    assert not (out / LOCK).exists()


def test_output_dir_probe_refuses_unwritable_targets(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        OutputDir(tmp_path / "file", "segment").open()
    with pytest.raises(OutputError, match="cannot write there") as err:
        OutputDir(tmp_path / "file" / "below", "segment").open()
    assert str(tmp_path / "file" / "below") in str(err.value)
    if os.geteuid() != 0:  # root writes into read-only folders anyway
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            with pytest.raises(OutputError, match="cannot write there"):
                OutputDir(ro, "segment").open()
        finally:
            ro.chmod(0o700)
