"""Baseline for benchmarks/bench_degrade.py: the degradation chain assembled naively, BasicSR style.

`apply_baseline(hr, params)` follows `degrade.pipeline.apply` step for step on the same
`DegradationParams` record, but each step is written the way BasicSR's public CPU functions
(`basicsr.data.degradations`) and its Real-ESRGAN model write them:

- blur: `cv2.filter2D` with the full 2-D float64 kernel (no separable path, no trimming);
- Gaussian noise: `rng.standard_normal` in float64, cast to float32 (`generate_gaussian_noise`);
- Poisson noise: `np.unique` for the distinct-value count and `rng.poisson` for the draws, gray via
  `cv2.cvtColor(BGR2GRAY)` (`generate_poisson_noise`);
- JPEG: clip, `cv2.imencode('.jpg', img * 255.)` on the float image, `cv2.imdecode` (`add_jpg_compression`);
- resize: `cv2.resize` with area / bilinear / bicubic;
- final rounding: `clip(round(x * 255), 0, 255) / 255`.

Like BasicSR it works in OpenCV's BGR channel order (images loaded with cv2): the RGB HR is flipped
once on entry and the LR flipped back on exit, unless the caller passes a BGR image with `bgr=True`
(the benchmark does, so the baseline is not charged for flips BasicSR would not do). Kernels come from the record (`params.blur1.kernel()`
etc.), so both implementations filter with the same taps. The noise fields are drawn with different
algorithms from the same per-step seed, so only noise-free records give comparable pixels.

Every step is a module-level function called through the module namespace, so the benchmark can
wrap them with timers for its per-op profile.
"""

from __future__ import annotations

import cv2
import numpy as np

from degrade.params import DegradationParams, NoiseParams

SCALE = 4
_CV_MODES = {"area": cv2.INTER_AREA, "bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC}


def filter2d(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Full, untrimmed 2-D correlation (BORDER_REFLECT_101, OpenCV's default)."""
    return cv2.filter2D(img, -1, kernel, borderType=cv2.BORDER_REFLECT_101)


def resize(img: np.ndarray, size: tuple[int, int], mode: str) -> np.ndarray:
    h, w = size
    out = cv2.resize(img, (w, h), interpolation=_CV_MODES[mode])
    return out.reshape(h, w, 3)  # OpenCV drops a unit axis for 1-pixel-wide results


def gaussian_noise(img: np.ndarray, sigma: float, gray: bool, rng: np.random.Generator) -> np.ndarray:
    """basicsr generate_gaussian_noise + random_add_gaussian_noise (clip=True, rounds=False)."""
    if gray:
        noise = np.float32(rng.standard_normal(img.shape[0:2])) * sigma / 255.0
        noise = np.expand_dims(noise, axis=2).repeat(3, axis=2)
    else:
        noise = np.float32(rng.standard_normal(img.shape)) * sigma / 255.0
    out = img + noise
    return np.clip(out, 0, 1)


def poisson_noise(img: np.ndarray, scale: float, gray: bool, rng: np.random.Generator) -> np.ndarray:
    """basicsr generate_poisson_noise + random_add_poisson_noise (clip=True, rounds=False)."""
    src = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY) if gray else img
    src = np.clip((src * 255.0).round(), 0, 255) / 255.0
    vals = len(np.unique(src))
    vals = 2 ** np.ceil(np.log2(vals))
    out = np.float32(rng.poisson(src * vals) / float(vals))
    noise = out - src
    if gray:
        noise = np.repeat(noise[:, :, np.newaxis], 3, axis=2)
    out = img + noise * scale
    return np.clip(out, 0, 1)


def jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    """basicsr add_jpg_compression: clip, encode the float image * 255, decode, / 255."""
    img = np.clip(img, 0, 1)
    encode_param = [int(cv2.IMWRITE_JPEG_QUALITY), int(quality)]
    _, encimg = cv2.imencode(".jpg", img * 255.0, encode_param)
    return np.float32(cv2.imdecode(encimg, 1)) / 255.0


def quantise(img: np.ndarray) -> np.ndarray:
    """Real-ESRGAN's final rounding: clamp(round(x * 255), 0, 255) / 255."""
    return (np.clip((img * 255.0).round(), 0, 255) / 255.0).astype(np.float32)


def _noise(img: np.ndarray, noise: NoiseParams | None) -> np.ndarray:
    if noise is None:
        return img
    rng = np.random.default_rng(noise.seed)
    if noise.type == "gaussian":
        return gaussian_noise(img, noise.strength, noise.gray, rng)
    return poisson_noise(img, noise.strength, noise.gray, rng)


def _scaled(hw: tuple[int, ...], scale: float) -> tuple[int, int]:
    return max(1, round(hw[0] * scale)), max(1, round(hw[1] * scale))


def apply_baseline(hr: np.ndarray, params: DegradationParams, *, bgr: bool = False) -> np.ndarray:
    """Degrade `hr` ((H, W, 3) float32 RGB in [0, 1]) as `params` says; returns the float32 RGB LR.

    With `bgr=True` the HR is already in BGR order (as BasicSR holds cv2-loaded images) and the LR
    is returned in BGR: no channel flips, which is how the benchmark times it.
    """
    h, w = hr.shape[:2]
    target = (h // SCALE, w // SCALE)
    x = hr if bgr else np.ascontiguousarray(hr[..., ::-1])  # RGB -> BGR

    def finish(img: np.ndarray) -> np.ndarray:
        out = quantise(img)
        return out if bgr else np.ascontiguousarray(out[..., ::-1])

    if params.blur1 is not None:
        x = filter2d(x, params.blur1.kernel())
    if params.resize1 is not None:
        x = resize(x, _scaled(x.shape, params.resize1.scale), params.resize1.mode)
    x = _noise(x, params.noise1)
    if params.jpeg1 is not None:
        x = jpeg(x, params.jpeg1.quality)

    if not params.two_stage:
        x = resize(x, target, params.final.mode)
        return finish(x)

    if params.blur2 is not None:
        x = filter2d(x, params.blur2.kernel())
    assert params.resize2 is not None
    x = resize(x, _scaled(target, params.resize2.scale), params.resize2.mode)
    x = _noise(x, params.noise2)

    def sinc(img: np.ndarray) -> np.ndarray:
        return img if params.sinc is None else filter2d(img, params.sinc.kernel())

    def jpeg2(img: np.ndarray) -> np.ndarray:
        return img if params.jpeg2 is None else jpeg(img, params.jpeg2.quality)

    if params.final.order == "A":  # resize -> sinc -> JPEG
        x = jpeg2(sinc(resize(x, target, params.final.mode)))
    else:  # "B": JPEG -> resize -> sinc
        x = sinc(resize(jpeg2(x), target, params.final.mode))
    return finish(x)
