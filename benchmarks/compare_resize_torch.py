"""Measure how `degrade.ops.resize` differs from PyTorch `F.interpolate` (docs/degradation.md).

Spec 5.2 defines resize by `torch.nn.functional.interpolate` semantics (align_corners=False, no
antialias, bicubic a = -0.75) and allows OpenCV equivalents on the CPU path provided the measured
difference is documented. `degrade` uses OpenCV INTER_LINEAR / INTER_CUBIC for bilinear / bicubic
and its own exact adaptive average pooling for area (OpenCV's INTER_AREA is a fractional-overlap box
filter, a different filter at non-integer factors). This script produces the measurement.

For every mode (area, bilinear, bicubic) and every case it resizes real photo patches (random crops
of the bundled sample photos, `degrade.sample_images()`) with both implementations, in float32, and
reports in 0-255 units:

- max and mean absolute difference over the whole output,
- the same over the interior (output minus a `--border`-pixel frame, default 2), where border
  handling cannot matter,
- the fraction of output values (pixels x channels) whose 8-bit quantisation
  rint(clip(x, 0, 1) * 255) differs, whole and interior, and (whole image) the part of that
  fraction not explained by float32 noise at exact rounding ties (|diff| > TIE_TOL = 0.01).

Cases: square 256-px crops resized by the factors in `--scales` (output side round(256 * s), as
`degrade.ops.scaled_size` computes it), plus the final resizes in `--final` (e.g. 200->64).

torch is imported here only; the `degrade` package never imports it. It needs an environment with
torch installed beside the project, e.g.

    python3 -m venv /work/venv-torch
    /work/venv-torch/bin/pip install torch==2.13.0 numpy opencv-python-headless scipy click rich
    /work/venv-torch/bin/pip install -e . --no-deps
    /work/venv-torch/bin/python benchmarks/compare_resize_torch.py
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import numpy as np

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # pragma: no cover - depends on the environment
    sys.exit("compare_resize_torch.py needs torch: run it from an environment that has torch installed")

import cv2

import degrade
from degrade import ops
from degrade.io import read_image

MODES = ("area", "bilinear", "bicubic")
DEFAULT_SCALES = (0.15, 0.25, 0.3, 0.5, 0.62, 0.85, 1.0, 1.2, 1.5)
DEFAULT_FINAL = ("200:64", "300:64", "256:64")
# 0-255 units. Averages of 8-bit inputs often land exactly on a rounding tie (k + 0.5) / 255; there
# float32 rounding noise (~1e-4 in 0-255 units) decides the 8-bit value. "q8 >tie" counts only
# rounding differences whose float values differ by more than this.
TIE_TOL = 0.01


@dataclass
class Case:
    label: str
    src: int  # square input side
    dst: int  # square output side


@dataclass
class Stats:
    max_all: float = 0.0
    sum_all: float = 0.0
    n_all: int = 0
    q_all: int = 0
    max_int: float = 0.0
    sum_int: float = 0.0
    n_int: int = 0
    q_int: int = 0
    q_real: int = 0  # 8-bit rounding differs and the float values differ by more than TIE_TOL

    def add(self, a: np.ndarray, b: np.ndarray, border: int) -> None:
        d = np.abs(a.astype(np.float64) - b.astype(np.float64)) * 255.0
        qd = ops_quantise(a) != ops_quantise(b)
        self.max_all = max(self.max_all, float(d.max()))
        self.sum_all += float(d.sum())
        self.n_all += d.size
        self.q_all += int(qd.sum())
        self.q_real += int((qd & (d > TIE_TOL)).sum())
        h, w = d.shape[:2]
        if h > 2 * border and w > 2 * border:
            di = d[border : h - border, border : w - border]
            qi = qd[border : h - border, border : w - border]
            self.max_int = max(self.max_int, float(di.max()))
            self.sum_int += float(di.sum())
            self.n_int += di.size
            self.q_int += int(qi.sum())


def ops_quantise(x: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


def torch_resize(img: np.ndarray, size: tuple[int, int], mode: str) -> np.ndarray:
    """F.interpolate on an (H, W, 3) float32 image, with the settings docs/degradation.md gives."""
    x = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))[None]
    if mode == "area":  # area takes neither align_corners nor antialias
        y = F.interpolate(x, size=size, mode="area")
    else:
        y = F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=False)
    return y[0].permute(1, 2, 0).contiguous().numpy()


def parse_final(spec: str) -> Case:
    src, dst = (int(v) for v in spec.split(":"))
    return Case(f"{src}->{dst}", src, dst)


def build_cases(scales: list[float], finals: list[str], base: int) -> list[Case]:
    cases = []
    for s in scales:
        h, _ = ops.scaled_size((base, base), s)
        cases.append(Case(f"x{s:g} ({base}->{h})", base, h))
    cases.extend(parse_final(f) for f in finals)
    return cases


def load_patches(side: int, per_image: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    patches = []
    for path in degrade.sample_images():
        img = read_image(path)
        h, w = img.shape[:2]
        if h < side or w < side:
            continue
        for _ in range(per_image):
            y = int(rng.integers(0, h - side + 1))
            x = int(rng.integers(0, w - side + 1))
            patches.append(np.ascontiguousarray(img[y : y + side, x : x + side]))
    return patches


def fmt_row(cols: list[str], widths: list[int]) -> str:
    return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cols, widths)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--scales", nargs="+", type=float, default=list(DEFAULT_SCALES), help="factors on --base crops")
    p.add_argument("--final", nargs="+", default=list(DEFAULT_FINAL), metavar="SRC:DST", help="extra square resizes")
    p.add_argument("--base", type=int, default=256, help="crop side for the --scales cases")
    p.add_argument("--per-image", type=int, default=4, help="random crops per sample photo")
    p.add_argument("--border", type=int, default=2, help="output frame excluded from the interior stats")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    torch.set_num_threads(1)  # deterministic, and results do not depend on threading anyway
    cases = build_cases(args.scales, args.final, args.base)
    patch_cache: dict[int, list[np.ndarray]] = {}
    for c in cases:
        if c.src not in patch_cache:
            patch_cache[c.src] = load_patches(c.src, args.per_image, args.seed)

    print(
        f"degrade.ops.resize (OpenCV {cv2.__version__}) vs torch {torch.__version__} F.interpolate "
        f"(align_corners=False, antialias=False; area = adaptive average pooling), float32"
    )
    n_patches = len(patch_cache[cases[0].src])
    print(
        f"{n_patches} patches per case ({args.per_image} random crops x {len(degrade.sample_images())} sample photos, "
        f"seed {args.seed}); differences in 0-255 units; interior = output minus a {args.border}-px frame; "
        f"q8 = fraction of values whose 8-bit rounding differs; q8 >tie = of those, |diff| > {TIE_TOL} "
        f"(not a float32 tie-break)"
    )
    header = ["mode", "case", "max all", "mean all", "max int", "mean int", "q8 all", "q8 int", "q8 >tie"]
    rows = []
    for mode in args.modes:
        for c in cases:
            st = Stats()
            for img in patch_cache[c.src]:
                a = ops.resize(img, (c.dst, c.dst), mode=mode)
                b = torch_resize(img, (c.dst, c.dst), mode)
                if a.shape != b.shape:
                    raise AssertionError(f"shape mismatch {a.shape} vs {b.shape}")
                st.add(a, b, args.border)
            mean_int = f"{st.sum_int / st.n_int:.4f}" if st.n_int else "-"
            max_int = f"{st.max_int:.4f}" if st.n_int else "-"
            q_int = f"{100 * st.q_int / st.n_int:.2f}%" if st.n_int else "-"
            rows.append(
                [
                    mode,
                    c.label,
                    f"{st.max_all:.4f}",
                    f"{st.sum_all / st.n_all:.4f}",
                    max_int,
                    mean_int,
                    f"{100 * st.q_all / st.n_all:.2f}%",
                    q_int,
                    f"{100 * st.q_real / st.n_all:.2f}%",
                ]
            )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print()
    print(fmt_row(header, widths))
    print("  ".join("-" * w for w in widths))
    prev = None
    for r in rows:
        if prev is not None and r[0] != prev:
            print()
        prev = r[0]
        print(fmt_row(r, widths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
