from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from patchflannel.io import (JSRT_RAW_SHAPE, ImageReadError, atomic_write_bytes, list_images, read_image, read_mask,
                             resize, sniff_format)


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


def test_atomic_write_leaves_no_temp(tmp_path: Path) -> None:
    atomic_write_bytes(tmp_path / "d" / "f.bin", b"abc")
    assert (tmp_path / "d" / "f.bin").read_bytes() == b"abc"
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["f.bin"]
