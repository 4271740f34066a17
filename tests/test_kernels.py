"""Kernels of docs/degradation.md: golden values and invariants."""

from __future__ import annotations

import math

import numpy as np
import pytest

from degrade.kernels import gaussian_kernel, sinc_kernel

SIZES = [3, 7, 13, 21]


@pytest.mark.parametrize("size", SIZES)
def test_kernels_sum_to_one_and_have_the_asked_shape(size):
    for k in (gaussian_kernel(size, 2.0, 0.7, 0.4), sinc_kernel(size, 1.3)):
        assert k.shape == (size, size)
        assert k.sum() == pytest.approx(1.0, abs=1e-12)


def test_gaussian_golden_isotropic_3x3():
    # exp(-(x^2 + y^2) / 2) on {-1, 0, 1}^2, normalised: an outer product of [e^-1/2, 1, e^-1/2].
    g = np.array([math.exp(-0.5), 1.0, math.exp(-0.5)])
    expected = np.outer(g, g) / np.outer(g, g).sum()
    np.testing.assert_allclose(gaussian_kernel(3, 1.0, 1.0, 0.0), expected, rtol=1e-12)
    # Centre tap, written out: 1 / (1 + 2 e^-1/2)^2 = 0.20417995557...
    assert gaussian_kernel(3, 1.0, 1.0, 0.0)[1, 1] == pytest.approx(0.2041799555716, rel=1e-10)


def test_gaussian_matches_an_independent_covariance_computation():
    size, sx, sy, theta = 9, 2.5, 0.8, 0.6
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    inv = np.linalg.inv(rot @ np.diag([sx**2, sy**2]) @ rot.T)
    r = (size - 1) // 2
    expected = np.empty((size, size))
    for row in range(size):
        for col in range(size):
            d = np.array([col - r, row - r])  # x = column offset, y = row offset
            expected[row, col] = math.exp(-0.5 * d @ inv @ d)
    np.testing.assert_allclose(gaussian_kernel(size, sx, sy, theta), expected / expected.sum(), rtol=1e-12)


def test_gaussian_orientation_follows_theta():
    # theta = 0: sigma_x along columns (x); theta = pi/2: along rows (y).
    k0 = gaussian_kernel(11, 3.0, 0.5, 0.0)
    k90 = gaussian_kernel(11, 3.0, 0.5, math.pi / 2)
    assert k0[5, 8] > k0[8, 5]
    np.testing.assert_allclose(k90, k0.T, atol=1e-15)
    # theta = pi/4: elongated along the main diagonal (x = y, down-right).
    k45 = gaussian_kernel(11, 3.0, 0.5, math.pi / 4)
    assert k45[7, 7] > 100 * k45[3, 7]


@pytest.mark.parametrize("sx,sy,theta", [(2.0, 0.6, 0.3), (1.1, 0.9, 2.9), (3.0, 0.2, 1.5)])
def test_gaussian_kernel_symmetries(sx, sy, theta):
    k = gaussian_kernel(15, sx, sy, theta)
    np.testing.assert_allclose(gaussian_kernel(15, sx, sy, theta + math.pi), k, atol=1e-14)
    np.testing.assert_allclose(gaussian_kernel(15, sy, sx, theta + math.pi / 2), k, atol=1e-14)
    np.testing.assert_allclose(k, k[::-1, ::-1], atol=1e-15)  # point symmetric


@pytest.mark.parametrize("size", SIZES)
def test_isotropic_gaussian_is_symmetric_and_rotation_free(size):
    k = gaussian_kernel(size, 1.3, 1.3, 0.0)
    np.testing.assert_allclose(k, k.T, atol=1e-15)
    np.testing.assert_allclose(k, k[::-1], atol=1e-15)
    np.testing.assert_allclose(gaussian_kernel(size, 1.3, 1.3, 1.0), k, atol=1e-15)


def test_sinc_golden_3x3_at_omega_pi():
    # Unnormalised taps: centre pi^2 / (4 pi) = pi / 4; edge (r = 1) pi J1(pi) / (2 pi) = J1(pi) / 2;
    # corner (r = sqrt 2) J1(pi sqrt 2) / (2 sqrt 2). J1(pi) = 0.28461534317975 (tables),
    # J1(pi sqrt 2) = 0.13788 ... computed below from the series to stay independent of scipy.
    def j1_series(x: float) -> float:
        return sum((-1) ** m / (math.factorial(m) * math.factorial(m + 1)) * (x / 2) ** (2 * m + 1) for m in range(30))

    assert j1_series(math.pi) == pytest.approx(0.28461534317975, abs=1e-12)
    centre, edge = math.pi / 4, j1_series(math.pi) / 2
    corner = j1_series(math.pi * math.sqrt(2)) / (2 * math.sqrt(2))
    raw = np.array([[corner, edge, corner], [edge, centre, edge], [corner, edge, corner]])
    np.testing.assert_allclose(sinc_kernel(3, math.pi), raw / raw.sum(), rtol=1e-10)


def test_sinc_is_circularly_symmetric_and_lower_cutoff_spreads_wider():
    k = sinc_kernel(21, 1.2)
    np.testing.assert_allclose(k, k.T, atol=1e-15)
    np.testing.assert_allclose(k, k[::-1, ::-1], atol=1e-15)
    assert k[10, 13] == pytest.approx(k[13, 10]) and k[10, 13] == pytest.approx(k[7, 10])
    assert sinc_kernel(21, math.pi / 3)[10, 10] < sinc_kernel(21, math.pi)[10, 10]


@pytest.mark.parametrize("bad", [0, 2, -3, 7.5, "7", True, None])
def test_bad_sizes_are_refused(bad):
    """7.5 passed `size % 2` and gave an 8 x 8 kernel; '7' a raw TypeError."""
    with pytest.raises(ValueError):
        gaussian_kernel(bad, 1.0, 1.0, 0.0)
    with pytest.raises(ValueError):
        sinc_kernel(bad, 1.0)


def test_bad_sigma_and_cutoff_are_refused():
    """Each a DegradeError: a NaN theta gave an all-NaN kernel, a sigma of 1e-160 one too (0 x inf), 1e-200 a
    ZeroDivisionError, a string sigma a TypeError. A tiny sigma still computable is a delta."""
    from degrade.errors import DegradeError

    for args in [(7, 0.0, 1.0, 0.0), (7, 1.0, 0.5, math.nan), (7, 1.0, 1e-160, 0.0), (7, 1e-200, 1e-200, 0.0),
                 (7, "1", 1.0, 0.0), (7, math.inf, 1.0, 0.0), (7, 1.0, 1.0, None), (7, 10**400, 1.0, 0.0),
                 (7, 1.0, 1.0, 10**400), (2**40 + 1, 1.0, 1.0, 0.0)]:  # OverflowError; an 8 TiB allocation
        with pytest.raises(DegradeError):
            gaussian_kernel(*args)
    for omega in (4.0, math.nan, "1", 10**400):
        with pytest.raises(DegradeError):
            sinc_kernel(7, omega)
    delta = np.zeros((7, 7))
    delta[3, 3] = 1
    np.testing.assert_array_equal(gaussian_kernel(np.int64(7), 1e-140, 1e-140, 0.0), delta)
