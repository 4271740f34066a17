"""Level recipes: the ranges and probabilities that parameters are drawn from (spec sections 2-3).

A recipe says what *may* happen; a record (:mod:`degrade.params`) says what *did* happen to one
sample. Recipes are frozen dataclasses so they can be serialised into shard attributes and compared.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Literal

ResizeMode = Literal["area", "bilinear", "bicubic"]
RESIZE_MODES: tuple[ResizeMode, ...] = ("area", "bilinear", "bicubic")
NoiseType = Literal["gaussian", "poisson"]
NOISE_TYPES: tuple[NoiseType, ...] = ("gaussian", "poisson")
FinalOrder = Literal["A", "B"]
FINAL_ORDERS: tuple[FinalOrder, ...] = ("A", "B")
Level = Literal[1, 2, 3]
LevelChoice = Literal[1, 2, 3, "mix"]

KERNEL_SIZES: tuple[int, ...] = tuple(range(7, 22, 2))  # {7, 9, ..., 21}, spec 3 / section 6


@dataclass(frozen=True)
class StageRecipe:
    """One stage of blur -> resize -> noise (-> JPEG for stage 1), spec section 3.

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

# `mix` draws the level per sample (spec section 2).
MIX_PROBS: dict[int, float] = {1: 0.3, 2: 0.3, 3: 0.4}


def parse_level(value: int | str) -> LevelChoice:
    """'1'/'2'/'3'/'mix' (or the ints) -> a level choice; anything else is a ValueError."""
    text = str(value).strip().lower()
    if text == "mix":
        return "mix"
    if text in {"1", "2", "3"}:
        return int(text)  # type: ignore[return-value]
    raise ValueError(f"unknown level {value!r}: expected 1, 2, 3 or mix")
