"""Blur kernels, exactly the formulas of docs/degradation.md.

Both return ``(size, size)`` float64 arrays that sum to 1, to be applied by correlation
(:func:`degrade.ops.blur`). Row index is y (down), column index is x (right).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from numpy.typing import NDArray

from degrade.errors import DegradeError

# The smallest Gaussian sigma computed: 1/sigma^2 stays finite (about 1e-154 is where it overflows), and such a
# kernel is already a delta (its neighbours' weights underflow to 0). The records' own bound is far above.
MIN_KERNEL_SIGMA = 1e-150
MAX_KERNEL_SIGMA = 1e6  # px: far beyond any kernel side (a 1e6-px Gaussian over 21 taps is a box)
MAX_KERNEL_SIDE = 1001  # the largest kernel side computed (8 MB of float64); records stop far below (51)


def _grid(size: int) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    if isinstance(size, (bool, np.bool_)) or not isinstance(size, (int, np.integer)) \
            or not 1 <= size <= MAX_KERNEL_SIDE or size % 2 == 0:
        raise DegradeError(f"kernel size must be an odd integer in [1, {MAX_KERNEL_SIDE}], got {size!r}")
    return _cached_grid(int(size))


def finite_number(name: str, value: float) -> float:
    """`value` as a finite float (DegradeError otherwise: a string, None, NaN, an infinity, an integer too
    large for a float)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise DegradeError(f"{name} must be a finite number, got {value!r}")
    try:
        x = float(value)
    except OverflowError:
        x = math.inf
    if not math.isfinite(x):
        raise DegradeError(f"{name} must be a finite number, got {value!r:.40}")
    return x


@lru_cache(maxsize=32)
def _cached_grid(size: int) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """(x, y) offsets of a size x size kernel, read-only (shared between calls)."""
    r = (size - 1) / 2
    axis = np.arange(-r, r + 1, dtype=np.float64)
    x, y = np.meshgrid(axis, axis)  # x: column offset, y: row offset
    x.flags.writeable = y.flags.writeable = False
    return x, y


def gaussian_kernel(size: int, sigma_x: float, sigma_y: float, theta: float) -> NDArray[np.float64]:
    """Anisotropic Gaussian: K(x, y) ~ exp(-1/2 [x y] S^-1 [x y]^T), S = R diag(sx^2, sy^2) R^T.

    R is the rotation by `theta` (radians), so `sigma_x` lies along the direction at angle theta
    from the x axis (towards +y, i.e. downwards in image rows). Sigmas are in pixels and must be > 0.
    """
    sigma_x, sigma_y, theta = (finite_number(name, x) for name, x in
                               (("sigma_x", sigma_x), ("sigma_y", sigma_y), ("theta", theta)))
    if not (sigma_x >= MIN_KERNEL_SIGMA and sigma_y >= MIN_KERNEL_SIGMA):  # below, 1/sigma^2 overflows to inf
        raise DegradeError(f"Gaussian sigmas must be >= {MIN_KERNEL_SIGMA:g}, got {sigma_x}, {sigma_y}")
    if max(sigma_x, sigma_y) > MAX_KERNEL_SIGMA:  # sigma^2 overflowed (OverflowError) from about 1.3e154
        raise DegradeError(f"Gaussian sigmas must be <= {MAX_KERNEL_SIGMA:g}, got {sigma_x}, {sigma_y}")
    x, y = _grid(size)
    c, s = math.cos(theta), math.sin(theta)
    # S^-1 = R diag(1/sx^2, 1/sy^2) R^T, written out to avoid a matrix inverse.
    a, b = 1.0 / sigma_x**2, 1.0 / sigma_y**2
    inv_xx = c * c * a + s * s * b
    inv_xy = c * s * (a - b)
    inv_yy = s * s * a + c * c * b
    k = np.exp(-0.5 * (inv_xx * x * x + 2.0 * inv_xy * x * y + inv_yy * y * y))
    return k / k.sum()


def sinc_kernel(size: int, omega_c: float) -> NDArray[np.float64]:
    """Circular low-pass: h(r) = omega_c J1(omega_c r) / (2 pi r), centre omega_c^2 / (4 pi).

    `omega_c` is the cut-off in radians per pixel, in (0, pi].
    """
    from scipy.special import j1  # here, not at the top: scipy.special is half of `import degrade` (0.12 s)

    omega_c = finite_number("omega_c", omega_c)
    if not 0 < omega_c <= math.pi:
        raise DegradeError(f"sinc cut-off omega_c must be in (0, pi], got {omega_c}")
    x, y = _grid(size)
    r = np.hypot(x, y)
    centre = r == 0
    r_safe = np.where(centre, 1.0, r)
    k = np.where(centre, omega_c**2 / (4 * math.pi), omega_c * j1(omega_c * r_safe) / (2 * math.pi * r_safe))
    total = k.sum()
    if not total > 0:  # omega_c so small that omega_c^2 underflowed: the kernel was all NaN
        raise DegradeError(f"sinc cut-off omega_c {omega_c:g} is too small to make a kernel")
    return k / total
