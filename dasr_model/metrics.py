"""Evaluation metrics (PSNR and SSIM on BT.601 Y with a 4-px crop, RGB PSNR), on 8-bit-rounded images
as the DASR release's scripts compute them. Images are (H, W, 3) float arrays in [0, 1]; an SR image and
its HR have one shape; anything else is a DASRError."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from dasr_model.errors import DASRError

SSIM_WINDOW = 11  # the Gaussian window's side: SSIM's valid region needs at least this much after the crop


def _to_255(img: np.ndarray) -> np.ndarray:
    """(H, W, 3) float in [0, 1] -> float64 on 8-bit levels."""
    if not isinstance(img, np.ndarray) or img.ndim != 3 or img.shape[2] != 3:
        raise DASRError(f"an image must be an (H, W, 3) array, got shape {getattr(img, 'shape', None)}")
    if not np.issubdtype(img.dtype, np.floating):  # a uint8 image clipped to [0, 1] is black and white
        raise DASRError(f"an image must be float in [0, 1], got {img.dtype} (divide 8-bit images by 255)")
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


def y_channel(img: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma in the 16-235 range from RGB in [0, 1], after 8-bit rounding."""
    x = _to_255(img)
    return 16 + (65.481 * x[..., 0] + 128.553 * x[..., 1] + 24.966 * x[..., 2]) / 255


def _crop(x: np.ndarray, c: int) -> np.ndarray:
    return x[c:-c, c:-c] if c else x


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def psnr_y(sr: np.ndarray, hr: np.ndarray, crop: int = 4) -> float:
    _pair(sr, hr, crop)
    return psnr(_crop(y_channel(sr), crop), _crop(y_channel(hr), crop))


def psnr_rgb(sr: np.ndarray, hr: np.ndarray, crop: int = 4) -> float:
    _pair(sr, hr, crop)
    return psnr(_crop(_to_255(sr), crop), _crop(_to_255(hr), crop))


def ssim_y(sr: np.ndarray, hr: np.ndarray, crop: int = 4) -> float:
    """SSIM on Y (Wang et al. 2004): Gaussian window 11, sigma 1.5, valid region, C1/C2 for range 255."""
    _pair(sr, hr, crop, SSIM_WINDOW)
    a, b = _crop(y_channel(sr), crop), _crop(y_channel(hr), crop)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2

    def filt(x):
        return ndimage.gaussian_filter(x, 1.5, truncate=3.5, mode="constant")[5:-5, 5:-5]

    mu_a, mu_b = filt(a), filt(b)
    var_a, var_b, cov = filt(a * a) - mu_a**2, filt(b * b) - mu_b**2, filt(a * b) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(ssim_map.mean())
