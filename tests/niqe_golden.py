"""A pristine model, images and reference NIQE scores for tests/test_niqe.py.

`make_params` draws a valid stand-in for the pristine model (the real one is BasicSR's data file, not
ours to ship), in its layout: a (1, 36) mean, a symmetric positive definite covariance, and MATLAB's
7 x 7 Gaussian window (sigma 7/6). `luma_images` gives Y images of bundled-photo crops. GOLDEN holds BasicSR 1.4.2's
`niqe()` on them, and HALF its MATLAB-style `imresize(x, 0.5)` checks, printed by:

    pip install --no-deps basicsr==1.4.2   (or unpack its sdist and put it on PYTHONPATH)
    python tests/niqe_golden.py

(The script loads basicsr/metrics/niqe.py and basicsr/utils/matlab_functions.py alone, with stand-ins for
the package's registry and colour helpers, which NIQE does not use: the package's __init__ imports far
more than those two files need.)
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

# BasicSR 1.4.2 on 2026-11-26: niqe() with make_params() on luma_images(); imresize(x, 0.5) of HALF_INPUT
# (computed by torch in float32); compute_feature() of feature_block()
GOLDEN = {"photo": 14.1437348405, "blurred": 15.7941153806, "noisy": 14.2522152524}
HALF = [[0.44179142, 0.25212047, 0.63734144, 0.67719823, 0.6110984],
        [0.3359383, 0.5302953, 0.4988762, 0.7585846, 0.6319606],
        [0.5222218, 0.390801, 0.39066827, 0.4984892, 0.35614243],
        [0.51855284, 0.5102147, 0.45209754, 0.7031467, 0.44328767],
        [0.7345811, 0.6191724, 0.7166051, 0.69829774, 0.71241903],
        [0.4470377, 0.5611117, 0.5527745, 0.5694453, 0.44515195],
        [0.42219803, 0.6257435, 0.3772469, 0.49822927, 0.19193135]]
FEATURES = [1.072, 0.4440083444, 0.477, 0.0151912964, 0.0213864627, 0.0234516463, 0.433, 0.0063877284, 0.0137886362,
            0.0143339501, 0.473, 0.0205879576, 0.0201201729, 0.0228148176, 0.454, -0.0252544903, 0.0185374553,
            0.0158080707]


def half_input() -> np.ndarray:
    return np.random.default_rng(0).random((13, 10))


def make_params() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(2013)
    a = rng.normal(0, 1, (36, 36))
    x = np.arange(7) - 3
    g = np.exp(-(x[:, None] ** 2 + x[None, :] ** 2) / (2 * (7 / 6) ** 2))
    return {"mu_pris_param": rng.normal(1, 0.5, (1, 36)), "cov_pris_param": a @ a.T / 36 + 0.1 * np.eye(36),
            "gaussian_window": g / g.sum()}


def luma_images() -> dict[str, np.ndarray]:
    """Name -> (200, 300) Y on the 0-255 scale (16-235), of 8-bit RGB, not yet rounded."""
    import cv2

    import degrade
    from dasr_model.metrics import y_channel

    photo = degrade.read_image(degrade.sample_images()[1])[:200, :300]
    rng = np.random.default_rng(3)
    images = {"photo": photo, "blurred": cv2.GaussianBlur(photo, (0, 0), 2.0),
              "noisy": np.clip(photo + rng.normal(0, 0.04, photo.shape), 0, 1)}
    return {name: y_channel(img) for name, img in images.items()}


def one_block_features(block: np.ndarray) -> list[float]:
    """The release's features of one block, a block at a time and the shape by a search of the whole table
    (BasicSR's estimate_aggd_param and compute_feature, written out again): the oracle for the batched
    _features, and bench_eval's baseline."""
    from scipy.special import gamma

    from dasr_model.niqe import _shape_table

    shapes, ratios = _shape_table()

    def aggd(x):
        x = x.ravel()
        left, right = np.sqrt(np.mean(x[x < 0] ** 2)), np.sqrt(np.mean(x[x > 0] ** 2))
        g = left / right
        r = np.mean(np.abs(x)) ** 2 / np.mean(x * x)
        a = shapes[np.argmin((ratios - r * (g**3 + 1) * (g + 1) / (g**2 + 1) ** 2) ** 2)]
        spread = math.sqrt(gamma(1 / a) / gamma(3 / a))
        return a, left * spread, right * spread

    a, left, right = aggd(block)
    out = [a, (left + right) / 2]
    for shift in ((0, 1), (1, 0), (1, 1), (1, -1)):
        a, left, right = aggd(block * np.roll(block, shift, axis=(0, 1)))
        out += [a, (right - left) * gamma(2 / a) / gamma(1 / a), left, right]
    return out


def _load_basicsr(root: Path):
    import importlib.util
    import types

    import scipy.ndimage

    sys.modules.setdefault("scipy.ndimage.filters", scipy.ndimage)  # the old path niqe.py imports from
    for name in ("basicsr", "basicsr.metrics", "basicsr.utils"):
        sys.modules[name] = types.ModuleType(name)
    registry = types.ModuleType("basicsr.utils.registry")
    registry.METRIC_REGISTRY = types.SimpleNamespace(register=lambda: (lambda f: f))
    util = types.ModuleType("basicsr.metrics.metric_util")
    util.reorder_image = util.to_y_channel = None  # not used by niqe()
    sys.modules.update({"basicsr.utils.registry": registry, "basicsr.metrics.metric_util": util})
    modules = {}
    for name, rel in (("basicsr.utils.matlab_functions", "utils/matlab_functions.py"),
                      ("basicsr.metrics.niqe", "metrics/niqe.py")):
        spec = importlib.util.spec_from_file_location(name, root / rel)
        modules[name] = sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(modules[name])
    return modules["basicsr.metrics.niqe"], modules["basicsr.utils.matlab_functions"]


def main(root: Path) -> None:
    niqe, matlab = _load_basicsr(root)
    p = make_params()
    for name, y in luma_images().items():
        score = niqe.niqe(np.round(y), p["mu_pris_param"], p["cov_pris_param"], p["gaussian_window"])
        print(f'"{name}": {score:.10f},')
    print("HALF =", np.array2string(matlab.imresize(half_input(), 0.5), precision=8, separator=", "))
    print("FEATURES =", [round(float(v), 10) for v in niqe.compute_feature(feature_block())])


def feature_block() -> np.ndarray:
    """A 48 x 48 block of a normalised-looking field: the 18 features of one block, without any resize."""
    rng = np.random.default_rng(11)
    return rng.standard_t(4, (48, 48)) * 0.4 + 0.05


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main(Path(sys.argv[1]))
