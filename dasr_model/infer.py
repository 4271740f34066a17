"""Inference: load a trained or released model, predict v once per image, steer it, super-resolve in tiles.

Modulation (model.md section 6): fields of the predicted v are overridden in physical units through
the vector layout (`degrade.VECTOR_FIELDS`) before the mapping net, or the expert mix a is set directly.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from dasr_model.model import DASR, DASRConfig, ExpertMSRResNet, MSRResNet, load_release_weights


MODEL_FILE = "model.pt"
MODEL_FORMAT = "dasr-model"


def export_model(model: DASR, ema_generator: torch.nn.Module | None, path: str | Path, *,
                 dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write the model alone (predictor + generator, the EMA one when given) in `dtype`: a small file to
    share or to give `dasr-sr` (5 experts, bf16: about 16 MB). Its config travels inside."""
    state = {f"predictor.{k}": t for k, t in model.predictor.state_dict().items()}
    gen = ema_generator if ema_generator is not None else model.generator
    state |= {f"generator.{k}": t for k, t in gen.state_dict().items()}
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    torch.save({"format": MODEL_FORMAT, "version": 1, "config": model.config.to_dict(),
                "model": {k: t.detach().to("cpu", dtype) for k, t in state.items()}}, tmp)
    tmp.replace(path)
    return path


def load_checkpoint_model(path: str | Path, *, ema: bool = True) -> DASR:
    """A DASR from a `dasr-train` checkpoint (config stored inside; the EMA generator by default) or an
    exported model file (:func:`export_model`), in float32."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such checkpoint") from None
    except Exception as exc:  # noqa: BLE001 - torch raises several types for foreign files
        raise ValueError(f"{path}: not a readable checkpoint ({type(exc).__name__})") from None
    if isinstance(ckpt, dict) and ckpt.get("format") == MODEL_FORMAT:
        model = DASR(DASRConfig(**ckpt["config"]))
        model.load_state_dict({k: t.float() for k, t in ckpt["model"].items()})
        return model.eval()
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise ValueError(f"{path}: not a dasr-train checkpoint")
    model = DASR(DASRConfig(**ckpt["config"]["model"]))
    model.load_state_dict(ckpt["model"])
    if ema and "ema_generator" in ckpt:
        model.generator.load_state_dict(ckpt["ema_generator"])
    return model.eval()


def load_model(checkpoint: str | Path | None = None, release: tuple[str | Path, str | Path] | None = None) -> DASR:
    if (checkpoint is None) == (release is None):
        raise ValueError("give a checkpoint or the release weights (G and P), not both")
    if checkpoint is not None:
        return load_checkpoint_model(checkpoint)
    assert release is not None
    return load_release_weights(*release).eval()


def parse_settings(items: list[str]) -> dict[str, str]:
    """['noise1.strength=5', ...] -> {'noise1.strength': '5'}; field names are checked by `edit_vector`."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise ValueError(f"--set {item!r}: expected NAME=VALUE, e.g. noise1.strength=5")
        out[name.strip()] = value.strip()
    return out


def edit_vector(v: Tensor, settings: dict[str, str]) -> Tensor:
    """Override named fields of v (B, 33) in physical units, leaving every other entry untouched.

    Scalars take a number in the field's units (noise strength in the units of the step's noise type:
    Gaussian sigma / 255 or Poisson scale); flags take 0/1; one-hot fields take a choice name.
    """
    from degrade.vector import FIELDS_BY_NAME

    v = v.clone()
    for name, text in settings.items():
        f = FIELDS_BY_NAME.get(name)
        if f is None:
            raise ValueError(f"unknown field {name!r}; names are listed by `degrade inspect --vector` and in docs")
        if f.kind == "onehot":
            if text not in f.choices:
                raise ValueError(f"{name}: {text!r} is not one of {', '.join(f.choices)}")
            v[:, f.slice] = 0
            v[:, f.index + f.choices.index(text)] = 1
            continue
        try:
            x = float(text)
        except ValueError:
            raise ValueError(f"{name}: {text!r} is not a number") from None
        if f.kind == "flag":
            v[:, f.index] = 1.0 if x >= 0.5 else 0.0
            continue
        step_type = None
        if f.ranges:  # noise strength: units follow the noise type currently in v
            group = FIELDS_BY_NAME[f"{f.step}.type"]
            choice = v[:, group.slice].argmax(dim=1)
            step_type = [group.choices[int(c)] for c in choice]
        for row in range(v.shape[0]):
            st = step_type[row] if step_type else None
            lo, hi = f.range_for(st)
            if not lo <= x <= hi:
                raise ValueError(f"{name}: {x:g} is outside [{lo:g}, {hi:g}]")
            v[row, f.index] = f.normalise(x, st)
    return v


def to_tensor(img: np.ndarray) -> Tensor:
    """(H, W, 3) float32 in [0, 1] -> (1, 3, H, W)."""
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))[None]


def to_image(t: Tensor) -> np.ndarray:
    return t[0].clamp(0, 1).permute(1, 2, 0).float().cpu().numpy()


@torch.no_grad()
def predict(model: DASR, lr: Tensor, *, max_side: int = 1024) -> tuple[Tensor, Tensor]:
    """v_hat and a from the whole image (area-downscaled first if a side exceeds `max_side`)."""
    h, w = lr.shape[-2:]
    if max(h, w) > max_side:
        f = max_side / max(h, w)
        lr = F.interpolate(lr, size=(max(1, round(h * f)), max(1, round(w * f))), mode="area")
    return model.predict(lr)


def fuse_experts(model: DASR | ExpertMSRResNet, a: Tensor, *, dtype: torch.dtype | None = None,
                 channels_last: bool = False) -> MSRResNet:
    """The generator for ONE image's expert mix a (1, K): a plain MSRResNet whose ordinary convolutions
    hold the mixed kernels (`ExpertMSRResNet.fuse`), so a forward pass does no per-layer mixing.
    `fused(lr)` equals `model.sr(lr, a)` (tested to 1e-5 in float32). The mix is done in the model's
    float precision, then the net is cast to `dtype` (e.g. torch.bfloat16) and, with `channels_last`,
    to that memory format (feed it channels_last input too)."""
    gen = model.generator if isinstance(model, DASR) else model
    fused = gen.fuse(a)
    if dtype is not None:
        fused = fused.to(dtype)
    if channels_last:
        fused = fused.to(memory_format=torch.channels_last)
    return fused


@torch.no_grad()
def super_resolve(model: DASR, lr: Tensor, a: Tensor, *, tile: int | None = None, overlap: int = 32,
                  dtype: torch.dtype | None = None, channels_last: bool = False) -> Tensor:
    """G with expert mix `a` (B, K) over the LR images (B, 3, h, w), whole or in `tile`-sized LR tiles.

    The experts are fused once per image (:func:`fuse_experts`) and every tile runs the plain network.
    Tiles overlap by `overlap` LR pixels on each side; each output tile keeps only its own region, so
    with an overlap at least the network's receptive-field radius the result equals the whole-image pass.
    `dtype` / `channels_last` run the fused network in that precision / memory format (on a GPU:
    torch.bfloat16 and True); the result is returned in lr's dtype and standard layout.
    """
    if a.shape[0] != lr.shape[0]:
        raise ValueError(f"one expert mix per image: lr has {lr.shape[0]} image(s), a has {a.shape[0]} row(s)")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    outs = []
    for i in range(lr.shape[0]):
        net = fuse_experts(model, a[i : i + 1], dtype=dtype, channels_last=channels_last)

        def run(x: Tensor, net: MSRResNet = net) -> Tensor:  # x float32: the net casts for its convolutions
            return net(x.contiguous(memory_format=fmt)).to(x.dtype)

        outs.append(_tiled(run, lr[i : i + 1], model.config.scale, tile, overlap))
    return torch.cat(outs).contiguous()


def _tiled(run: Callable[[Tensor], Tensor], lr: Tensor, s: int, tile: int | None, overlap: int) -> Tensor:
    """`run` (LR -> x`s` SR) over lr (1, 3, h, w) whole, or tile by tile with `overlap` LR pixels of context."""
    if tile is None or (lr.shape[-2] <= tile and lr.shape[-1] <= tile):
        return run(lr)
    h, w = lr.shape[-2:]
    out = lr.new_zeros(lr.shape[0], 3, h * s, w * s)
    for y in range(0, h, tile):
        for x in range(0, w, tile):
            y0, x0 = max(0, y - overlap), max(0, x - overlap)
            y1, x1 = min(h, y + tile + overlap), min(w, x + tile + overlap)
            part = run(lr[..., y0:y1, x0:x1])
            ty, tx = min(tile, h - y), min(tile, w - x)
            out[..., y * s : (y + ty) * s, x * s : (x + tx) * s] = part[
                ..., (y - y0) * s : (y - y0 + ty) * s, (x - x0) * s : (x - x0 + tx) * s]
    return out
