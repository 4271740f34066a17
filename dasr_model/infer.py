"""Inference: load a trained or released model, predict v once per image, steer it, super-resolve in tiles.

Modulation: fields of the predicted v are overridden in physical units through
the vector layout (`degrade.VECTOR_FIELDS`) before the mapping net, or the expert mix a is set directly.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import Tensor

from dasr_model.checkpoints import is_torch_file, latest_intact, load_checkpoint
from dasr_model.errors import DASRError
from dasr_model.model import DASR, DASRConfig, ExpertMSRResNet, MSRResNet
from dasr_model.modelfile import MODEL_FILE, is_model_file, read_model_file, save_model_file
from dasr_model.release import load_release_weights
from degrade.io import real_path, to_uint8


@dataclass(frozen=True)
class LoadedModel:
    """A model and where it came from, to say what was loaded."""

    model: DASR
    path: str
    kind: str  # "model file", "checkpoint" or "release weights"
    step: int | None = None

    def describe(self) -> str:
        c = self.model.config
        step = f"step {self.step}, " if self.step is not None else ""
        return (f"loaded {self.path} ({self.kind}): {step}{c.num_experts} experts x {c.num_block} blocks x "
                f"{c.num_feat} features, mixing {c.mixing}")


def _checkpoint_kind(ckpt: dict[str, Any]) -> str:
    """How `describe` names a checkpoint: one without an EMA generator (a run with the EMA off) gives its
    training generator, and says so."""
    return "checkpoint" if "ema_generator" in ckpt else "checkpoint without an EMA generator: its training weights"


def model_from_checkpoint(ckpt: dict[str, Any], path: str | Path, *, ema: bool = True) -> DASR:
    """The DASR of a checkpoint's contents (:func:`checkpoints.load_checkpoint`), EMA generator by default."""
    try:
        config = DASRConfig.from_dict(ckpt["config"].get("model"))
    except DASRError as exc:
        raise DASRError(f"{path}: {exc}") from None
    with torch.device("meta"):  # shapes without memory: a small file's config may ask for 100 M parameters
        expected = {k: tuple(t.shape) for k, t in DASR(config).state_dict().items()}
    weights = ckpt["model"] if isinstance(ckpt["model"], dict) else {}
    got = {k: tuple(t.shape) for k, t in weights.items() if isinstance(t, torch.Tensor)}
    if got != expected:  # checked before the model is built
        missing, extra = sorted(expected.keys() - got.keys()), sorted(got.keys() - expected.keys())
        parts = [f"{what} key(s) {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                 for what, keys in (("missing", missing), ("unexpected", extra)) if keys]
        parts += [f"{k} of shape {got[k]}, not {shape}" for k, shape in expected.items()
                  if got.get(k, shape) != shape][:3]
        raise DASRError(f"{path}: its weights do not fit its config ({'; '.join(parts)})")
    model = DASR(config)
    try:
        model.load_state_dict(ckpt["model"])
        if ema and "ema_generator" in ckpt:
            model.generator.load_state_dict(ckpt["ema_generator"])
    except (RuntimeError, TypeError, AttributeError) as exc:  # the weights do not fit the stored config
        # PyTorch's first line names only the model ("Error(s) in loading state_dict for DASR:"), the keys follow
        raise DASRError(f"{path}: its weights do not fit its config ({' '.join(str(exc).split())[:300]})") from None
    return model.eval()


def load_checkpoint_model(path: str | Path, *, ema: bool = True) -> DASR:
    """A DASR (float32, eval mode) from a model file (model.safetensors) or a `dasr-train` checkpoint."""
    if is_model_file(path):
        return read_model_file(path)[0]
    return model_from_checkpoint(load_checkpoint(path), path, ema=ema)


def load_model(path: str | Path | None = None, release: tuple[str | Path, str | Path] | None = None, *,
               warn: Callable[[str], None] | None = None) -> LoadedModel:
    """What `dasr-sr`/`dasr-eval --model` take: a model file, a checkpoint, or a run folder (its newest
    intact checkpoint, EMA generator; a damaged newer one is skipped with a note to `warn`); or the
    released G and P files."""
    if (path is None) == (release is None):
        raise DASRError("give a model (--model: a file, checkpoint or run folder) or the release weights "
                        "(--release-weights G P)"
                        + (", not both" if path is not None else ""))
    if release is not None:
        return LoadedModel(load_release_weights(*release).eval(), f"{release[0]} + {release[1]}", "release weights")
    path = Path(path)
    if path.is_dir():
        found = latest_intact(path, warn=warn)
        if found is None:
            if (path / MODEL_FILE).is_file():  # a run folder handed on with its model file alone
                return load_model(path / MODEL_FILE, warn=warn)
            raise DASRError(f"{path}: no readable ckpt-*.pt or {MODEL_FILE} in this run folder")
        ckpt_path, ckpt = found
        return LoadedModel(model_from_checkpoint(ckpt, ckpt_path), str(ckpt_path), _checkpoint_kind(ckpt),
                           int(ckpt["step"]))
    if not path.exists():
        raise FileNotFoundError(2, "no such model file, checkpoint or run folder", str(path))
    if not path.is_file():
        raise DASRError(f"{path}: not a regular file")
    if is_model_file(path):
        model, meta = read_model_file(path)
        step = int(meta["step"]) if re.fullmatch(r"[0-9]{1,18}", meta.get("step", "")) else None
        return LoadedModel(model, str(path), "model file", step)
    if not is_torch_file(path):  # said as what was looked for: either kind (a checkpoint's refusal named one)
        raise DASRError(f"{path}: neither a model file (dasr-train's or dasr-export's .safetensors) nor a "
                        "checkpoint (a torch.save file)")
    ckpt = load_checkpoint(path)
    return LoadedModel(model_from_checkpoint(ckpt, path), str(path), _checkpoint_kind(ckpt), ckpt["step"])


def export_model(source: str | Path, out: str | Path, *, dtype: torch.dtype = torch.bfloat16,
                 warn: Callable[[str], None] | None = None) -> LoadedModel:
    """`dasr-export`: the model of a checkpoint or run folder (EMA generator + predictor + config) as a
    model file in `dtype`; returns what was exported. DASRError where `out` is the file the model was read
    from (a model file, or a run folder's own model.safetensors): an export never replaces its source."""
    loaded = load_model(source, warn=warn)
    if real_path(out) == real_path(loaded.path):
        raise DASRError(f"{out} is the file the model was read from ({source}): write the export elsewhere")
    save_model_file(loaded.model, out, dtype=dtype, step=loaded.step, source=Path(loaded.path).name)
    return loaded


FIELD_NAMES_HINT = "the names are v's field names, as docs/degradation.md's vector table lists them"


def parse_settings(items: list[str]) -> dict[str, str]:
    """['noise1.strength=5', ...] -> {'noise1.strength': '5'}. Refused here, before any image is read, with
    DASRError: an unknown or repeated name, and a value that is wrong whatever the image (not a choice, not
    a finite number, a flag other than 0 or 1, a kernel size that is not odd, out of its field's range);
    a noise strength's range follows the image's noise type, so `edit_vector` checks it."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not name or not value:
            raise DASRError(f"--set {item!r}: expected NAME=VALUE, e.g. noise1.strength=5")
        if name in out:
            raise DASRError(f"--set {name} is given twice ({out[name]} and {value}): give it once")
        out[name] = value
    return checked_settings(out)


def checked_settings(settings: dict[str, Any]) -> dict[str, str]:
    """`settings` ({name: value}, values as text or numbers, a flag also as a bool) as {name: text}, names
    and values stripped, each checked as far as no image's v decides it (:func:`parse_settings`)."""
    from degrade.vector import FIELDS_BY_NAME

    out: dict[str, str] = {}
    for name, value in settings.items():
        name = str(name).strip()
        text = str(int(value)) if isinstance(value, (bool, np.bool_)) else str(value).strip()
        if name not in FIELDS_BY_NAME:
            raise DASRError(f"--set: unknown field {name!r}; {FIELD_NAMES_HINT}")
        if name in out:
            raise DASRError(f"--set {name} is given twice: give it once")
        f = FIELDS_BY_NAME[name]
        if f.kind == "onehot":
            if text not in f.choices:
                raise DASRError(f"{name}: {text!r} is not one of {', '.join(f.choices)}")
        else:
            x = _number(name, text)
            if f.kind == "flag" and x not in (0, 1):
                raise DASRError(f"{name}: {text!r} is a flag: 0 or 1")
            if name.endswith(".size") and not (x == int(x) and int(x) % 2 == 1):
                raise DASRError(f"{name}: {text!r} is not an odd kernel size")
            if f.kind == "scalar" and not f.ranges:
                lo, hi = f.range_for(None)
                if not lo <= x <= hi:
                    raise DASRError(f"{name}: {x:g} is outside [{lo:g}, {hi:g}]")
        out[name] = text
    return out


def _number(name: str, text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise DASRError(f"{name}: {text!r} is not a number") from None
    if not math.isfinite(x):
        raise DASRError(f"{name}: {text!r} is not a finite number")
    return x


def edit_vector(v: Tensor, settings: dict[str, str]) -> Tensor:
    """Override named fields of v (B, 33) in physical units, leaving every other entry untouched.

    Scalars take a number in the field's units (noise strength in the units of the step's noise type:
    Gaussian sigma / 255 or Poisson scale; refused where v sets no type and the settings do not either);
    flags take 0 or 1; kernel sizes odd integers; one-hot fields take a choice name (:func:`parse_settings`'s
    checks, DASRError).
    """
    from degrade.vector import FIELDS_BY_NAME

    v = v.clone()
    settings = checked_settings(settings)  # names and v-free values, stripped
    # choices first: a strength's units follow its step's noise type, whichever order the settings came in
    for name, text in sorted(settings.items(), key=lambda item: FIELDS_BY_NAME[item[0]].kind != "onehot"):
        f = FIELDS_BY_NAME[name]
        if f.kind == "onehot":
            v[:, f.slice] = 0
            v[:, f.index + f.choices.index(text)] = 1
            continue
        x = float(text)
        if f.kind == "flag":
            v[:, f.index] = x
            continue
        step_type = None
        if f.ranges:  # noise strength: units follow the noise type currently in v
            group = FIELDS_BY_NAME[f"{f.step}.type"]
            if bool((v[:, group.slice].clamp(0, 1).sum(dim=1) < 0.5).any()):  # no type: decode reads no noise
                entries = {f.normalise(x, t) if f.range_for(t)[0] <= x <= f.range_for(t)[1] else None
                           for t in group.choices}
                if len(entries) == 1 and None not in entries:  # one entry under either type (0): no units needed
                    v[:, f.index] = entries.pop()
                    continue
                raise DASRError(f"{name}: this image's v has no {f.step} noise type (it reads as no noise), so "
                                f"the strength has no units: give --set {f.step}.type=gaussian or poisson too")
            choice = v[:, group.slice].argmax(dim=1)
            step_type = [group.choices[int(c)] for c in choice]
        for row in range(v.shape[0]):
            st = step_type[row] if step_type else None
            lo, hi = f.range_for(st)
            if not lo <= x <= hi:
                units = (f" for {st} noise, the type in v (--set {f.step}.type=... chooses another)" if st else "")
                raise DASRError(f"{name}: {x:g} is outside [{lo:g}, {hi:g}]{units}")
            v[row, f.index] = f.normalise(x, st)
    return v


def to_tensor(img: np.ndarray) -> Tensor:
    """(H, W, 3) float32 in [0, 1] -> (1, 3, H, W)."""
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))[None]


def to_image(t: Tensor) -> np.ndarray:
    """(1, 3, H, W) -> (H, W, 3) float32 clamped to [0, 1]."""
    return t[0].clamp(0, 1).permute(1, 2, 0).float().cpu().numpy()


PREDICTOR_MIN_TILE = 256  # the predictor's tiles are at least this side, whatever G's tile
DEFAULT_TILE = 512  # dasr-sr / dasr-eval: LR tiles of at most this side (larger images are tiled, exactly)


@torch.no_grad()
def predict(model: DASR, lr: Tensor, *, tile: int | None = None) -> tuple[Tensor, Tensor]:
    """v_hat and a from the whole image at its own resolution, as the predictor was trained (on LR patches
    as made; a shrunken image shows less noise and blur: at a 2x2 average, half the noise). With `tile`, the
    predictor runs tile by tile, at least PREDICTOR_MIN_TILE px a side (the same result, in memory that
    follows the tile)."""
    if tile is not None:
        tile = max(tile, PREDICTOR_MIN_TILE)
    return model.predict(lr, tile=tile)


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


_REUSED = threading.local()  # this thread's last plain network from reused_fused_net: [key, net, in use]


@contextmanager
def reused_fused_net(model: DASR | ExpertMSRResNet, a: Tensor, *, dtype: torch.dtype | None = None,
                     channels_last: bool = False) -> Iterator[MSRResNet]:
    """`with reused_fused_net(model, a) as net:` fuse_experts for one image at a time: the thread keeps the
    plain network of its last call and overwrites it (`fuse(a, into=...)`) when the next call wants the same
    size, device, dtype, memory format, CUDA stream and inference mode, instead of building one (building
    was 8-9 of the 13 ms of a fuse on CPU). The network is good only inside the block: a call made
    inside it (a callback fusing another image) gets a network of its own. One is kept per thread (6 MB
    for the full model in float32)."""
    gen = model.generator if isinstance(model, DASR) else model
    ref = gen.conv_first.weight
    # the stream: a fuse writes the weights in place on the current stream, which must be the one that ran
    # the last network; inference mode: its tensors cannot be written outside it
    stream = torch.cuda.current_stream(ref.device) if ref.device.type == "cuda" else None
    key = (tuple(ref.shape), len(gen.body), gen.scale, ref.device, dtype or ref.dtype, channels_last, stream,
           torch.is_inference_mode_enabled())
    last = getattr(_REUSED, "entry", None)
    if last is not None and last[2]:  # in use further up this thread's stack: leave it alone
        yield fuse_experts(gen, a, dtype=dtype, channels_last=channels_last)
        return
    if last is not None and last[0] == key:
        entry = last
        gen.fuse(a, into=entry[1])
    else:
        _REUSED.entry = None  # the old one is freed before the new one is built
        entry = [key, fuse_experts(gen, a, dtype=dtype, channels_last=channels_last), False]
        _REUSED.entry = entry
    entry[2] = True
    try:
        yield entry[1]
    finally:
        entry[2] = False


def receptive_radius(config) -> int:
    """How far, in LR pixels, an output pixel of G sees: conv_first and upconv1 1 each, 2 per residual
    block, upconv2 at x2 (1/2), conv_hr and conv_last at x4 (1/4 each): 2 * num_block + 3 (the bilinear
    base sees 1). Tiles overlapping by this much give the whole-image result (tested against G itself)."""
    return 2 * config.num_block + 3


@torch.no_grad()
def super_resolve(model: DASR, lr: Tensor, a: Tensor, *, tile: int | None = None, overlap: int | None = None,
                  dtype: torch.dtype | None = None, channels_last: bool = False,
                  generator: ExpertMSRResNet | None = None) -> Tensor:
    """G with expert mix `a` (B, K) over the LR images (B, 3, h, w), whole or in `tile`-sized LR tiles.

    The experts are fused once per image (:func:`fuse_experts`) and every tile runs the plain network.
    Tiles overlap by `overlap` LR pixels on each side (default: G's receptive-field radius,
    :func:`receptive_radius`); each output tile keeps only its own region, so the result equals the
    whole-image pass.
    `dtype` / `channels_last` run the fused network in that precision / memory format (on a GPU:
    torch.bfloat16 and True); the result is returned in lr's dtype and standard layout. `generator`: the
    expert generator to fuse (default: the model's own; e.g. the trainer's EMA generator).
    """
    if a.shape[0] != lr.shape[0]:
        raise DASRError(f"one expert mix per image: lr has {lr.shape[0]} image(s), a has {a.shape[0]} row(s)")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    overlap = receptive_radius(model.config) if overlap is None else overlap
    outs = []
    for i in range(lr.shape[0]):
        with reused_fused_net(generator or model, a[i : i + 1], dtype=dtype, channels_last=channels_last) as net:

            def run(x: Tensor, net: MSRResNet = net) -> Tensor:  # x float32: the net casts for its convolutions
                return net(x.contiguous(memory_format=fmt)).to(x.dtype)

            outs.append(tiled(run, lr[i : i + 1], model.config.scale, tile, overlap))
    return torch.cat(outs).contiguous()


# how allocation failures read where they arrive as RuntimeErrors: CUDA's and MPS's ("out of memory"), cuBLAS's
# (CUBLAS_STATUS_ALLOC_FAILED), cuDNN's (..._ALLOCATION_FAILED in cuDNN 9), MIOpen's (miopenStatusAllocFailed),
# and the CPU allocator's on Linux and on Windows
OUT_OF_MEMORY_TEXTS = ("out of memory", "ALLOC_FAILED", "ALLOCATION_FAILED", "AllocFailed", "can't allocate memory",
                       "not enough memory")


def out_of_memory(exc: BaseException) -> bool:
    """An allocation failure: torch.cuda.OutOfMemoryError, Python's MemoryError (numpy), OpenCV's (cv2.error
    with code StsNoMem), or a RuntimeError that reads as one (OUT_OF_MEMORY_TEXTS)."""
    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    if isinstance(exc, cv2.error):
        return getattr(exc, "code", None) == cv2.Error.StsNoMem
    return isinstance(exc, RuntimeError) and any(t in str(exc) for t in OUT_OF_MEMORY_TEXTS)


def refuse_out_of_memory(run: Callable[[], Any], device: torch.device | str, what: str | Callable[[], str]) -> Any:
    """run(), with an allocation failure (:func:`out_of_memory`) turned into a one-line DASRError: "out of
    memory on DEVICE " + `what` (or what()). It is raised after the failed call's frames, and the tensors
    they held, are gone, and CUDA's cached blocks freed, so the next call (the next image) starts clean."""
    try:
        return run()
    except (RuntimeError, MemoryError, cv2.error) as exc:
        if not out_of_memory(exc):
            raise
    if torch.device(device).type == "cuda":  # here, past the except block: its traceback is released
        torch.cuda.empty_cache()
    raise DASRError(f"out of memory on {device} {what if isinstance(what, str) else what()}")


def upscale(model: DASR, image: np.ndarray, *, overrides: dict[str, str] | None = None, mix: Tensor | None = None,
            tile: int | None = DEFAULT_TILE, overlap: int | None = None, device: torch.device | str = "cpu",
            dtype: torch.dtype | None = None, channels_last: bool = False,
            on_tile: Callable[[int, int], None] | None = None) -> tuple[np.ndarray, Tensor]:
    """One image, x4, as `dasr-sr` does it: predict v once from the whole image, override named fields of
    it (`overrides`, :func:`edit_vector`) or set the expert mix (`mix`, (1, K)), then run the fused
    generator whole or tile by tile. image (H, W, 3) float32 in [0, 1] -> ((4H, 4W, 3) uint8, v_hat (1, 33)).
    `dtype` / `channels_last`: the fused generator's precision and memory format (:func:`fuse_experts`);
    the predictor and the bilinear base stay float32.

    With `tile` (default DEFAULT_TILE; None: the whole image at once), the predictor runs tile by tile too
    (at least 256 px a side) and the output is assembled in 8 bit tile by tile, so memory follows the tile
    size plus the uint8 result. Tiles overlap by `overlap` (default: G's receptive-field radius, which
    gives the whole-image result). `on_tile(done, total)` is called after each output tile (a progress bar).
    Out of memory: a one-line DASRError that says to lower the tile (:func:`refuse_out_of_memory`).
    """
    _check_image(image)  # before its shape is read: a list or a 1-D array was a Python error
    h, w = image.shape[:2]
    how = (f"upscaling a {w}x{h} px image in LR tiles of {tile} px: use a smaller --tile" if tile else
           f"upscaling a {w}x{h} px image whole (--tile 0): use --tile")
    return refuse_out_of_memory(lambda: _upscale(model, image, overrides, mix, tile, overlap, device, dtype,
                                                 channels_last, on_tile), device, how)


def _check_image(image: np.ndarray) -> None:
    """upscale's input: (H, W, 3) float32 in [0, 1] (what degrade.read_image gives), else a DASRError; a
    0-255 float image would come out white, a uint8 or gray one a torch error."""
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.float32:
        raise DASRError(f"an image must be an (H, W, 3) float32 array in [0, 1] (degrade.read_image's), got "
                        f"{getattr(image, 'dtype', type(image).__name__)} {getattr(image, 'shape', '')}")
    if image.size and not 0 <= float(image.min()) <= float(image.max()) <= 1:  # NaN fails both
        raise DASRError(f"an image must be in [0, 1], got values from {float(image.min()):g} to "
                        f"{float(image.max()):g} (divide 8-bit values by 255)")


@torch.no_grad()
def _upscale(model: DASR, image: np.ndarray, overrides: dict[str, str] | None, mix: Tensor | None, tile: int | None,
             overlap: int | None, device: torch.device | str, dtype: torch.dtype | None, channels_last: bool,
             on_tile: Callable[[int, int], None] | None) -> tuple[np.ndarray, Tensor]:
    if mix is not None and (mix.shape != (1, model.config.num_experts) or not bool(torch.isfinite(mix).all())):
        raise DASRError(f"the expert mix must be {model.config.num_experts} finite numbers")
    lr = to_tensor(image).to(device)
    held = next(model.parameters()).device
    if held != lr.device:  # (torch.device("cuda") names no index: compared as the image landed, cuda:0)
        raise DASRError(f"the model is on {held} and device is {lr.device}: move the model first "
                        f"(model.to({str(lr.device)!r}); load_model gives it on the CPU)")
    v_hat, a = predict(model, lr, tile=tile)
    if overrides:
        v_hat = edit_vector(v_hat, overrides)
        a = model.mix(v_hat)
    if mix is not None:
        a = mix.to(lr.device, lr.dtype)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    s = model.config.scale
    overlap = receptive_radius(model.config) if overlap is None else overlap
    out = np.empty((lr.shape[-2] * s, lr.shape[-1] * s, 3), np.uint8)
    total = tile_count(lr.shape[-2], lr.shape[-1], tile)
    with reused_fused_net(model, a, dtype=dtype, channels_last=channels_last) as net:
        pieces = _tiles(lambda t: net(t.contiguous(memory_format=fmt)).to(t.dtype), lr, s, tile, overlap)
        for done, ((y, x), part) in enumerate(pieces, 1):
            out[y : y + part.shape[-2], x : x + part.shape[-1]] = to_uint8(to_image(part))
            if on_tile is not None:
                on_tile(done, total)
    return out, v_hat


PNG_MAX_SIDE = 1_000_000  # px: libpng (as OpenCV builds it) refuses to write a wider or taller image


def output_size(h: int, w: int, outscale: float) -> tuple[int, int]:
    """(width, height) of `outscale` x an h x w input, rounded; DASRError outside 1-16, above 16 x
    pixel_limit() pixels (what x4 of the largest readable input makes) or a side above PNG_MAX_SIDE."""
    from degrade.io import pixel_limit

    if not 1 <= outscale <= 16:
        raise DASRError(f"the output scale must be between 1 and 16, not {outscale:g}")
    size = (max(1, math.floor(w * outscale + 0.5)), max(1, math.floor(h * outscale + 0.5)))  # halves up
    if size[0] * size[1] > 16 * pixel_limit():
        raise DASRError(f"x{outscale:g} of {w}x{h} px is {size[0]}x{size[1]} px, above 16 x the "
                        f"{pixel_limit() / 1e6:g} MP input limit")
    if max(size) > PNG_MAX_SIDE:
        raise DASRError(f"x{outscale:g} of {w}x{h} px is {size[0]}x{size[1]} px: a PNG side can be at most "
                        f"{PNG_MAX_SIDE:,} px (libpng's limit)")
    return size


def finish(sr: np.ndarray, alpha: np.ndarray | None = None, outscale: float = 4.0) -> np.ndarray:
    """dasr-sr's output from `upscale`'s x4 RGB (uint8): resized for `outscale` other than 4 to `outscale` x
    the input's size (area averaging to shrink, Lanczos to enlarge), with the input's alpha channel ((H, W)
    uint8, or None) upscaled bicubic as a fourth channel. The output may hold at most 16 x pixel_limit()
    pixels (what x4 of the largest readable input makes), else DASRError."""
    h, w = sr.shape[0] // 4, sr.shape[1] // 4
    size = output_size(h, w, outscale)
    if alpha is not None and alpha.shape != (h, w):
        raise DASRError(f"an alpha channel of {alpha.shape} does not fit an image of {h}x{w} px")
    if alpha is not None and outscale > 4:  # the small x4 RGBA resized once: no larger RGB and alpha beside it
        x4 = np.empty((4 * h, 4 * w, 4), np.uint8)
        x4[..., :3], x4[..., 3] = sr, cv2.resize(alpha, (4 * w, 4 * h), interpolation=cv2.INTER_CUBIC)
        return cv2.resize(x4, size, interpolation=cv2.INTER_LANCZOS4)
    if outscale != 4:
        sr = cv2.resize(sr, size, interpolation=cv2.INTER_AREA if outscale < 4 else cv2.INTER_LANCZOS4)
    if alpha is None:
        return sr
    out = np.empty((*sr.shape[:2], 4), np.uint8)
    out[..., :3] = sr
    out[..., 3] = cv2.resize(alpha, size, interpolation=cv2.INTER_CUBIC)  # bicubic straight to the output size
    return out


def tile_count(h: int, w: int, tile: int | None) -> int:
    """How many pieces :func:`_tiles` cuts an h x w LR image into. DASRError for a tile under 1 px."""
    if tile is not None and tile < 1:  # 0 divided by zero; a negative tile left the output unwritten
        raise DASRError(f"the tile must be at least 1 px a side (None: the whole image), not {tile}")
    return 1 if tile is None or (h <= tile and w <= tile) else math.ceil(h / tile) * math.ceil(w / tile)


def tiled(run: Callable[[Tensor], Tensor], lr: Tensor, s: int, tile: int | None, overlap: int) -> Tensor:
    """`run` (LR -> x`s` SR) over lr (1, 3, h, w) whole, or tile by tile with `overlap` LR pixels of context."""
    out = lr.new_zeros(lr.shape[0], 3, lr.shape[-2] * s, lr.shape[-1] * s)
    for (y, x), part in _tiles(run, lr, s, tile, overlap):
        out[..., y : y + part.shape[-2], x : x + part.shape[-1]] = part
    return out


def _tiles(run: Callable[[Tensor], Tensor], lr: Tensor, s: int, tile: int | None, overlap: int):
    """((y, x), SR region) pieces that cover the x`s` output of lr (1, 3, h, w): the whole image at once, or
    one `tile` x `tile` LR tile at a time, each run with `overlap` LR pixels of context, which is then cut off."""
    h, w = lr.shape[-2:]
    if overlap < 0:  # would cut each tile's own region short
        raise DASRError(f"the tiles' overlap must be at least 0 px, not {overlap}")
    if tile_count(h, w, tile) == 1:
        yield (0, 0), _finite(run(lr))
        return
    for y in range(0, h, tile):
        for x in range(0, w, tile):
            y0, x0 = max(0, y - overlap), max(0, x - overlap)
            y1, x1 = min(h, y + tile + overlap), min(w, x + tile + overlap)
            part = _finite(run(lr[..., y0:y1, x0:x1]))
            ty, tx = min(tile, h - y), min(tile, w - x)
            yield (y * s, x * s), part[..., (y - y0) * s : (y - y0 + ty) * s, (x - x0) * s : (x - x0 + tx) * s]


def _finite(sr: Tensor) -> Tensor:
    """sr, or DASRError if it holds NaN or infinite values, which 8-bit output would silently turn black
    (an expert mix too large for the weights: --mix 1e30,1e30 overflows float32 in the first layer)."""
    if not bool(torch.isfinite(sr).all()):
        raise DASRError("the network's output holds NaN or infinite values (an expert mix too large for its "
                        "weights?)")
    return sr
