"""Evaluation metrics (PSNR and SSIM on BT.601 Y with a 4-px crop, RGB PSNR), on 8-bit-rounded images
as the DASR release's scripts compute them. Images are (H, W, 3) float arrays in [0, 1]; an SR image and
its HR have one shape; anything else is a DASRError.

Everything runs in strips of STRIP_ROWS rows, so the float64 temporaries follow a strip, not the image
(a 6000 x 4000 HR's SSIM held about 1.8 GB of them): each strip's values are the whole image's, bit for
bit (the operations are per pixel, and SSIM's strips overlap by its window); only the final sums add up in
another order."""

from __future__ import annotations

import cv2
import numpy as np

from dasr_model.errors import DASRError

SSIM_WINDOW = 11  # the Gaussian window's side: SSIM's valid region needs at least this much after the crop
CROP = 4  # px off each border before PSNR, SSIM and NIQE, as the DASR release scores
STRIP_ROWS = 256  # rows per strip (a 6000-px-wide float64 strip: 12 MB)


def _check(img: np.ndarray) -> None:
    """An image is an (H, W, 3) float array, else DASRError."""
    if not isinstance(img, np.ndarray) or img.ndim != 3 or img.shape[2] != 3:
        raise DASRError(f"an image must be an (H, W, 3) array, got shape {getattr(img, 'shape', None)}")
    if not np.issubdtype(img.dtype, np.floating):  # a uint8 image clipped to [0, 1] is black and white
        raise DASRError(f"an image must be float in [0, 1], got {img.dtype} (divide 8-bit images by 255)")


def _to_255(img: np.ndarray) -> np.ndarray:
    """(H, W, 3) float in [0, 1] -> float64 on 8-bit levels."""
    _check(img)
    return np.round(np.clip(img, 0, 1) * 255).astype(np.float64)


def _pair(sr: np.ndarray, hr: np.ndarray, crop: int, least: int = 1) -> None:
    """An SR image and its HR: one shape, at least `least` px a side left after `crop` px off each border."""
    shapes = [getattr(x, "shape", None) for x in (sr, hr)]
    if shapes[0] != shapes[1]:
        raise DASRError(f"the SR image and its HR differ in shape: {shapes[0]} and {shapes[1]}")
    if isinstance(crop, bool) or not isinstance(crop, (int, np.integer)) or crop < 0:
        raise DASRError(f"crop must be an integer >= 0, got {crop!r}")
    if shapes[0] is not None and len(shapes[0]) >= 2 and min(shapes[0][:2]) - 2 * crop < least:
        raise DASRError(f"an image of {shapes[0][1]}x{shapes[0][0]} px leaves less than {least} px a side after "
                        f"cropping {crop} px off each border")


def _strips(rows: int):
    """(start, stop) of consecutive strips of STRIP_ROWS rows covering `rows` rows."""
    return ((start, min(start + STRIP_ROWS, rows)) for start in range(0, rows, STRIP_ROWS))


def y_channel(img: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma in the 16-235 range from RGB in [0, 1], after 8-bit rounding: (H, W) float64."""
    _check(img)
    out = np.empty(img.shape[:2], np.float64)
    for start, stop in _strips(len(img)):
        x = _to_255(img[start:stop])
        out[start:stop] = 16 + (65.481 * x[..., 0] + 128.553 * x[..., 1] + 24.966 * x[..., 2]) / 255
    return out


def _crop(x: np.ndarray, c: int) -> np.ndarray:
    return x[c:-c, c:-c] if c else x


def cropped_y(img: np.ndarray, *, crop: int = CROP, like: np.ndarray | None = None) -> np.ndarray:
    """y_channel of an image with `crop` px off each border, as psnr_y, ssim_y and NIQE score it. With
    `like` (the SR image scored against this HR), first the checks of ssim_y: one shape, and enough left
    after the crop for SSIM's window."""
    if like is not None:
        _pair(like, img, crop, SSIM_WINDOW)
    return _crop(y_channel(img), crop)


def _psnr(sse: float, size: int) -> float:
    """PSNR on the 0-255 scale from a sum of squared differences over `size` values (0: inf)."""
    return float("inf") if sse == 0 else float(10 * np.log10(255.0**2 / (sse / size)))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR of two arrays of one shape on the 0-255 scale."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)  # (uint8 squares wrapped around)
    if a.shape != b.shape or a.ndim == 0 or a.size == 0:
        raise DASRError(f"PSNR needs two non-empty arrays of one shape: got {a.shape} and {b.shape}")
    sse = sum(float(np.sum((a[i:j] - b[i:j]) ** 2)) for i, j in _strips(len(a)))
    return _psnr(sse, a.size)


def psnr_y(sr: np.ndarray, hr: np.ndarray, crop: int = CROP) -> float:
    _pair(sr, hr, crop)
    return psnr(cropped_y(sr, crop=crop), cropped_y(hr, crop=crop))


def psnr_rgb(sr: np.ndarray, hr: np.ndarray, crop: int = CROP) -> float:
    _pair(sr, hr, crop)
    a, b = _crop(sr, crop), _crop(hr, crop)
    sse = sum(float(np.sum((_to_255(a[i:j]) - _to_255(b[i:j])) ** 2)) for i, j in _strips(len(a)))
    return _psnr(sse, a.size)


def ssim_y(sr: np.ndarray, hr: np.ndarray, crop: int = CROP) -> float:
    """SSIM on Y (Wang et al. 2004): Gaussian window 11, sigma 1.5, valid region, C1/C2 for range 255."""
    _pair(sr, hr, crop, SSIM_WINDOW)
    return ssim(cropped_y(sr, crop=crop), cropped_y(hr, crop=crop))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of two (H, W) planes on the 0-255 scale (ssim_y's after Y and the crop), each side at least
    SSIM_WINDOW: the mean of the map over the valid region, computed in strips of the map's rows (a strip
    reads its rows and the window's 10 below)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)  # (squares of uint8 wrap)
    if a.shape != b.shape or a.ndim != 2 or min(a.shape) < SSIM_WINDOW:
        raise DASRError(f"SSIM needs two planes of one shape, each side at least {SSIM_WINDOW}: got {a.shape} "
                        f"and {b.shape}")
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    edge = SSIM_WINDOW // 2
    rows, cols = a.shape[0] - 2 * edge, a.shape[1] - 2 * edge

    taps = np.exp(-0.5 * (np.arange(-edge, edge + 1) / 1.5) ** 2)
    taps /= taps.sum()  # the Gaussian of sigma 1.5 on SSIM_WINDOW taps (scipy's gaussian_filter's, truncate 3.5)

    def filt(x):  # the valid region only, so the border rule does not matter; OpenCV's is 3.6x scipy's speed
        return cv2.sepFilter2D(x, -1, taps, taps, borderType=cv2.BORDER_CONSTANT)[edge:-edge, edge:-edge]

    total = 0.0
    for start, stop in _strips(rows):
        x, y = a[start:stop + 2 * edge], b[start:stop + 2 * edge]
        mu_x, mu_y = filt(x), filt(y)
        var_x, var_y, cov = filt(x * x) - mu_x**2, filt(y * y) - mu_y**2, filt(x * y) - mu_x * mu_y
        total += float(np.sum(((2 * mu_x * mu_y + c1) * (2 * cov + c2))
                              / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))))
    return total / (rows * cols)
