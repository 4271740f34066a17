"""v stays true to the image under the 8 flips / 90-degree rotations (degrade.augment).

The oracles never use the theta rule: they transform the kernel *array* (np.flip / np.rot90), or
re-degrade the transformed HR with the record decoded from the transformed v.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import degrade
from degrade import BlurParams, DegradationParams, FinalParams, decode, encode, sample_params
from degrade.augment import dihedral_image, dihedral_vector
from degrade.vector import FIELDS_BY_NAME

from .conftest import rng_for

TURNS = [dict(flip_lr=a, flip_ud=b, rot90=k) for a, b, k in itertools.product((False, True), (False, True), range(4))]
THETAS = [FIELDS_BY_NAME[f"{s}.theta"].index for s in ("blur1", "blur2")]


def _anisotropic_records(n: int) -> list[DegradationParams]:
    out, i = [], 0
    while len(out) < n:
        p = sample_params(3, rng_for(11, i))
        i += 1
        if any(b is not None and not b.isotropic for b in (p.blur1, p.blur2)):
            out.append(p)
    return out


def test_the_arguments_name_all_eight_transforms():
    img = np.arange(12).reshape(3, 4)
    assert len({dihedral_image(img, **t).tobytes() + bytes(dihedral_image(img, **t).shape) for t in TURNS}) == 8


def test_each_argument_is_the_transform_its_name_says():
    """Missed: the flips swapped, or a turn the other way, passed (the tests compared dihedral_image only with
    itself). Oracle: the docstring's order (columns reversed, then rows, then np.rot90, counter-clockwise),
    on a 2x3 array with every result written out by hand."""
    img = np.array([[1, 2, 3], [4, 5, 6]])
    cases = [
        (dict(flip_lr=True), [[3, 2, 1], [6, 5, 4]]),
        (dict(flip_ud=True), [[4, 5, 6], [1, 2, 3]]),
        (dict(rot90=1), [[3, 6], [2, 5], [1, 4]]),
        (dict(rot90=-1), [[4, 1], [5, 2], [6, 3]]),
        (dict(flip_lr=True, rot90=1), [[1, 4], [2, 5], [3, 6]]),  # flip first: rot90 then flip gives [[6, 3], ...]
        (dict(flip_ud=True, rot90=1), [[6, 3], [5, 2], [4, 1]]),
        (dict(flip_lr=True, flip_ud=True), [[6, 5, 4], [3, 2, 1]]),
    ]
    for turn, expected in cases:
        np.testing.assert_array_equal(dihedral_image(img, **turn), expected, err_msg=str(turn))
    np.testing.assert_array_equal(dihedral_image(img), img)


def test_a_theta_just_above_zero_flipped_stays_below_one():
    """Missed: dropping the fix-up of float32 rounding (an entry that rounds to 1.0 set to 0) survived; no
    test turned a theta within float32's reach of 0. Oracle: the canonical range theta / pi in [0, 1)
    (docs/degradation.md, module docstring): theta = 1e-9 rad mirrored is -1e-9 = pi - 1e-9 rad, whose
    theta / pi, 1 - 3e-10, is 1.0 in float32, i.e. theta = pi = 0; it must be stored as 0."""
    v = encode(DegradationParams(level=1, blur1=BlurParams(size=21, sigma_x=3.0, sigma_y=0.3, theta=0.0),
                                 resize1=None, noise1=None, jpeg1=None, final=FinalParams(order=None, mode="area")))
    v = v.astype(np.float64)
    theta = FIELDS_BY_NAME["blur1.theta"].index
    v[theta] = 1e-9 / np.pi
    for turn in (dict(flip_lr=True), dict(flip_ud=True), dict(flip_lr=True, rot90=2)):
        out = dihedral_vector(v, **turn)
        assert out[theta] == 0.0, turn
        assert 0.0 <= decode(out).blur1.theta < np.pi
    batch = dihedral_vector(np.stack([v, v]), flip_lr=True)  # the same in a batch
    np.testing.assert_array_equal(batch[:, theta], 0.0)


@pytest.mark.parametrize("turn", TURNS, ids=lambda t: f"lr{int(t['flip_lr'])}ud{int(t['flip_ud'])}r{t['rot90']}")
def test_kernel_decoded_from_the_turned_vector_is_the_turned_kernel(turn):
    """Independent oracle: np.flip / np.rot90 of the original kernel array, 1e-6, 40 anisotropic records."""
    for params in _anisotropic_records(40):
        turned = decode(dihedral_vector(encode(params), **turn))
        for step in ("blur1", "blur2"):
            original: BlurParams | None = getattr(params, step)
            got: BlurParams | None = getattr(turned, step)
            if original is None:
                assert got is None
                continue
            np.testing.assert_allclose(got.kernel(), dihedral_image(original.kernel(), **turn), atol=1e-6, rtol=0)
            assert 0 <= got.theta < np.pi and got.sigma_x >= got.sigma_y  # still canonical


def test_only_anisotropic_theta_entries_change():
    vs = np.stack([encode(sample_params("mix", rng_for(3, i))) for i in range(300)])
    others = [i for i in range(vs.shape[1]) if i not in THETAS]
    for turn in TURNS:
        out = dihedral_vector(vs, **turn)
        assert out.dtype == np.float32 and out.shape == vs.shape
        np.testing.assert_array_equal(out[:, others], vs[:, others])
        assert np.all((out[:, THETAS] >= 0) & (out[:, THETAS] < 1))
        for t, sx, sy in ((3, 1, 2), (7, 5, 6)):
            flat = vs[:, sx] == vs[:, sy]  # isotropic or absent kernels keep theta 0
            assert np.all(out[flat, t] == 0)


def test_transforms_compose_like_the_images():
    """Turning twice equals the single turn that gives the same picture (checked on an image)."""
    vs = np.stack([encode(p) for p in _anisotropic_records(20)])
    img = np.arange(20).reshape(4, 5)
    for t1, t2 in itertools.product(TURNS, TURNS):
        twice = dihedral_image(dihedral_image(img, **t1), **t2)
        singles = [t for t in TURNS if np.array_equal(dihedral_image(img, **t), twice)]
        assert singles  # the 16 argument sets name each of the 8 transforms twice
        for single in singles:
            np.testing.assert_allclose(dihedral_vector(dihedral_vector(vs, **t1), **t2),
                                       dihedral_vector(vs, **single), atol=2e-7)


def test_input_is_not_modified_and_bad_shapes_are_refused():
    v = encode(_anisotropic_records(1)[0])
    before = v.copy()
    dihedral_vector(v, flip_lr=True, rot90=1)
    np.testing.assert_array_equal(v, before)
    with pytest.raises(ValueError, match="33 values"):
        dihedral_vector(np.zeros(32), flip_lr=True)


@pytest.mark.parametrize("flags", [dict(flip_lr=None, flip_ud=True), dict(flip_lr=2, flip_ud=True),
                                   dict(flip_lr=2, flip_ud=1), dict(flip_lr=np.bool_(True), flip_ud=0),
                                   dict(flip_lr="", flip_ud=[1])])
def test_image_and_vector_read_the_flags_alike(flags):
    """The image took a flag by its truth and the vector compared the two flags with !=: flip_lr=2 beside
    flip_ud=True (or 1) flipped the image twice and v's theta once (a replay 23 8-bit levels off). Oracle:
    the same transform with the flags as bools."""
    v = encode(_anisotropic_records(1)[0])
    img = np.arange(2 * 3 * 3, dtype=np.float32).reshape(2, 3, 3)
    plain = {k: bool(x) for k, x in flags.items()}
    np.testing.assert_array_equal(dihedral_vector(v, **flags, rot90=1), dihedral_vector(v, **plain, rot90=1))
    np.testing.assert_array_equal(dihedral_image(img, **flags, rot90=1), dihedral_image(img, **plain, rot90=1))


def test_a_fractional_turn_is_refused():
    from degrade.errors import DegradeError

    v = encode(_anisotropic_records(1)[0])
    for call in (lambda: dihedral_vector(v, rot90=1.5), lambda: dihedral_image(np.zeros((2, 2, 3)), rot90=1.5),
                 lambda: dihedral_vector(v, rot90=True)):
        with pytest.raises(DegradeError, match="rot90 must be an integer"):
            call()
    assert dihedral_vector(v, rot90=np.int64(3)).shape == (33,)


def test_training_pairs_carry_the_vector_of_their_own_image(hr_patch):
    """End to end through the loader: re-degrading the augmented HR with the record decoded from the
    augmented v gives the augmented LR. Blur-only records (resize modes are flip-symmetric), strongly
    anisotropic, so a stale theta misses by far more than the 8-bit rounding."""
    torch = pytest.importorskip("torch")
    from dasr_model.data import PairedShards

    hr = (np.asarray(hr_patch[:64, :64]) * 255).round().astype(np.uint8)
    hr_f = hr.astype(np.float32) / 255
    samples = []
    for i, theta in enumerate(np.linspace(0.2, 2.9, 6)):
        blur = BlurParams.canonical(size=21, sigma_x=3.0, sigma_y=0.3, theta=float(theta))
        params = DegradationParams(level=1, blur1=blur, resize1=None, noise1=None, jpeg1=None,
                                   final=FinalParams(order=None, mode=("area", "bilinear", "bicubic")[i % 3]))
        lr = (degrade.apply(hr_f, params) * 255).round().astype(np.uint8)
        samples.append(degrade.Sample(hr=hr, lr=lr, v=encode(params), params=params))
    ds = PairedShards(samples, lr_crop=None, seed=5)
    stale, turned = 0, 0
    for step in range(24):
        item = ds[(step, 0, step % len(samples))]
        lr_aug = item["lr"].numpy().transpose(1, 2, 0).astype(np.float32) / 255
        hr_aug = np.ascontiguousarray(item["hr"].numpy().transpose(1, 2, 0)).astype(np.float32) / 255
        redone = degrade.apply(hr_aug, decode(item["v"].numpy()))
        assert np.abs(redone - lr_aug).max() <= 1.01 / 255
        stale_v = samples[step % len(samples)].v
        if not np.array_equal(item["v"].numpy(), stale_v):
            turned += 1
            stale += np.abs(degrade.apply(hr_aug, decode(stale_v)) - lr_aug).max() > 4 / 255
    assert turned >= 10 and stale == turned  # the stale label is visibly wrong every time it differs
    assert isinstance(item["v"], torch.Tensor)
