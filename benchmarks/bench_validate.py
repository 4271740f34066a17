#!/usr/bin/env python
"""Validation during training: ValidationSet (batched on the device) against evaluate_pairs (dasr-eval's path,
one image at a time with the experts fused), on the same samples and model; both timed in this run.

Usage: python benchmarks/bench_validate.py [--samples 40] [--device cpu] [--small] [--repeat 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT)]
from _machine import cpu_model  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=40, help="Validation samples (level mix, 256-px HR patches).")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--small", action="store_true", help="A tiny model (5 experts, 2 blocks, 16 features).")
    ap.add_argument("--repeat", type=int, default=2, help="Timed calls of each (the best is reported).")
    a = ap.parse_args(argv)

    import torch

    import degrade
    from dasr_model.evaluate import ValidationSet, evaluate_pairs, pairs_from_shards
    from dasr_model.model import DASR, DASRConfig
    from degrade.shards import DatasetConfig, make_dataset, scan_sources

    device = torch.device(a.device)
    with tempfile.TemporaryDirectory() as tmp:
        scan = scan_sources([Path(degrade.sample_images()[0]).parent], 256)
        make_dataset(DatasetConfig(level="mix", count=a.samples, patch_size=256, seed=7, shard_size=a.samples,
                                   compression="none", source_root=scan.root, sources=tuple(scan.sources)),
                     Path(tmp) / "val", jobs=1)
        pairs = pairs_from_shards(Path(tmp) / "val")
        torch.manual_seed(0)
        cfg = DASRConfig(num_experts=5, num_block=2, num_feat=16) if a.small else DASRConfig()
        model = DASR(cfg).to(device)
        built = time.perf_counter()
        val = ValidationSet(pairs, device)
        built = time.perf_counter() - built

        def best(fn) -> tuple[float, dict]:
            times, out = [], {}
            for _ in range(a.repeat):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t = time.perf_counter()
                out = fn()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times.append(time.perf_counter() - t)
            return min(times), out

        t_ref, ref = best(lambda: evaluate_pairs(model, pairs, device))
        t_new, new = best(lambda: val(model, model.generator))
    worst = max(abs(ref["levels"][k]["psnr_y"] - new["psnr_y"][k]) for k in new["psnr_y"])
    size = "5 experts x 2 blocks x 16 features" if a.small else "release size (5 experts x 16 blocks x 64)"
    print(f"# validation: {a.samples} samples, {size}, {a.device} ({cpu_model()}, {os.cpu_count()} cores), "
          f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    print("| path | seconds per validation | samples/s | vs evaluate_pairs |")
    print("|---|---:|---:|---:|")
    print(f"| evaluate_pairs (per image, experts fused) | {t_ref:.2f} | {a.samples / t_ref:.1f} | 1.00x |")
    print(f"| ValidationSet (batched; built once in {built:.2f} s) | {t_new:.2f} | {a.samples / t_new:.1f} "
          f"| {t_ref / t_new:.1f}x |")
    print(f"largest PSNR-Y difference per level: {worst:.1e} dB")


if __name__ == "__main__":
    main()
