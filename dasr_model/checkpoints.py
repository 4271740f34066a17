"""Training checkpoints: RUN/ckpt-STEP.pt, written atomically, read with weights_only=True.

A checkpoint holds everything to continue exactly: the train config (with the model config), the
weights, the EMA generator, the optimisers and the step (the data is keyed by step). Reading refuses a
file that is not one, with one line saying why; `latest_intact` skips a damaged newest checkpoint
(a kill during a copy, a full disk) and says so.
"""

from __future__ import annotations

import io
import os
import pickle
import pickletools
import re
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import Tensor

from dasr_model.errors import DASRError
from degrade.errors import ImageError
from degrade.io import atomic_writer
from degrade.io import open_regular as open_regular_file

CHECKPOINT = re.compile(r"ckpt-(\d+)\.pt")
ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes a zip archive (since torch 1.6)
# Before torch 1.6, torch.save wrote pickles: protocol 2, then torch's magic number 0x1950a86a20f9469cfc6c
# as a 10-byte LONG1. torchvision's ImageNet weights and the LPIPS package's layers are still in this format.
LEGACY_MAGIC = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
MAX_ZIP_DIRECTORY = 4 * 2**20  # bytes; torch.save writes about 100 per tensor, a checkpoint holds hundreds


class _KeepsWriteError:
    """A binary file for torch.save that keeps the OSError a write raised: torch's zip writer turns it into a
    RuntimeError that has lost the reason (a full disk: "unexpected pos 4093120 vs 4093008")."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self) -> None:
        self.f.flush()


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """torch.save to a new temporary file (degrade.io.atomic_writer), then rename: a kill never leaves a
    half-written ckpt-*.pt, a failed write leaves nothing, and its error names `path` with the OS's reason
    (No space left on device)."""
    try:
        with atomic_writer(path) as f:
            writer = _KeepsWriteError(f)
            try:
                torch.save(state, writer)
            except RuntimeError:
                if writer.error is None:
                    raise
                raise writer.error from None  # the OS's error, which atomic_writer names `path` in
    except RuntimeError as exc:  # another failure of torch's zip writer
        raise OSError(f"{path}: could not write the checkpoint ({str(exc).splitlines()[0][:200]})") from None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint's contents (tensors on the CPU). Pickled Python objects are refused, not run."""
    path = Path(path)
    ckpt = load_torch_file(path, "checkpoint")
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("config"), dict) or "model" not in ckpt:
        raise DASRError(f"{path}: not a dasr-train checkpoint")
    if type(ckpt.get("step")) is not int or not 0 <= ckpt["step"] <= MAX_CHECKPOINT_STEP:
        raise DASRError(f"{path}: not a dasr-train checkpoint (its step is {str(ckpt.get('step'))[:40]!r})")
    for part in ("model", "ema_generator"):  # the weights a model is made of (optimiser state is left alone)
        refuse_non_finite(ckpt.get(part), f"{path}: refused: its {part} weight")
    return ckpt


MAX_CHECKPOINT_STEP = 10**15  # dasr-train's bound on --steps: a checkpoint beyond it is no run of ours


def refuse_non_finite(state: Any, what: str) -> None:
    """DASRError "`what` NAME holds NaN or infinite values" for the first such floating-point tensor of a
    state dict (anything else in it is left to load_state_dict); a model of them would output NaN."""
    if not isinstance(state, dict):
        return
    for name, t in state.items():
        if not isinstance(t, torch.Tensor):
            continue
        if t.layout != torch.strided:  # sparse and the like: no model weight is one
            raise DASRError(f"{what} {str(name)[:200]!r} is a {t.layout} tensor, not a plain one")
        # A view larger than its storage (torch.save keeps views: a stride-0 expand of one number can claim
        # any shape in a few bytes) would make any whole-tensor operation, this check's too, allocate it all
        if t.numel() * t.element_size() > t.untyped_storage().nbytes():
            raise DASRError(f"{what} {str(name)[:200]!r} claims {tuple(t.shape)} but stores "
                            f"{t.untyped_storage().nbytes()} bytes")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise DASRError(f"{what} {str(name)[:200]!r} holds NaN or infinite values")


def load_torch_file(path: Path, what: str, *, legacy: bool = False) -> Any:
    """The contents of a torch.save file, read with weights_only=True onto the CPU; `what` names the file
    kind in refusals ("checkpoint", "weights file").

    The file is read by its content through an open file object, never by its name: torch.load(PATH)
    hands any PATH ending in .safetensors to the safetensors package, whose errors are none of ours.
    Only a regular file is opened (a FIFO would block for ever, a device never end).

    `legacy` also accepts the pre-1.6 pickle format (weights published years ago, such as torchvision's).

    Before torch.load runs, every pickle in the file is scanned opcode by opcode (pickletools, no object
    built): it may name only the few globals torch.save writes for tensors in containers (SAVED_GLOBALS).
    torch's weights-only reader would also run others it allows (bytearray(N), a chain of codec calls,
    a device copy of a stride-0 view), each of which can fill gigabytes from a file of a few hundred
    bytes. After loading, the tensors' distinct storages must fit in the file's bytes: a legacy pickle
    can claim storages that are never read (uninitialised memory as weights).
    """
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(len(LEGACY_MAGIC))
        keys = None  # a legacy file's storage keys: the storages torch reads from the file
        if legacy and head == LEGACY_MAGIC:
            f.seek(0)
            stream = _Capped(f, size)
            for _ in range(LEGACY_PICKLES - 1):
                _check_pickle(stream, path, what)
            keys = _legacy_keys(stream, path, what)
        elif head[:4] != ZIP_MAGIC:
            raise DASRError(f"{path}: not a readable {what} (not a torch.save file)")
        else:
            _check_zip(path, f, what)
        f.seek(0)
        try:
            data = torch.load(f, map_location="cpu", weights_only=True, mmap=False)
        except pickle.UnpicklingError:  # the weights-only reader refuses anything but tensors in containers
            raise DASRError(f"{path}: refused: not a {what} of tensors (torch's weights-only reader refused "
                            "its contents)") from None
        except (RuntimeError, EOFError, ValueError,  # torch's errors for a damaged or truncated zip, and
                KeyError, IndexError, TypeError, AttributeError,  # the unpickler's on damaged data.pkl bytes,
                AssertionError, NotImplementedError,  # ("saved_id must be a tuple", a storage type it lacks)
                struct.error, OverflowError, MemoryError):  # a short read, a size it cannot allocate
            raise DASRError(f"{path}: not a readable {what} (damaged or truncated)") from None
    count, claimed = _storages(data)
    if claimed > size or (keys is not None and count > len(keys)):
        raise DASRError(f"{path}: refused: its tensors claim {count} storages of {claimed} bytes, more than the file "
                        "holds")
    return data


# What torch.save's pickles name (protocol 2 GLOBAL opcodes) for tensors in dicts and lists, in both formats
SAVED_GLOBALS = frozenset({"collections OrderedDict", "torch._utils _rebuild_tensor", "torch._utils _rebuild_tensor_v2",
                           "torch._utils _rebuild_parameter",
                           *(f"torch {t}Storage" for t in ("Float", "Double", "Half", "BFloat16", "Long", "Int",
                                                           "Short", "Char", "Byte", "Bool"))})
LEGACY_PICKLES = 5  # magic number, protocol version, system info, the object, its storage keys


class _Capped:
    """A file object for pickletools: a read never asks for more than the file has left (a pickle's length
    field can claim any size, and a buffered read allocates what it is asked for)."""

    def __init__(self, f: BinaryIO, size: int):
        self.f, self.size = f, size

    def read(self, n: int = -1) -> bytes:
        left = max(0, self.size - self.f.tell())
        return self.f.read(left if n < 0 else min(n, left))

    def readline(self) -> bytes:
        return self.f.readline(max(1, self.size - self.f.tell()))

    def tell(self) -> int:
        return self.f.tell()


def _check_pickle(stream: Any, path: Path, what: str) -> None:
    """Scan one pickle's opcodes up to its STOP: only SAVED_GLOBALS may be named, by GLOBAL (the opcodes that
    take a name from the stack or build objects by class name are refused: torch.save writes none)."""
    try:
        for op, arg, _ in pickletools.genops(stream):
            if op.name == "GLOBAL" and arg not in SAVED_GLOBALS:
                name = str(arg)[:80].replace(" ", ".")
                raise DASRError(f"{path}: refused: not a {what} of tensors (it calls {name})")
            if op.name in ("STACK_GLOBAL", "INST", "OBJ"):
                raise DASRError(f"{path}: refused: not a {what} as torch.save writes it (pickle opcode {op.name})")
    except DASRError:  # a ValueError too
        raise
    except (ValueError, struct.error, OverflowError, EOFError):  # an unknown opcode, a truncated argument
        raise DASRError(f"{path}: not a readable {what} (damaged or truncated)") from None


def _legacy_keys(stream: Any, path: Path, what: str) -> set[str]:
    """The keys of the storages a legacy file holds, from its last pickle: a list of strings, as torch.save
    writes it (any other opcode is refused, so every string scanned is an item of the list)."""
    keys, plain = set(), {"PROTO", "EMPTY_LIST", "MARK", "APPEND", "APPENDS", "BINPUT", "LONG_BINPUT", "MEMOIZE",
                          "STOP"}
    try:
        for op, arg, _ in pickletools.genops(stream):
            if isinstance(arg, str) and op.name not in plain:
                keys.add(arg)
            elif op.name not in plain:
                raise DASRError(f"{path}: not a readable {what} (its storage list is not a list of keys)")
    except DASRError:
        raise
    except (ValueError, struct.error, OverflowError, EOFError):
        raise DASRError(f"{path}: not a readable {what} (damaged or truncated)") from None
    return keys


def _storages(data: Any) -> tuple[int, int]:
    """The number and bytes of the distinct non-empty storages of the tensors in `data` (dicts, lists and
    tuples walked without recursion, as a pickle can nest deeper than Python's stack, and each once)."""
    total, seen, stack, walked = 0, set(), [data], set()
    while stack:
        x = stack.pop()
        if isinstance(x, (dict, list, tuple, set, frozenset)):  # each container once: lists nested 60 deep,
            if id(x) in walked:  # each holding the one below twice, are 2 kB of pickle and 2^61 visits
                continue
            walked.add(id(x))
        if isinstance(x, torch.Tensor):
            storage = x.untyped_storage()
            key = (storage.data_ptr(), storage.nbytes())
            if storage.nbytes() and key not in seen:
                seen.add(key)
                total += storage.nbytes()
        elif isinstance(x, dict):
            stack += [*x.keys(), *x.values()]
        elif isinstance(x, (list, tuple, set, frozenset)):
            stack += list(x)
    return len(seen), total


def load_weights_state(path: str | Path, what: str, expected: dict[str, tuple[int, ...]], *,
                       prefix: str = "") -> dict[str, Tensor]:
    """The tensors named in `expected` (keys without `prefix`) from a torch.save file of a state dict (or
    {"state_dict": ...}), each of the expected shape and finite; anything else is a one-line DASRError
    naming the file. Keys not in `expected` are ignored (a classifier head, say)."""
    path = Path(path)
    state = load_torch_file(path, what, legacy=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise DASRError(f"{path}: not a {what} (it holds no state dict)")
    out = {}
    for key, shape in expected.items():
        t = state.get(prefix + key)
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise DASRError(f"{path}: not a {what}: no tensor {prefix + key!r}")
        if tuple(t.shape) != shape:
            raise DASRError(f"{path}: not a {what}: {prefix + key!r} is {tuple(t.shape)}, not {shape}")
        out[key] = t
    refuse_non_finite(out, f"{path}: refused: its weight")
    return {key: t.float() for key, t in out.items()}


def _check_zip(path: Path, f: BinaryIO, what: str) -> None:
    """Refuse a zip that could unpack to more than the file holds, before torch.load allocates anything.

    torch.save stores its entries uncompressed, so torch.load's memory is about the file's size; a
    deflated entry could claim gigabytes in a few megabytes (torch inflates it to the size it claims).
    The central directory is read with the zipfile module, its size bounded first.
    """
    size = os.fstat(f.fileno()).st_size
    offset = _directory(path, f, size, what)
    try:
        f.seek(0)
        with zipfile.ZipFile(f) as archive:
            _check_entries(path, what, archive, offset, size)
            # torch unpickles the archive's data.pkl: every pickle in it is scanned first (each is stored, so
            # no larger than the file)
            pickles = [archive.read(entry) for entry in archive.infolist() if entry.filename.endswith(".pkl")]
    except DASRError:
        raise
    except (zipfile.BadZipFile, ValueError, EOFError, NotImplementedError):  # a name not UTF-8, a zip version
        raise DASRError(f"{path}: not a readable {what} (damaged or truncated)") from None
    for pickled in pickles:
        _check_pickle(io.BytesIO(pickled), path, what)


def _check_entries(path: Path, what: str, archive: zipfile.ZipFile, offset: int, size: int) -> None:
    """Refuse an archive whose entries could unpack to more than the file holds (`offset`: where
    _directory found the central directory)."""
    entries, start = archive.infolist(), archive.start_dir
    # zipfile finds the directory by its own rules, torch's reader (miniz) by the offsets the end records
    # state: both must find the one directory _directory located, or a harmless one could be checked here
    # and another one loaded
    if start != offset:
        raise DASRError(f"{path}: refused: its zip directory is not where its end records say")
    total = 0
    for entry in entries:
        if entry.header_offset + entry.compress_size > start:  # every entry's bytes lie before the directory
            raise DASRError(f"{path}: refused: its entry {entry.filename[:80]!r} runs past the zip's data")
        if entry.compress_type != zipfile.ZIP_STORED or entry.compress_size != entry.file_size:
            raise DASRError(f"{path}: refused: its entry {entry.filename[:80]!r} is compressed (torch.save stores "
                            "entries uncompressed; a compressed one can unpack to far more than the file)")
        total += entry.file_size
    if total > size:
        raise DASRError(f"{path}: refused: its entries unpack to {total} bytes, more than the file's {size}")


_EOCD, _LOCATOR, _ZIP64 = struct.Struct("<4s4H2IH"), struct.Struct("<4sIQI"), struct.Struct("<4sQ2H2I4Q")


def _directory(path: Path, f: BinaryIO, size: int, what: str) -> int:
    """The offset of the zip's central directory, from a layout as torch.save writes it and nothing
    looser: the end record last (no comment), before it the zip64 locator and the zip64 record it points
    to (or neither), and the directory ending where they begin; the 32-bit and 64-bit records agree."""
    def refuse(why: str) -> DASRError:
        return DASRError(f"{path}: refused: {why} (not laid out as torch.save writes a {what})")

    if size < _EOCD.size:
        raise DASRError(f"{path}: not a readable {what} (damaged or truncated)")
    f.seek(size - _EOCD.size)
    sig, disk, cd_disk, n_here, n_total, cd_size, cd_offset, comment = _EOCD.unpack(f.read(_EOCD.size))
    if sig != b"PK\x05\x06":  # cut short (a kill during a copy, a full disk), or not a zip at all
        raise DASRError(f"{path}: not a readable {what} (damaged or truncated)")
    if comment or disk or cd_disk or n_here != n_total:
        raise refuse("its zip end record has a comment or names other disks")
    end = size - _EOCD.size  # where the directory must end
    tail = size - _EOCD.size - _LOCATOR.size - _ZIP64.size
    if tail >= 0:
        f.seek(tail)
        record, locator = f.read(_ZIP64.size), f.read(_LOCATOR.size)
        if locator[:4] == b"PK\x06\x07":
            _, z_disk, z_offset, disks = _LOCATOR.unpack(locator)
            fields = _ZIP64.unpack(record)
            if z_disk or disks != 1 or z_offset != tail or fields[0] != b"PK\x06\x06" or fields[1] != 44:
                raise refuse("its zip64 records are not where its locator says")
            _, z_n_total, z_size, z_offset_cd = fields[6:10]
            for short, full, saturated in ((n_total, z_n_total, 0xFFFF), (cd_size, z_size, 0xFFFFFFFF),
                                           (cd_offset, z_offset_cd, 0xFFFFFFFF)):
                if short not in (full, saturated):
                    raise refuse("its zip and zip64 end records disagree")
            cd_size, cd_offset, end = z_size, z_offset_cd, tail
    if cd_size > MAX_ZIP_DIRECTORY:
        raise DASRError(f"{path}: refused: its zip directory is {cd_size} bytes (a {what} needs under "
                        f"{MAX_ZIP_DIRECTORY})")
    if cd_offset + cd_size != end:
        raise refuse("its zip directory does not end where its end records begin")
    return cd_offset


def is_torch_file(path: str | os.PathLike) -> bool:
    """True if the file starts as torch.save writes one (a zip archive, or the legacy format's magic)."""
    try:
        with open_regular(Path(path)) as f:
            head = f.read(len(LEGACY_MAGIC))
    except (OSError, DASRError):
        return False
    return head[:4] == ZIP_MAGIC or head == LEGACY_MAGIC


def open_regular(path: Path) -> BinaryIO:
    """degrade.io.open_regular (a regular file, opened non-blocking and checked again), its refusal a
    DASRError; a missing or unreadable file is the OSError it is."""
    try:
        return open_regular_file(path)
    except ImageError:
        raise DASRError(f"{path}: not a regular file") from None


def checkpoint_step(path: Path) -> int:
    """The step of RUN/ckpt-STEP.pt."""
    m = CHECKPOINT.fullmatch(path.name)
    if m is None:
        raise DASRError(f"{path}: not named ckpt-STEP.pt")
    return int(m.group(1))


def list_checkpoints(out: Path) -> list[Path]:
    """RUN/ckpt-STEP.pt files, oldest step first (other names, e.g. ckpt-best.pt, are not ours)."""
    return sorted((p for p in Path(out).glob("ckpt-*.pt") if CHECKPOINT.fullmatch(p.name)), key=checkpoint_step)


def latest_checkpoint(out: Path) -> Path | None:
    ckpts = list_checkpoints(out)
    return ckpts[-1] if ckpts else None


def latest_intact(out: Path, warn: Callable[[str], None] | None = None) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that reads, and its contents; each damaged or vanished newer one is reported to
    `warn`."""
    for path in reversed(list_checkpoints(out)):
        try:
            ckpt = load_checkpoint(path)
            if str(ckpt["step"]) != (CHECKPOINT.fullmatch(path.name).group(1).lstrip("0") or "0"):  # (as text)
                raise DASRError(f"{path}: it holds step {ckpt['step']}, not its name's (a copy or a mix-up)")
            return path, ckpt
        except DASRError as exc:
            if warn is not None:
                warn(f"skipping {path.name}: {str(exc).split(': ', 1)[-1]}")
        except FileNotFoundError:  # gone since the listing (a run's pruning) or a link to nothing
            if warn is not None:
                warn(f"skipping {path.name}: not there (removed, or a link to nothing)")
    return None


def prune_checkpoints(out: Path, keep: int) -> list[Path]:
    """Delete all but the `keep` newest ckpt-*.pt (0 keeps all); returns what was deleted."""
    ckpts = list_checkpoints(out)
    doomed = ckpts[:-keep] if 0 < keep < len(ckpts) else []
    for path in doomed:
        path.unlink(missing_ok=True)
    return doomed
