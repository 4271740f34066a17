"""The model file to hand on: predictor + generator + config in the safetensors format, no pickle.

safetensors (https://github.com/huggingface/safetensors) is a plain layout: an 8-byte little-endian
header length N, N bytes of JSON naming each tensor's dtype, shape and byte range, then the raw
little-endian bytes. Any safetensors reader opens our files (the tests check it against the
`safetensors` package). We write and read it here, in a few lines, because the reader must refuse
a hostile file before allocating anything (the config is validated and every tensor's name, shape and
byte range checked against the model it builds), and because it must work wherever torch does
(the GPU machines have no package index).

`__metadata__` holds strings only: format "dasr-model", version "1", the model config as JSON, and
the training step and source when known.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any

import torch

from dasr_model.checkpoints import open_regular
from dasr_model.errors import DASRError
from dasr_model.model import DASR, DASRConfig
from degrade.io import atomic_writer
from degrade.strictjson import DuplicateKey, strict_json

MODEL_FILE = "model.safetensors"  # what dasr-train writes into its run folder at the last step
FORMAT = "dasr-model"
VERSION = "1"
MAX_HEADER = 2 * 2**20  # bytes of JSON; our largest config's header (256 blocks) is about 0.1 MiB. Bounded
# tighter than that, since parsing JSON takes some 25x its size in memory
DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
DTYPE_NAMES = {dt: name for name, dt in DTYPES.items()}


def model_state(model: DASR, ema_generator: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
    """The tensors of the model file: predictor.* and generator.* (the EMA generator when given)."""
    state = {f"predictor.{k}": t for k, t in model.predictor.state_dict().items()}
    gen = ema_generator if ema_generator is not None else model.generator
    return state | {f"generator.{k}": t for k, t in gen.state_dict().items()}


def save_model_file(model: DASR, path: str | os.PathLike, *, ema_generator: torch.nn.Module | None = None,
                    dtype: torch.dtype = torch.bfloat16, step: int | None = None, source: str | None = None) -> Path:
    """Write the model alone in `dtype` (bf16, fp16 or fp32), atomically; 5 experts in bf16: about 16 MB."""
    if dtype not in DTYPE_NAMES:
        raise DASRError(f"model file dtype must be one of float32, float16, bfloat16, got {dtype}")
    meta = {"format": FORMAT, "version": VERSION, "config": json.dumps(model.config.to_dict())}
    if step is not None:
        meta["step"] = str(step)
    if source is not None:
        meta["source"] = source
    header: dict[str, Any] = {"__metadata__": meta}
    blobs, offset = [], 0
    for name, t in sorted(model_state(model, ema_generator).items()):
        t = t.detach()
        cast = t.to("cpu", dtype)
        if not bool(torch.isfinite(cast).all()):  # the reader refuses such a file: refuse to write it
            if not bool(torch.isfinite(t).all()):
                raise DASRError(f"{name} holds NaN or infinite values: not a model to hand on")
            raise DASRError(f"{name}: a weight of {float(t.abs().max()):.4g} does not fit "
                            f"{str(dtype).removeprefix('torch.')} (at most {torch.finfo(dtype).max:.4g}); "
                            "export in a wider dtype (bf16 or fp32)")
        data = cast.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header so the data starts 8-byte aligned
    path = Path(path)
    with atomic_writer(path) as f:  # a unique temporary file, renamed over `path`; removed if a write fails
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for blob in blobs:
            f.write(blob)
    return path


def is_model_file(path: str | os.PathLike) -> bool:
    """True if the file starts like a safetensors file (a sane header length, then '{')."""
    try:
        with open_regular(Path(path)) as f:  # never blocks on a FIFO swapped in after a check
            head = f.read(9)
    except (OSError, DASRError):
        return False
    return len(head) == 9 and struct.unpack("<Q", head[:8])[0] <= MAX_HEADER and head[8:9] == b"{"


def read_model_file(path: str | os.PathLike) -> tuple[DASR, dict[str, str]]:
    """The model (float32, eval mode) and the file's metadata. Anything off is a DASRError, raised before
    the weights are read: the config, then every tensor's name, dtype, shape and byte range; then a tensor
    holding NaN or infinite values."""
    path = Path(path)
    with open_regular(path) as f:  # a FIFO or a device would block or never end: refused, even if swapped in
        size = os.fstat(f.fileno()).st_size
        raw = f.read(8)
        if len(raw) < 8:
            raise DASRError(f"{path}: not a model file (too short)")
        n = struct.unpack("<Q", raw)[0]
        if n > min(MAX_HEADER, size - 8):
            raise DASRError(f"{path}: not a model file (header length {n} does not fit)")
        try:
            header = strict_json(f.read(n))
        except DuplicateKey as exc:
            raise DASRError(f"{path}: not a model file (in its header {exc})") from None
        except (ValueError, RecursionError):
            raise DASRError(f"{path}: not a model file (its header is not JSON)") from None
        if not isinstance(header, dict) or not isinstance(header.get("__metadata__"), dict):
            raise DASRError(f"{path}: not a model file (no metadata)")
        meta = header.pop("__metadata__")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            raise DASRError(f"{path}: not a model file (metadata values must be strings)")
        if meta.get("format") != FORMAT:
            raise DASRError(f"{path}: not a dasr model file (format {meta.get('format')!r})")
        if meta.get("version") != VERSION:
            raise DASRError(f"{path}: model file version {meta.get('version')!r}; this version reads {VERSION}")
        try:
            config = DASRConfig.from_dict(strict_json(meta.get("config", "")))
        except DuplicateKey as exc:
            raise DASRError(f"{path}: unreadable config ({exc})") from None
        except (ValueError, RecursionError) as exc:
            raise DASRError(f"{path}: {exc}" if isinstance(exc, DASRError) else f"{path}: unreadable config") from None
        least = 2 * config.parameter_count()  # bytes: every parameter in the narrowest dtype (bf16, fp16)
        if size - 8 - n < least:  # before building the model: up to MAX_PARAMETERS, some 400 MB and seconds
            raise DASRError(f"{path}: {size - 8 - n:,} bytes of tensors, where its config needs at least {least:,} "
                            "(truncated, or not this model's file)")
        model = DASR(config)  # bounded: DASRConfig refuses more than MAX_PARAMETERS
        expected = {k: tuple(t.shape) for k, t in model_state(model).items()}
        spans = _check_entries(path, header, expected, size - 8 - n)
        state = {}
        for name, (dtype, shape, begin, end) in spans.items():
            f.seek(8 + n + begin)
            buf = bytearray(f.read(end - begin))
            if len(buf) != end - begin:
                raise DASRError(f"{path}: truncated (tensor {name})")
            state[name] = torch.frombuffer(buf, dtype=dtype).reshape(shape).float()
            if not bool(torch.isfinite(state[name]).all()):  # such a model outputs NaN: a black image
                raise DASRError(f"{path}: refused: tensor {name} holds NaN or infinite values")
    model.predictor.load_state_dict({k[10:]: t for k, t in state.items() if k.startswith("predictor.")})
    model.generator.load_state_dict({k[10:]: t for k, t in state.items() if k.startswith("generator.")})
    return model.eval(), {k: str(v) for k, v in meta.items()}


def _check_entries(path: Path, header: dict[str, Any], expected: dict[str, tuple[int, ...]],
                   data_size: int) -> dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]:
    missing = sorted(set(expected) - set(header))
    extra = sorted(set(header) - set(expected))
    if missing or extra:
        what = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
        raise DASRError(f"{path}: its tensors do not fit its config ({what})")
    spans = {}
    for name, entry in header.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("dtype"), str) or entry["dtype"] not in DTYPES:
            raise DASRError(f"{path}: tensor {name}: dtype must be one of {', '.join(DTYPES)}")
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if (not isinstance(shape, list) or not all(type(n) is int for n in shape)
                or tuple(shape) != expected[name]):
            raise DASRError(f"{path}: tensor {name}: shape {shape}, the config needs {list(expected[name])}")
        dtype = DTYPES[entry["dtype"]]
        ok = (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
              and 0 <= offsets[0] <= offsets[1] <= data_size
              and offsets[1] - offsets[0] == math.prod(shape) * dtype.itemsize)
        if not ok:
            raise DASRError(f"{path}: tensor {name}: byte range {offsets} does not fit the file")
        spans[name] = (dtype, tuple(shape), offsets[0], offsets[1])
    end = 0  # as the format requires: the byte ranges tile the data exactly, no overlap, gap or tail
    for name, (_, _, begin, stop) in sorted(spans.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if begin != end:
            raise DASRError(f"{path}: tensor {name}: byte range starts at {begin}, expected {end} (overlap or gap)")
        end = stop
    if end != data_size:
        raise DASRError(f"{path}: {data_size - end} bytes after the last tensor")
    return spans
