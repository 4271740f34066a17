"""The DASR network: degradation predictor P and the K-expert MSRResNet G.

Module and parameter names follow the released checkpoints, so a released state dict loads with
`load_state_dict(strict=True)`; :func:`dasr_model.release.load_release_weights` does that from files.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dasr_model.config import EXPERT_IMPLS, MAX_PARAMETERS, VECTOR_LENGTH, DASRConfig, ExpertImpl
from dasr_model.errors import DASRError

PREDICTOR_HALO = 32  # input pixels of context per predictor tile: even, and twice its 16-px receptive radius

__all__ = ["DASR", "DASRConfig", "DegradationPredictor", "EXPERT_IMPLS", "ExpertConv2d", "ExpertMSRResNet",
           "MAX_PARAMETERS", "MSRResNet", "POINTWISE", "flat_view", "fold_batch", "is_channels_last", "pixel_shuffle",
           "set_expert_impl", "shaped_like", "unfold_batch"]

# How the generators run their element-wise operations (activations, residual adds, and so their
# gradients): "4d" on the 4-D feature maps; "flat" on 1-D views of their memory (:func:`flat_view`), the
# same values in the same order. An experiment for CUDA: on an H200 (2026-11-26) the bf16 batch-48 step with
# the folded (1, N*C, H, W) channels_last maps spent 7 of 31 ms in 85 calls of PyTorch's strided
# element-wise kernel, which by their count and size look like these operations (a reading of the profile,
# which did not name them), where (N, C, H, W) channels_last maps ran its vectorised kernel. A 1-D dense
# tensor of one dtype is the plainest case for the vectorised one. Not yet timed on a GPU
# (benchmarks/bench_pointwise.py, bench_train.py --pointwise flat, bench_infer.py), so "4d" stays the default.
POINTWISE = ("4d", "flat")


class DegradationPredictor(nn.Module):
    """P: six 5x5 convs with LeakyReLU(0.2), global average pool -> v_hat (B, 33); mapping net -> a (B, K).

    The mapping net is Linear(33, 15) -> Linear(15, K) with nothing in between, as released; with
    `mixing="softmax"` its output goes through softmax(. / temperature). The parameters (and so the
    state-dict keys) are the same either way.
    """

    def __init__(self, *, num_experts: int = 5, num_feat: int = 64, hidden: int = 15, mixing: str = "linear",
                 temperature: float = 1.0, mapping_gain: float = 0.1, input_mode: str = "lr"):
        super().__init__()
        self.input_mode = input_mode
        chans = [3, num_feat, num_feat, num_feat, num_feat, num_feat, VECTOR_LENGTH]
        layers: list[nn.Module] = []
        for i in range(6):
            layers += [nn.Conv2d(chans[i], chans[i + 1], 5, stride=2 if i == 3 else 1, padding=2),
                       nn.LeakyReLU(0.2, inplace=True)]
        self.ConvNet = nn.Sequential(*layers)  # release names: ConvNet.{0,2,...,10}
        self.MappingNet = nn.Sequential(nn.Linear(VECTOR_LENGTH, hidden), nn.Linear(hidden, num_experts))
        self.mixing, self.temperature = mixing, temperature
        with torch.no_grad():  # gain 0.1: a starts near a uniform mix of the experts for every v
            self.MappingNet[1].weight.mul_(mapping_gain)
            self.MappingNet[1].bias.fill_(1.0 / num_experts if mixing == "linear" else 0.0)

    def mix(self, v: Tensor) -> Tensor:
        """Expert coefficients a (B, K) for degradation vectors v (B, 33), predicted or given."""
        a = self.MappingNet(v)
        return torch.softmax(a / self.temperature, dim=-1) if self.mixing == "softmax" else a

    def forward(self, lr: Tensor, *, tile: int | None = None) -> tuple[Tensor, Tensor]:
        """(v_hat (B, 33), a (B, K)) for lr (B, 3, h, w). With `tile`, the conv net runs on `tile`-sized
        pieces (with PREDICTOR_HALO pixels of context each) and their outputs are pooled together: the
        same v_hat as the whole-image pass (up to float summation order), in memory that follows the tile."""
        x = lr
        if self.input_mode == "highpass":  # replicate padding: exactly blind to a constant brightness offset
            x = 10 * (lr - F.avg_pool2d(F.pad(lr, (1, 1, 1, 1), mode="replicate"), 3, stride=1))
        if tile is None or max(x.shape[-2:]) <= tile:
            v_hat = self.ConvNet(x).mean(dim=(2, 3))
        else:
            v_hat = self._tiled_mean(x, tile)
        return v_hat, self.mix(v_hat)

    def _tiled_mean(self, x: Tensor, tile: int) -> Tensor:
        """The conv net's global mean over x, computed tile by tile. The net halves the resolution once
        (its 4th conv, stride 2, padding 2: output j looks at input 2j), so tiles start at even offsets and
        each keeps the output positions of its own region; a position's receptive field reaches 16 input
        pixels, inside the halo, so every kept value equals the whole-image pass's."""
        h, w = x.shape[-2:]
        tile += tile % 2
        total = x.new_zeros(x.shape[0], VECTOR_LENGTH)
        for y in range(0, h, tile):
            for x0 in range(0, w, tile):
                ya, xa = max(0, y - PREDICTOR_HALO), max(0, x0 - PREDICTOR_HALO)
                yb, xb = min(h, y + tile + PREDICTOR_HALO), min(w, x0 + tile + PREDICTOR_HALO)
                out = self.ConvNet(x[..., ya:yb, xa:xb])
                oy, ox = (y - ya) // 2, (x0 - xa) // 2
                ny, nx = -(-min(tile, h - y) // 2), -(-min(tile, w - x0) // 2)  # own output rows / cols
                total += out[..., oy : oy + ny, ox : ox + nx].sum(dim=(2, 3))
        return total / (-(-h // 2) * -(-w // 2))


class ExpertConv2d(nn.Module):
    """3x3 convolution whose kernel is a per-sample mix of K experts: W_n = sum_k a[n, k] W_k (same for b).

    weight (K, out, in, 3, 3), bias (K, out). Convolution is linear in its weights, so four ways of
    computing it give the same result (up to float rounding) and the same gradients; `impl` picks one
    (:func:`set_expert_impl` sets it on every expert conv of a model; it is not saved in state dicts):

    - "grouped" (default, the reference): the mix is fused once per sample, W_n (N, out, in, 3, 3), and
      applied as one grouped convolution with groups = N;
    - "dense": one ordinary convolution with all K experts as K*out output channels (the weight viewed as
      (K*out, in, 3, 3)), then y combined per sample: out[n] = sum_k a[n, k] y[n, k]. K times the FLOPs,
      but a plain dense conv (cuDNN/oneDNN's best kernels, channels_last, no per-sample weights);
      on CUDA the K*out channels are padded to a multiple of 8 with zero weights and sliced off again
      (:func:`dense_alignment`: the last layer's 15 are unaligned for cuDNN's tensor-core kernels);
    - "stacked": the input stacked K times, copy k scaled by a[n, k] (N, K*in, H, W), through one ordinary
      convolution with K*in input channels (the weight viewed as (out, K*in, 3, 3)): the sum over experts
      happens inside the convolution's own sum. K times the FLOPs, like "dense", but the large tensor is the
      scaled input rather than K outputs, and no per-expert combination pass follows; keeps channels_last;
    - "bmm": the fused W_n as one batched GEMM over the im2col columns (F.unfold + torch.baddbmm);
    - "folded": "grouped" on the batch folded into the channels, (1, N*in, H, W), in channels_last memory:
      each pixel holds every sample's channels in a row, which is what the grouped convolution reads and
      writes, so cuDNN's NHWC kernels take it as it is (in NCHW, "grouped" pays a layout conversion each
      way per convolution). :class:`ExpertMSRResNet` folds the batch once at its input and unfolds it at
      its output (:func:`fold_batch`); a layer given a plain batch folds it for itself.
    """

    def __init__(self, in_ch: int, out_ch: int, *, num_experts: int, init_scale: float = 0.1,
                 negative_slope: float = 0.1, impl: ExpertImpl = "grouped"):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, out_ch, in_ch, 3, 3))
        self.bias = nn.Parameter(torch.zeros(num_experts, out_ch))
        self.impl = impl
        # Kaiming per expert, experts drawn independently (symmetry breaking), times 0.1 as MSRResNet does
        # for every layer: the untrained network then outputs its bilinear base almost exactly. The
        # initial mix is about uniform (1/K each), whose variance is 1/K of one expert's: sqrt(K) compensates.
        for k in range(num_experts):
            nn.init.kaiming_normal_(self.weight[k], a=negative_slope, mode="fan_in", nonlinearity="leaky_relu")
        with torch.no_grad():
            self.weight.mul_(init_scale * math.sqrt(num_experts))

    @property
    def impl(self) -> str:
        return self._impl

    @impl.setter
    def impl(self, name: str) -> None:
        if name not in EXPERT_IMPLS:
            raise DASRError(f"expert impl must be one of {', '.join(EXPERT_IMPLS)}, got {name!r}")
        self._impl = name

    def extra_repr(self) -> str:
        k, o, i = self.weight.shape[:3]
        return f"{i}, {o}, num_experts={k}, impl={self.impl!r}"

    def fused(self, a: Tensor) -> tuple[Tensor, Tensor]:
        """Per-sample kernels (N, out, in, 3, 3) and biases (N, out) for mixing coefficients a (N, K)."""
        w = torch.einsum("nk,koihw->noihw", a, self.weight)
        b = a @ self.bias
        return w, b

    def forward(self, x: Tensor, a: Tensor) -> Tensor:
        """x (N, in, H, W), a (N, K) -> (N, out, H, W); with impl "folded" also x (1, N*in, H, W) folded
        (:func:`fold_batch`) -> (1, N*out, H, W) folded."""
        n = a.shape[0]
        folded = n > 1 and x.shape[0] == 1 and x.shape[1] == n * self.weight.shape[2]  # (1, N*in, H, W)
        if not folded and x.shape[0] != n:
            raise DASRError(f"{x.shape[0]} images with expert mixes for {n}")
        if self._impl == "folded":
            if not folded:  # a plain batch (for N = 1 the two are one): folded for this layer
                return unfold_batch(self._forward_folded(fold_batch(x), a), n)
            return self._forward_folded(x, a)
        if self._impl == "dense":
            if folded:  # the layer after a "folded" one: the samples apart, channels_last, in one copy; the
                # result is a plain batch (ExpertMSRResNet's last layer takes it so)
                x = unfold_batch(x, n).contiguous(memory_format=torch.channels_last)
            return self._forward_dense(x, a)
        if folded:
            raise DASRError(f"a folded batch ({x.shape[1]} channels for {n} samples) needs expert impl folded or "
                            f"dense, not {self._impl}")
        if self._impl == "stacked":
            return self._forward_stacked(x, a)
        if self._impl == "bmm":
            return self._forward_bmm(x, a)
        return self._forward_grouped(x, a)

    def _forward_grouped(self, x: Tensor, a: Tensor) -> Tensor:
        n, c, h, w_ = x.shape
        weight, bias = self.fused(a)
        out = F.conv2d(x.reshape(1, n * c, h, w_), weight.reshape(-1, c, 3, 3), bias.reshape(-1),
                       padding=1, groups=n)
        return out.reshape(n, -1, h, w_)

    def _forward_folded(self, x: Tensor, a: Tensor) -> Tensor:
        n = a.shape[0]
        # The per-sample kernels mixed straight into channels_last order, (N, out, 3, 3, in) in memory, which
        # the grouped convolution reads as they are: converting the (N, out, in, 3, 3) mix instead costs a
        # strided copy per layer, forward and backward
        weight = torch.einsum("nk,kohwi->nohwi", a, self.weight.permute(0, 1, 3, 4, 2))
        weight = weight.permute(0, 1, 4, 2, 3).flatten(0, 1)  # (N*out, in, 3, 3), a channels_last view
        return F.conv2d(x, weight, (a @ self.bias).flatten(), padding=1, groups=n)

    def _forward_dense(self, x: Tensor, a: Tensor) -> Tensor:
        k, out_ch = self.weight.shape[:2]
        # (K, out, in, 3, 3) -> (K*out, in, 3, 3) is a view: expert k owns output channels k*out .. k*out+out-1.
        weight, bias = self.weight.flatten(0, 1), self.bias.flatten()
        if extra := -(k * out_ch) % dense_alignment(x):  # zero-weight channels, sliced off: the same sums
            weight = torch.cat([weight, weight.new_zeros(extra, *weight.shape[1:])])
            bias = torch.cat([bias, bias.new_zeros(extra)])
        y = F.conv2d(x, weight, bias, padding=1)[:, :k * out_ch]  # (N, K*out, H, W)
        y = y.unflatten(1, (k, out_ch))  # (N, K, out, H, W), a view in either memory format
        a = a.to(y.dtype)[:, :, None, None, None]  # (N, K, 1, 1, 1)
        # K element-wise steps rather than (y * a).sum(1): a reduction's output is NCHW-contiguous, these
        # keep y's memory format (channels_last stays channels_last for the next conv).
        out = y[:, 0] * a[:, 0]
        for i in range(1, k):
            out = torch.addcmul(out, y[:, i], a[:, i])
        return out

    def _forward_stacked(self, x: Tensor, a: Tensor) -> Tensor:
        a = a.to(x.dtype)
        if is_channels_last(x):
            # (N, H, W, K, in) in memory: the stack is channels_last with channel k*in + i, as the weight's
            xs = (x.permute(0, 2, 3, 1).unsqueeze(3) * a[:, None, None, :, None]).flatten(3).permute(0, 3, 1, 2)
        else:
            xs = (x.unsqueeze(1) * a[:, :, None, None, None]).flatten(1, 2)  # (N, K*in, H, W), channel k*in + i
        weight = self.weight.transpose(0, 1).flatten(1, 2)  # (out, K*in, 3, 3): input channel k*in + i is expert k's i
        out = F.conv2d(xs, weight, padding=1)
        return out + (a @ self.bias).to(out.dtype)[:, :, None, None]

    def _forward_bmm(self, x: Tensor, a: Tensor) -> Tensor:
        n, c, h, w_ = x.shape
        weight, bias = self.fused(a)  # (N, out, in, 3, 3), (N, out)
        cols = F.unfold(x, 3, padding=1)  # (N, in*9, H*W), rows ordered (in, ky, kx) like the kernel
        out = torch.baddbmm(bias.unsqueeze(2).to(cols.dtype), weight.flatten(2).to(cols.dtype), cols)
        return out.reshape(n, -1, h, w_)


def dense_alignment(x: Tensor) -> int:
    """The multiple of output channels the "dense" expert convolution computes for input x: 8 on CUDA, where
    cuDNN's bf16 tensor-core kernels want channels in multiples of 8 (the last layer's K*3 = 15 ran as a
    slow kernel), else 1 (no padding)."""
    return 8 if x.is_cuda else 1


def fold_batch(x: Tensor) -> Tensor:
    """(N, C, H, W) -> (1, N*C, H, W), channel n*C + c, in channels_last memory: (H, W, N, C) in memory order.
    A copy, unless x is already laid out that way (an :func:`unfold_batch` view)."""
    n, c, h, w = x.shape
    return x.permute(2, 3, 0, 1).contiguous().view(1, h, w, n * c).permute(0, 3, 1, 2)


def unfold_batch(x: Tensor, n: int) -> Tensor:
    """(1, N*C, H, W) -> (N, C, H, W): :func:`fold_batch` undone, as a view (no copy) of x's memory.
    A channels_last gradient comes back in the fold's layout, what the convolution that made x computes
    in, in one copy (an `x[0]` view turned it into an NCHW one, which that convolution's backward then
    converted again); an NCHW gradient comes back as an NCHW view, which the convolution converts once."""
    _, nc, h, w = x.shape
    return x.permute(2, 3, 0, 1).reshape(h, w, n, nc // n).permute(2, 3, 0, 1)


def pixel_shuffle(x: Tensor, r: int) -> Tensor:
    """F.pixel_shuffle(x, r), the same values, laid out as x: a channels_last x gives a channels_last result.
    On CUDA PyTorch's returns NCHW whatever x is (its permute-and-copy fallback), so in a channels_last
    network every layer after it converted again: the next convolution's input, the activation's gradient
    beside its NCHW output, the gradient back. Here the copy goes straight into channels_last order, and
    its gradient comes back channels_last. Never a view of x, as F.pixel_shuffle."""
    if not is_channels_last(x) or r == 1 or x.shape[1] % (r * r):  # (PyTorch's: its copy, or its error)
        return F.pixel_shuffle(x, r)
    n, c, h, w = x.shape
    # channel c' * r * r + i * r + j goes to output channel c', row h * r + i, column w * r + j
    y = x.permute(0, 2, 3, 1).reshape(n, h, w, c // (r * r), r, r).permute(0, 1, 4, 2, 5, 3)  # (N, H, r, W, r, C')
    return y.reshape(n, h * r, w * r, c // (r * r)).permute(0, 3, 1, 2)


def flat_view(x: Tensor) -> Tensor:
    """x's elements as a 1-D tensor in the order they lie in memory: a view of a dense NCHW or channels_last
    (N, C, H, W) x (a fold included), a copy of any other x. :func:`shaped_like` turns it back."""
    return (x.permute(0, 2, 3, 1) if is_channels_last(x) else x).reshape(-1)


def shaped_like(flat: Tensor, like: Tensor) -> Tensor:
    """:func:`flat_view` undone: `flat` (1-D, like.numel() values in like's memory order) as a tensor of
    like's shape, channels_last if like is; a view, so gradients pass as views both ways."""
    if is_channels_last(like):
        n, c, h, w = like.shape
        return flat.view(n, h, w, c).permute(0, 3, 1, 2)
    return flat.view(like.shape)


def _trunk(net: nn.Module, feat: Tensor, *a: Tensor) -> Tensor:
    """A generator (expert, with its mix `a`, or plain) from its first convolution's output `feat` to its
    last convolution's output, the element-wise operations as `net.pointwise` says."""
    flat = net.pointwise == "flat"

    def act(t: Tensor) -> Tensor:
        return shaped_like(F.leaky_relu(flat_view(t), 0.1), t) if flat else F.leaky_relu(t, 0.1)

    if flat:  # the residual stream flat from block to block: each sum, and its gradient's accumulation, 1-D
        x = F.leaky_relu(flat_view(feat), 0.1)
        for block in net.body:
            x = block(x, *a, like=feat)
        x = shaped_like(x, feat)
    else:
        x = act(feat)
        for block in net.body:
            x = block(x, *a)
    x = act(pixel_shuffle(net.upconv1(x, *a), 2))
    x = act(pixel_shuffle(net.upconv2(x, *a), 2))
    return net.conv_last(act(net.conv_hr(x, *a)), *a)


def _residual(x: Tensor, conv1, conv2, like: Tensor | None) -> Tensor:
    """A residual block, x + conv2(relu(conv1(x))). With `like` (a feature map of the block's shape and
    layout), x and the result are :func:`flat_view` s of such maps and the ReLU and the sum run on those
    1-D views."""
    if like is None:
        return x + conv2(F.relu(conv1(x)))
    h = F.relu(flat_view(conv1(shaped_like(x, like))))
    return x + flat_view(conv2(shaped_like(h, like)))


def _check_pointwise(name: str) -> str:
    if name not in POINTWISE:
        raise DASRError(f"pointwise must be one of {', '.join(POINTWISE)}, got {name!r}")
    return name


def is_channels_last(t: Tensor) -> bool:
    """t is laid out channels_last (NHWC) and not also plain contiguous (as a 1x1 image is both)."""
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def set_expert_impl(module: nn.Module, impl: ExpertImpl) -> nn.Module:
    """Set how every :class:`ExpertConv2d` inside `module` (a DASR, its generator, an EMA copy) computes
    itself: "grouped", "dense", "stacked", "bmm" or "folded" (see ExpertConv2d). Exact either way; parameters,
    state-dict keys and checkpoints do not change. Returns `module`."""
    if impl not in EXPERT_IMPLS:
        raise DASRError(f"expert impl must be one of {', '.join(EXPERT_IMPLS)}, got {impl!r}")
    for m in module.modules():
        if isinstance(m, ExpertConv2d):
            m.impl = impl
    return module


class ResidualBlock(nn.Module):
    def __init__(self, num_feat: int, num_experts: int):
        super().__init__()
        self.conv1 = ExpertConv2d(num_feat, num_feat, num_experts=num_experts, negative_slope=0.0)
        self.conv2 = ExpertConv2d(num_feat, num_feat, num_experts=num_experts, negative_slope=0.0)

    def forward(self, x: Tensor, a: Tensor, like: Tensor | None = None) -> Tensor:
        """x + conv2(relu(conv1(x))), as :func:`_residual` (with `like`: on flat views)."""
        return _residual(x, lambda t: self.conv1(t, a), lambda t: self.conv2(t, a), like)


class ExpertMSRResNet(nn.Module):
    """G: MSRResNet (x4) whose every convolution mixes K experts with the same coefficients a."""

    def __init__(self, *, num_experts: int = 5, num_feat: int = 64, num_block: int = 16, scale: int = 4):
        super().__init__()
        if scale != 4:
            raise DASRError("only x4 is implemented (two PixelShuffle(2) stages)")
        k = num_experts
        self.conv_first = ExpertConv2d(3, num_feat, num_experts=k)
        self.body = nn.ModuleList(ResidualBlock(num_feat, k) for _ in range(num_block))
        self.upconv1 = ExpertConv2d(num_feat, num_feat * 4, num_experts=k)
        self.upconv2 = ExpertConv2d(num_feat, num_feat * 4, num_experts=k)
        self.conv_hr = ExpertConv2d(num_feat, num_feat, num_experts=k)
        self.conv_last = ExpertConv2d(num_feat, 3, num_experts=k)
        self.scale = scale
        self.pointwise = "4d"

    @property
    def pointwise(self) -> str:
        """How the element-wise operations run: "4d" (default) or "flat" (see POINTWISE). Exact either way;
        not saved in state dicts."""
        return self._pointwise

    @pointwise.setter
    def pointwise(self, name: str) -> None:
        self._pointwise = _check_pointwise(name)

    def forward(self, lr: Tensor, a: Tensor) -> Tensor:
        if lr.shape[0] != a.shape[0]:
            raise DASRError(f"{lr.shape[0]} images with expert mixes for {a.shape[0]}")
        folded = self.conv_first.impl == "folded"  # the batch folded into the channels from input to output
        x = _trunk(self, self.conv_first(fold_batch(lr) if folded else lr, a), a)
        base = F.interpolate(lr, scale_factor=self.scale, mode="bilinear", align_corners=False)
        if folded:  # pixel_shuffle kept the fold (channel n*4C + 4c + i is sample n's 4c + i), unless a "dense"
            # last layer unfolded it; base first: the sum takes the input's layout, not the fold's (H, W, N, C)
            return base + (unfold_batch(x, lr.shape[0]) if self.conv_last.impl == "folded" else x)
        return x + base

    @torch.no_grad()
    def fuse(self, a: Tensor, *, into: MSRResNet | None = None) -> MSRResNet:
        """The plain MSRResNet that this generator is for ONE image's mix a (1, K) or (K,): every expert
        conv mixed once into an ordinary nn.Conv2d (same device and dtype, eval mode, no gradients).
        `self.fuse(a)(lr)` equals `self(lr, a)` up to float rounding, for any number of images sharing a.
        `into`: an MSRResNet of the same size to overwrite instead of building one (building is most of a
        fuse's time); every weight is written, converted to its dtype and memory format; it is returned."""
        k = self.conv_first.weight.shape[0]
        if a.numel() != k or a.dim() > 2:
            raise DASRError(f"fuse takes one image's mix, (1, {k}) or ({k},); got {tuple(a.shape)}")
        ref = self.conv_first.weight
        if into is None:
            plain = MSRResNet(num_feat=ref.shape[1], num_block=len(self.body), scale=self.scale,
                              device=ref.device, dtype=ref.dtype)
        elif (len(into.body) != len(self.body) or into.conv_first.weight.shape != ref.shape[1:]
              or into.scale != self.scale):
            raise DASRError(f"fuse into: a network of {len(into.body)} blocks x "
                            f"{into.conv_first.weight.shape[0]} features for one of {len(self.body)} x {ref.shape[1]}")
        else:
            plain = into
        # All layers at once: every expert's weights and biases side by side, one row of a (K, P) bank per
        # expert, the mix sum_k a_k * row_k in K element-wise kernels, then one multi-tensor copy into the
        # network's weights (their dtype and memory format). Per layer it took about 150 small kernels and
        # 5-6 ms on an H200, then with a multi-tensor sum per expert over views of the layers 1-1.8 ms, most
        # of it the host's: module look-ups by name, views, reading a's K numbers back (a wait for the
        # device). Here a stays on the device, so the host queues the fuse and the network behind the
        # predictor without waiting (and a CUDA graph can record it). Nothing is kept between calls: the
        # layers are read from the modules as they are now. Summed in float32 at least (a bf16 model's
        # weights too, as the einsum accumulated); a rounded to the model's dtype first, as the einsum used it.
        acc = torch.promote_types(ref.dtype, torch.float32)
        src = [m for layer in _conv_layers(self) for m in (layer.weight, layer.bias)]
        dst = [m for layer in _conv_layers(plain) for m in (layer.weight, layer.bias)]
        bank = torch.cat([t.detach().reshape(k, -1) for t in src], dim=1)
        bank = bank if bank.dtype == acc else bank.to(acc)
        coef = a.reshape(k).to(ref.dtype).to(device=bank.device, dtype=acc)
        mixed = bank[0] * coef[0]
        for j in range(1, k):
            mixed.addcmul_(bank[j], coef[j])
        pieces = [v.view(t.shape) for v, t in zip(mixed.split_with_sizes([t.numel() for t in dst]), dst)]
        if len({t.dtype for t in dst}) == 1:
            torch._foreach_copy_(dst, pieces)
        else:  # a network of mixed dtypes: CUDA's multi-tensor copy took the first one's (torch 2.4-2.10)
            for t, v in zip(dst, pieces):
                t.copy_(v)
        for t in dst:
            t.requires_grad_(False)
        if plain.training:
            plain.eval()
        return plain


def _conv_layers(net: nn.Module) -> list[nn.Module]:
    """The convolutions of a generator, expert or plain, in one fixed order (read from its modules as they
    are now): conv_first, each block's conv1 and conv2, upconv1, upconv2, conv_hr, conv_last."""
    return [net.conv_first, *(c for block in net.body for c in (block.conv1, block.conv2)), net.upconv1, net.upconv2,
            net.conv_hr, net.conv_last]


class PlainResidualBlock(nn.Module):
    def __init__(self, conv1: nn.Conv2d, conv2: nn.Conv2d):
        super().__init__()
        self.conv1, self.conv2 = conv1, conv2

    def forward(self, x: Tensor, like: Tensor | None = None) -> Tensor:
        """As :meth:`ResidualBlock.forward`, without a mix."""
        return _residual(x, self.conv1, self.conv2, like)


class MSRResNet(nn.Module):
    """The x4 MSRResNet of G with ordinary convolutions, as :meth:`ExpertMSRResNet.fuse` builds it for one
    expert mix. Same module names and the same forward as ExpertMSRResNet, without a. Its weights are left
    uninitialised (fuse writes every one): no random init to pay for, and torch's RNG is not drawn from."""

    def __init__(self, *, num_feat: int = 64, num_block: int = 16, scale: int = 4, device=None, dtype=None):
        super().__init__()
        if scale != 4:
            raise DASRError("only x4 is implemented (two PixelShuffle(2) stages)")
        # skip_init builds on the meta device, then moves to `device`: None would leave it there
        where = torch.empty(0).device if device is None else device  # None: torch's default device

        def conv(i: int, o: int) -> nn.Conv2d:
            return torch.nn.utils.skip_init(nn.Conv2d, i, o, 3, padding=1, device=where, dtype=dtype)

        self.conv_first = conv(3, num_feat)
        self.body = nn.ModuleList(PlainResidualBlock(conv(num_feat, num_feat), conv(num_feat, num_feat))
                                  for _ in range(num_block))
        self.upconv1 = conv(num_feat, num_feat * 4)
        self.upconv2 = conv(num_feat, num_feat * 4)
        self.conv_hr = conv(num_feat, num_feat)
        self.conv_last = conv(num_feat, 3)
        self.scale = scale
        self.pointwise = "4d"

    pointwise = ExpertMSRResNet.pointwise

    def forward(self, lr: Tensor) -> Tensor:
        """lr (B, 3, h, w) -> (B, 3, 4h, 4w). The convolutions run in the weights' dtype; the bilinear base
        and the final sum in lr's, so a bf16 net fed float32 keeps full precision around the base.
        `pointwise` as :attr:`ExpertMSRResNet.pointwise`."""
        x = _trunk(self, self.conv_first(lr.to(self.conv_first.weight.dtype)))
        base = F.interpolate(lr, scale_factor=self.scale, mode="bilinear", align_corners=False)
        return x.to(base.dtype) + base


class DASR(nn.Module):
    """Predictor + experts. forward(lr) -> sr; predict(lr) -> (v_hat, a); mix(v) -> a; sr(lr, a) -> sr.

    lr: (B, 3, h, w) float in [0, 1]; sr: (B, 3, 4h, 4w).
    """

    def __init__(self, config: DASRConfig | None = None):
        super().__init__()
        self.config = config or DASRConfig()
        c = self.config
        self.predictor = DegradationPredictor(num_experts=c.num_experts, num_feat=c.predictor_feat,
                                              hidden=c.mapping_hidden, mixing=c.mixing,
                                              temperature=c.mixing_temperature, mapping_gain=c.mapping_gain,
                                              input_mode=c.predictor_input)
        self.generator = ExpertMSRResNet(num_experts=c.num_experts, num_feat=c.num_feat, num_block=c.num_block,
                                         scale=c.scale)

    def predict(self, lr: Tensor, *, tile: int | None = None) -> tuple[Tensor, Tensor]:
        """(v_hat, a) for lr; `tile` bounds the predictor's memory without changing the result."""
        return self.predictor(lr, tile=tile)

    def mix(self, v: Tensor) -> Tensor:
        return self.predictor.mix(v)

    def sr(self, lr: Tensor, a: Tensor) -> Tensor:
        return self.generator(lr, a)

    def forward(self, lr: Tensor, return_v: bool = False, v_mix: Tensor | None = None
                ) -> Tensor | tuple[Tensor, Tensor]:
        """`v_mix` (B, 33), when given, sets the expert mix instead of v_hat (teacher forcing in training);
        v_hat is still predicted and returned with `return_v`."""
        v_hat, a = self.predict(lr)
        if v_mix is not None:
            a = self.mix(v_mix)
        sr = self.sr(lr, a)
        return (sr, v_hat) if return_v else sr
