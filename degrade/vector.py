"""The codec of the 33-value degradation vector v: a record -> v (:func:`encode`) and v -> a record
(:func:`decode`). The layout itself, "dasr33-v1", is declared once in :mod:`degrade.layout`.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
from numpy.typing import ArrayLike, NDArray

from degrade.errors import DegradeError
from degrade.layout import (  # noqa: F401 - re-exported: degrade.vector was their home
    FIELDS_BY_NAME,
    PI,
    VECTOR_FIELDS,
    VECTOR_LAYOUT,
    VECTOR_LENGTH,
    VectorField,
    check_recipe,
    field_at,
    markdown_table,
)
from degrade.params import (
    SEED_LIMIT,
    BlurParams,
    DegradationParams,
    FinalParams,
    JpegParams,
    NoiseParams,
    ResizeParams,
    SincParams,
)

# Slack for values that are in range up to float rounding (e.g. a sum of draws).
_RANGE_SLACK = 1e-9


def encode(params: DegradationParams) -> NDArray[np.float32]:
    """Record -> v, a (33,) float32 vector in [0, 1] (layout "dasr33-v1").

    A value outside its field's normalisation range raises DegradeError (a ValueError) rather than being
    clipped; so does anything but a DegradationParams.
    """
    if not isinstance(params, DegradationParams):
        raise DegradeError(f"encode takes a DegradationParams, not {type(params).__name__}")
    v = np.zeros(VECTOR_LENGTH, dtype=np.float64)
    for f in VECTOR_FIELDS:
        step = getattr(params, f.step)
        value = None if step is None else getattr(step, f.attr)
        if f.kind == "onehot":
            if value is not None:
                if value not in f.choices:
                    raise DegradeError(f"{f.name}: {value!r} is not one of {f.choices}")
                v[f.index + f.choices.index(value)] = 1.0
        elif f.kind == "flag":
            v[f.index] = 1.0 if value else 0.0
        else:
            step_type = getattr(step, "type", None)
            x = f.absent if value is None else float(value)
            lo, hi = f.range_for(step_type)
            if not lo - _RANGE_SLACK <= x <= hi + _RANGE_SLACK:
                raise DegradeError(
                    f"{f.name} = {x:g} is outside the {VECTOR_LAYOUT} range [{lo:g}, {hi:g}]; "
                    "it cannot be encoded without clipping"
                )
            v[f.index] = f.normalise(x, step_type)
    return np.clip(v, 0.0, 1.0).astype(np.float32)


def _odd_size(x: float) -> int:
    """Nearest odd integer to x (ties go up), clamped to [1, 21]."""
    return min(21, max(1, 2 * math.floor((x - 1) / 2 + 0.5) + 1))


def real_array(v: ArrayLike, refusal: str, *, copy: bool = False) -> NDArray[np.float64]:
    """v as float64 (a copy with `copy`) if it holds real numbers; strings ("0.5", which numpy would
    convert), complex numbers (their imaginary part dropped with a warning) and objects: DegradeError."""
    try:
        raw = np.asarray(v)
        if raw.dtype.kind == "O" and not all(isinstance(x, numbers.Real) for x in raw.ravel()):
            raise TypeError  # an object array of real numbers (Fractions, say) converts, as before
        if raw.dtype.kind not in "biufO":
            raise TypeError
        return np.array(raw, dtype=np.float64, copy=copy or None)
    except (TypeError, ValueError):
        raise DegradeError(refusal) from None


def check_vector(v: ArrayLike) -> NDArray[np.float64]:
    """Return v as float64 if it is a finite (33,) vector in [0, 1]; otherwise raise DegradeError."""
    arr = real_array(v, f"a {VECTOR_LAYOUT} vector is {VECTOR_LENGTH} numbers")
    if arr.shape != (VECTOR_LENGTH,):
        raise DegradeError(f"a {VECTOR_LAYOUT} vector is {VECTOR_LENGTH} values in one dimension, got shape "
                           f"{arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise DegradeError("the vector contains NaN or infinite values")
    bad = np.flatnonzero((arr < 0) | (arr > 1))
    if bad.size:
        i = int(bad[0])
        raise DegradeError(f"vector entry {i} ({field_at(i).name}) = {arr[i]:g} is outside [0, 1]")
    return arr


def decode(v: ArrayLike, noise_seed: int = 0) -> DegradationParams:
    """v -> a record that :func:`degrade.apply` accepts, so a vector alone can be replayed.

    Rules (also in docs/degradation.md): a one-hot group counts as set when its entries sum to
    >= 0.5 and picks its largest entry; the pipeline is two-stage iff `final.order` is set, and
    stage-2 fields of a one-stage vector are ignored. Kernel sizes round to the nearest odd size; a
    blur or sinc of size 1 or a blur with zero sigma is absent; noise is absent when its type is
    unset or its strength is 0; JPEG quality rounds to an integer and 100 means absent; resize1 is
    absent when its mode is unset. Noise seeds are `noise_seed` (stage 1) and `noise_seed + 1`.
    The level is not in v, so the record's level is None.
    """
    arr = check_vector(v)
    if isinstance(noise_seed, (bool, np.bool_)) or not isinstance(noise_seed, (int, np.integer)) \
            or not 0 <= noise_seed < SEED_LIMIT:
        raise DegradeError(f"noise_seed must be an integer in [0, 2**53), got {noise_seed!r}")

    def value(name: str, step_type: str | None = None) -> float:
        f = FIELDS_BY_NAME[name]
        return f.physical(float(arr[f.index]), step_type)

    def choice(name: str, required: bool = False):
        f = FIELDS_BY_NAME[name]
        group = arr[f.slice]
        if not required and group.sum() < 0.5:
            return None
        return f.choices[int(np.argmax(group))]

    def blur(step: str) -> BlurParams | None:
        size = _odd_size(value(f"{step}.size"))
        sx, sy = value(f"{step}.sigma_x"), value(f"{step}.sigma_y")
        if size < 3 or max(sx, sy) <= 0:
            return None
        # A zero minor sigma is a line kernel; keep it finite (1e-3 px is a delta across the line).
        return BlurParams.canonical(
            size=size, sigma_x=max(sx, 1e-3), sigma_y=max(sy, 1e-3), theta=value(f"{step}.theta")
        )

    def noise(step: str, seed: int) -> NoiseParams | None:
        noise_type = choice(f"{step}.type")
        if noise_type is None:
            return None
        strength = value(f"{step}.strength", noise_type)
        if strength <= 0:
            return None
        gray = bool(arr[FIELDS_BY_NAME[f"{step}.gray"].index] >= 0.5)
        return NoiseParams(type=noise_type, strength=strength, gray=gray, seed=seed)

    def jpeg(step: str) -> JpegParams | None:
        quality = round(value(f"{step}.quality"))
        return None if quality >= 100 else JpegParams(quality=quality)

    mode1 = choice("resize1.mode")
    resize1 = None if mode1 is None else ResizeParams(scale=value("resize1.scale"), mode=mode1)
    order = choice("final.order")
    final = FinalParams(order=order, mode=choice("final.mode", required=FIELDS_BY_NAME["final.mode"].always))
    common = dict(
        level=None, blur1=blur("blur1"), resize1=resize1, noise1=noise("noise1", noise_seed),
        jpeg1=jpeg("jpeg1"), final=final,
    )
    if order is None:
        return DegradationParams(**common)
    sinc_size = _odd_size(value("sinc.size"))
    sinc = None if sinc_size < 3 else SincParams(size=sinc_size, omega_c=value("sinc.omega_c"))
    return DegradationParams(
        **common,
        blur2=blur("blur2"),
        resize2=ResizeParams(scale=value("resize2.scale"), mode=choice("resize2.mode", required=True)),
        noise2=noise("noise2", (noise_seed + 1) % SEED_LIMIT),
        sinc=sinc,
        jpeg2=jpeg("jpeg2"),
    )
