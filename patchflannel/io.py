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

Arrays from Python go through the same rule, :func:`to_gray_unit` (see
:func:`as_images` for shapes): ``uint8`` / 255, ``uint16`` / 65535, ``float``
must already lie in [0, 1]; RGB(A) → luminance (ITU-R 601), alpha dropped;
``bool``, NaN, other integer types and out-of-range floats are refused.
16-bit *files* whose largest value fits in 10, 12 or 14 bits are scaled by
that bit depth (with a warning), since such files (e.g. 12-bit detector data
saved as 16-bit PNG) would otherwise read as nearly black.

Any problem with a user's file raises :class:`~patchflannel.errors.ImageReadError`,
whose message names the file and the problem, so batch commands can report
and carry on. Reads are bounded: only regular files (not FIFOs or devices),
at most :data:`MAX_FILE_BYTES` bytes and :data:`MAX_PIXELS` pixels.
"""

from __future__ import annotations

import io as _io
import logging
import os
import stat
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ._files import write_bytes
from .errors import ImageReadError

log = logging.getLogger(__name__)

__all__ = ["ImageReadError", "as_images", "default_threads", "list_images", "read_image", "read_images", "read_mask", "resize",
           "to_gray_unit", "to_uint8", "write_png"]

JSRT_RAW_SHAPE = (2048, 2048)
JSRT_RAW_BYTES = JSRT_RAW_SHAPE[0] * JSRT_RAW_SHAPE[1] * 2
JSRT_RAW_BITS = 12
MIN_SIDE = 64
MAX_FILE_BYTES = 1 << 30  # 1 GiB
MAX_PIXELS = 1 << 28  # 268 megapixels: 16384² — larger than any radiograph detector
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".dcm", ".dicom", ".img", ""}

# cv2 must not grab both cores per call on top of torch's own threads.
cv2.setNumThreads(1)


def sniff_format(head: bytes, size: int) -> str:
    """Name the format of a file from its first bytes and its size.

    Returns one of ``png, jpeg, gif, tiff, bmp, dicom, jsrt_raw`` or ``unknown``.
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
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ImageReadError(path, "file not found") from None
    except OSError as exc:
        raise ImageReadError(path, f"cannot be read ({exc.strerror or exc})") from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageReadError(path, "is a directory, not an image file")
    if not stat.S_ISREG(st.st_mode):
        # FIFOs block forever, devices never end: read only regular files.
        raise ImageReadError(path, "is not a regular file (a pipe, socket or device); copy the image to a file first")
    if st.st_size == 0:
        raise ImageReadError(path, "file is empty (0 bytes)")
    if st.st_size > MAX_FILE_BYTES:
        raise ImageReadError(path, f"file is too large ({st.st_size / 2**30:.1f} GiB; at most {MAX_FILE_BYTES >> 30} GiB)")
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ImageReadError(path, f"cannot be read ({exc.strerror or exc})") from None
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


def _check_pixels(path: Path, fmt: str, data: bytes) -> None:
    """Refuse absurd dimensions from the header, before any pixel is decoded."""
    if fmt not in ("png", "jpeg", "tiff", "bmp", "gif"):
        return
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None  # our own limit below, with our own message
    try:
        with Image.open(_io.BytesIO(data)) as im:
            w, h = im.size
    except Exception as exc:  # noqa: BLE001 — Pillow raises many types for a broken header
        raise ImageReadError(path, f"corrupt {fmt.upper()} header ({exc})") from None
    if w * h > MAX_PIXELS:
        raise ImageReadError(path, f"image is too large ({w}×{h} px; at most {MAX_PIXELS / 1e6:.0f} megapixels)")


def _luma(rgb: np.ndarray, order: str) -> np.ndarray:
    code = cv2.COLOR_BGR2GRAY if order == "bgr" else cv2.COLOR_RGB2GRAY
    if rgb.dtype not in (np.uint8, np.uint16, np.float32):
        rgb = rgb.astype(np.float32)
    return cv2.cvtColor(np.ascontiguousarray(rgb[..., :3]), code)


def to_gray_unit(arr: np.ndarray, source: str | os.PathLike[str] = "<array>", order: str = "rgb") -> np.ndarray:
    """One image array → ``(H,W) float32`` in [0, 1] by the module's rule; ImageReadError otherwise.

    ``order``: channel order of 3/4-channel input (``rgb`` for user arrays,
    ``bgr`` for OpenCV decodes).
    """
    if arr.ndim == 3:
        channels = arr.shape[2]
        if channels == 1:
            arr = arr[..., 0]
        elif channels in (3, 4):
            arr = _luma(arr, order)  # alpha carries no intensity for a radiograph
        else:
            raise ImageReadError(source, f"unsupported number of channels: {channels} (gray, RGB or RGBA expected)")
    elif arr.ndim != 2:
        raise ImageReadError(source, f"unsupported image shape {arr.shape}; expected (H,W), (H,W,3) or (H,W,4)")
    if arr.dtype == bool:
        raise ImageReadError(source, "boolean array: that is a mask, not an image")
    if arr.dtype == np.uint8:
        scale = 255.0
    elif arr.dtype == np.uint16:
        scale = 65535.0
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise ImageReadError(source, f"image contains {int((~np.isfinite(arr)).sum())} NaN or infinite values")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0.0 or hi > 1.0:
            raise ImageReadError(source, f"floating-point image outside [0, 1] (range {lo:g}..{hi:g}); "
                                         "scale it to [0, 1] first")
        scale = 1.0
    else:
        raise ImageReadError(source, f"unsupported pixel type {arr.dtype} (uint8, uint16 or float in [0, 1])")
    out = arr.astype(np.float32)
    if scale != 1.0:
        out /= np.float32(scale)
    return out


def _decode_raster(path: Path, fmt: str, data: bytes) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    if fmt == "gif":
        # OpenCV has no GIF decoder; Pillow does (palette → luminance).
        try:
            with Image.open(_io.BytesIO(data)) as im:
                im.load()
                return np.asarray(im.convert("L"))
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise ImageReadError(path, f"corrupt GIF ({exc})") from None
    try:
        arr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:
        raise ImageReadError(path, f"{fmt.upper()} decoder failed ({str(exc).strip().splitlines()[-1][:120]})") from None
    if arr is None and fmt in ("png", "tiff", "bmp"):
        # Palette / odd bit depths OpenCV refuses: fall back to Pillow.
        try:
            with Image.open(_io.BytesIO(data)) as im:
                im.load()
                arr = np.asarray(im.convert("I;16") if im.mode.startswith("I") else im.convert("L"))
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise ImageReadError(path, f"corrupt {fmt.upper()} ({exc})") from None
    if arr is None:
        raise ImageReadError(path, f"corrupt {fmt.upper()} file (decoder failed)")
    if fmt == "jpeg":
        _check_jpeg_fill(path, arr)
    return arr


def _check_jpeg_fill(path: Path, arr: np.ndarray) -> None:
    # libjpeg fills the image below a premature end of data with flat grey (128)
    # and only prints a warning; a full-width band of exactly 128 at the bottom
    # is that fill, not anatomy.
    gray = arr if arr.ndim == 2 else arr[..., 0]
    rows = 0
    for r in range(gray.shape[0] - 1, -1, -1):
        if not (gray[r] == 128).all():
            break
        rows += 1
    if rows >= 8:
        raise ImageReadError(path, f"JPEG data ends early: the bottom {rows} rows are the decoder's flat grey fill "
                                   "(the file was cut or damaged)")


def _bit_depth_scale(path: Path, arr: np.ndarray) -> np.ndarray:
    """16-bit data that uses only 10/12/14 bits → scaled by that depth (float32 [0,1])."""
    top = int(arr.max())
    for bits in (10, 12, 14):
        if top < (1 << bits) and top >= (1 << (bits - 2)):
            log.warning("%s: 16-bit image whose values fit in %d bits (max %d); scaled by 2^%d - 1", path, bits, top, bits)
            return (arr.astype(np.float32) / np.float32((1 << bits) - 1)).clip(0, 1)
    return arr.astype(np.float32) / np.float32(65535.0)


def read_jsrt_raw(path: str | os.PathLike[str], data: bytes | None = None, invert: bool = True) -> np.ndarray:
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
    except ImportError:  # pragma: no cover - depends on the extra
        raise ImageReadError(path, "DICOM file, but pydicom is not installed: pip install 'patchflannel[dicom]'") from None
    try:
        ds = pydicom.dcmread(str(path))
        pixels = ds.pixel_array
    except (InvalidDicomError, AttributeError, ValueError, OSError, EOFError, KeyError, TypeError) as exc:
        raise ImageReadError(path, f"unreadable DICOM ({str(exc).splitlines()[0][:200]})") from None
    except RuntimeError as exc:
        # pydicom raises RuntimeError when no installed handler decodes the transfer syntax.
        raise ImageReadError(path, f"compressed DICOM that no installed decoder handles ({str(exc).splitlines()[0][:160]}); "
                                   "install pylibjpeg or gdcm, or save it uncompressed") from None
    if pixels.ndim == 3 and getattr(ds, "SamplesPerPixel", 1) == 1:
        pixels = pixels[0]  # multi-frame: a radiograph has one frame that matters
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric in ("RGB", "YBR_FULL", "YBR_FULL_422"):
        return to_gray_unit(np.asarray(pixels), path, order="rgb")
    bits = int(getattr(ds, "BitsStored", 8 * pixels.dtype.itemsize))
    if not 1 <= bits <= 32:
        raise ImageReadError(path, f"implausible BitsStored {bits}")
    signed = int(getattr(ds, "PixelRepresentation", 0)) == 1
    if signed:
        values = pixels.astype(np.float64) + float(1 << (bits - 1))  # shift to 0..2^bits-1
    else:
        # Bits above BitsStored may hold overlays or garbage; ignore them.
        values = (pixels.astype(np.int64) & ((1 << bits) - 1)).astype(np.float64)
    out = np.clip(values / float((1 << bits) - 1), 0.0, 1.0).astype(np.float32)
    if photometric == "MONOCHROME1":
        out = 1.0 - out  # MONOCHROME1: high values are dark
    return out


def _check_image(source: str | os.PathLike[str], img: np.ndarray, min_side: int, check_constant: bool) -> np.ndarray:
    h, w = img.shape
    if min(h, w) < min_side:
        raise ImageReadError(source, f"image too small ({w}×{h} px; at least {min_side} px per side needed)")
    if check_constant and float(img.max()) - float(img.min()) < 1e-6:
        raise ImageReadError(source, f"image has a single value everywhere ({float(img.min()):.3f}); nothing to analyse")
    return img


def read_image(path: str | os.PathLike[str], min_side: int = MIN_SIDE, check_constant: bool = True) -> np.ndarray:
    """Read any supported radiograph → ``(H, W) float32`` in [0, 1].

    Raises :class:`ImageReadError` (naming ``path``) for a missing, empty,
    truncated, undecodable, too large, too small (< ``min_side`` px) or
    constant image.
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
        _check_pixels(path, fmt, data)
        raw = _decode_raster(path, fmt, data)
        if raw.dtype == np.uint16 and (raw.ndim == 2 or raw.shape[2] == 1):
            img = _bit_depth_scale(path, raw.reshape(raw.shape[:2]))
        else:
            img = to_gray_unit(raw, path, order="bgr")
    return _check_image(path, img, min_side, check_constant)


def read_images(paths: Sequence[str | os.PathLike[str]], threads: int | None = None,
                min_side: int = MIN_SIDE) -> list[np.ndarray | ImageReadError]:
    """:func:`read_image` of each path on ``threads`` threads (default: the usable CPUs, at most 4;
    decoding releases the GIL) → the images in input order, an :class:`ImageReadError` in place of each
    unreadable file (other exceptions propagate)."""
    def read(p: str | os.PathLike[str]) -> np.ndarray | ImageReadError:
        try:
            return read_image(p, min_side=min_side)
        except ImageReadError as exc:
            return exc

    n = max(1, min(len(paths), threads or default_threads()))
    if n == 1:
        return [read(p) for p in paths]
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(read, paths))


def default_threads() -> int:
    """Threads for per-file work (reading, writing): the CPUs this process may use, at most 4."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, cpus))


def read_mask(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a lung mask (PNG, GIF, …) → ``(H, W) bool`` (any non-zero pixel is lung)."""
    path = Path(path)
    data = _read_bytes(path)
    fmt = sniff_format(data[:132], len(data))
    if fmt in ("unknown", "jsrt_raw", "dicom"):
        raise ImageReadError(path, f"not a mask image (detected format: {fmt})")
    _check_complete(path, fmt, data)
    _check_pixels(path, fmt, data)
    arr = _decode_raster(path, fmt, data) if fmt != "jpeg" else cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise ImageReadError(path, "mask could not be decoded")
    if arr.ndim == 3:
        arr = arr[..., :3].max(axis=2)
    return arr > 0


def as_images(x: Any, min_side: int = MIN_SIDE) -> list[np.ndarray]:
    """What users pass to the Python API → a list of ``(H,W) float32`` [0,1] images.

    * a path (``str`` / ``os.PathLike``) → :func:`read_image`;
    * a list or tuple → each element (paths and arrays may be mixed);
    * an array (numpy or torch): ``(H,W)`` one gray image; ``(H,W,3|4)`` one
      RGB(A) image; ``(B,H,W)`` a batch of gray images; ``(B,1,H,W)`` or
      ``(B,H,W,1|3|4)`` a batch. Intensities by :func:`to_gray_unit`.

    Raises :class:`ImageReadError` naming the offending input.
    """
    if isinstance(x, (str, os.PathLike)):
        return [read_image(x, min_side=min_side)]
    if isinstance(x, (list, tuple)):
        out: list[np.ndarray] = []
        for i, item in enumerate(x):
            if isinstance(item, (list, tuple)):
                raise ImageReadError(f"<input {i}>", "nested lists are not images; pass paths or arrays")
            out += as_images(item, min_side=min_side)
        return out
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor, without importing torch here
        x = x.detach().cpu().numpy()
    if not isinstance(x, np.ndarray):
        raise ImageReadError("<input>", f"cannot use a {type(x).__name__} as an image; pass a path, an array or a list of them")
    if x.ndim == 2 or (x.ndim == 3 and x.shape[2] in (3, 4) and x.shape[0] > 4):
        return [_check_image("<array>", to_gray_unit(x), min_side, True)]
    if x.ndim == 3:
        return [_check_image(f"<array[{i}]>", to_gray_unit(x[i], f"<array[{i}]>"), min_side, True) for i in range(len(x))]
    if x.ndim == 4 and x.shape[1] == 1:
        x = x[:, 0]
        return [_check_image(f"<array[{i}]>", to_gray_unit(x[i], f"<array[{i}]>"), min_side, True) for i in range(len(x))]
    if x.ndim == 4 and x.shape[3] in (1, 3, 4):
        return [_check_image(f"<array[{i}]>", to_gray_unit(x[i], f"<array[{i}]>"), min_side, True) for i in range(len(x))]
    raise ImageReadError("<array>", f"unsupported array shape {x.shape}; expected (H,W), (H,W,3), (B,H,W), (B,1,H,W) or (B,H,W,C)")


def resize(img: np.ndarray, size: int | tuple[int, int], interpolation: str = "area") -> np.ndarray:
    """Resize ``(H, W)`` → ``(size, size)`` or ``(h, w)``; masks (bool) always use nearest."""
    h, w = (size, size) if isinstance(size, int) else size
    if img.shape[:2] == (h, w):
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


def write_png(path: str | os.PathLike[str], img: np.ndarray) -> Path:
    """Write a uint8 gray ``(H,W)`` or BGR ``(H,W,3)`` image as PNG, atomically."""
    ok, buf = cv2.imencode(".png", img)
    if not ok:
        raise OSError(f"{path}: PNG encoding failed")
    return write_bytes(path, buf.tobytes())


def list_images(inputs: Sequence[str | os.PathLike[str]], recursive: bool = True) -> list[Path]:
    """Expand files and folders into a list of candidate image files, each once.

    Folders contribute files with a known image suffix (or none, as JSRT raw
    and DICOM files often have none), sorted; hidden files are skipped. Paths
    that do not exist, and broken symbolic links in folders, are kept so the
    caller reports them as bad input. A file
    named twice (or reached through two arguments) is listed once.
    """
    out: list[Path] = []
    seen: set[str] = set()
    for item in inputs:
        p = Path(item)
        found = ([f for f in sorted(p.rglob("*") if recursive else p.glob("*"))
                  if (f.is_file() or f.is_symlink()) and not f.name.startswith(".") and f.suffix.lower() in IMAGE_SUFFIXES]
                 if p.is_dir() else [p])
        for f in found:
            key = os.path.realpath(f)
            if key not in seen:
                seen.add(key)
                out.append(f)
    return out
