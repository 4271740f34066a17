"""Shared by the training studies (expert_study.py, gpu_train_run.py): the photo split and dataset making.

The split is by file and fixed: a photo is held out when the first byte of SHA-256(file name) is
0 modulo 10 (24 of the 248 corpus photos), so no study ever trains on a held-out photo.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from degrade.discover import IMAGE_SUFFIXES


def split_photos(folder: str | Path) -> tuple[list[Path], list[Path]]:
    """(training files, held-out files) of the images in `folder`, sorted."""
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SystemExit(f"{folder}: no images")
    held = [p for p in files if hashlib.sha256(p.name.encode()).digest()[0] % 10 == 0]
    train = [p for p in files if p not in held]
    if not held:  # a handful of photos (the bundled samples in --smoke): hold out the last one
        train, held = files[:-1], files[-1:]
    return train, held


def make_dataset(files: list[Path], out: Path, *, level: str, count: int, patch: int, seed: int, jobs: int,
                 sharpen_hr: bool = False) -> Path:
    """`degrade make-dataset` on `files` (resumable: an existing complete dataset is kept)."""
    cmd = [sys.executable, "-m", "cli.main", "make-dataset", *map(str, files), "--out", str(out), "--level", level,
           "--count", str(count), "--patch-size", str(patch), "--seed", str(seed), "--jobs", str(jobs)]
    cmd += ["--sharpen-hr"] if sharpen_hr else []
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return out


def make_sharpened_lr_copy(src: Path, out: Path) -> Path:
    """A copy of dataset `src` whose LR patches are degraded from the unsharp-masked HR (the DASR
    release's pairing) with each sample's own record; HR, v and records are unchanged."""
    import h5py
    import torch

    import degrade
    from dasr_model.data import unsharp_mask

    if (out / "done").exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(src, out)
    ds = degrade.open_dataset(out)
    lrs = []
    for s in ds:
        hr = torch.from_numpy(s.hr.transpose(2, 0, 1).astype(np.float32) / 255)[None]
        sharp = unsharp_mask(hr)[0].numpy().transpose(1, 2, 0)
        sharp = np.ascontiguousarray(np.round(sharp * 255) / 255, dtype=np.float32)  # an 8-bit HR, as stored
        lrs.append(np.round(degrade.apply(sharp, s.params) * 255).astype(np.uint8))
    del ds
    i = 0
    for shard in sorted(out.glob("shard-*.h5")):
        with h5py.File(shard, "r+") as f:
            n = f["lr"].shape[0]
            f["lr"][...] = np.stack(lrs[i : i + n])
            i += n
    (out / "done").write_text("ok\n")
    return out
