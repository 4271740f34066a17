#!/usr/bin/env python
"""dasr-sr speed: G on one LR image, per-sample expert mixing vs the experts fused once per image.

For each LR size (square, one image, the full model: 5 experts, 16 blocks, 64 features, random weights
at the release's init), milliseconds per image, median of --repeats after --warmup:

- `experts fp32`: `model.sr(lr, a)`, every layer mixing its K experts for the image (the "grouped"
  expert conv: fused per-sample kernel + grouped conv), float32 (the baseline of the ratio column);
- `fused fp32`: `dasr_model.infer.super_resolve(model, lr, a)`, which mixes every layer once into a
  plain MSRResNet (`fuse_experts`) and runs that; the fuse is part of the time and also shown alone;
- on CUDA (or with --bf16) also `experts bf16 (autocast)` and `fused bf16 channels_last`
  (`super_resolve(..., dtype=torch.bfloat16, channels_last=True)`).

max|diff| is against the `experts fp32` output (float32 images in about [0, 1]). CUDA fp32 convolutions
use TF32 when torch.backends.cudnn.allow_tf32 is on (printed at the top; PyTorch's default is on).

Usage: python benchmarks/bench_infer.py [--device auto] [--sizes 128,256,512] [--experts 5]
       [--warmup 2] [--repeats 5] [--bf16]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable

import torch

from dasr_model.infer import fuse_experts, super_resolve
from dasr_model.model import DASR, DASRConfig
from dasr_model.runs import pick_device


def timed(fn: Callable[[], torch.Tensor], device: torch.device, warmup: int, repeats: int
          ) -> tuple[float, torch.Tensor, float | None]:
    """Median ms of fn(), its last output, and the peak CUDA memory (MiB) during the timed calls."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    out = None
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    assert out is not None
    return 1000 * statistics.median(times), out, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--sizes", default="128,256,512", help="LR sides (square images), comma-separated")
    ap.add_argument("--experts", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--bf16", action="store_true",
                    help="time the bf16 paths on a CPU too (on CUDA they always run): the GPU's path, for dry runs")
    args = ap.parse_args()
    device = pick_device(args.device)
    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine() or "CPU"
    print(f"command: {shlex.join([sys.executable.rsplit('/', 1)[-1], *sys.argv])}")
    print(f"machine: {platform.node()}; {platform.platform()}; device: {device} ({name}); "
          f"CPU threads: {torch.get_num_threads()}")
    print(f"date: {datetime.datetime.now().isoformat(timespec='seconds')}; torch {torch.__version__}"
          + (f"; CUDA {torch.version.cuda}; cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}" if cuda else ""))
    print(f"model: DASR, {args.experts} experts, 16 blocks, 64 features; one image; "
          f"median of {args.repeats} after {args.warmup} warm-up\n")

    torch.manual_seed(0)
    model = DASR(DASRConfig(num_experts=args.experts)).to(device).eval()
    print("| LR | path | ms/image | speed-up vs experts fp32 | fuse ms | peak MiB | max abs diff |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for size in (int(s) for s in args.sizes.split(",")):
        lr = torch.rand(1, 3, size, size, device=device)
        with torch.no_grad():
            _, a = model.predict(lr)
        paths: list[tuple[str, Callable[[], torch.Tensor], dict]] = [
            ("experts fp32", lambda: model.sr(lr, a), {}),
            ("fused fp32", lambda: super_resolve(model, lr, a), {}),
        ]
        if cuda or args.bf16:
            def experts_bf16() -> torch.Tensor:
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    return model.sr(lr, a).float()

            paths += [("experts bf16 (autocast)", experts_bf16, {}),
                      ("fused bf16 channels_last",
                       lambda: super_resolve(model, lr, a, dtype=torch.bfloat16, channels_last=True),
                       {"dtype": torch.bfloat16, "channels_last": True})]
        base_ms, base_out = None, None
        for label, fn, fuse_kw in paths:
            with torch.no_grad():
                ms, out, peak = timed(fn, device, args.warmup, args.repeats)
                fuse_ms = (timed(lambda: fuse_experts(model, a, **fuse_kw).conv_first.weight, device, 1,
                                 args.repeats)[0] if label.startswith("fused") else None)
            if base_ms is None:
                base_ms, base_out = ms, out
            diff = (out.float() - base_out.float()).abs().max().item()
            print(f"| {size} | {label} | {ms:.1f} | {base_ms / ms:.2f}x | "
                  f"{'-' if fuse_ms is None else f'{fuse_ms:.2f}'} | {'-' if peak is None else f'{peak:.0f}'} | "
                  f"{diff:.1e} |", flush=True)
            del out
        if cuda:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
