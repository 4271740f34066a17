"""What every image op shares: the image type, the BT.601 luma weights, the input check and the exact
8-bit rounding (docs/degradation.md)."""

from __future__ import annotations

import cv2
import numpy as np
from numpy.typing import NDArray

from degrade.errors import DegradeError

Image = NDArray[np.float32]

# Luma weights (ITU-R BT.601), used by the gray noise variants.
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def check_image(img: NDArray) -> None:
    """An op's input: a non-empty (H, W, 3) float32 array, else DegradeError."""
    if not isinstance(img, np.ndarray):
        raise DegradeError(f"expected an (H, W, 3) float32 image, got a {type(img).__name__}")
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.float32 or img.size == 0:
        raise DegradeError(f"expected a non-empty (H, W, 3) float32 image, got shape {img.shape} dtype {img.dtype}")


def check_rng(rng: object) -> None:
    """A drawing op's `rng`: a numpy.random.Generator (np.random.default_rng(seed)), else DegradeError."""
    if not isinstance(rng, np.random.Generator):
        raise DegradeError(f"rng must be a numpy.random.Generator (np.random.default_rng(seed)), got "
                           f"{type(rng).__name__}")


def quantise_8bit(x: NDArray[np.float32]) -> NDArray[np.uint8]:
    """round(clip(x, 0, 1) * 255) as uint8, ties to even: one OpenCV pass (saturating, cvRound)."""
    if x.ndim == 3 and x.shape[2] == 3:  # negatives to 0 first: the abs is then the identity
        return cv2.convertScaleAbs(cv2.threshold(x, 0.0, 0.0, cv2.THRESH_TOZERO)[1], alpha=255.0)
    y = np.multiply(x, np.float32(255))  # float32 temporaries, rounded in place
    np.clip(y, 0.0, 255.0, out=y)
    return np.rint(y, out=y).astype(np.uint8)
