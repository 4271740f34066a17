"""Training data from `degrade make-dataset` shards, and the unsharp-masked target (docs/training.md).

Batches are a pure function of (seed, step): step s draws its sample indices and every crop / flip /
rotation from `SeedSequence([seed, s])`, so resuming at step s reproduces exactly what an
uninterrupted run would have seen, for any number of loader workers.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, Sampler

import degrade
from dasr_model.errors import DASRError
from degrade.augment import dihedral_image, dihedral_vector
from degrade.errors import DatasetError
from degrade.layout import BLOCKS
from degrade.recipe import SCALE
from degrade.sharpen import USM_SIGMA, USM_SIZE, USM_THRESHOLD, USM_WEIGHT  # one definition
from degrade.vector import VECTOR_LENGTH


class PairedShards(Dataset):
    """Items are keyed by (step, slot, index): a paired random crop of sample `index`, augmented.

    Returns dict(lr (3, c, c), hr (3, 4c, 4c) uint8, v (33,) float32): pixels travel as stored, a quarter
    of float32's bytes through the loader's workers, pinned memory and the copy to the GPU; `as_float`
    turns a batch's into float32 in [0, 1] on the device. The record is not parsed (no JSON per item).
    `lr_crop` None keeps the whole patch; flips and 90-degree rotations are applied to LR and HR alike,
    and v follows them (an anisotropic kernel's theta turns with the image: degrade.augment).
    """

    def __init__(self, source: str | Sequence[degrade.Sample], *, lr_crop: int | None = 64, augment: bool = True,
                 seed: int = 0):
        self.data = degrade.open_dataset(source) if isinstance(source, (str, os.PathLike)) else source
        self.lr_crop, self.augment, self.seed = lr_crop, augment, seed

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, key: tuple[int, int, int]) -> dict[str, Tensor]:
        step, slot, index = key
        s = self.data[index]
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, step, slot, 1]))
        lr, hr = s.lr, s.hr
        c = self.lr_crop
        if c is not None:
            if c > lr.shape[0] or c > lr.shape[1]:
                raise DASRError(f"LR crop {c} is larger than the stored LR patch {lr.shape[1]}x{lr.shape[0]}")
            y, x = int(rng.integers(lr.shape[0] - c + 1)), int(rng.integers(lr.shape[1] - c + 1))
            lr = lr[y : y + c, x : x + c]
            hr = hr[SCALE * y : SCALE * (y + c), SCALE * x : SCALE * (x + c)]
        v = checked_v(s.v, index)
        if self.augment:  # one of the 8 flips/rotations, applied to LR and HR alike, and v kept true to them
            turn = {"flip_lr": bool(rng.random() < 0.5), "flip_ud": bool(rng.random() < 0.5),
                    "rot90": int(rng.integers(4))}
            lr, hr = dihedral_image(lr, **turn), dihedral_image(hr, **turn)
            v = dihedral_vector(v, **turn)

        def to_tensor(img: np.ndarray) -> Tensor:
            return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))

        return {"lr": to_tensor(lr), "hr": to_tensor(hr), "v": torch.from_numpy(np.array(v, np.float32))}


# x / 255 for each 8-bit value, computed once by true division on the CPU. A lookup gives those numbers on
# any device (CUDA divides a tensor by a Python scalar as x * (1 / 255), 1 ulp off for 126 of the 256 values).
_LEVELS = torch.arange(256, dtype=torch.float32) / 255
_levels_on: dict[torch.device, Tensor] = {}


def checked_v(v, index: int) -> np.ndarray:
    """Sample `index`'s stored v as float32, or DatasetError where it is not VECTOR_LENGTH numbers in [0, 1]:
    a label the loss cannot use (NaN would stop a run as a NaN loss, blamed on the learning rate) and a
    predictor error that means nothing (NaN, or an error above 1)."""
    v = np.asarray(v, np.float32)
    if v.shape != (VECTOR_LENGTH,) or not (v.min() >= 0 and v.max() <= 1):  # NaN fails both comparisons
        raise DatasetError(f"sample {index}: its v is not {VECTOR_LENGTH} numbers in [0, 1] "
                           "(a damaged dataset: degrade verify lists such rows)")
    return v


def as_float(pixels: Tensor, device: torch.device | str) -> Tensor:
    """A batch's uint8 pixels (B, 3, H, W) on `device` as float32 in [0, 1]: x / 255, the same numbers on
    any device (a table lookup)."""
    if pixels.dtype != torch.uint8:
        raise TypeError(f"as_float takes uint8 pixels, got {pixels.dtype}")
    device = torch.device(device)
    table = _levels_on.get(device)
    if table is None:
        table = _levels_on.setdefault(device, _LEVELS.to(device))
    return table[pixels.to(device, non_blocking=True).int()]


class StepBatchSampler(Sampler[list[tuple[int, int, int]]]):
    """Batches for steps start..stop-1; step s takes `batch_size` indices drawn from (seed, s).

    With `rank`/`world_size` each process takes its own slice of the global batch.
    """

    def __init__(self, n: int, batch_size: int, *, start: int, stop: int, seed: int, rank: int = 0,
                 world_size: int = 1):
        self.n, self.batch_size, self.start, self.stop, self.seed = n, batch_size, start, stop, seed
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        for step in range(self.start, self.stop):
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, step, 0]))
            idx = rng.integers(self.n, size=self.batch_size * self.world_size)
            slots = range(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
            yield [(step, slot, int(idx[slot])) for slot in slots]


def _gaussian_1d(size: int, sigma: float, device, dtype) -> Tensor:
    x = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def _blur(img: Tensor, size: int = USM_SIZE, sigma: float = USM_SIGMA) -> Tensor:
    """Separable Gaussian blur with reflect padding, per channel. img (B, C, H, W)."""
    k = _gaussian_1d(size, sigma, img.device, img.dtype)
    c, r = img.shape[1], size // 2
    x = F.pad(img, (r, r, 0, 0), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, size).expand(c, 1, 1, size), groups=c)
    x = F.pad(x, (0, 0, r, r), mode="reflect")
    return F.conv2d(x, k.view(1, 1, size, 1).expand(c, 1, size, 1), groups=c)


def unsharp_mask(img: Tensor, *, weight: float = USM_WEIGHT, threshold: float = USM_THRESHOLD) -> Tensor:
    """DASR's sharpened target (docs/training.md): img (B, 3, H, W) in [0, 1], H and W > 25.

    R = I - blur(I); mask M = |R| * 255 > threshold, softened by the same blur;
    K = clip(I + weight R, 0, 1); target = M_soft K + (1 - M_soft) I. Blur: size 51, sigma 8, reflect.
    """
    residual = img - _blur(img)
    mask = (residual.abs() * 255 > threshold).to(img.dtype)
    soft = _blur(mask)
    sharp = (img + weight * residual).clamp(0, 1)
    return soft * sharp + (1 - soft) * img




def block_mae(v_hat: Tensor, v: Tensor) -> dict[str, float]:
    """Mean absolute error of v_hat against v, overall and per block of the layout."""
    err = (v_hat - v).abs()
    out = {"all": float(err.mean())}
    for name, (lo, hi) in BLOCKS.items():
        out[name] = float(err[:, lo:hi].mean())
    return out


__all__ = ["PairedShards", "StepBatchSampler", "as_float", "block_mae", "unsharp_mask"]
