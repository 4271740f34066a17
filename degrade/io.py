"""Image I/O: the one place where files become float32 RGB arrays and back (spec section 1).

Reading accepts anything OpenCV decodes (PNG, JPEG, WebP, BMP, TIFF, ...) and converts, as
documented in docs/degradation.md: 8-bit and 16-bit samples are scaled to [0, 1] (x / 255,
x / 65535); gray becomes RGB by copying; an alpha channel is dropped (not composited); EXIF
orientation is applied. Writing stores 8-bit RGB in a lossless format (PNG, BMP, TIFF).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import cv2
import numpy as np
from numpy.typing import NDArray

from degrade.errors import ImageError

LOSSLESS_SUFFIXES = (".png", ".bmp", ".tif", ".tiff")


def read_image(path: str | os.PathLike) -> NDArray[np.float32]:
    """Read an image file as (H, W, 3) float32 RGB in [0, 1]."""
    path = Path(path)
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a directory, not an image") from None
    except OSError as exc:
        raise ImageError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        return decode_image(data.tobytes())
    except ImageError as exc:
        raise ImageError(f"{path}: {exc}") from None


def decode_image(data: bytes) -> NDArray[np.float32]:
    """Encoded image bytes -> (H, W, 3) float32 RGB in [0, 1], with the conversions of read_image.

    Raises ImageError (message without a file name) for undecodable data or unsupported sample types.
    """
    buf = np.frombuffer(data, dtype=np.uint8)
    # ANYCOLOR|ANYDEPTH keeps 16 bit and gray, drops alpha and honours EXIF orientation.
    img = cv2.imdecode(buf, cv2.IMREAD_ANYCOLOR | cv2.IMREAD_ANYDEPTH) if buf.size else None
    if img is None or img.size == 0:
        raise ImageError("not a readable image")
    if img.dtype == np.uint8:
        scaled = img.astype(np.float32) / np.float32(255)
    elif img.dtype == np.uint16:
        scaled = img.astype(np.float32) / np.float32(65535)
    else:
        raise ImageError(f"unsupported sample type {img.dtype} (expected 8 or 16 bit)")
    if scaled.ndim == 2:
        scaled = np.repeat(scaled[..., None], 3, axis=2)
    elif scaled.shape[2] == 4:  # defensive: some decoders keep alpha
        scaled = scaled[..., :3]
    return np.ascontiguousarray(scaled[..., ::-1])  # BGR -> RGB


def to_uint8(img: NDArray[np.floating] | NDArray[np.uint8]) -> NDArray[np.uint8]:
    """float [0, 1] -> uint8, rounding to the nearest level (values outside [0, 1] are clipped); uint8 as is."""
    if img.dtype == np.uint8:
        return img
    return np.rint(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)


def write_image(path: str | os.PathLike, img: NDArray[np.floating] | NDArray[np.uint8]) -> None:
    """Write (H, W, 3) RGB, float in [0, 1] or uint8, as 8 bit to a lossless file, atomically (temp + rename)."""
    path = Path(path)
    if path.suffix.lower() not in LOSSLESS_SUFFIXES:
        raise ImageError(f"{path}: output must be a lossless image ({', '.join(LOSSLESS_SUFFIXES)})")
    if img.ndim != 3 or img.shape[2] != 3:
        raise ImageError(f"{path}: expected an (H, W, 3) image, got shape {img.shape}")
    ok, buf = cv2.imencode(path.suffix.lower(), np.ascontiguousarray(to_uint8(img)[..., ::-1]))
    if not ok:
        raise ImageError(f"{path}: OpenCV could not encode the image")
    write_bytes_atomic(path, buf.tobytes())


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temporary file in the same folder, so no partial file is left."""
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise ImageError(f"{path}: folder {directory} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def crop_to_multiple(img: NDArray, multiple: int) -> NDArray:
    """Crop the bottom/right so both sides are multiples of `multiple` (a view, not a copy)."""
    h, w = img.shape[:2]
    return img[: h - h % multiple, : w - w % multiple]
