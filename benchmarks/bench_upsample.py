#!/usr/bin/env python
"""The discriminator's x2 bilinear up-sampling alone: ms forward and forward + backward per way.

The U-Net discriminator up-samples three times per forward pass (its 512-, 256- and 128-channel features
at 1/8, 1/4 and 1/2 of the SR image's side), and a GAN training step runs it three times forward and
three times backward (real and fake for the discriminator, fake for the generator): 9 + 9 calls per step.
On an H200 (2026-11-26) PyTorch's NHWC kernels took 19.0 + 18.1 ms of a 134 ms batch-48 step.

For each of those three shapes at --batch and --sr, in --dtype, NCHW and channels_last, each way of
`UNetDiscriminatorSN.upsample` ("interpolate": F.interpolate, the release's way; upsample2x's "lerp" and
"matmul"): the median ms of the forward and of forward + backward (the gradient of a fixed random
tensor), the largest difference from F.interpolate's output in the same dtype (rounding: bf16 steps are
2^-8 near 1), and the peak memory of the backward on CUDA. The last table sums a step's 9 + 9 calls.

Usage: python benchmarks/bench_upsample.py [--device auto] [--batch 48] [--sr 256] [--dtype bf16]
       [--impl interpolate,lerp,matmul] [--warmup 3] [--repeats 10]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import shlex
import statistics
import sys

import torch
from _profile import timed_steps

from dasr_model.losses import UPSAMPLE_IMPLS as WAYS
from dasr_model.losses import upsample2x as upsample
from dasr_model.runs import pick_device

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def shapes(batch: int, sr: int, feat: int = 64) -> list[tuple[int, int, int, int]]:
    """The inputs of the discriminator's three up-samplings (UNetDiscriminatorSN, num_feat `feat`): x3
    (8 feat, sr/8), x4 (4 feat, sr/4), x5 (2 feat, sr/2)."""
    return [(batch, feat * k, sr // k, sr // k) for k in (8, 4, 2)]


def bench_one(device: torch.device, shape: tuple[int, int, int, int], dtype: torch.dtype, channels_last: bool,
              way: str, warmup: int, repeats: int) -> tuple[float, float, float, float | None]:
    """(forward ms, forward + backward ms, largest |difference| from F.interpolate, peak GiB on CUDA)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.rand(shape, device=device, dtype=dtype, generator=gen).contiguous(memory_format=fmt)
    xg = x.detach().requires_grad_(True)
    out_shape = (shape[0], shape[1], 2 * shape[2], 2 * shape[3])
    g = torch.rand(out_shape, device=device, dtype=dtype, generator=gen).contiguous(memory_format=fmt)
    with torch.no_grad():
        diff = float((upsample(x, way).float() - upsample(x, "interpolate").float()).abs().max())

    def forward() -> None:
        with torch.no_grad():
            upsample(x, way)

    def both() -> None:
        torch.autograd.grad(upsample(xg, way), xg, g)

    for _ in range(warmup):
        forward()
        both()
    fwd = statistics.median(timed_steps(device, repeats, forward))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    fb = statistics.median(timed_steps(device, repeats, both))
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return 1000 * fwd, 1000 * fb, diff, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch", type=int, default=48)
    ap.add_argument("--sr", type=int, default=256, help="the SR image's side (LR crop x 4)")
    ap.add_argument("--feat", type=int, default=64, help="the discriminator's num_feat")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    ap.add_argument("--impl", default=",".join(WAYS), help=f"comma-separated: {','.join(WAYS)}")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    ways = [w.strip() for w in args.impl.split(",") if w.strip()]
    if not ways or any(w not in WAYS for w in ways):
        ap.error(f"--impl: choose from {', '.join(WAYS)}")
    if args.sr % 8 or args.sr < 8:
        ap.error("--sr: a multiple of 8 (the discriminator halves it three times)")
    device = pick_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    print(f"command: {shlex.join([sys.executable.rsplit('/', 1)[-1], *sys.argv])}")
    print(f"date: {datetime.date.today()}; torch {torch.__version__}; device: {device} ({name}); "
          f"{args.dtype}; median of {args.repeats} after {args.warmup}\n")
    print("| input (N, C, H, W) | memory format | up-sampling | forward ms | forward + backward ms "
          "| max abs diff vs interpolate | peak GiB |\n|---|---|---|---:|---:|---:|---:|")
    totals: dict[tuple[bool, str], float] = {}
    for shape in shapes(args.batch, args.sr, args.feat):
        for cl in (False, True):
            for way in ways:
                fwd, fb, diff, peak = bench_one(device, shape, DTYPES[args.dtype], cl, way, args.warmup, args.repeats)
                # a GAN step passes each shape 3 times forward and 3 times backward: 3 x (forward + backward)
                totals[(cl, way)] = totals.get((cl, way), 0.0) + 3 * fb
                print(f"| {tuple(shape)} | {'channels_last' if cl else 'NCHW'} | {way} | {fwd:.2f} | {fb:.2f} "
                      f"| {diff:.2e} | {'-' if peak is None else f'{peak:.2f}'} |", flush=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    print("\nA GAN step's 9 up-samplings forward and 9 backward (3 x forward + backward per shape, summed):\n")
    print("| memory format | up-sampling | ms per step |\n|---|---|---:|")
    for (cl, way), ms in totals.items():
        print(f"| {'channels_last' if cl else 'NCHW'} | {way} | {ms:.1f} |")


if __name__ == "__main__":
    main()
