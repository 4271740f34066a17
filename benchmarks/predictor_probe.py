#!/usr/bin/env python
"""Can the degradation predictor learn v at all? Two probes behind docs/training.md "Predictor quality".

- `train`: the predictor alone on the regression term (no generator), on the study's shards
  (benchmarks/expert_study.py --work DIR), printing every 250 steps its training L1 beside the L1 of
  the training set's median v on the same batches, its held-out L1 (levels 1-3) beside the median's,
  and the std of v_hat over the held-out images (0 = the same answer for every image).
- `correlate`: how visible some labels are in the LR: the correlation, per level, between a crude
  high-frequency energy of the LR (mean |2-D second difference| of its luma) and chosen entries of v.

Usage: python benchmarks/predictor_probe.py train --work DIR [--shards DIR [--photos DIR]] [--crop 24] [--steps 1500]
           [--lr 1e-3] [--init default|kaiming] [--center] [--loss l1|mse]
       python benchmarks/predictor_probe.py correlate --shards DIR [--count 3000]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

CORRELATE = {"noise1.strength": 18, "noise2.strength": 22, "jpeg1.quality": 26, "jpeg2.quality": 27,
             "blur1.sigma_x": 1, "sinc.omega_c": 9}


def train_probe(a: argparse.Namespace) -> None:
    import torch
    import torch.nn.functional as F

    import degrade
    from dasr_model.data import PairedShards, StepBatchSampler
    from dasr_model.model import DegradationPredictor

    torch.set_num_threads(1)
    shards = str(a.shards or a.work / "train")
    if a.photos is not None:  # make the shards (patch 4 x crop) from the study's training photos
        import sys

        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from _study import make_dataset, split_photos

        make_dataset(split_photos(a.photos)[0], Path(shards), level="mix", count=3000, patch=4 * a.crop, seed=3,
                     jobs=1)
    ds = PairedShards(shards, lr_crop=a.crop, seed=0)
    median = torch.from_numpy(np.median(np.stack([s.v for s in degrade.open_dataset(shards)]), 0))
    vals = [degrade.open_dataset(a.work / f"val-L{level}") for level in (1, 2, 3)]
    val_lr = torch.cat([torch.from_numpy(np.stack([s.lr for s in d])).permute(0, 3, 1, 2).float() / 255 for d in vals])
    val_v = torch.cat([torch.from_numpy(np.stack([s.v for s in d])) for d in vals])
    torch.manual_seed(0)
    p = DegradationPredictor(num_feat=a.features)
    if a.init == "kaiming":
        for m in p.ConvNet:
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, a=0.2, nonlinearity="leaky_relu")
                torch.nn.init.zeros_(m.bias)

    def predict(x):
        if a.input == "highpass":  # the image minus its 3x3 local mean, x10: texture and noise, no brightness
            x = 10 * (x - F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1))
        elif a.input == "standardize":  # per image and channel: zero mean, unit std
            x = (x - x.mean((2, 3), keepdim=True)) / (x.std((2, 3), keepdim=True) + 1e-3)
        return p((x - 0.5) * 4 if a.center else x)[0]

    opt = torch.optim.Adam(p.parameters(), a.lr)
    ours, base = [], []
    print(f"predictor alone: crop {a.crop}, {a.features} features, Adam {a.lr:g}, init {a.init}, "
          f"center {a.center}, loss {a.loss}, input {a.input}, shards {shards}")
    for step, batch in enumerate(StepBatchSampler(len(ds), a.batch, start=0, stop=a.steps, seed=0)):
        items = [ds[k] for k in batch]
        x, v = torch.stack([i["lr"] for i in items]).float() / 255, torch.stack([i["v"] for i in items])
        v_hat = predict(x)
        loss = F.mse_loss(v_hat, v) if a.loss == "mse" else F.l1_loss(v_hat, v)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ours.append(F.l1_loss(v_hat.detach(), v).item())
        base.append(F.l1_loss(median.expand_as(v), v).item())
        if (step + 1) % 250 == 0:
            with torch.no_grad():
                vh = predict(val_lr)
            print(f"step {step + 1}: train L1 {np.mean(ours[-250:]):.4f} (median v {np.mean(base[-250:]):.4f}); "
                  f"held-out L1 {F.l1_loss(vh, val_v).item():.4f} (median v "
                  f"{F.l1_loss(median.expand_as(val_v), val_v).item():.4f}); v_hat std over images "
                  f"{vh.std(0).mean().item():.4f}", flush=True)


def correlate(a: argparse.Namespace) -> None:
    import degrade

    ds = degrade.open_dataset(a.shards)
    rows = []
    for i in range(min(a.count, len(ds))):
        s = ds[i]
        g = s.lr.astype(np.float32).mean(2) / 255
        energy = np.abs(g[1:, 1:] - g[:-1, 1:] - g[1:, :-1] + g[:-1, :-1]).mean()
        rows.append((s.params.level, energy, *s.v))
    arr = np.array(rows)
    print(f"correlation of LR high-frequency energy with v entries, {len(arr)} samples of {a.shards}")
    for level in (1, 2, 3):
        m = arr[:, 0] == level
        cells = []
        for name, idx in CORRELATE.items():
            col = arr[m, 2 + idx]
            if col.std() > 0:
                cells.append(f"{name} {np.corrcoef(arr[m, 1], col)[0, 1]:+.3f}")
        print(f"level {level} ({int(m.sum())} samples): " + ", ".join(cells))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="probe", required=True)
    t = sub.add_parser("train")
    t.add_argument("--work", type=Path, required=True, help="An expert_study.py --work folder (val-L1..3).")
    t.add_argument("--shards", type=Path, help="Training shards (default WORK/train).")
    t.add_argument("--photos", type=Path, help="Make --shards first: 3000 mix patches of 4 x --crop px, seed 3.")
    t.add_argument("--crop", type=int, default=24)
    t.add_argument("--steps", type=int, default=1500)
    t.add_argument("--batch", type=int, default=16)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--features", type=int, default=32)
    t.add_argument("--init", choices=["default", "kaiming"], default="default")
    t.add_argument("--center", action="store_true", help="Feed (lr - 0.5) * 4.")
    t.add_argument("--loss", choices=["l1", "mse"], default="l1")
    t.add_argument("--input", choices=["raw", "highpass", "standardize"], default="raw",
                   help="What the predictor sees: the LR, its high-pass residual, or the LR standardised per image.")
    c = sub.add_parser("correlate")
    c.add_argument("--shards", type=Path, required=True)
    c.add_argument("--count", type=int, default=3000)
    a = ap.parse_args()
    train_probe(a) if a.probe == "train" else correlate(a)


if __name__ == "__main__":
    main()
