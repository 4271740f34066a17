#!/usr/bin/env python
"""dasr-sr over a folder, end to end: outputs written one after another (--write-threads 0, the way before)
against writer threads that finish and write each output while the next image is upscaled; the same model,
images and machine, each in this run, with the outputs' bytes compared.

The network's share of the time decides the gain: on a CPU with the release's network it is most of the
time; on a GPU the network takes milliseconds and the PNG encoding of a x4 output 0.15-0.23 s (2048 x 2048
px), which the writer threads take off the main thread. `--small` (2 blocks of 8 features) stands for such
a fast network on a CPU.

Usage: python benchmarks/bench_sr.py [--count 12] [--size 128] [--threads 0,1,2] [--small] [--device cpu]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT)]
from _machine import cpu_model  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=12, help="LR images in the folder (crops of the bundled photos)")
    ap.add_argument("--size", type=int, default=128, help="LR side in px (outputs 4x)")
    ap.add_argument("--threads", default="0,1,2", help="--write-threads values, comma-separated (0: the baseline)")
    ap.add_argument("--small", action="store_true", help="a fast network: 2 experts, 2 blocks, 8 features")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=2, help="timed runs of each (the best is reported)")
    a = ap.parse_args(argv)

    import cv2
    import numpy as np
    import torch
    from click.testing import CliRunner

    import degrade
    from cli.sr import sr_main
    from dasr_model.checkpoints import save_checkpoint
    from dasr_model.model import DASR, DASRConfig
    from dasr_model.train import TrainConfig

    threads = [int(t) for t in a.threads.split(",")]
    cfg = DASRConfig(num_experts=2, num_block=2, num_feat=8, predictor_feat=8) if a.small else DASRConfig()
    rows, digests = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        model = DASR(cfg)
        save_checkpoint(tmp / "model.pt", {"config": TrainConfig(shards="", out="", model=cfg).to_dict(), "step": 0,
                                           "model": model.state_dict(), "ema_generator": model.generator.state_dict()})
        src = tmp / "in"
        src.mkdir()
        photos = []
        for path in degrade.sample_images():  # (the bundled photos are 512 px wide, 288-396 high)
            img = degrade.read_image(path)
            scale = max(1.0, a.size / min(img.shape[:2]))  # enlarged where smaller than --size
            photos.append(cv2.resize(img, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC) if scale > 1
                          else img)
        rng = np.random.default_rng(0)
        for i in range(a.count):
            img = np.clip(photos[i % len(photos)], 0, 1)
            y, x = rng.integers(0, img.shape[0] - a.size + 1), rng.integers(0, img.shape[1] - a.size + 1)
            degrade.write_image(src / f"{i:03d}.png", img[y : y + a.size, x : x + a.size])

        def run(n: int, out: Path) -> float:
            start = time.perf_counter()
            result = CliRunner().invoke(sr_main, [str(src), "-o", str(out), "--model", str(tmp / "model.pt"),
                                                  "--device", a.device, "--write-threads", str(n)])
            if result.exit_code != 0:
                raise SystemExit(f"dasr-sr failed: {result.output}")
            return time.perf_counter() - start

        size = "2 experts x 2 blocks x 8 features (--small)" if a.small else "release size (5 experts x 16 blocks x 64)"
        print(f"command: {shlex.join(['python', *sys.argv])}")
        print(f"# dasr-sr: {a.count} images of {a.size}x{a.size} px -> {4 * a.size}x{4 * a.size} PNG, {size}, "
              f"{a.device} ({cpu_model()}, {os.cpu_count()} cores), torch {torch.__version__}, "
              f"{time.strftime('%Y-%m-%d')}; best of {a.repeat}")
        print(f"| --write-threads | seconds | images/s | vs --write-threads {threads[0]} |")
        print("|---:|---:|---:|---:|", flush=True)
        run(threads[0], tmp / "warm")  # imports, the model's first calls
        for n in threads:  # each row as it is timed: a run cut short keeps the rows it finished
            best = min(run(n, tmp / f"t{n}-{r}") for r in range(a.repeat))
            digests[n] = hashlib.sha256(b"".join((tmp / f"t{n}-0" / p).read_bytes()
                                                 for p in sorted(os.listdir(tmp / f"t{n}-0")))).hexdigest()
            rows.append((n, best))
            print(f"| {n} | {best:.2f} | {a.count / best:.2f} | {rows[0][1] / best:.2f}x |", flush=True)
    same = len(set(digests.values())) == 1
    print(f"outputs byte-identical across rows: {'yes' if same else 'NO'}")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
