"""Writing a dataset: `make_dataset` makes (or finishes) one, shard by shard, crash-safe and resumable.

Shards are written as ``.shard-NNNNN.h5.partial`` and renamed when complete; the manifest is rewritten
(atomically) after every shard; DIR/.lock keeps a second run out. The samples come from
:class:`~degrade.shards.generate.SampleMaker` through :class:`~degrade.shards.executor.OrderedMap`, while
this process writes. Libraries print nothing: progress is reported through a callback; the CLI draws the bar.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import stat
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from degrade._version import __version__
from degrade.errors import DatasetError, DegradeError
from degrade.io import check_max_pixels, exclusive_lock, write_bytes_atomic
from degrade.recipe import LEVELS, MIX_PROBS, SCALE, LevelChoice
from degrade.shards.executor import OrderedMap, usable_cores
from degrade.shards.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    LOCK,
    MANIFEST,
    MAX_COUNT,
    MAX_SHARDS,
    PARAMS_JSON_BYTES,
    ROW_COLUMNS,
    SHARD_ROW_BYTES,
    DatasetConfig,
    manifest_dict,
    os_reason,
    read_manifest,
    sha256_file,
    shard_name,
)
from degrade.shards.generate import CHUNK, SampleMaker, chunk_ranges
from degrade.vector import VECTOR_LAYOUT


@dataclass
class MakeReport:
    """What a make-dataset run did."""

    made: int = 0  # samples generated in this run
    reused_shards: int = 0
    level_counts: dict[int, int] = field(default_factory=lambda: {1: 0, 2: 0, 3: 0})
    seconds: float = 0.0
    bytes_on_disk: int = 0
    workers: int = 0  # the worker processes (or Dask tasks at once) used: --jobs, capped (make_dataset)




JOBS_PER_CORE = 2  # make-dataset's most worker processes per usable core (a larger --jobs is capped)


def make_dataset(config: DatasetConfig, out: str | os.PathLike, *, jobs: int = 1,
                 progress: Callable[[int], None] | None = None, backend: str | None = None,
                 max_pixels: int | None = None) -> MakeReport:
    """Write (or finish) the dataset `config` in folder `out`; returns what was done.

    Shards are written under a temporary name and renamed when complete; the manifest is rewritten
    after every shard. Re-running with the same config finishes only what is missing, giving the same
    bytes as an uninterrupted run. A different config for an existing dataset raises DatasetError.
    `progress(n)` is called with the number of samples just made (or found complete). `jobs` is the
    number of degrading workers: 1 is a thread of this process, more are worker processes; this
    process writes the shards meanwhile. `backend` (e.g. "dask") runs the workers through joblib.
    `max_pixels` caps the decoded source images as in :func:`degrade.read_image`; None means this
    process's cap (:func:`degrade.io.pixel_limit`, the one `scan_sources` used by default). Either way
    the workers get the number with their task, so a Dask worker's own environment does not matter.
    """
    out = Path(out)
    try:  # None: this process's cap; else an integer in [1, 2**40], numpy's too
        max_pixels = check_max_pixels(max_pixels)
    except DegradeError as exc:
        raise DatasetError(str(exc)) from None
    check_target(out, config.count, config.shard_size)  # before any folder or plan is made
    start = time.perf_counter()
    report = MakeReport()
    shards: dict[int, dict[str, Any]] = {}
    made, made_by = not out.exists(), __version__
    out.mkdir(parents=True, exist_ok=True)
    lock_was_there = os.path.lexists(out / LOCK)
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(_exclusive_lock(out))
        except DatasetError:  # a file system without locks, say: a folder made for nothing goes (not its parents)
            if made:
                with contextlib.suppress(OSError):
                    out.rmdir()
            raise
        if (out / MANIFEST).exists():
            try:
                old = read_manifest(out)
                if old["config"] != config.to_dict():
                    raise DatasetError(
                        f"{out} holds a dataset made by a different command "
                        f"({_config_difference(old['config'], config.to_dict())}); use a new --out or the "
                        "original options")
            except DatasetError:  # not ours to write: leave the folder as it was found
                if not lock_was_there:
                    (out / LOCK).unlink(missing_ok=True)
                raise
            shards, made_by = {int(s["shard"]): s for s in old["shards"]}, str(old.get("package_version"))
        _make(config, out, shards, report, jobs, progress, backend, max_pixels, made_by)
    report.seconds = time.perf_counter() - start
    report.bytes_on_disk = sum(s["bytes"] for s in shards.values())
    return report


def check_target(out: Path, count: int, shard_size: int) -> None:
    """make_dataset's refusals that need no source (make-dataset runs them before its scan too): too many
    samples or shards, an `out` that is a file or a folder of something else."""
    shards = -(-count // shard_size)
    if count > MAX_COUNT or shards > MAX_SHARDS:
        raise DatasetError(f"{count} samples in {shards} shard(s): at most {MAX_COUNT:,} samples "
                           f"in at most {MAX_SHARDS:,} shards (the manifest lists every shard and is rewritten "
                           "after each); raise --shard-size or make several datasets")
    if out.exists() and not out.is_dir():
        raise DatasetError(f"{out}: exists and is not a folder")
    if not (out / MANIFEST).exists() and out.exists() and any(not _ours(p.name) for p in out.iterdir()):
        raise DatasetError(f"{out}: folder is not empty and holds no {MANIFEST}; choose a new --out")
    if (out / MANIFEST).exists() and not (old := read_manifest(out))["complete"]:
        _check_version(out, str(old.get("package_version")), "missing")


def _check_version(out: Path, made_by: str, what: str) -> None:
    """Shards to make in a dataset another version began: refused (the samples of two versions may differ)."""
    if made_by != __version__:
        raise DatasetError(f"{out} was made by degrade {made_by[:40]}, and this is {__version__}: its {what} "
                           "shards would be another version's; finish it with that version, or use a new --out")


def _ours(name: str) -> bool:
    """A name only a make-dataset run leaves in a folder that holds no manifest yet: its lock, and the
    temporary file of a first manifest write that was killed (kill -9) before its rename."""
    return name == LOCK or (name.startswith(f".{MANIFEST}.") and name.endswith(".tmp"))


def _config_difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    """What differs between the manifest's configuration and this command's, each key of either (an option
    a configuration leaves out when off, as sharpen_hr, read as off)."""
    absent = {"sharpen_hr": False}
    diffs = []
    for key in [*new, *(k for k in old if k not in new)]:
        was, now = old.get(key, absent.get(key)), new.get(key, absent.get(key))
        if was != now:
            diffs.append("the source images" if key == "sources" else f"{key} {was!r} -> {now!r}")
    return ", ".join(diffs)


def _exclusive_lock(out: Path) -> contextlib.AbstractContextManager[None]:
    """Hold DIR/.lock exclusively (POSIX flock) so two runs never write one dataset at once."""
    return exclusive_lock(out / LOCK, maker="make-dataset", busy=f"{out}: another make-dataset run is writing this "
                          "dataset", error=DatasetError)


def _regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _make(config: DatasetConfig, out: Path, shards: dict[int, dict[str, Any]], report: MakeReport, jobs: int,
          progress: Callable[[int], None] | None, backend: str | None, max_pixels: int, made_by: str) -> None:
    for stale in [*out.glob(".shard-*.partial"), *out.glob(f".{MANIFEST}.*.tmp")]:
        stale.unlink()  # left by an interrupted run (a killed write's temporary file too); never looks complete

    todo = []
    for k in range(config.shard_count):
        path = out / shard_name(k)
        entry = shards.get(k)
        # a regular file, not a symlink (the reader refuses those): anything else is made again
        if entry is not None and _regular(path) and sha256_file(path) == entry["sha256"]:
            report.reused_shards += 1
            if progress:
                progress(entry["count"])
            continue
        shards.pop(k, None)
        todo.append(k)
    if todo:
        _check_version(out, made_by, "missing or damaged")
    _save_manifest(out, config, shards, made_by)  # writes only if it changed (a version's record too)
    # Workers beyond the chunks to make would start idle, and beyond JOBS_PER_CORE x the usable cores only
    # take memory (some 65 MB each) for no speed: --jobs 1000 would have started 1000 processes.
    chunks = sum(-(-len(config.shard_range(k)) // CHUNK) for k in todo)
    jobs = max(1, min(jobs, chunks, jobs if backend else JOBS_PER_CORE * usable_cores()))
    report.workers = jobs

    def count(chunk: dict[str, Any]) -> None:
        report.made += len(chunk["index"])
        for lv in chunk["level"]:
            report.level_counts[int(lv)] += 1
        if progress:
            progress(len(chunk["index"]))

    # One stream of chunks over all the shards to make: the workers go on with the next shard's chunks
    # while this process closes, hashes and records the previous one (no drain at every shard boundary).
    # The chunk plan is made shard by shard as the stream reaches it: memory does not grow with --count.
    with OrderedMap(SampleMaker(config, max_pixels=max_pixels), jobs=jobs, backend=backend) as run_chunks, \
            contextlib.closing(run_chunks(r for k in todo for r in chunk_ranges(config.shard_range(k)))) as stream:
        for k in todo:
            final, tmp = out / shard_name(k), out / f".{shard_name(k)}.partial"
            _check_free_space(out, config, k)
            try:
                chunks = len(chunk_ranges(config.shard_range(k)))
                _write_shard(tmp, config, k, itertools.islice(stream, chunks), count)
                _sync_file(tmp)  # its bytes on disk before its name; the manifest's write syncs the folder
                os.replace(tmp, final)
            except OSError as exc:  # disk full, quota, I/O error: earlier shards stay valid, so say how to resume
                tmp.unlink(missing_ok=True)
                raise DatasetError(f"{final}: cannot write ({os_reason(exc)}); the shards written so far are "
                                   "kept: fix the cause and run the same command again to resume") from None
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            shards[k] = {"shard": k, "file": final.name, "first_index": config.shard_range(k).start,
                         "count": len(config.shard_range(k)), "bytes": final.stat().st_size,
                         "sha256": sha256_file(final)}
            _save_manifest(out, config, shards, made_by)


def _sync_file(path: Path) -> None:
    """Flush a written file to disk: after a power loss a shard the manifest lists holds its samples, not
    nothing (a rename can reach the disk before the data)."""
    fd = os.open(path, os.O_RDWR if os.name == "nt" else os.O_RDONLY)  # (Windows syncs only a file open for
    # writing; POSIX any, and a umask may have left the shard without its owner's write bit)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_manifest(out: Path, config: DatasetConfig, shards: dict[int, dict[str, Any]], version: str) -> None:
    text = json.dumps(manifest_dict(config, shards, version), indent=1, sort_keys=True) + "\n"
    path = out / MANIFEST
    if path.is_file() and path.read_text() == text:
        return
    write_bytes_atomic(path, text.encode())


# --- free space -------------------------------------------------------------------------------------


def shard_bytes_bound(config: DatasetConfig, k: int) -> int:
    """An upper bound of shard k's file size: uncompressed pixels (+1 % for filters that do not
    shrink a chunk), per-sample metadata, the source table and 1 MiB of HDF5 structure."""
    n, p, q = len(config.shard_range(k)), config.patch_size, config.patch_size // SCALE
    pixels = n * 3 * (p * p + q * q)
    per_sample = SHARD_ROW_BYTES + PARAMS_JSON_BYTES + 64  # v, level, index, source, crop; params; slack
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


# --- one shard file ------------------------------------------------------------------------------------


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
                    **{key: dataset(key, (n, *shape), dtype, None) for key, (shape, dtype) in ROW_COLUMNS.items()},
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
        f.attrs["sources_sha256"] = config.sources_digest()
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
            _ABANDONED.discard(f, path, sets)
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


class _AbandonedShards:
    """h5py objects of shards whose write failed, kept unclosed until the process ends.

    Closing them after a failed write fails, and finalising them crashes HDF5, so they must outlive every
    other object: this keeper is process-wide by nature (there is one per process, `_ABANDONED`).
    """

    def __init__(self) -> None:
        self._kept: list[Any] = []

    def discard(self, f: Any, path: Path, sets: dict[str, Any]) -> None:
        """Abandon a shard after a failed write, even on a full disk (its content is discarded):
        truncating frees the file's blocks; the h5py objects are kept."""
        with contextlib.suppress(OSError):
            os.truncate(path, 0)
        self._kept.append((f, dict(sets)))
        sets.clear()

    def __len__(self) -> int:
        return len(self._kept)


_ABANDONED = _AbandonedShards()


def abandoned_writes() -> int:
    """How many shard writes failed in this process so far. After one, HDF5 may crash while the
    interpreter finalises the abandoned objects, so a command-line program should end with os._exit."""
    return len(_ABANDONED)
