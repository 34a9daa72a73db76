from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pytest

from patchflannel.errors import PatchflannelError
from patchflannel.store import Store, StoreError, StoreWriter


def test_roundtrip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 255, (64, 64), dtype=np.uint8) for _ in range(3)]
    masks = [rng.random((64, 64)) > 0.5 for _ in range(3)]
    with StoreWriter(tmp_path / "s.h5", size=64, provenance={"source": "test"}) as w:
        for i, (im, m) in enumerate(zip(imgs, masks)):
            w.add(f"id{i}", im, m, {"label": "covid", "orig_height": 100 + i})
    with Store(tmp_path / "s.h5") as s:
        assert s.ids == ["id0", "id1", "id2"] and len(s) == 3
        assert s.meta[2] == {"label": "covid", "orig_height": 102}
        assert s.provenance == {"source": "test"}
        np.testing.assert_array_equal(s.image(1), imgs[1])
        np.testing.assert_array_equal(s.mask(2), masks[2])
        assert s.h5["images"].chunks == (1, 64, 64)
    assert [p.name for p in tmp_path.iterdir()] == ["s.h5"]


def test_crash_leaves_no_file(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        with StoreWriter(tmp_path / "s.h5", size=32) as w:
            w.add("a", np.zeros((32, 32), np.uint8), np.zeros((32, 32), bool))
            raise RuntimeError("crash mid-way")
    assert list(tmp_path.iterdir()) == []


def test_incomplete_file_is_clear_error(tmp_path: Path) -> None:
    with h5py.File(tmp_path / "half.h5", "w") as f:
        f.attrs["complete"] = False
        f.create_dataset("images", (2, 32, 32), dtype="u1")
    with pytest.raises(StoreError, match="incomplete"):
        Store(tmp_path / "half.h5")
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(StoreError, match="not a readable HDF5"):
        Store(tmp_path / "junk.h5")
    with pytest.raises(StoreError, match="not found"):
        Store(tmp_path / "none.h5")


def test_wrong_shape_rejected(tmp_path: Path) -> None:
    with StoreWriter(tmp_path / "s.h5", size=32, with_masks=False) as w:
        with pytest.raises(ValueError, match="32×32"):
            w.add("a", np.zeros((16, 16), np.uint8))
        w.add("b", np.ones((32, 32), np.float32))
    with Store(tmp_path / "s.h5") as s:
        assert s.image(0).max() == 255 and not s.has_masks


def test_documents_meta_and_permissions(tmp_path: Path) -> None:
    old_mask = os.umask(0o022)
    try:
        with StoreWriter(tmp_path / "s.h5", size=32, with_masks=False) as w:
            w.documents["split"] = {"train": ["a"], "test": ["b"], "big": list(range(20000))}  # > 64 KB attribute limit
            w.add("a", np.zeros((32, 32), np.uint8), meta={"path": Path("x/a.png")})
            w.add("b", np.full((32, 32), 0.5, np.float32))  # float [0,1] → uint8
            assert len(w) == 2
    finally:
        os.umask(old_mask)
    assert (tmp_path / "s.h5").stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
    with Store(tmp_path / "s.h5") as s:
        assert s.documents["split"]["test"] == ["b"] and len(s.documents["split"]["big"]) == 20000
        assert s.meta == [{"path": "x/a.png"}, {}]  # non-JSON values stored as strings
        assert s.index == {"a": 0, "b": 1}
        assert s.image(1).dtype == np.uint8 and int(s.image(1)[0, 0]) == 128
        with pytest.raises(StoreError, match="no masks"):
            s.mask(0)


def test_crash_keeps_previous_store(tmp_path: Path) -> None:
    path = tmp_path / "s.h5"
    with StoreWriter(path, size=32, with_masks=False) as w:
        w.add("old", np.zeros((32, 32), np.uint8))
    with pytest.raises(ValueError, match="mask is required"):
        with StoreWriter(path, size=32) as w:
            w.add("new", np.zeros((32, 32), np.uint8))  # a masked store needs a mask
    with Store(path) as s:
        assert s.ids == ["old"]
    assert [p.name for p in tmp_path.iterdir()] == ["s.h5"]


def test_store_error_is_user_error(tmp_path: Path) -> None:
    with pytest.raises(PatchflannelError) as err:
        Store(tmp_path / "none.h5")
    assert isinstance(err.value, ValueError) and str(tmp_path / "none.h5") in str(err.value)


def test_real_jsrt_image_roundtrip(tmp_path: Path, jsrt_dir: Path) -> None:
    from patchflannel.io import read_image, resize, to_uint8

    files = sorted((jsrt_dir / "images").glob("*.png"))[:1]
    if not files:
        pytest.skip(f"no PNG in {jsrt_dir / 'images'}")
    img = to_uint8(resize(read_image(files[0]), 256))
    with StoreWriter(tmp_path / "s.h5", size=256, with_masks=False, provenance={"source": str(files[0])}) as w:
        w.add(files[0].stem, img, meta={"orig_height": 2048})
    with Store(tmp_path / "s.h5") as s:
        np.testing.assert_array_equal(s.image(0), img)
        assert s.ids == [files[0].stem] and s.provenance["source"] == str(files[0])
