"""degrade.sharpen: the unsharp mask's refusals, and the documented formulas that pair a stored patch with its LR."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import degrade
from degrade import shards as dsm
from degrade.errors import DegradeError
from degrade.io import to_uint8
from degrade.sharpen import unsharp_mask

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("img", [
    np.zeros((64, 64, 3), np.float64),  # hr / 255 of a uint8 patch
    np.zeros((64, 64, 3), np.uint8),
    np.zeros((20, 40, 3), np.float32),  # a side not above 25 px
    np.zeros((64, 64), np.float32),
    np.zeros((64, 64, 1), np.float32),  # broadcast into a (64, 64, 64) result before
    np.zeros((64, 64, 4), np.float32),
    [[0.0]],
])
def test_unsharp_mask_refuses_with_the_librarys_error(img):
    with pytest.raises(DegradeError, match="float32 image"):
        unsharp_mask(img)


def test_unsharp_mask_takes_sides_above_25_px_and_refuses_25():
    """The blur's window is 51 px, 25 on each side of the centre, and its reflected border needs an image side
    above 25 px (the docstring's "both sides > 25 px"): letting 25 through (< for <=) passed every test (a
    mutation audit: the refusal tested was at 20 px). Oracle: the documented bound, 25 refused on either
    side with the library's message, 26 sharpened to an image of the same shape and dtype in [0, 1]."""
    for shape in ((25, 40, 3), (40, 25, 3)):
        with pytest.raises(DegradeError, match=re.escape(f"with sides > 25, got float32 {shape}")):
            unsharp_mask(np.full(shape, 0.5, np.float32))
    img = np.random.default_rng(0).random((26, 26, 3)).astype(np.float32)
    out = unsharp_mask(img)
    assert out.shape == img.shape and out.dtype == np.float32 and 0 <= out.min() and out.max() <= 1


@pytest.mark.parametrize("fill", [255.0, np.nan, -0.5])
def test_unsharp_mask_refuses_values_outside_0_1(fill):
    img = np.full((64, 64, 3), 0.5, np.float32)
    img[3, 4, 1] = fill
    with pytest.raises(DegradeError, match="values in \\[0, 1\\]"):
        unsharp_mask(img)


def _config(sharpen_hr: bool) -> dsm.DatasetConfig:
    scan = dsm.scan_sources([], 64)
    return dsm.DatasetConfig(level="mix", count=4, patch_size=64, seed=8, shard_size=4, compression="none",
                             source_root=scan.root, sources=tuple(scan.sources), sharpen_hr=sharpen_hr)


def test_the_formulas_in_dataset_format_md_give_the_stored_lr():
    text = (ROOT / "docs" / "dataset-format.md").read_text()
    plain, sharp = re.findall(r"`lr = (degrade\.apply\([^`]*\))`", text)
    assert "unsharp_mask" in sharp and "unsharp_mask" not in plain
    for formula, config in ((plain, _config(False)), (sharp, _config(True))):
        for i in range(config.count):
            _, _, s = dsm.make_sample(config, i)  # the sample as make-dataset stores it
            lr = eval(formula, {"degrade": degrade, "np": np}, {"hr": s.hr, "record": s.params})
            np.testing.assert_array_equal(to_uint8(lr), s.lr)


def test_the_sharpen_hr_formula_in_the_readme_gives_the_stored_lr():
    line = next(x for x in (ROOT / "README.md").read_text().splitlines() if "--sharpen-hr degraded" in x)
    sharpened = re.search(r"(degrade\.sharpen\.unsharp_mask\(.*\))\)$", line).group(1)
    _, _, s = dsm.make_sample(_config(True), 0)
    hr = eval(sharpened, {"degrade": degrade, "np": np}, {"hr": s.hr})
    np.testing.assert_array_equal(to_uint8(degrade.apply(hr, s.params)), s.lr)
