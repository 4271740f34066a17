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
Each figure is the median of --repeats runs; the first run of each compression with --jobs N also starts
the worker processes, later ones reuse them (the "cold" column is that first run). Like the CLI, it tunes
glibc's allocator first (degrade.allocator).

Usage: python benchmarks/bench_make_dataset.py [--count 300] [--level 2] [--jobs 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=300)
    ap.add_argument("--level", default="2")
    ap.add_argument("--patch", type=int, default=256)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
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
          f"median of {args.repeats}\n")

    maker = dsm.SampleMaker(config("none"))  # one maker: its source cache decodes each photo once
    for i in range(8):  # warm-up: source cache, Poisson tables
        maker.sample(i)
    bare = statistics.median(
        args.count / timed(lambda: [maker.sample(i) for i in range(args.count)])
        for _ in range(args.repeats)
    )
    rows = [("bare degradation (no writing)", "-", 1, bare, None, None, None, None)]
    with tempfile.TemporaryDirectory() as tmp:
        for compression in ("lzf", "gzip", "none"):
            for jobs in sorted({1, args.jobs}):
                rates, size, own, workers = [], 0, [], []
                for r in range(args.repeats):
                    out = Path(tmp) / f"{compression}-{jobs}-{r}"
                    cpu0, kids0 = own_cpu(), children_cpu()
                    seconds = timed(lambda: dsm.make_dataset(config(compression), out, jobs=jobs))
                    cpu1, kids1 = own_cpu(), children_cpu()
                    rates.append(args.count / seconds)
                    own.append((cpu1 - cpu0) / args.count * 1e3)
                    workers.append(sum(t - kids0.get(pid, 0.0) for pid, t in kids1.items()) / args.count * 1e3)
                    size = sum(p.stat().st_size for p in out.iterdir())
                    shutil.rmtree(out)
                rows.append(("make-dataset", compression, jobs, statistics.median(rates), size / args.count,
                             rates[0], statistics.median(own), statistics.median(workers)))

    print("| run | compression | jobs | samples/s | vs bare (1 process) | cold (1st run) | bytes/sample "
          "| CPU ms/sample: writer process | CPU ms/sample: workers |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, compression, jobs, rate, per_sample, cold, own_ms, workers_ms in rows:
        size = f"{per_sample / 1e3:,.1f} kB" if per_sample else "-"
        extra = "| - | - | - | - |" if cold is None else f"| {cold:.1f} | {size} | {own_ms:.2f} | {workers_ms:.2f} |"
        print(f"| {name} | {compression} | {jobs} | {rate:.1f} | {rate / bare:.2f}x " + extra)
    raw = (args.patch**2 + (args.patch // 4) ** 2) * 3
    print(f"\nuncompressed pixels per sample: {raw / 1e3:,.1f} kB")


if __name__ == "__main__":
    main()
