"""Apply a record to an HR image: the deterministic half of "sample, then apply" (docs/degradation.md)."""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray

from degrade import ops
from degrade.errors import DegradeError
from degrade.params import DegradationParams, NoiseParams
from degrade.recipe import MIN_HR_SIDE, SCALE


def _noise(img: ops.Image, noise: NoiseParams | None) -> ops.Image:
    if noise is None:
        return img
    rng = np.random.default_rng(noise.seed)
    if noise.type == "gaussian":
        img = ops.add_gaussian_noise(img, noise.strength, gray=noise.gray, rng=rng)
    else:
        img = ops.add_poisson_noise(img, noise.strength, gray=noise.gray, rng=rng)
    return np.clip(img, 0.0, 1.0, out=img)  # = ops.clamp, in place: the noisy image is a new array


MAX_GROWTH, MIN_WORK_CAP = 4, 1 << 24  # resize1 may make at most max(4 x the input's pixels, 16.8 MP)


def _range_hint(low: float, high: float) -> str:
    """The likely cause of HR values from `low` to `high` (outside [0, 1]) and its fix, on one line; "" where
    none fits (NaN, inf, an offset range). A full scale is named only where the values start near 0 (low >=
    -0.25 x high, a resize's undershoot: OpenCV's Lanczos on a 1-px line reaches -18 %; -0.1 x high at most
    10, where normalised data lies): 255 up to 300 (a resize's overshoot), 1023 or 4095 up to 1.2x
    each, 16383 up to itself, 65535 past it (a 12-bit image told to divide by 65535 passed, 16x dark). Values
    well below 0, within +-10, are normalised data (ImageNet's mean/std: about -2.1 to 2.6; [-1, 1]), once told
    to divide by 255."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return ""
    if 1.5 < high <= 70000 and low >= -(0.25 if high > 10 else 0.1) * high:
        if high <= 300:
            return "an 8-bit image: divide by 255, or pass it as uint8"
        if high > 16383:
            return "a 16-bit image: divide by 65535"
        bits = next(b for b in (10, 12, 14) if high <= (1 << b) * 1.2 or b == 14)
        others = ", ".join(f"{b} bits: {(1 << b) - 1}" for b in (10, 12, 14, 16) if b != bits)
        return f"likely a {bits}-bit image: divide by its full scale, {(1 << bits) - 1} ({others})"
    if low > -0.5 and high <= 1.5:
        return "a resize's overshoot: np.clip(hr, 0, 1)"
    if -10 <= low < 0 < high <= 10 and low < -0.1 * high:
        return "normalised data, as by mean/std: undo it, values must be in [0, 1]"
    return ""


def check_work(hr: object, params: DegradationParams) -> None:
    """Refuse (DegradeError) an HR input that degrade.apply cannot take, or a record whose work is out
    of proportion to the image: stage 1's resize may make at most max(MAX_GROWTH x the input's pixels,
    MIN_WORK_CAP) pixels (recipes reach 2.25x). Every other step works on at most that many pixels with
    kernels of at most MAX_KERNEL_SIZE taps a side, so time and memory stay proportional to the input. A
    JPEG step must encode at most ops.JPEG_MAX_SIDE px a side.
    """
    if not isinstance(hr, np.ndarray) or hr.ndim != 3 or hr.shape[2] != 3:
        raise DegradeError(f"HR image must be an (H, W, 3) array, got shape {getattr(hr, 'shape', None)}")
    if hr.dtype != np.float32:
        raise DegradeError(f"HR image must be float32 in [0, 1], got {hr.dtype}")
    h, w = hr.shape[:2]
    low, high = (float(hr.min()), float(hr.max())) if hr.size else (0.0, 0.0)
    if not (low >= 0 and high <= 1):  # NaN fails both; 0-255 floats (no / 255) fail the second
        if math.isnan(low) or math.isnan(high):  # min and max are NaN for one NaN anywhere
            raise DegradeError(f"HR image must be float32 in [0, 1], got {int(np.isnan(hr).sum())} NaN value(s)")
        hint = _range_hint(low, high)
        raise DegradeError(f"HR image must be float32 in [0, 1], got values from {low:.9g} to {high:.9g}"
                           + (f" ({hint})" if hint else ""))
    if h % SCALE or w % SCALE:
        raise DegradeError(f"HR size {w}x{h} is not a multiple of {SCALE}; crop it first")
    if min(h, w) < MIN_HR_SIDE:
        raise DegradeError(f"HR size {w}x{h} is too small: both sides must be >= {MIN_HR_SIDE}")
    if not isinstance(params, DegradationParams):
        raise DegradeError(f"params must be a DegradationParams, got {type(params).__name__}")
    if params.resize1 is not None:
        s = params.resize1.scale
        made = max(1, round(h * s)) * max(1, round(w * s))
        cap = max(MAX_GROWTH * h * w, MIN_WORK_CAP)
        if made > cap:
            raise DegradeError(f"resize1 x{s:g} would turn the {w}x{h} image into {made / 1e6:.1f} MP, more than "
                               f"{cap / 1e6:.1f} MP (max({MAX_GROWTH} x the input, {MIN_WORK_CAP / 1e6:.1f} MP))")
    encoded = []  # the sizes JPEG steps encode: libjpeg refuses a side above 65,500 px, after all the work before
    if params.jpeg1 is not None:
        encoded.append(ops.scaled_size((h, w), params.resize1.scale) if params.resize1 is not None else (h, w))
    if params.jpeg2 is not None and params.resize2 is not None:
        target = (h // SCALE, w // SCALE)
        encoded.append(target if params.final.order == "A" else ops.scaled_size(target, params.resize2.scale))
    for eh, ew in encoded:
        if max(eh, ew) > ops.JPEG_MAX_SIDE:
            raise DegradeError(f"a JPEG step would encode the {w}x{h} image at {ew}x{eh} px: a JPEG side can be at "
                               f"most {ops.JPEG_MAX_SIDE} px (libjpeg's limit); crop the image first")


def apply(hr: NDArray[np.float32] | NDArray[np.uint8], params: DegradationParams) -> NDArray[np.float32]:
    """Degrade `hr` (H, W, 3) float32 in [0, 1], H and W multiples of 4, as `params` says. A uint8 image
    (as a dataset's `Sample.hr`) is converted first: x / 255, exact.

    Returns the LR image (H/4, W/4, 3) float32 in [0, 1], rounded to 8-bit levels. Deterministic:
    the record alone (noise seeds included) reproduces the output. `hr` is not modified.
    """
    if isinstance(hr, np.ndarray) and hr.dtype == np.uint8:
        hr = hr.astype(np.float32) / np.float32(255)
    check_work(hr, params)  # DegradeError for a bad input or a record out of proportion to the image
    h, w = hr.shape[:2]
    target = (h // SCALE, w // SCALE)

    x = hr
    if params.blur1 is not None:
        x = ops.blur(x, params.blur1.kernel())
    if params.resize1 is not None:
        x = ops.resize(x, ops.scaled_size(x.shape, params.resize1.scale), mode=params.resize1.mode)
    x = _noise(x, params.noise1)
    if params.jpeg1 is not None:
        x = ops.jpeg(x, params.jpeg1.quality)  # clamps before encoding

    if not params.two_stage:
        x = ops.resize(x, target, mode=params.final.mode)
        return ops.quantise(x)

    # Stage 2 (level 3): blur -> resize to round(P/4 * s2) -> noise.
    if params.blur2 is not None:
        x = ops.blur(x, params.blur2.kernel())
    assert params.resize2 is not None  # guaranteed by DegradationParams validation
    x = ops.resize(x, ops.scaled_size(target, params.resize2.scale), mode=params.resize2.mode)
    x = _noise(x, params.noise2)

    def sinc(img: ops.Image) -> ops.Image:
        return img if params.sinc is None else ops.blur(img, params.sinc.kernel())

    def jpeg2(img: ops.Image) -> ops.Image:
        return img if params.jpeg2 is None else ops.jpeg(img, params.jpeg2.quality)

    if params.final.order == "A":  # resize -> sinc -> JPEG
        x = jpeg2(sinc(ops.resize(x, target, mode=params.final.mode)))
    else:  # "B": JPEG -> resize -> sinc
        x = sinc(ops.resize(jpeg2(x), target, mode=params.final.mode))
    return ops.quantise(x)
