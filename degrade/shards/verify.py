"""Verifying a dataset: structure, checksums, value ranges, v against its record, and regeneration."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np

from degrade.discover import SOURCE_SUFFIXES
from degrade.errors import DatasetError, DegradeError
from degrade.io import max_file_bytes
from degrade.params import DegradationParams
from degrade.shards.format import (
    H5_DAMAGE,
    PARAMS_JSON_BYTES,
    DatasetConfig,
    as_text,
    check_shard,
    check_sources_table,
    h5_reason,
    read_manifest,
    sha256_file,
    shard_path,
)
from degrade.shards.generate import SampleMaker
from degrade.shards.read import attr_text, open_dataset, shard_command
from degrade.shards.strings import MAX_SOURCE_BYTES, scalar_attr, string_rows
from degrade.vector import encode


def verify_dataset(path: str | os.PathLike, *, regenerate: int = 0, seed: int = 0,
                   source_root: str | os.PathLike | None = None, max_pixels: int | None = None) -> list[str]:
    """Check a dataset folder; returns a list of problems (empty when all is well).

    Checks the manifest, every shard's checksum, size, structure, shapes, dtypes and value ranges, that
    each shard was made with the manifest's configuration and sources (the manifest has no checksum of its
    own), that each stored v equals the encoding of its stored record, and then re-creates `regenerate` random
    samples from their source, crop, seed and record, comparing bit for bit. `source_root` replaces
    the recorded source folder (for a dataset moved to another machine). `max_pixels` caps the decoded
    sources as in :func:`degrade.read_image` (None: this process's cap); a source above it is that sample's
    problem.
    """
    import h5py

    out = Path(path)
    manifest = read_manifest(out)
    config = DatasetConfig.from_dict(manifest["config"])
    # what each shard records of the configuration it was made with, as the manifest's writer wrote it
    command = {k: v for k, v in manifest["config"].items() if k != "sources"}
    source_paths = [s.path for s in config.sources]
    sources_digest = config.sources_digest()  # (before --sources moves the root: the digest has no root)
    if source_root is not None:
        config = replace(config, source_root=str(source_root))
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
        if sha256_file(f_path) != entry["sha256"]:
            problems.append(f"{name}: checksum differs from the manifest")
        if (size := f_path.stat().st_size) != entry["bytes"]:
            problems.append(f"{name}: {size} bytes, the manifest says {entry['bytes']}")
        try:
            with h5py.File(f_path, "r") as f:
                rows = config.shard_range(int(entry["shard"]))
                try:  # shapes and types first: nothing is read from a shard that declares the wrong ones
                    check_shard(f, f_path, count=len(rows), patch_size=config.patch_size)
                except DatasetError as exc:
                    problems.append(str(exc).replace(str(f_path), name))
                    continue
                seen += int(entry["count"])
                made_with = shard_command(scalar_attr(f, "command")) or {}  # none: another one
                if made_with != command:
                    differ = sorted(k for k in command.keys() | made_with.keys() if made_with.get(k) != command.get(k))
                    problems.append(f"{name}: made with another configuration than the manifest's ({', '.join(differ)} "
                                    f"{'differs' if len(differ) == 1 else 'differ'})")
                pinned = scalar_attr(f, "sources_sha256")  # (shards made before it was recorded have none)
                try:  # checked as the row datasets were before anything is read from it
                    table = string_rows(check_sources_table(f, name, len(source_paths)), slice(None),
                                        limit=MAX_SOURCE_BYTES, where=f"{name}: sources")
                except DatasetError as exc:
                    problems.append(str(exc))
                    table = None
                if table is not None and ([as_text(x, name) for x in table] != source_paths or (
                        pinned is not None and attr_text(pinned) != sources_digest)):
                    problems.append(f"{name}: its sources table differs from the manifest's sources")
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
                for row, raw in enumerate(string_rows(f["params"], slice(None), limit=PARAMS_JSON_BYTES,
                                                      where=f"{name}: params")):
                    try:
                        record = DegradationParams.from_json(as_text(raw))
                    except DegradeError as exc:
                        problems.append(f"{name} row {row}: bad parameter record ({exc})")
                        continue
                    try:  # a valid record can still lie outside v's ranges (blur1.sigma_x = 10): one problem more
                        encoded = encode(record)
                    except DegradeError as exc:
                        problems.append(f"{name} row {row}: parameter record cannot be encoded as v ({exc})")
                        continue
                    if record.level != level[row] or not np.allclose(encoded, v[row], atol=1e-6):
                        problems.append(f"{name} row {row}: v or level does not match the parameter record")
        except H5_DAMAGE as exc:
            problems.append(f"{name}: unreadable HDF5 ({h5_reason(exc)})")
    if manifest["complete"] and seen != config.count:
        problems.append(f"the shards hold {seen} samples, the manifest says {config.count}")
    if regenerate and not problems:
        problems += _regenerate(out, config, regenerate, seed, max_pixels)
    return problems


def _regenerate(out: Path, config: DatasetConfig, k: int, seed: int, max_pixels: int | None) -> list[str]:
    problems = []
    ds = open_dataset(out)
    maker = SampleMaker(config, max_pixels=max_pixels)
    picks = np.random.default_rng(seed).choice(len(ds), size=min(k, len(ds)), replace=False)
    for i in sorted(int(x) for x in picks):
        shard, row = ds.locate(i)
        stored = ds[i]
        f = ds._shard(shard).file
        src_path = config.source_path(int(f["source"][row]))  # refuses paths that leave the source root
        if src_path.suffix.lower() not in SOURCE_SUFFIXES:
            problems.append(f"sample {i}: refusing source {src_path}: not an image file name "
                            f"({', '.join(SOURCE_SUFFIXES)})")
            continue
        if not src_path.is_file():
            problems.append(f"sample {i}: source {src_path} not found (--sources names the folder that holds the "
                            "photos, if they moved)")
            continue
        try:  # a regular file of bounded size, hashed in blocks
            digest = sha256_file(src_path, max_file_bytes(max_pixels))
        except DatasetError as exc:
            problems.append(f"sample {i}: refusing source: {exc}")
            continue
        if digest != config.sources[int(f["source"][row])].sha256:
            problems.append(f"sample {i}: source {src_path} changed since the dataset was made")
            continue
        try:  # a source that is not as the manifest records it (its size), or above the pixel cap, is this
            src, (y, x), fresh = maker.sample(i)  # sample's problem, not the end of the check
        except DegradeError as exc:
            problems.append(f"sample {i}: {exc}")
            continue
        if src != int(f["source"][row]) or [y, x] != list(f["crop"][row][:2]):
            problems.append(f"sample {i}: source or crop differs from its stream")
        elif fresh.params != stored.params:
            problems.append(f"sample {i}: parameter record differs from its stream")
        elif not (np.array_equal(fresh.hr, stored.hr) and np.array_equal(fresh.lr, stored.lr)
                  and np.array_equal(fresh.v, stored.v)):
            problems.append(f"sample {i}: regenerated pixels or v differ from the stored ones")
    ds.close()
    return problems
