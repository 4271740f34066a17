"""Noise ops: Gaussian (float32 Box-Muller normals) and Poisson shot noise (an exact table sampler),
each drawing only from the `rng` it is given (docs/degradation.md)."""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache

import cv2
import numpy as np
from numpy.typing import NDArray

from degrade.errors import DegradeError
from degrade.kernels import finite_number
from degrade.pixels import LUMA, Image, check_image, check_rng, quantise_8bit


def standard_normal(shape: tuple[int, ...], rng: np.random.Generator) -> NDArray[np.float32]:
    """N(0, 1) float32 draws by the Box-Muller transform, about 2-3x NumPy's float32 ziggurat here.

    For n draws: u (n/2 float64 uniforms) gives the radius sqrt(-2 ln(1 - u)), with 1 - u rounded to
    float32 (exact near u = 1, so tails still reach 8.6 sigma) and the rest in float32; t (n/2 float32
    uniforms) gives the angle 2 pi t. The first half of the (flattened) output is r cos(2 pi t), the
    second half r sin(2 pi t): two independent normals per pair. Deterministic given `rng`; not the
    same numbers as `rng.standard_normal`.
    """
    n = math.prod(shape)
    half = (n + 1) // 2
    u = rng.random(half)
    np.subtract(1.0, u, out=u)  # 1 - u in (0, 1], exact in float64 ...
    radius = u.astype(np.float32)  # ... and still > 0 in float32 (>= 2^-53): ln is finite
    np.log(radius, out=radius)
    radius *= np.float32(-2.0)
    np.sqrt(radius, out=radius)
    angle = rng.random(half, dtype=np.float32)
    angle *= np.float32(2.0 * math.pi)
    out = np.empty(2 * half, np.float32)
    np.cos(angle, out=out[:half])
    np.sin(angle, out=out[half:])
    out[:half] *= radius
    out[half:] *= radius
    return out[:n].reshape(shape)


def _strength(name: str, value: float) -> float:
    """A noise strength: a finite number >= 0 (a NaN made the whole image NaN), else DegradeError."""
    x = finite_number(name, value)
    if x < 0:
        raise DegradeError(f"noise {name} must be >= 0, got {x:g}")
    return x


def add_gaussian_noise(img: Image, sigma: float, *, gray: bool, rng: np.random.Generator) -> Image:
    """img + N(0, 1) * sigma / 255; `sigma` in 0-255 units. Gray: one field copied to all channels.

    The N(0, 1) field is `standard_normal` (float32 Box-Muller on `rng`). Not clipped: the pipeline
    clamps after every noise step (docs/degradation.md).
    """
    check_image(img)
    check_rng(rng)
    sigma = _strength("sigma", sigma)
    h, w = img.shape[:2]
    field = standard_normal((h, w, 1 if gray else 3), rng)
    field *= np.float32(sigma / 255.0)  # in place: the field is ours, so no temporaries
    if gray:
        return img + field
    field += img
    return field


_POISSON_BUCKETS = 2048  # uniform buckets per rate in the direct lookup table (a power of 2: exact edges)
_BUCKET_BITS = 11  # log2(_POISSON_BUCKETS)


@lru_cache(maxsize=16)
def _poisson_tables(levels: int) -> tuple[NDArray[np.float64], NDArray[np.int16], NDArray[np.float32], int]:
    """Inverse-CDF tables for Poisson(q / 255 * levels), q = 0..255 (the 256 possible 8-bit values).

    Returns (cdf, direct, direct_noise, width). Row q of the flat `cdf` holds F_q(k) = P(N <= k),
    k = 0 .. width-1, its last entry forced to 1 (the mass cut off is < 1e-30). `direct[q * B + b]`
    is the draw for every u in [b / B, (b + 1) / B) when that bucket holds no step of F_q, else
    -1 - k0 with k0 = min{k : F_q(k) >= b / B}, where a search starts. `direct_noise` holds the
    noise k / levels - q / 255 of decided buckets (computed in float64, then rounded to float32),
    NaN where a search is needed.
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
    q = np.arange(256, dtype=np.float64)[:, None]
    noise = np.where(lo == hi, (lo / levels - q / 255.0).astype(np.float32), np.float32(np.nan))
    return cdf.ravel(), direct.ravel(), noise.astype(np.float32).ravel(), width


_RANDOM_BITS = 32  # each draw starts from 32 random bits: the top _BUCKET_BITS pick the bucket
_FINE_SHIFT = _RANDOM_BITS - _BUCKET_BITS


# Bit generators whose raw output is 64 random bits (MT19937's holds 32): `_random_bits` reads those directly.
_RAW_64_BITS = (np.random.PCG64, np.random.PCG64DXSM, np.random.Philox, np.random.SFC64)


def _random_bits(n: int, rng: np.random.Generator) -> NDArray[np.uint32]:
    """n uniform 32-bit integers: `rng.integers(0, 2**32, n, dtype=np.uint32)`. For the bit generators
    whose raw output is 64 random bits (PCG64, NumPy's default; PCG64DXSM, Philox, SFC64) the same
    numbers are read straight from ceil(n / 2) raw outputs, low half first on every platform, which
    costs 0.22 ms instead of 0.37 per 196,608 values. (They are the same numbers for a generator with
    no 32-bit half left over from an earlier 32-bit draw, as every generator the pipeline makes.)"""
    if type(rng.bit_generator) in _RAW_64_BITS:
        raw = rng.bit_generator.random_raw((n + 1) // 2)
        return raw.astype("<u8", copy=False).view("<u4")[:n]
    return rng.integers(0, 1 << 32, n, dtype=np.uint32)


def _bucket_index(q: NDArray[np.uint8], bits: NDArray[np.uint32]) -> NDArray[np.uint32]:
    """q * B + (the top _BUCKET_BITS of bits): the row of the direct tables for each draw (flattened)."""
    idx = np.left_shift(q.ravel(), _BUCKET_BITS, dtype=np.uint32)
    idx |= bits >> _FINE_SHIFT
    return idx


def _fine_uniforms(bits: NDArray[np.uint32], rng: np.random.Generator) -> NDArray[np.float64]:
    """u = (bits + e) / 2^32 with e a fresh float64 uniform: uniform on [bits / 2^32, (bits + 1) / 2^32],
    so together with the 32 bits a uniform on [0, 1] to float64 resolution. Drawn only for the draws
    the direct table leaves open."""
    u = rng.random(bits.size)
    u += bits
    u *= 2.0 ** -_RANDOM_BITS  # exact: a power of 2
    return u


def _search_open(ip: NDArray[np.uint32], u: NDArray[np.float64], levels: int) -> NDArray[np.int64]:
    """Counts for the draws whose bucket (`ip`: their bucket indices) holds a step of F_q, searched from
    their fine uniforms `u` (each inside its bucket), starting where the bucket's CDF range starts."""
    _cdf, direct, _noise, _width = _poisson_tables(levels)
    start = -1 - direct[ip].astype(np.int64)
    return _search_pending(start, (ip >> _BUCKET_BITS).astype(np.intp), u, levels)


def _search_pending(
    start: NDArray[np.int64], q: NDArray[np.intp], u: NDArray[np.float64], levels: int
) -> NDArray[np.int64]:
    """k = min{k >= start : u <= F_q(k)} for the draws the direct table left open.

    About 97 % of them are start or start + 1 (a bucket mostly holds one step of F_q): two vectorised
    steps; the rest (tail buckets) by one binary search over all rows at once, in `_poisson_keys`.
    """
    cdf, _direct, _noise, width = _poisson_tables(levels)
    base = q * width
    k = start.copy()
    walking = np.arange(k.size)  # positions still below their draw: F(k) < u
    for _ in range(2):
        walking = walking[cdf[base[walking] + k[walking]] < u[walking]]
        if not walking.size:
            return k
        k[walking] += 1
    walking = walking[cdf[base[walking] + k[walking]] < u[walking]]
    if walking.size:
        qw = q[walking]
        k[walking] = np.searchsorted(_poisson_keys(levels), qw + 1j * u[walking], side="left") - qw * width
    return k


@lru_cache(maxsize=16)
def _poisson_keys(levels: int) -> NDArray[np.complex128]:
    """The CDF table as complex keys q + i F_q(k), in row order. NumPy orders complex numbers by real,
    then imaginary part, so searchsorted(keys, q + i u, side="left") is the first k of row q with
    F_q(k) >= u, exactly (no rounding: each part is compared as it is); F_q(width - 1) = 1 >= u
    keeps the answer inside row q."""
    cdf, _direct, _noise, width = _poisson_tables(levels)
    return np.repeat(np.arange(256, dtype=np.float64), width) + 1j * cdf


def _poisson_counts(q: NDArray[np.uint8], levels: int, rng: np.random.Generator) -> NDArray[np.int64]:
    """Poisson(q / 255 * levels) draws, one per element of `q`: k = min{k : u <= F_q(k)}, u uniform.

    u starts as 32 random bits (`_random_bits`); most draws are decided by their bucket (the top 11
    bits) in the direct table; the rest get a fine uniform inside their bits' interval
    (`_fine_uniforms`) and are searched (`_search_pending`). An exact Poisson sampler up to the float64
    resolution of u and F_q.
    """
    bits = _random_bits(q.size, rng)
    return _counts_from_bits(q, levels, bits, lambda pending: _fine_uniforms(bits[pending], rng))


def _counts_from_bits(q: NDArray[np.uint8], levels: int, bits: NDArray[np.uint32],
                      uniforms: Callable[[NDArray[np.intp]], NDArray[np.float64]]) -> NDArray[np.int64]:
    """`_poisson_counts` for given bits, and `uniforms(pending)` for the draws the table leaves open."""
    _cdf, direct, _noise, _width = _poisson_tables(levels)
    idx = _bucket_index(q, bits)
    k = np.take(direct, idx).astype(np.int64)
    pending = np.flatnonzero(k < 0)
    if pending.size:
        k[pending] = _search_open(idx[pending], uniforms(pending), levels)
    return k.reshape(q.shape)


def _poisson_noise(q: NDArray[np.uint8], levels: int, rng: np.random.Generator) -> NDArray[np.float32]:
    """float32(k / levels - q / 255) for k = `_poisson_counts(q, levels, rng)`, from the same random
    numbers, without the int64 counts: decided buckets read the noise straight from the table (NaN where
    the bucket holds a step of F_q and the draw is searched)."""
    _cdf, _direct, direct_noise, _width = _poisson_tables(levels)
    bits = _random_bits(q.size, rng)
    idx = _bucket_index(q, bits)
    noise = np.take(direct_noise, idx)
    pending = np.flatnonzero(np.isnan(noise))
    if pending.size:
        ip = idx[pending]
        k = _search_open(ip, _fine_uniforms(bits[pending], rng), levels)
        noise[pending] = (k / levels - (ip >> _BUCKET_BITS) / 255.0).astype(np.float32)
    return noise.reshape(q.shape)


def add_poisson_noise(img: Image, scale: float, *, gray: bool, rng: np.random.Generator) -> Image:
    """Shot noise (docs/degradation.md): quantise to 8 bit, V = 2^ceil(log2 #distinct values), Poisson(x_q V) / V.

    The noise (that draw minus x_q) times `scale` is added to the unquantised image. Gray: the same
    on the luma, copied to the three channels. Not clipped (the pipeline clamps).
    """
    check_image(img)
    check_rng(rng)
    scale = _strength("scale", scale)
    src = img @ LUMA if gray else img  # (H, W) or (H, W, 3)
    q = quantise_8bit(src)
    hist = cv2.calcHist([q.reshape(q.shape[0], -1)], [0], None, [256], [0, 256])  # one channel view
    distinct = int(np.count_nonzero(hist))
    levels = 2 ** math.ceil(math.log2(max(distinct, 1)))
    noise = _poisson_noise(q, levels, rng)
    noise *= np.float32(scale)
    if gray:
        return img + noise[..., None]
    noise += img
    return noise
