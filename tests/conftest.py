from __future__ import annotations

import numpy as np
import pytest

import degrade


@pytest.fixture(scope="session")
def photo() -> np.ndarray:
    """A bundled sample photo, (H, W, 3) float32 in [0, 1]."""
    return degrade.read_image(degrade.sample_images()[0])


@pytest.fixture(scope="session")
def hr_patch(photo: np.ndarray) -> np.ndarray:
    """A 128x128 HR patch of real photo content (read-only, so mutation would raise)."""
    patch = np.ascontiguousarray(photo[100:228, 200:328])
    patch.setflags(write=False)
    return patch


def rng_for(seed: int, index: int = 0) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, index]))
