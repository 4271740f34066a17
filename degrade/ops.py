"""Image operations of docs/degradation.md: pure functions over float32 RGB arrays. Resize, JPEG, clamp
and quantise live here; blur (`degrade.filters`) and noise (`degrade.noise`) in their own modules, and
every op is reachable as `degrade.ops.<name>` (the pipeline calls them so).

Every op takes ``img: (H, W, 3) float32`` (values nominally in [0, 1]), returns a new array of the
same dtype and never modifies its input. Ops that draw random numbers take an explicit
``rng: numpy.random.Generator``; everything else is deterministic.
"""

from __future__ import annotations

from functools import lru_cache

import cv2
import numpy as np
from numpy.typing import NDArray

from degrade.errors import DegradeError
from degrade.filters import BLUR_TOLERANCE, blur
from degrade.kernels import finite_number
from degrade.noise import add_gaussian_noise, add_poisson_noise, standard_normal
from degrade.pixels import LUMA, Image, check_image, quantise_8bit
from degrade.recipe import RESIZE_MODES, ResizeMode

__all__ = ["BLUR_TOLERANCE", "LUMA", "Image", "add_gaussian_noise", "add_poisson_noise", "blur", "clamp",
           "encode_jpeg", "jpeg", "quantise", "resize", "scaled_size", "standard_normal"]

_CV_MODES: dict[str, int] = {"bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC}
JPEG_MAX_SIDE = 65500  # px: libjpeg's JPEG_MAX_DIMENSION (OpenCV then fails to encode)


def scaled_size(shape: tuple[int, ...], scale: float) -> tuple[int, int]:
    """(H, W) -> (round(H * s), round(W * s)), each at least 1 (docs/degradation.md)."""
    return max(1, round(shape[0] * scale)), max(1, round(shape[1] * scale))


@lru_cache(maxsize=256)
def _pool_taps(n: int, m: int) -> tuple[list[NDArray[np.intp]], list[tuple[NDArray[np.intp], NDArray[np.intp]]], NDArray[np.float32]]:
    """Adaptive average pooling from n to m samples as a few shifted taps.

    Window i is [floor(i n / m), ceil((i + 1) n / m)), PyTorch's `area` (adaptive_avg_pool). Returns
    (full, partial, width): `full[t]` (m,) indexes tap t of every window (t < the narrowest width);
    `partial` lists (windows, index) for the further taps of the wider windows; `width` (m,). Output i
    is (x[full[0][i]] + x[full[1][i]] + ... + the partial taps of window i) / width[i].
    """
    i = np.arange(m)
    start = (i * n) // m
    end = -((-(i + 1) * n) // m)
    width = end - start
    narrow, wide = int(width.min()), int(width.max())
    full = [start + t for t in range(narrow)]
    partial = []
    for t in range(narrow, wide):
        sel = np.flatnonzero(width > t)
        partial.append((sel, start[sel] + t))
    return full, partial, width.astype(np.float32)


def _adaptive_average_rows(x: NDArray[np.float32], m: int) -> NDArray[np.float32]:
    """Pool axis 0 of `x` (n, ...) to m rows; each tap gathers whole rows (contiguous copies), summed
    tap by tap in order, then divided by the window width."""
    full, partial, width = _pool_taps(x.shape[0], m)
    acc = np.take(x, full[0], axis=0)
    for index in full[1:]:
        acc += np.take(x, index, axis=0)
    for sel, index in partial:
        acc[sel] += np.take(x, index, axis=0)
    acc /= width.reshape(m, *(1,) * (x.ndim - 1))
    return acc


def resize(img: Image, size: tuple[int, int], *, mode: ResizeMode) -> Image:
    """Resize to `size` = (height, width), `mode` area / bilinear / bicubic (docs/degradation.md).

    Semantics of PyTorch `F.interpolate(..., align_corners=False)` without antialiasing:
    `area` is adaptive average pooling (output pixel i averages inputs floor(i n/m) .. ceil((i+1) n/m) - 1),
    computed here exactly; `bilinear` / `bicubic` (a = -0.75, may overshoot [0, 1]) are OpenCV
    INTER_LINEAR / INTER_CUBIC, which equal PyTorch to float32 precision (docs/degradation.md).
    """
    check_image(img)
    if mode not in RESIZE_MODES:
        raise DegradeError(f"unknown resize mode {mode!r}: expected one of {list(RESIZE_MODES)}")
    if isinstance(size, np.ndarray) and size.shape == (2,):  # np.array([h, w]) of integers, as before
        size = tuple(size.tolist()) if size.dtype.kind in "iu" else size
    if (not isinstance(size, (tuple, list)) or len(size) != 2
            or any(isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)) for n in size)):
        raise DegradeError(f"resize target must be (height, width) integers, got {size!r}")
    h, w = size
    if h < 1 or w < 1:
        raise DegradeError(f"resize target must be at least 1x1, got {w}x{h}")
    if (h, w) == img.shape[:2]:
        return img.copy()
    if mode == "area":
        H, W = img.shape[:2]
        if H % h == 0 and W % w == 0:  # integer factors: OpenCV's box average is the same windows, faster
            return cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA).reshape(h, w, 3)
        rows = _adaptive_average_rows(img, h)  # (h, W, 3)
        cols = _adaptive_average_rows(cv2.transpose(rows).reshape(W, h, 3), w)  # (w, h, 3); OpenCV's
        return cv2.transpose(cols).reshape(h, w, 3)  # transpose is ~5x NumPy's contiguous copy here
    out = cv2.resize(img, (w, h), interpolation=_CV_MODES[mode])
    return out.reshape(h, w, 3)  # OpenCV drops a unit axis for 1-pixel-wide results


def encode_jpeg(img: Image, quality: int) -> bytes:
    """Baseline JPEG bytes of `img` (clamped, quantised to 8 bit) at integer `quality`, 4:2:0 chroma."""
    return _encode_jpeg(img, quality).tobytes()


def _encode_jpeg(img: Image, quality: int) -> NDArray[np.uint8]:
    check_image(img)
    q = round(finite_number("JPEG quality", quality))  # the nearest integer, as a record's quality (not int())
    if not 1 <= q <= 100:
        raise DegradeError(f"JPEG quality must round to an integer in [1, 100], got {quality!r}")
    if max(img.shape[:2]) > JPEG_MAX_SIDE:
        raise DegradeError(f"a JPEG side can be at most {JPEG_MAX_SIDE} px (libjpeg's limit), got "
                           f"{img.shape[1]}x{img.shape[0]}")
    bgr = cv2.cvtColor(quantise_8bit(img), cv2.COLOR_RGB2BGR)  # OpenCV encodes BGR
    params = [cv2.IMWRITE_JPEG_QUALITY, q, cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420]
    ok, buf = cv2.imencode(".jpg", bgr, params)
    if not ok:
        raise RuntimeError("OpenCV failed to encode a JPEG")
    return buf


def jpeg(img: Image, quality: int) -> Image:
    """JPEG round trip through libjpeg (OpenCV) at integer `quality`, 4:2:0 chroma (docs/degradation.md).

    The input is clamped to [0, 1] and quantised to 8 bit (a JPEG holds 8-bit samples); the result
    is the decoded 8-bit image as float32 (value / 255).
    """
    decoded = cv2.imdecode(_encode_jpeg(img, quality), cv2.IMREAD_COLOR_RGB)  # the encoded buffer, no copy
    return np.divide(decoded, np.float32(255), dtype=np.float32)  # one pass, = astype(float32) / 255


def clamp(img: Image) -> Image:
    """Clip to [0, 1] (after every noise step and before every JPEG; docs/degradation.md)."""
    check_image(img)
    return np.clip(img, 0.0, 1.0)


def quantise(img: Image) -> Image:
    """Clip to [0, 1] and round to the nearest 8-bit level, staying float32 (the final LR)."""
    check_image(img)
    return np.divide(quantise_8bit(img), np.float32(255), dtype=np.float32)
