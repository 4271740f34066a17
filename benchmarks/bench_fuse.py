#!/usr/bin/env python
"""The fuse alone: ms to mix one image's expert coefficients into the reused plain network.

`ExpertMSRResNet.fuse(a, into=net)`, what `dasr-sr` does once per image before its tiles, for a 5-expert,
16-block generator at --features (4: the arithmetic is nothing, so the host's overhead alone; 64: the full
model), into a float32 network and into a bf16 channels_last one (dasr-sr's GPU path). Median of
--repeats calls after 3, the device synchronised around each (on CUDA: the mix's kernels included), in
--rounds rounds whose medians are reported as their lowest and median (a shared machine's noise shows in
their spread). To compare two versions, run it in each checkout in turn, e.g. a `git worktree` of the
older commit with PYTHONPATH pointing there.

Usage: python benchmarks/bench_fuse.py [--device cpu] [--features 4,64] [--threads 1] [--repeats 40] [--rounds 5]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from _profile import timed_steps

from dasr_model.model import DASR, DASRConfig
from dasr_model.runs import pick_device


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--features", default="4,64")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: the least noise)")
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    import dasr_model

    src = Path(dasr_model.__file__).resolve().parents[1]
    rev = subprocess.run(["git", "-C", str(src), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    print(f"command: {shlex.join([sys.executable.rsplit('/', 1)[-1], *sys.argv])}")
    print(f"date: {datetime.date.today()}; torch {torch.__version__}; device: {device}; machine: {platform.node()}; "
          f"CPU threads: {args.threads}; code: {src} at {rev.stdout.strip() or '?'}\n")
    print("| features | network | fuse ms, lowest round | fuse ms, median round |\n|---:|---|---:|---:|")
    for feat in (int(f) for f in args.features.split(",")):
        torch.manual_seed(0)
        gen = DASR(DASRConfig(num_experts=5, num_feat=feat, num_block=16)).to(device).eval().generator
        a = torch.softmax(torch.randn(1, 5, device=device), 1)
        for label, dtype, fmt in (("float32", None, torch.contiguous_format),
                                  ("bf16 channels_last", torch.bfloat16, torch.channels_last)):
            with torch.no_grad():
                net = gen.fuse(a)
                net = net.to(dtype=dtype, memory_format=fmt) if dtype else net

                def fuse() -> None:
                    gen.fuse(a, into=net)

                for _ in range(3):
                    fuse()
                rounds = [statistics.median(timed_steps(device, args.repeats, fuse)) for _ in range(args.rounds)]
            print(f"| {feat} | {label} | {1000 * min(rounds):.2f} | {1000 * statistics.median(rounds):.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()
