"""The run folder and the device: what a dasr-train run folder holds, starting it over, cutting its
metrics back on resume, atomic writes; which device a run uses and how to name it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import torch

from dasr_model.checkpoints import CHECKPOINT, list_checkpoints
from dasr_model.errors import DASRError
from dasr_model.modelfile import MODEL_FILE
from degrade.errors import DegradeError
from degrade.io import atomic_writer, open_regular, read_regular_file


def pick_device(name: str) -> torch.device:
    """'auto' (CUDA when available), 'cpu', 'cuda', 'cuda:1', ...; a device that is not there is refused."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DASRError(f"--device {name!r}: not a device name (auto, cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DASRError(f"--device {name}: CUDA is not available here (torch {torch.__version__})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DASRError(f"--device {name}: there are {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise DASRError(f"--device {name!r}: only cpu and cuda are supported")
    return device


def describe_device(device: torch.device) -> str:
    """'cuda:0 (NVIDIA H100 80GB HBM3)' or 'cpu (8 threads)'."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    threads = torch.get_num_threads()
    return f"cpu ({threads} thread{'s' if threads != 1 else ''})"


RUN_FILES = ("config.json", "metrics.jsonl", MODEL_FILE)
RUN_LOCK = ".dasr-train.lock"  # held (flock) by the dasr-train writing the run, while it runs


def start_over(out: Path) -> list[Path]:
    """Delete a run's own files (checkpoints, metrics, config, model file, and their half-written .tmp
    copies, or set-aside damaged checkpoints), nothing else; returns them."""
    doomed = run_files(out)
    for path in doomed:
        path.unlink()
    return doomed


def run_files(out: Path) -> list[Path]:
    """What start_over deletes: a run folder's checkpoints, metrics, config, model file, and their half-written
    .tmp copies or set-aside damaged checkpoints."""
    out = Path(out)
    files = [*list_checkpoints(out), *(p for p in (out / name for name in RUN_FILES) if p.exists())]
    files += half_written(out)
    return files + [p for p in out.glob("ckpt-*.pt.damaged") if CHECKPOINT.fullmatch(p.name[: -len(".damaged")])]


def half_written(out: Path) -> list[Path]:
    """The temporary files our atomic writes left in run folder `out` when a kill or crash cut them short
    (each is unique, so nothing overwrites them later: a preempted run would collect them)."""
    return [p for p in Path(out).glob("*.tmp") if _half_written(p.name)]


def _half_written(name: str) -> bool:
    """A temporary file of an atomic write of ours: degrade.io.atomic_writer's `.NAME.XXXXXXXX.tmp` for a
    checkpoint, the model file, config.json or metrics.jsonl, or the older fixed `ckpt-N.pt.tmp` /
    `model.safetensors.tmp`."""
    stem = name[: -len(".tmp")]
    if stem in RUN_FILES or CHECKPOINT.fullmatch(stem):
        return True
    target = stem[1:].rsplit(".", 1)[0] if stem.startswith(".") else ""  # ".ckpt-9.pt.k2j4x8ab" -> "ckpt-9.pt"
    return target in RUN_FILES or bool(CHECKPOINT.fullmatch(target))


def logs_a_step(path: Path) -> bool:
    """metrics.jsonl at `path` holds a line of a logged step. A run that failed before its first logged step
    (a bad crop, a NaN at step 0, out of memory) leaves an empty one beside config.json: no run, so the
    corrected retry may start there."""
    if not path.exists():
        return False
    with open_metrics(path) as f:
        return any(step >= 1 for _, step in logged_steps(f))


METRICS_LINE_BYTES = 1 << 16  # a logged step's line is about 0.3-2 kB; a longer one is none of ours


def open_metrics(path: Path) -> BinaryIO:
    """A run's metrics.jsonl opened for reading: a regular file, else a DASRError (a handed-over run's
    metrics.jsonl linked to /dev/zero filled memory; a FIFO hung the resume)."""
    try:
        return open_regular(path)
    except DegradeError:
        raise DASRError(f"{path}: not a regular file") from None


def metric_lines(f: BinaryIO) -> Iterator[bytes]:
    """The lines of an open metrics.jsonl, read one at a time, each of at most METRICS_LINE_BYTES (a longer
    one is skipped whole: no run writes it)."""
    while raw := f.readline(METRICS_LINE_BYTES):
        if len(raw) == METRICS_LINE_BYTES and not raw.endswith(b"\n"):
            while raw and not raw.endswith(b"\n"):  # the rest of an overlong line
                raw = f.readline(METRICS_LINE_BYTES)
            continue
        yield raw


def logged_steps(f: BinaryIO) -> Iterator[tuple[str, int]]:
    """(line without its newline, step) of each line of an open metrics.jsonl that logs a step (a JSON
    object with an integer "step"); torn or undecodable lines (a kill) are passed over."""
    for raw in metric_lines(f):
        try:
            line = raw.decode().rstrip("\n")
            row = json.loads(line)
        except ValueError:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            continue
        if isinstance(row, dict) and type(row.get("step")) is int:
            yield line, row["step"]


def foreign_run_file(out: Path) -> str | None:
    """The name of a file in `out` that a new run would overwrite but no run of this trainer wrote, or None:
    a config.json that is not a dasr-train config (a JSON object with "shards", and "out" or the "run"
    record, which older trainers did not write), or a
    metrics.jsonl with content beside no such config (a run that failed before its first logged step leaves
    an empty one beside its config.json; a kill, a torn line beside it)."""
    ours = False
    config = out / "config.json"
    if config.exists() or config.is_symlink():
        loaded = None
        try:  # a regular file of at most 1 MiB (ours is a few KB): never a device, a FIFO or a folder
            loaded = json.loads(read_regular_file(config, CONFIG_MAX_BYTES))
        except (DegradeError, OSError, ValueError, RecursionError):
            pass
        ours = isinstance(loaded, dict) and "shards" in loaded and ("out" in loaded or "run" in loaded)
        if not ours:
            return config.name
    metrics = out / "metrics.jsonl"
    if not ours and (metrics.exists() or metrics.is_symlink()):
        try:
            with open_regular(metrics) as f:  # content: anything but blanks in its first 64 KB
                if f.read(1 << 16).strip() or f.read(1):
                    return metrics.name
        except (DegradeError, OSError):  # not a regular file: not a run's log either
            return metrics.name
    return None


CONFIG_MAX_BYTES = 1 << 20


def truncate_metrics(path: Path, step: int) -> int:
    """Keep the metrics of steps 1..step (a resumed run writes the later ones again); a torn or
    undecodable line from a kill is dropped. Rewritten atomically; returns the number of lines kept."""
    if not path.exists():
        return 0
    kept = 0
    with open_metrics(path) as f, atomic_writer(path) as out:  # line by line: memory follows a line
        for line, logged in logged_steps(f):
            if 1 <= logged <= step:
                out.write(f"{line}\n".encode())
                kept += 1
    return kept
