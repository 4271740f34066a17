"""Training shards: reproducible, resumable HDF5 files of (HR patch, LR patch, v, params).

Format (docs/dataset-format.md is the public contract): ``DIR/shard-00000.h5, ...`` plus
``DIR/manifest.json``. Sample ``i`` of a dataset depends only on (seed, i) and the sources: its
random stream is ``SeedSequence(seed, spawn_key=(i,))``, from which it draws, in this order, the
source image (uniform over usable images), the crop position (uniform), then the degradation
parameters. So the output is the same for any number of workers, and any sample can be
regenerated alone.

Libraries print nothing: progress is reported through a callback; the CLI draws the bar.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import queue
import stat
import sys
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import NDArray

from degrade.allocator import tune_allocator
from degrade.errors import DatasetError, DegradeError
from degrade.io import (
    ImageError,
    decode_image,
    max_file_bytes,
    pixel_limit,
    read_image,
    read_regular_file,
    to_uint8,
    write_bytes_atomic,
)
from degrade.params import DegradationParams, sample_params
from degrade.pipeline import SCALE, apply
from degrade.recipe import LEVELS, MIX_PROBS, LevelChoice, parse_level
from degrade.samples import sample_dir, sample_images
from degrade.sharpen import unsharp_mask
from degrade.vector import VECTOR_LAYOUT, VECTOR_LENGTH, encode

FORMAT_NAME = "degrade-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
COMPRESSIONS = ("none", "lzf", "gzip")
CHUNK = 16  # samples per unit of parallel work
BUNDLED = "<bundled>"  # source root of the bundled sample photos


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.h5"


def sample_rng(seed: int, index: int) -> np.random.Generator:
    """The random stream of global sample `index` of a dataset made with `seed`."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index,)))


# --- sources ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """One usable source image: its path relative to the source root, content hash and size."""

    path: str
    sha256: str
    height: int
    width: int


@dataclass
class SourceScan:
    """What a scan of the SRC arguments found."""

    root: str
    sources: list[Source]
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    too_small: list[str] = field(default_factory=list)


def list_source_files(srcs: Sequence[str | os.PathLike]) -> list[Path]:
    """Files named directly, plus image files under folders (recursive), in a stable sorted order."""
    found: list[Path] = []
    for src in srcs:
        p = Path(src)
        if p.is_dir():
            found += sorted(
                (f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES),
                key=lambda f: f.relative_to(p).as_posix(),
            )
        elif p.exists():
            found.append(p)
        else:
            raise DatasetError(f"{p}: no such file or folder")
    unique: dict[Path, Path] = {}
    for f in found:
        unique.setdefault(f.resolve(), f)
    return list(unique.keys())


def scan_sources(srcs: Sequence[str | os.PathLike], patch_size: int,
                 progress: Callable[[int, int], None] | None = None) -> SourceScan:
    """Decode every candidate once: keep readable images with both sides >= `patch_size`.

    No SRC means the bundled sample photos. Paths are stored relative to the sources' common folder.
    """
    if srcs:
        files = list_source_files(srcs)
        root = Path(os.path.commonpath([f.parent for f in files])) if files else Path(".")
        root_text = str(root)
    else:
        files = [p.resolve() for p in sample_images()]
        root, root_text = sample_dir().resolve(), BUNDLED
    if not files:
        raise DatasetError("no source images found (looked for " + ", ".join(IMAGE_SUFFIXES) + ")")
    scan = SourceScan(root=root_text, sources=[])
    for n, f in enumerate(files):
        rel = f.relative_to(root).as_posix()
        try:
            data = read_regular_file(f, max_file_bytes())  # never a FIFO or device; bounded size
            img = decode_image(data)  # the same decoding and checks (pixel cap first) as the workers' read_image
        except OSError as exc:
            scan.unreadable.append((rel, exc.strerror or str(exc)))
        except ImageError as exc:
            scan.unreadable.append((rel, str(exc).removeprefix(f"{f}: ")))  # the reason, without the path
        else:
            h, w = img.shape[:2]
            if min(h, w) < patch_size:
                scan.too_small.append(rel)
            else:
                scan.sources.append(Source(rel, hashlib.sha256(data).hexdigest(), h, w))
        if progress:
            progress(n + 1, len(files))
    return scan


def resolve_source(root: str, rel: str) -> Path:
    """The file of a recorded source path, refusing paths that would leave the recorded root."""
    base = sample_dir().resolve() if root == BUNDLED else Path(root).resolve()
    candidate = Path(rel)
    if candidate.is_absolute() or ".." in candidate.parts:
        raise DatasetError(f"refusing source path {rel!r}: it must be relative and inside {base}")
    path = (base / candidate).resolve()
    if base not in path.parents:
        raise DatasetError(f"refusing source path {rel!r}: it resolves outside {base}")
    return path


SOURCE_CACHE_BYTES = 1 << 30  # decoded source images kept per process (LRU by size)
_source_cache: OrderedDict[str, NDArray[np.uint8]] = OrderedDict()


def _load_source_u8(path: str) -> NDArray[np.uint8]:
    """A source image as 8-bit RGB (16-bit rounded to 8 bit, gray copied, alpha dropped).

    Decoded images stay in a per-process LRU cache of up to SOURCE_CACHE_BYTES, so a corpus that
    fits is decoded once per worker; beyond that, decoding a source costs once per sample.
    """
    image = _source_cache.pop(path, None)
    if image is None:
        image = to_uint8(read_image(path))
        image.setflags(write=False)
    _source_cache[path] = image
    total = sum(a.nbytes for a in _source_cache.values())
    while total > SOURCE_CACHE_BYTES and len(_source_cache) > 1:
        total -= _source_cache.popitem(last=False)[1].nbytes
    return image


# --- configuration and per-sample generation -----------------------------------------------------


@dataclass(frozen=True)
class DatasetConfig:
    """Everything that determines a dataset's bytes (the worker count does not)."""

    level: LevelChoice
    count: int
    patch_size: int
    seed: int
    shard_size: int
    compression: str
    source_root: str
    sources: tuple[Source, ...]
    sharpen_hr: bool = False  # degrade the unsharp-masked HR (degrade.sharpen); the stored HR stays plain

    def __post_init__(self) -> None:
        if self.count < 1:
            raise DatasetError(f"--count must be >= 1, got {self.count}")
        if self.patch_size < 32 or self.patch_size % SCALE:
            raise DatasetError(f"--patch-size must be a multiple of {SCALE} and >= 32, got {self.patch_size}")
        if self.shard_size < 1:
            raise DatasetError(f"--shard-size must be >= 1, got {self.shard_size}")
        if self.compression not in COMPRESSIONS:
            raise DatasetError(f"--compression must be one of {', '.join(COMPRESSIONS)}, got {self.compression!r}")
        if not self.sources:
            raise DatasetError("no usable source images (all unreadable or smaller than the patch)")

    @property
    def shard_count(self) -> int:
        return -(-self.count // self.shard_size)

    def shard_range(self, k: int) -> range:
        return range(k * self.shard_size, min(self.count, (k + 1) * self.shard_size))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["sources"] = [asdict(s) for s in self.sources]
        if not self.sharpen_hr:  # absent when off: datasets made before the option keep their bytes and resume
            del d["sharpen_hr"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DatasetConfig:
        try:
            return cls(
                level=parse_level(d["level"]),
                count=int(d["count"]),
                patch_size=int(d["patch_size"]),
                seed=int(d["seed"]),
                shard_size=int(d["shard_size"]),
                compression=str(d["compression"]),
                source_root=str(d["source_root"]),
                sources=tuple(Source(str(s["path"]), str(s["sha256"]), int(s["height"]), int(s["width"]))
                              for s in d["sources"]),
                sharpen_hr=_strict_bool(d.get("sharpen_hr", False)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DatasetError(f"malformed dataset configuration: {exc}") from None

    def source_path(self, i: int) -> Path:
        return resolve_source(self.source_root, self.sources[i].path)


def _strict_bool(raw: Any) -> bool:
    if not isinstance(raw, bool):
        raise ValueError(f"sharpen_hr must be true or false, got {raw!r}")
    return raw


class Sample(NamedTuple):
    """One stored sample: HR (P, P, 3) uint8, LR (P/4, P/4, 3) uint8, v (33,) float32, its record."""

    hr: NDArray[np.uint8]
    lr: NDArray[np.uint8]
    v: NDArray[np.float32]
    params: DegradationParams


def draw_sample(config: DatasetConfig, index: int) -> tuple[int, tuple[int, int], DegradationParams]:
    """Sample `index`'s source, crop corner (y, x) and record, from its own stream only."""
    rng = sample_rng(config.seed, index)
    src = int(rng.integers(len(config.sources)))
    s = config.sources[src]
    y = int(rng.integers(s.height - config.patch_size + 1))
    x = int(rng.integers(s.width - config.patch_size + 1))
    return src, (y, x), sample_params(config.level, rng)


def make_sample(config: DatasetConfig, index: int) -> tuple[int, tuple[int, int], Sample]:
    src, (y, x), params = draw_sample(config, index)
    image = _load_source_u8(str(config.source_path(src)))
    p = config.patch_size
    if image.shape[0] < y + p or image.shape[1] < x + p:
        raise DatasetError(f"{config.sources[src].path}: changed since it was scanned (smaller now)")
    hr = np.ascontiguousarray(image[y : y + p, x : x + p])
    source = hr.astype(np.float32) / np.float32(255)
    lr = to_uint8(apply(unsharp_mask(source) if config.sharpen_hr else source, params))
    return src, (y, x), Sample(hr, lr, encode(params), params)


def make_chunk(config: DatasetConfig, indices: range, *, worker: bool = False) -> dict[str, Any]:
    """Samples `indices` as arrays ready to store; `worker`: running in a worker process of ours."""
    if worker:
        tune_allocator()
    n, p = len(indices), config.patch_size
    out: dict[str, Any] = {
        "hr": np.empty((n, p, p, 3), np.uint8),
        "lr": np.empty((n, p // SCALE, p // SCALE, 3), np.uint8),
        "v": np.empty((n, VECTOR_LENGTH), np.float32),
        "level": np.empty(n, np.uint8),
        "index": np.asarray(indices, np.int64),
        "source": np.empty(n, np.int32),
        "crop": np.empty((n, 4), np.int32),
        "params": [],
    }
    for j, i in enumerate(indices):
        src, (y, x), s = make_sample(config, i)
        out["hr"][j], out["lr"][j], out["v"][j] = s.hr, s.lr, s.v
        out["level"][j] = s.params.level
        out["source"][j] = src
        out["crop"][j] = (y, x, p, p)
        out["params"].append(s.params.to_json())
    return out


# --- writing --------------------------------------------------------------------------------------


def _sha256_file(path: Path, limit: int | None = None) -> str:
    """SHA-256 of a regular file, read in 4 MiB blocks; DatasetError for anything else or above `limit` bytes."""
    info = os.stat(path)
    if not stat.S_ISREG(info.st_mode):
        raise DatasetError(f"{path}: not a regular file")
    if limit is not None and info.st_size > limit:
        raise DatasetError(f"{path}: {info.st_size} bytes, above the {limit}-byte limit")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def shard_path(out: Path, name: str) -> Path:
    """DIR/name for a shard file named by a manifest: a plain name, and not a link that leaves DIR."""
    path = out / name
    if Path(name).name != name or name in ("", ".", "..") or path.resolve().parent != out.resolve():
        raise DatasetError(f"{out}: refusing shard file {name!r}: shard files must lie inside the dataset folder")
    return path


def _recipes_json(level: LevelChoice) -> str:
    levels = [1, 2, 3] if level == "mix" else [level]
    data: dict[str, Any] = {str(lv): LEVELS[lv].to_dict() for lv in levels}
    if level == "mix":
        data["mix_probs"] = {str(k): v for k, v in MIX_PROBS.items()}
    return json.dumps(data, sort_keys=True)


def _write_shard(path: Path, config: DatasetConfig, k: int, chunks: Iterator[dict[str, Any]],
                 on_chunk: Callable[[dict[str, Any]], None]) -> None:
    """Write shard k to `path` from its chunks, in order."""
    import h5py

    from degrade import __version__

    rows = config.shard_range(k)
    n, p, q = len(rows), config.patch_size, config.patch_size // SCALE
    comp = {} if config.compression == "none" else {"compression": config.compression}
    text = h5py.string_dtype("utf-8")
    # Not `with h5py.File(...)`: h5py 3.16 reports some failed writes (disk full) only as "exception
    # ignored" while it frees temporaries, then cannot close the file, and segfaults at interpreter exit
    # while finalising the half-closed datasets. So: record those swallowed errors, and on any error
    # free the file's blocks, release the datasets while the file is open, then close it.
    swallowed: list[BaseException] = []
    previous_hook = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        if isinstance(unraisable.exc_value, (OSError, RuntimeError)):
            swallowed.append(unraisable.exc_value)
        else:
            previous_hook(unraisable)

    sys.unraisablehook = hook
    f = h5py.File(path, "w", libver=("earliest", "v110"))
    sets: dict[str, Any] = {}
    try:

        def dataset(name, shape, dtype, chunk, compressed=False):
            return f.create_dataset(name, shape=shape, dtype=dtype, chunks=chunk, track_times=False,
                                    **(comp if compressed else {}))

        sets.update(hr=dataset("hr", (n, p, p, 3), np.uint8, (1, p, p, 3), True),
                    lr=dataset("lr", (n, q, q, 3), np.uint8, (1, q, q, 3), True),
                    v=dataset("v", (n, VECTOR_LENGTH), np.float32, None),
                    level=dataset("level", (n,), np.uint8, None),
                    index=dataset("index", (n,), np.int64, None),
                    source=dataset("source", (n,), np.int32, None),
                    crop=dataset("crop", (n, 4), np.int32, None),
                    params=dataset("params", (n,), text, None))
        f.create_dataset("sources", data=np.array([s.path for s in config.sources], dtype=text), track_times=False)
        f.attrs["format"] = FORMAT_NAME
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["vector_layout"] = VECTOR_LAYOUT
        f.attrs["recipes"] = _recipes_json(config.level)
        f.attrs["package_version"] = __version__
        f.attrs["command"] = json.dumps({k_: v_ for k_, v_ in config.to_dict().items() if k_ != "sources"},
                                        sort_keys=True)
        f.attrs["source_root"] = config.source_root
        f.attrs["shard"] = k
        f.attrs["first_index"] = rows.start
        at = 0
        for chunk in chunks:
            m = len(chunk["index"])
            sl = slice(at, at + m)
            for name, target in sets.items():
                target[sl] = chunk[name]
            _raise_swallowed(swallowed)
            at += m
            on_chunk(chunk)
        if at != n:
            raise RuntimeError(f"shard {k}: wrote {at} samples, expected {n}")
        f.flush()
        _raise_swallowed(swallowed)
        sets.clear()
        f.close()
        _raise_swallowed(swallowed)
    except BaseException as exc:
        if isinstance(exc, OSError) or swallowed:
            _discard_h5(f, path, sets)
        else:  # an interruption or a failed sample, not a failed write: close as usual
            sets.clear()
            f.close()
        raise
    finally:
        sys.unraisablehook = previous_hook


def _raise_swallowed(errors: list[BaseException]) -> None:
    if errors:
        exc = errors[0]
        raise exc if isinstance(exc, OSError) else OSError(getattr(exc, "errno", None), " ".join(str(exc).split()))


_ABANDONED: list[Any] = []  # h5py objects of shards that failed to write (see _discard_h5)


def abandoned_writes() -> int:
    """How many shard writes failed in this process so far. After one, HDF5 may crash while the
    interpreter finalises the abandoned objects, so a command-line program should end with os._exit."""
    return len(_ABANDONED)


def _discard_h5(f: Any, path: Path, sets: dict[str, Any]) -> None:
    """Abandon a shard after a failed write, even on a full disk (its content is discarded).

    Truncating frees the file's blocks. The h5py objects are kept, unclosed, until the process ends:
    closing them after a failed write fails, and finalising them later crashes HDF5.
    """
    with contextlib.suppress(OSError):
        os.truncate(path, 0)
    _ABANDONED.append((f, dict(sets)))
    sets.clear()


def _chunk_ranges(rows: range) -> list[range]:
    return [range(s, min(s + CHUNK, rows.stop)) for s in range(rows.start, rows.stop, CHUNK)]


@dataclass
class MakeReport:
    """What a make-dataset run did."""

    made: int = 0  # samples generated in this run
    reused_shards: int = 0
    level_counts: dict[int, int] = field(default_factory=lambda: {1: 0, 2: 0, 3: 0})
    seconds: float = 0.0
    bytes_on_disk: int = 0


def _manifest(config: DatasetConfig, shards: dict[int, dict[str, Any]]) -> dict[str, Any]:
    from degrade import __version__

    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "vector_layout": VECTOR_LAYOUT,
        "package_version": __version__,
        "config": config.to_dict(),
        "shards": [shards[k] for k in sorted(shards)],
        "complete": len(shards) == config.shard_count,
    }


def _save_manifest(out: Path, config: DatasetConfig, shards: dict[int, dict[str, Any]]) -> None:
    text = json.dumps(_manifest(config, shards), indent=1, sort_keys=True) + "\n"
    path = out / MANIFEST
    if path.is_file() and path.read_text() == text:
        return
    write_bytes_atomic(path, text.encode())


MAX_MANIFEST_BYTES = 256 << 20  # a manifest listing a million sources is about 120 MB


def read_manifest(out: Path) -> dict[str, Any]:
    """DIR/manifest.json, checked: a manifest is data from a file, so its shard list must be exactly
    what its configuration implies (names, first indices, counts) before anything is opened."""
    path = out / MANIFEST
    try:
        text = read_regular_file(path, MAX_MANIFEST_BYTES).decode("utf-8")
        data = json.loads(text)
    except ImageError as exc:
        if not path.exists() and not path.is_symlink():
            raise DatasetError(f"{out}: no {MANIFEST}: not a dataset folder") from None
        raise DatasetError(f"{path}: unreadable manifest ({str(exc).removeprefix(f'{path}: ')})") from None
    except OSError as exc:
        raise DatasetError(f"{path}: unreadable manifest ({exc.strerror or exc})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{path}: unreadable manifest ({exc})") from None
    except RecursionError:
        raise DatasetError(f"{path}: unreadable manifest (JSON nested too deeply)") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise DatasetError(f"{path}: not a {FORMAT_NAME} manifest")
    if data.get("format_version") != FORMAT_VERSION:
        raise DatasetError(f"{path}: format version {data.get('format_version')} (this code reads {FORMAT_VERSION})")
    shards = data.get("shards")
    keys = {"shard", "file", "first_index", "count", "bytes", "sha256"}
    ok = (isinstance(data.get("config"), dict) and isinstance(data.get("complete"), bool) and isinstance(shards, list)
          and all(isinstance(e, dict) and keys <= set(e) and isinstance(e["file"], str)
                  and all(_is_int(e[k]) for k in ("shard", "first_index", "count", "bytes"))
                  and isinstance(e["sha256"], str) for e in shards))
    if not ok:
        raise DatasetError(f"{path}: malformed manifest (missing or mistyped keys)")
    config = DatasetConfig.from_dict(data["config"])  # raises DatasetError when malformed
    seen: set[int] = set()
    for e in shards:
        k = e["shard"]
        rows = config.shard_range(k) if 0 <= k < config.shard_count else range(0)
        if (k in seen or not rows or e["file"] != shard_name(k) or e["first_index"] != rows.start
                or e["count"] != len(rows) or e["bytes"] < 0 or len(e["sha256"]) != 64):
            raise DatasetError(f"{path}: shard entry {k!r} does not match the configuration "
                               f"(file {e['file']!r}, first index {e['first_index']}, count {e['count']})")
        seen.add(k)
    if data["complete"] != (len(seen) == config.shard_count):
        raise DatasetError(f"{path}: says complete={data['complete']} but lists {len(seen)} of "
                           f"{config.shard_count} shards")
    return data


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _config_difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    diffs = []
    for key in new:
        if key == "sources":
            if old.get(key) != new[key]:
                diffs.append("the source images")
        elif old.get(key) != new[key]:
            diffs.append(f"{key} {old.get(key)!r} -> {new[key]!r}")
    return ", ".join(diffs)


def make_dataset(config: DatasetConfig, out: str | os.PathLike, *, jobs: int = 1,
                 progress: Callable[[int], None] | None = None, backend: str | None = None) -> MakeReport:
    """Write (or finish) the dataset `config` in folder `out`; returns what was done.

    Shards are written under a temporary name and renamed when complete; the manifest is rewritten
    after every shard. Re-running with the same config finishes only what is missing, giving the same
    bytes as an uninterrupted run. A different config for an existing dataset raises DatasetError.
    `progress(n)` is called with the number of samples just made (or found complete). `jobs` is the
    number of degrading workers: 1 is a thread of this process, more are worker processes; this
    process writes the shards meanwhile.
    """
    out = Path(out)
    start = time.perf_counter()
    report = MakeReport()
    shards: dict[int, dict[str, Any]] = {}
    if out.exists() and not out.is_dir():
        raise DatasetError(f"{out}: exists and is not a folder")
    if not (out / MANIFEST).exists() and out.exists() and any(p.name != LOCK for p in out.iterdir()):
        raise DatasetError(f"{out}: folder is not empty and holds no {MANIFEST}; choose a new --out")
    out.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as held:
        held.enter_context(_exclusive_lock(out))
        if (out / MANIFEST).exists():
            old = read_manifest(out)
            if old["config"] != config.to_dict():
                raise DatasetError(
                    f"{out} holds a dataset made by a different command "
                    f"({_config_difference(old['config'], config.to_dict())}); use a new --out or the original options"
                )
            shards = {int(s["shard"]): s for s in old["shards"]}
        _make(config, out, shards, report, jobs, progress, backend)
    report.seconds = time.perf_counter() - start
    report.bytes_on_disk = sum(s["bytes"] for s in shards.values())
    return report


LOCK = ".lock"


@contextlib.contextmanager
def _exclusive_lock(out: Path) -> Iterator[None]:
    """Hold DIR/.lock exclusively (POSIX flock) so two runs never write one dataset at once."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking
        yield
        return
    with open(out / LOCK, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DatasetError(f"{out}: another make-dataset run is writing this dataset") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _make(config: DatasetConfig, out: Path, shards: dict[int, dict[str, Any]], report: MakeReport, jobs: int,
          progress: Callable[[int], None] | None, backend: str | None) -> None:
    for stale in out.glob(".shard-*.partial"):
        stale.unlink()  # left by an interrupted run; never looks complete

    todo = []
    for k in range(config.shard_count):
        path = out / shard_name(k)
        entry = shards.get(k)
        if entry is not None and path.is_file() and _sha256_file(path) == entry["sha256"]:
            report.reused_shards += 1
            if progress:
                progress(entry["count"])
            continue
        shards.pop(k, None)
        todo.append(k)
    _save_manifest(out, config, shards)  # writes only if it changed

    def count(chunk: dict[str, Any]) -> None:
        report.made += len(chunk["index"])
        for lv in chunk["level"]:
            report.level_counts[int(lv)] += 1
        if progress:
            progress(len(chunk["index"]))

    with _chunk_runner(jobs, backend, config) as run_chunks:
        for k in todo:
            final, tmp = out / shard_name(k), out / f".{shard_name(k)}.partial"
            _check_free_space(out, config, k)
            try:
                _write_shard(tmp, config, k, run_chunks(config, _chunk_ranges(config.shard_range(k))), count)
                os.replace(tmp, final)
            except OSError as exc:  # disk full, quota, I/O error: earlier shards stay valid, so say how to resume
                tmp.unlink(missing_ok=True)
                raise DatasetError(f"{final}: cannot write ({_os_reason(exc)}); the shards written so far are "
                                   "kept: fix the cause and run the same command again to resume") from None
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            shards[k] = {"shard": k, "file": final.name, "first_index": config.shard_range(k).start,
                         "count": len(config.shard_range(k)), "bytes": final.stat().st_size,
                         "sha256": _sha256_file(final)}
            _save_manifest(out, config, shards)


PARAMS_JSON_BYTES = 1024  # more than any record's JSON (about 600 bytes at level 3)


def shard_bytes_bound(config: DatasetConfig, k: int) -> int:
    """An upper bound of shard k's file size: uncompressed pixels (+1 % for filters that do not
    shrink a chunk), per-sample metadata, the source table and 1 MiB of HDF5 structure."""
    n, p, q = len(config.shard_range(k)), config.patch_size, config.patch_size // SCALE
    pixels = n * 3 * (p * p + q * q)
    per_sample = VECTOR_LENGTH * 4 + 1 + 8 + 4 + 16 + PARAMS_JSON_BYTES + 64  # v, level, index, source, crop, params
    table = sum(len(s.path.encode()) + 32 for s in config.sources)
    return pixels + pixels // 100 + n * per_sample + table + (1 << 20)


def _check_free_space(out: Path, config: DatasetConfig, k: int) -> None:
    """Refuse to start shard k when the disk cannot hold it: h5py does not survive a full disk mid-write
    (a failed write leaves a file it cannot close; see _write_shard)."""
    try:
        st = os.statvfs(out)
    except (OSError, AttributeError):  # not POSIX: write and rely on _write_shard's error path
        return
    free, need = st.f_bavail * st.f_frsize, shard_bytes_bound(config, k)
    if free < need:
        raise DatasetError(f"{out}: not enough free space for {shard_name(k)} (needs up to {need / 1e6:.1f} MB, "
                           f"{free / 1e6:.1f} MB free); the shards written so far are kept: free some space and run "
                           "the same command again to resume")


def _os_reason(exc: OSError) -> str:
    """The reason of an OSError in one line (h5py's messages span lines and repeat the file name)."""
    if exc.errno:
        return os.strerror(exc.errno)
    return " ".join(str(exc).split())


_installed_config: DatasetConfig | None = None


def _install_config(config: DatasetConfig, parent: int | None = None) -> None:
    """Worker-process initialiser: keep the dataset config for the chunks this worker will make, and
    end this worker when `parent` (the process that writes the shards) is gone."""
    global _installed_config
    _installed_config = config
    tune_allocator()
    if parent is not None:
        watch_parent(parent)


PARENT_POLL_SECONDS = 0.5


def watch_parent(parent: int) -> None:
    """End this process (os._exit) within PARENT_POLL_SECONDS once process `parent` is no longer its parent.

    loky's workers outlive a parent killed with SIGKILL or SIGTERM (they were seen alive, ~270 MB each,
    20 minutes later); an orphan is re-parented, so its parent id changes.
    """

    def poll() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_SECONDS)
        os._exit(1)

    if os.getppid() != parent:
        os._exit(1)
    threading.Thread(target=poll, name="degrade-parent-watch", daemon=True).start()


def _make_installed_chunk(indices: range) -> dict[str, Any]:
    assert _installed_config is not None, "worker started without a dataset config"
    return make_chunk(_installed_config, indices)


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


def _prefetched(items: Iterator[Any], depth: int) -> Iterator[Any]:
    """Iterate `items` in a background thread, at most `depth` ahead of the consumer."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(done)
        except BaseException as exc:  # handed to the consumer, raised there
            put(_Failure(exc))

    thread = threading.Thread(target=produce, name="degrade-producer", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, _Failure):
                raise item.exc
            yield item
    finally:
        stop.set()
        thread.join()


class _chunk_runner:
    """Context manager giving `run(config, ranges) -> iterator of chunks, in order`.

    The caller writes the chunks (h5py releases the GIL while it compresses and writes).
    jobs == 1 computes in a background thread of this process, a few chunks ahead of the writer;
    jobs >= 2 computes in that many worker processes (loky), up to 2 * jobs + 1 chunks in flight.
    `backend` (e.g. "dask") hands the chunks to joblib's backend of that name instead.
    """

    def __init__(self, jobs: int, backend: str | None, config: DatasetConfig):
        if jobs < 1:
            raise DatasetError(f"jobs must be >= 1, got {jobs}")
        self.jobs, self.backend, self.config = jobs, backend, config
        self.parallel: Any = None
        self.executor: Any = None
        self.stack = contextlib.ExitStack()

    def __enter__(self):
        if self.backend:
            import joblib

            # parallel_config (not Parallel(backend=...)) registers external backends such as dask.
            self.stack.enter_context(joblib.parallel_config(backend=self.backend, n_jobs=max(self.jobs, 1)))
            self.parallel = self.stack.enter_context(joblib.Parallel(return_as="generator", pre_dispatch="2*n_jobs"))
        elif self.jobs >= 2:
            from joblib.externals.loky import get_reusable_executor

            # The config (with its possibly very long source list) goes to each worker once, at start-up;
            # tasks then carry only their index ranges. A different config restarts the workers.
            self.executor = get_reusable_executor(max_workers=self.jobs, initializer=_install_config,
                                                  initargs=(self.config, os.getpid()))
        return self.run

    def __exit__(self, *exc):
        if exc[0] is not None and self.executor is not None:  # after a failure, do not leave workers busy
            self.executor.shutdown(wait=True, kill_workers=True)
        return self.stack.__exit__(*exc)

    def run(self, config: DatasetConfig, ranges: list[range]) -> Iterator[dict[str, Any]]:
        if self.parallel is not None:
            import joblib

            yield from self.parallel(joblib.delayed(make_chunk)(config, r, worker=True) for r in ranges)
        elif self.executor is None:
            yield from _prefetched((make_chunk(config, r) for r in ranges), depth=2)
        else:
            pending = iter(ranges)
            window = deque(self.executor.submit(_make_installed_chunk, r)
                           for r in itertools.islice(pending, 2 * self.jobs + 1))
            try:
                while window:
                    result = window.popleft().result()
                    nxt = next(pending, None)
                    if nxt is not None:
                        window.append(self.executor.submit(_make_installed_chunk, nxt))
                    yield result
            finally:
                for future in window:
                    future.cancel()


# --- reading ------------------------------------------------------------------------------------


class ShardDataset:
    """Read access to a dataset folder (or one shard file): `len()`, indexing, iteration.

    `ds[i]` returns a :class:`Sample` (hr, lr, v, params). Files are opened lazily, once per
    process, so an instance can be handed to PyTorch DataLoader worker processes.
    """

    def __init__(self, path: str | os.PathLike, *, allow_incomplete: bool = False, checksums: bool = False):
        path = Path(path)
        self.patch_size: int | None = None
        if path.is_dir():
            manifest = read_manifest(path)  # shard names, first indices and counts checked against the config
            if not manifest["complete"] and not allow_incomplete:
                raise DatasetError(f"{path}: the dataset is incomplete; re-run the same make-dataset command")
            self.files = [shard_path(path, str(s["file"])) for s in manifest["shards"]]
            counts = [int(s["count"]) for s in manifest["shards"]]
            self.config: DatasetConfig | None = DatasetConfig.from_dict(manifest["config"])
            self.patch_size = self.config.patch_size
            digests = [str(s["sha256"]) for s in manifest["shards"]]
        elif path.is_file():
            self.files = [path]
            counts = [self._count_of(path)]
            self.config = None
            digests = []
        else:
            raise DatasetError(f"{path}: no such file or folder")
        for f in self.files:
            if not f.is_file():
                raise DatasetError(f"{f}: shard file is missing")
        if checksums:
            if not digests:
                raise DatasetError(f"{path}: a single shard file has no manifest checksum to compare with")
            for f, digest in zip(self.files, digests):
                if _sha256_file(f) != digest:
                    raise DatasetError(f"{f}: checksum differs from the manifest (damaged or altered)")
        self.counts = counts
        self.offsets = np.cumsum([0, *counts])
        self._pid: int | None = None
        self._handles: OrderedDict[int, Any] = OrderedDict()

    @staticmethod
    def _count_of(path: Path) -> int:
        import h5py

        try:
            with h5py.File(path, "r") as f:
                if f.attrs.get("format") != FORMAT_NAME:
                    raise DatasetError(f"{path}: not a {FORMAT_NAME} shard")
                return check_shard(f, path, count=None, patch_size=None)
        except OSError:
            raise DatasetError(f"{path}: not an HDF5 file") from None

    MAX_OPEN = 32  # shard files kept open per process (LRU); a dataset may have thousands

    def _handle(self, k: int) -> Any:
        """Shard k's open h5py file, opened lazily in this process (e.g. a DataLoader worker), its
        structure checked against the manifest before any data is read."""
        import h5py

        if self._pid != os.getpid():  # a fresh process: handles of the parent are not ours
            self._handles, self._pid = OrderedDict(), os.getpid()
        handle = self._handles.pop(k, None)
        if handle is None:
            try:
                handle = h5py.File(self.files[k], "r")
            except OSError as exc:
                raise DatasetError(f"{self.files[k]}: unreadable shard ({_os_reason(exc)})") from None
            try:
                check_shard(handle, self.files[k], count=self.counts[k], patch_size=self.patch_size)
            except BaseException:
                handle.close()
                raise
            while len(self._handles) >= self.MAX_OPEN:
                self._handles.popitem(last=False)[1].close()
        self._handles[k] = handle
        return handle

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, i: int) -> tuple[int, int]:
        """Global index -> (shard number, row in shard); negative indices count from the end."""
        n = len(self)
        if not -n <= i < n:
            raise SampleIndexError(f"sample {i} out of range: the dataset has {n} samples")
        i %= n
        k = int(np.searchsorted(self.offsets, i, side="right") - 1)
        return k, i - int(self.offsets[k])

    def __getitem__(self, i: int) -> Sample:
        k, row = self.locate(int(i))
        f = self._handle(k)
        return Sample(f["hr"][row], f["lr"][row], f["v"][row], DegradationParams.from_json(_text(f["params"][row])))

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self)):
            yield self[i]

    def column(self, name: str) -> Any:
        """A per-sample metadata dataset of every shard, concatenated: `v`, `level`, `index`,
        `source`, `crop` as arrays, `params` as a list of JSON strings."""
        if name not in ("v", "level", "index", "source", "crop", "params"):
            raise DatasetError(f"no per-sample metadata column {name!r}")
        parts = [self._handle(k)[name][:] for k in range(len(self.files))]
        if name == "params":
            return [_text(x) for part in parts for x in part]
        return np.concatenate(parts)

    def close(self) -> None:
        for h in self._handles.values():
            h.close()
        self._handles, self._pid = OrderedDict(), None

    def __getstate__(self) -> dict[str, Any]:  # open HDF5 handles do not cross processes
        state = self.__dict__.copy()
        state["_handles"], state["_pid"] = OrderedDict(), None
        return state


def _text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


def open_dataset(path: str | os.PathLike, *, allow_incomplete: bool = False, checksums: bool = False) -> ShardDataset:
    """Open a dataset folder (or a single shard file) written by :func:`make_dataset`.

    Always (cheap, metadata only): the manifest's shard list must match its configuration, and each
    shard's datasets must have the shapes and types the manifest implies before any is read.
    `checksums=True` also compares every shard's SHA-256 with the manifest now (reads each file once).
    """
    return ShardDataset(path, allow_incomplete=allow_incomplete, checksums=checksums)


class SampleIndexError(DatasetError, IndexError):
    """A sample index outside the dataset (an IndexError too, as sequences raise)."""


SHARD_ROW_BYTES = VECTOR_LENGTH * 4 + 1 + 8 + 4 + 16  # v, level, index, source, crop: stored contiguously


def check_shard(f: Any, path: Path, *, count: int | None, patch_size: int | None) -> int:
    """Check an open shard's datasets (shapes, types) before anything is read; returns its sample count.

    `count` and `patch_size` come from the manifest (None for a lone shard file: taken from the file).
    A shard must also be large enough to hold its own per-sample metadata, and a patch must be within
    the pixel cap, so a small file cannot declare arrays that would take gigabytes to read.
    """
    import h5py

    for key in SHARD_DATASETS:
        # Only plain datasets stored in this file: an external or soft link, external raw storage or a
        # virtual dataset would make reading open other files.
        if not isinstance(f.get(key, getlink=True), h5py.HardLink) or not isinstance(f[key], h5py.Dataset):
            raise DatasetError(f"{path}: not a {FORMAT_NAME} shard (dataset {key!r} missing or a link)")
        if f[key].external or f[key].is_virtual:
            raise DatasetError(f"{path}: dataset {key!r} keeps its data outside the file; refusing to read it")
    n = f["v"].shape[0] if count is None else count
    p = f["hr"].shape[1] if patch_size is None and f["hr"].ndim == 4 else patch_size
    if not isinstance(p, int) or p < 32 or p % SCALE or p * p > pixel_limit():
        raise DatasetError(f"{path}: patch size {p} is not a multiple of {SCALE} in [32, sqrt({pixel_limit()})]")
    q = p // SCALE
    expected = {"hr": ((n, p, p, 3), "u1"), "lr": ((n, q, q, 3), "u1"), "v": ((n, VECTOR_LENGTH), "f4"),
                "level": ((n,), "u1"), "index": ((n,), "i8"), "source": ((n,), "i4"), "crop": ((n, 4), "i4")}
    for key, (shape, dtype) in expected.items():
        ds = f[key]
        if ds.shape != shape or ds.dtype != np.dtype(dtype):
            raise DatasetError(f"{path}: {key} is {ds.dtype} {ds.shape}, expected {np.dtype(dtype)} {shape}")
    for key in ("hr", "lr"):  # one sample per chunk (or contiguous): reading a row decompresses one patch
        chunks = f[key].chunks
        if chunks is not None and chunks != (1, *f[key].shape[1:]):
            raise DatasetError(f"{path}: {key} is stored in chunks of {chunks}, expected one sample per chunk")
    params = f["params"]
    if params.shape != (n,) or h5py.check_string_dtype(params.dtype) is None:
        raise DatasetError(f"{path}: params is {params.dtype} {params.shape}, expected strings ({n},)")
    size = os.stat(path).st_size
    if n * SHARD_ROW_BYTES > size:
        raise DatasetError(f"{path}: declares {n} samples but its {size} bytes cannot hold them")
    return n


SHARD_DATASETS = ("hr", "lr", "v", "level", "index", "source", "crop", "params")


# --- verification ------------------------------------------------------------------------------


def verify_dataset(path: str | os.PathLike, *, regenerate: int = 0, seed: int = 0,
                   source_root: str | os.PathLike | None = None) -> list[str]:
    """Check a dataset folder; returns a list of problems (empty when all is well).

    Checks the manifest, every shard's checksum, structure, shapes, dtypes and value ranges, that
    each stored v equals the encoding of its stored record, and then re-creates `regenerate` random
    samples from their source, crop, seed and record, comparing bit for bit. `source_root` replaces
    the recorded source folder (for a dataset moved to another machine).
    """
    import h5py

    out = Path(path)
    manifest = read_manifest(out)
    config = DatasetConfig.from_dict(manifest["config"])
    if source_root is not None:
        config = DatasetConfig(**{**config.__dict__, "source_root": str(source_root)})
    problems: list[str] = []
    if not manifest["complete"]:
        problems.append("the dataset is incomplete (re-run the same make-dataset command to finish it)")
    seen = 0
    for entry in manifest["shards"]:
        name = str(entry["file"])
        try:
            f_path = shard_path(out, name)
        except DatasetError as exc:
            problems.append(str(exc))
            continue
        if not f_path.is_file():
            problems.append(f"{name}: missing")
            continue
        if _sha256_file(f_path) != entry["sha256"]:
            problems.append(f"{name}: checksum differs from the manifest")
        try:
            with h5py.File(f_path, "r") as f:
                rows = config.shard_range(int(entry["shard"]))
                try:  # shapes and types first: nothing is read from a shard that declares the wrong ones
                    check_shard(f, f_path, count=len(rows), patch_size=config.patch_size)
                except DatasetError as exc:
                    problems.append(str(exc).replace(str(f_path), name))
                    continue
                seen += int(entry["count"])
                v, level = f["v"][:], f["level"][:]
                if not (np.all(np.isfinite(v)) and v.min() >= 0 and v.max() <= 1):
                    problems.append(f"{name}: v outside [0, 1]")
                if not np.isin(level, [1, 2, 3]).all():
                    problems.append(f"{name}: level outside 1-3")
                if not np.array_equal(f["index"][:], np.arange(rows.start, rows.stop)):
                    problems.append(f"{name}: sample indices are not {rows.start}..{rows.stop - 1}")
                sources = f["source"][:]
                if sources.size and not (sources.min() >= 0 and sources.max() < len(config.sources)):
                    problems.append(f"{name}: source rows outside 0..{len(config.sources) - 1}")
                for row, raw in enumerate(f["params"][:]):
                    try:
                        record = DegradationParams.from_json(_text(raw))
                    except DegradeError as exc:
                        problems.append(f"{name} row {row}: bad parameter record ({exc})")
                        continue
                    if record.level != level[row] or not np.allclose(encode(record), v[row], atol=1e-6):
                        problems.append(f"{name} row {row}: v or level does not match the parameter record")
        except OSError as exc:
            problems.append(f"{name}: unreadable HDF5 ({_os_reason(exc)})")
    if manifest["complete"] and seen != config.count:
        problems.append(f"the shards hold {seen} samples, the manifest says {config.count}")
    if regenerate and not problems:
        problems += _regenerate(out, config, regenerate, seed)
    return problems


def _regenerate(out: Path, config: DatasetConfig, k: int, seed: int) -> list[str]:
    problems = []
    ds = open_dataset(out)
    picks = np.random.default_rng(seed).choice(len(ds), size=min(k, len(ds)), replace=False)
    for i in sorted(int(x) for x in picks):
        shard, row = ds.locate(i)
        stored = ds[i]
        f = ds._handle(shard)
        src_path = config.source_path(int(f["source"][row]))  # refuses paths that leave the source root
        if src_path.suffix.lower() not in IMAGE_SUFFIXES:
            problems.append(f"sample {i}: refusing source {src_path}: not an image file name "
                            f"({', '.join(IMAGE_SUFFIXES)})")
            continue
        if not src_path.is_file():
            problems.append(f"sample {i}: source {src_path} not found (give --sources to point at the photos)")
            continue
        try:  # a regular file of bounded size, hashed in blocks
            digest = _sha256_file(src_path, max_file_bytes())
        except DatasetError as exc:
            problems.append(f"sample {i}: refusing source: {exc}")
            continue
        if digest != config.sources[int(f["source"][row])].sha256:
            problems.append(f"sample {i}: source {src_path} changed since the dataset was made")
            continue
        src, (y, x), fresh = make_sample(config, i)
        if src != int(f["source"][row]) or [y, x] != list(f["crop"][row][:2]):
            problems.append(f"sample {i}: source or crop differs from its stream")
        elif fresh.params != stored.params:
            problems.append(f"sample {i}: parameter record differs from its stream")
        elif not (np.array_equal(fresh.hr, stored.hr) and np.array_equal(fresh.lr, stored.lr)
                  and np.array_equal(fresh.v, stored.v)):
            problems.append(f"sample {i}: regenerated pixels or v differ from the stored ones")
    ds.close()
    return problems
