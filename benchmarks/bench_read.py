#!/usr/bin/env python
"""Reading shards: `ds[i]` of `degrade.open_dataset` against a raw h5py read of the same arrays.

- raw h5py: the shard files opened once and their `hr`, `lr`, `v`, `params` h5py.Dataset objects kept;
  per sample, the shard and row are looked up in a precomputed table and `hr[row]`, `lr[row]`, `v[row]`,
  `params[row]` are read (the record stays a JSON string): the floor the reader is compared with;
- `ds[i]`: hr, lr, v as arrays, the record not parsed (it is parsed when `.params` is first used);
- `ds[i]` + `.params`: the same, and the record parsed into a DegradationParams;
- `ds[i:i+B]` per sample: a slice of B consecutive samples as one batch (stacked arrays).

Indices are drawn at random (fixed seed) over the whole dataset; the files are in the page cache (one
untimed pass first). Each figure is the median over --repeats passes of --reads reads, the methods
alternating within each pass. One process, one thread.

Usage: python benchmarks/bench_read.py [--data DIR] [--count 512] [--patch 256] [--compression none]
       [--reads 2000] [--repeats 5] [--batch 16]
Without --data, a dataset of --count samples (level 2, bundled photos, shards of 256) is made in a
temporary folder first.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

import degrade

try:
    from degrade import shards
except ImportError:  # an older checkout, before degrade.shards (to measure the reader as it was)
    from degrade import dataset as shards  # type: ignore[no-redef]
from _machine import cpu_model  # noqa: E402  (benchmarks/ is on sys.path: the script's folder)


class RawReader:
    """The floor: cached h5py.Dataset objects, a precomputed (shard, row) table, one read per array."""

    def __init__(self, folder: Path):
        manifest = shards.read_manifest(folder)
        self.files = [h5py.File(folder / s["file"], "r") for s in manifest["shards"]]
        self.sets = [(f["hr"], f["lr"], f["v"], f["params"]) for f in self.files]
        counts = [int(s["count"]) for s in manifest["shards"]]
        self.where = [(k, row) for k, n in enumerate(counts) for row in range(n)]

    def __getitem__(self, i: int):
        k, row = self.where[i]
        hr, lr, v, params = self.sets[k]
        return hr[row], lr[row], v[row], params[row]

    def close(self) -> None:
        for f in self.files:
            f.close()


def per_read_us(fn, indices) -> float:
    start = time.perf_counter()
    for i in indices:
        fn(i)
    return (time.perf_counter() - start) / len(indices) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path)
    ap.add_argument("--count", type=int, default=512)
    ap.add_argument("--patch", type=int, default=256)
    ap.add_argument("--compression", default="none", choices=shards.COMPRESSIONS)
    ap.add_argument("--reads", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.data
        if folder is None:
            folder = Path(tmp) / "ds"
            scan = shards.scan_sources([], args.patch)
            config = shards.DatasetConfig(level=2, count=args.count, patch_size=args.patch, seed=0, shard_size=256,
                                          compression=args.compression, source_root=scan.root,
                                          sources=tuple(scan.sources))
            shards.make_dataset(config, folder, jobs=min(2, os.cpu_count() or 1))
        ds = degrade.open_dataset(folder)
        compression = ds.config.compression if ds.config is not None else "?"
        patch = ds[0].hr.shape[0]  # the dataset's own (--data), not --patch
        files = len(getattr(ds, "files", ())) or "?"  # (an older reader may not say)
        raw = RawReader(folder)
        n = len(ds)
        rng = np.random.default_rng(0)
        indices = rng.integers(n, size=args.reads).tolist()
        starts = rng.integers(n - args.batch + 1, size=max(1, args.reads // args.batch)).tolist()
        for i in range(n):  # page cache and handles warm
            raw[i], ds[i]

        methods = {
            "raw h5py (cached datasets)": lambda: per_read_us(raw.__getitem__, indices),
            "ds[i]": lambda: per_read_us(ds.__getitem__, indices),
            "ds[i] + .params": lambda: per_read_us(lambda i: ds[i].params, indices),
            f"ds[i:i+{args.batch}] per sample": lambda: per_read_us(lambda s: ds[s : s + args.batch], starts)
            / args.batch,
        }
        try:
            ds[0:1]
        except (TypeError, ValueError):  # a reader without slices (an older checkout)
            del methods[f"ds[i:i+{args.batch}] per sample"]
        times: dict[str, list[float]] = {name: [] for name in methods}
        for _ in range(args.repeats):
            for name, run in methods.items():
                times[name].append(run())
        raw.close()
        ds.close()

    sample = f"{patch}x{patch} HR + {patch // 4}x{patch // 4} LR uint8, v, record"
    print(f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"cpu: {cpu_model()}, {os.cpu_count()} cores; python {platform.python_version()}, numpy {np.__version__}, "
          f"h5py {h5py.__version__} (HDF5 {h5py.version.hdf5_version}), degrade {degrade.__version__}")
    print(f"{n} samples ({sample}) in {files} shard(s), compression {compression}, {args.reads} random reads per pass, "
          f"median of {args.repeats} passes\n")
    floor = statistics.median(times["raw h5py (cached datasets)"])
    print("| read | us/sample (median) | min-max | vs raw h5py |")
    print("|---|---:|---:|---:|")
    for name, values in times.items():
        med = statistics.median(values)
        print(f"| {name} | {med:.1f} | {min(values):.1f}-{max(values):.1f} | {med / floor:.2f}x |")


if __name__ == "__main__":
    main()
