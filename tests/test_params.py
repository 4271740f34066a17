"""Sampling against the level recipes (docs/degradation.md), canonical kernels, and the record's JSON round trip."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest

import degrade
from degrade import LEVELS, BlurParams, DegradationParams, sample_params

from .conftest import rng_for

N = 4000  # draws per level


def _draws(level) -> list[DegradationParams]:
    return [sample_params(level, rng_for(100 + (level if level != "mix" else 9), i)) for i in range(N)]


@pytest.fixture(scope="module")
def draws() -> dict:
    return {level: _draws(level) for level in (1, 2, 3, "mix")}


def assert_share(hits: int, n: int, prob: float) -> None:
    """Observed share within 4.5 binomial standard errors of `prob` (false alarm ~1e-5 per check)."""
    se = math.sqrt(prob * (1 - prob) / n)
    assert abs(hits / n - prob) <= 4.5 * se + 1e-12, f"share {hits / n:.4f} vs expected {prob}"


def in_range(x: float, lo: float, hi: float) -> bool:
    return lo - 1e-12 <= x <= hi + 1e-12


def check_blur(blurs: list[BlurParams | None], stage, n: int) -> None:
    present = [b for b in blurs if b is not None]
    assert_share(len(present), n, stage.blur_prob)
    iso = [b for b in present if b.isotropic]
    assert_share(len(iso), len(present), stage.isotropic_prob)
    lo, hi = stage.blur_sigma_range
    for b in present:
        assert b.size in stage.kernel_sizes
        assert in_range(b.sigma_x, lo, hi) and in_range(b.sigma_y, lo, hi)
        assert b.sigma_x >= b.sigma_y and 0 <= b.theta < math.pi  # canonical (docs/degradation.md)
    assert all(b.theta == 0.0 for b in iso)
    for size in stage.kernel_sizes:
        assert_share(sum(b.size == size for b in present), len(present), 1 / len(stage.kernel_sizes))
    thetas = np.array([b.theta for b in present if not b.isotropic])
    # theta ~ U[0, pi): mean pi/2 with SE pi / sqrt(12 n); each quarter holds 1/4.
    assert abs(thetas.mean() - math.pi / 2) < 4.5 * math.pi / math.sqrt(12 * thetas.size)
    for quarter in range(4):
        assert_share(int(((thetas >= quarter * math.pi / 4) & (thetas < (quarter + 1) * math.pi / 4)).sum()),
                     thetas.size, 0.25)
    # Sigmas uniform: isotropic sigma mean at the middle of the range.
    sig = np.array([b.sigma_x for b in iso])
    assert abs(sig.mean() - (lo + hi) / 2) < 4.5 * (hi - lo) / math.sqrt(12 * sig.size)


def check_noise(noises, stage, n: int) -> None:
    assert all(x is not None for x in noises)
    gauss = [x for x in noises if x.type == "gaussian"]
    assert_share(len(gauss), n, stage.gaussian_noise_prob)
    assert_share(sum(x.gray for x in noises), n, stage.gray_noise_prob)
    for x in noises:
        rng_ = stage.gaussian_sigma_range if x.type == "gaussian" else stage.poisson_scale_range
        assert in_range(x.strength, *rng_)
    assert len({x.seed for x in noises}) == n  # a fresh seed per step


@pytest.mark.parametrize("level", [1, 2, 3])
def test_stage1_matches_spec_section_3(draws, level):
    recipe, ps = LEVELS[level], draws[level]
    s1 = recipe.stage1
    assert all(p.level == level for p in ps)
    check_blur([p.blur1 for p in ps], s1, N)
    up, down, keep = s1.resize_probs
    scales = [p.resize1.scale if p.resize1 else 1.0 for p in ps]
    assert_share(sum(s > 1 for s in scales), N, up)
    assert_share(sum(s < 1 for s in scales), N, down)
    assert_share(sum(p.resize1 is None for p in ps), N, keep)
    assert all(in_range(s, *s1.resize_range) for s in scales)
    modes = [p.resize1.mode for p in ps if p.resize1]
    for mode in s1.resize_modes:
        assert_share(modes.count(mode), len(modes), 1 / 3)
    check_noise([p.noise1 for p in ps], s1, N)
    qualities = [p.jpeg1.quality for p in ps]
    lo, hi = s1.jpeg_range
    assert min(qualities) == lo and max(qualities) == hi
    assert all(isinstance(q, int) for q in qualities)
    final_modes = [p.final.mode for p in ps]
    for mode in recipe.final_modes:
        assert_share(final_modes.count(mode), N, 1 / 3)


@pytest.mark.parametrize("level", [1, 2])
def test_one_stage_levels_have_no_stage_2(draws, level):
    for p in draws[level]:
        assert not p.two_stage
        assert p.blur2 is p.resize2 is p.noise2 is p.sinc is p.jpeg2 is None


def test_level3_stage2_and_final_block_match_spec_section_3(draws):
    recipe, ps = LEVELS[3], draws[3]
    s2, fin = recipe.stage2, recipe.final
    check_blur([p.blur2 for p in ps], s2, N)
    up, down, keep = s2.resize_probs
    scales = [p.resize2.scale for p in ps]
    assert_share(sum(s > 1 for s in scales), N, up)
    assert_share(sum(s < 1 for s in scales), N, down)
    assert_share(sum(s == 1 for s in scales), N, keep)
    assert all(in_range(s, *s2.resize_range) for s in scales)
    check_noise([p.noise2 for p in ps], s2, N)
    sincs = [p.sinc for p in ps if p.sinc]
    assert_share(len(sincs), N, fin.sinc_prob)
    assert all(s.size in fin.sinc_sizes and in_range(s.omega_c, *fin.omega_c_range) for s in sincs)
    assert_share(sum(p.final.order == "A" for p in ps), N, fin.order_a_prob)
    assert all(p.final.order in ("A", "B") for p in ps)
    q = [p.jpeg2.quality for p in ps]
    assert min(q) == fin.jpeg_range[0] and max(q) == fin.jpeg_range[1]


def test_sinc_sizes_cutoffs_and_anisotropic_sigmas_are_uniform(draws):
    """The sinc's size is uniform over the recipe's sizes, its cutoff omega_c uniform over its range, and an
    anisotropic blur's two sigmas each uniform over the stage's range before the canonical order puts the
    larger first: dropping the largest sinc size, squaring omega_c's uniform draw and halving the sigmas'
    range each passed every test (a mutation audit: the tests checked ranges and membership only). Oracle:
    the distributions written out, within 4.5 standard errors on the fixed-seed draws: each of the 8 sizes
    1/8; omega_c's mean at the middle of its range (SE (hi - lo) / sqrt(12 n)); sigma_x, the larger of two
    U[lo, hi], mean lo + 2 (hi - lo) / 3, and sigma_y, the smaller, lo + (hi - lo) / 3 (each SE
    (hi - lo) / sqrt(18 n))."""
    fin = LEVELS[3].final
    sincs = [p.sinc for p in draws[3] if p.sinc]
    assert len(fin.sinc_sizes) == 8
    for size in fin.sinc_sizes:
        assert_share(sum(s.size == size for s in sincs), len(sincs), 1 / 8)
    lo, hi = fin.omega_c_range
    omega = np.array([s.omega_c for s in sincs])
    assert abs(omega.mean() - (lo + hi) / 2) < 4.5 * (hi - lo) / math.sqrt(12 * omega.size)
    stages = [(LEVELS[level].stage1, [p.blur1 for p in draws[level]]) for level in (1, 2, 3)]
    for stage, blurs in [*stages, (LEVELS[3].stage2, [p.blur2 for p in draws[3]])]:
        lo, hi = stage.blur_sigma_range
        aniso = [b for b in blurs if b is not None and not b.isotropic]
        sx, sy = np.array([b.sigma_x for b in aniso]), np.array([b.sigma_y for b in aniso])
        se = (hi - lo) / math.sqrt(18 * len(aniso))
        assert abs(sx.mean() - (lo + 2 * (hi - lo) / 3)) < 4.5 * se, (stage, sx.mean())
        assert abs(sy.mean() - (lo + (hi - lo) / 3)) < 4.5 * se, (stage, sy.mean())


def test_mix_draws_levels_with_spec_probabilities(draws):
    levels = [p.level for p in draws["mix"]]
    for level, prob in degrade.MIX_PROBS.items():
        assert_share(levels.count(level), N, prob)


def test_same_seed_same_record_different_seed_different_record():
    a = sample_params("mix", rng_for(5, 7))
    assert sample_params("mix", rng_for(5, 7)) == a
    assert sample_params("mix", rng_for(5, 8)) != a


def test_unknown_level_is_refused():
    with pytest.raises(ValueError, match="unknown level"):
        sample_params(4, rng_for(0))  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        degrade.parse_level("hard")
    assert degrade.parse_level("MIX") == "mix" and degrade.parse_level("3") == 3


@pytest.mark.parametrize(
    "sx,sy,theta",
    [(0.5, 2.0, 0.3), (2.0, 0.5, -0.3), (1.0, 1.0, 2.0), (2.0, 1.0, 7.5), (0.4, 0.9, math.pi - 1e-17)],
)
def test_canonical_kernel_is_the_same_kernel(sx, sy, theta):
    b = BlurParams.canonical(size=9, sigma_x=sx, sigma_y=sy, theta=theta)
    assert b.sigma_x >= b.sigma_y and 0 <= b.theta < math.pi
    np.testing.assert_allclose(b.kernel(), degrade.gaussian_kernel(9, sx, sy, theta), atol=1e-14)


def test_json_round_trip_is_exact(draws):
    for p in draws["mix"][:1000]:
        text = p.to_json()
        json.loads(text)
        assert DegradationParams.from_json(text) == p


def _record_dict() -> dict:
    return sample_params(3, rng_for(11)).to_dict()


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda d: d.update(extra=1), "unknown keys"),
        (lambda d: d.pop("final"), "lacks 'final'"),
        (lambda d: d["blur1"].update(size=8), "odd"),
        (lambda d: d["blur1"].update(size="seven"), "blur1.size"),
        (lambda d: d["blur1"].pop("theta"), "expected keys"),
        (lambda d: d["noise1"].update(type="salt"), "noise1.type"),
        (lambda d: d["noise1"].update(gray=1), "noise1.gray"),
        (lambda d: d["jpeg1"].update(quality=101), "jpeg1.quality"),
        (lambda d: d["jpeg1"].update(quality=55.5), "jpeg1.quality"),
        (lambda d: d["resize2"].update(scale=-1.0), "resize2.scale"),
        (lambda d: d["final"].update(order=None), "does not match the pipeline"),
        (lambda d: d.update(level=None) or d["final"].update(order=None), "one-stage"),
        (lambda d: d.update(level=[1]), "level: bad value"),
        (lambda d: d.update(level=True), "level: bad value"),
        (lambda d: d.update(level=2.5), "level: bad value"),
        (lambda d: d.update(level=1), "does not match the pipeline"),
        (lambda d: d.update(final=None), "final: expected an object"),
        (lambda d: d["blur1"].update(size=float("inf")), "blur1.size: bad value"),
        (lambda d: d["blur1"].update(size="7"), "blur1.size: bad value"),
        (lambda d: d["blur1"].update(sigma_x="1"), "blur1.sigma_x: bad value"),
        (lambda d: d["blur1"].update(sigma_y=1e-300), "sigmas must satisfy"),
        (lambda d: d["blur1"].update(size=100001), "blur1.size must be odd"),
        (lambda d: d["resize2"].update(scale=1e6), "resize2.scale must be in"),
        (lambda d: d["noise1"].update(seed=2**70), "noise1.seed must be in"),
        (lambda d: d["jpeg1"].update(quality=100), "jpeg1.quality"),
        (lambda d: d["final"].update(mode=3), "final.mode: bad value"),
        (lambda d: d.update(resize2=None), "needs resize2"),
        (lambda d: d["final"].update(mode="nearest"), "final.mode"),
        (lambda d: d.update(level=5), "level"),
    ],
)
def test_from_dict_refuses_bad_records(mutate, message):
    d = _record_dict()
    mutate(d)
    with pytest.raises(ValueError, match=message):
        DegradationParams.from_dict(d)


@pytest.mark.parametrize("key", ["blur2", "resize2", "noise2", "sinc", "jpeg2"])
def test_two_stage_record_must_hold_every_stage_2_key(key):
    # A level-3 record with a stage-2 key cut out is truncated: it must not read as "step absent".
    d = _record_dict()
    assert d["final"]["order"] is not None
    del d[key]
    with pytest.raises(degrade.DegradeError, match=f"lacks '{key}'"):
        DegradationParams.from_json(json.dumps(d))
    d.update(level=None)  # the rule follows final.order, not the level
    with pytest.raises(degrade.DegradeError, match=f"lacks '{key}'"):
        DegradationParams.from_dict(d)


def test_one_stage_record_may_leave_out_stage_2_keys():
    p = sample_params(1, rng_for(11))
    d = p.to_dict()
    for key in ("blur2", "resize2", "noise2", "sinc", "jpeg2"):
        del d[key]
    assert DegradationParams.from_dict(d) == p


def test_from_json_refuses_non_json_and_non_objects():
    with pytest.raises(ValueError, match="not valid JSON"):
        DegradationParams.from_json("{oops")
    with pytest.raises(degrade.DegradeError, match="JSON text expected, got NoneType"):  # was a raw TypeError
        DegradationParams.from_json(None)
    with pytest.raises(ValueError, match="JSON object"):
        DegradationParams.from_json("[1, 2]")


def test_records_are_frozen():
    p = sample_params(1, rng_for(0))
    with pytest.raises(AttributeError):
        p.level = 2  # type: ignore[misc]
    assert replace(p, level=2).level == 2


def test_a_record_built_from_python_holds_jsons_types_or_is_refused():
    """numpy scalars (a seed np.int64, a strength np.float32, gray np.bool_) made records that applied but
    could not be saved (to_json: 'int64 is not JSON serializable'); True as a seed saved as true, which
    from_json refuses; quality 50.5 applied as 50 but was labelled 50.5. Now numpy scalars become Python's
    and the round trip holds; a value of the wrong kind is refused as from_json refuses it."""
    import dataclasses

    from degrade.errors import DegradeError
    from degrade.params import DegradationParams

    p = degrade.sample_params(2, np.random.default_rng(4))
    q = dataclasses.replace(p, level=np.int64(2), noise1=dataclasses.replace(
        p.noise1, seed=np.int64(5), strength=np.float32(3.5), gray=np.bool_(True)),
        jpeg1=dataclasses.replace(p.jpeg1, quality=np.int32(40)))
    assert (type(q.level), type(q.noise1.seed), type(q.noise1.strength), type(q.noise1.gray),
            type(q.jpeg1.quality)) == (int, int, float, bool, int)
    assert DegradationParams.from_json(q.to_json()) == q
    assert degrade.decode(degrade.encode(p), noise_seed=np.int64(5)).noise1.seed == 5
    for step, bad in (("noise1", {"seed": True}), ("noise1", {"seed": 1.5}), ("jpeg1", {"quality": 50.5}),
                      ("noise1", {"gray": "no"}), ("blur1", {"size": "7"}), ("noise1", {"strength": "3"})):
        with pytest.raises(DegradeError, match=f"{step}.{next(iter(bad))}: bad value"):
            dataclasses.replace(p, **{step: dataclasses.replace(getattr(p, step), **bad)})
    with pytest.raises(DegradeError, match="level: bad value True"):
        dataclasses.replace(p, level=True)
    assert dataclasses.replace(p, jpeg1=dataclasses.replace(p.jpeg1, quality=50.0)).jpeg1.quality == 50  # as JSON's
    huge = dataclasses.replace(p.blur1, sigma_x=10**400)  # float() raised OverflowError; JSON's reader too
    with pytest.raises(DegradeError, match="sigma"):
        dataclasses.replace(p, blur1=huge)
    record = json.loads(p.to_json())
    record["blur1"]["sigma_x"] = 10**400
    with pytest.raises(DegradeError, match="blur1.sigma_x: bad value"):
        DegradationParams.from_json(json.dumps(record))
    for step, key in (("jpeg1", "quality"), ("blur1", "size"), ("noise1", "seed")):  # integer fields too
        record = json.loads(p.to_json())
        record[step][key] = -(10**400)
        with pytest.raises(DegradeError, match=f"{step}.{key}"):
            DegradationParams.from_json(json.dumps(record))


def test_an_isotropic_blur_with_a_theta_is_refused():
    """Records are canonical: an isotropic kernel (sigma_x == sigma_y) has theta 0, which v encodes and decode
    gives back. One with theta 0.5 was accepted, encoded theta 0.159 and decoded to another record."""
    good = sample_params(2, rng_for(1))
    blur = BlurParams(size=7, sigma_x=1.0, sigma_y=1.0, theta=0.0)
    assert replace(good, blur1=blur).blur1.isotropic
    with pytest.raises(degrade.DegradeError, match="blur1 is isotropic .*its theta must be 0, got 0.5"):
        replace(good, blur1=replace(blur, theta=0.5))
    record = json.loads(good.to_json())
    record["blur1"] = {"size": 7, "sigma_x": 1.0, "sigma_y": 1.0, "theta": 0.5}
    with pytest.raises(degrade.DegradeError, match="isotropic"):
        DegradationParams.from_json(json.dumps(record))


def test_custom_recipes_are_checked_before_any_draw():
    """sample_params(recipes=...) refuses, in one DegradeError each, what gave raw KeyError, IndexError or
    numpy errors, or sometimes a refused draw (quality 100), or passed silently (probabilities)."""
    from degrade import LevelRecipe

    r2, r3 = LEVELS[2], LEVELS[3]
    s1 = r2.stage1
    cases = [
        ({3: r3}, 2, "recipes has no LevelRecipe for level 2"),
        (list(LEVELS.values()), 2, "recipes must map levels to LevelRecipes"),
        ({2: replace(r2, stage1=replace(s1, resize_range=(0.5, 0.9)))}, 2, r"resize_range \(0.5, 0.9\) must hold 1"),
        ({2: replace(r2, stage1=replace(s1, jpeg_range=(95.0, 100.0)))}, 2, "reaches quality 100"),
        ({2: replace(r2, stage1=replace(s1, jpeg_range=(95.0, 90.0)))}, 2, "low <= high"),
        ({2: replace(r2, stage1=replace(s1, resize_probs=(0.5, 0.9, 0.0)))}, 2, "summing to 1"),
        ({2: replace(r2, stage1=replace(s1, isotropic_prob=1.5))}, 2, "probabilities in"),
        ({3: replace(r3, stage2=replace(r3.stage2, jpeg_range=(10.0, 20.0)))}, 3, "stage 2 takes no jpeg_range"),
        ({3: replace(r3, final=replace(r3.final, sinc_prob=-0.1))}, 3, "probabilities in"),
        # a draw picking 8 or 7.5 (refused or truncated only on an unlucky draw), from nothing (numpy's error)
        ({2: replace(r2, stage1=replace(s1, kernel_sizes=(7, 9, 11, 8)))}, 2, "odd integers >= 3"),
        ({2: replace(r2, stage1=replace(s1, kernel_sizes=(7.5,)))}, 2, "odd integers >= 3"),
        ({2: replace(r2, stage1=replace(s1, kernel_sizes=()))}, 2, "odd integers >= 3"),
        ({3: replace(r3, final=replace(r3.final, sinc_sizes=(1, 3)))}, 3, "sinc_sizes must be odd integers >= 3"),
        ({2: replace(r2, stage1=replace(s1, resize_modes=()))}, 2, "resize_modes must be resize modes"),
        ({2: replace(r2, final_modes=("nearest",))}, 2, "final_modes must be resize modes"),
        ({2: replace(r2, stage1=replace(s1, resize_probs=[0.2, 0.7, 0.1]))}, 2, "must be tuples, not lists"),
    ]
    for recipes, level, message in cases:
        with pytest.raises(degrade.DegradeError, match=message):
            sample_params(level, rng_for(0), recipes=recipes)
    assert isinstance(LEVELS[2], LevelRecipe)
    for level in (1, 2, 3, "mix"):  # the built-in recipes pass, and the default draws are unchanged
        assert sample_params(level, rng_for(5), recipes=dict(LEVELS)) == sample_params(level, rng_for(5))
