#!/usr/bin/env python
"""dasr-eval's scores on one large SR/HR pair: the metrics as they run (row strips, Y once per image,
NIQE a row of blocks at a time) against the whole-image formulas they replaced (written out here as the
baseline), both timed in this run, with numpy's peak memory (tracemalloc) and the two results compared.

Usage: python benchmarks/bench_eval.py [--width 6000 --height 4000] [--niqe]
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT)]
from _machine import cpu_model  # noqa: E402


def whole_image_scores(sr: np.ndarray, hr: np.ndarray) -> dict[str, float]:
    """The baseline: PSNR-Y, SSIM-Y and RGB PSNR (4-px crop) from whole-image float64 arrays, Y made once
    per metric and image, as dasr-eval computed them before."""
    from scipy import ndimage

    def to_255(img):
        return np.round(np.clip(img, 0, 1) * 255).astype(np.float64)

    def y(img):
        x = to_255(img)
        return (16 + (65.481 * x[..., 0] + 128.553 * x[..., 1] + 24.966 * x[..., 2]) / 255)[4:-4, 4:-4]

    def psnr(a, b):
        return 10 * np.log10(255.0**2 / np.mean((a - b) ** 2))

    def filt(x):
        return ndimage.gaussian_filter(x, 1.5, truncate=3.5, mode="constant")[5:-5, 5:-5]

    a, b = y(sr), y(hr)
    mu_a, mu_b = filt(a), filt(b)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    ssim = ((2 * mu_a * mu_b + c1) * (2 * (filt(a * b) - mu_a * mu_b) + c2)) / (
        (mu_a**2 + mu_b**2 + c1) * (filt(a * a) - mu_a**2 + filt(b * b) - mu_b**2 + c2))
    return {"psnr_y": psnr(y(sr), y(hr)), "ssim_y": float(ssim.mean()),
            "psnr_rgb": psnr(to_255(sr)[4:-4, 4:-4], to_255(hr)[4:-4, 4:-4])}


def strip_scores(sr: np.ndarray, hr: np.ndarray) -> dict[str, float]:
    """As dasr-eval scores a pair now (dasr_model.evaluate.evaluate_pairs)."""
    from dasr_model.metrics import cropped_y, psnr, psnr_rgb, ssim

    y_hr = cropped_y(hr, like=sr)
    y_sr = cropped_y(sr)
    return {"psnr_y": psnr(y_sr, y_hr), "ssim_y": ssim(y_sr, y_hr), "psnr_rgb": psnr_rgb(sr, hr)}


def measured(fn, *args) -> tuple[float, float, object]:
    """(seconds, numpy's peak MB during the call, result)."""
    tracemalloc.start()
    t = time.perf_counter()
    out = fn(*args)
    seconds = time.perf_counter() - t
    peak = tracemalloc.get_traced_memory()[1] / 1e6
    tracemalloc.stop()
    return seconds, peak, out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=6000)
    ap.add_argument("--height", type=int, default=4000)
    ap.add_argument("--niqe", action="store_true", help="Also NIQE of the SR image (with a stand-in pristine "
                    "model of the real file's layout), whole-image steps against a row of blocks at a time.")
    ap.add_argument("--cv-threads", type=int, default=1, help="OpenCV's threads (the strips' filters; default 1, "
                    "as numpy and scipy here: the same work per core)")
    a = ap.parse_args(argv)

    import cv2

    before = cv2.getNumThreads()
    cv2.setNumThreads(a.cv_threads)
    try:
        _run(a)
    finally:  # (main also runs inside the test suite's processes)
        cv2.setNumThreads(before)


def _run(a: argparse.Namespace) -> None:
    import cv2

    import degrade

    photo = degrade.read_image(degrade.sample_images()[0])
    hr = np.clip(cv2.resize(photo, (a.width, a.height), interpolation=cv2.INTER_CUBIC), 0, 1)
    sr = np.clip(hr + np.random.default_rng(0).normal(0, 0.02, hr.shape).astype(np.float32), 0, 1)
    print(f"# dasr-eval scores of one {a.width}x{a.height} pair; OpenCV threads {a.cv_threads}; {cpu_model()}; "
          f"{datetime.date.today().isoformat()}; python {' '.join(sys.argv)}")
    small = (sr[:64, :64], hr[:64, :64])  # imports (dasr_model brings torch) and first calls, before timing
    whole_image_scores(*small), strip_scores(*small)
    rows = [("PSNR-Y, SSIM-Y, RGB PSNR", *measured(whole_image_scores, sr, hr), *measured(strip_scores, sr, hr))]
    if a.niqe:
        from dasr_model.metrics import cropped_y
        from dasr_model.niqe import niqe
        from tests.niqe_golden import make_params

        y, params = cropped_y(sr), make_params()
        rows.append(("NIQE", *measured(_whole_image_niqe, y, params), *measured(niqe, y, params)))
    print("| scores | whole-image s | strips s | speed-up | whole-image numpy peak MB | strips MB | ratio "
          "| largest difference |")
    print("|---|---|---|---|---|---|---|---|")
    for name, t0, m0, r0, t1, m1, r1 in rows:
        r0, r1 = (r if isinstance(r, dict) else {"niqe": r} for r in (r0, r1))
        diff = max(abs(r0[k] - r1[k]) for k in r0)
        print(f"| {name} | {t0:.2f} | {t1:.2f} | {t0 / t1:.2f}x | {m0:,.0f} | {m1:,.0f} | {m0 / m1:.1f}x | "
              f"{diff:.1e} |")


def _whole_image_niqe(y: np.ndarray, params: dict) -> float:
    """The baseline NIQE: the local normalisation and the half size of the whole image at once, and the
    features a block at a time with the shape searched over the whole table (the release's way)."""
    from scipy import ndimage

    from dasr_model.niqe import BLOCK, _half_weights, quality
    from tests.niqe_golden import one_block_features

    img = np.floor(y + 0.5)
    rows, cols = img.shape[0] // BLOCK, img.shape[1] // BLOCK
    img = img[: rows * BLOCK, : cols * BLOCK]
    window, per_scale = params["gaussian_window"], []
    for scale in (1, 2):
        mu = ndimage.convolve(img, window, mode="nearest")
        sigma = np.sqrt(np.abs(ndimage.convolve(img * img, window, mode="nearest") - mu * mu))
        norm = (img - mu) / (sigma + 1)
        side = BLOCK // scale
        per_scale.append(np.array([one_block_features(norm[r * side:(r + 1) * side, c * side:(c + 1) * side])
                                   for c in range(cols) for r in range(rows)]))
        if scale == 1:
            half = _half_weights(img.shape[0]) @ (img / 255)
            img = (_half_weights(img.shape[1]) @ half.T).T * 255
    return quality(np.concatenate(per_scale, axis=1), params)


if __name__ == "__main__":
    main()
