"""Ops (docs/degradation.md): a contract over every op, then each op's own semantics."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage, stats

from degrade import filters, noise, ops, pixels
from degrade.kernels import gaussian_kernel, sinc_kernel

from .conftest import rng_for

OPS = {
    "blur_iso": lambda x: ops.blur(x, gaussian_kernel(21, 1.5, 1.5, 0.0)),
    "blur_aniso": lambda x: ops.blur(x, gaussian_kernel(15, 2.0, 0.4, 1.0)),
    "sinc": lambda x: ops.blur(x, sinc_kernel(13, 1.1)),
    "resize_area": lambda x: ops.resize(x, (50, 70), mode="area"),
    "resize_bilinear": lambda x: ops.resize(x, (150, 90), mode="bilinear"),
    "resize_bicubic": lambda x: ops.resize(x, (33, 200), mode="bicubic"),
    # Same size: a copy, never the input itself (a mutant returning `img` passed before this row).
    "resize_same": lambda x: ops.resize(x, x.shape[:2], mode="bilinear"),
    "gaussian_color": lambda x: ops.add_gaussian_noise(x, 12.0, gray=False, rng=rng_for(1)),
    "gaussian_gray": lambda x: ops.add_gaussian_noise(x, 12.0, gray=True, rng=rng_for(1)),
    "poisson_color": lambda x: ops.add_poisson_noise(x, 1.0, gray=False, rng=rng_for(1)),
    "poisson_gray": lambda x: ops.add_poisson_noise(x, 1.0, gray=True, rng=rng_for(1)),
    "jpeg": lambda x: ops.jpeg(x, 40),
    "clamp": ops.clamp,
    "quantise": ops.quantise,
}
# Ops whose output may leave [0, 1] by design: the pipeline clamps after noise (docs/degradation.md),
# bicubic and sinc overshoot.
UNBOUNDED = {"resize_bicubic", "sinc", "gaussian_color", "gaussian_gray", "poisson_color", "poisson_gray"}


@pytest.mark.parametrize("name", sorted(OPS))
def test_op_contract(name, hr_patch):
    before = hr_patch.copy()
    out = OPS[name](hr_patch)  # hr_patch is read-only: an in-place write would raise
    np.testing.assert_array_equal(hr_patch, before)
    assert out.dtype == np.float32 and out.ndim == 3 and out.shape[2] == 3
    assert out is not hr_patch and not np.shares_memory(out, hr_patch)
    assert np.all(np.isfinite(out))
    if name.startswith("resize"):
        assert out.shape[:2] == {"resize_area": (50, 70), "resize_bilinear": (150, 90), "resize_bicubic": (33, 200),
                                 "resize_same": hr_patch.shape[:2]}[name]
    else:
        assert out.shape == hr_patch.shape
    if name not in UNBOUNDED:
        assert out.min() >= 0.0 and out.max() <= 1.0
    assert OPS[name](hr_patch).tobytes() == out.tobytes()  # deterministic, rng included


@pytest.mark.parametrize("name", sorted(OPS))
def test_ops_refuse_non_float32_rgb(name):
    for bad in (np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.float32), np.zeros((8, 8, 4), np.float32)):
        with pytest.raises(ValueError):
            OPS[name](bad)


KERNELS = {
    "iso": gaussian_kernel(21, 1.5, 1.5, 0.0),
    "axis_aligned": gaussian_kernel(21, 2.5, 0.5, 0.0),
    "aniso_wide": gaussian_kernel(21, 3.0, 0.2, 0.7),
    "aniso_small": gaussian_kernel(11, 0.6, 0.2, 2.0),
    "sinc": sinc_kernel(21, 1.0),
}


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_blur_is_correlation_with_reflect101_borders(name, hr_patch):
    """Equals scipy's float64 correlation with mode='mirror' (= reflect-101) within 1e-6."""
    k = KERNELS[name]
    expected = np.stack([ndimage.correlate(hr_patch[..., c].astype(np.float64), k, mode="mirror") for c in range(3)], -1)
    np.testing.assert_allclose(ops.blur(hr_patch, k), expected, atol=1e-6)


def test_blur_correlates_rather_than_convolves():
    img = np.zeros((15, 15, 3), np.float32)
    img[7, 7] = 1.0
    k = np.zeros((3, 3))
    k[0, 2] = 1.0  # correlation: out[y, x] = in[y - 1, x + 1]
    out = ops.blur(img, k)
    assert out[8, 6, 0] == 1.0 and out.sum() == 3.0


def test_blur_keeps_a_constant_image():
    flat = np.full((40, 40, 3), 0.3, np.float32)
    for k in KERNELS.values():
        np.testing.assert_allclose(ops.blur(flat, k), 0.3, atol=1e-6)


@pytest.mark.parametrize("mode", ["area", "bilinear", "bicubic"])
def test_resize_keeps_a_constant_image_and_rounds_sizes(mode):
    flat = np.full((64, 48, 3), 0.7, np.float32)
    out = ops.resize(flat, ops.scaled_size(flat.shape, 0.37), mode=mode)
    assert out.shape == (24, 18, 3)  # round(64 * 0.37) = 24, round(48 * 0.37) = 18
    np.testing.assert_allclose(out, 0.7, atol=1e-6)


def test_scaled_size_is_at_least_one_pixel():
    assert ops.scaled_size((4, 4), 0.1) == (1, 1)
    assert ops.resize(np.ones((4, 4, 3), np.float32), (1, 1), mode="bicubic").shape == (1, 1, 3)


def test_resize_area_by_an_integer_factor_is_block_averaging(hr_patch):
    expected = hr_patch.reshape(32, 4, 32, 4, 3).mean(axis=(1, 3))
    np.testing.assert_allclose(ops.resize(hr_patch, (32, 32), mode="area"), expected, atol=1e-6)


def test_resize_rejects_unknown_mode(hr_patch):
    with pytest.raises(ValueError, match="unknown resize mode"):
        ops.resize(hr_patch, (10, 10), mode="nearest")  # type: ignore[arg-type]


# --- noise: strength measured on a flat image matches its parameter ------------------------------

FLAT = np.full((256, 256, 3), 0.5, np.float32)


@pytest.mark.parametrize("sigma", [1.0, 10.0, 30.0])
def test_gaussian_noise_std_matches_sigma(sigma):
    noise = (ops.add_gaussian_noise(FLAT, sigma, gray=False, rng=rng_for(3)) - 0.5) * 255
    # 196,608 draws: the standard error of the std is 0.16 %; 2 % is > 10 standard errors.
    assert noise.std() == pytest.approx(sigma, rel=0.02)
    assert abs(noise.mean()) < 5 * sigma / math.sqrt(noise.size)
    corr = np.corrcoef(noise[..., 0].ravel(), noise[..., 1].ravel())[0, 1]
    assert abs(corr) < 0.02  # independent per channel


def test_gray_gaussian_noise_is_one_field_for_all_channels():
    noise = (ops.add_gaussian_noise(FLAT, 8.0, gray=True, rng=rng_for(3)) - 0.5) * 255
    np.testing.assert_array_equal(noise[..., 0], noise[..., 1])
    np.testing.assert_array_equal(noise[..., 0], noise[..., 2])
    assert noise.std() == pytest.approx(8.0, rel=0.02)


def _ramp_plus_flat(level: int) -> np.ndarray:
    """Rows 0-3: all 256 8-bit values (so V = 256); rows 4-: flat at `level` / 255."""
    img = np.full((516, 512, 3), level / 255, np.float32)
    img[:4] = (np.arange(512) % 256 / 255).astype(np.float32)[None, :, None]
    return img


@pytest.mark.parametrize("level,scale", [(64, 1.0), (200, 2.5), (128, 0.3)])
def test_poisson_noise_variance_matches_shot_noise(level, scale):
    img = _ramp_plus_flat(level)
    noise = ops.add_poisson_noise(img, scale, gray=False, rng=rng_for(4))[4:] - img[4:]
    # Poisson(x V) / V - x with V = 256 has mean 0 and variance x / V; times the scale.
    expected_var = level / 255 / 256 * scale**2
    assert noise.var() == pytest.approx(expected_var, rel=0.03)  # SE of the variance ~0.3 %
    assert abs(noise.mean()) < 5 * math.sqrt(expected_var / noise.size)


@pytest.mark.parametrize("extra,levels", [((0.0, 1.0), 4), ((0.0, 0.25, 0.75, 1.0), 8)])
def test_poisson_levels_follow_the_distinct_value_count(extra, levels):
    """V = 2^ceil(log2 d) for d distinct 8-bit values (docs/degradation.md): 3 values -> V = 4, 5 -> V = 8.

    The flat region is (k / V - x_q) * scale + x with k ~ Poisson(x_q V). The test once checked only that
    k is an integer on the 1/V grid, which V / 2 (a floor in place of the ceil) also passes (k then
    even). Oracles: some k is odd; the variance of the noise is x_q / V (Poisson(x_q V) / V), within
    10 % (12,096 draws: the standard error is 1.4 %; V / 2 doubles it).
    """
    img = np.full((64, 64, 3), 0.5, np.float32)
    img[0, : len(extra)] = np.asarray(extra, np.float32)[:, None]
    out = ops.add_poisson_noise(img, 1.0, gray=False, rng=rng_for(5))
    x_q = round(0.5 * 255) / 255
    k = (out[1:] - 0.5 + x_q) * levels
    np.testing.assert_allclose(k, np.round(k), atol=1e-4)
    assert np.round(k).std() > 0.5
    assert np.any(np.round(k) % 2 == 1)
    assert (out[1:] - 0.5).var() == pytest.approx(x_q / levels, rel=0.1)


def test_gray_poisson_noise_is_one_field_on_the_luma():
    img = _ramp_plus_flat(100)
    noise = ops.add_poisson_noise(img, 1.0, gray=True, rng=rng_for(6)) - img
    np.testing.assert_allclose(noise[..., 0], noise[..., 2], atol=1e-6)
    assert noise[4:].var() == pytest.approx(100 / 255 / 256, rel=0.03)


@pytest.mark.parametrize("levels", [1, 8, 256])
def test_poisson_sampler_matches_the_poisson_pmf(levels):
    """The table sampler against scipy's pmf: chi-square over the bulk of the support."""
    q = np.full(200_000, 77, np.uint8)
    lam = 77 / 255 * levels
    counts = noise._poisson_counts(q, levels, rng_for(7))
    assert counts.mean() == pytest.approx(lam, rel=0.01, abs=0.005)
    assert counts.var() == pytest.approx(lam, rel=0.02, abs=0.005)
    ks = np.arange(counts.max() + 1)
    observed = np.bincount(counts, minlength=ks.size)
    expected = stats.poisson.pmf(ks, lam) * counts.size
    keep = expected > 20
    observed_kept = np.append(observed[keep], observed[~keep].sum())
    expected_kept = np.append(expected[keep], counts.size - expected[keep].sum())
    assert stats.chisquare(observed_kept, expected_kept).pvalue > 1e-4


def test_poisson_of_zero_is_zero():
    assert not noise._poisson_counts(np.zeros(1000, np.uint8), 256, rng_for(8)).any()


# --- JPEG --------------------------------------------------------------------------------------


def _sof_sampling(data: bytes) -> list[tuple[int, int]]:
    """(H, V) sampling factors per component from a baseline JPEG's SOF0 segment."""
    i = data.index(b"\xff\xc0")
    n = data[i + 9]
    return [(data[i + 11 + 3 * c] >> 4, data[i + 11 + 3 * c] & 15) for c in range(n)]


def test_jpeg_is_baseline_420(hr_patch):
    data = ops.encode_jpeg(hr_patch, 75)
    assert data[:2] == b"\xff\xd8"
    assert _sof_sampling(data) == [(2, 2), (1, 1), (1, 1)]  # luma 2x2, chroma 1x1: 4:2:0


def test_jpeg_output_is_8bit_and_quality_orders_the_error(hr_patch):
    errors = []
    for q in (20, 60, 95):
        out = ops.jpeg(hr_patch, q)
        np.testing.assert_allclose(out * 255, np.round(out * 255), atol=1e-4)
        errors.append(np.abs(out - hr_patch).mean())
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.02


def test_jpeg_keeps_rgb_order():
    red = np.zeros((32, 32, 3), np.float32)
    red[..., 0] = 1.0
    out = ops.jpeg(red, 90)
    assert out[..., 0].mean() > 0.9 and out[..., 2].mean() < 0.1


@pytest.mark.parametrize("q", [0, 101, 0.4, 100.6, "50", math.nan, True, 10**400, math.inf])
def test_jpeg_rejects_bad_quality(q, hr_patch):
    with pytest.raises(ValueError):
        ops.jpeg(hr_patch, q)


def test_a_fractional_jpeg_quality_is_rounded_not_truncated(hr_patch):
    """round(q), as the contract says (int() made 30.7 encode at 30)."""
    for q, used in ((30.7, 31), (50.2, 50), (89.9, 90), (np.float32(70.6), 71), (np.int64(64), 64)):
        assert ops.encode_jpeg(hr_patch, q) == ops.encode_jpeg(hr_patch, used)
    assert ops.encode_jpeg(hr_patch, 30.7) != ops.encode_jpeg(hr_patch, 30)


def test_clamp_clips_both_ends_to_the_unit_interval():
    """Missed: clamp clipping only below 0 (clip(0, None)) survived; the op contract clamps a photo
    already in [0, 1]. Oracle: docs/degradation.md, "clamp" to [0, 1] after noise: values written out
    by hand, below 0 -> 0, inside kept bit for bit, above 1 -> 1; float32 out, the input untouched."""
    x = np.array([[[-0.5, -1e-6, 0.0], [0.3, 1.0, 1.0 + 1e-6], [2.5, 0.999, 40.0]]], np.float32)
    before = x.copy()
    out = ops.clamp(x)
    expected = np.array([[[0.0, 0.0, 0.0], [0.3, 1.0, 1.0], [1.0, 0.999, 1.0]]], np.float32)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(x, before)


def test_quantise_rounds_to_8bit_levels_and_clips():
    x = np.array([[[-0.2, 0.5, 1.3]]], np.float32)
    np.testing.assert_array_equal(ops.quantise(x) * 255, [[[0, 128, 255]]])


@pytest.mark.parametrize("size", [(38, 38), (77, 50), (159, 128), (218, 300), (307, 128), (1, 3)])
def test_area_resize_is_adaptive_average_pooling(size, hr_patch):
    """PyTorch's `area`: output (i, j) averages rows floor(iH/h)..ceil((i+1)H/h)-1, likewise columns."""
    h, w = size
    H, W = hr_patch.shape[:2]
    expected = np.empty((h, w, 3))
    for i in range(h):
        r0, r1 = (i * H) // h, -(-(i + 1) * H // h)
        for j in range(w):
            c0, c1 = (j * W) // w, -(-(j + 1) * W // w)
            expected[i, j] = hr_patch[r0:r1, c0:c1].astype(np.float64).mean(axis=(0, 1))
    np.testing.assert_allclose(ops.resize(hr_patch, size, mode="area"), expected, atol=1e-6)


@pytest.mark.parametrize("levels,q", [(256, 255), (256, 40), (16, 128), (2, 200)])
def test_poisson_sampler_is_the_exact_inverse_cdf(levels, q):
    """k = min{k : u <= F(k)} for uniforms across the whole range, tails included (scipy's ppf). Each u
    goes in as the sampler sees it: its top 32 bits (bucket and table lookup), and u itself for the
    draws the table leaves open (the search)."""
    u = np.concatenate([[1e-15, 1e-9, 1e-4, 0.001, 0.003], np.linspace(0.01, 0.99, 99), [0.997, 0.9999, 1 - 1e-9]])
    bits = np.floor(u * 2.0**32).astype(np.uint32)
    asked = []

    def uniforms(pending):
        asked.append(pending)
        return u[pending]

    counts = noise._counts_from_bits(np.full(u.size, q, np.uint8), levels, bits, uniforms)
    np.testing.assert_array_equal(counts, stats.poisson.ppf(u, q / 255 * levels).astype(np.int64))
    assert asked and 0 < asked[0].size < u.size  # both paths were taken


def test_poisson_uniforms_are_uniform():
    """The uniforms behind the draws: 32 random bits, refined by a fresh float64 uniform inside their
    interval, are uniform on [0, 1] (Kolmogorov-Smirnov, 10^6 values), and so is the refinement inside
    the interval (the float64 resolution below the 32 bits); the bits are the generator's raw output,
    low half first."""
    rng = rng_for(15)
    bits = noise._random_bits(10**6 + 1, rng)
    u = noise._fine_uniforms(bits, rng)
    assert stats.kstest(u, "uniform").pvalue > 1e-3
    inside = u * 2.0**32 - bits  # exact: a power-of-2 scale and a difference of nearby numbers
    assert inside.min() >= 0.0 and inside.max() <= 1.0
    assert stats.kstest(inside, "uniform").pvalue > 1e-3
    raw = rng_for(15).bit_generator.random_raw(2)
    assert [int(b) for b in noise._random_bits(3, rng_for(15))] == [int(raw[0]) & 0xFFFFFFFF, int(raw[0]) >> 32,
                                                                      int(raw[1]) & 0xFFFFFFFF]


@pytest.mark.parametrize("bit_generator", [np.random.PCG64, np.random.PCG64DXSM, np.random.Philox, np.random.SFC64,
                                           np.random.MT19937])
def test_random_bits_equal_numpys_32_bit_integers_for_every_bit_generator(bit_generator):
    """Whatever the generator: the numbers of rng.integers(0, 2**32, dtype=uint32) (odd n too), uniform in
    all 32 bits. MT19937's raw output holds only 32 bits: read as 64 it would leave every other value 0."""
    bits = noise._random_bits(100_001, np.random.Generator(bit_generator(16)))
    expected = np.random.Generator(bit_generator(16)).integers(0, 2**32, 100_001, dtype=np.uint32)
    np.testing.assert_array_equal(bits, expected)
    top = (bits >> 31).mean()
    assert abs(top - 0.5) < 0.005 and (bits == 0).mean() < 1e-4  # 0.5 +- 3 sd of 100,001 fair bits


def test_poisson_draws_on_bucket_edges_and_at_one():
    """u exactly on a bucket's upper edge (the next bucket's lower edge, where `_fine_uniforms` can
    round to) gives scipy's inverse CDF there; u = 1.0 gives a finite count inside the table."""
    levels, q = 256, 128
    last_in_bucket = (np.arange(0, 2048, 37, dtype=np.uint32) << 21) | np.uint32((1 << 21) - 1)
    u = (last_in_bucket.astype(np.float64) + 1.0) / 2.0**32  # = (b + 1) / 2048 exactly
    counts = noise._counts_from_bits(np.full(u.size, q, np.uint8), levels, last_in_bucket, lambda p: u[p])
    np.testing.assert_array_equal(counts[u < 1], stats.poisson.ppf(u[u < 1], q / 255 * levels).astype(np.int64))
    top = noise._counts_from_bits(np.full(1, q, np.uint8), levels, np.array([2**32 - 1], np.uint32),
                                  lambda p: np.ones(p.size))
    _cdf, _direct, _noise, width = noise._poisson_tables(levels)
    assert 0 < top[0] < width and stats.poisson.cdf(top[0], q / 255 * levels) > 1 - 1e-12


def test_gray_noise_uses_bt601_luma_of_a_coloured_image():
    """On a pure-colour image the luma is 0.299 R + 0.587 G + 0.114 B: pure red has luma 0.299."""
    img = np.zeros((64, 64, 3), np.float32)
    img[..., 0] = 1.0
    img[0, :, :] = (np.arange(64) * 4 / 255)[:, None]  # many distinct values: V = 64 levels at least
    noisy = ops.add_poisson_noise(img, 1.0, gray=True, rng=rng_for(9))
    q = round(0.299 * 255)  # the quantised luma of the red rows
    counts = (noisy[1:, :, 0] - 1.0 + q / 255)  # = k / V for integer k
    levels = 2 ** math.ceil(math.log2(len(np.unique(np.rint(np.clip(img @ ops.LUMA, 0, 1) * 255)))))
    np.testing.assert_allclose(counts * levels, np.round(counts * levels), atol=1e-3)
    assert (counts * levels).mean() == pytest.approx(q / 255 * levels, rel=0.05)  # Poisson mean = luma * V


def _torch_like_resize_1d(n: int, m: int, mode: str) -> np.ndarray:
    """(m, n) interpolation matrix of F.interpolate(align_corners=False): half-pixel centres, clamped edges."""
    out = np.zeros((m, n))
    for i in range(m):
        src = (i + 0.5) * n / m - 0.5
        if mode == "bilinear":
            src = max(src, 0.0)
            j = int(math.floor(src))
            t = src - j
            for jj, wt in ((j, 1 - t), (j + 1, t)):
                out[i, min(max(jj, 0), n - 1)] += wt
        else:  # bicubic, a = -0.75 (Keys), indices clamped
            j = math.floor(src)
            t = src - j
            a = -0.75

            def cubic(x):
                x = abs(x)
                if x <= 1:
                    return (a + 2) * x**3 - (a + 3) * x**2 + 1
                return a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a if x < 2 else 0.0

            for d in (-1, 0, 1, 2):
                out[i, min(max(j + d, 0), n - 1)] += cubic(t - d)
    return out


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
@pytest.mark.parametrize("size", [(38, 38), (77, 50), (218, 300), (5, 3)])
def test_bilinear_and_bicubic_follow_pytorch_semantics(mode, size, hr_patch):
    rows = _torch_like_resize_1d(hr_patch.shape[0], size[0], mode)
    cols = _torch_like_resize_1d(hr_patch.shape[1], size[1], mode)
    expected = np.einsum("ih,hwc,jw->ijc", rows, hr_patch.astype(np.float64), cols, optimize=True)  # two GEMMs
    np.testing.assert_allclose(ops.resize(hr_patch, size, mode=mode), expected, atol=2e-5)


# --- blur plans: what is left out of a kernel, bounded and tested ----------------------------------


def _kernels_of_every_level(n: int) -> list[np.ndarray]:
    """Every blur and sinc kernel of `n` records per level (sizes 7-21, all shapes the recipes draw)."""
    from degrade import sample_params

    out = []
    for level in (1, 2, 3):
        for i in range(n):
            p = sample_params(level, rng_for(700 + level, i))
            out += [s.kernel() for s in (p.blur1, p.blur2, p.sinc) if s is not None]
    return out


def _plan_kernel(plan: filters._BlurPlan, shape: tuple[int, int]) -> np.ndarray:
    """The 2-D kernel a plan applies, rebuilt from the float32 taps OpenCV gets."""
    kh, kw = shape
    cy, cx = kh // 2, kw // 2
    k = np.zeros(shape)
    for col, row in plan.float32_terms:
        y0, x0 = cy - col.size // 2, cx - row.size // 2
        k[y0 : y0 + col.size, x0 : x0 + row.size] += np.outer(col.astype(np.float64), row.astype(np.float64))
    for taps, (ax, ay) in plan.float32_pieces:
        k[cy - ay : cy - ay + taps.shape[0], cx - ax : cx - ax + taps.shape[1]] += taps
    return k


@pytest.mark.parametrize("values", [64 * 64 * 3, 256 * 256 * 3])
def test_blur_plans_leave_out_at_most_the_tolerance(values):
    """For every kernel the recipes draw: a plan exists, its L1 error <= BLUR_TOLERANCE (1e-7), it is
    what its OpenCV taps add up to (to float32 rounding), and no piece is big enough for OpenCV's DFT."""
    for k in _kernels_of_every_level(40):
        plan = filters._blur_plan(k, values)
        assert plan is not None
        assert np.abs(k - plan.approx).sum() == pytest.approx(plan.error, abs=1e-15)
        assert plan.error <= ops.BLUR_TOLERANCE
        # OpenCV filters with float32 taps: each rounds by <= 2^-24 relative (a product of two: 3 of them).
        eps = 2.0**-24
        rounding = sum(3 * eps * np.abs(c).sum() * np.abs(r).sum() for c, r in plan.terms)
        rounding += sum(eps * np.abs(t).sum() for t, _ in plan.pieces)
        assert np.abs(_plan_kernel(plan, k.shape) - plan.approx).sum() <= rounding
        for (taps, (ax, ay)), nnz in zip(plan.pieces, plan.taps[len(plan.terms) :]):
            assert taps.size < filters._DFT_AREA and 0 <= ax < taps.shape[1] and 0 <= ay < taps.shape[0]
            assert np.count_nonzero(taps) == nnz
        for col, row in plan.terms:
            assert col.size % 2 == 1 and row.size % 2 == 1


def test_blur_of_real_images_is_within_1e6_of_the_exact_correlation(photo):
    """Every recipe kernel on real photo content (256 px and 64 px) against scipy's float64 2-D
    correlation with reflect-101 borders: max abs difference < 1e-6 (the exact filters' tolerance)."""
    big = np.ascontiguousarray(photo[:256, :256])
    small = np.ascontiguousarray(photo[300:364, 100:164])
    worst = 0.0
    for j, k in enumerate(_kernels_of_every_level(12)):
        img = big if j % 3 == 0 else small
        expected = np.stack([ndimage.correlate(img[..., c].astype(np.float64), k, mode="mirror") for c in range(3)], -1)
        worst = max(worst, float(np.abs(ops.blur(img, k) - expected).max()))
    assert worst < 1e-6


def test_blur_svd_plan_and_full_kernel_fallback(hr_patch):
    """The truncated-SVD plan is exact to the tolerance too, and a kernel too large to split into
    pieces (hand-written records allow sizes up to 51) is applied whole."""
    k = gaussian_kernel(21, 3.0, 2.5, 0.3)  # fat anisotropic: few SVD terms
    plan = filters._svd_plan(k)
    assert plan is not None and 1 < len(plan.terms) < 10 and plan.error <= ops.BLUR_TOLERANCE
    big = gaussian_kernel(41, 6.0, 2.0, 0.5)
    assert filters._pieces_plan(big) is None
    expected = np.stack([ndimage.correlate(hr_patch[..., c].astype(np.float64), big, mode="mirror") for c in range(3)], -1)
    np.testing.assert_allclose(ops.blur(hr_patch, big), expected, atol=1e-6)


# --- the fast paths equal the plain formulas bit for bit --------------------------------------------


def test_quantise_8bit_equals_round_of_clip_including_ties():
    steps = (np.arange(256) + 0.5) / 255
    ties = np.concatenate([np.nextafter(steps, -1), steps, np.nextafter(steps, 2)]).astype(np.float32)
    x = np.concatenate([ties, rng_for(10).uniform(-0.3, 1.3, 30_000).astype(np.float32), [-0.0, 0.0, 1.0]])
    x = x[: x.size // 3 * 3].reshape(-1, 1, 3).astype(np.float32)
    expected = np.rint(np.clip(x.astype(np.float32) * np.float32(255), 0, 255)).astype(np.uint8)
    np.testing.assert_array_equal(pixels.quantise_8bit(x), expected)
    np.testing.assert_array_equal(ops.quantise(x), expected.astype(np.float32) / np.float32(255))


def test_jpeg_is_the_decoded_encoding(hr_patch):
    """jpeg(x) is exactly the 8-bit image that libjpeg decodes from encode_jpeg(x), over 255."""
    import cv2

    for q in (30, 90):
        decoded = cv2.imdecode(np.frombuffer(ops.encode_jpeg(hr_patch, q), np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
        np.testing.assert_array_equal(ops.jpeg(hr_patch, q), decoded.astype(np.float32) / np.float32(255))


@pytest.mark.parametrize("levels", [2, 64, 256])
def test_poisson_noise_table_equals_counts(levels, hr_patch):
    """The noise read from the table is (k / levels - q / 255) in float64, rounded to float32, for the
    same draws k as `_poisson_counts` with the same seed."""
    q = pixels.quantise_8bit(hr_patch)
    counts = noise._poisson_counts(q, levels, rng_for(11))
    expected = (counts / levels - q / 255.0).astype(np.float32)
    np.testing.assert_array_equal(noise._poisson_noise(q, levels, rng_for(11)), expected)


def test_noise_ops_equal_their_formulas(hr_patch):
    g = ops.standard_normal((128, 128, 3), np.random.default_rng(12))
    np.testing.assert_array_equal(ops.add_gaussian_noise(hr_patch, 7.0, gray=False, rng=np.random.default_rng(12)),
                                  hr_patch + g * np.float32(7.0 / 255.0))
    q = pixels.quantise_8bit(hr_patch)
    levels = 2 ** math.ceil(math.log2(len(np.unique(q))))
    counts = noise._poisson_counts(q, levels, np.random.default_rng(13))
    shot = (counts / levels - q / 255.0).astype(np.float32)
    np.testing.assert_array_equal(ops.add_poisson_noise(hr_patch, 1.5, gray=False, rng=np.random.default_rng(13)),
                                  hr_patch + shot * np.float32(1.5))


def test_standard_normal_is_normal():
    """Box-Muller draws of a fixed seed: Kolmogorov-Smirnov against N(0, 1),
    moments, tail frequencies, and no dependence between the two halves (the two normals of a pair)."""
    z = ops.standard_normal((1000, 1001), rng_for(14)).astype(np.float64).ravel()
    assert stats.kstest(z, "norm").pvalue > 1e-3
    se = 1 / math.sqrt(z.size)
    assert abs(z.mean()) < 5 * se and abs(z.var() - 1) < 5 * math.sqrt(2) * se
    assert abs(stats.kurtosis(z)) < 5 * math.sqrt(24) * se
    for k in (2.0, 3.0, 4.0):  # two-sided tail frequencies within 5 binomial standard errors
        p = 2 * stats.norm.sf(k)
        assert abs(np.mean(np.abs(z) > k) - p) < 5 * math.sqrt(p / z.size)
    half = z.size // 2
    a, b = z[:half], z[half : 2 * half]
    assert abs(np.corrcoef(a, b)[0, 1]) < 5 * se and abs(np.corrcoef(a * a, b * b)[0, 1]) < 5 * se
    assert ops.standard_normal((7, 5, 3), rng_for(15)).shape == (7, 5, 3)  # odd counts
    np.testing.assert_array_equal(ops.standard_normal((9,), rng_for(16)), ops.standard_normal((9,), rng_for(16)))


class _FixedDraws:
    """Stands in for a Generator whose `random` returns chosen float64 / float32 uniforms."""

    def __init__(self, u64: np.ndarray, u32: np.ndarray):
        self.u64, self.u32 = u64, u32

    def random(self, size, dtype=np.float64):
        out = self.u64 if dtype == np.float64 else self.u32
        assert out.size == size
        return out.astype(dtype)


def test_standard_normal_tails_are_finite_and_reach_8_sigma():
    """u next to 1 (1 - 2^-53, the largest float64 uniform) gives the largest radius, sqrt(-2 ln 2^-53)
    = 8.57, not an infinity; u = 0 gives radius 0; the angle picks cos / sin."""
    u64 = np.array([1 - 2.0**-53, 1 - 2.0**-40, 0.0, 0.5])
    u32 = np.zeros(4, np.float32)  # angle 0: cos = 1 in the first half, sin = 0 in the second
    z = ops.standard_normal((8,), _FixedDraws(u64, u32))
    np.testing.assert_allclose(z[:4], np.sqrt(-2 * np.log(1 - u64)), rtol=1e-6)
    np.testing.assert_array_equal(z[4:], 0.0)
    assert np.all(np.isfinite(z)) and z[0] == pytest.approx(8.572, abs=1e-3)
