#!/usr/bin/env python
"""The generator's element-wise operations alone, per memory layout: ms, GB/s and, on CUDA, the kernel.

On an H200 (2026-11-26) the bf16 batch-48 training step with the "folded" expert convolutions (the batch
folded into the channels, one (1, N*C, H, W) channels_last tensor) spent 7.0 of its 31 ms in 85 calls of
PyTorch's strided element-wise kernel (`elementwise_kernel<128, 4>`), where the "grouped" step in NCHW
showed no such bucket, and the discriminator's channels_last (N, C, H, W) operations ran the vectorised
kernel (`vectorized_elementwise_kernel<8>`). 85 is about the count of the generator's activations, residual
adds and their gradients per step. This benchmark runs those operations alone on the same values laid out
each way: NCHW, channels_last, the fold as `fold_batch` makes it, the fold as a grouped convolution
returns it (the tensors the step's operations actually get), and a 1-D view of the fold's memory (what
`ExpertMSRResNet.pointwise = "flat"` runs them on). Per operation and layout: the median ms, the
memory rate it reaches (each operand read or written once) and the tensor's strides; then, in a table of
its own, on CUDA the kernel that ran (torch.profiler; `vectorized_elementwise_kernel` is PyTorch's
vectorised path).

Usage: python benchmarks/bench_pointwise.py [--device auto] [--batch 48] [--lr 64] [--feat 64] [--dtype bf16]
       [--warmup 3] [--repeats 10]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import shlex
import statistics
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from _profile import short_kernel, timed_steps

from dasr_model.model import flat_view, fold_batch
from dasr_model.runs import pick_device

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def layouts(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """x (N, C, H, W) NCHW as each layout timed: the same values, another memory order (or shape)."""
    n, c = x.shape[:2]
    fold = fold_batch(x)
    weight = torch.zeros(n * c, c, 1, 1, device=x.device, dtype=x.dtype).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():  # a grouped 1x1 convolution's output: what the step's operations get from cuDNN
        conv = F.conv2d(fold, weight, groups=n)
        conv.copy_(fold)
    return {"NCHW (N, C, H, W)": x, "channels_last (N, C, H, W)": x.contiguous(memory_format=torch.channels_last),
            "fold (1, N*C, H, W), fold_batch": fold, "fold (1, N*C, H, W), a convolution's output": conv,
            "fold as 1-D (flat_view)": flat_view(fold)}


def operations(x: torch.Tensor, y: torch.Tensor) -> dict[str, tuple[Callable[[], object], int]]:
    """Name -> (call, tensors of x's size it reads and writes)."""
    return {"relu": (lambda: F.relu(x), 2), "leaky_relu": (lambda: F.leaky_relu(x, 0.1), 2),
            "add": (lambda: x + y, 3),
            "relu backward": (lambda: torch.ops.aten.threshold_backward(y, x, 0), 3)}


def kernel_names(device: torch.device, call: Callable[[], object]) -> str:
    """The CUDA kernels one call launches, shortened (:func:`_profile.short_kernel`); "-" on a CPU."""
    if device.type != "cuda":
        return "-"
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize(device)
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return "; ".join(dict.fromkeys(short_kernel(n, 70) for n in names)) or "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch", type=int, default=48)
    ap.add_argument("--lr", type=int, default=64, help="the feature maps' side (the LR crop)")
    ap.add_argument("--feat", type=int, default=64, help="channels per sample")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    if min(args.batch, args.lr, args.feat) < 1:
        ap.error("--batch, --lr, --feat: 1 or more")
    device = pick_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    print(f"command: {shlex.join([sys.executable.rsplit('/', 1)[-1], *sys.argv])}")
    print(f"date: {datetime.date.today()}; torch {torch.__version__}; device: {device} ({name}); {args.dtype}; "
          f"median of {args.repeats} after {args.warmup}\n")
    shape = (args.batch, args.feat, args.lr, args.lr)
    gen = torch.Generator(device=device).manual_seed(0)
    xs = layouts(torch.randn(shape, device=device, dtype=DTYPES[args.dtype], generator=gen))
    ys = layouts(torch.randn(shape, device=device, dtype=DTYPES[args.dtype], generator=gen))
    size = xs["NCHW (N, C, H, W)"].numel() * xs["NCHW (N, C, H, W)"].element_size()
    print(f"{shape}: {size / 2**20:.1f} MiB per tensor\n")
    print("| operation | layout | strides | ms | GB/s |\n|---|---|---|---:|---:|")
    calls = []
    for op in operations(xs["NCHW (N, C, H, W)"], ys["NCHW (N, C, H, W)"]):
        for lay, x in xs.items():
            call, tensors = operations(x, ys[lay])[op]
            for _ in range(args.warmup):
                call()
            ms = 1000 * statistics.median(timed_steps(device, args.repeats, call))
            print(f"| {op} | {lay} | {tuple(x.stride())} | {ms:.3f} | {tensors * size / ms / 1e6:.0f} |", flush=True)
            calls.append((op, lay, call))
    # the kernels after every timing: a profiler session per call (CUPTI may start each time, some 0.5 s), so
    # a run cut short for time loses kernel names, not timings
    print("\n| operation | layout | kernel (CUDA) |\n|---|---|---|")
    for op, lay, call in calls:
        print(f"| {op} | {lay} | {kernel_names(device, call)} |", flush=True)


if __name__ == "__main__":
    main()
