#!/usr/bin/env python
"""Degradation throughput: samples/s of `degrade.sample_params` + `degrade.apply` on HR patches.

Measures, for levels 1, 2, 3 and "mix":

- ours: `degrade.sample_params(level, rng)` + `degrade.apply(hr, params)`;
- baseline: the same records applied by `benchmarks/_baseline.py:apply_baseline`, the chain written
  the naive BasicSR way (full 2-D `cv2.filter2D`, `np.unique` + `rng.poisson`, float64 normal noise,
  cv2 JPEG, cv2.resize);

in one process and in N worker processes (aggregate samples/s), plus a per-op time profile for
levels 2 and 3 and a pixel-agreement check of ours vs baseline on noise-free records.

The 1-process run (and the profile) happens in one fresh worker process, like the N-process run;
--single-in-main runs it in the main process instead. Each timing is repeated --repeats times
(ours and baseline alternating) and the median is reported with the min-max spread and the minor
page faults per sample (large-array temporaries can be re-faulted on every call, see docs/benchmarks.md).
The baseline gets BGR patches, as BasicSR holds cv2-loaded images, so it pays for no channel flips.

HR patches (P x P, default 256) are cut at random positions from the bundled sample photos and held
in memory before anything is timed. Sample i uses `np.random.default_rng(SeedSequence([seed, i]))`
and patch i mod pool size, so ours and baseline (and 1 vs N processes) see identical records.

Each process runs single-threaded: OpenCV's thread pool is set to --cv-threads (default 1) and the
BLAS/OpenMP thread counts to 1 (unless already set in the environment), so "per process" means one
core and N processes do not oversubscribe.

Usage: python benchmarks/bench_degrade.py [--samples 300] [--patch 256] [--jobs N] [--seed 0] [--quick]
       [--repeats 3] [--cv-threads 1] [--single-in-main] [--json results.json]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # must happen before numpy is imported

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402

import degrade  # noqa: E402
import degrade.params  # noqa: E402
from degrade import ops  # noqa: E402
from degrade.allocator import tune_allocator  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _baseline  # noqa: E402
from _baseline import apply_baseline  # noqa: E402
from _machine import cpu_model  # noqa: E402

LEVELS: tuple = (1, 2, 3, "mix")
IMPLS = ("ours", "baseline")
POOL_SEED_TAG = 0x9A7C4  # patch positions come from their own stream, not the per-sample rngs

# Worker-process state (filled by _init_worker, also in the main process for the single-process run):
# the RGB patches for ours, and the same patches in BGR for the baseline, which works in BGR as
# BasicSR does (cv2-loaded images), so it is not charged for channel flips.
_POOL: list[np.ndarray] = []
_POOL_BGR: list[np.ndarray] = []


# --- setup ---------------------------------------------------------------------------------------


def _quiet_opencv() -> None:
    # The baseline hands imencode a float image as BasicSR does; OpenCV 5 warns before converting.
    with contextlib.suppress(Exception):
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)


def build_pool(patch: int, per_image: int, seed: int) -> list[np.ndarray]:
    """Cut `per_image` random P x P patches from every bundled sample photo (contiguous copies)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, POOL_SEED_TAG]))
    pool = []
    for path in degrade.sample_images():
        img = degrade.read_image(path)
        h, w = img.shape[:2]
        if h < patch or w < patch:
            raise SystemExit(f"{path.name} is {w}x{h}, smaller than the patch size {patch}")
        for _ in range(per_image):
            y = int(rng.integers(h - patch + 1))
            x = int(rng.integers(w - patch + 1))
            pool.append(np.ascontiguousarray(img[y : y + patch, x : x + patch]))
    return pool


TUNE_ALLOCATOR = os.environ.get("DEGRADE_BENCH_DEFAULT_MALLOC") != "1"


def _init_worker(patch: int, per_image: int, seed: int, cv_threads: int) -> None:
    global _POOL, _POOL_BGR
    if TUNE_ALLOCATOR:
        tune_allocator()  # as the degrade CLI and make-dataset workers do
    cv2.setNumThreads(cv_threads)
    _quiet_opencv()
    _POOL = build_pool(patch, per_image, seed)
    _POOL_BGR = [np.ascontiguousarray(p[..., ::-1]) for p in _POOL]


def _impl(impl: str):
    """(apply function, patch pool) of an implementation."""
    if impl == "ours":
        return degrade.apply, _POOL
    return functools.partial(apply_baseline, bgr=True), _POOL_BGR


def _sample_rng(seed: int, i: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, i]))


def _minflt() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def run_block(impl: str, level, seed: int, start: int, stop: int) -> tuple[float, int]:
    """Sample + apply samples start..stop-1 with `impl`; returns (elapsed seconds, minor page faults)."""
    apply_fn, pool = _impl(impl)
    f0 = _minflt()
    t0 = time.perf_counter()
    for i in range(start, stop):
        params = degrade.sample_params(level, _sample_rng(seed, i))
        apply_fn(pool[i % len(pool)], params)
    return time.perf_counter() - t0, _minflt() - f0


def _call(ex: ProcessPoolExecutor | None, fn, *args):
    return fn(*args) if ex is None else ex.submit(fn, *args).result()


# --- measurements --------------------------------------------------------------------------------


def bench_single(ex: ProcessPoolExecutor | None, samples: int, seed: int, warmup: int, repeats: int) -> tuple[dict, dict]:
    """{(impl, level): [samples/s per repeat]} and {(impl, level): minor page faults per sample}.

    Runs in the one worker of `ex` (or in this process when `ex` is None); ours and baseline alternate.
    """
    out: dict = defaultdict(list)
    faults: dict = defaultdict(list)
    for level in LEVELS:
        for impl in IMPLS:
            _call(ex, run_block, impl, level, seed + 1, 0, warmup)  # other seeds: caches, allocator, code paths
    for _ in range(repeats):
        for level in LEVELS:
            for impl in IMPLS:
                elapsed, flt = _call(ex, run_block, impl, level, seed, 0, samples)
                out[(impl, level)].append(samples / elapsed)
                faults[(impl, level)].append(flt / samples)
    return dict(out), {k: float(np.median(v)) for k, v in faults.items()}


def bench_multi(samples: int, seed: int, jobs: int, warmup: int, repeats: int, init_args: tuple) -> dict:
    """{(impl, level): [aggregate samples/s per repeat]} with `jobs` processes, one block each.

    The samples 0..samples-1 (the same records as the single-process run) are split into `jobs`
    contiguous blocks; the time is the wall time from submitting the blocks to the last result.
    """
    bounds = np.linspace(0, samples, jobs + 1).round().astype(int)
    out: dict = defaultdict(list)
    with ProcessPoolExecutor(max_workers=jobs, initializer=_init_worker, initargs=init_args) as ex:
        # Warm-up: start every worker (patch pool, imports, caches) before anything is timed.
        warm = [
            ex.submit(run_block, impl, level, seed + 1, j * warmup, (j + 1) * warmup)
            for j in range(jobs)
            for level in LEVELS
            for impl in IMPLS
        ]
        for f in warm:
            f.result()
        for _ in range(repeats):
            for level in LEVELS:
                for impl in IMPLS:
                    t0 = time.perf_counter()
                    futs = [
                        ex.submit(run_block, impl, level, seed, int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])
                    ]
                    for f in futs:
                        f.result()
                    out[(impl, level)].append(samples / (time.perf_counter() - t0))
    return dict(out)


# Per-op profile: module attribute -> category. pipeline.py calls `ops.blur(...)` etc. and
# params.py calls `gaussian_kernel` / `sinc_kernel` through its module globals, so replacing the
# attributes on those modules times every call. The baseline's steps are wrapped the same way.
OURS_OPS = [
    (ops, "blur", "blur"),
    (ops, "resize", "resize"),
    (ops, "add_gaussian_noise", "noise gaussian"),
    (ops, "add_poisson_noise", "noise poisson"),
    (ops, "jpeg", "jpeg"),
    (ops, "clamp", "quantise/clamp"),
    (ops, "quantise", "quantise/clamp"),
    (degrade.params, "gaussian_kernel", "kernel build"),
    (degrade.params, "sinc_kernel", "kernel build"),
]
BASELINE_OPS = [
    (_baseline, "filter2d", "blur"),
    (_baseline, "resize", "resize"),
    (_baseline, "gaussian_noise", "noise gaussian"),  # includes its clip
    (_baseline, "poisson_noise", "noise poisson"),  # includes its clip
    (_baseline, "jpeg", "jpeg"),
    (_baseline, "quantise", "quantise/clamp"),
    (degrade.params, "gaussian_kernel", "kernel build"),
    (degrade.params, "sinc_kernel", "kernel build"),
]
CATEGORIES = [
    "sample_params",
    "kernel build",
    "blur",
    "resize",
    "noise gaussian",
    "noise poisson",
    "jpeg",
    "quantise/clamp",
    "other (rng setup, checks, glue)",
]


@contextlib.contextmanager
def timed_ops(targets, acc: dict, calls: dict):
    saved = []
    for module, name, cat in targets:
        fn = getattr(module, name)
        saved.append((module, name, fn))

        def wrapper(*args, _fn=fn, _cat=cat, **kwargs):
            t0 = time.perf_counter()
            try:
                return _fn(*args, **kwargs)
            finally:
                acc[_cat] += time.perf_counter() - t0
                calls[_cat] += 1

        setattr(module, name, wrapper)
    try:
        yield
    finally:
        for module, name, fn in saved:
            setattr(module, name, fn)


def profile(impl: str, level, samples: int, seed: int) -> tuple[dict, dict, float]:
    """Seconds and call counts per category over `samples` samples, and the total seconds."""
    apply_fn, pool = _impl(impl)
    acc: dict = defaultdict(float)
    calls: dict = defaultdict(int)
    with timed_ops(OURS_OPS if impl == "ours" else BASELINE_OPS, acc, calls):
        t_start = time.perf_counter()
        for i in range(samples):
            t0 = time.perf_counter()
            params = degrade.sample_params(level, _sample_rng(seed, i))
            acc["sample_params"] += time.perf_counter() - t0
            calls["sample_params"] += 1
            apply_fn(pool[i % len(pool)], params)
        total = time.perf_counter() - t_start
    acc[CATEGORIES[-1]] = total - sum(acc.values())
    return dict(acc), dict(calls), total


def _uses_area(p: degrade.DegradationParams) -> bool:
    return any(r is not None and r.mode == "area" for r in (p.resize1, p.resize2, p.final))


def agreement(levels, n: int, seed: int) -> list[tuple]:
    """Ours vs baseline on noise-free records (noise1 = noise2 = None).

    Rows (level, group, records, identical-value fraction, max abs diff in 0-255 units), with the
    records split by whether any resize uses mode "area": the baseline's area is OpenCV INTER_AREA
    (as BasicSR's CPU code), which need not equal the library's area resize at non-integer factors.
    """
    rows = []
    for level in levels:
        stats = {False: [0, 0, 0, 0], True: [0, 0, 0, 0]}  # records, same, total, max diff
        for i in range(n):
            p = degrade.sample_params(level, _sample_rng(seed, i))
            p = dataclasses.replace(p, noise1=None, noise2=None)
            hr = _POOL[i % len(_POOL)]
            a = np.rint(degrade.apply(hr, p) * 255).astype(np.int16)
            b = np.rint(apply_baseline(hr, p) * 255).astype(np.int16)  # RGB in, RGB out
            st = stats[_uses_area(p)]
            st[0] += 1
            st[1] += int(np.count_nonzero(a == b))
            st[2] += a.size
            st[3] = max(st[3], int(np.abs(a - b).max()))
        for area, (count, same, total, max_diff) in stats.items():
            if count:
                rows.append((level, "some resize is area" if area else "no area resize", count, same / total, max_diff))
    return rows


# --- reporting -----------------------------------------------------------------------------------


def table(headers: list[str], rows: list[list], align: str | None = None) -> str:
    """A Markdown table (readable as plain text, pasteable into docs)."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[j]) for r in cells)) for j, h in enumerate(headers)]
    align = align or "l" + "r" * (len(headers) - 1)

    def line(vals):
        out = []
        for v, w, a in zip(vals, widths, align):
            out.append(v.ljust(w) if a == "l" else v.rjust(w))
        return "| " + " | ".join(out) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":" if a == "r" else "-" * (w + 2)) for w, a in zip(widths, align)) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in cells)])




def library_version() -> str:
    """degrade's version plus, in a git checkout, the commit and whether degrade/ has local changes."""
    root = Path(degrade.__file__).resolve().parent.parent
    text = degrade.__version__
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "degrade"], capture_output=True, text=True, check=True
        ).stdout.strip()
        text += f" (commit {head}{', degrade/ modified' if dirty else ''})"
    return text


def machine_info(args) -> dict:
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": affinity,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "opencv": cv2.__version__,
        "degrade": library_version(),
        "cv_threads": args.cv_threads,
        "platform": platform.platform(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=300, help="samples per level (and per implementation)")
    ap.add_argument("--patch", type=int, default=256, help="HR patch side, a multiple of 4")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="processes for the parallel run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="timed passes over the samples; medians are reported")
    ap.add_argument("--quick", action="store_true", help="a fast smoke run (40 samples, shorter profile)")
    ap.add_argument("--cv-threads", type=int, default=1, help="OpenCV threads per process (default 1)")
    ap.add_argument("--per-image", type=int, default=8, help="patches cut from each sample photo")
    ap.add_argument("--check-samples", type=int, default=40, help="noise-free records per level in the check")
    ap.add_argument(
        "--single-in-main",
        action="store_true",
        help="run the 1-process measurement and the profile in this process instead of a fresh worker process",
    )
    ap.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    if args.patch % 4 or args.patch < 32:
        ap.error("--patch must be a multiple of 4 and >= 32")
    if args.quick:
        args.samples = min(args.samples, 40)
        args.repeats = 1
        args.check_samples = min(args.check_samples, 5)
    if args.samples < 1 or args.repeats < 1 or args.jobs < 1:
        ap.error("--samples, --repeats and --jobs must be >= 1")
    warmup = max(2, min(20, args.samples // 10))

    init_args = (args.patch, args.per_image, args.seed, args.cv_threads)
    _init_worker(*init_args)

    info = machine_info(args)
    print("# Degradation throughput (benchmarks/bench_degrade.py)\n")
    print(f"command: python benchmarks/bench_degrade.py {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip())
    for k, v in info.items():
        print(f"{k}: {v}")
    print(
        f"patches: {len(_POOL)} x {args.patch}x{args.patch} from {len(degrade.sample_images())} sample photos; "
        f"{args.samples} samples per level and implementation, {args.repeats} timed repeats (median reported); "
        f"jobs: {args.jobs}\n",
        flush=True,
    )

    t_all = time.perf_counter()
    # The 1-process run and the profile go to one fresh worker process (unless --single-in-main), the
    # same kind of process as the N-process run: a long-lived main process can be in a different
    # malloc state (see docs/benchmarks.md), which would make "1 vs N" compare unlike things.
    with contextlib.ExitStack() as stack:
        ex1 = None
        if not args.single_in_main:
            ex1 = stack.enter_context(ProcessPoolExecutor(1, initializer=_init_worker, initargs=init_args))
        single, faults = bench_single(ex1, args.samples, args.seed, warmup, args.repeats)
        prof_samples = args.samples if not args.quick else 20
        prof_results = {}
        for level in (2, 3):
            _call(ex1, profile, "ours", level, warmup, args.seed + 1)  # warm-up
            prof_results[level] = {impl: _call(ex1, profile, impl, level, prof_samples, args.seed) for impl in IMPLS}
    multi = bench_multi(args.samples, args.seed, args.jobs, warmup, args.repeats, init_args) if args.jobs > 1 else {}
    med = {("1", k): float(np.median(v)) for k, v in single.items()}
    med.update({("N", k): float(np.median(v)) for k, v in multi.items()})

    n = args.jobs
    rows, spread = [], []
    for level in LEVELS:
        o, b = med[("1", ("ours", level))], med[("1", ("baseline", level))]
        row = [level, f"{o:.1f}", f"{b:.1f}", f"{o / b:.2f}x"]
        srow = [level] + [f"{min(single[(i, level)]):.1f}-{max(single[(i, level)]):.1f}" for i in IMPLS]
        if multi:
            om, bm = med[("N", ("ours", level))], med[("N", ("baseline", level))]
            row += [f"{om:.1f}", f"{bm:.1f}", f"{om / bm:.2f}x", f"{om / n:.1f}", f"{om / o:.2f}x"]
            srow += [f"{min(multi[(i, level)]):.1f}-{max(multi[(i, level)]):.1f}" for i in IMPLS]
        srow += [f"{faults[(i, level)]:.0f}" for i in IMPLS]
        rows.append(row)
        spread.append(srow)
    headers = ["level", "ours 1 proc", "baseline 1 proc", "ratio"]
    sheaders = ["level", "ours 1 proc", "baseline 1 proc"]
    if multi:
        headers += [f"ours {n} proc", f"baseline {n} proc", f"ratio {n} proc", "ours per proc", f"ours {n}/1"]
        sheaders += [f"ours {n} proc", f"baseline {n} proc"]
    sheaders += ["ours faults/sample 1 proc", "baseline faults/sample 1 proc"]
    print(f"## Throughput (samples/s, {args.patch}x{args.patch} HR, sample_params + apply; median of {args.repeats})\n")
    print(table(headers, rows))
    where = "this process" if args.single_in_main else "a fresh worker process"
    print(f"\n1 process = {where}. min-max over the {args.repeats} repeats (samples/s); minor page faults per sample, 1 proc (median):\n")
    print(table(sheaders, spread))
    print()

    for level, per_impl in prof_results.items():
        (acc_o, calls_o, tot_o), (acc_b, _calls_b, tot_b) = per_impl["ours"], per_impl["baseline"]
        prows = []
        for cat in CATEGORIES:
            so, sb = acc_o.get(cat, 0.0), acc_b.get(cat, 0.0)
            prows.append(
                [
                    cat,
                    f"{calls_o.get(cat, 0) / prof_samples:.2f}" if cat != CATEGORIES[-1] else "",
                    f"{1e3 * so / prof_samples:.3f}",
                    f"{100 * so / tot_o:.1f}%",
                    f"{1e3 * sb / prof_samples:.3f}",
                    f"{100 * sb / tot_b:.1f}%",
                ]
            )
        prows.append(["total", "", f"{1e3 * tot_o / prof_samples:.3f}", "100%", f"{1e3 * tot_b / prof_samples:.3f}", "100%"])
        print(f"## Per-op profile, level {level}, 1 process, {prof_samples} samples (timers add a little overhead)\n")
        print(table(["op", "calls/sample", "ours ms/sample", "ours share", "baseline ms/sample", "baseline share"], prows))
        print()

    check = agreement((1, 2, 3), args.check_samples, args.seed)
    print("## Sanity check: ours vs baseline LR on noise-free records (noise1 = noise2 = None)\n")
    print(
        table(
            ["level", "records", "count", "identical uint8 LR values", "max abs diff (0-255)"],
            [[lv, grp, cnt, f"{100 * frac:.4f}%", d] for lv, grp, cnt, frac, d in check],
            align="llrrr",
        )
    )
    print(f"\nwall time: {time.perf_counter() - t_all:.1f} s")

    if args.json:
        payload = {
            "machine": info,
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "single": {f"{i}/{lv}": v for (i, lv), v in single.items()},  # samples/s per repeat
            "single_minor_faults_per_sample": {f"{i}/{lv}": v for (i, lv), v in faults.items()},
            "multi": {f"{i}/{lv}": v for (i, lv), v in multi.items()},  # aggregate samples/s per repeat
            "profile": {
                str(lv): {impl: {"seconds": a, "calls": c, "total": t} for impl, (a, c, t) in d.items()}
                for lv, d in prof_results.items()
            },
            "agreement": [
                {"level": lv, "group": g, "records": c, "identical": f, "max_diff": d} for lv, g, c, f, d in check
            ],
        }
        args.json.write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
