"""Level recipes: the ranges and probabilities that parameters are drawn from (docs/degradation.md).

A recipe says what *may* happen; a record (:mod:`degrade.params`) says what *did* happen to one
sample. Recipes are frozen dataclasses so they can be serialised into shard attributes and compared.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Literal

from degrade.errors import DegradeError

ResizeMode = Literal["area", "bilinear", "bicubic"]
RESIZE_MODES: tuple[ResizeMode, ...] = ("area", "bilinear", "bicubic")
NoiseType = Literal["gaussian", "poisson"]
NOISE_TYPES: tuple[NoiseType, ...] = ("gaussian", "poisson")
FinalOrder = Literal["A", "B"]
FINAL_ORDERS: tuple[FinalOrder, ...] = ("A", "B")
Level = Literal[1, 2, 3]
LevelChoice = Literal[1, 2, 3, "mix"]

SCALE = 4  # the space's one scale factor: an HR image P x P becomes an LR image P/4 x P/4
MIN_HR_SIDE = 32  # smallest HR side accepted (LR 8 px): smaller images carry no usable patch
KERNEL_SIZES: tuple[int, ...] = tuple(range(7, 22, 2))  # {7, 9, ..., 21}


@dataclass(frozen=True)
class StageRecipe:
    """One stage of blur -> resize -> noise (-> JPEG for stage 1) (docs/degradation.md).

    `resize_probs` is (up, down, keep); "up" draws s ~ U[1, max], "down" s ~ U[min, 1], "keep" s = 1.
    Gaussian sigma is in 0-255 units; the Poisson scale multiplies the shot-noise residual.
    """

    blur_sigma_range: tuple[float, float]
    resize_probs: tuple[float, float, float]
    resize_range: tuple[float, float]
    gaussian_sigma_range: tuple[float, float]
    poisson_scale_range: tuple[float, float]
    jpeg_range: tuple[float, float] | None = None  # stage 1 only; level 3's second JPEG is in FinalRecipe
    blur_prob: float = 1.0
    kernel_sizes: tuple[int, ...] = KERNEL_SIZES
    isotropic_prob: float = 0.65
    resize_modes: tuple[ResizeMode, ...] = RESIZE_MODES
    gaussian_noise_prob: float = 0.5
    gray_noise_prob: float = 0.4


@dataclass(frozen=True)
class FinalRecipe:
    """Level 3 final block: optional sinc, JPEG and the resize to the target size, in order A or B."""

    jpeg_range: tuple[float, float]
    sinc_prob: float = 0.8
    sinc_sizes: tuple[int, ...] = KERNEL_SIZES
    omega_c_range: tuple[float, float] = (math.pi / 3, math.pi)
    order_a_prob: float = 0.5


@dataclass(frozen=True)
class LevelRecipe:
    """Everything that can happen at one level. `stage2`/`final` are None for one-stage levels."""

    level: Level
    name: str
    stage1: StageRecipe
    stage2: StageRecipe | None = None
    final: FinalRecipe | None = None
    final_modes: tuple[ResizeMode, ...] = RESIZE_MODES

    def to_dict(self) -> dict:
        return asdict(self)


LEVELS: dict[int, LevelRecipe] = {
    1: LevelRecipe(
        level=1,
        name="weak",
        stage1=StageRecipe(
            blur_sigma_range=(0.2, 0.8),
            resize_probs=(0.1, 0.2, 0.7),
            resize_range=(0.85, 1.2),
            gaussian_sigma_range=(1.0, 10.0),
            poisson_scale_range=(0.05, 0.5),
            jpeg_range=(90.0, 95.0),
        ),
    ),
    2: LevelRecipe(
        level=2,
        name="standard",
        stage1=StageRecipe(
            blur_sigma_range=(0.2, 1.5),
            resize_probs=(0.3, 0.4, 0.3),
            resize_range=(0.5, 1.2),
            gaussian_sigma_range=(1.0, 20.0),
            poisson_scale_range=(0.05, 1.5),
            jpeg_range=(50.0, 95.0),
        ),
    ),
    3: LevelRecipe(
        level=3,
        name="severe",
        stage1=StageRecipe(
            blur_sigma_range=(0.2, 3.0),
            resize_probs=(0.2, 0.7, 0.1),
            resize_range=(0.15, 1.5),
            gaussian_sigma_range=(1.0, 30.0),
            poisson_scale_range=(0.05, 3.0),
            jpeg_range=(30.0, 95.0),
        ),
        stage2=StageRecipe(
            blur_prob=0.8,
            blur_sigma_range=(0.2, 1.5),
            resize_probs=(0.3, 0.4, 0.3),
            resize_range=(0.3, 1.2),
            gaussian_sigma_range=(1.0, 25.0),
            poisson_scale_range=(0.05, 2.5),
        ),
        final=FinalRecipe(jpeg_range=(30.0, 95.0)),
    ),
}

# `mix` draws the level per sample (docs/degradation.md).
MIX_PROBS: dict[int, float] = {1: 0.3, 2: 0.3, 3: 0.4}


def parse_level(value: int | str) -> LevelChoice:
    """'1'/'2'/'3'/'mix' (or the ints) -> a level choice; anything else is a DegradeError (a ValueError)."""
    text = str(value).strip().lower()
    if text == "mix":
        return "mix"
    if text in {"1", "2", "3"}:
        return int(text)  # type: ignore[return-value]
    raise DegradeError(f"unknown level {value!r}: expected 1, 2, 3 or mix")


def describe_levels(levels: Mapping[int, LevelRecipe] | None = None) -> tuple[list[str], list[list[str]], list[str]]:
    """The level recipes as a table in words: (column headers, rows, notes), as in docs/degradation.md.

    Rendered as Markdown by :func:`levels_markdown` (docs) and as a rich table by `degrade levels`.
    """
    levels = LEVELS if levels is None else levels
    columns: list[tuple[str, StageRecipe]] = []
    for recipe in levels.values():
        if recipe.stage2 is None:
            columns.append((f"level {recipe.level}", recipe.stage1))
        else:
            columns += [(f"level {recipe.level} stage 1", recipe.stage1), (f"level {recipe.level} stage 2", recipe.stage2)]

    def span(r: tuple[float, float]) -> str:
        return f"U[{r[0]:g}, {r[1]:g}]"

    cells: list[tuple[str, Callable[[StageRecipe], str]]] = [
        ("blur applied", lambda s: "always" if s.blur_prob == 1 else f"with prob {s.blur_prob:g}"),
        ("kernel size", lambda s: f"odd {min(s.kernel_sizes)}..{max(s.kernel_sizes)}"),
        ("isotropic / anisotropic", lambda s: f"{s.isotropic_prob:g} / {1 - s.isotropic_prob:g}"),
        ("blur sigma (each axis, px)", lambda s: span(s.blur_sigma_range)),
        ("resize up / down / keep prob", lambda s: " / ".join(f"{p:g}" for p in s.resize_probs)),
        ("resize scale range", lambda s: "[{:g}, {:g}]".format(*s.resize_range)),
        ("resize mode (uniform)", lambda s: " / ".join(s.resize_modes)),
        ("noise: Gaussian vs Poisson", lambda s: f"{s.gaussian_noise_prob:g} / {1 - s.gaussian_noise_prob:g}"),
        ("Gaussian sigma (0-255 units)", lambda s: span(s.gaussian_sigma_range)),
        ("Poisson scale", lambda s: span(s.poisson_scale_range)),
        ("gray (luma-only) noise prob", lambda s: f"{s.gray_noise_prob:g}"),
        ("JPEG quality", lambda s: span(s.jpeg_range) if s.jpeg_range else "(final block)"),
    ]
    header = ["parameter"] + [name for name, _ in columns]
    rows = [[label] + [fmt(stage) for _, stage in columns] for label, fmt in cells]
    notes = []
    for recipe in levels.values():
        f = recipe.final
        if f is None:
            notes.append(f"Level {recipe.level}: final resize to P/4 with mode uniform over {', '.join(recipe.final_modes)}.")
        else:
            notes.append(
                f"Level {recipe.level} final block: sinc with prob {f.sinc_prob:g}, size odd "
                f"{min(f.sinc_sizes)}..{max(f.sinc_sizes)}, omega_c U[{f.omega_c_range[0]:.4f}, "
                f"{f.omega_c_range[1]:.4f}] (pi/3 to pi); JPEG quality {span(f.jpeg_range)}; order A "
                f"(resize-sinc-JPEG) with prob {f.order_a_prob:g}, else B (JPEG-resize-sinc); final resize "
                f"mode uniform over {', '.join(recipe.final_modes)}."
            )
    mix = " / ".join(f"{p:g}" for p in MIX_PROBS.values())
    notes.append(f"Level mix: level 1 / 2 / 3 drawn per sample with probabilities {mix}.")
    return header, rows, notes


def levels_markdown(levels: Mapping[int, LevelRecipe] | None = None) -> str:
    """The level recipes as Markdown (embedded in docs/degradation.md; a test keeps it in sync)."""
    header, rows, notes = describe_levels(levels)
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += [""] + [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"
