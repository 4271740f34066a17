"""NIQE (Mittal, Soundararajan and Bovik, 2013): the no-reference quality score real-world SR papers report
where there is no HR (lower is more natural), for `dasr-eval --niqe-params FILE`. numpy and scipy only.

The score compares natural-scene statistics of an image's 96 x 96 blocks, at full and at half size, with
a multivariate Gaussian fitted to pristine photos. That model is data (`mu_pris_param` (36,),
`cov_pris_param` (36, 36), `gaussian_window` (7, 7) in an .npz file, as BasicSR ships it in
`basicsr/metrics/niqe_pris_params.npz`, from the official MATLAB release); nothing is downloaded.
The computation follows the MATLAB release as BasicSR's `calculate_niqe` does (Y of BT.601 on 8-bit
levels, rounded; MATLAB's bicubic imresize with antialiasing for the half scale; blocks without overlap);
tests/test_niqe.py checks it against BasicSR.
"""

from __future__ import annotations

import functools
import math
import os
import tokenize
import warnings
import zipfile
import zlib
from pathlib import Path

import cv2
import numpy as np
from scipy import sparse
from scipy.special import gamma

from dasr_model.errors import DASRError

BLOCK = 96  # px, the release's block side (its model was fitted on blocks of this size)
FEATURES = 36  # 18 per scale
PARAMS = {"mu_pris_param": (FEATURES,), "cov_pris_param": (FEATURES, FEATURES), "gaussian_window": (7, 7)}
MAX_PARAMS_BYTES = 1 << 20  # the file is about 11 kB


def load_niqe_params(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The pristine model from an .npz file (read without pickles): the three arrays of PARAMS (the mean may
    be stored (1, 36), as BasicSR's is), real numbers of their shapes and finite, the window non-negative
    and summing to 1, the covariance symmetric; else a one-line DASRError naming the file. Each member's
    unpacked size is checked before it is read (a small file could inflate to gigabytes)."""
    from dasr_model.checkpoints import open_regular

    path = Path(path)
    with open_regular(path) as f:
        if os.fstat(f.fileno()).st_size > MAX_PARAMS_BYTES:
            raise DASRError(f"{path}: not a NIQE parameter file (over {MAX_PARAMS_BYTES} bytes)")
        try:
            if f.read(4) != b"PK\x03\x04":  # not a zip: np.load would read a lone .npy, allocating its shape
                raise ValueError("not an .npz archive")
            f.seek(0)
            npz = np.load(f, allow_pickle=False)
            if not isinstance(npz, np.lib.npyio.NpzFile):
                raise ValueError("not an .npz archive")
            with npz:
                arrays = {}
                for key in PARAMS:
                    if key not in npz.files:
                        raise DASRError(f"{path}: not a NIQE parameter file (no {key!r})")
                    if npz.zip.getinfo(f"{key}.npy").file_size > MAX_PARAMS_BYTES:
                        raise DASRError(f"{path}: refused: its {key} unpacks to over {MAX_PARAMS_BYTES} bytes")
                    with npz.zip.open(f"{key}.npy") as member:  # the header's shape, before numpy allocates it
                        version = np.lib.format.read_magic(member)
                        read = {(1, 0): np.lib.format.read_array_header_1_0,
                                (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                        if read is None:
                            raise ValueError(f"npy format version {version}")
                        shape, _, dtype = read(member)
                    if math.prod(shape) * dtype.itemsize > MAX_PARAMS_BYTES:
                        raise DASRError(f"{path}: refused: its {key} declares {shape} of {dtype}")
                    arrays[key] = npz[key]
        except DASRError:
            raise
        # not an npz, or damaged: a bad deflate stream (zlib.error), an unsupported or encrypted member
        # (zipfile's NotImplementedError, RuntimeError), a .npy header that does not parse (numpy's
        # tokenize.TokenError, SyntaxError): each was a traceback
        except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error, NotImplementedError,
                RuntimeError, tokenize.TokenError, SyntaxError) as exc:
            raise DASRError(f"{path}: not a readable NIQE parameter file ({' '.join(str(exc).split())[:120]})") \
                from None
    out = {}
    for key, shape in PARAMS.items():
        a = arrays[key]
        if a.dtype.kind not in "fiu" or a.size != math.prod(shape):
            raise DASRError(f"{path}: its {key} is {a.dtype} {a.shape}, expected real numbers of shape {shape}")
        out[key] = a.astype(np.float64).reshape(shape)
        if not np.isfinite(out[key]).all():
            raise DASRError(f"{path}: its {key} holds NaN or infinite values")
    window, cov = out["gaussian_window"], out["cov_pris_param"]
    if (window.min() < 0 or abs(window.sum() - 1) > 1e-6 or not np.allclose(cov, cov.T)
            or np.linalg.eigvalsh(cov).min() < -1e-9 * np.abs(cov).max()):
        raise DASRError(f"{path}: not a NIQE model (its window must be non-negative and sum to 1, its "
                        "covariance symmetric and positive semi-definite)")
    return out


def niqe(y: np.ndarray, params: dict[str, np.ndarray]) -> float:
    """NIQE of a luma image (H, W) on the 0-255 scale (rounded to integers first, halves up: MATLAB's round
    for the non-negative values of a luma image). At least two 96 x 96 blocks whose statistics exist are
    needed (a flat block has none, and the covariance of one block is undefined), else DASRError."""
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a flat block's features are NaN: left out below
        img = np.asarray(y, np.float64) + 0.5  # a new array: the caller's is left as it is
        return _niqe(np.floor(img, out=img), params)


def _niqe(img: np.ndarray, params: dict[str, np.ndarray]) -> float:
    rows, cols = img.shape[0] // BLOCK, img.shape[1] // BLOCK
    if rows * cols < 2:
        raise DASRError(f"NIQE needs two {BLOCK} x {BLOCK} blocks at least, not a {img.shape[1]}x{img.shape[0]} "
                        "image")
    img = img[: rows * BLOCK, : cols * BLOCK]
    window = params["gaussian_window"]
    return quality(np.concatenate([_scale_features(img, window, BLOCK),
                                   _scale_features(imresize_half(img, unit=255), window, BLOCK // 2)], axis=1),
                   params)


def quality(feats: np.ndarray, params: dict[str, np.ndarray]) -> float:
    """NIQE from the blocks' features (n, 36): the distance of their multivariate Gaussian to the pristine
    model's. Blocks with a non-finite feature (flat ones) are left out of the covariance; fewer than two
    left: DASRError."""
    whole = feats[np.isfinite(feats).all(axis=1)]
    if len(whole) < 2:
        raise DASRError(f"NIQE needs two {BLOCK} x {BLOCK} blocks with texture, and this image has "
                        f"{len(whole)} (flat blocks have no statistics)")
    mu_d = np.nanmean(feats, axis=0)
    cov_d = np.cov(whole, rowvar=False)
    d = np.ravel(params["mu_pris_param"]) - mu_d  # the mean as (36,) or BasicSR's (1, 36)
    return float(np.sqrt(d @ np.linalg.pinv((params["cov_pris_param"] + cov_d) / 2) @ d))


def _scale_features(img: np.ndarray, window: np.ndarray, side: int) -> np.ndarray:
    """The 18 features of each side x side block of img (a whole number of blocks a side), blocks in
    column-major order (as the release lists them), after the local mean and contrast normalisation by
    `window`. One row of blocks at a time, with the window's reach of rows around it (the image's own
    edge rows at its top and bottom, as mode "nearest" gives the whole image): the same numbers, with
    memory that follows a row of blocks, not the image."""
    reach = window.shape[0] // 2
    kernel = np.ascontiguousarray(window[::-1, ::-1])  # filter2D correlates; the release convolves

    def convolve(x: np.ndarray) -> np.ndarray:  # scipy.ndimage.convolve(x, window, mode="nearest"), faster
        return cv2.filter2D(x, -1, kernel, borderType=cv2.BORDER_REPLICATE)

    per_row = []
    for top in range(0, img.shape[0], side):
        start = max(top - reach, 0)
        strip = img[start:top + side + reach]
        mu = convolve(strip)
        sigma = np.sqrt(np.abs(convolve(strip * strip) - mu * mu))
        normalised = ((strip - mu) / (sigma + 1))[top - start:top - start + side]
        per_row.append(_features(normalised.reshape(side, -1, side).transpose(1, 0, 2)))
    return np.array(per_row).transpose(1, 0, 2).reshape(-1, FEATURES // 2)


@functools.lru_cache(maxsize=1)
def _shape_table() -> tuple[np.ndarray, np.ndarray]:
    """The shape parameters searched (0.2 to 10 by 0.001) and the moment ratio of each (it rises with the
    shape, strictly: tests/test_niqe.py checks it, and _nearest relies on it)."""
    shape = np.arange(0.2, 10.001, 0.001)
    return shape, gamma(2 / shape) ** 2 / (gamma(1 / shape) * gamma(3 / shape))


def _nearest(ratios: np.ndarray, r: np.ndarray) -> np.ndarray:
    """For each r, argmin((ratios - r) ** 2) over the rising ratios, as the release's search over the whole
    table: of the two neighbours searchsorted finds, the nearer, the first on a tie. An r not finite becomes
    0, below the table, so it gets index 0 as from argmin (where every difference is NaN or infinite, argmin
    gives the first). (A finite r above about 1e150, whose squared distances overflow, would differ:
    _aggd's ratios are at most about 1.)"""
    r = np.where(np.isfinite(r), r, 0.0)
    above = np.clip(np.searchsorted(ratios, r), 1, len(ratios) - 1)
    below = above - 1
    return np.where((ratios[below] - r) ** 2 <= (ratios[above] - r) ** 2, below, above)


def _aggd(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shape, left and right scale of an asymmetric generalised Gaussian fitted by moment matching to each
    row of x (n, m)."""
    sq = x * x
    below, above = x < 0, x > 0
    left = np.sqrt(np.where(below, sq, 0.0).sum(axis=1) / below.sum(axis=1))
    right = np.sqrt(np.where(above, sq, 0.0).sum(axis=1) / above.sum(axis=1))
    g = left / right
    r = np.abs(x).mean(axis=1) ** 2 / sq.mean(axis=1)
    r_norm = r * (g**3 + 1) * (g + 1) / (g**2 + 1) ** 2
    shapes, ratios = _shape_table()
    a = shapes[_nearest(ratios, r_norm)]
    spread = np.sqrt(gamma(1 / a) / gamma(3 / a))
    return a, left * spread, right * spread


def _features(blocks: np.ndarray) -> np.ndarray:
    """The 18 features of each block of blocks (n, side, side), as (n, 18): its own AGGD fit (shape, mean
    scale), then for the products with its four neighbours (circularly shifted within the block, as MATLAB's
    circshift) shape, mean, left and right scales."""
    flat = blocks.reshape(len(blocks), -1)
    a, left, right = _aggd(flat)
    out = [a, (left + right) / 2]
    for shift in ((0, 1), (1, 0), (1, 1), (1, -1)):
        a, left, right = _aggd(flat * np.roll(blocks, shift, axis=(1, 2)).reshape(len(blocks), -1))
        out += [a, (right - left) * gamma(2 / a) / gamma(1 / a), left, right]
    return np.stack(out, axis=1)


def imresize_half(img: np.ndarray, *, unit: float = 1.0) -> np.ndarray:
    """MATLAB's imresize(img, 0.5) (bicubic, a = -0.5, antialiased: the kernel stretched by 2; edges
    mirrored) of a 2-D float image; each output side is the input's halved, rounded up. With `unit`, of
    img / unit, times unit (NIQE resizes its 0-255 image on the 0-1 scale). Done in strips of output rows,
    each from the input rows it weighs, so no whole-image temporary but the output is made."""
    from dasr_model.metrics import STRIP_ROWS

    down, across = _half_weights(img.shape[0]), _half_weights(img.shape[1])
    out = np.empty((down.shape[0], across.shape[0]))
    for start in range(0, len(out), STRIP_ROWS):
        weights = down[start:start + STRIP_ROWS]
        first, last = weights.indices.min(), weights.indices.max() + 1
        part = weights[:, first:last] @ (img[first:last] / unit)
        out[start:start + len(part)] = (across @ part.T).T * unit
    return out


@functools.lru_cache(maxsize=8)
def _half_weights(n: int) -> sparse.csr_matrix:
    """The (ceil(n / 2), n) matrix of imresize's x0.5 along one axis, sparse (10 taps a row)."""
    scale, width = 0.5, 8.0  # the antialiasing kernel covers 4 / scale input pixels
    out = math.ceil(n * scale)
    centre = np.arange(1, out + 1) / scale + 0.5 * (1 - 1 / scale)  # 1-based input coordinates
    first = np.floor(centre - width / 2)
    taps = first[:, None] + np.arange(int(math.ceil(width)) + 2)[None, :]
    w = scale * _cubic(scale * (centre[:, None] - taps))
    w /= w.sum(axis=1, keepdims=True)
    mirrored = np.concatenate([np.arange(n), np.arange(n)[::-1]])  # MATLAB's symmetric edge
    index = mirrored[np.mod(taps.astype(np.int64) - 1, 2 * n)]
    rows = np.repeat(np.arange(out), taps.shape[1])
    return sparse.csr_matrix((w.ravel(), (rows, index.ravel())), shape=(out, n))  # repeated entries add up


def _cubic(x: np.ndarray) -> np.ndarray:
    ax = np.abs(x)
    return np.where(ax <= 1, 1.5 * ax**3 - 2.5 * ax**2 + 1,
                    np.where(ax <= 2, -0.5 * ax**3 + 2.5 * ax**2 - 4 * ax + 2, 0.0))
