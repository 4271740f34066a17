"""Keep v true under the 8 flips and 90-degree rotations of an (LR, HR) pair.

Flipping or rotating a pair after degradation is the same as degrading the flipped / rotated HR
with transformed kernels. Every step of the space is invariant under these transforms except the
anisotropic Gaussian kernels, whose orientation moves (kernels: x is the column offset, y the row
offset, theta measured from +x towards +y):

- a mirror flip (columns or rows reversed) takes theta to -theta;
- ``np.rot90(., k)`` takes theta to theta + k pi/2 (the sign of the quarter turn does not matter,
  because theta is only defined modulo pi).

Isotropic kernels (sigma_x == sigma_y, theta 0), absent kernels (all 0) and the circular sinc do not
change, nor do resize, noise and JPEG entries (JPEG's 8x8 grid is not flip-invariant, but its label is
a quality, which is). Results stay canonical: theta / pi in [0, 1).
"""

from __future__ import annotations

import operator

import numpy as np
from numpy.typing import ArrayLike, NDArray

from degrade.errors import DegradeError
from degrade.vector import FIELDS_BY_NAME, VECTOR_LENGTH, real_array

# (theta, sigma_x, sigma_y) indices of each Gaussian kernel in v.
_KERNELS = tuple(
    (FIELDS_BY_NAME[f"{s}.theta"].index, FIELDS_BY_NAME[f"{s}.sigma_x"].index, FIELDS_BY_NAME[f"{s}.sigma_y"].index)
    for s in ("blur1", "blur2")
)


def _turn(flip_lr: object, flip_ud: object, rot90: object) -> tuple[bool, bool, int]:
    """The transform's arguments as both functions read them: each flip by its truth (None: no flip), the
    quarter turns an integer (a float such as 1.5 is refused: np.rot90 and the vector read it apart)."""
    try:
        if isinstance(rot90, (bool, np.bool_)):
            raise TypeError
        turns = operator.index(rot90)  # type: ignore[arg-type]
    except TypeError:
        raise DegradeError(f"rot90 must be an integer number of quarter turns, not {rot90!r}") from None
    return bool(flip_lr), bool(flip_ud), turns


def dihedral_image(img: NDArray, *, flip_lr: bool = False, flip_ud: bool = False, rot90: int = 0) -> NDArray:
    """The view of `img` (H, W, ...) with columns reversed (`flip_lr`), then rows (`flip_ud`), then
    ``np.rot90(., rot90)``: the transform :func:`dihedral_vector` describes."""
    flip_lr, flip_ud, rot90 = _turn(flip_lr, flip_ud, rot90)
    if flip_lr:
        img = img[:, ::-1]
    if flip_ud:
        img = img[::-1]
    return np.rot90(img, rot90)


def dihedral_vector(v: ArrayLike, *, flip_lr: bool = False, flip_ud: bool = False,
                    rot90: int = 0) -> NDArray[np.float32]:
    """v (..., 33) for a pair transformed as :func:`dihedral_image` says (same arguments).

    Returns a new float32 array; only the two blur `theta` entries of anisotropic kernels change.
    """
    flip_lr, flip_ud, rot90 = _turn(flip_lr, flip_ud, rot90)  # read as dihedral_image reads them
    arr = real_array(v, "v must be numbers", copy=True)  # a copy: the input is never modified
    if arr.shape[-1:] != (VECTOR_LENGTH,):
        raise DegradeError(f"v must have {VECTOR_LENGTH} values in its last axis, got shape {arr.shape}")
    if not np.isfinite(arr).all():  # NaN came back as NaN
        raise DegradeError("v must be finite numbers")
    sign = -1.0 if flip_lr != flip_ud else 1.0  # two mirrors make a half turn, which leaves theta alone
    shift = 0.5 * (rot90 % 2)  # theta / pi moves by k/2, modulo 1
    for theta, sx, sy in _KERNELS:
        t = np.mod(sign * arr[..., theta] + shift, 1.0)
        t = np.where(arr[..., sx] == arr[..., sy], 0.0, t)  # isotropic or absent: theta stays 0
        arr[..., theta] = t
    out = arr.astype(np.float32)
    for theta, _, _ in _KERNELS:  # float32 rounding can lift 0.99999999 to 1.0, which is theta = 0
        col = out[..., theta]
        col[col >= 1.0] = 0.0
    return out


__all__ = ["dihedral_image", "dihedral_vector"]
