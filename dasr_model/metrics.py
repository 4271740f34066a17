"""Evaluation metrics (PSNR and SSIM on BT.601 Y with a 4-px crop, RGB PSNR), on 8-bit-rounded images
as the DASR release's scripts compute them."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def _to_255(img: np.ndarray) -> np.ndarray:
    """(H, W, 3) float in [0, 1] -> float64 on 8-bit levels."""
    return np.round(np.clip(img, 0, 1) * 255).astype(np.float64)


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
    return psnr(_crop(y_channel(sr), crop), _crop(y_channel(hr), crop))


def psnr_rgb(sr: np.ndarray, hr: np.ndarray, crop: int = 4) -> float:
    return psnr(_crop(_to_255(sr), crop), _crop(_to_255(hr), crop))


def ssim_y(sr: np.ndarray, hr: np.ndarray, crop: int = 4) -> float:
    """SSIM on Y (Wang et al. 2004): Gaussian window 11, sigma 1.5, valid region, C1/C2 for range 255."""
    a, b = _crop(y_channel(sr), crop), _crop(y_channel(hr), crop)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2

    def filt(x):
        return ndimage.gaussian_filter(x, 1.5, truncate=3.5, mode="constant")[5:-5, 5:-5]

    mu_a, mu_b = filt(a), filt(b)
    var_a, var_b, cov = filt(a * a) - mu_a**2, filt(b * b) - mu_b**2, filt(a * b) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(ssim_map.mean())
