"""Reading a dataset: `open_dataset` gives a `ShardDataset`, a sequence of `Sample`s over the shard files.

Files are opened lazily, once per process, and checked against the manifest before any row is read, so
an instance can be handed to PyTorch DataLoader worker processes (open handles are never pickled).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from degrade.errors import DatasetError, SampleIndexError
from degrade.params import DegradationParams
from degrade.shards.format import (
    FORMAT_NAME,
    DatasetConfig,
    Sample,
    as_text,
    check_shard,
    os_reason,
    read_manifest,
    sha256_file,
    shard_path,
)


class ShardDataset:
    """Read access to a dataset folder (or one shard file): `len()`, indexing, iteration.

    `ds[i]` returns a :class:`Sample` (hr, lr, v, params). Files are opened lazily, once per
    process, so an instance can be handed to PyTorch DataLoader worker processes.
    """

    MAX_OPEN = 32  # shard files kept open per process (LRU); a dataset may have thousands

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
                if sha256_file(f) != digest:
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
                raise DatasetError(f"{self.files[k]}: unreadable shard ({os_reason(exc)})") from None
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
        return Sample(f["hr"][row], f["lr"][row], f["v"][row], DegradationParams.from_json(as_text(f["params"][row])))

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
            return [as_text(x) for part in parts for x in part]
        return np.concatenate(parts)

    def close(self) -> None:
        for h in self._handles.values():
            h.close()
        self._handles, self._pid = OrderedDict(), None

    def __getstate__(self) -> dict[str, Any]:  # open HDF5 handles do not cross processes
        state = self.__dict__.copy()
        state["_handles"], state["_pid"] = OrderedDict(), None
        return state


def open_dataset(path: str | os.PathLike, *, allow_incomplete: bool = False, checksums: bool = False) -> ShardDataset:
    """Open a dataset folder (or a single shard file) written by :func:`degrade.shards.make_dataset`.

    Always (cheap, metadata only): the manifest's shard list must match its configuration, and each
    shard's datasets must have the shapes and types the manifest implies before any is read.
    `checksums=True` also compares every shard's SHA-256 with the manifest now (reads each file once).
    """
    return ShardDataset(path, allow_incomplete=allow_incomplete, checksums=checksums)
