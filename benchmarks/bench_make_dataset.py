#!/usr/bin/env python
"""make-dataset end to end: samples/s including writing, vs the bare degradation rate; bytes/sample.

For --level (default 2) on the bundled sample photos with 256x256 patches:

- bare: `degrade.shards.SampleMaker(config).sample(i)` for every sample (source crop + sample_params +
  apply + encode), nothing written: the degradation rate the writer should not slow down;
- make-dataset with --jobs 1 and --jobs N for each compression (lzf, gzip, none): wall time of
  `degrade.shards.make_dataset` into a fresh folder, including scanning nothing (the scan is done
  once before timing), HDF5 writing, checksums and the manifest.

Reports samples/s, the ratio to the bare rate, bytes on disk per sample, and where the CPU time goes:
CPU ms per sample in this process (the writer: HDF5 writes, receiving the workers' chunks, checksums;
with --jobs 1 also the degrading thread) and in its worker processes (Linux: /proc of the children).
Each compression runs a cold round (every configuration once; --jobs N starts its worker processes
there: the "cold" column) and then --repeats warm rounds, the configurations alternating within each
round; figures are medians of the warm rounds. Like the CLI, it tunes
glibc's allocator first (degrade.allocator).

With --one-core, --jobs 1 also runs pinned to one CPU: --jobs 1 writes in this process while a thread
degrades, so on two cores it already uses more than one, and the pinned run is the one-core base of a
scaling figure (--jobs N on N cores against it).

Usage: python benchmarks/bench_make_dataset.py [--count 300] [--level 2] [--jobs 2] [--repeats 3] [--one-core]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from _machine import cpu_model  # noqa: E402  (benchmarks/ is on sys.path: the script's folder)

import degrade
from degrade import shards as dsm
from degrade.allocator import tune_allocator


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def own_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def children_cpu() -> dict[int, float]:
    """CPU seconds of each live child process (the workers), from /proc; empty elsewhere."""
    me, tick, out = os.getpid(), os.sysconf("SC_CLK_TCK"), {}
    for name in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if name.isdigit():
            try:
                fields = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == me:
                out[int(name)] = (int(fields[11]) + int(fields[12])) / tick
    return out


def _thread_ids() -> list[int]:
    return [int(tid) for tid in os.listdir("/proc/self/task")]


@contextlib.contextmanager
def pinned(one_core: bool):
    """Run the block with every thread of this process on one CPU (its first allowed one) when `one_core`:
    OpenCV's and h5py's pools were started before and keep their own masks, so each thread is pinned
    (threads started inside inherit the caller's). Restores each thread's own mask afterwards."""
    if not one_core:
        yield
        return
    masks = {}
    for tid in _thread_ids():
        with contextlib.suppress(OSError):  # a thread that just ended
            masks[tid] = os.sched_getaffinity(tid)
    cpu = {min(os.sched_getaffinity(0))}
    for tid in masks:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(tid, cpu)
    try:
        yield
    finally:
        for tid, mask in masks.items():
            with contextlib.suppress(OSError):
                os.sched_setaffinity(tid, mask)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=300)
    ap.add_argument("--level", default="2")
    ap.add_argument("--patch", type=int, default=256)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compressions", default="lzf,gzip,none", help="comma-separated, from lzf, gzip, none")
    ap.add_argument("--one-core", action="store_true",
                    help="also run --jobs 1 pinned to one core (Linux), the base of the scaling figure")
    args = ap.parse_args()

    tune_allocator()
    level = degrade.parse_level(args.level)
    scan = dsm.scan_sources([], args.patch)

    def config(compression: str) -> dsm.DatasetConfig:
        return dsm.DatasetConfig(level=level, count=args.count, patch_size=args.patch, seed=0,
                                 shard_size=args.shard_size, compression=compression,
                                 source_root=scan.root, sources=tuple(scan.sources))

    print(f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"cpu: {cpu_model()}, {os.cpu_count()} cores; python {platform.python_version()}, numpy {np.__version__}, "
          f"opencv {cv2.__version__}, degrade {degrade.__version__}")
    print(f"level {args.level}, {args.count} samples of {args.patch}x{args.patch}, shard size {args.shard_size}, "
          f"1 cold round + median of {args.repeats} warm rounds\n")

    maker = dsm.SampleMaker(config("none"))  # one maker: its source cache decodes each photo once
    for i in range(min(8, args.count)):  # warm-up: source cache, Poisson tables
        maker.sample(i)
    bare = statistics.median(
        args.count / timed(lambda: [maker.sample(i) for i in range(args.count)])
        for _ in range(args.repeats)
    )
    rows = [("bare degradation (no writing)", "-", 1, bare, None, None, None, None)]
    # --jobs 1 degrades in a thread while this process writes, so on 2 cores it already uses more than
    # one; pinned to one core it shows what one core does, the base of a scaling figure.
    runs = [(1, False)] + ([(1, True)] if args.one_core and os.path.isdir("/proc/self/task") else [])
    runs += [(args.jobs, False)] if args.jobs != 1 else []
    paired: dict[tuple[str, str], list[float]] = {}  # (compression, base) -> per-repeat ratios
    with tempfile.TemporaryDirectory() as tmp:
        for compression in args.compressions.split(","):
            # The configurations alternate within each repeat, so a drifting machine load touches all alike.
            seen: dict[tuple[int, bool], dict[str, list[float]]] = {run: {} for run in runs}
            for r in range(args.repeats + 1):  # round 0: the cold round (it starts the workers), not in the medians
                for jobs, one_core in runs:
                    out = Path(tmp) / f"{compression}-{jobs}-{one_core}-{r}"
                    cpu0, kids0 = own_cpu(), children_cpu()
                    with pinned(one_core):
                        seconds = timed(lambda: dsm.make_dataset(config(compression), out, jobs=jobs))
                    cpu1, kids1 = own_cpu(), children_cpu()
                    got = seen[jobs, one_core]
                    got.setdefault("rate", []).append(args.count / seconds)
                    got.setdefault("own", []).append((cpu1 - cpu0) / args.count * 1e3)
                    got.setdefault("workers", []).append(
                        sum(t - kids0.get(pid, 0.0) for pid, t in kids1.items()) / args.count * 1e3)
                    got["size"] = [sum(p.stat().st_size for p in out.iterdir())]
                    shutil.rmtree(out)
            for (jobs, one_core), got in seen.items():
                rows.append(("make-dataset", compression, f"{jobs} (1 core)" if one_core else jobs,
                             statistics.median(got["rate"][1:]), got["size"][0] / args.count,
                             got["rate"][0], statistics.median(got["own"][1:]), statistics.median(got["workers"][1:])))
            if args.jobs != 1:
                top = seen[args.jobs, False]["rate"]
                for base in [(1, False), (1, True)]:
                    if base in seen:
                        paired[compression, str(base[1])] = [a / b for a, b in zip(top[1:], seen[base]["rate"][1:])]

    print("| run | compression | jobs | samples/s | vs bare (1 process) | cold (1st run) | bytes/sample "
          "| CPU ms/sample: writer process | CPU ms/sample: workers |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, compression, jobs, rate, per_sample, cold, own_ms, workers_ms in rows:
        size = f"{per_sample / 1e3:,.1f} kB" if per_sample else "-"
        extra = "| - | - | - | - |" if cold is None else f"| {cold:.1f} | {size} | {own_ms:.2f} | {workers_ms:.2f} |"
        print(f"| {name} | {compression} | {jobs} | {rate:.1f} | {rate / bare:.2f}x " + extra)
    rate_of = {(c, str(j)): rate for _, c, j, rate, *_ in rows[1:]}
    if args.jobs != 1:
        print(f"\n--jobs {args.jobs} against --jobs 1, ratio of the medians (in brackets: lowest and highest ratio "
              "of the two runs of one warm round):")
        for c in args.compressions.split(","):
            parts = []
            for label, key, base in (("--jobs 1", "False", "1"), ("--jobs 1 on one core", "True", "1 (1 core)")):
                if (c, base) in rate_of:
                    pair = paired.get((c, key), [])
                    spread = f" ({min(pair):.2f}-{max(pair):.2f})" if pair else ""
                    parts.append(f"{rate_of[c, str(args.jobs)] / rate_of[c, base]:.2f}x {label}{spread}")
            print(f"- {c}: " + ", ".join(parts))
    raw = (args.patch**2 + (args.patch // 4) ** 2) * 3
    print(f"\nuncompressed pixels per sample: {raw / 1e3:,.1f} kB")


if __name__ == "__main__":
    main()
