"""The DASR network (shared/spec/model.md): degradation predictor P and the K-expert MSRResNet G.

Module and parameter names follow the released checkpoints (spec section 3), so a released state
dict loads with `load_state_dict(strict=True)`; :func:`load_release_weights` does that from files.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

VECTOR_LENGTH = 33  # layout "dasr33-v1" (degrade.VECTOR_LENGTH; not imported, to keep this light)
MIXINGS = ("linear", "softmax")


@dataclass(frozen=True)
class DASRConfig:
    """Hyper-parameters, stored in every checkpoint (never guessed from tensor shapes)."""

    num_experts: int = 5
    num_feat: int = 64
    num_block: int = 16
    scale: int = 4
    predictor_feat: int = 64
    mapping_hidden: int = 15
    # How v becomes the expert mix a. "linear": a = MappingNet(v) as released (released weights need it);
    # "softmax": a = softmax(MappingNet(v) / mixing_temperature), a convex mix (docs/training.md).
    mixing: str = "linear"
    mixing_temperature: float = 1.0
    # Scale of the mapping net's last layer at init: 0.1 starts a near 1/K for every v; 1 lets a vary with v.
    mapping_gain: float = 0.1

    def __post_init__(self) -> None:
        if self.mixing not in MIXINGS:
            raise ValueError(f"mixing must be one of {', '.join(MIXINGS)}, got {self.mixing!r}")
        if not self.mixing_temperature > 0:
            raise ValueError(f"mixing_temperature must be > 0, got {self.mixing_temperature}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class DegradationPredictor(nn.Module):
    """P: six 5x5 convs with LeakyReLU(0.2), global average pool -> v_hat (B, 33); mapping net -> a (B, K).

    The mapping net is Linear(33, 15) -> Linear(15, K) with nothing in between, as released; with
    `mixing="softmax"` its output goes through softmax(. / temperature). The parameters (and so the
    state-dict keys) are the same either way.
    """

    def __init__(self, *, num_experts: int = 5, num_feat: int = 64, hidden: int = 15, mixing: str = "linear",
                 temperature: float = 1.0, mapping_gain: float = 0.1):
        super().__init__()
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

    def forward(self, lr: Tensor) -> tuple[Tensor, Tensor]:
        v_hat = self.ConvNet(lr).mean(dim=(2, 3))
        return v_hat, self.mix(v_hat)


class ExpertConv2d(nn.Module):
    """3x3 convolution whose kernel is a per-sample mix of K experts: W_n = sum_k a[n, k] W_k (same for b).

    weight (K, out, in, 3, 3), bias (K, out). The mix is fused once per sample and applied as one
    grouped convolution over the batch.
    """

    def __init__(self, in_ch: int, out_ch: int, *, num_experts: int, init_scale: float = 0.1,
                 negative_slope: float = 0.1):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, out_ch, in_ch, 3, 3))
        self.bias = nn.Parameter(torch.zeros(num_experts, out_ch))
        # Kaiming per expert, experts drawn independently (symmetry breaking), times 0.1 as MSRResNet does
        # for every layer: the untrained network then outputs its bilinear base almost exactly. The
        # initial mix is about uniform (1/K each), whose variance is 1/K of one expert's: sqrt(K) compensates.
        for k in range(num_experts):
            nn.init.kaiming_normal_(self.weight[k], a=negative_slope, mode="fan_in", nonlinearity="leaky_relu")
        with torch.no_grad():
            self.weight.mul_(init_scale * math.sqrt(num_experts))

    def fused(self, a: Tensor) -> tuple[Tensor, Tensor]:
        """Per-sample kernels (N, out, in, 3, 3) and biases (N, out) for mixing coefficients a (N, K)."""
        w = torch.einsum("nk,koihw->noihw", a, self.weight)
        b = a @ self.bias
        return w, b

    def forward(self, x: Tensor, a: Tensor) -> Tensor:
        n, c, h, w_ = x.shape
        weight, bias = self.fused(a)
        out = F.conv2d(x.reshape(1, n * c, h, w_), weight.reshape(-1, c, 3, 3), bias.reshape(-1),
                       padding=1, groups=n)
        return out.reshape(n, -1, h, w_)


class ResidualBlock(nn.Module):
    def __init__(self, num_feat: int, num_experts: int):
        super().__init__()
        self.conv1 = ExpertConv2d(num_feat, num_feat, num_experts=num_experts, negative_slope=0.0)
        self.conv2 = ExpertConv2d(num_feat, num_feat, num_experts=num_experts, negative_slope=0.0)

    def forward(self, x: Tensor, a: Tensor) -> Tensor:
        return x + self.conv2(F.relu(self.conv1(x, a)), a)


class ExpertMSRResNet(nn.Module):
    """G: MSRResNet (x4) whose every convolution mixes K experts with the same coefficients a."""

    def __init__(self, *, num_experts: int = 5, num_feat: int = 64, num_block: int = 16, scale: int = 4):
        super().__init__()
        if scale != 4:
            raise ValueError("only x4 is implemented (two PixelShuffle(2) stages)")
        k = num_experts
        self.conv_first = ExpertConv2d(3, num_feat, num_experts=k)
        self.body = nn.ModuleList(ResidualBlock(num_feat, k) for _ in range(num_block))
        self.upconv1 = ExpertConv2d(num_feat, num_feat * 4, num_experts=k)
        self.upconv2 = ExpertConv2d(num_feat, num_feat * 4, num_experts=k)
        self.conv_hr = ExpertConv2d(num_feat, num_feat, num_experts=k)
        self.conv_last = ExpertConv2d(num_feat, 3, num_experts=k)
        self.scale = scale

    def forward(self, lr: Tensor, a: Tensor) -> Tensor:
        act = nn.functional.leaky_relu
        feat = act(self.conv_first(lr, a), 0.1)
        x = feat
        for block in self.body:
            x = block(x, a)
        x = act(F.pixel_shuffle(self.upconv1(x, a), 2), 0.1)
        x = act(F.pixel_shuffle(self.upconv2(x, a), 2), 0.1)
        x = self.conv_last(act(self.conv_hr(x, a), 0.1), a)
        base = F.interpolate(lr, scale_factor=self.scale, mode="bilinear", align_corners=False)
        return x + base


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
                                              temperature=c.mixing_temperature, mapping_gain=c.mapping_gain)
        self.generator = ExpertMSRResNet(num_experts=c.num_experts, num_feat=c.num_feat, num_block=c.num_block,
                                         scale=c.scale)

    def predict(self, lr: Tensor) -> tuple[Tensor, Tensor]:
        return self.predictor(lr)

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


def _state_dict_from(source: dict[str, Tensor] | str | Path, prefer_ema: bool) -> dict[str, Tensor]:
    if isinstance(source, (str, Path)):
        data = torch.load(source, map_location="cpu", weights_only=True)
    else:
        data = source
    if not isinstance(data, dict):
        raise ValueError("a release checkpoint must hold a dict")
    if prefer_ema and "params_ema" in data:
        return data["params_ema"]
    if "params" in data:
        return data["params"]
    return data  # already a bare state dict


def load_release_weights(g: dict[str, Tensor] | str | Path, p: dict[str, Tensor] | str | Path, *,
                         prefer_ema: bool = True) -> DASR:
    """A DASR holding the release's weights: G and P as state dicts or paths to the release `.pth` files.

    Files are read with `torch.load(weights_only=True)`; the G file's `params_ema` is used when present
    (`prefer_ema`), else `params`. Keys and shapes must match the release layout exactly.
    """
    g_state = _state_dict_from(g, prefer_ema)
    p_state = _state_dict_from(p, prefer_ema=False)
    num_experts = g_state["conv_first.weight"].shape[0]
    model = DASR(DASRConfig(num_experts=num_experts, mixing="linear"))  # the release's mapping: no softmax
    model.generator.load_state_dict(g_state, strict=True)
    model.predictor.load_state_dict(p_state, strict=True)
    return model
