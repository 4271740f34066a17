"""Image operations of docs/degradation.md: pure functions over float32 RGB arrays.

Every op takes ``img: (H, W, 3) float32`` (values nominally in [0, 1]), returns a new array of the
same dtype and never modifies its input. Ops that draw random numbers take an explicit
``rng: numpy.random.Generator``; everything else is deterministic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property, lru_cache

import cv2
import numpy as np
from numpy.typing import NDArray

from degrade.recipe import RESIZE_MODES, ResizeMode

Image = NDArray[np.float32]

# Luma weights of docs/degradation.md (ITU-R BT.601), used by the gray noise variants.
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)

_CV_MODES: dict[str, int] = {"bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC}

# Blur plans (see `_blur_plan`) may leave out parts of the kernel whose L1 norm, summed, is at most
# this: for an image in [0, 1] every output value then moves by at most 1e-7, under one float32 ulp at
# 1.0 (1.19e-7) and far under the 1/255/4 = 9.8e-4 an 8-bit label could notice. Tests check it on the
# kernels and on real images against scipy's float64 correlation (atol 1e-6, as for exact filters).
BLUR_TOLERANCE = 1e-7

# OpenCV's filter2D switches to a DFT (about 4.5 ms at 256x256x3, whatever the taps) for float32
# kernels of area >= 130 (imgproc filter.dispatch.cpp, dftFilter2D); below that it loops over the
# non-zero taps only (about 7 us per tap at 256x256x3). Pieces stay below this area.
_DFT_AREA = 130

# Cost model of the plan chooser (seconds; `n` = H * W * 3 float32 values; 1 OpenCV thread, fitted on
# 64-256 px images, benchmarks/profile_degrade.py): a call costs _CALL + n * _PER_VALUE (borders, the
# output, accumulating it) plus n * _TAP_2D per non-zero 2-D tap or n * _TAP_1D per 1-D tap.
_CALL = 5e-6
_PER_VALUE = 4.5e-10
_TAP_2D = 4.0e-11
_TAP_1D = 4.5e-11
# Above this modelled cost of the 2-D plan, a truncated SVD is also tried (about 0.1 ms of planning).
_TRY_SVD_ABOVE = 4e-4
# From this many float32 values on, a separable term runs as two 1-D cv2.filter2D passes (row, then
# column) instead of cv2.sepFilter2D: the same correlation with the same borders, 17 % faster for 21
# taps at 256x256x3 (0.36 vs 0.43 ms); equal at 64 px.
_TWO_FILTER2D_FROM = 100_000


def _check_image(img: NDArray) -> None:
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.float32:
        raise ValueError(f"expected an (H, W, 3) float32 image, got shape {img.shape} dtype {img.dtype}")


def _trim_ends(v: NDArray[np.float64], budget: float) -> NDArray[np.float64]:
    """Drop taps from both ends of the 1-D `v` (the same number each side, so it stays centred) while
    the dropped absolute sum stays <= `budget`."""
    a = np.abs(v)
    half = v.size // 2
    dropped = np.cumsum(a[:half] + a[::-1][:half])
    n = int(np.searchsorted(dropped, budget, side="right"))
    return v[n : v.size - n] if n else v


@dataclass(frozen=True)
class _BlurPlan:
    """How `blur` applies `kernel`: separable terms and/or 2-D pieces, whose sum is `approx`.

    terms: (column taps, row taps) float64 pairs, each centred on the kernel centre (cv2.sepFilter2D);
    pieces: (2-D float64 taps, zeros where left out; (x, y) of the kernel centre in them) (cv2.filter2D).
    OpenCV gets them as float32 (`float32_terms`, `float32_pieces`).
    """

    kernel: NDArray[np.float64]
    terms: tuple[tuple[NDArray[np.float64], NDArray[np.float64]], ...] = ()
    pieces: tuple[tuple[NDArray[np.float64], tuple[int, int]], ...] = ()
    taps: tuple[int, ...] = ()  # 1-D taps (col + row) per term, then non-zero taps per piece

    def cost(self, values: int) -> float:
        """Modelled seconds to apply the plan to `values` float32 values (H * W * 3)."""
        per_tap = [_TAP_1D] * len(self.terms) + [_TAP_2D] * len(self.pieces)
        return sum(_CALL + (_PER_VALUE + c * t) * values for c, t in zip(per_tap, self.taps))

    @cached_property
    def float32_terms(self) -> list[tuple[NDArray[np.float32], NDArray[np.float32]]]:
        return [(c.astype(np.float32), r.astype(np.float32)) for c, r in self.terms]

    @cached_property
    def float32_pieces(self) -> list[tuple[NDArray[np.float32], tuple[int, int]]]:
        return [(p.astype(np.float32), anchor) for p, anchor in self.pieces]

    @cached_property
    def approx(self) -> NDArray[np.float64]:
        """(kh, kw): the kernel the plan applies (before OpenCV's float32 rounding of the taps)."""
        kh, kw = self.kernel.shape
        cy, cx = kh // 2, kw // 2
        out = np.zeros((kh, kw))
        for c, r in self.terms:
            out[cy - c.size // 2 : cy + c.size // 2 + 1, cx - r.size // 2 : cx + r.size // 2 + 1] += np.outer(c, r)
        for p, (ax, ay) in self.pieces:
            out[cy - ay : cy - ay + p.shape[0], cx - ax : cx - ax + p.shape[1]] += p
        return out

    @cached_property
    def error(self) -> float:
        """sum |kernel - approx| (L1): <= BLUR_TOLERANCE by construction."""
        return float(np.abs(self.kernel - self.approx).sum())


def _terms_plan(k: NDArray[np.float64], cols: NDArray[np.float64], rows: NDArray[np.float64], left: float) -> _BlurPlan:
    """Rank-1 terms outer(cols[:, i], rows[:, i]), whose sum is `left` (L1) from `k`, each trimmed at
    its ends within an even share of what is left of BLUR_TOLERANCE: since
    |c r - c' r'| <= |c - c'| |r| + |c'| |r - r'| (L1), the plan's error stays <= the tolerance."""
    rank = cols.shape[1]
    share = max(BLUR_TOLERANCE - left, 0.0) / rank / 2  # per term and side
    terms, taps = [], []
    for i in range(rank):
        c = _trim_ends(cols[:, i], share / max(float(np.abs(rows[:, i]).sum()), 1e-300))
        r = _trim_ends(rows[:, i], share / max(float(np.abs(c).sum()), 1e-300))
        terms.append((c, r))
        taps.append(c.size + r.size)
    return _BlurPlan(kernel=k, terms=tuple(terms), taps=tuple(taps))


def _rank1_plan(k: NDArray[np.float64]) -> _BlurPlan | None:
    """One separable term when `k` is rank 1 to within half the tolerance (isotropic and
    axis-aligned Gaussians): column and row through the centre tap, no SVD needed."""
    cy, cx = k.shape[0] // 2, k.shape[1] // 2
    centre = k[cy, cx]
    if not centre > 0:
        return None
    col, row = k[:, cx] / math.sqrt(centre), k[cy, :] / math.sqrt(centre)
    left = float(np.abs(k - np.outer(col, row)).sum())
    if left > 0.5 * BLUR_TOLERANCE:
        return None
    return _terms_plan(k, col[:, None], row[:, None], left)


def _svd_plan(k: NDArray[np.float64], values: int = 0, beat: float = math.inf) -> _BlurPlan | None:
    """The fewest SVD terms whose sum is within half the tolerance of `k` (L1), each then trimmed.

    None when there is none, or when even the fewest possible terms (the Frobenius norm of a
    rank-r residual, sqrt(sum of the squared dropped singular values), is a lower bound of its L1
    norm) at half their full length would cost more than `beat` on `values` values.
    """
    s = np.linalg.svd(k, compute_uv=False)  # singular values alone first: about 3x cheaper
    tail = np.sqrt(np.cumsum((s * s)[::-1])[::-1])  # tail[r]: Frobenius norm of the rank-r residual
    first = max(2, int(np.argmax(np.append(tail, 0.0) <= 0.5 * BLUR_TOLERANCE)))
    if first * (_CALL + (_PER_VALUE + _TAP_1D * 0.5 * sum(k.shape)) * values) >= beat:
        return None
    u, s, vt = np.linalg.svd(k)
    root = np.sqrt(s)
    cols_all, rows_all = u * root, vt.T * root
    if np.allclose(k, k[::-1, ::-1], rtol=0.0, atol=1e-12):  # point-symmetric (Gaussians, sinc): each
        # singular vector is even or odd; make it exactly so, and OpenCV's symmetric column filter
        # applies (about 2x its general one). The residual below is of these vectors.
        for m in (cols_all, rows_all):
            even = np.abs(m + m[::-1]).sum(axis=0) >= np.abs(m - m[::-1]).sum(axis=0)
            m[:] = np.where(even, 0.5 * (m + m[::-1]), 0.5 * (m - m[::-1]))
    for rank in range(first, s.size + 1):
        cols, rows = cols_all[:, :rank], rows_all[:, :rank]
        left = float(np.abs(k - cols @ rows.T).sum())
        if left <= 0.5 * BLUR_TOLERANCE:
            return _terms_plan(k, cols, rows, left)
    return None


def _pieces_plan(k: NDArray[np.float64]) -> _BlurPlan | None:
    """2-D taps with the smallest ones (L1 sum <= tolerance) set to zero, split into pieces that each
    contain the centre and stay below OpenCV's DFT area, so every piece loops over its non-zero taps."""
    kh, kw = k.shape
    cy, cx = kh // 2, kw // 2
    a = np.abs(k).ravel()
    order = np.argsort(a, kind="stable")
    n_drop = int(np.searchsorted(np.cumsum(a[order]), BLUR_TOLERANCE, side="right"))
    kept = k.copy()
    kept.ravel()[order[:n_drop]] = 0.0
    kept[cy, cx] = k[cy, cx]  # the centre always stays (every piece is anchored on it)
    nz_rows, nz_cols = np.flatnonzero(kept.any(axis=1)), np.flatnonzero(kept.any(axis=0))
    y0, y1 = min(nz_rows[0], cy), max(nz_rows[-1], cy) + 1
    x0, x1 = min(nz_cols[0], cx), max(nz_cols[-1], cx) + 1
    if (y1 - y0) * (x1 - x0) < _DFT_AREA:
        boxes = [(y0, y1, x0, x1)]
    elif max(cy + 1 - y0, y1 - cy) * max(cx + 1 - x0, x1 - cx) < _DFT_AREA:
        # Quadrants, each grown to hold the centre (zero taps cost nothing); they share no tap.
        boxes = [(y0, cy + 1, x0, cx + 1), (y0, cy, cx + 1, x1), (cy + 1, y1, x0, cx + 1), (cy, y1, cx + 1, x1)]
    else:
        return None  # too large to split this way (only hand-written records have kernels > 21)
    pieces, counts = [], []
    for ya, yb, xa, xb in boxes:
        if yb <= ya or xb <= xa:
            continue
        nnz = int(np.count_nonzero(kept[ya:yb, xa:xb]))
        if not nnz:
            continue
        ya2, yb2, xa2, xb2 = min(ya, cy), max(yb, cy + 1), min(xa, cx), max(xb, cx + 1)
        taps = np.zeros((yb2 - ya2, xb2 - xa2))
        taps[ya - ya2 : yb - ya2, xa - xa2 : xb - xa2] = kept[ya:yb, xa:xb]
        pieces.append((taps, (cx - xa2, cy - ya2)))
        counts.append(nnz)
    return _BlurPlan(kernel=k, pieces=tuple(pieces), taps=tuple(counts))


def _blur_plan(kernel: NDArray[np.floating], values: int) -> _BlurPlan | None:
    """How to apply `kernel` to `values` float32 values within BLUR_TOLERANCE: one separable term if
    the kernel is rank 1, else the cheaper (by the cost model) of the 2-D pieces and a truncated SVD.
    None when neither fits (kernels larger than 21 that are not rank 1): blur then applies it whole.
    (OpenCV's DFT on the whole kernel was tried as a third choice for dense kernels on small images:
    faster alone, no faster in the level-3 mix, so left out.)"""
    k = np.asarray(kernel, dtype=np.float64)
    plan = _rank1_plan(k)
    if plan is not None:
        return plan
    plan = _pieces_plan(k)
    cost = math.inf if plan is None else plan.cost(values)
    if cost > _TRY_SVD_ABOVE:
        svd = _svd_plan(k, values, cost)
        if svd is not None and svd.cost(values) < cost:
            plan = svd
    return plan


def blur(img: Image, kernel: NDArray[np.floating]) -> Image:
    """Correlate each channel with `kernel` (odd-sized), reflect-101 borders (docs/degradation.md).

    The kernel is applied as planned by `_blur_plan`: separable 1-D passes for rank-1 kernels
    (isotropic and axis-aligned Gaussians); otherwise the 2-D taps in pieces small enough for OpenCV
    to loop over their non-zero taps, or a truncated SVD (a short sum of separable passes), whichever
    the cost model finds cheaper. A plan leaves out at most BLUR_TOLERANCE = 1e-7 of the kernel's L1
    norm, so for an image in [0, 1] each output is within 1e-7 (plus float32 rounding) of the exact
    2-D correlation. (Kernels larger than 21 that are not rank 1 are applied whole, exactly.)
    """
    _check_image(img)
    if kernel.ndim != 2 or kernel.shape[0] % 2 == 0 or kernel.shape[1] % 2 == 0:
        raise ValueError(f"kernel must be 2-D with odd sides, got shape {kernel.shape}")
    plan = _blur_plan(kernel, img.size)
    border = cv2.BORDER_REFLECT_101
    if plan is None:
        return cv2.filter2D(img, -1, np.asarray(kernel, dtype=np.float32), borderType=border)
    out = None
    for col, row in plan.float32_terms:
        if img.size >= _TWO_FILTER2D_FROM:  # two 1-D filter2D passes beat sepFilter2D on large images
            y = cv2.filter2D(cv2.filter2D(img, -1, row[None, :], borderType=border), -1, col[:, None], borderType=border)
        else:
            y = cv2.sepFilter2D(img, -1, row, col, borderType=border)
        out = y if out is None else cv2.add(out, y, dst=out)
    for taps, anchor in plan.float32_pieces:
        y = cv2.filter2D(img, -1, taps, anchor=anchor, borderType=border)
        out = y if out is None else cv2.add(out, y, dst=out)
    return out


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
        cols = _adaptive_average_rows(cv2.transpose(rows).reshape(W, h, 3), w)  # (w, h, 3); OpenCV's
        return cv2.transpose(cols).reshape(h, w, 3)  # transpose is ~5x NumPy's contiguous copy here
    out = cv2.resize(img, (w, h), interpolation=_CV_MODES[mode])
    return out.reshape(h, w, 3)  # OpenCV drops a unit axis for 1-pixel-wide results


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


def add_gaussian_noise(img: Image, sigma: float, *, gray: bool, rng: np.random.Generator) -> Image:
    """img + N(0, 1) * sigma / 255; `sigma` in 0-255 units. Gray: one field copied to all channels.

    The N(0, 1) field is `standard_normal` (float32 Box-Muller on `rng`). Not clipped: the pipeline
    clamps after every noise step (docs/degradation.md).
    """
    _check_image(img)
    h, w = img.shape[:2]
    field = standard_normal((h, w, 1 if gray else 3), rng)
    field *= np.float32(sigma / 255.0)  # in place: the field is ours, so no temporaries
    if gray:
        return img + field
    field += img
    return field


def _quantise_8bit(x: NDArray[np.float32]) -> NDArray[np.uint8]:
    """round(clip(x, 0, 1) * 255) as uint8, ties to even: one OpenCV pass (saturating, cvRound)."""
    if x.ndim == 3 and x.shape[2] == 3:  # negatives to 0 first: the abs is then the identity
        return cv2.convertScaleAbs(cv2.threshold(x, 0.0, 0.0, cv2.THRESH_TOZERO)[1], alpha=255.0)
    y = np.multiply(x, np.float32(255))  # float32 temporaries, rounded in place
    np.clip(y, 0.0, 255.0, out=y)
    return np.rint(y, out=y).astype(np.uint8)


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


def _uniform_buckets(q: NDArray[np.uint8], rng: np.random.Generator) -> tuple[NDArray[np.int32], NDArray[np.float64]]:
    """One uniform u per element of `q` (flattened); returns (q * B + floor(u * B) as int32, u)."""
    u = rng.random(q.size)
    idx = q.ravel().astype(np.int32)
    idx <<= _BUCKET_BITS
    idx |= (u * _POISSON_BUCKETS).astype(np.int32)  # exact: B is a power of 2
    return idx, u


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

    Most draws are one lookup in the direct table; the rest (u in a bucket where F_q steps) are
    searched (`_search_pending`). An exact Poisson sampler up to the float64 resolution of u and F_q.
    """
    _cdf, direct, _noise, _width = _poisson_tables(levels)
    idx, u = _uniform_buckets(q, rng)
    k = np.take(direct, idx).astype(np.int64)
    pending = np.flatnonzero(k < 0)
    if pending.size:
        k[pending] = _search_pending(-1 - k[pending], idx[pending] >> _BUCKET_BITS, u[pending], levels)
    return k.reshape(q.shape)


def _poisson_noise(q: NDArray[np.uint8], levels: int, rng: np.random.Generator) -> NDArray[np.float32]:
    """float32(k / levels - q / 255) for k = `_poisson_counts(q, levels, rng)`, from the same uniforms,
    without the int64 counts: decided buckets read the noise straight from the table."""
    _cdf, direct, direct_noise, _width = _poisson_tables(levels)
    idx, u = _uniform_buckets(q, rng)
    noise = np.take(direct_noise, idx)
    pending = np.flatnonzero(np.isnan(noise))
    if pending.size:
        ip = idx[pending]
        qp = ip >> _BUCKET_BITS
        k = _search_pending(-1 - direct[ip].astype(np.int64), qp, u[pending], levels)
        noise[pending] = (k / levels - qp / 255.0).astype(np.float32)
    return noise.reshape(q.shape)


def add_poisson_noise(img: Image, scale: float, *, gray: bool, rng: np.random.Generator) -> Image:
    """Shot noise (docs/degradation.md): quantise to 8 bit, V = 2^ceil(log2 #distinct values), Poisson(x_q V) / V.

    The noise (that draw minus x_q) times `scale` is added to the unquantised image. Gray: the same
    on the luma, copied to the three channels. Not clipped (the pipeline clamps).
    """
    _check_image(img)
    src = img @ LUMA if gray else img  # (H, W) or (H, W, 3)
    q = _quantise_8bit(src)
    hist = cv2.calcHist([q.reshape(q.shape[0], -1)], [0], None, [256], [0, 256])  # one channel view
    distinct = int(np.count_nonzero(hist))
    levels = 2 ** math.ceil(math.log2(max(distinct, 1)))
    noise = _poisson_noise(q, levels, rng)
    noise *= np.float32(scale)
    if gray:
        return img + noise[..., None]
    noise += img
    return noise


def encode_jpeg(img: Image, quality: int) -> bytes:
    """Baseline JPEG bytes of `img` (clamped, quantised to 8 bit) at integer `quality`, 4:2:0 chroma."""
    return _encode_jpeg(img, quality).tobytes()


def _encode_jpeg(img: Image, quality: int) -> NDArray[np.uint8]:
    _check_image(img)
    q = int(quality)
    if not 1 <= q <= 100:
        raise ValueError(f"JPEG quality must be an integer in [1, 100], got {quality}")
    bgr = cv2.cvtColor(_quantise_8bit(img), cv2.COLOR_RGB2BGR)  # OpenCV encodes BGR
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
    _check_image(img)
    return np.clip(img, 0.0, 1.0)


def quantise(img: Image) -> Image:
    """Clip to [0, 1] and round to the nearest 8-bit level, staying float32 (the final LR)."""
    _check_image(img)
    return np.divide(_quantise_8bit(img), np.float32(255), dtype=np.float32)
