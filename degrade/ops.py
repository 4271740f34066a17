"""Image operations of spec section 5.2: pure functions over float32 RGB arrays.

Every op takes ``img: (H, W, 3) float32`` (values nominally in [0, 1]), returns a new array of the
same dtype and never modifies its input. Ops that draw random numbers take an explicit
``rng: numpy.random.Generator``; everything else is deterministic.
"""

from __future__ import annotations

import math
from functools import lru_cache

import cv2
import numpy as np
from numpy.typing import NDArray

from degrade.recipe import ResizeMode

Image = NDArray[np.float32]

# Luma weights of spec 5.2 (ITU-R BT.601), used by the gray noise variants.
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)

_CV_MODES: dict[str, int] = {"bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC}
RESIZE_MODES = ("area", *_CV_MODES)

# Kernel taps below this absolute value are trimmed from the border of a kernel before filtering:
# a full 21x21 border of such taps moves an output value by < 441e-10 ~ 4e-8, below half a float32
# ulp at 1.0, so the result is the untrimmed correlation to float32 precision (tests check 1e-6).
_NEGLIGIBLE_TAP = 1e-10


def _check_image(img: NDArray) -> None:
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.float32:
        raise ValueError(f"expected an (H, W, 3) float32 image, got shape {img.shape} dtype {img.dtype}")


def _trim(kernel: NDArray[np.float64]) -> NDArray[np.float64]:
    """Drop border rows/columns whose taps are all negligible, keeping the kernel centred."""
    k = kernel
    while k.shape[0] > 1 and np.abs(k[[0, -1], :]).max() < _NEGLIGIBLE_TAP:
        k = k[1:-1, :]
    while k.shape[1] > 1 and np.abs(k[:, [0, -1]]).max() < _NEGLIGIBLE_TAP:
        k = k[:, 1:-1]
    return k


def blur(img: Image, kernel: NDArray[np.floating]) -> Image:
    """Correlate each channel with `kernel` (odd-sized), reflect-101 borders (spec 5.2).

    Rank-1 kernels (isotropic or axis-aligned Gaussians) run as two 1-D passes; others as one 2-D pass
    over the kernel with its negligible border trimmed. Both equal the plain 2-D correlation to float32
    precision.
    """
    _check_image(img)
    if kernel.ndim != 2 or kernel.shape[0] % 2 == 0 or kernel.shape[1] % 2 == 0:
        raise ValueError(f"kernel must be 2-D with odd sides, got shape {kernel.shape}")
    k = _trim(np.asarray(kernel, dtype=np.float64))
    u, s, vt = np.linalg.svd(k)
    if s.size == 1 or s[1] <= 1e-12 * s[0]:
        root = math.sqrt(s[0])
        col = (u[:, 0] * root).astype(np.float32)  # vertical pass
        row = (vt[0] * root).astype(np.float32)  # horizontal pass
        return cv2.sepFilter2D(img, -1, row, col, borderType=cv2.BORDER_REFLECT_101)
    return cv2.filter2D(img, -1, k.astype(np.float32), borderType=cv2.BORDER_REFLECT_101)


def scaled_size(shape: tuple[int, ...], scale: float) -> tuple[int, int]:
    """(H, W) -> (round(H * s), round(W * s)), each at least 1 (spec section 4)."""
    return max(1, round(shape[0] * scale)), max(1, round(shape[1] * scale))


def _adaptive_average(x: NDArray, out_len: int, axis: int) -> NDArray[np.float64]:
    """Average over windows [floor(i n / m), ceil((i + 1) n / m)) along `axis` (n inputs, m outputs)."""
    n = x.shape[axis]
    i = np.arange(out_len)
    start = (i * n) // out_len
    end = -((-(i + 1) * n) // out_len)
    csum = np.cumsum(x, axis=axis, dtype=np.float64)
    pad = [(0, 0)] * x.ndim
    pad[axis] = (1, 0)
    csum = np.pad(csum, pad)
    shape = [1] * x.ndim
    shape[axis] = out_len
    width = (end - start).reshape(shape)
    return (np.take(csum, end, axis=axis) - np.take(csum, start, axis=axis)) / width


def resize(img: Image, size: tuple[int, int], *, mode: ResizeMode) -> Image:
    """Resize to `size` = (height, width) with `mode` area / bilinear / bicubic (spec 5.2).

    Semantics of PyTorch `F.interpolate(..., align_corners=False)` without antialiasing:
    `area` is adaptive average pooling (output pixel i averages inputs floor(i n/m) .. ceil((i+1) n/m) - 1),
    computed here exactly; `bilinear` / `bicubic` (a = -0.75, may overshoot [0, 1]) are OpenCV
    INTER_LINEAR / INTER_CUBIC, which equal PyTorch to float32 precision (docs/degradation.md).
    """
    _check_image(img)
    if mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {mode!r}: expected one of {list(RESIZE_MODES)}")
    h, w = size
    if h < 1 or w < 1:
        raise ValueError(f"resize target must be at least 1x1, got {w}x{h}")
    if (h, w) == img.shape[:2]:
        return img.copy()
    if mode == "area":
        return _adaptive_average(_adaptive_average(img, h, 0), w, 1).astype(np.float32)
    out = cv2.resize(img, (w, h), interpolation=_CV_MODES[mode])
    return out.reshape(h, w, 3)  # OpenCV drops a unit axis for 1-pixel-wide results


def add_gaussian_noise(img: Image, sigma: float, *, gray: bool, rng: np.random.Generator) -> Image:
    """img + N(0, 1) * sigma / 255; `sigma` in 0-255 units. Gray: one field copied to all channels.

    Not clipped: the pipeline clamps after every noise step (spec section 4).
    """
    _check_image(img)
    h, w = img.shape[:2]
    field = rng.standard_normal((h, w, 1 if gray else 3), dtype=np.float32)
    return img + field * np.float32(sigma / 255.0)


def _quantise_8bit(x: NDArray[np.float32]) -> NDArray[np.uint8]:
    return np.rint(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


@lru_cache(maxsize=16)
def _poisson_tables(levels: int) -> tuple[NDArray[np.float64], NDArray[np.int64], NDArray[np.int64], int]:
    """Inverse-CDF tables for Poisson(q / 255 * levels), q = 0..255 (the 256 possible 8-bit values).

    Returns (cdf, guide, offset, width): row q of the flat `cdf` starts at offset[q] and holds
    P(N <= k) for k = 0 .. width-1, its last entry forced to 1 (the mass cut off is < 1e-30);
    guide[q, b] is the smallest k with cdf >= b / width, so a lookup needs about one step.
    """
    lam = np.arange(256, dtype=np.float64) / 255.0 * levels
    width = int(levels + 12.0 * math.sqrt(levels) + 40)  # > lam + 12 sd: the tail is < 1e-30
    k = np.arange(width, dtype=np.float64)
    from scipy.special import gammaln

    with np.errstate(divide="ignore", invalid="ignore"):  # log(0) at lam = 0, fixed below
        log_pmf = k[None, :] * np.log(lam[:, None]) - lam[:, None] - gammaln(k + 1)[None, :]
    log_pmf[0] = np.where(k == 0, 0.0, -np.inf)  # lam = 0: all mass at 0
    cdf = np.cumsum(np.exp(log_pmf), axis=1)
    cdf[:, -1] = 1.0
    cdf = np.minimum(cdf, 1.0)
    bucket_lo = np.arange(width, dtype=np.float64) / width
    guide = np.stack([np.searchsorted(row, bucket_lo, side="left") for row in cdf]).astype(np.int64)
    offset = np.arange(256, dtype=np.int64) * width
    return cdf.ravel(), guide, offset, width


def _poisson_counts(q: NDArray[np.uint8], levels: int, rng: np.random.Generator) -> NDArray[np.int64]:
    """Poisson(q / 255 * levels) draws, one per element of `q`, by guided inverse-CDF lookup.

    Exact up to the 2^-53 resolution of the uniforms; about 5x faster than `rng.poisson` because
    the rate takes at most 256 values whose tables are built once per `levels`.
    """
    cdf, guide, offset, width = _poisson_tables(levels)
    u = rng.random(q.shape)
    qi = q.astype(np.intp)
    k = guide[qi, (u * width).astype(np.intp)]
    base = offset[qi]
    # Walk forward to the first k with u <= cdf[k] (usually zero or one step).
    active = np.flatnonzero(cdf[base.ravel() + k.ravel()] < u.ravel())
    flat_k = k.ravel()
    flat_base, flat_u = base.ravel(), u.ravel()
    while active.size:
        flat_k[active] += 1
        active = active[cdf[flat_base[active] + flat_k[active]] < flat_u[active]]
    return flat_k.reshape(q.shape)


def add_poisson_noise(img: Image, scale: float, *, gray: bool, rng: np.random.Generator) -> Image:
    """Shot noise as spec 5.2: quantise to 8 bit, V = 2^ceil(log2 #distinct values), Poisson(x_q V) / V.

    The noise (that draw minus x_q) times `scale` is added to the unquantised image. Gray: the same
    on the luma, copied to the three channels. Not clipped (the pipeline clamps).
    """
    _check_image(img)
    src = img @ LUMA if gray else img  # (H, W) or (H, W, 3)
    q = _quantise_8bit(src)
    distinct = int(np.count_nonzero(np.bincount(q.ravel(), minlength=256)))
    levels = 2 ** math.ceil(math.log2(max(distinct, 1)))
    counts = _poisson_counts(q, levels, rng)
    noise = (counts / levels - q / 255.0).astype(np.float32)
    if gray:
        noise = noise[..., None]
    return img + noise * np.float32(scale)


def encode_jpeg(img: Image, quality: int) -> bytes:
    """Baseline JPEG bytes of `img` (clamped, quantised to 8 bit) at integer `quality`, 4:2:0 chroma."""
    _check_image(img)
    q = int(quality)
    if not 1 <= q <= 100:
        raise ValueError(f"JPEG quality must be an integer in [1, 100], got {quality}")
    bgr = np.ascontiguousarray(_quantise_8bit(img)[..., ::-1])  # OpenCV encodes BGR
    params = [cv2.IMWRITE_JPEG_QUALITY, q, cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420]
    ok, buf = cv2.imencode(".jpg", bgr, params)
    if not ok:
        raise RuntimeError("OpenCV failed to encode a JPEG")
    return buf.tobytes()


def jpeg(img: Image, quality: int) -> Image:
    """JPEG round trip through libjpeg (OpenCV) at integer `quality`, 4:2:0 chroma (spec 5.2).

    The input is clamped to [0, 1] and quantised to 8 bit (a JPEG holds 8-bit samples); the result
    is the decoded 8-bit image as float32.
    """
    data = np.frombuffer(encode_jpeg(img, quality), dtype=np.uint8)
    out = cv2.imdecode(data, cv2.IMREAD_COLOR)
    return out[..., ::-1].astype(np.float32) / np.float32(255)


def clamp(img: Image) -> Image:
    """Clip to [0, 1] (spec section 4: after every noise step and before every JPEG)."""
    _check_image(img)
    return np.clip(img, 0.0, 1.0)


def quantise(img: Image) -> Image:
    """Clip to [0, 1] and round to the nearest 8-bit level, staying float32 (the final LR)."""
    _check_image(img)
    return _quantise_8bit(img).astype(np.float32) / np.float32(255)
