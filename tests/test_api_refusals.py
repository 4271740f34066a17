"""The `degrade` API used from Python: what a review found raising a raw numpy/OpenCV/Python error, or
silently returning NaN or a record v cannot describe, and now refused with DegradeError in one line."""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import pytest

import degrade
from degrade import ops
from degrade.augment import dihedral_vector
from degrade.errors import DegradeError
from degrade.params import BlurParams, DegradationParams, FinalParams, JpegParams, NoiseParams, ResizeParams


def _jpeg_only(order=None, level=1, **stage2) -> DegradationParams:
    return DegradationParams(level=level, blur1=None, resize1=None, noise1=None, jpeg1=JpegParams(quality=90),
                             final=FinalParams(order=order, mode="area"), **stage2)


def test_apply_refuses_a_jpeg_side_beyond_libjpeg_before_the_work():
    """A 32 x 65,504 HR (2 MP, under every cap) with a stage-1 JPEG was OpenCV's error line and a raw
    RuntimeError from the encoder; libjpeg encodes at most 65,500 px a side."""
    with pytest.raises(DegradeError, match="at 65504x32 px: a JPEG side can be at most 65500 px"):
        degrade.apply(np.zeros((32, 65504, 3), np.float32), _jpeg_only())
    up = dataclasses.replace(_jpeg_only(), resize1=ResizeParams(scale=1.5, mode="bilinear"))
    with pytest.raises(DegradeError, match="at 65502x48 px"):  # a stage-1 resize reaches it from narrower
        degrade.apply(np.zeros((32, 43668, 3), np.float32), up)
    assert degrade.apply(np.zeros((32, 65500, 3), np.float32), _jpeg_only()).shape == (8, 16375, 3)
    with pytest.raises(DegradeError, match="a JPEG side can be at most 65500 px"):  # the op itself too
        ops.jpeg(np.zeros((1, 65501, 3), np.float32), 90)


def test_a_recipe_whose_draws_a_record_refuses_is_refused_before_drawing():
    """blur_sigma_range (0, 1) lies in the layout's [0, 3], so the recipe passed its check, and 4 seeds in
    5,000 then drew a sigma under the records' 1e-3 mid-run. A noise range from 0 could draw strength 0."""
    stage = dataclasses.replace(degrade.LEVELS[2].stage1, blur_sigma_range=(0.0, 1.0))
    recipes = {2: dataclasses.replace(degrade.LEVELS[2], stage1=stage)}
    with pytest.raises(DegradeError, match=r"stage 1 blur_sigma_range \(0.0, 1.0\) must start at 0.001 or more"):
        degrade.sample_params(2, np.random.default_rng(0), recipes=recipes)
    stage = dataclasses.replace(degrade.LEVELS[2].stage1, gaussian_sigma_range=(0.0, 0.0))
    recipes = {2: dataclasses.replace(degrade.LEVELS[2], stage1=stage)}
    with pytest.raises(DegradeError, match="gaussian_sigma_range .* must start above 0"):
        degrade.sample_params(2, np.random.default_rng(0), recipes=recipes)
    for level in (1, 2, 3):  # the shipped recipes draw as before
        degrade.sample_params(level, np.random.default_rng(0))


def test_a_noise_step_of_strength_0_is_not_a_record_v_would_lose():
    """v encodes no noise as strength 0, so a record with noise of strength 0 decoded to noise None and
    lost the clamp after it: replaying its v differed by up to 2 levels. Such a record is refused now."""
    with pytest.raises(DegradeError, match=r"noise2.strength must be in \(0, 255\] for gaussian noise \(no noise: "
                                           r"None\), got 0.0"):
        DegradationParams(level=3, blur1=None, resize1=None, noise1=None, jpeg1=None,
                          final=FinalParams(order="A", mode="area"), resize2=ResizeParams(scale=1.5, mode="bicubic"),
                          noise2=NoiseParams(type="gaussian", strength=0.0, gray=False, seed=1))
    tiny = NoiseParams(type="poisson", strength=1e-9, gray=False, seed=1)  # the smallest noise is still noise
    record = dataclasses.replace(_jpeg_only(), noise1=tiny)
    assert degrade.decode(degrade.encode(record)).noise1.type == "poisson"


def test_records_from_json_and_dicts_refuse_in_one_line():
    good = degrade.sample_params(2, np.random.default_rng(0)).to_dict()
    with pytest.raises(DegradeError, match="the JSON is not UTF-8 text"):  # was 'a number of more than 4300 digits'
        DegradationParams.from_json(b'{"level": "\xff"}')
    with pytest.raises(DegradeError, match=r"unknown keys in parameter record: \['x', 1\]"):  # was a TypeError
        DegradationParams.from_dict({**good, 1: 0, "x": 0})
    blur = {**good["blur1"], 5: 1} if good["blur1"] else {"size": 3, "sigma_x": 1, "sigma_y": 1, "theta": 0, 5: 1}
    with pytest.raises(DegradeError, match=r"blur1: expected keys .* got \[.*5\]"):
        DegradationParams.from_dict({**good, "blur1": blur})


def test_kernels_at_extreme_values_refuse_instead_of_overflow_or_nan():
    with pytest.raises(DegradeError, match="Gaussian sigmas must be <= 1e\\+06"):  # was a raw OverflowError
        degrade.gaussian_kernel(5, 1e155, 1.0, 0.0)
    wide = degrade.gaussian_kernel(5, 1e6, 1e6, 0.0)
    np.testing.assert_allclose(wide, np.full((5, 5), 1 / 25))  # as wide as allowed: a box
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # was an all-NaN kernel and a RuntimeWarning
        with pytest.raises(DegradeError, match="omega_c 1e-200 is too small to make a kernel"):
            degrade.sinc_kernel(21, 1e-200)
    k = degrade.sinc_kernel(21, 1e-6)
    assert np.isfinite(k).all() and math.isclose(k.sum(), 1)


def test_ops_refuse_what_they_would_get_wrong():
    img = np.random.default_rng(0).random((16, 16, 3), dtype=np.float32)
    rng = np.random.default_rng(0)
    refused = [
        (lambda: ops.resize(img, (16.0, 16.0), mode="area"), "resize target must be \\(height, width\\) integers"),
        (lambda: ops.resize(img, 8, mode="area"), "resize target must be"),
        (lambda: ops.blur(img, np.zeros((3, 3))), "kernel must be finite and not all zero"),
        (lambda: ops.blur(img, np.full((3, 3), np.nan)), "kernel must be finite and not all zero"),
        (lambda: ops.blur(img, [[1.0]]), "kernel must be a 2-D array of real numbers"),
        (lambda: ops.blur(img.tolist(), np.ones((3, 3))), "expected an \\(H, W, 3\\) float32 image, got a list"),
        (lambda: ops.add_gaussian_noise(img, math.nan, gray=False, rng=rng), "sigma must be a finite number"),
        (lambda: ops.add_gaussian_noise(img, -1.0, gray=False, rng=rng), "noise sigma must be >= 0"),
        (lambda: ops.add_gaussian_noise(img, 5.0, gray=False, rng=0), "rng must be a numpy.random.Generator"),
        (lambda: ops.add_poisson_noise(img, 1.0, gray=False, rng=np.random.RandomState(0)),
         "rng must be a numpy.random.Generator .*got RandomState"),
        (lambda: ops.add_poisson_noise(np.zeros((0, 0, 3), np.float32), 1.0, gray=False, rng=rng),
         "non-empty \\(H, W, 3\\) float32 image"),
        (lambda: degrade.write_image("/tmp/never-written.png", img.tolist()), "image array, got a list"),
    ]
    for call, message in refused:
        with pytest.raises(DegradeError, match=message):
            call()
    before = img.copy()  # what they take still works, as before
    assert ops.resize(img, (np.int64(8), 8), mode="area").shape == (8, 8, 3)
    assert ops.resize(img, np.array([8, 12]), mode="bilinear").shape == (8, 12, 3)
    assert ops.blur(img, np.ones((3, 3)) / 9).shape == img.shape
    assert ops.add_gaussian_noise(img, 0.0, gray=True, rng=rng).shape == img.shape
    assert np.array_equal(img, before)


def test_vectors_must_hold_real_finite_numbers():
    """decode took strings ("0.5", which numpy converts) and complex numbers (a ComplexWarning);
    dihedral_vector returned NaN for NaN."""
    for bad in (["0.5"] * 33, np.full(33, 0.5 + 0j), [None] * 33):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(DegradeError, match="vector is 33 numbers"):
                degrade.decode(bad)
            with pytest.raises(DegradeError, match="v must be numbers"):
                dihedral_vector(bad)
    with pytest.raises(DegradeError, match="v must be finite numbers"):
        dihedral_vector(np.full(33, np.nan))
    v = degrade.encode(dataclasses.replace(_jpeg_only(), blur1=BlurParams.canonical(size=7, sigma_x=2.0, sigma_y=0.5,
                                                                                    theta=0.3)))
    assert degrade.decode([float(x) for x in v]) == degrade.decode(v)  # a list of floats, as before
    from fractions import Fraction

    assert degrade.decode([Fraction(float(x)) for x in v]) == degrade.decode(v)  # real numbers of any type
    assert dihedral_vector(v[None], flip_lr=True).shape == (1, 33)
