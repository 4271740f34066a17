#!/usr/bin/env python
"""Per-op profile of `degrade.apply`: each op on the inputs it really gets, and the floor under it.

1. Records every `degrade.ops` call (and kernel build) that `degrade.apply` makes for --samples
   records of each level (256x256 HR patches of the bundled photos, the records of bench_degrade.py),
   with copies of the arguments.
2. Replays the recorded calls op by op: ms per sample for this checkout's ops and, with --before DIR
   (a checkout of an older commit, e.g. a `git worktree`), for that checkout's `degrade.ops` and
   `degrade.kernels` (its whole package imported for the purpose, then ours restored) on the same
   inputs, the two alternating, best of --repeats passes (robust on a shared machine).
3. Times the floor of each op: the part no rewrite of ours can remove (OpenCV's own JPEG
   encode + decode, NumPy's random draws, one OpenCV pass over the image, ...), on the same sizes.

Usage: python benchmarks/profile_degrade.py [--samples 100] [--repeats 5] [--before /tmp/degrade_before]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # must happen before numpy is imported

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402

import degrade  # noqa: E402
import degrade.params  # noqa: E402
from degrade import filters, ops, pixels  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_degrade import build_pool  # noqa: E402

OPS = ("blur", "resize", "add_gaussian_noise", "add_poisson_noise", "jpeg", "clamp", "quantise")
KERNELS = ("gaussian_kernel", "sinc_kernel")


def record(level, samples: int, seed: int, pool: list[np.ndarray]) -> list[tuple[str, tuple, dict]]:
    """Every ops call (name, args, kwargs) of `apply` over `samples` records; rngs are re-created
    from their seed at replay (a Generator's state changes when it draws)."""
    calls: list[tuple[str, tuple, dict]] = []
    saved = {name: getattr(ops, name) for name in OPS}
    saved_k = {name: getattr(degrade.params, name) for name in KERNELS}

    def wrap(name, fn, module):
        def wrapper(*args, **kwargs):
            kw = dict(kwargs)
            if "rng" in kw:  # pipeline seeds a fresh default_rng per noise step: store its state
                kw["rng"] = kw["rng"].bit_generator.state
            calls.append((name, tuple(a.copy() if isinstance(a, np.ndarray) else a for a in args), kw))
            return fn(*args, **kwargs)

        setattr(module, name, wrapper)

    for name, fn in saved.items():
        wrap(name, fn, ops)
    for name, fn in saved_k.items():
        wrap(name, fn, degrade.params)
    try:
        for i in range(samples):
            p = degrade.sample_params(level, np.random.default_rng(np.random.SeedSequence([seed, i])))
            degrade.apply(pool[i % len(pool)], p)
    finally:
        for name, fn in saved.items():
            setattr(ops, name, fn)
        for name, fn in saved_k.items():
            setattr(degrade.params, name, fn)
    return calls


def _rng(state) -> np.random.Generator:
    g = np.random.default_rng()
    g.bit_generator.state = state
    return g


def replay(module, calls, kernels_module) -> dict[str, float]:
    """Seconds per op name for one pass over `calls` with `module`'s functions."""
    out: dict[str, float] = defaultdict(float)
    for name, args, kw in calls:
        fn = getattr(kernels_module if name in KERNELS else module, name)
        if "rng" in kw:
            kw = dict(kw, rng=_rng(kw["rng"]))
        t0 = time.perf_counter()
        fn(*args, **kw)
        out[name] += time.perf_counter() - t0
    return out


def _run_plan(img: np.ndarray, plan) -> None:
    for col, row in plan.terms:
        cv2.sepFilter2D(img, -1, row, col, borderType=cv2.BORDER_REFLECT_101)
    for taps, anchor in plan.pieces:
        cv2.filter2D(img, -1, taps, anchor=anchor, borderType=cv2.BORDER_REFLECT_101)
    for _ in range(len(plan.terms) + len(plan.pieces) - 1):
        cv2.add(img, img)


def floors(calls) -> dict[str, float]:
    """Seconds, per op name, of the library calls each op cannot avoid, on the same inputs:

    jpeg: OpenCV's imencode + imdecode of the op's own 8-bit image (libjpeg alone);
    add_gaussian_noise: the uniforms its Box-Muller transform consumes (n/2 float64 + n/2 float32);
    add_poisson_noise: 32 random bits per value, n/2 raw 64-bit outputs of the generator (the sampler's
    input; the ~3 % of draws that need it get a float64 uniform more, not counted);
    blur: the OpenCV filter calls (and sums) of the op's plan, the plan made beforehand;
    resize: one cv2.resize INTER_LINEAR to the same size (one pass over the output);
    clamp / quantise: one np.clip; kernel builds: one np.exp over the taps.
    """
    out: dict[str, float] = defaultdict(float)
    for name, args, kw in calls:
        img = args[0]
        if name == "jpeg":
            bgr = cv2.cvtColor(pixels.quantise_8bit(img), cv2.COLOR_RGB2BGR)
            params = [cv2.IMWRITE_JPEG_QUALITY, int(args[1]), cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
                      cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420]
            t0 = time.perf_counter()
            ok, buf = cv2.imencode(".jpg", bgr, params)
            cv2.imdecode(buf, cv2.IMREAD_COLOR)
        elif name == "add_gaussian_noise":
            g = _rng(kw["rng"])
            half = (img.shape[0] * img.shape[1] * (1 if kw["gray"] else 3) + 1) // 2
            t0 = time.perf_counter()
            g.random(half)
            g.random(half, dtype=np.float32)
        elif name == "add_poisson_noise":
            g = _rng(kw["rng"])
            n = img.shape[0] * img.shape[1] * (1 if kw["gray"] else 3)
            t0 = time.perf_counter()
            g.bit_generator.random_raw((n + 1) // 2)
        elif name == "blur":
            plan = filters._blur_plan(args[1], img.size)
            t0 = time.perf_counter()
            if plan is None:
                cv2.filter2D(img, -1, args[1].astype(np.float32), borderType=cv2.BORDER_REFLECT_101)
            else:
                _run_plan(img, plan)
        elif name == "resize":
            h, w = args[1]
            t0 = time.perf_counter()
            cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)
        elif name in ("clamp", "quantise"):
            t0 = time.perf_counter()
            np.clip(img, 0.0, 1.0)
        else:  # kernel builds
            x = np.ones((args[0], args[0]))
            t0 = time.perf_counter()
            np.exp(x)
        out[name] += time.perf_counter() - t0
    return out


def load_before(path: Path):
    """`degrade.ops` and `degrade.kernels` of another checkout, with everything they import from it
    (blur and noise live in their own modules since the ops split): that checkout's `degrade` package
    is imported in place of ours for a moment, then ours is put back. The old functions keep their
    own modules' globals, so they call the old code throughout."""
    ours = {name: mod for name, mod in sys.modules.items() if name == "degrade" or name.startswith("degrade.")}
    for name in ours:
        del sys.modules[name]
    sys.path.insert(0, str(path))
    try:
        import degrade.kernels as before_kernels
        import degrade.ops as before_ops

        if not Path(before_ops.__file__).resolve().is_relative_to(path.resolve()):
            raise SystemExit(f"--before {path}: imported {before_ops.__file__} instead")
        return before_ops, before_kernels
    finally:
        sys.path.remove(str(path))
        for name in [n for n in sys.modules if n == "degrade" or n.startswith("degrade.")]:
            del sys.modules[name]
        sys.modules.update(ours)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--patch", type=int, default=256)
    ap.add_argument("--before", type=Path, help="a checkout of the commit to compare against")
    args = ap.parse_args(argv)
    cv2.setNumThreads(1)
    pool = build_pool(args.patch, 8, args.seed)
    impls = {"now": (ops, degrade.kernels)}
    if args.before:
        impls = {"before": tuple(load_before(args.before)), **impls}
    print(f"command: python benchmarks/profile_degrade.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"{args.samples} records per level, {args.patch}x{args.patch} HR, best of {args.repeats} passes, 1 thread\n")
    for level in (1, 2, 3):
        calls = record(level, args.samples, args.seed, pool)
        count = defaultdict(int)
        for name, _, _ in calls:
            count[name] += 1
        best: dict = {impl: defaultdict(lambda: float("inf")) for impl in [*impls, "floor"]}
        for _ in range(args.repeats):
            for impl, (mod, kmod) in impls.items():
                for name, t in replay(mod, calls, kmod).items():
                    best[impl][name] = min(best[impl][name], t)
            for name, t in floors(calls).items():
                best["floor"][name] = min(best["floor"][name], t)
        names = sorted(count, key=lambda n: -best["now"][n])
        heads = ["op", "calls/sample", *[f"{i} ms/sample" for i in impls], "floor ms/sample"]
        if "before" in impls:
            heads.insert(4, "before/now")
        print(f"## level {level}\n")
        print("| " + " | ".join(heads) + " |")
        print("|" + "|".join(["---"] + ["---:"] * (len(heads) - 1)) + "|")
        tot = defaultdict(float)
        for n in names:
            row = [n, f"{count[n] / args.samples:.2f}"]
            for impl in impls:
                row.append(f"{1e3 * best[impl][n] / args.samples:.3f}")
                tot[impl] += best[impl][n]
            if "before" in impls:
                row.append(f"{best['before'][n] / best['now'][n]:.2f}x")
            row.append(f"{1e3 * best['floor'][n] / args.samples:.3f}")
            tot["floor"] += best["floor"][n]
            print("| " + " | ".join(row) + " |")
        row = ["all ops", ""] + [f"{1e3 * tot[i] / args.samples:.3f}" for i in impls]
        if "before" in impls:
            row.append(f"{tot['before'] / tot['now']:.2f}x")
        row.append(f"{1e3 * tot['floor'] / args.samples:.3f}")
        print("| " + " | ".join(row) + " |\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
