"""Reading a dataset: `open_dataset` gives a `ShardDataset`, a sequence of samples over the shard files.

Files are opened lazily, once per process, and checked against the manifest before any row is read; each
open shard keeps its h5py dataset objects, so reading a sample is one h5py read per array. An instance can
be handed to PyTorch DataLoader worker processes: open files are never pickled, and a process that did
not open them (a forked or spawned worker) opens its own.
"""

from __future__ import annotations

import bisect
import contextlib
import operator
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from degrade.errors import DatasetError, SampleIndexError, SampleIndexTypeError
from degrade.recipe import SCALE
from degrade.shards.format import (
    FORMAT_NAME,
    H5_DAMAGE,
    PARAMS_JSON_BYTES,
    ROW_COLUMNS,
    DatasetConfig,
    as_text,
    check_shard,
    h5_reason,
    os_reason,
    read_manifest,
    sha256_file,
    shard_path,
)
from degrade.shards.sample import Sample, SampleBatch
from degrade.shards.strings import one_string, scalar_attr, string_rows
from degrade.strictjson import strict_json
from degrade.vector import VECTOR_LENGTH


class _Rewritten(DatasetError):
    """An open shard's file was written to (or touched) while it was read: ShardDataset._read reopens it."""


def attr_text(value: object) -> str | None:
    """An HDF5 attribute as text, or None where it is no text (an array, a number, bytes that are not UTF-8)."""
    if isinstance(value, bytes):
        try:
            return value.decode()
        except UnicodeDecodeError:
            return None
    return value if isinstance(value, str) else None


def shard_command(value: object) -> dict[str, Any] | None:
    """A shard's `command` attribute, the configuration it was made with (JSON), as a dict; None where it is
    none (missing, another type, not JSON, a key twice, no object, nested past the parser's depth)."""
    text = attr_text(value)
    try:
        made_with = strict_json(text) if text is not None else None
    except (ValueError, RecursionError):
        return None
    return made_with if isinstance(made_with, dict) else None


def _file_stat(file: Any) -> os.stat_result | None:
    """fstat of an open h5py file's descriptor (one system call); None where the driver keeps no descriptor
    (never for the files read here: the default driver)."""
    try:
        return os.fstat(file.id.get_vfd_handle())
    except (OSError, ValueError, TypeError, AttributeError):
        return None


class _OpenShard:
    """One shard file open in this process, with its datasets looked up once (a lookup by name costs
    more than reading a row)."""

    __slots__ = ("file", "hr", "lr", "v", "params", "index", "where", "path", "stat")

    def __init__(self, file: Any, path: Path, opened: os.stat_result | None):
        """`opened`: the file's fstat when it was opened (_file_stat)."""
        self.file = file
        self.hr, self.lr, self.v, self.params = file["hr"], file["lr"], file["v"], file["params"]
        self.index = file["index"]
        self.where = f"{path}: params"  # how as_text names a record that is not UTF-8
        self.path = path
        self.stat = None if opened is None else (opened.st_size, opened.st_mtime_ns)

    def _stat(self) -> tuple[int, int] | None:
        """The open file's size and modification time now."""
        st = _file_stat(self.file)
        return None if st is None else (st.st_size, st.st_mtime_ns)

    def _changed(self) -> None:
        """Raise if the open file is no longer as it was at open: cut shorter (DatasetError: what is gone is
        gone), or written to at its size or larger (_Rewritten: a copy over it with `cp` or `rsync --inplace`,
        or only touched; the caller reopens it, checks it again and reads once more)."""
        now = self._stat()
        if self.stat is None or now is None or now == self.stat:
            return
        if now[0] < self.stat[0]:
            raise DatasetError(f"{self.path}: truncated while open ({now[0]} of its {self.stat[0]} bytes left)")
        raise _Rewritten(f"{self.path}: written to while open (its modification time changed), and again when "
                         "read once more")

    @contextlib.contextmanager
    def reading(self, rows: Any) -> Iterator[None]:
        """A read of `rows` (a row, a slice, "all"): a failed one (a damaged compressed chunk: h5py says
        only "Can't synchronously read data (filter returned failure during read)") as DatasetError naming
        the shard and the rows. A file cut shorter while open reads as zeros past its new end, and one
        rewritten in place reads as the new file's bytes under the old one's cached structure, without an
        error: after each read the file's size and modification time are compared with those at open
        (ShardDataset._read reopens a rewritten one and reads again)."""
        try:
            yield
        except H5_DAMAGE as exc:
            self._changed()  # a file cut or rewritten under the read: said as such, or read once more
            if isinstance(rows, slice):
                at = f"rows {rows.start}-{rows.stop - 1}" + (f" (every {rows.step})" if rows.step not in (None, 1)
                                                             else "")
            else:
                at = "every row" if rows == "all" else f"row {rows}"
            raise DatasetError(f"{self.path}: {at} could not be read ({h5_reason(exc)}): a damaged shard "
                               "(degrade verify checks each one)") from None
        self._changed()


class ShardDataset:
    """Read access to a dataset folder (or one shard file): `len()`, indexing, slicing, iteration.

    `ds[i]` is a :class:`Sample` (hr, lr uint8, v float32, the record parsed on first use of `.params`);
    `ds[a:b]` (any step) a :class:`SampleBatch` with the arrays stacked. Files are opened lazily, once per
    process, so an instance can be handed to PyTorch DataLoader worker processes. Not for threads: its open
    files are shared and evicted without a lock; give each thread its own (`open_dataset` is cheap).
    `sharpen_hr`: the LR images were degraded from the unsharp-masked HR (make-dataset --sharpen-hr), for a
    folder and for a lone shard (whose `config` is None) alike.
    """

    # Shard files kept open per process (LRU; a dataset may have thousands). A plain shard (compression
    # "none", the default) holds under 1 MB of HDF5's state, read without a chunk cache (each sample is a
    # chunk of its own, and a read of one is a copy either way: HDF5's default 8 MiB per image dataset bought
    # nothing but memory); a reopen costs about 1.2 ms against 0.15 for a read of an open one, and 128 keep
    # the README's 100-shard recipe open (some 60-100 MB more per loader process than 32). A compressed one
    # keeps HDF5's default cache, which spares decompressing a chunk read again (the next epoch of a shard
    # that fits it: 4-18x faster there), and so MAX_OPEN_COMPRESSED of them at most (16 MiB each).
    MAX_OPEN = 128
    MAX_OPEN_COMPRESSED = 32

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
            self.sharpen_hr = self.config.sharpen_hr
            digests = [str(s["sha256"]) for s in manifest["shards"]]
        elif path.is_file():
            self.files = [path]
            count, self.patch_size, self.sharpen_hr = self._shape_of(path)
            counts = [count]
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
        self._starts = [int(x) for x in self.offsets[:-1]]  # first global index of each shard, for bisect
        self._pid: int | None = None
        self._handles: OrderedDict[int, _OpenShard] = OrderedDict()
        self._checked: dict[int, tuple[int, ...]] = {}  # shard -> the file (device, inode, size, mtime) checked
        # plain shards: no chunk cache and MAX_OPEN open; compressed ones (or a lone shard, which does not say):
        # HDF5's default cache, and fewer open (see MAX_OPEN)
        self._plain = self.config is not None and self.config.compression == "none"

    @staticmethod
    def _shape_of(path: Path) -> tuple[int, int, bool]:
        """A lone shard's sample count and patch size, from the file (checked like any shard), and whether its
        LR was degraded from the sharpened HR (its `command` attribute's sharpen_hr; absent: shards made
        before the option, which were not)."""
        import h5py

        try:
            with h5py.File(path, "r") as f:
                fmt = scalar_attr(f, "format")  # any attribute type: compare only a string
                if not isinstance(fmt, str) or fmt != FORMAT_NAME:
                    raise DatasetError(f"{path}: not a {FORMAT_NAME} shard")
                count, patch = check_shard(f, path, count=None, patch_size=None), int(f["hr"].shape[1])
                command = scalar_attr(f, "command")
        except OSError:
            raise DatasetError(f"{path}: not an HDF5 file") from None
        made_with = shard_command(command)
        sharpen = made_with.get("sharpen_hr", False) if made_with is not None else None
        if not isinstance(sharpen, bool):
            raise DatasetError(f"{path}: its command attribute does not say whether the HR was sharpened "
                               "(a damaged shard: degrade verify checks each one)")
        return count, patch, sharpen

    def _shard(self, k: int) -> _OpenShard:
        """Shard k, opened lazily in this process (e.g. a DataLoader worker), its structure checked against
        the manifest before any data is read; at most MAX_OPEN stay open, MAX_OPEN_COMPRESSED of compressed
        shards (least recently used closed)."""
        if self._pid != os.getpid():  # a fresh process: files the parent opened are not ours to use
            self._handles, self._pid, self._checked = OrderedDict(), os.getpid(), {}
        shard = self._handles.get(k)
        if shard is not None:
            self._handles.move_to_end(k)
            return shard
        import h5py

        try:
            handle = h5py.File(self.files[k], "r", rdcc_nbytes=0 if self._plain else None)
        except OSError as exc:
            raise DatasetError(f"{self.files[k]}: unreadable shard ({os_reason(exc)})") from None
        try:
            # Checked once per process while the file stays the one checked: a training run's random draws
            # over more shards than MAX_OPEN reopen them all the time (the check took 4.6 of a reopen's 4.8 ms)
            st = _file_stat(handle)
            seen = None if st is None else (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            if seen is None or seen != self._checked.get(k):
                check_shard(handle, self.files[k], count=self.counts[k], patch_size=self.patch_size)
                if seen is not None:
                    self._checked[k] = seen
            shard = _OpenShard(handle, self.files[k], st)
        except BaseException:
            handle.close()
            raise
        limit = self.MAX_OPEN if self._plain else min(self.MAX_OPEN, self.MAX_OPEN_COMPRESSED)
        while len(self._handles) >= limit:
            self._handles.popitem(last=False)[1].file.close()
        self._handles[k] = shard
        return shard

    def _handle(self, k: int) -> Any:
        """Shard k's open h5py file (see `_shard`)."""
        return self._shard(k).file

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, i: int) -> tuple[int, int]:
        """Global index -> (shard number, row in shard); negative indices count from the end."""
        n = len(self)
        if not -n <= i < n:
            raise SampleIndexError(f"sample {i} out of range: the dataset has {n} samples")
        i %= n
        k = bisect.bisect_right(self._starts, i) - 1
        return k, i - self._starts[k]

    def __getitem__(self, key: int | slice) -> Any:
        if isinstance(key, slice):
            return self._batch(range(len(self))[key])
        try:
            if isinstance(key, (bool, np.bool_)):  # an integer to Python, but ds[True] is a mistake, not sample 1
                raise TypeError
            i = operator.index(key)
        except TypeError:
            raise SampleIndexTypeError(f"a sample index must be an integer or a slice, not {key!r}") from None
        k, row = self.locate(i)
        s, (hr, lr, v, record) = self._read(k, row, lambda s: (s.hr[row], s.lr[row], s.v[row], one_string(
            s.params, row, limit=PARAMS_JSON_BYTES, where=s.where)))
        return Sample(hr, lr, v, record_json=as_text(record, s.where),
                      where=f"sample {self._starts[k] + row} ({s.path.name} row {row})")

    def _read(self, k: int, rows: Any, read: Callable[[_OpenShard], Any]) -> tuple[_OpenShard, Any]:
        """(shard k, read(shard k)) under the shard's read check (_OpenShard.reading). A file written to or
        touched while open (its modification time changed, its size not smaller) is closed, reopened,
        checked again as a file never seen and read once more: the read then sees one file, consistently;
        a second change meanwhile is a DatasetError."""
        for again in (False, True):
            s = self._shard(k)
            try:
                with s.reading(rows):
                    return s, read(s)
            except _Rewritten:
                self._handles.pop(k).file.close()
                if again:
                    raise
        raise AssertionError("unreachable")

    def stored_index(self, i: int) -> int:
        """The global sample index stored with the sample at position `i` (its `index` dataset): the key of
        its random stream. It differs from `i` in a lone shard file other than the first and after a
        missing shard of an incomplete dataset."""
        try:
            i = operator.index(i)
        except TypeError:
            raise SampleIndexTypeError(f"a sample index must be an integer, not {i!r}") from None
        k, row = self.locate(i)
        return int(self._read(k, row, lambda s: s.index[row])[1])

    def _batch(self, indices: range) -> SampleBatch:
        """The samples `indices` (a range of valid indices, any step) stacked, read one run per shard."""
        n, p = len(indices), self._patch()
        q = p // SCALE
        step, at = indices.step, 0
        runs = []
        while at < n:
            k, row = self.locate(indices[at])
            # The run of indices from `at` that lies in shard k: rows row, row + step, ... inside the shard.
            m = min(n - at, ((self.counts[k] - 1 - row) // step if step > 0 else row // -step) + 1)
            lo = row if step > 0 else row + (m - 1) * step
            rows = slice(lo, lo + (m - 1) * abs(step) + 1, abs(step))  # ascending; h5py reads no other order
            self._shard(k)  # checked against the manifest before anything is allocated for it
            runs.append((k, rows, slice(at, at + m)))
            at += m
        hr, lr = np.empty((n, p, p, 3), np.uint8), np.empty((n, q, q, 3), np.uint8)
        v, index, texts = np.empty((n, VECTOR_LENGTH), np.float32), np.empty(n, np.int64), []
        flip = slice(None, None, 1 if step > 0 else -1)
        for k, rows, out in runs:

            def run(s: _OpenShard, rows: slice = rows, out: slice = out) -> Any:
                if step > 0:  # straight into the batch's arrays: no temporary copy
                    s.hr.read_direct(hr, rows, out)
                    s.lr.read_direct(lr, rows, out)
                    s.v.read_direct(v, rows, out)
                    s.index.read_direct(index, rows, out)
                else:
                    hr[out], lr[out], v[out] = s.hr[rows][flip], s.lr[rows][flip], s.v[rows][flip]
                    index[out] = s.index[rows][flip]
                texts = string_rows(s.params, rows, limit=PARAMS_JSON_BYTES, where=s.where)
                return texts[flip]

            s, records = self._read(k, rows, run)  # open already, unless the slice spans more than MAX_OPEN shards
            texts += [as_text(t, s.where) for t in records]
        return SampleBatch(hr, lr, v, index, texts)

    def _patch(self) -> int:
        if self.patch_size is None:  # never: a folder has its config, a lone shard its file's
            raise DatasetError("patch size unknown")
        return self.patch_size

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self)):
            yield self[i]

    def column(self, name: str) -> Any:
        """A per-sample metadata dataset of every shard, concatenated: `v`, `level`, `index`,
        `source`, `crop` as arrays, `params` as a list of JSON strings (all in memory: for a large dataset
        :meth:`shard_column` one shard at a time)."""
        if name not in ROW_COLUMNS and name != "params":
            raise DatasetError(f"no per-sample metadata column {name!r}")
        parts = [self.shard_column(name, k) for k in range(len(self.files))]
        if name == "params":
            return [t for part in parts for t in part]
        if not parts:  # an incomplete dataset with no finished shard yet
            shape, dtype = ROW_COLUMNS[name]
            return np.empty((0, *shape), dtype)
        return np.concatenate(parts)

    def shard_column(self, name: str, k: int) -> Any:
        """:meth:`column` of shard k (0 to the number of finished shards - 1, in the dataset's order) alone."""
        if name not in ("v", "level", "index", "source", "crop", "params"):
            raise DatasetError(f"no per-sample metadata column {name!r}")
        if not 0 <= k < len(self.files):
            raise DatasetError(f"no shard {k}: the dataset has {len(self.files)} finished shard(s)")
        if name == "params":  # a few rows at a time, each checked: rows may share one long string
            s, values = self._read(k, "all", lambda s: string_rows(s.params, slice(None), limit=PARAMS_JSON_BYTES,
                                                                    where=s.where))
        else:
            s, values = self._read(k, "all", lambda s: s.file[name][:])
        return [as_text(x, s.where) for x in values] if name == "params" else values

    def close(self) -> None:
        if self._pid == os.getpid():  # close only what this process opened
            for shard in self._handles.values():
                shard.file.close()
        self._handles, self._pid = OrderedDict(), None

    def __getstate__(self) -> dict[str, Any]:  # open HDF5 handles do not cross processes
        state = self.__dict__.copy()
        state["_handles"], state["_pid"], state["_checked"] = OrderedDict(), None, {}
        return state


def open_dataset(path: str | os.PathLike, *, allow_incomplete: bool = False, checksums: bool = False) -> ShardDataset:
    """Open a dataset folder (or a single shard file) written by :func:`degrade.shards.make_dataset`.

    Always (cheap, metadata only): the manifest's shard list must match its configuration, and each
    shard's datasets must have the shapes and types the manifest implies before any is read.
    `checksums=True` also compares every shard's SHA-256 with the manifest now (reads each file once).
    """
    return ShardDataset(path, allow_incomplete=allow_incomplete, checksums=checksums)
