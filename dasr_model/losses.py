"""Optional training terms of DASR: the U-Net SN discriminator and the VGG19 perceptual loss."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import spectral_norm

from dasr_model.checkpoints import load_weights_state
from dasr_model.model import is_channels_last

UPSAMPLE_IMPLS = ("interpolate", "lerp", "matmul")  # upsample2x's ways; the discriminator's also "auto"


def upsample2x(x: Tensor, impl: str = "lerp") -> Tensor:
    """F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False) for x (N, C, H, W): the same
    numbers up to float rounding, in x's memory format. Output 2i along an axis is 0.75 x[i] + 0.25 x[i-1],
    output 2i+1 is 0.75 x[i] + 0.25 x[i+1], the edge sample standing in for the one beyond it (PyTorch
    clamps the source coordinate to the image). Why: PyTorch's NCHW kernel walks all N*C channels of an
    output pixel in one thread, slow for a discriminator's batch x 512 channels (a quarter of a batch-48
    GAN step on an H200), and its NHWC kernel and both backwards add atomically (37 of a 134 ms step).

    - "interpolate": PyTorch's F.interpolate itself (the release's way; a benchmark's baseline);
    - "lerp": slices and lerps, a few memory-bound element-wise kernels per axis;
    - "matmul": each axis as one matrix product with the (2n, n) interpolation matrix
      (:func:`interp_matrix2x`), H then W, on x's memory as it lies (NCHW or channels_last, no copy):
      dense GEMMs on tensor cores, n multiply-adds per output where 2 are needed, but each tensor read
      and written once per axis. Its rounding is a GEMM's: TF32 matmuls, if someone turns them on, round
      float32 inputs to 10 bits (bf16 rounds to 7 bits either way); under autocast a float32 input comes
      out in the autocast dtype, as a matrix product does (in the discriminator the features are bf16
      there already, its convolutions' outputs).
    Both backwards are the adjoint with no atomic adds: deterministic."""
    if x.dim() != 4:
        raise ValueError(f"upsample2x takes (N, C, H, W), got {tuple(x.shape)}")
    if impl not in UPSAMPLE_IMPLS:
        raise ValueError(f"upsample2x impl must be one of {', '.join(UPSAMPLE_IMPLS)}, got {impl!r}")
    if impl == "interpolate":
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    n, c, h, w = x.shape
    if impl == "matmul":
        uh = interp_matrix2x(h, dtype=x.dtype, device=x.device)
        uw = interp_matrix2x(w, dtype=x.dtype, device=x.device)
        if is_channels_last(x):  # (N, H, W, C) in memory: rows of W*C values, then rows of C values
            y = torch.matmul(uh, x.permute(0, 2, 3, 1).reshape(n, h, w * c))  # (N, 2H, W*C)
            y = torch.matmul(uw, y.view(n * 2 * h, w, c))  # (N*2H, 2W, C)
            return y.view(n, 2 * h, 2 * w, c).permute(0, 3, 1, 2)
        y = torch.matmul(x.reshape(n * c * h, w), uw.t())  # (N*C*H, 2W): one GEMM over all rows
        return torch.matmul(uh, y.view(n * c, h, 2 * w)).view(n, c, 2 * h, 2 * w)
    if is_channels_last(x):
        return _upsample_axis(_upsample_axis(x.permute(0, 2, 3, 1), 2), 1).permute(0, 3, 1, 2)
    return _upsample_axis(_upsample_axis(x, 3), 2)


def interp_matrix2x(n: int, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Tensor:
    """(2n, n): row i holds the weights of F.interpolate's x2 bilinear output i (align_corners=False) on
    an axis of n samples: source coordinate (i + 0.5) / 2 - 0.5, clamped at 0, between floor and the next
    sample (the last standing in beyond the edge). Weights 1, 0.75 and 0.25, exact in any float type.
    Built from tensor operations on `device` (nothing copied from the host: capturable in a CUDA graph)."""
    src = (torch.arange(2 * n, device=device, dtype=torch.float32) + 0.5) / 2 - 0.5
    src = src.clamp(min=0)
    lo = src.floor()
    frac = (src - lo)[:, None]
    hi = (lo + 1).clamp(max=n - 1)
    j = torch.arange(n, device=device, dtype=torch.float32)[None, :]
    return ((1 - frac) * (j == lo[:, None]) + frac * (j == hi[:, None])).to(dtype)


def _upsample_axis(x: Tensor, dim: int) -> Tensor:
    n = x.shape[dim]
    before = torch.cat([x.narrow(dim, 0, 1), x.narrow(dim, 0, n - 1)], dim)  # x[i-1], x[0] at the edge
    after = torch.cat([x.narrow(dim, 1, n - 1), x.narrow(dim, n - 1, 1)], dim)  # x[i+1], x[n-1] at the edge
    out = torch.stack([torch.lerp(x, before, 0.25), torch.lerp(x, after, 0.25)], dim + 1)
    return out.flatten(dim, dim + 1)  # output 2i + phase


DISC_UPSAMPLES = ("auto", *UPSAMPLE_IMPLS)


class UNetDiscriminatorSN(nn.Module):
    """U-Net discriminator with spectral norm (Real-ESRGAN / DASR): per-pixel logits (B, 1, H, W).

    Its x2 bilinear up-sampling, `upsample` (all the same numbers up to float rounding): "auto", the
    fastest measured (:func:`auto_upsample`); "interpolate", PyTorch's F.interpolate, the release's way
    (a benchmark's baseline); or :func:`upsample2x`'s "lerp" or "matmul"."""

    def __init__(self, in_ch: int = 3, num_feat: int = 64):
        super().__init__()
        self.upsample = "auto"
        f = num_feat
        self.conv0 = nn.Conv2d(in_ch, f, 3, 1, 1)
        self.conv1 = spectral_norm(nn.Conv2d(f, f * 2, 4, 2, 1, bias=False))
        self.conv2 = spectral_norm(nn.Conv2d(f * 2, f * 4, 4, 2, 1, bias=False))
        self.conv3 = spectral_norm(nn.Conv2d(f * 4, f * 8, 4, 2, 1, bias=False))
        self.conv4 = spectral_norm(nn.Conv2d(f * 8, f * 4, 3, 1, 1, bias=False))
        self.conv5 = spectral_norm(nn.Conv2d(f * 4, f * 2, 3, 1, 1, bias=False))
        self.conv6 = spectral_norm(nn.Conv2d(f * 2, f, 3, 1, 1, bias=False))
        self.conv7 = spectral_norm(nn.Conv2d(f, f, 3, 1, 1, bias=False))
        self.conv8 = spectral_norm(nn.Conv2d(f, f, 3, 1, 1, bias=False))
        self.conv9 = nn.Conv2d(f, 1, 3, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        act = lambda t: F.leaky_relu(t, 0.2)  # noqa: E731
        up = self._upsample
        x0 = act(self.conv0(x))
        x1 = act(self.conv1(x0))
        x2 = act(self.conv2(x1))
        x3 = act(self.conv3(x2))
        x4 = act(self.conv4(up(x3))) + x2
        x5 = act(self.conv5(up(x4))) + x1
        x6 = act(self.conv6(up(x5))) + x0
        return self.conv9(act(self.conv8(act(self.conv7(x6)))))

    @property
    def upsample(self) -> str:
        return self._upsample_impl

    @upsample.setter
    def upsample(self, impl: str) -> None:
        if impl not in DISC_UPSAMPLES:
            raise ValueError(f"discriminator upsample must be one of {', '.join(DISC_UPSAMPLES)}, got {impl!r}")
        self._upsample_impl = impl

    def _upsample(self, x: Tensor) -> Tensor:
        impl = self._upsample_impl
        if impl == "auto":
            impl = auto_upsample(x.is_cuda, is_channels_last(x), x.dtype)
        return upsample2x(x, impl)


def auto_upsample(cuda: bool, channels_last: bool, dtype: torch.dtype) -> str:
    """The discriminator's "auto" x2 up-sampling for its features: the fastest way measured
    (`benchmarks/bench_upsample.py`, a GAN step's 9 up-samplings forward and 9 backward, summed). On a
    GPU "matmul" (an H200, bf16, batch 48: 12.2 ms channels_last against 43.9 for F.interpolate and
    64.4 for "lerp"; 9.7 NCHW against 92.7 and 67.7; the graphed GAN step 85.0 against 124.7 ms). On a
    CPU (2 cores, batch 2) PyTorch's own on channels_last features (float32: 63 ms against 342 for
    "matmul" and 913 for "lerp"), "matmul" on NCHW float32 (288 against 629 and 909) and "lerp" on NCHW
    bf16 (415 against 686 and 1029: a CPU's bf16 matrix products are slow)."""
    if cuda:
        return "matmul"
    if channels_last:
        return "interpolate"
    return "matmul" if dtype in (torch.float32, torch.float64) else "lerp"


def l1_loss(a: Tensor, b: Tensor) -> Tensor:
    """The mean absolute difference, as F.l1_loss, whose gradient keeps a and b's memory layout: F.l1_loss's
    mean broadcasts its gradient into a new NCHW tensor, which for channels_last images then meets the
    difference's sign in another layout (a transposing kernel on a GPU) and goes on into the network
    NCHW. The sum's broadcast stays a view, multiplied into the sign in its layout. The same gradient
    (1/numel times the sign, exactly); the value may differ from F.l1_loss's in the last bit (a sum
    divided against a mean). Unlike F.l1_loss, autocast does not raise it to float32: pass float32 (as
    train_step does) for a float32 loss."""
    d = a - b
    return d.abs().sum() / d.numel()


def gan_loss(logits: Tensor, real: bool) -> Tensor:
    """Vanilla GAN loss: binary cross-entropy with logits against all-real or all-fake targets."""
    target = torch.ones_like(logits) if real else torch.zeros_like(logits)
    return F.binary_cross_entropy_with_logits(logits, target)


# VGG19 "features": (out_channels or "M" for max-pool); conv indices follow torchvision's layout.
_VGG19 = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512]
# Features before ReLU: conv1_2, conv2_2, conv3_4, conv4_4, conv5_4 -> torchvision indices, weights (DASR).
PERCEPTUAL_LAYERS = {2: 0.1, 7: 0.1, 16: 1.0, 25: 1.0, 34: 1.0}


class VGGPerceptualLoss(nn.Module):
    """L1 between VGG19 features (before ReLU) of SR and GT, ImageNet-normalised input, frozen weights.

    `weights` is a local file holding a state dict in torchvision's layout (`features.N.weight/bias`,
    optionally with `classifier.*`, which is ignored); nothing is downloaded.
    """

    def __init__(self, weights: str | Path):
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        for item in _VGG19:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(in_ch, int(item), 3, padding=1), nn.ReLU(inplace=False)]
                in_ch = int(item)
        self.features = nn.Sequential(*layers[: max(PERCEPTUAL_LAYERS) + 1])
        expected = {f"{i}.{part}": shape for i, layer in enumerate(self.features) if isinstance(layer, nn.Conv2d)
                    for part, shape in (("weight", tuple(layer.weight.shape)), ("bias", tuple(layer.bias.shape)))}
        self.features.load_state_dict(load_weights_state(weights, "torchvision VGG19 weights file", expected,
                                                         prefix="features."), strict=True)
        self.requires_grad_(False)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def _taps(self, x: Tensor) -> dict[int, Tensor]:
        out = {}
        x = (x - self.mean) / self.std
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in PERCEPTUAL_LAYERS:
                out[i] = x
        return out

    def forward(self, sr: Tensor, gt: Tensor) -> Tensor:
        a, b = self._taps(sr), self._taps(gt.detach())
        return sum(w * F.l1_loss(a[i], b[i]) for i, w in PERCEPTUAL_LAYERS.items())
