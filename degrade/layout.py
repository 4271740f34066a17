"""The layout of the 33-value degradation vector v, "dasr33-v1", declared once: the field table, the
blocks, the recipe check and the docs table. It imports only the recipe (for the choice names), so
every other module can depend on it without a cycle; `degrade.vector` holds the codec.

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

from degrade.errors import DegradeError
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

def field_at(index: int) -> VectorField:
    for f in VECTOR_FIELDS:
        if f.index <= index < f.index + f.width:
            return f
    raise IndexError(index)


# The blocks of v, in order: [start, stop) spans of whole fields. Keys name them in metrics (predictor
# MAE per block); BLOCK_LABELS is how tables and charts title them.
BLOCKS: dict[str, tuple[int, int]] = {"kernel": (0, 10), "resize": (10, 18), "noise": (18, 26), "jpeg": (26, 33)}
BLOCK_LABELS: dict[str, str] = {"kernel": "kernel", "resize": "resize", "noise": "noise", "jpeg": "JPEG/final"}

assert [lo for lo, _ in BLOCKS.values()][1:] == [hi for _, hi in BLOCKS.values()][:-1]  # contiguous
assert {lo for lo, _ in BLOCKS.values()} <= {f.index for f in VECTOR_FIELDS} and max(
    hi for _, hi in BLOCKS.values()) == VECTOR_LENGTH  # every block starts at a field and they cover v


def block_of(index: int) -> str:
    """The key of the block holding entry `index` of v."""
    for name, (lo, hi) in BLOCKS.items():
        if lo <= index < hi:
            return name
    raise IndexError(index)


@lru_cache(maxsize=64)
def check_recipe(recipe: LevelRecipe) -> None:
    """Refuse a recipe whose ranges exceed the layout's normalisation ranges ."""

    def need(name: str, values: Sequence[float], step_type: str | None = None) -> None:
        lo, hi = FIELDS_BY_NAME[name].range_for(step_type)
        for x in values:
            if not lo <= x <= hi:
                raise DegradeError(
                    f"level {recipe.level} recipe: {name} value {x:g} exceeds the {VECTOR_LAYOUT} "
                    f"range [{lo:g}, {hi:g}]"
                )

    def refuse(what: str) -> None:
        raise DegradeError(f"level {recipe.level} recipe: {what}")

    def span(name: str, pair: Sequence[float]) -> None:  # a (low, high) range a draw is uniform in
        if len(pair) != 2 or not pair[0] <= pair[1]:
            refuse(f"{name} must be a (low, high) pair with low <= high, got {tuple(pair)}")

    def probabilities(name: str, values: Sequence[float]) -> None:
        if not all(0 <= p <= 1 for p in values):
            refuse(f"{name} must be probabilities in [0, 1], got {tuple(values)}")

    def sizes(name: str, values: Sequence[int]) -> None:  # kernel sizes a draw picks from: what records take
        if not values or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 3 and k % 2 for k in values):
            refuse(f"{name} must be odd integers >= 3 to pick from, got {tuple(values)}")

    def modes(name: str, values: Sequence[str]) -> None:
        if not values or not set(values) <= set(RESIZE_MODES):
            refuse(f"{name} must be resize modes to pick from ({', '.join(RESIZE_MODES)}), got {tuple(values)}")

    def quality(name: str, pair: Sequence[float]) -> None:  # a record's quality rounds to 1-99 (100: no JPEG)
        span(name, pair)
        need(name, pair)
        if round(pair[1]) > 99:
            refuse(f"{name} range {tuple(pair)} reaches quality 100, which means no JPEG: at most 99")

    stages: list[tuple[str, StageRecipe]] = [("1", recipe.stage1)]
    if recipe.stage2 is not None:
        stages.append(("2", recipe.stage2))
    for n, st in stages:
        for field in ("blur_sigma_range", "resize_range", "gaussian_sigma_range", "poisson_scale_range"):
            span(f"stage {n} {field}", getattr(st, field))
        probabilities(f"stage {n} blur_prob, isotropic_prob, gaussian_noise_prob, gray_noise_prob",
                      (st.blur_prob, st.isotropic_prob, st.gaussian_noise_prob, st.gray_noise_prob))
        probabilities(f"stage {n} resize_probs", st.resize_probs)
        if len(st.resize_probs) != 3 or not math.isclose(sum(st.resize_probs), 1, abs_tol=1e-9):
            refuse(f"stage {n} resize_probs must be (up, down, keep) summing to 1, got {tuple(st.resize_probs)}")
        up, down, _ = st.resize_probs
        if (up and st.resize_range[1] < 1) or (down and st.resize_range[0] > 1):  # up: U[1, max]; down: U[min, 1]
            refuse(f"stage {n} resize_range {tuple(st.resize_range)} must hold 1: 'up' draws in [1, high], "
                   "'down' in [low, 1]")
        sizes(f"stage {n} kernel_sizes", st.kernel_sizes)
        modes(f"stage {n} resize_modes", st.resize_modes)
        need(f"blur{n}.size", st.kernel_sizes)
        need(f"blur{n}.sigma_x", st.blur_sigma_range)
        need(f"resize{n}.scale", st.resize_range)
        need(f"noise{n}.strength", st.gaussian_sigma_range, "gaussian")
        need(f"noise{n}.strength", st.poisson_scale_range, "poisson")
        if st.jpeg_range is not None:
            if n == "2":
                refuse("stage 2 takes no jpeg_range: a two-stage level's second JPEG is final.jpeg_range")
            quality("jpeg1.quality", st.jpeg_range)
    modes("final_modes", recipe.final_modes)
    if recipe.final is not None:
        sizes("final sinc_sizes", recipe.final.sinc_sizes)
        need("sinc.size", recipe.final.sinc_sizes)
        span("final omega_c_range", recipe.final.omega_c_range)
        need("sinc.omega_c", recipe.final.omega_c_range)
        probabilities("final sinc_prob, order_a_prob", (recipe.final.sinc_prob, recipe.final.order_a_prob))
        quality("jpeg2.quality", recipe.final.jpeg_range)


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
