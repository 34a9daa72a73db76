from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

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
