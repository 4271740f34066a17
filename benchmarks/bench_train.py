#!/usr/bin/env python
"""dasr-train speed: the data loader's samples/s, and seconds per training step per batch size.

- loader: `PairedShards` + `StepBatchSampler` through a torch DataLoader with --workers processes
  (LR crop 64 -> HR 256, flips/rotations), batches per second times batch size, nothing else running;
- steps: one full optimiser step of the DASR model (L1 + regression, EMA update; with --gan also the
  discriminator step) on random tensors already on the device, for each --batch-sizes, median of
  --repeats timed steps after --warmup steps. bf16 autocast on CUDA, float32 on CPU, as dasr-train.

Needs a dataset made with `degrade make-dataset` (patch 256) for the loader part.
Usage: python benchmarks/bench_train.py --shards DIR [--device auto] [--batch-sizes 6,16,48] [--gan]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import platform
import statistics
import time

import torch
from torch.utils.data import DataLoader

from dasr_model.data import PairedShards, StepBatchSampler, unsharp_mask
from dasr_model.losses import UNetDiscriminatorSN
from dasr_model.model import DASR
from dasr_model.train import StepParts, TrainConfig, pick_device, train_step


def bench_loader(shards: str, batch: int, workers: int, steps: int) -> float:
    ds = PairedShards(shards, lr_crop=64, seed=0)
    sampler = StepBatchSampler(len(ds), batch, start=0, stop=steps + 2, seed=0)
    it = iter(DataLoader(ds, batch_sampler=sampler, num_workers=workers))
    next(it), next(it)  # start-up
    start = time.perf_counter()
    n = sum(b["lr"].shape[0] for b in it)
    return n / (time.perf_counter() - start)


def bench_step(device: torch.device, batch: int, gan: bool, warmup: int, repeats: int) -> float:
    """Median seconds of `dasr_model.train.train_step` (the loop's own step) on random data."""
    torch.manual_seed(0)
    cfg = TrainConfig(shards="", out="", gan=gan)
    model = DASR(cfg.model).to(device)
    disc = UNetDiscriminatorSN().to(device) if gan else None
    parts = StepParts(net=model, model=model, ema=copy.deepcopy(model.generator).requires_grad_(False),
                      opt=torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=cfg.betas), disc=disc,
                      opt_d=torch.optim.Adam(disc.parameters(), lr=cfg.lr, betas=cfg.betas) if disc else None)
    lr = torch.rand(batch, 3, 64, 64, device=device)
    hr = unsharp_mask(torch.rand(batch, 3, 256, 256, device=device))
    v = torch.rand(batch, 33, device=device)
    bf16 = device.type == "cuda"

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(warmup):
        train_step(parts, cfg, lr, hr, v, bf16)
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        train_step(parts, cfg, lr, hr, v, bf16)
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-sizes", default="6,16,48")
    ap.add_argument("--loader-batch", type=int, default=48)
    ap.add_argument("--loader-workers", default="0,2")
    ap.add_argument("--loader-steps", type=int, default=20)
    ap.add_argument("--gan", action="store_true", help="also time steps with the GAN term")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--skip-steps", action="store_true")
    args = ap.parse_args()
    device = pick_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    print(f"date: {datetime.date.today()}; torch {torch.__version__}; device: {device} ({name})\n")
    if args.shards:
        print("| loader workers | batch | samples/s |\n|---:|---:|---:|")
        for w in (int(x) for x in args.loader_workers.split(",")):
            rate = bench_loader(args.shards, args.loader_batch, w, args.loader_steps)
            print(f"| {w} | {args.loader_batch} | {rate:.1f} |")
        print()
    if not args.skip_steps:
        print("| batch | GAN | ms/step |\n|---:|---|---:|")
        for b in (int(x) for x in args.batch_sizes.split(",")):
            for gan in ((False, True) if args.gan else (False,)):
                ms = 1000 * bench_step(device, b, gan, args.warmup, args.repeats)
                print(f"| {b} | {'yes' if gan else 'no'} | {ms:.1f} |")


if __name__ == "__main__":
    main()
