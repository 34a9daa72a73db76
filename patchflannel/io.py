"""Read radiographs and lung masks; the one intensity contract of the toolkit.

Every reader returns ``float32`` arrays of shape ``(H, W)`` with values in
``[0, 1]`` and normal radiographic polarity (air/lungs dark, bone bright).
Masks are returned as ``bool`` arrays ``(H, W)``.

Formats are detected from the file's *content*, not its extension:

* PNG / JPEG / TIFF / BMP (8- or 16-bit; gray, RGB, RGBA, palette)
* GIF (e.g. the SCR lung masks)
* DICOM (``DICM`` preamble; ``MONOCHROME1`` inverted, ``BitsStored`` honoured)
* JSRT raw ``.IMG``: headerless 2048×2048 big-endian 16-bit, 12 bits used.
  In the raw files larger values are *darker* (film density), so they are
  inverted to normal polarity here; see :func:`read_jsrt_raw`.

Any problem with a user's file raises :class:`ImageReadError`, whose message
names the file and the problem, so batch commands can report and carry on.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import cv2
import numpy as np

log = logging.getLogger(__name__)

JSRT_RAW_SHAPE = (2048, 2048)
JSRT_RAW_BYTES = JSRT_RAW_SHAPE[0] * JSRT_RAW_SHAPE[1] * 2
JSRT_RAW_BITS = 12
MIN_SIDE = 64
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".dcm", ".dicom", ".img", ""}

# cv2 must not grab both cores per call on top of torch's own threads.
cv2.setNumThreads(1)


class ImageReadError(ValueError):
    """A file could not be read as a radiograph or mask; the message says why."""

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


def sniff_format(head: bytes, size: int) -> str:
    """Name the format of a file from its first bytes and its size.

    Returns one of ``png, jpeg, gif, tiff, bmp, dicom, jsrt_raw`` or
    ``unknown``.
    """
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "tiff"
    if head.startswith(b"BM"):
        return "bmp"
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if size == JSRT_RAW_BYTES:
        return "jsrt_raw"
    return "unknown"


def _read_bytes(path: Path) -> bytes:
    if not path.exists():
        raise ImageReadError(path, "file not found")
    if path.is_dir():
        raise ImageReadError(path, "is a directory, not an image file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageReadError(path, f"cannot be read ({exc.strerror or exc})") from exc
    if not data:
        raise ImageReadError(path, "file is empty (0 bytes)")
    return data


def _check_complete(path: Path, fmt: str, data: bytes) -> None:
    # Decoders often return a partially grey image for a cut-off file instead of
    # failing; check the end markers ourselves so truncation is never silent.
    if fmt == "png" and b"IEND" not in data[-64:]:
        raise ImageReadError(path, "PNG file is truncated (no IEND chunk at the end)")
    if fmt == "jpeg" and b"\xff\xd9" not in data[-4096:]:
        raise ImageReadError(path, "JPEG file is truncated (no end-of-image marker)")
    if fmt == "gif" and not data.rstrip(b"\x00").endswith(b";"):
        raise ImageReadError(path, "GIF file is truncated (no trailer byte)")


def _to_unit_gray(path: Path, arr: np.ndarray, max_value: float | None = None) -> np.ndarray:
    """Colour → gray, integer range → float32 [0, 1]."""
    if arr.ndim == 3:
        channels = arr.shape[2]
        if channels == 1:
            arr = arr[..., 0]
        elif channels in (3, 4):
            # Alpha carries no intensity for a radiograph; drop it. OpenCV gives BGR(A).
            arr = cv2.cvtColor(np.ascontiguousarray(arr[..., :3]), cv2.COLOR_BGR2GRAY)
        else:
            raise ImageReadError(path, f"unsupported number of channels: {channels}")
    elif arr.ndim != 2:
        raise ImageReadError(path, f"unsupported image dimensions {arr.shape}")
    if max_value is None:
        if arr.dtype == np.uint8:
            max_value = 255.0
        elif arr.dtype == np.uint16:
            max_value = 65535.0
        elif arr.dtype == bool:
            max_value = 1.0
        elif np.issubdtype(arr.dtype, np.floating):
            lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
            if not (np.isfinite(lo) and np.isfinite(hi)):
                raise ImageReadError(path, "image contains NaN or infinite values")
            if lo < 0.0 or hi > 1.0:
                raise ImageReadError(path, f"floating-point image outside [0, 1] (range {lo:g}..{hi:g})")
            max_value = 1.0
        else:
            raise ImageReadError(path, f"unsupported pixel type {arr.dtype}")
    out = arr.astype(np.float32) / np.float32(max_value)
    return np.clip(out, 0.0, 1.0, out=out)


def _decode_raster(path: Path, fmt: str, data: bytes) -> np.ndarray:
    if fmt == "gif":
        # OpenCV has no GIF decoder; Pillow does (palette → luminance).
        from PIL import Image, UnidentifiedImageError
        import io as _io

        try:
            with Image.open(_io.BytesIO(data)) as im:
                im.load()
                arr = np.asarray(im.convert("L"))
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            raise ImageReadError(path, f"corrupt GIF ({exc})") from exc
        return arr
    buf = np.frombuffer(data, dtype=np.uint8)
    arr = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    if arr is None and fmt == "png":
        # Palette / odd bit depths OpenCV refuses: fall back to Pillow.
        from PIL import Image
        import io as _io

        try:
            with Image.open(_io.BytesIO(data)) as im:
                im.load()
                arr = np.asarray(im.convert("I;16") if im.mode.startswith("I") else im.convert("L"))
        except OSError as exc:
            raise ImageReadError(path, f"corrupt {fmt.upper()} ({exc})") from exc
    if arr is None:
        raise ImageReadError(path, f"corrupt {fmt.upper()} file (decoder failed)")
    return arr


def read_jsrt_raw(path: str | os.PathLike, data: bytes | None = None, invert: bool = True) -> np.ndarray:
    """Read a JSRT ``.IMG`` raw file → ``(2048, 2048) float32`` in [0, 1].

    The files are headerless, big-endian ``uint16`` with 12 bits used. Their
    values grow with film density (lungs high), the opposite of a normal
    radiograph, so by default they are inverted (``1 - v / 4095``) to the
    toolkit's polarity (lungs dark), matching the distributed PNGs.
    """
    path = Path(path)
    if data is None:
        data = _read_bytes(path)
    if len(data) != JSRT_RAW_BYTES:
        raise ImageReadError(path, f"JSRT raw file must be {JSRT_RAW_BYTES} bytes (2048×2048 ×2), got {len(data)}")
    arr = np.frombuffer(data, dtype=">u2").reshape(JSRT_RAW_SHAPE)
    top = (1 << JSRT_RAW_BITS) - 1
    if int(arr.max()) > top:
        raise ImageReadError(path, f"values exceed 12 bits (max {int(arr.max())}); not a JSRT raw image")
    out = arr.astype(np.float32) / np.float32(top)
    return 1.0 - out if invert else out


def _read_dicom(path: Path) -> np.ndarray:
    try:
        import pydicom
        from pydicom.errors import InvalidDicomError
    except ImportError as exc:  # pragma: no cover - depends on the extra
        raise ImageReadError(path, "DICOM file, but pydicom is not installed: pip install 'patchflannel[dicom]'") from exc
    try:
        ds = pydicom.dcmread(str(path))
        pixels = ds.pixel_array
    except (InvalidDicomError, AttributeError, ValueError, OSError, EOFError) as exc:
        raise ImageReadError(path, f"unreadable DICOM ({exc})") from exc
    if pixels.ndim == 3 and getattr(ds, "SamplesPerPixel", 1) == 1:
        pixels = pixels[0]  # multi-frame: a radiograph has one frame that matters
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric in ("RGB", "YBR_FULL", "YBR_FULL_422"):
        pixels = cv2.cvtColor(np.ascontiguousarray(pixels[..., :3]), cv2.COLOR_RGB2GRAY)
        return _to_unit_gray(path, pixels)
    bits = int(getattr(ds, "BitsStored", 8 * pixels.dtype.itemsize))
    signed = int(getattr(ds, "PixelRepresentation", 0)) == 1
    values = pixels.astype(np.float64)
    if signed:
        values = values + float(1 << (bits - 1))  # shift to 0..2^bits-1
    else:
        # Bits above BitsStored may hold overlays or garbage; ignore them.
        values = (pixels.astype(np.int64) & ((1 << bits) - 1)).astype(np.float64)
    out = (values / float((1 << bits) - 1)).astype(np.float32)
    out = np.clip(out, 0.0, 1.0)
    if photometric == "MONOCHROME1":
        out = 1.0 - out  # MONOCHROME1: high values are dark
    return out


def read_image(path: str | os.PathLike, min_side: int = MIN_SIDE, check_constant: bool = True) -> np.ndarray:
    """Read any supported radiograph → ``(H, W) float32`` in [0, 1].

    Raises :class:`ImageReadError` (naming ``path``) for a missing, empty,
    truncated, undecodable, too small (< ``min_side`` px) or constant image.
    """
    path = Path(path)
    data = _read_bytes(path)
    fmt = sniff_format(data[:132], len(data))
    if fmt == "unknown":
        raise ImageReadError(path, "not a recognised image (PNG, JPEG, GIF, TIFF, BMP, DICOM or JSRT raw .IMG)")
    if fmt == "jsrt_raw":
        img = read_jsrt_raw(path, data)
    elif fmt == "dicom":
        img = _read_dicom(path)
    else:
        _check_complete(path, fmt, data)
        img = _to_unit_gray(path, _decode_raster(path, fmt, data))
    h, w = img.shape
    if min(h, w) < min_side:
        raise ImageReadError(path, f"image too small ({w}×{h} px; at least {min_side} px per side needed)")
    if check_constant and float(img.max()) - float(img.min()) < 1e-6:
        raise ImageReadError(path, f"image has a single value everywhere ({float(img.min()):.3f}); nothing to analyse")
    return img


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """Read a lung mask (PNG, GIF, …) → ``(H, W) bool`` (any non-zero pixel is lung)."""
    path = Path(path)
    data = _read_bytes(path)
    fmt = sniff_format(data[:132], len(data))
    if fmt in ("unknown", "jsrt_raw", "dicom"):
        raise ImageReadError(path, f"not a mask image (detected format: {fmt})")
    _check_complete(path, fmt, data)
    arr = _decode_raster(path, fmt, data)
    if arr.ndim == 3:
        arr = arr[..., :3].max(axis=2)
    return arr > 0


def resize(img: np.ndarray, size: int | tuple[int, int], interpolation: str = "area") -> np.ndarray:
    """Resize ``(H, W)`` → ``(size, size)`` or ``(h, w)``; masks use ``"nearest"``."""
    h, w = (size, size) if isinstance(size, int) else size
    if img.shape == (h, w):
        return img
    flag = {"area": cv2.INTER_AREA, "linear": cv2.INTER_LINEAR, "nearest": cv2.INTER_NEAREST, "cubic": cv2.INTER_CUBIC}[interpolation]
    if img.dtype == bool:
        return cv2.resize(img.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)
    if flag == cv2.INTER_AREA and (h > img.shape[0] or w > img.shape[1]):
        flag = cv2.INTER_LINEAR  # AREA is for shrinking; it degrades to nearest when enlarging
    return cv2.resize(img, (w, h), interpolation=flag)


def to_uint8(img: np.ndarray) -> np.ndarray:
    """``float [0,1]`` or ``bool`` → ``uint8`` (bool → 0/255)."""
    if img.dtype == bool:
        return img.astype(np.uint8) * 255
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Give a finished temp file normal permissions (mkstemp makes it 0600) and rename it into place."""
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder + rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        _publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_png(path: str | os.PathLike, img: np.ndarray) -> None:
    """Write a uint8 gray ``(H,W)`` or BGR ``(H,W,3)`` image as PNG, atomically."""
    ok, buf = cv2.imencode(".png", img)
    if not ok:
        raise OSError(f"{path}: PNG encoding failed")
    atomic_write_bytes(path, buf.tobytes())


def list_images(inputs: list[str | os.PathLike], recursive: bool = True) -> list[Path]:
    """Expand files and folders into a sorted list of candidate image files.

    Folders contribute files with a known image suffix (or none, as JSRT raw
    and DICOM files often have none); hidden files are skipped. Paths that do
    not exist are kept so the caller reports them as bad input.
    """
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            it = p.rglob("*") if recursive else p.glob("*")
            out.extend(sorted(f for f in it if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in IMAGE_SUFFIXES))
        else:
            out.append(p)
    return out
