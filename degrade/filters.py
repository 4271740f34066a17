"""Blur: correlation with a record's kernel, planned per kernel for speed within a stated error
(`BLUR_TOLERANCE`; docs/degradation.md and docs/benchmarks.md)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import cv2
import numpy as np
from numpy.typing import NDArray

from degrade.errors import DegradeError
from degrade.pixels import Image, check_image

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
    check_image(img)
    if not isinstance(kernel, np.ndarray) or kernel.dtype.kind not in "fiu":
        raise DegradeError(f"kernel must be a 2-D array of real numbers, got {getattr(kernel, 'dtype', type(kernel))}")
    if kernel.ndim != 2 or kernel.shape[0] % 2 == 0 or kernel.shape[1] % 2 == 0:
        raise DegradeError(f"kernel must be 2-D with odd sides, got shape {kernel.shape}")
    if not np.isfinite(kernel).all() or not kernel.any():  # NaN made the whole image NaN; zeros an IndexError
        raise DegradeError("kernel must be finite and not all zero")
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
