"""The 33-value degradation vector v, layout "dasr33-v1" (spec section 7), defined once.

:data:`VECTOR_FIELDS` is the declarative table; :func:`encode`, :func:`decode`, the docs table
(:func:`markdown_table`) and recipe checks (:func:`check_recipe`) all derive from it.

Every entry lies in [0, 1]. A scalar maps its physical value x linearly, v = (x - lo) / (hi - lo);
a step that did not happen is encoded by its identity value (no blur: size 1, sigma 0; no resize:
scale 1; no noise: strength 0; no JPEG: quality 100; no sinc: size 1, omega_c = pi). One-hot groups
and flags of an absent step are all zero.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

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
from degrade.recipe import FINAL_ORDERS, NOISE_TYPES, RESIZE_MODES, LevelRecipe, StageRecipe

VECTOR_LAYOUT = "dasr33-v1"
PI = math.pi


@dataclass(frozen=True)
class VectorField:
    """One named field of v: a scalar, a 0/1 flag, or a one-hot group of `len(choices)` entries.

    Scalars map the physical value x in [lo, hi] to [0, 1]; `ranges` overrides (lo, hi) per value of
    the step's `type` (noise strength is a Gaussian sigma or a Poisson scale). `absent` is the
    physical identity value encoded when the step did not happen.
    """

    name: str
    index: int
    kind: Literal["scalar", "flag", "onehot"]
    meaning: str
    lo: float = 0.0
    hi: float = 1.0
    absent: float = 0.0
    unit: str = ""
    choices: tuple[str, ...] = ()
    ranges: tuple[tuple[str, float, float], ...] = ()
    always: bool = False  # set in every record (never absent)

    @property
    def width(self) -> int:
        return len(self.choices) if self.kind == "onehot" else 1

    @property
    def step(self) -> str:
        return self.name.split(".")[0]

    @property
    def attr(self) -> str:
        return self.name.split(".")[1]

    @property
    def slice(self) -> slice:
        return slice(self.index, self.index + self.width)

    def range_for(self, step_type: str | None = None) -> tuple[float, float]:
        for key, lo, hi in self.ranges:
            if key == step_type:
                return lo, hi
        return self.lo, self.hi

    def normalise(self, x: float, step_type: str | None = None) -> float:
        lo, hi = self.range_for(step_type)
        return (x - lo) / (hi - lo)

    def physical(self, v: float, step_type: str | None = None) -> float:
        lo, hi = self.range_for(step_type)
        return lo + v * (hi - lo)


def _blur_fields(step: str, first: int, which: str) -> list[VectorField]:
    return [
        VectorField(f"{step}.size", first, "scalar", f"{which} blur kernel size k", 1, 21, 1, "px"),
        VectorField(f"{step}.sigma_x", first + 1, "scalar", f"{which} blur sigma_x (major)", 0, 3, 0, "px"),
        VectorField(f"{step}.sigma_y", first + 2, "scalar", f"{which} blur sigma_y (minor)", 0, 3, 0, "px"),
        VectorField(f"{step}.theta", first + 3, "scalar", f"{which} blur rotation theta", 0, PI, 0, "rad"),
    ]


def _resize_fields(step: str, first: int, which: str) -> list[VectorField]:
    return [
        VectorField(f"{step}.scale", first, "scalar", f"{which} resize scale s", 0.15, 1.5, 1.0, "x"),
        VectorField(f"{step}.mode", first + 1, "onehot", f"{which} resize mode", choices=RESIZE_MODES),
    ]


def _noise_fields(step: str, first: int, which: str) -> list[VectorField]:
    return [
        VectorField(
            f"{step}.strength", first, "scalar", f"{which} noise strength (Gaussian sigma or Poisson scale)",
            0, 30, 0, ranges=(("gaussian", 0.0, 30.0), ("poisson", 0.0, 3.0)),
        ),
        VectorField(f"{step}.gray", first + 1, "flag", f"{which} gray (luma-only) noise flag"),
        VectorField(f"{step}.type", first + 2, "onehot", f"{which} noise type", choices=NOISE_TYPES),
    ]


VECTOR_FIELDS: tuple[VectorField, ...] = (
    *_blur_fields("blur1", 0, "stage-1"),
    *_blur_fields("blur2", 4, "stage-2"),
    VectorField("sinc.size", 8, "scalar", "final sinc kernel size k", 1, 21, 1, "px"),
    VectorField("sinc.omega_c", 9, "scalar", "final sinc cut-off omega_c", PI / 3, PI, PI, "rad"),
    *_resize_fields("resize1", 10, "stage-1"),
    *_resize_fields("resize2", 14, "stage-2"),
    *_noise_fields("noise1", 18, "stage-1"),
    *_noise_fields("noise2", 22, "stage-2"),
    VectorField("jpeg1.quality", 26, "scalar", "stage-1 JPEG quality q", 30, 100, 100),
    VectorField("jpeg2.quality", 27, "scalar", "stage-2 JPEG quality q (level 3, final block)", 30, 100, 100),
    VectorField("final.order", 28, "onehot", "final-block order (A: resize-sinc-JPEG, B: JPEG-resize-sinc)",
                choices=FINAL_ORDERS),
    VectorField("final.mode", 30, "onehot", "final resize mode", choices=RESIZE_MODES, always=True),
)
VECTOR_LENGTH = sum(f.width for f in VECTOR_FIELDS)
FIELDS_BY_NAME: dict[str, VectorField] = {f.name: f for f in VECTOR_FIELDS}

assert VECTOR_LENGTH == 33 and all(  # the table is contiguous and in order
    a.index + a.width == b.index for a, b in zip(VECTOR_FIELDS, VECTOR_FIELDS[1:])
)

# Slack for values that are in range up to float rounding (e.g. a sum of draws).
_RANGE_SLACK = 1e-9


def encode(params: DegradationParams) -> NDArray[np.float32]:
    """Record -> v, a (33,) float32 vector in [0, 1] (layout "dasr33-v1").

    A value outside its field's normalisation range raises ValueError rather than being clipped.
    """
    v = np.zeros(VECTOR_LENGTH, dtype=np.float64)
    for f in VECTOR_FIELDS:
        step = getattr(params, f.step)
        value = None if step is None else getattr(step, f.attr)
        if f.kind == "onehot":
            if value is not None:
                if value not in f.choices:
                    raise ValueError(f"{f.name}: {value!r} is not one of {f.choices}")
                v[f.index + f.choices.index(value)] = 1.0
        elif f.kind == "flag":
            v[f.index] = 1.0 if value else 0.0
        else:
            step_type = getattr(step, "type", None)
            x = f.absent if value is None else float(value)
            lo, hi = f.range_for(step_type)
            if not lo - _RANGE_SLACK <= x <= hi + _RANGE_SLACK:
                raise ValueError(
                    f"{f.name} = {x:g} is outside the {VECTOR_LAYOUT} range [{lo:g}, {hi:g}]; "
                    "it cannot be encoded without clipping"
                )
            v[f.index] = f.normalise(x, step_type)
    return np.clip(v, 0.0, 1.0).astype(np.float32)


def _odd_size(x: float) -> int:
    """Nearest odd integer to x (ties go up), clamped to [1, 21]."""
    return min(21, max(1, 2 * math.floor((x - 1) / 2 + 0.5) + 1))


def check_vector(v: ArrayLike) -> NDArray[np.float64]:
    """Return v as float64 if it is a finite (33,) vector in [0, 1]; otherwise raise ValueError."""
    arr = np.asarray(v, dtype=np.float64)
    if arr.shape != (VECTOR_LENGTH,):
        raise ValueError(f"a {VECTOR_LAYOUT} vector has {VECTOR_LENGTH} values, got {arr.size}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("the vector contains NaN or infinite values")
    bad = np.flatnonzero((arr < 0) | (arr > 1))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"vector entry {i} ({field_at(i).name}) = {arr[i]:g} is outside [0, 1]")
    return arr


def field_at(index: int) -> VectorField:
    for f in VECTOR_FIELDS:
        if f.index <= index < f.index + f.width:
            return f
    raise IndexError(index)


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
    if not 0 <= noise_seed < SEED_LIMIT:
        raise ValueError(f"noise_seed must be in [0, 2**53), got {noise_seed}")

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


@lru_cache(maxsize=64)
def check_recipe(recipe: LevelRecipe) -> None:
    """Refuse a recipe whose ranges exceed the layout's normalisation ranges (spec section 7)."""

    def need(name: str, values: Sequence[float], step_type: str | None = None) -> None:
        lo, hi = FIELDS_BY_NAME[name].range_for(step_type)
        for x in values:
            if not lo <= x <= hi:
                raise ValueError(
                    f"level {recipe.level} recipe: {name} value {x:g} exceeds the {VECTOR_LAYOUT} "
                    f"range [{lo:g}, {hi:g}]"
                )

    stages: list[tuple[str, StageRecipe]] = [("1", recipe.stage1)]
    if recipe.stage2 is not None:
        stages.append(("2", recipe.stage2))
    for n, st in stages:
        need(f"blur{n}.size", st.kernel_sizes)
        need(f"blur{n}.sigma_x", st.blur_sigma_range)
        need(f"resize{n}.scale", st.resize_range)
        need(f"noise{n}.strength", st.gaussian_sigma_range, "gaussian")
        need(f"noise{n}.strength", st.poisson_scale_range, "poisson")
        if st.jpeg_range is not None:
            need("jpeg1.quality", st.jpeg_range)
    if recipe.final is not None:
        need("sinc.size", recipe.final.sinc_sizes)
        need("sinc.omega_c", recipe.final.omega_c_range)
        need("jpeg2.quality", recipe.final.jpeg_range)


def _fmt(x: float) -> str:
    for num, text in ((1, "pi"), (1 / 3, "pi/3"), (2 / 3, "2pi/3")):
        if math.isclose(x, num * PI):
            return text
    return f"{x:g}"


def _encoding_text(f: VectorField) -> str:
    if f.kind == "flag":
        return "0 / 1; 0 when absent"
    if f.kind == "onehot":
        return f"one-hot ({', '.join(f.choices)}); " + ("always set" if f.always else "all 0 when absent")
    x = f.attr

    def formula(lo: float, hi: float) -> str:
        span = _fmt(hi - lo)
        span = f"({span})" if "/" in span else span
        return f"{x} / {span}" if lo == 0 else f"({x} - {_fmt(lo)}) / {span}"

    if f.ranges:
        text = ", ".join(f"{formula(lo, hi)} ({key})" for key, lo, hi in f.ranges)
    else:
        text = formula(f.lo, f.hi)
    return f"{text}; {f.normalise(f.absent):.4g} when absent ({x} = {_fmt(f.absent)})"


def markdown_table() -> str:
    """The vector layout as a Markdown table (embedded in docs/degradation.md; a test keeps it in sync)."""
    lines = ["| index | field name | meaning | encoding |", "|---|---|---|---|"]
    for f in VECTOR_FIELDS:
        index = str(f.index) if f.width == 1 else f"{f.index}-{f.index + f.width - 1}"
        lines.append(f"| {index} | `{f.name}` | {f.meaning} | {_encoding_text(f)} |")
    return "\n".join(lines) + "\n"
