"""The vector layout "dasr33-v1" (docs/degradation.md): table, golden encodings, absent steps, round trips."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

import degrade
from degrade import (
    VECTOR_FIELDS,
    BlurParams,
    DegradationParams,
    FinalParams,
    JpegParams,
    NoiseParams,
    ResizeParams,
    SincParams,
    decode,
    encode,
    sample_params,
)
from degrade.vector import check_recipe

from .conftest import rng_for

SPEC_FIELDS = [  # (first index, name), written out from the DASR paper's layout, independently of the code
    (0, "blur1.size"), (1, "blur1.sigma_x"), (2, "blur1.sigma_y"), (3, "blur1.theta"),
    (4, "blur2.size"), (5, "blur2.sigma_x"), (6, "blur2.sigma_y"), (7, "blur2.theta"),
    (8, "sinc.size"), (9, "sinc.omega_c"), (10, "resize1.scale"), (11, "resize1.mode"),
    (14, "resize2.scale"), (15, "resize2.mode"), (18, "noise1.strength"), (19, "noise1.gray"),
    (20, "noise1.type"), (22, "noise2.strength"), (23, "noise2.gray"), (24, "noise2.type"),
    (26, "jpeg1.quality"), (27, "jpeg2.quality"), (28, "final.order"), (30, "final.mode"),
]
RESIZE_AT_1 = (1 - 0.15) / 1.35  # 0.6296...


def test_layout_matches_the_spec_table():
    assert [(f.index, f.name) for f in VECTOR_FIELDS] == SPEC_FIELDS
    assert degrade.VECTOR_LENGTH == 33 and degrade.VECTOR_LAYOUT == "dasr33-v1"
    assert sum(f.width for f in VECTOR_FIELDS) == 33


@pytest.fixture(scope="module")
def records() -> list[DegradationParams]:
    return [sample_params(level, rng_for(200, i)) for i in range(1000) for level in (1, 2, 3)]


def test_every_entry_is_in_unit_interval(records):
    vs = np.stack([encode(p) for p in records])
    assert vs.dtype == np.float32 and vs.shape == (len(records), 33)
    assert vs.min() >= 0.0 and vs.max() <= 1.0


def _golden_record() -> DegradationParams:
    return DegradationParams(
        level=3,
        blur1=BlurParams(size=21, sigma_x=3.0, sigma_y=1.5, theta=math.pi / 2),
        resize1=ResizeParams(scale=0.825, mode="bilinear"),
        noise1=NoiseParams(type="gaussian", strength=15.0, gray=True, seed=1),
        jpeg1=JpegParams(quality=65),
        final=FinalParams(order="B", mode="area"),
        blur2=BlurParams(size=11, sigma_x=0.6, sigma_y=0.3, theta=0.0),
        resize2=ResizeParams(scale=1.5, mode="bicubic"),
        noise2=NoiseParams(type="poisson", strength=0.75, gray=False, seed=2),
        sinc=SincParams(size=7, omega_c=2 * math.pi / 3),
        jpeg2=JpegParams(quality=30),
    )


def test_golden_encoding():
    expected = [
        1.0, 1.0, 0.5, 0.5,          # blur1: (21-1)/20, 3/3, 1.5/3, (pi/2)/pi
        0.5, 0.2, 0.1, 0.0,          # blur2: (11-1)/20, 0.6/3, 0.3/3, 0
        0.3, 0.5,                    # sinc: (7-1)/20, (2pi/3 - pi/3)/(2pi/3)
        0.5, 0, 1, 0,                # resize1: (0.825-0.15)/1.35, bilinear
        1.0, 0, 0, 1,                # resize2: (1.5-0.15)/1.35, bicubic
        0.5, 1, 1, 0,                # noise1: 15/30, gray, gaussian
        0.25, 0, 0, 1,               # noise2: 0.75/3, colour, poisson
        0.5, 0.0,                    # jpeg: (65-30)/70, (30-30)/70
        0, 1,                        # order B
        1, 0, 0,                     # final mode area
    ]
    np.testing.assert_allclose(encode(_golden_record()), expected, atol=1e-7)


def test_absent_steps_are_identity_values_for_one_stage_levels(records):
    for p in records:
        if p.level == 3:
            continue
        v = encode(p)
        np.testing.assert_array_equal(v[4:8], 0)  # no blur2
        assert v[8] == 0 and v[9] == 1  # no sinc: size 1, omega_c = pi
        assert v[14] == pytest.approx(RESIZE_AT_1) and not v[15:18].any()
        np.testing.assert_array_equal(v[22:26], 0)  # no noise2
        assert v[27] == 1  # no second JPEG: quality 100
        np.testing.assert_array_equal(v[28:30], 0)  # no final order
        assert v[30:33].sum() == 1


def test_absent_steps_within_level3(records):
    seen = set()
    for p in records:
        v = encode(p)
        if p.blur2 is None and p.two_stage:
            np.testing.assert_array_equal(v[4:8], 0)
            seen.add("blur2")
        if p.sinc is None and p.two_stage:
            assert v[8] == 0 and v[9] == 1
            seen.add("sinc")
        if p.resize1 is None:
            assert v[10] == pytest.approx(RESIZE_AT_1) and not v[11:14].any()
            seen.add("resize1")
    assert seen == {"blur2", "sinc", "resize1"}


def _assert_records_close(a: DegradationParams, b: DegradationParams) -> None:
    """Equal up to float32 storage: same structure, integers exact, reals within 1e-6 relative."""
    assert b.level is None and a.two_stage == b.two_stage and a.final == b.final
    for name in ("blur1", "blur2", "sinc", "resize1", "resize2", "noise1", "noise2", "jpeg1", "jpeg2"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is None:
            continue
        for key, xv in vars(x).items():
            yv = getattr(y, key)
            if key == "seed":
                continue
            if key == "theta":  # theta is periodic in pi; near pi it may come back as ~0
                d = abs(xv - yv) % math.pi
                assert min(d, math.pi - d) < 1e-5, (name, xv, yv)
            elif isinstance(xv, float):
                assert yv == pytest.approx(xv, rel=1e-6, abs=1e-6), (name, key)
            else:
                assert yv == xv, (name, key)


def test_encode_decode_round_trip(records):
    for p in records:
        v = encode(p)
        back = decode(v)
        _assert_records_close(p, back)
        np.testing.assert_allclose(encode(back), v, atol=1e-6)


def test_decode_refuses_a_noise_seed_that_is_not_an_integer():
    """None and '3' were raw TypeErrors (5.5 and -1 were refused as they are)."""
    from degrade.errors import DegradeError

    v = encode(_golden_record())
    for seed in (None, "3", 5.5, -1, True, 2**53):
        with pytest.raises(DegradeError, match="noise_seed must be an integer in"):
            decode(v, noise_seed=seed)
    assert decode(v, noise_seed=np.int64(41)) == decode(v, noise_seed=41)


def test_decode_sets_noise_seeds():
    p = decode(encode(_golden_record()), noise_seed=41)
    assert p.noise1.seed == 41 and p.noise2.seed == 42


def test_replaying_a_vector_reproduces_the_image(hr_patch):
    """apply(decode(encode(p))) equals apply(p) with the same noise seeds, up to float32 parameter rounding."""
    for i in range(12):
        p = sample_params("mix", rng_for(300, i))
        q = decode(encode(p), noise_seed=p.noise1.seed)
        if p.noise2 is not None:
            p = replace(p, noise2=replace(p.noise2, seed=q.noise2.seed))
        a, b = degrade.apply(hr_patch, p), degrade.apply(hr_patch, q)
        assert np.mean(a == b) > 0.98 and np.abs(a - b).max() <= 3 / 255 + 1e-6


def test_encode_refuses_values_outside_the_layout():
    p = _golden_record()
    for bad in (
        replace(p, blur1=BlurParams(size=21, sigma_x=3.5, sigma_y=1.0, theta=0.0)),
        replace(p, blur1=BlurParams(size=23, sigma_x=1.0, sigma_y=1.0, theta=0.0)),
        replace(p, noise1=replace(p.noise1, strength=31.0)),
        replace(p, noise2=replace(p.noise2, strength=3.5)),
        replace(p, jpeg1=JpegParams(quality=20)),
        replace(p, resize1=ResizeParams(scale=0.1, mode="area")),
    ):
        with pytest.raises(ValueError, match="outside the dasr33-v1 range"):
            encode(bad)


def test_check_recipe_refuses_ranges_beyond_the_layout():
    lv = degrade.LEVELS[2]
    with pytest.raises(ValueError, match="blur1.sigma_x"):
        check_recipe(replace(lv, stage1=replace(lv.stage1, blur_sigma_range=(0.2, 4.0))))
    with pytest.raises(ValueError, match="noise1.strength"):
        check_recipe(replace(lv, stage1=replace(lv.stage1, poisson_scale_range=(0.05, 5.0))))
    with pytest.raises(ValueError, match="jpeg1.quality"):
        check_recipe(replace(lv, stage1=replace(lv.stage1, jpeg_range=(10.0, 95.0))))
    wide = replace(lv, stage1=replace(lv.stage1, resize_range=(0.1, 1.2)))
    with pytest.raises(ValueError, match="resize1.scale"):
        sample_params(2, rng_for(0), recipes={2: wide})
    for recipe in degrade.LEVELS.values():
        check_recipe(recipe)


@pytest.mark.parametrize(
    "v,message",
    [
        (np.zeros(32), "33 values"),
        (np.zeros(34), "33 values"),
        (np.full(33, np.nan), "NaN"),
        (np.r_[np.zeros(18), 1.5, np.zeros(14)], r"entry 18 \(noise1.strength\)"),
        (np.r_[-0.1, np.zeros(32)], "outside"),
    ],
)
def test_decode_refuses_bad_vectors(v, message):
    with pytest.raises(ValueError, match=message):
        decode(v)


def test_decode_rules_for_edited_vectors():
    v = encode(_golden_record()).astype(np.float64)
    v[0] = 0.42  # size 1 + 8.4 = 9.4 -> nearest odd is 9
    assert decode(v).blur1.size == 9
    v[0] = 0.0  # size 1 -> no blur
    assert decode(v).blur1 is None
    v[20:22] = [0.2, 0.7]  # soft one-hot: largest entry wins
    assert decode(v).noise1.type == "poisson"
    v[20:22] = [0.1, 0.2]  # sums below 0.5: no noise
    assert decode(v).noise1 is None
    v[27] = 1.0  # quality 100: no second JPEG
    assert decode(v).jpeg2 is None
    v[28:30] = 0  # no final order: one-stage, stage-2 fields ignored
    p = decode(v)
    assert not p.two_stage and p.blur2 is None and p.sinc is None and p.noise2 is None


def _one_stage_vector() -> np.ndarray:
    """v of a one-stage record with every step absent but the final resize (float64, for hand edits)."""
    plain = DegradationParams(level=1, blur1=None, resize1=None, noise1=None, jpeg1=None,
                              final=FinalParams(order=None, mode="area"))
    return encode(plain).astype(np.float64)


def test_decoded_kernel_sizes_at_a_tie_go_up():
    """Missed: `_odd_size` rounding ties to even (Python's round) went unnoticed; no test decoded a size
    exactly between two odd sizes. Oracle: the rule "nearest odd size, ties go up" (vector._odd_size),
    worked by hand: size 1 + 20 v at v = 0.05 is 2, between 1 and 3 -> 3 (ties to even gave 1: no blur);
    at v = 0.25 it is 6, between 5 and 7 -> 7 (ties to even gave 5). Just below a tie rounds down."""
    v = _one_stage_vector()
    v[1:3] = [0.5, 0.5]  # sigma 1.5 px, isotropic: a blur whenever the size is 3 or more
    for entry, size in ((0.05, 3), (0.25, 7), (0.45, 11), (0.049, None), (0.249, 5)):
        v[0] = entry
        blur = decode(v).blur1
        assert (None if blur is None else blur.size) == size, entry


def test_a_one_hot_group_summing_exactly_one_half_is_set():
    """Missed: the threshold "sum >= 0.5" read as "> 0.5" survived; the tests used sums of 0.3 and 0.9.
    Oracle: docs/degradation.md, "a one-hot group is set when its entries sum to at least 0.5, and
    picks its largest entry". 0.5 is exact in binary, so the sum is 0.5 itself."""
    v = _one_stage_vector()
    v[18] = 0.5  # noise1 strength 15 (Gaussian) or 1.5 (Poisson)
    v[20:22] = [0.0, 0.5]
    assert decode(v).noise1.type == "poisson"
    v[20:22] = [0.25, 0.25]  # a tie inside the group: the first entry (argmax)
    assert decode(v).noise1.type == "gaussian"
    v[11:14] = [0.0, 0.0, 0.5]
    assert decode(v).resize1.mode == "bicubic"
    v[28:30] = [0.0, 0.5]
    assert decode(v).final.order == "B" and decode(v).two_stage
    v[20:22], v[11:14], v[28:30] = [0.0, 0.4999], [0.0, 0.0, 0.4999], [0.0, 0.4999]  # below: unset
    p = decode(v)
    assert p.noise1 is None and p.resize1 is None and not p.two_stage


def test_a_gray_flag_of_exactly_one_half_is_gray():
    """Missed: "gray when its flag >= 0.5" read as "> 0.5" survived; no test decoded a flag of 0.5.
    Oracle: docs/degradation.md's decoding rules, "gray when its flag >= 0.5"."""
    v = _one_stage_vector()
    v[18], v[20:22] = 0.5, [1.0, 0.0]  # Gaussian noise1, sigma 15
    for flag, gray in ((0.5, True), (0.4999, False), (1.0, True), (0.0, False)):
        v[19] = flag
        assert decode(v).noise1.gray is gray, flag
    v[28:30], v[22], v[24:26], v[23] = [1.0, 0.0], 0.5, [0.0, 1.0], 0.5  # noise2, stage 2
    assert decode(v).noise2.gray is True


def test_a_blur_with_one_zero_sigma_is_a_line_kernel():
    """Missed: "a blur with zero sigma is absent" read on the smaller sigma (min) instead of both survived;
    every decoded blur had two positive sigmas. Oracle: docs/degradation.md, "a blur with zero sigma
    means no blur; a zero minor sigma is kept at 0.001 px (a line kernel)": size 7, sigma_x 2, sigma_y 0
    is BlurParams(7, 2, 0.001, 0), whose kernel has all its weight on the middle row (a vertical line
    for sigma_x 0, sigma_y 2); both sigmas 0 is no blur."""
    v = _one_stage_vector()
    v[0], v[3] = 0.3, 0.0  # size 1 + 6 = 7, theta 0
    v[1:3] = [2 / 3, 0.0]
    blur = decode(v).blur1
    assert blur is not None and blur.size == 7 and blur.sigma_y == 1e-3 and blur.theta == 0.0
    assert blur.sigma_x == pytest.approx(2.0, rel=1e-12)
    kernel = blur.kernel()
    assert kernel[3].sum() == pytest.approx(1.0, abs=1e-9) and kernel[3, 0] > 0.01
    v[1:3] = [0.0, 2 / 3]
    column = decode(v).blur1
    assert column is not None and column.sigma_y == 1e-3
    assert column.kernel()[:, 3].sum() == pytest.approx(1.0, abs=1e-9)
    v[1:3] = [0.0, 0.0]
    assert decode(v).blur1 is None
    v[28:30], v[4], v[5:7] = [1.0, 0.0], 0.3, [0.0, 1 / 3]  # stage 2 reads the same rule
    assert decode(v).blur2 is not None and decode(v).blur2.sigma_y == 1e-3


def test_careless_arguments_get_the_librarys_error():
    """They raised AttributeError, TypeError or a plain ValueError, with messages such as 'has 33 values,
    got 33' for a (1, 33) vector."""
    from degrade.errors import DegradeError

    v = degrade.encode(degrade.sample_params(2, np.random.default_rng(0)))
    for call, message in ((lambda: degrade.encode({"level": 2}), "encode takes a DegradationParams, not dict"),
                          (lambda: degrade.encode(None), "not NoneType"),
                          (lambda: degrade.decode(["a"] * 33), "is 33 numbers"),
                          (lambda: degrade.decode(v[None]), "got shape \\(1, 33\\)"),
                          (lambda: degrade.sample_params(2, 0), "rng must be a numpy Generator"),
                          (lambda: degrade.sample_params(2, None), "not NoneType"),
                          (lambda: degrade.sample_params(True, np.random.default_rng(0)), "unknown level True")):
        with pytest.raises(DegradeError, match=message):
            call()
