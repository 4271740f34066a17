"""Drawing a record: `sample_params(level, rng)` is the only function of `degrade` that draws.

Every random choice of a sample comes from `rng` and is written into the record
(`degrade.params.DegradationParams`), which `degrade.apply` then replays deterministically.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import lru_cache

import numpy as np

from degrade.errors import DegradeError
from degrade.layout import check_recipe  # the layout must be able to encode what we draw
from degrade.params import (
    MIN_SIGMA,
    SEED_LIMIT,
    BlurParams,
    DegradationParams,
    FinalParams,
    JpegParams,
    NoiseParams,
    ResizeParams,
    SincParams,
)
from degrade.recipe import LEVELS, MIX_PROBS, FinalOrder, LevelChoice, LevelRecipe, NoiseType, StageRecipe


def _pick(options: tuple, rng: np.random.Generator):
    return options[int(rng.integers(len(options)))]


@lru_cache(maxsize=64)  # once per recipe, as check_recipe: sample_params runs for every sample
def _check_draws(recipe: LevelRecipe) -> None:
    """Refuse a recipe whose draws a record would refuse, though the layout's ranges hold them: a blur sigma
    below MIN_SIGMA (a (0, 1) range failed about 1 seed in 1,250, mid-run), a noise strength of 0 (no
    noise is None in a record, as v reads it)."""
    for n, st in ((1, recipe.stage1), (2, recipe.stage2)):
        if st is None:
            continue
        if st.blur_sigma_range[0] < MIN_SIGMA:
            raise DegradeError(f"level {recipe.level} recipe: stage {n} blur_sigma_range {tuple(st.blur_sigma_range)} "
                               f"must start at {MIN_SIGMA:g} or more (a record's smallest sigma)")
        for name in ("gaussian_sigma_range", "poisson_scale_range"):
            if getattr(st, name)[0] <= 0:
                raise DegradeError(f"level {recipe.level} recipe: stage {n} {name} {tuple(getattr(st, name))} must "
                                   "start above 0 (a noise step of strength 0 is no noise)")


def _sample_blur(stage: StageRecipe, rng: np.random.Generator) -> BlurParams | None:
    if stage.blur_prob < 1.0 and rng.random() >= stage.blur_prob:
        return None
    size = _pick(stage.kernel_sizes, rng)
    lo, hi = stage.blur_sigma_range
    if rng.random() < stage.isotropic_prob:
        sigma = float(rng.uniform(lo, hi))
        return BlurParams.canonical(size=size, sigma_x=sigma, sigma_y=sigma, theta=0.0)
    sigma_x, sigma_y = (float(s) for s in rng.uniform(lo, hi, size=2))
    theta = float(rng.uniform(0.0, math.pi))
    return BlurParams.canonical(size=size, sigma_x=sigma_x, sigma_y=sigma_y, theta=theta)


def _sample_scale(stage: StageRecipe, rng: np.random.Generator) -> float:
    up, down, _keep = stage.resize_probs
    u = rng.random()
    lo, hi = stage.resize_range
    if u < up:
        return float(rng.uniform(1.0, hi))
    if u < up + down:
        return float(rng.uniform(lo, 1.0))
    return 1.0


def _sample_noise(stage: StageRecipe, rng: np.random.Generator) -> NoiseParams:
    if rng.random() < stage.gaussian_noise_prob:
        noise_type: NoiseType = "gaussian"
        strength = float(rng.uniform(*stage.gaussian_sigma_range))
    else:
        noise_type = "poisson"
        strength = float(rng.uniform(*stage.poisson_scale_range))
    gray = bool(rng.random() < stage.gray_noise_prob)
    seed = int(rng.integers(SEED_LIMIT))
    return NoiseParams(type=noise_type, strength=strength, gray=gray, seed=seed)


def _sample_jpeg(quality_range: tuple[float, float], rng: np.random.Generator) -> JpegParams:
    # Continuous quality as in DASR, rounded to the integer the codec uses (docs/degradation.md).
    return JpegParams(quality=round(float(rng.uniform(*quality_range))))


def draw_level(level: LevelChoice, rng: np.random.Generator) -> int:
    """Resolve "mix" to 1/2/3 with the probabilities of docs/degradation.md; pass 1/2/3 through. DegradeError
    for another level (True too: it equals 1) or an `rng` that is not a numpy Generator (a seed: pass
    np.random.default_rng(seed))."""
    if not isinstance(rng, np.random.Generator):
        raise DegradeError(f"rng must be a numpy Generator (np.random.default_rng(seed)), not {type(rng).__name__}")
    if isinstance(level, (bool, np.bool_)):
        raise DegradeError(f"unknown level {level!r}: expected 1, 2, 3 or 'mix'")
    if level == "mix":
        u = rng.random()
        cumulative = 0.0
        for candidate, prob in MIX_PROBS.items():
            cumulative += prob
            if u < cumulative:
                return candidate
        return max(MIX_PROBS)
    if level not in (1, 2, 3):
        raise DegradeError(f"unknown level {level!r}: expected 1, 2, 3 or 'mix'")
    return int(level)


def sample_params(
    level: LevelChoice, rng: np.random.Generator, *, recipes: Mapping[int, LevelRecipe] = LEVELS
) -> DegradationParams:
    """Draw one sample's record at `level` (1, 2, 3 or "mix") from `rng` (docs/degradation.md)."""
    if not isinstance(recipes, Mapping):
        raise DegradeError(f"recipes must map levels to LevelRecipes (as degrade.LEVELS), got {type(recipes).__name__}")
    lv = draw_level(level, rng)
    recipe = recipes.get(lv)
    if not isinstance(recipe, LevelRecipe):
        raise DegradeError(f"recipes has no LevelRecipe for level {lv}" + (", which 'mix' draws" if level == "mix"
                                                                          else ""))
    try:
        hash(recipe)  # check_recipe's cache needs it (a frozen dataclass of tuples is hashable)
    except TypeError:
        raise DegradeError(f"level {lv} recipe: its ranges and choices must be tuples, not lists") from None
    check_recipe(recipe)
    _check_draws(recipe)
    s1 = recipe.stage1
    blur1 = _sample_blur(s1, rng)
    scale1 = _sample_scale(s1, rng)
    resize1 = None if scale1 == 1.0 else ResizeParams(scale=scale1, mode=_pick(s1.resize_modes, rng))
    noise1 = _sample_noise(s1, rng)
    if s1.jpeg_range is None:
        raise DegradeError(f"level {lv}: stage 1 needs a jpeg_range")
    jpeg1 = _sample_jpeg(s1.jpeg_range, rng)
    if recipe.stage2 is None or recipe.final is None:
        final = FinalParams(order=None, mode=_pick(recipe.final_modes, rng))
        return DegradationParams(level=lv, blur1=blur1, resize1=resize1, noise1=noise1, jpeg1=jpeg1, final=final)

    s2, fin = recipe.stage2, recipe.final
    blur2 = _sample_blur(s2, rng)
    # Stage 2 resizes to round(P/4 * s2): a real resize even when s2 = 1, so it always has a mode.
    resize2 = ResizeParams(scale=_sample_scale(s2, rng), mode=_pick(s2.resize_modes, rng))
    noise2 = _sample_noise(s2, rng)
    sinc = None
    if rng.random() < fin.sinc_prob:
        sinc = SincParams(size=_pick(fin.sinc_sizes, rng), omega_c=float(rng.uniform(*fin.omega_c_range)))
    order: FinalOrder = "A" if rng.random() < fin.order_a_prob else "B"
    jpeg2 = _sample_jpeg(fin.jpeg_range, rng)
    final = FinalParams(order=order, mode=_pick(recipe.final_modes, rng))
    return DegradationParams(
        level=lv,
        blur1=blur1,
        resize1=resize1,
        noise1=noise1,
        jpeg1=jpeg1,
        final=final,
        blur2=blur2,
        resize2=resize2,
        noise2=noise2,
        sinc=sinc,
        jpeg2=jpeg2,
    )
