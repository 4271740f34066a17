"""LPIPS (Zhang et al., CVPR 2018; version 0.1 on AlexNet): the learned perceptual distance that SR papers
report beside PSNR and SSIM, for `dasr-eval --lpips-alexnet A --lpips-lin L`. Lower is closer.

Nothing is downloaded. Two local files give the weights:
- the AlexNet backbone in torchvision's layout (`features.{0,3,6,8,10}.{weight,bias}`; `classifier.*` is
  ignored), e.g. torchvision's ImageNet file `alexnet-owt-7be5be79.pth`;
- LPIPS's five linear layers (`lin{0..4}.model.1.weight`, shapes (1, C, 1, 1)), the `lpips` package's
  `weights/v0.1/alex.pth`.
Both may be in the pre-1.6 torch.save format those files use; both are read with weights_only=True.

The distance, as the `lpips` package computes it: both images mapped from [0, 1] to [-1, 1] and
standardised by LPIPS's fixed shift and scale; at each of AlexNet's five ReLU outputs, the features
normalised to unit length over channels, their squared difference weighted per channel by the linear
layer, averaged over positions; the five summed. tests/test_lpips.py checks it against that package.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dasr_model.checkpoints import load_weights_state
from dasr_model.errors import DASRError

# AlexNet's convolutions (torchvision `features` index: in, out, kernel, stride, padding); a 3x3 stride-2
# max-pool comes before the second and third. LPIPS taps the ReLU after each.
ALEXNET = {0: (3, 64, 11, 4, 2), 3: (64, 192, 5, 1, 2), 6: (192, 384, 3, 1, 1), 8: (384, 256, 3, 1, 1),
           10: (256, 256, 3, 1, 1)}
POOL_BEFORE = {3, 6}
SHIFT = (-0.030, -0.088, -0.188)  # LPIPS's input standardisation, on [-1, 1] images
SCALE = (0.458, 0.448, 0.450)
EPS = 1e-10  # added to the feature norm, as LPIPS does
MIN_SIDE = 31  # px: the smallest image whose features survive AlexNet's two pools before its third tap


class LPIPS(nn.Module):
    """LPIPS v0.1 (AlexNet) with frozen weights from two local files; `forward(a, b)` -> (B,) distances
    between (B, 3, H, W) images in [0, 1] (H and W at least MIN_SIDE)."""

    def __init__(self, alexnet_weights: str | Path, lin_weights: str | Path):
        super().__init__()
        expected = {}
        for i, (cin, cout, k, _, _) in ALEXNET.items():
            expected |= {f"{i}.weight": (cout, cin, k, k), f"{i}.bias": (cout,)}
        backbone = load_weights_state(alexnet_weights, "torchvision AlexNet weights file", expected, prefix="features.")
        lins = load_weights_state(lin_weights, "file of LPIPS's AlexNet linear layers",
                          {f"lin{n}.model.1.weight": (1, c[1], 1, 1) for n, c in enumerate(ALEXNET.values())})
        self.convs = nn.ModuleDict()
        for i, (cin, cout, k, stride, pad) in ALEXNET.items():
            conv = nn.Conv2d(cin, cout, k, stride, pad)
            conv.weight.data.copy_(backbone[f"{i}.weight"])
            conv.bias.data.copy_(backbone[f"{i}.bias"])
            self.convs[str(i)] = conv
        self.register_buffer("lins", torch.cat([w.flatten() for w in lins.values()]))
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        if a.shape != b.shape or a.dim() != 4 or a.shape[1] != 3:
            raise DASRError(f"LPIPS compares two (B, 3, H, W) batches of one shape, not {tuple(a.shape)} and "
                            f"{tuple(b.shape)}")
        if min(a.shape[-2:]) < MIN_SIDE:
            raise DASRError(f"LPIPS needs images of at least {MIN_SIDE}x{MIN_SIDE} px, not {a.shape[-1]}x{a.shape[-2]}")
        x, y = ((2 * t.float() - 1 - self.shift) / self.scale for t in (a, b))
        total, start = torch.zeros(a.shape[0], device=a.device), 0
        for i, conv in self.convs.items():  # one layer at a time: only its features of both images live
            if int(i) in POOL_BEFORE:
                x, y = F.max_pool2d(x, 3, 2), F.max_pool2d(y, 3, 2)
            x, y = F.relu(conv(x)), F.relu(conv(y))
            w = self.lins[start:start + x.shape[1]].view(1, -1, 1, 1)
            start += x.shape[1]
            diff = (_unit(x) - _unit(y)) ** 2
            total = total + (diff * w).sum(1).mean((1, 2))
        return total


def _unit(f: Tensor) -> Tensor:
    return f / (f.pow(2).sum(1, keepdim=True).sqrt() + EPS)
