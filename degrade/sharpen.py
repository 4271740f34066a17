"""DASR's unsharp mask of the HR (ground-truth sharpening), on numpy images.

The trainer sharpens its target with it (dasr_model.data.unsharp_mask, the same formula in torch);
`make-dataset --sharpen-hr` degrades the sharpened HR, the DASR release's pairing, which trained
better in our measurements (docs/training.md). Formula: Gaussian blur of size 51, sigma 8, reflect
padding without repeating the edge; residual R = I - blur(I); mask M = |R| * 255 > 10, softened by
the same blur; K = clip(I + 0.5 R, 0, 1); result = M_soft K + (1 - M_soft) I.
"""

from __future__ import annotations

import cv2
import numpy as np
from numpy.typing import NDArray

from degrade.errors import DegradeError

USM_SIZE, USM_SIGMA, USM_WEIGHT, USM_THRESHOLD = 51, 8.0, 0.5, 10.0


def _gaussian_blur(img: NDArray[np.float32]) -> NDArray[np.float32]:
    x = np.arange(USM_SIZE, dtype=np.float64) - (USM_SIZE - 1) / 2
    k = np.exp(-0.5 * (x / USM_SIGMA) ** 2)
    k = (k / k.sum()).astype(np.float32)
    return cv2.sepFilter2D(img, -1, k, k, borderType=cv2.BORDER_REFLECT_101)


def unsharp_mask(img: NDArray[np.float32]) -> NDArray[np.float32]:
    """img (H, W, 3) float32 in [0, 1], both sides > 25 px -> the sharpened image, same shape and dtype.
    The input is not modified. Anything else raises DegradeError (a uint8 patch: pass
    ``hr.astype(np.float32) / 255``; ``hr / 255`` is float64), values outside [0, 1] or NaN included."""
    if (not isinstance(img, np.ndarray) or img.dtype != np.float32 or img.ndim != 3 or img.shape[2] != 3
            or min(img.shape[:2]) <= USM_SIZE // 2):
        got = f"{img.dtype} {img.shape}" if isinstance(img, np.ndarray) else type(img).__name__
        raise DegradeError(f"unsharp_mask takes an (H, W, 3) float32 image with sides > {USM_SIZE // 2}, got {got}")
    low, high = float(img.min()), float(img.max())
    if not (low >= 0 and high <= 1):  # NaN fails both
        raise DegradeError(f"unsharp_mask takes values in [0, 1], got {low:g} to {high:g}")
    residual = img - _gaussian_blur(img)
    soft = _gaussian_blur((np.abs(residual) * 255 > USM_THRESHOLD).astype(np.float32))
    sharp = np.clip(img + USM_WEIGHT * residual, 0, 1)
    return (soft * sharp + (1 - soft) * img).astype(np.float32)
