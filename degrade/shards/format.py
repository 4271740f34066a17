"""The shard format: its constants, the dataset configuration, the manifest and the checks a reader makes.

docs/dataset-format.md is the public contract (format version 1, vector layout ``dasr33-v1``):
``DIR/manifest.json`` plus ``DIR/shard-00000.h5, ...``. Everything here is what a writer, a reader and a
verifier must agree on; each constant is defined here once.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from degrade.errors import DatasetError
from degrade.io import ImageError, pixel_limit, read_regular_file, real_path
from degrade.recipe import SCALE, LevelChoice
from degrade.samples import sample_dir
from degrade.shards.strings import scalar_attr
from degrade.strictjson import DuplicateKey, strict_json
from degrade.vector import VECTOR_LAYOUT, VECTOR_LENGTH

FORMAT_NAME = "degrade-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LOCK = ".lock"  # DIR/.lock, held (flock) by the run that writes the dataset
COMPRESSIONS = ("none", "lzf", "gzip")
MAX_COUNT = 10**8  # samples in one dataset: 100M patches of 256 px are about 20 TB
MAX_SHARDS = 100_000
BUNDLED = "<bundled>"  # source root of the bundled sample photos
# A shard's per-sample metadata beside the hr / lr patches and the params records: each row's shape and type
ROW_COLUMNS = {"v": ((VECTOR_LENGTH,), np.dtype(np.float32)), "level": ((), np.dtype(np.uint8)),
               "index": ((), np.dtype(np.int64)), "source": ((), np.dtype(np.int32)),
               "crop": ((4,), np.dtype(np.int32))}
SHARD_DATASETS = ("hr", "lr", *ROW_COLUMNS, "params")
SHARD_ROW_BYTES = sum(int(np.prod(shape)) * dtype.itemsize for shape, dtype in ROW_COLUMNS.values())  # contiguous
PARAMS_JSON_BYTES = 1024  # more than any record's JSON (about 600 bytes at level 3)
MAX_MANIFEST_BYTES = 256 << 20  # a manifest listing a million sources is about 120 MB
INT64_LIMIT = 2**63  # counts and shard sizes are below this (the reader sums them as int64)
MAX_SIDE = 2**31  # image sides and patch sizes are below this (crops are stored as int32)


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.h5"


def shard_path(out: Path, name: str) -> Path:
    """DIR/name for a shard file named by a manifest: a plain name, and not a link that leaves DIR."""
    path = out / name
    if Path(name).name != name or name in ("", ".", "..") or real_path(path).parent != real_path(out):
        raise DatasetError(f"{out}: refusing shard file {name!r}: shard files must lie inside the dataset folder")
    return path


# --- the configuration: everything that determines a dataset's bytes ---------------------------------


@dataclass(frozen=True)
class Source:
    """One usable source image: its path relative to the source root, content hash and size."""

    path: str
    sha256: str
    height: int
    width: int

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not isinstance(self.sha256, str):
            raise DatasetError(f"source path and sha256 must be strings, got {self.path!r}, {self.sha256!r}")
        if not re.fullmatch("[0-9a-f]{64}", self.sha256):
            raise DatasetError(f"source {self.path!r}: sha256 must be 64 lowercase hex digits, got {self.sha256!r}")
        for side in (self.height, self.width):
            _check_int(f"source {self.path!r}: height and width", side, 1, MAX_SIDE)


def resolve_source(root: str, rel: str) -> Path:
    """The file of a recorded source path, refusing paths that would leave the recorded root."""
    base = real_path(sample_dir()) if root == BUNDLED else real_path(root)
    candidate = Path(rel)
    if candidate.is_absolute() or ".." in candidate.parts:
        raise DatasetError(f"refusing source path {rel!r}: it must be relative and inside {base}")
    path = real_path(base / candidate)
    if base not in path.parents:
        raise DatasetError(f"refusing source path {rel!r}: it resolves outside {base}")
    return path


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
        # Exact types and ranges, nothing coerced: a configuration also comes from a manifest, which is data.
        self.check_options(self.level, self.count, self.patch_size, self.seed, self.shard_size, self.compression)
        if not isinstance(self.source_root, str):
            raise DatasetError(f"source_root must be a string, got {self.source_root!r}")
        if not isinstance(self.sharpen_hr, bool):
            raise DatasetError(f"sharpen_hr must be true or false, got {self.sharpen_hr!r}")
        if isinstance(self.sources, list):  # scan_sources() returns a list; the config keeps a tuple
            object.__setattr__(self, "sources", tuple(self.sources))
        if not isinstance(self.sources, tuple) or not all(isinstance(s, Source) for s in self.sources):
            raise DatasetError("sources must be a sequence of Source")
        if not self.sources:
            raise DatasetError("no usable source images (all unreadable or smaller than the patch)")
        for s in self.sources:
            if min(s.height, s.width) < self.patch_size:
                raise DatasetError(f"source {s.path!r} is {s.height}x{s.width}, smaller than the "
                                   f"{self.patch_size}-px patch")

    @staticmethod
    def check_options(level: Any, count: Any, patch_size: Any, seed: Any, shard_size: Any, compression: Any) -> None:
        """The checks that need no source (make-dataset runs them before its scan, which reads every image)."""
        if not (level == "mix" or _is_int(level) and level in (1, 2, 3)):
            raise DatasetError(f"--level must be 1, 2, 3 or mix, got {level!r}")
        _check_int("--count", count, 1, INT64_LIMIT)
        _check_int("--patch-size", patch_size, 32, MAX_SIDE)
        if patch_size % SCALE:
            raise DatasetError(f"--patch-size must be a multiple of {SCALE} and >= 32, got {patch_size}")
        if not _is_int(seed) or seed < 0:  # any size: SeedSequence takes it, and earlier versions did
            raise DatasetError(f"--seed must be a non-negative integer, got {seed!r}")
        _check_int("--shard-size", shard_size, 1, INT64_LIMIT)
        if not isinstance(compression, str) or compression not in COMPRESSIONS:
            raise DatasetError(f"--compression must be one of {', '.join(COMPRESSIONS)}, got {compression!r}")

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

    def sources_digest(self) -> str:
        """SHA-256 of the sources table (each source's path, SHA-256, height and width), as each shard records it:
        `degrade verify` compares it with the manifest's, which the shards' paths table alone did not pin."""
        table = json.dumps([asdict(s) for s in self.sources], sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(table.encode()).hexdigest()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DatasetConfig:
        """The configuration a manifest records: every value of the type and range the writer writes
        (integers are JSON integers, not strings, floats or booleans); DatasetError otherwise."""
        try:
            if not isinstance(d["sources"], list) or not all(isinstance(s, dict) for s in d["sources"]):
                raise DatasetError("sources must be a list of objects")
            return cls(
                level=d["level"],
                count=d["count"],
                patch_size=d["patch_size"],
                seed=d["seed"],
                shard_size=d["shard_size"],
                compression=d["compression"],
                source_root=d["source_root"],
                sources=tuple(Source(s["path"], s["sha256"], s["height"], s["width"]) for s in d["sources"]),
                sharpen_hr=d.get("sharpen_hr", False),
            )
        except KeyError as exc:
            raise DatasetError(f"malformed dataset configuration: {exc} missing") from None
        except (TypeError, ValueError) as exc:  # DatasetError is a ValueError
            raise DatasetError(f"malformed dataset configuration: {exc}") from None

    def source_path(self, i: int) -> Path:
        return resolve_source(self.source_root, self.sources[i].path)


def _check_int(what: str, raw: Any, lo: int, hi: int) -> None:
    """`raw` must be an int (not a bool, a float or a string) in [lo, hi)."""
    if not _is_int(raw):
        raise DatasetError(f"{what} must be an integer, got {raw!r}")
    if not lo <= raw < hi:
        raise DatasetError(f"{what} must be in [{lo}, {_power(hi)}), got {raw}")


def _power(n: int) -> str:
    return f"2**{n.bit_length() - 1}" if n > 1 << 20 and n & (n - 1) == 0 else str(n)


# --- the manifest ---------------------------------------------------------------------------------------


def manifest_dict(config: DatasetConfig, shards: dict[int, dict[str, Any]], version: str) -> dict[str, Any]:
    """The manifest of `config` listing the finished `shards` (shard number -> entry)."""
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "vector_layout": VECTOR_LAYOUT,
        "package_version": version,
        "config": config.to_dict(),
        "shards": [shards[k] for k in sorted(shards)],
        "complete": len(shards) == config.shard_count,
    }


def read_manifest(out: Path) -> dict[str, Any]:
    """DIR/manifest.json, checked: a manifest is data from a file, so its shard list must be exactly
    what its configuration implies (names, first indices, counts) before anything is opened."""
    path = out / MANIFEST
    try:
        text = read_regular_file(path, MAX_MANIFEST_BYTES).decode("utf-8")
        data = strict_json(text)
    except ImageError as exc:
        if not path.exists() and not path.is_symlink():
            raise DatasetError(f"{out}: no {MANIFEST}: not a dataset folder") from None
        raise DatasetError(f"{path}: unreadable manifest ({str(exc).removeprefix(f'{path}: ')})") from None
    except OSError as exc:
        raise DatasetError(f"{path}: unreadable manifest ({exc.strerror or exc})") from None
    except (UnicodeDecodeError, json.JSONDecodeError, DuplicateKey) as exc:
        raise DatasetError(f"{path}: unreadable manifest ({exc})") from None
    except ValueError:  # the only other ValueError of json.loads: an integer beyond int's digit limit
        raise DatasetError(f"{path}: unreadable manifest (a number of more than "
                           f"{sys.get_int_max_str_digits()} digits)") from None
    except RecursionError:
        raise DatasetError(f"{path}: unreadable manifest (JSON nested too deeply)") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise DatasetError(f"{path}: not a {FORMAT_NAME} manifest")
    if data.get("format_version") != FORMAT_VERSION:
        raise DatasetError(f"{path}: format version {data.get('format_version')} (this code reads {FORMAT_VERSION})")
    if data.get("vector_layout") != VECTOR_LAYOUT:  # v's 33 numbers would be read by another layout's meaning
        raise DatasetError(f"{path}: vector layout {data.get('vector_layout')!r} (this code reads {VECTOR_LAYOUT})")
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


# --- a shard file -----------------------------------------------------------------------------------


# What h5py raises for a damaged file: OSError where data cannot be read, KeyError where an object's header
# cannot be opened (a flipped byte in a dataspace: "Unable to synchronously open object"), RuntimeError where
# its internal structures are broken
H5_DAMAGE = (OSError, KeyError, RuntimeError)


def h5_reason(exc: BaseException) -> str:
    """What h5py said of a damaged file, in one line (see :func:`os_reason`)."""
    return os_reason(exc) if isinstance(exc, OSError) else " ".join(str(exc).strip("'\"").split())


def check_shard(f: Any, path: Path, *, count: int | None, patch_size: int | None) -> int:
    """Check an open shard's datasets (shapes, types) before anything is read; returns its sample count.

    `count` and `patch_size` come from the manifest (None for a lone shard file: taken from the file).
    A shard must also be large enough to hold its own per-sample metadata, and a patch must be within
    the pixel cap, so a small file cannot declare arrays that would take gigabytes to read. A file whose
    structure h5py cannot read is a DatasetError too.
    """
    try:
        return _check_shard(f, path, count=count, patch_size=patch_size)
    except (KeyError, RuntimeError) as exc:  # OSError: the callers' own, as for a file that cannot be opened
        raise DatasetError(f"{path}: a damaged shard (HDF5: {h5_reason(exc)})") from None


def plain_dataset(f: Any, path: Path, key: str) -> Any:
    """f[key], refused (DatasetError) unless a plain dataset stored in this file: an external or soft link,
    external raw storage or a virtual dataset would make reading it open other files (or a FIFO)."""
    import h5py

    if not isinstance(f.get(key, getlink=True), h5py.HardLink) or not isinstance(f[key], h5py.Dataset):
        raise DatasetError(f"{path}: not a {FORMAT_NAME} shard (dataset {key!r} missing or a link)")
    if f[key].external or f[key].is_virtual:
        raise DatasetError(f"{path}: dataset {key!r} keeps its data outside the file; refusing to read it")
    return f[key]


def check_sources_table(f: Any, path: Path, count: int) -> Any:
    """A shard's `sources` dataset (only `degrade verify` reads it), checked as the row datasets are before
    anything is read: plain, and `count` variable-length strings (one per manifest source)."""
    import h5py

    table = plain_dataset(f, path, "sources")
    info = h5py.check_string_dtype(table.dtype)
    if table.shape != (count,) or info is None or info.length is not None:
        raise DatasetError(f"{path}: sources is {table.dtype} {table.shape}, expected variable-length strings "
                           f"({count},)")
    return table


def _check_shard(f: Any, path: Path, *, count: int | None, patch_size: int | None) -> int:
    import h5py

    layout = scalar_attr(f, "vector_layout")  # any attribute type: compare only a string
    if not isinstance(layout, str) or layout != VECTOR_LAYOUT:
        raise DatasetError(f"{path}: vector layout {layout!r:.60} (this code reads {VECTOR_LAYOUT})")

    for key in SHARD_DATASETS:
        plain_dataset(f, path, key)
    if count is None:  # a lone shard: its sample count is v's first dimension
        if f["v"].ndim != 2:  # a scalar or null dataspace has no first dimension
            raise DatasetError(f"{path}: v is {f['v'].dtype} {f['v'].shape}, expected float32 (n, {VECTOR_LENGTH})")
        count = f["v"].shape[0]
    n = count
    p = f["hr"].shape[1] if patch_size is None and f["hr"].ndim == 4 else patch_size
    if not isinstance(p, int) or p < 32 or p % SCALE or p * p > pixel_limit():
        raise DatasetError(f"{path}: patch size {p} is not a multiple of {SCALE} in [32, sqrt({pixel_limit()})]")
    q = p // SCALE
    expected = {"hr": ((n, p, p, 3), np.dtype(np.uint8)), "lr": ((n, q, q, 3), np.dtype(np.uint8)),
                **{key: ((n, *shape), dtype) for key, (shape, dtype) in ROW_COLUMNS.items()}}
    for key, (shape, dtype) in expected.items():
        ds = f[key]
        if ds.shape != shape or ds.dtype != dtype:
            raise DatasetError(f"{path}: {key} is {ds.dtype} {ds.shape}, expected {dtype} {shape}")
    for key in ("hr", "lr"):  # one sample per chunk (or contiguous): reading a row decompresses one patch
        chunks = f[key].chunks
        if chunks is not None and chunks != (1, *f[key].shape[1:]):
            raise DatasetError(f"{path}: {key} is stored in chunks of {chunks}, expected one sample per chunk")
    params = f["params"]  # variable-length strings, as written: a fixed length could declare gigabytes per row
    info = h5py.check_string_dtype(params.dtype)
    if params.shape != (n,) or info is None or info.length is not None:
        raise DatasetError(f"{path}: params is {params.dtype} {params.shape}, expected variable-length strings ({n},)")
    size = os.stat(path).st_size
    if n * SHARD_ROW_BYTES > size:
        raise DatasetError(f"{path}: declares {n} samples but its {size} bytes cannot hold them")
    return n


# --- small helpers shared by the writer, the reader and the verifier -----------------------------------


def sha256_file(path: Path, limit: int | None = None) -> str:
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


def os_reason(exc: OSError) -> str:
    """The reason of an OSError in one line (h5py's messages span lines and repeat the file name)."""
    if exc.errno:
        return os.strerror(exc.errno)
    return " ".join(str(exc).split())


def as_text(value: bytes | str, where: str = "a stored parameter record") -> str:
    """A stored UTF-8 string (h5py gives bytes) as str; DatasetError naming `where` if it is not UTF-8."""
    if not isinstance(value, bytes):
        return value
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{where}: not valid UTF-8 (byte {value[exc.start]:#04x} at offset {exc.start})") from None
