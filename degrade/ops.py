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

from degrade.recipe import RESIZE_MODES, ResizeMode

Image = NDArray[np.float32]

# Luma weights of spec 5.2 (ITU-R BT.601), used by the gray noise variants.
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)

_CV_MODES: dict[str, int] = {"bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC}

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


@lru_cache(maxsize=256)
def _pool_taps(n: int, m: int) -> tuple[NDArray[np.intp], NDArray[np.float32], NDArray[np.float32]]:
    """Adaptive average pooling from n to m samples as a few shifted taps.

    Window i is [floor(i n / m), ceil((i + 1) n / m)), PyTorch's `area` (adaptive_avg_pool). Returns
    (index (d, m), mask (d, m) of 0/1, width (m,)) for the d = widest window's taps: output i is
    sum_t x[index[t, i]] * mask[t, i] / width[i].
    """
    i = np.arange(m)
    start = (i * n) // m
    end = -((-(i + 1) * n) // m)
    width = end - start
    taps = np.arange(int(width.max()))[:, None]
    index = np.minimum(start[None, :] + taps, n - 1)
    mask = (taps < width[None, :]).astype(np.float32)
    return index, mask, width.astype(np.float32)


def _adaptive_average_rows(x: NDArray[np.float32], m: int) -> NDArray[np.float32]:
    """Pool axis 0 of `x` (n, ...) to m rows; each tap gathers whole rows (contiguous copies)."""
    index, mask, width = _pool_taps(x.shape[0], m)
    extra = (1,) * (x.ndim - 1)
    acc = x[index[0]] * mask[0].reshape(m, *extra)
    for t in range(1, index.shape[0]):
        acc += x[index[t]] * mask[t].reshape(m, *extra)
    acc /= width.reshape(m, *extra)
    return acc


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
        H, W = img.shape[:2]
        if H % h == 0 and W % w == 0:  # integer factors: OpenCV's box average is the same windows, faster
            return cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA).reshape(h, w, 3)
        rows = _adaptive_average_rows(img, h)  # (h, W, 3)
        cols = _adaptive_average_rows(np.ascontiguousarray(rows.transpose(1, 0, 2)), w)  # (w, h, 3)
        return np.ascontiguousarray(cols.transpose(1, 0, 2))
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
    y = np.multiply(x, np.float32(255))  # float32 temporaries, rounded in place
    np.clip(y, 0.0, 255.0, out=y)
    return np.rint(y, out=y).astype(np.uint8)


_POISSON_BUCKETS = 2048  # uniform buckets per rate in the direct lookup table (a power of 2: exact edges)


@lru_cache(maxsize=16)
def _poisson_tables(levels: int) -> tuple[NDArray[np.float64], NDArray[np.int16], int]:
    """Inverse-CDF tables for Poisson(q / 255 * levels), q = 0..255 (the 256 possible 8-bit values).

    Returns (cdf, direct, width). Row q of the flat `cdf` holds F_q(k) = P(N <= k), k = 0 .. width-1,
    its last entry forced to 1 (the mass cut off is < 1e-30). `direct[q * B + b]` is the draw for
    every u in [b / B, (b + 1) / B) when that bucket holds no step of F_q, else -1 - k0 with
    k0 = min{k : F_q(k) >= b / B}, where a search starts.
    """
    from scipy.special import gammaln

    lam = np.arange(256, dtype=np.float64) / 255.0 * levels
    width = int(levels + 12.0 * math.sqrt(levels) + 40)  # > lam + 12 sd: the tail is < 1e-30
    k = np.arange(width, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):  # log(0) at lam = 0, fixed below
        log_pmf = k[None, :] * np.log(lam[:, None]) - lam[:, None] - gammaln(k + 1)[None, :]
    log_pmf[0] = np.where(k == 0, 0.0, -np.inf)  # lam = 0: all mass at 0
    cdf = np.minimum(np.cumsum(np.exp(log_pmf), axis=1), 1.0)
    cdf[:, -1] = 1.0
    edges = np.arange(_POISSON_BUCKETS + 1, dtype=np.float64) / _POISSON_BUCKETS
    first = np.stack([np.searchsorted(row, edges, side="left") for row in cdf])  # k(u) at every edge
    lo, hi = first[:, :-1], first[:, 1:]
    direct = np.where(lo == hi, lo, -1 - lo).astype(np.int16)
    return cdf.ravel(), direct.ravel(), width


def _poisson_counts(q: NDArray[np.uint8], levels: int, rng: np.random.Generator) -> NDArray[np.int64]:
    """Poisson(q / 255 * levels) draws, one per element of `q`: k = min{k : u <= F_q(k)}, u uniform.

    Most draws are one lookup in the direct table; the rest (u in a bucket where F_q steps) walk up
    from the bucket's first candidate, and the rare long walks (tail buckets) finish by bisection.
    An exact Poisson sampler up to the float64 resolution of u and F_q.
    """
    cdf, direct, width = _poisson_tables(levels)
    qi = q.ravel().astype(np.intp)
    u = rng.random(qi.size)
    k = direct[qi * _POISSON_BUCKETS + (u * _POISSON_BUCKETS).astype(np.intp)].astype(np.int64)
    pending = np.flatnonzero(k < 0)
    if pending.size:
        start = -1 - k[pending]
        base = qi[pending] * width
        up = u[pending]
        for _ in range(3):  # walk: F(start) < u means the draw is larger
            step = cdf[base + start] < up
            if not step.any():
                break
            start += step
        lo, hi = start, np.full_like(start, width - 1)  # bisection for what is left: F(hi) = 1 >= u
        while True:
            open_ = lo < hi
            if not open_.any():
                break
            mid = (lo + hi) // 2
            below = cdf[base + mid] < up
            lo = np.where(open_ & below, mid + 1, lo)
            hi = np.where(open_ & ~below, mid, hi)
        k[pending] = lo
    return k.reshape(q.shape)


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
    bgr = cv2.cvtColor(_quantise_8bit(img), cv2.COLOR_RGB2BGR)  # OpenCV encodes BGR
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
    out = cv2.cvtColor(cv2.imdecode(data, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    return out.astype(np.float32) / np.float32(255)


def clamp(img: Image) -> Image:
    """Clip to [0, 1] (spec section 4: after every noise step and before every JPEG)."""
    _check_image(img)
    return np.clip(img, 0.0, 1.0)


def quantise(img: Image) -> Image:
    """Clip to [0, 1] and round to the nearest 8-bit level, staying float32 (the final LR)."""
    _check_image(img)
    return _quantise_8bit(img).astype(np.float32) / np.float32(255)
