from __future__ import annotations

import logging
import os
import struct
import threading
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from patchflannel.errors import PatchflannelError
from patchflannel.io import (JSRT_RAW_SHAPE, ImageReadError, as_images, list_images, read_image, read_images, read_mask,
                             resize, sniff_format, to_gray_unit, to_uint8, write_png)


def gradient(h: int = 96, w: int = 128) -> np.ndarray:
    """A radiograph-like gradient in [0,1] with a dark 'lung' blob."""
    y, x = np.mgrid[0:h, 0:w]
    img = (x / (w - 1) * 0.8 + 0.1).astype(np.float32)
    img[(y - h / 2) ** 2 / (h / 4) ** 2 + (x - w / 3) ** 2 / (w / 6) ** 2 < 1] = 0.05
    return img


def test_png_8bit_gray_roundtrip(tmp_path: Path) -> None:
    g = gradient()
    u8 = np.rint(g * 255).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "a.png"), u8)
    out = read_image(tmp_path / "a.png")
    assert out.dtype == np.float32 and out.shape == g.shape
    np.testing.assert_allclose(out, u8 / 255.0, atol=1e-6)


def test_png_16bit(tmp_path: Path) -> None:
    g = gradient()
    u16 = np.rint(g * 65535).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "a.png"), u16)
    out = read_image(tmp_path / "a.png")
    np.testing.assert_allclose(out, u16 / 65535.0, atol=1e-6)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "LA"])
def test_png_colour_modes_become_gray(tmp_path: Path, mode: str) -> None:
    g = np.rint(gradient() * 255).astype(np.uint8)
    Image.fromarray(g, "L").convert(mode).save(tmp_path / "a.png")
    out = read_image(tmp_path / "a.png")
    assert out.ndim == 2 and out.shape == g.shape
    np.testing.assert_allclose(out, g / 255.0, atol=2 / 255)


def test_jpeg_and_content_not_extension(tmp_path: Path) -> None:
    g = np.rint(gradient() * 255).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "x.png"), g)
    (tmp_path / "really_png.jpg").write_bytes((tmp_path / "x.png").read_bytes())
    np.testing.assert_array_equal(read_image(tmp_path / "really_png.jpg"), read_image(tmp_path / "x.png"))
    cv2.imwrite(str(tmp_path / "b.jpg"), g, [cv2.IMWRITE_JPEG_QUALITY, 98])
    (tmp_path / "noext").write_bytes((tmp_path / "b.jpg").read_bytes())
    out = read_image(tmp_path / "noext")
    assert np.abs(out - g / 255.0).mean() < 0.02
    assert sniff_format((tmp_path / "noext").read_bytes()[:132], 10) == "jpeg"


def test_gif_mask(tmp_path: Path) -> None:
    m = np.zeros((80, 80), np.uint8)
    m[20:60, 10:30] = 255
    Image.fromarray(m, "L").convert("P").save(tmp_path / "m.gif")
    got = read_mask(tmp_path / "m.gif")
    assert got.dtype == bool
    np.testing.assert_array_equal(got, m > 0)


def _dicom(path: Path, pixels: np.ndarray, photometric: str, bits_stored: int) -> None:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits_stored, bits_stored - 1, 0
    ds.PixelData = pixels.astype("<u2").tobytes()
    ds.save_as(str(path), enforce_file_format=True)


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_dicom_bits_stored_and_polarity(tmp_path: Path, photometric: str) -> None:
    g = gradient()
    v12 = np.rint(g * 4095).astype(np.uint16)
    # Garbage in the bits above BitsStored must be ignored.
    _dicom(tmp_path / "x.dcm", v12 | (1 << 14), photometric, 12)
    out = read_image(tmp_path / "x.dcm")
    expect = v12 / 4095.0
    if photometric == "MONOCHROME1":
        expect = 1.0 - expect
    np.testing.assert_allclose(out, expect, atol=1e-5)


def test_jsrt_raw_inverted_to_normal_polarity(tmp_path: Path) -> None:
    raw = np.zeros(JSRT_RAW_SHAPE, dtype=">u2")
    raw[:, :1024] = 4000  # high raw value = dense film = dark on a normal radiograph
    raw[:, 1024:] = 500
    (tmp_path / "JPCLN001.IMG").write_bytes(raw.tobytes())
    out = read_image(tmp_path / "JPCLN001.IMG")
    assert out.shape == JSRT_RAW_SHAPE and out.dtype == np.float32
    assert out[0, 0] == pytest.approx(1 - 4000 / 4095) and out[0, -1] == pytest.approx(1 - 500 / 4095)


def test_jsrt_raw_over_12_bits_rejected(tmp_path: Path) -> None:
    raw = np.full(JSRT_RAW_SHAPE, 60000, dtype=">u2")
    (tmp_path / "bad.IMG").write_bytes(raw.tobytes())
    with pytest.raises(ImageReadError, match="12 bits"):
        read_image(tmp_path / "bad.IMG")


def _png_bytes(img: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", img)
    assert ok
    return buf.tobytes()


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.png", b"", "empty"),
        ("text.png", b"hello, I am not an image\n" * 10, "not a recognised image"),
        ("trunc.png", "TRUNC_PNG", "truncated"),
        ("trunc.jpg", "TRUNC_JPG", "truncated"),
        ("small.png", "SMALL", "too small"),
        ("flat.png", "FLAT", "single value"),
    ],
)
def test_bad_inputs_name_file_and_problem(tmp_path: Path, name: str, content: bytes | str, message: str) -> None:
    g = np.rint(gradient() * 255).astype(np.uint8)
    if content == "TRUNC_PNG":
        content = _png_bytes(g)[:-40]
    elif content == "TRUNC_JPG":
        content = cv2.imencode(".jpg", g)[1].tobytes()[:-300]
    elif content == "SMALL":
        content = _png_bytes(g[:20, :20])
    elif content == "FLAT":
        content = _png_bytes(np.full((100, 100), 7, np.uint8))
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ImageReadError, match=message) as err:
        read_image(path)
    assert str(path) in str(err.value)


def test_missing_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match="not found"):
        read_image(tmp_path / "nope.png")
    with pytest.raises(ImageReadError, match="directory"):
        read_image(tmp_path)


def test_resize_and_list_images(tmp_path: Path) -> None:
    g = gradient()
    assert resize(g, 64).shape == (64, 64)
    assert resize(g > 0.5, (30, 40)).dtype == bool
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.png").write_bytes(_png_bytes(np.rint(g * 255).astype(np.uint8)))
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / ".hidden.png").write_bytes(b"x")
    files = list_images([tmp_path, tmp_path / "missing.png"])
    assert files == [tmp_path / "sub" / "a.png", tmp_path / "missing.png"]


# --------------------------------------------------------------------------- hostile files


def _noisy_u8(h: int = 96, w: int = 128) -> np.ndarray:
    rng = np.random.default_rng(0)
    g = np.rint(gradient(h, w) * 255).astype(int) + rng.integers(-20, 20, (h, w))
    return np.clip(g, 0, 255).astype(np.uint8)


def test_jpeg_cut_then_end_marker_is_grey_band_refused(tmp_path: Path) -> None:
    """A cut JPEG with an EOI marker re-appended passes the marker check; libjpeg then
    fills the missing rows with flat grey 128, which must be refused, not analysed."""
    full = cv2.imencode(".jpg", _noisy_u8(), [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
    path = tmp_path / "band.jpg"
    path.write_bytes(full[: len(full) // 2] + b"\xff\xd9")
    with pytest.raises(ImageReadError, match="grey fill") as err:
        read_image(path)
    assert err.value.path == path and str(path) in str(err.value)
    # the intact file reads fine: the check does not fire on real content
    (tmp_path / "ok.jpg").write_bytes(full)
    assert read_image(tmp_path / "ok.jpg").shape == (96, 128)


def test_truncated_jpeg_without_end_marker(tmp_path: Path) -> None:
    full = cv2.imencode(".jpg", _noisy_u8())[1].tobytes()
    path = tmp_path / "cut.jpg"
    path.write_bytes(full[: len(full) // 2])
    with pytest.raises(ImageReadError, match="JPEG file is truncated") as err:
        read_image(path)
    assert err.value.path == path


@pytest.mark.parametrize("bits", [10, 12, 14])
def test_16bit_png_using_fewer_bits_is_rescaled_with_warning(tmp_path: Path, bits: int,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    top = (1 << bits) - 1
    v = np.rint(gradient() * top).astype(np.uint16)
    v[0, 0] = top
    cv2.imwrite(str(tmp_path / "d.png"), v)
    with caplog.at_level(logging.WARNING, logger="patchflannel.io"):
        out = read_image(tmp_path / "d.png")
    np.testing.assert_allclose(out, v / top, atol=1e-6)
    assert out.max() == pytest.approx(1.0)
    assert any(f"fit in {bits} bits" in r.getMessage() and "d.png" in r.getMessage() for r in caplog.records)


def test_full_range_16bit_png_not_rescaled(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    v = np.rint(gradient() * 40000).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "d.png"), v)
    with caplog.at_level(logging.WARNING, logger="patchflannel.io"):
        out = read_image(tmp_path / "d.png")
    np.testing.assert_allclose(out, v / 65535.0, atol=1e-6)
    assert not [r for r in caplog.records if "bits" in r.getMessage()]


def test_rgb_file_uses_luminance_in_file_channel_order(tmp_path: Path) -> None:
    rgb = np.zeros((80, 80, 3), np.uint8)
    rgb[:, :40, 0] = 255  # red left
    rgb[:, 40:, 2] = 255  # blue right
    Image.fromarray(rgb, "RGB").save(tmp_path / "c.png")
    out = read_image(tmp_path / "c.png")
    assert out[0, 0] == pytest.approx(0.299, abs=2 / 255)  # red weighs 0.299 …
    assert out[0, -1] == pytest.approx(0.114, abs=2 / 255)  # … blue 0.114 (BGR decode not mistaken for RGB)


def test_oversized_header_refused_before_decoding(tmp_path: Path) -> None:
    png = _png_bytes(_noisy_u8())
    ihdr = struct.pack(">II", 20000, 20000) + png[24:29]  # keep bit depth, colour type, …
    chunk = struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    path = tmp_path / "huge.png"
    path.write_bytes(png[:8] + chunk + png[33:])
    with pytest.raises(ImageReadError, match="too large") as err:
        read_image(path)
    assert "20000×20000" in str(err.value) and str(path) in str(err.value)


def test_corrupt_header_refused(tmp_path: Path) -> None:
    png = _png_bytes(_noisy_u8())
    path = tmp_path / "bad.png"
    path.write_bytes(png[:12] + b"XXXX" + png[16:])  # IHDR chunk type destroyed
    with pytest.raises(ImageReadError, match="PNG") as err:
        read_image(path)
    assert err.value.path == path


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_fifo_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    result: list[BaseException | object] = []

    def run() -> None:
        try:
            result.append(read_image(fifo))
        except BaseException as exc:  # noqa: BLE001
            result.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(10)
    assert result, "read_image blocked on a FIFO"
    assert isinstance(result[0], ImageReadError) and "not a regular file" in str(result[0])
    assert str(fifo) in str(result[0])


def test_device_refused(tmp_path: Path) -> None:
    if not Path("/dev/null").exists():
        pytest.skip("no /dev/null")
    with pytest.raises(ImageReadError, match="not a regular file") as err:
        read_image("/dev/null")
    assert err.value.path == Path("/dev/null")
    with pytest.raises(ImageReadError, match="not a regular file"):
        read_mask("/dev/null")


def test_directory_refused_by_image_and_mask_readers(tmp_path: Path) -> None:
    d = tmp_path / "folder.png"
    d.mkdir()
    for reader in (read_image, read_mask):
        with pytest.raises(ImageReadError, match="is a directory") as err:
            reader(d)
        assert err.value.path == d and str(d) in str(err.value)


def test_image_read_error_is_a_patchflannel_error(tmp_path: Path) -> None:
    with pytest.raises(PatchflannelError) as err:
        read_image(tmp_path / "nope.png")
    assert isinstance(err.value, ValueError)
    assert err.value.problem == "file not found"


# --------------------------------------------------------------------------- as_images / to_gray_unit


def test_as_images_path_and_list_of_paths(tmp_path: Path) -> None:
    u8 = np.rint(gradient() * 255).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "a.png"), u8)
    cv2.imwrite(str(tmp_path / "b.png"), u8[::-1])
    for single in (tmp_path / "a.png", str(tmp_path / "a.png")):
        got = as_images(single)
        assert len(got) == 1
        np.testing.assert_allclose(got[0], u8 / 255.0, atol=1e-6)
    got = as_images([tmp_path / "a.png", str(tmp_path / "b.png"), u8])
    assert len(got) == 3
    np.testing.assert_allclose(got[1], u8[::-1] / 255.0, atol=1e-6)
    np.testing.assert_allclose(got[2], got[0])
    with pytest.raises(ImageReadError, match="not found") as err:
        as_images([tmp_path / "a.png", tmp_path / "gone.png"])
    assert err.value.path == tmp_path / "gone.png"


def test_as_images_2d_uint8_uint16_float() -> None:
    g = gradient()
    u8 = np.rint(g * 255).astype(np.uint8)
    u16 = np.rint(g * 65535).astype(np.uint16)
    (a,) = as_images(u8)
    (b,) = as_images(u16)
    (c,) = as_images(g.astype(np.float64))
    assert a.dtype == b.dtype == c.dtype == np.float32 and a.shape == g.shape
    np.testing.assert_allclose(a, u8 / 255.0, atol=1e-6)  # uint8 / 255, not left as 0..255
    np.testing.assert_allclose(b, u16 / 65535.0, atol=1e-6)
    np.testing.assert_allclose(c, g, atol=1e-6)  # float taken as is


def test_as_images_batches_and_colour() -> None:
    g = gradient()
    batch = np.stack([g, g[::-1], 1 - g])
    got = as_images(batch)
    assert len(got) == 3
    np.testing.assert_allclose(got[2], 1 - g, atol=1e-6)
    got4 = as_images(batch[:, None])  # (B,1,H,W)
    assert len(got4) == 3
    np.testing.assert_allclose(got4[1], g[::-1], atol=1e-6)

    rgb = np.zeros((80, 90, 3), np.uint8)
    rgb[:, :45, 0] = 255  # pure red left
    rgb[:, 45:, 2] = 255  # pure blue right
    (col,) = as_images(rgb)  # one (H,W,3) image, not a batch of 80
    assert col.shape == (80, 90)
    assert col[5, 5] == pytest.approx(0.299, abs=1 / 255)  # user arrays are RGB, not BGR
    assert col[5, -5] == pytest.approx(0.114, abs=1 / 255)
    rgba = np.concatenate([np.repeat(np.rint(g * 255).astype(np.uint8)[..., None], 3, 2),
                           np.zeros(g.shape + (1,), np.uint8)], axis=2)
    (gray,) = as_images(rgba)  # alpha (all 0 here) is ignored
    np.testing.assert_allclose(gray, np.rint(g * 255) / 255.0, atol=1 / 255)
    got = as_images(np.stack([rgba, rgba]))  # (B,H,W,4)
    assert len(got) == 2 and got[1].shape == g.shape


def test_as_images_torch_tensor() -> None:
    torch = pytest.importorskip("torch")
    g = gradient()
    t = torch.tensor(g, requires_grad=True)
    (a,) = as_images(t)
    np.testing.assert_allclose(a, g, atol=1e-6)
    got = as_images(torch.stack([t, t.flip(0)])[:, None])  # (B,1,H,W) tensor
    assert len(got) == 2
    np.testing.assert_allclose(got[1], g[::-1], atol=1e-6)
    with pytest.raises(ImageReadError, match="outside"):
        as_images(torch.tensor(g) * 255)  # 0..255 floats are not silently clipped


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (gradient() > 0.5, "mask"),
        (gradient() * 255, "outside \\[0, 1\\]"),
        (gradient() - 0.5, "outside"),
        (gradient().astype(np.int64), "unsupported pixel type"),
        (np.stack([gradient()] * 3), None),  # a batch, accepted (control)
        (np.zeros((2, 3, 96, 128), np.float32), "unsupported array shape"),  # channels-first RGB
        (np.zeros((1, 1, 1, 96, 128), np.float32), "unsupported array shape"),
        (np.full((96, 128), 0.3, np.float32), "single value"),
        (gradient()[:20, :20], "too small"),
        (np.zeros((96, 128, 2), np.uint8), None),  # (H,W,2) → a batch of 96 rows of 128×2: too small
    ],
)
def test_as_images_refusals(value: np.ndarray, message: str | None) -> None:
    if message is None:
        if value.ndim == 3 and value.shape[2] == 2:
            with pytest.raises(ImageReadError):
                as_images(value)
        else:
            assert len(as_images(value)) == len(value)
        return
    with pytest.raises(ImageReadError, match=message):
        as_images(value)


def test_nan_refused_and_batch_element_named() -> None:
    g = gradient()
    bad = g.copy()
    bad[3, 4] = np.nan
    with pytest.raises(ImageReadError, match="1 NaN or infinite"):
        as_images(bad)
    bad[5, 5] = np.inf
    with pytest.raises(ImageReadError, match="2 NaN or infinite"):
        to_gray_unit(bad)
    with pytest.raises(ImageReadError) as err:
        as_images(np.stack([g, bad]))
    assert str(err.value.path) == "<array[1]>"


def test_as_images_refuses_other_types() -> None:
    with pytest.raises(ImageReadError, match="nested lists"):
        as_images([[gradient()]])
    with pytest.raises(ImageReadError, match="cannot use a dict"):
        as_images({"img": gradient()})
    with pytest.raises(ImageReadError, match="cannot use a NoneType"):
        as_images(None)
    assert as_images([]) == []


def test_to_uint8_and_write_png_roundtrip(tmp_path: Path) -> None:
    g = gradient()
    u8 = to_uint8(g)
    assert u8.dtype == np.uint8 and u8.max() == round(0.9 * 255)
    np.testing.assert_array_equal(to_uint8(g > 0.5), np.where(g > 0.5, 255, 0))
    write_png(tmp_path / "out" / "x.png", u8)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["x.png"]  # atomic: no temp file left
    np.testing.assert_allclose(read_image(tmp_path / "out" / "x.png"), u8 / 255.0, atol=1e-6)


def test_real_jsrt_png(jsrt_dir: Path) -> None:
    files = sorted((jsrt_dir / "images").glob("*.png"))
    if not files:
        pytest.skip(f"no PNG in {jsrt_dir / 'images'}")
    img = read_image(files[0])
    assert img.dtype == np.float32 and img.ndim == 2 and min(img.shape) >= 256
    assert 0.0 <= img.min() < img.max() <= 1.0
    assert list_images([files[0], files[0]]) == [files[0]]  # named twice → once


def test_real_cxr_jpeg(cxr_dir: Path) -> None:
    files = sorted((cxr_dir / "images").glob("*.jpg"))[:2]
    if not files:
        pytest.skip(f"no JPEG in {cxr_dir / 'images'}")
    for img in as_images(files):
        assert img.dtype == np.float32 and img.ndim == 2 and 0.0 <= img.min() < img.max() <= 1.0


def test_read_images_keeps_the_order_and_puts_each_error_in_its_place(tmp_path: Path) -> None:
    """The threaded reader `segment`/`predict` use: same images as read_image, input order, errors in place."""
    paths = []
    for i in range(5):
        img = (gradient() * (0.5 + 0.1 * i) * 255).astype(np.uint8)
        paths.append(tmp_path / f"g{i}.png")
        cv2.imwrite(str(paths[i]), img)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    paths.insert(2, tmp_path / "bad.png")
    paths.append(tmp_path / "missing.png")
    for threads in (1, 3):
        got = read_images(paths, threads=threads)
        assert len(got) == len(paths)
        for p, g in zip(paths, got):
            if p.name in ("bad.png", "missing.png"):
                assert isinstance(g, ImageReadError) and p.name in str(g)
            else:
                assert np.array_equal(g, read_image(p))
    assert read_images([]) == []
