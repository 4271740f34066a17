"""The reading API: samples and slices, uint8 out, lazy records, cached h5py objects, one set of open files
per process (DataLoader workers), refusals. Speed is measured in benchmarks/bench_read.py, not here."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import re
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

import degrade
from degrade.errors import DatasetError, DegradeError, SampleIndexTypeError
from degrade.shards import Sample, SampleBatch

from .conftest import make_small_dataset
from .test_hostile import _forge_shard


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """20 samples of 64 px in shards of 8, 8 and 4."""
    return Path(make_small_dataset(tmp_path_factory.mktemp("read") / "ds", count=20, seed=3, shard_size=8))


def test_a_sample_is_uint8_pixels_and_unpacks_as_before(folder):
    ds = degrade.open_dataset(folder)
    s = ds[9]
    assert isinstance(s, Sample)
    assert s.hr.dtype == np.uint8 and s.hr.shape == (64, 64, 3) and s.hr.flags.c_contiguous
    assert s.lr.dtype == np.uint8 and s.lr.shape == (16, 16, 3)
    assert s.v.dtype == np.float32 and s.v.shape == (33,)
    hr, lr, v, params = s
    assert hr is s.hr and lr is s.lr and v is s.v and params == s.params and len(s) == 4
    assert s[0] is s.hr and s[-2] is s.v and s[3] == s.params
    with h5py.File(folder / "shard-00001.h5", "r") as f:  # exactly the stored rows
        np.testing.assert_array_equal(s.hr, f["hr"][1])
        np.testing.assert_array_equal(s.lr, f["lr"][1])
        np.testing.assert_array_equal(s.v, f["v"][1])
        assert s.record_json == f["params"][1].decode()
    assert s.params == degrade.DegradationParams.from_json(s.record_json)
    np.testing.assert_array_equal(degrade.encode(s.params), s.v)


def test_the_record_is_parsed_once_and_only_when_used(folder, monkeypatch):
    ds = degrade.open_dataset(folder)
    calls = []
    real = degrade.DegradationParams.from_json.__func__

    def counting(cls, text):
        calls.append(text)
        return real(cls, text)

    monkeypatch.setattr(degrade.DegradationParams, "from_json", classmethod(counting))
    s = ds[4]
    assert s.hr.shape == (64, 64, 3) and s.lr.shape == (16, 16, 3) and s[2].shape == (33,)
    assert calls == []
    assert s.params is s.params and s.params.level in (1, 2, 3)
    assert len(calls) == 1
    batch = ds[0:5]
    assert len(calls) == 1 and len(batch.params) == 5 and len(calls) == 6


def test_a_record_that_does_not_parse_is_refused_when_used(folder, tmp_path):
    copy = tmp_path / "ds"
    copy.mkdir()
    for p in folder.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    with h5py.File(copy / "shard-00000.h5", "r+") as f:
        f["params"][2] = "{"
    s = degrade.open_dataset(copy)[-18]  # sample 2
    assert s.hr.shape == (64, 64, 3)
    with pytest.raises(DegradeError, match=r"^sample 2 \(shard-00000.h5 row 2\): not valid JSON"):
        s.params  # which sample, not only what is wrong with it
    batch = degrade.open_dataset(copy)[1:4]
    with pytest.raises(DegradeError, match=r"^sample 2: not valid JSON"):
        batch.params
    with pytest.raises(DegradeError, match=r"^sample 2: not valid JSON"):
        batch[1].params
    assert pickle.loads(pickle.dumps(s)).record_json == "{"  # the location travels with a pickled sample
    with pytest.raises(DegradeError, match=r"^sample 2 \("):
        pickle.loads(pickle.dumps(s)).params
    old = object.__new__(type(s))  # a pickle made before the location was kept: 5 items
    old.__setstate__(s.__getstate__()[:5])
    with pytest.raises(DegradeError, match=r"^not valid JSON"):
        old.params


@pytest.mark.parametrize("key", [
    slice(1, 3), slice(6, 11), slice(0, 20), slice(None, None, -1), slice(17, 3, -5), slice(None, None, 3),
    slice(-3, None), slice(15, 2, -1), slice(5, 5), slice(100, 200), slice(2, 19, 7),
])
def test_slices_are_batches_of_the_same_samples(folder, key):
    ds = degrade.open_dataset(folder)
    batch = ds[key]
    indices = list(range(len(ds)))[key]
    assert isinstance(batch, SampleBatch) and len(batch) == len(indices)
    assert batch.indices.tolist() == indices and batch.indices.dtype == np.int64
    assert batch.hr.shape == (len(indices), 64, 64, 3) and batch.hr.dtype == np.uint8
    assert batch.lr.shape == (len(indices), 16, 16, 3) and batch.lr.dtype == np.uint8
    assert batch.v.shape == (len(indices), 33) and batch.v.dtype == np.float32
    for j, i in enumerate(indices):
        one = ds[i]
        np.testing.assert_array_equal(batch.hr[j], one.hr)
        np.testing.assert_array_equal(batch.lr[j], one.lr)
        np.testing.assert_array_equal(batch.v[j], one.v)
        assert batch.record_json[j] == one.record_json and batch[j].params == one.params
    assert [s.record_json for s in batch] == [ds[i].record_json for i in indices]
    if indices:
        assert batch[-1].hr.base is not None  # a view into the batch, not a copy
        with pytest.raises(IndexError):
            batch[len(indices)]


def test_batches_and_samples_pickle(folder):
    ds = degrade.open_dataset(folder)
    s, batch = ds[3], ds[2:6]
    s2, batch2 = pickle.loads(pickle.dumps(s)), pickle.loads(pickle.dumps(batch))
    np.testing.assert_array_equal(s2.hr, s.hr)
    assert s2.params == s.params and batch2.params == batch.params
    np.testing.assert_array_equal(batch2.lr, batch.lr)


@pytest.mark.parametrize("key", [1.5, "3", [1, 2], np.array([1, 2]), None, True, np.bool_(False)])
def test_an_index_that_is_not_an_integer_or_a_slice_is_refused(folder, key):
    ds = degrade.open_dataset(folder)
    with pytest.raises(SampleIndexTypeError) as info:
        ds[key]
    assert isinstance(info.value, DatasetError) and isinstance(info.value, TypeError)
    assert ds[np.int64(4)].record_json == ds[4].record_json  # NumPy integers are integers


def test_datasets_are_looked_up_once_per_open_shard(folder, monkeypatch):
    ds = degrade.open_dataset(folder)
    ds[0], ds[8], ds[16]  # every shard opened
    lookups = []
    real = h5py.Group.__getitem__

    def counting(self, name):
        lookups.append(name)
        return real(self, name)

    monkeypatch.setattr(h5py.Group, "__getitem__", counting)
    for i in range(len(ds)):
        ds[i]
    ds[0:20]
    assert lookups == []


def test_slices_of_a_crafted_shard_are_refused_before_any_read(tmp_path, monkeypatch):
    small = Path(make_small_dataset(tmp_path / "small", count=6, seed=2, shard_size=3))
    _forge_shard(small / "shard-00001.h5", v=(100_000_000, 33))
    real_read = h5py.Dataset.__getitem__

    def guarded(self, *args):
        if Path(self.file.filename).name == "shard-00001.h5":
            pytest.fail("the forged shard was read before the check")
        return real_read(self, *args)

    monkeypatch.setattr(h5py.Dataset, "__getitem__", guarded)
    ds = degrade.open_dataset(small)
    assert len(ds[0:3]) == 3  # the good shard
    with pytest.raises(DatasetError, match="v is float32"):
        ds[1:5]


def _read_in_child(ds, indices, queue):
    parent_pid = ds._pid
    rows = [ds[i].hr.tobytes() for i in indices]
    queue.put((parent_pid, ds._pid, os.getpid(), rows))


def test_each_process_opens_its_own_files(folder):
    """A DataLoader worker is forked (or spawned with a pickled copy): it must not use the parent's open
    HDF5 files, and a pickled dataset carries none."""
    ds = degrade.open_dataset(folder)
    expected = [ds[i].hr.tobytes() for i in (0, 9, 19)]  # the parent's files are open now
    assert ds._pid == os.getpid() and len(ds._handles) == 3
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._handles == {} and clone._pid is None
    for method in ("fork", "spawn"):
        ctx = multiprocessing.get_context(method)
        queue = ctx.Queue()
        child = ctx.Process(target=_read_in_child, args=(ds, (0, 9, 19), queue))
        child.start()
        before, after, pid, rows = queue.get(timeout=120)
        child.join(timeout=60)
        assert child.exitcode == 0
        assert pid != os.getpid() and after == pid  # the child opened its own files
        assert before == (os.getpid() if method == "fork" else None)  # forked: it saw the parent's, unused
        assert rows == expected
    assert [ds[i].hr.tobytes() for i in (0, 9, 19)] == expected  # the parent's files still work


def test_a_damaged_compressed_chunk_is_refused_naming_its_shard_and_rows(tmp_path):
    """h5py says only "Can't synchronously read data (filter returned failure during read)" for a damaged
    compressed chunk: the refusal names the shard and the rows, as a DatasetError the CLIs print in one line."""
    src = Path(make_small_dataset(tmp_path / "ds", count=4, seed=1, shard_size=4))
    shard = src / "shard-00000.h5"
    with h5py.File(shard, "r") as f:
        attrs, data = dict(f.attrs), {k: (f[k][:], f[k].chunks) for k in f}
    with h5py.File(shard, "w") as f:  # the same shard, its HR patches gzip-compressed (a foreign writer's choice)
        f.attrs.update(attrs)
        for key, (values, chunks) in data.items():
            f.create_dataset(key, data=values, chunks=chunks, compression="gzip" if key == "hr" else None)
    with h5py.File(shard, "r") as f:
        chunk = f["hr"].id.get_chunk_info(1)  # row 1's chunk
    with open(shard, "r+b") as f:
        f.seek(chunk.byte_offset + chunk.size // 2)
        f.write(b"\xff" * 64)
    ds = degrade.open_dataset(src)
    assert ds[0].hr.shape == (64, 64, 3)  # the other rows read
    with pytest.raises(DatasetError, match=r"shard-00000.h5: row 1 could not be read \(.*\): a damaged shard"):
        ds[1]
    with pytest.raises(DatasetError, match=r"shard-00000.h5: rows 0-2 could not be read"):
        ds[0:3]
    with pytest.raises(DatasetError, match=r"shard-00000.h5: rows 1-3 \(every 2\) could not be read"):
        ds[1:4:2]
    assert len(ds[0:4:3]) == 2  # rows 0 and 3: the damaged one is not among them


def test_a_column_names_and_shard_numbers_are_checked(folder):
    ds = degrade.open_dataset(folder)
    with pytest.raises(DatasetError, match="no per-sample metadata column 'bogus'"):
        ds.column("bogus")
    with pytest.raises(DatasetError, match="no shard -1"):
        ds.shard_column("v", -1)
    with pytest.raises(DatasetError, match=f"no shard {len(ds.files)}"):
        ds.shard_column("v", len(ds.files))
    assert np.array_equal(np.concatenate([ds.shard_column("v", k) for k in range(len(ds.files))]), ds.column("v"))


def test_a_batch_slices_into_a_batch_and_refuses_what_it_does_not_hold(folder):
    """batch[a:b] is a batch of the same samples (it was a TypeError); an index past the batch is the
    dataset's SampleIndexError naming the batch (it was an IndexError about a range object)."""
    import degrade

    ds = degrade.open_dataset(folder)
    batch = ds[0:4]
    sub = batch[1:4:2]
    assert isinstance(sub, type(batch)) and list(sub.indices) == [1, 3]
    np.testing.assert_array_equal(sub.lr, ds[1:4:2].lr)
    assert sub[1].params == ds[3].params and batch[-1].params == ds[3].params
    with pytest.raises(degrade.shards.SampleIndexError, match="sample 4 is outside this batch of 4"):
        batch[4]
    with pytest.raises(SampleIndexTypeError, match="an integer or a slice, got str"):
        batch["1"]


def test_a_shard_cut_shorter_while_open_is_refused_not_read_as_zeros(tmp_path):
    """HDF5 reads an open file cut shorter (a copy replaced in place, a disk error) as zeros past its new end,
    without an error: a training run carried on with black LR patches. Every read path now compares the open
    file's size with its size at open and refuses a shorter one, naming the shard; the untouched shard reads on."""
    src = Path(make_small_dataset(tmp_path / "ds", count=8, seed=3, shard_size=4))
    ds = degrade.open_dataset(src)
    intact = ds[5]
    ds[0], ds[4]  # both shards open
    shard = src / "shard-00000.h5"
    size = shard.stat().st_size
    os.truncate(shard, size * 2 // 3)
    message = f"shard-00000.h5: truncated while open ({size * 2 // 3} of its {size} bytes left)"
    for read in (lambda: ds[3], lambda: ds[0:2], lambda: ds[::-3], lambda: ds.stored_index(1),
                 lambda: ds.shard_column("v", 0), lambda: ds.column("params")):
        with pytest.raises(DatasetError, match=re.escape(message)):
            read()
    np.testing.assert_array_equal(ds[5].lr, intact.lr)  # the other shard is whole
    ds.close()


def test_a_shard_written_to_while_open_is_read_again_from_its_new_file(tmp_path):
    """A shard overwritten in place by another of the same size (cp, rsync --inplace: truncated, then written
    back) while open read the new file's pixels beside the old one's v from HDF5's cache, without an error.
    A changed modification time now closes the shard, checks its file again as one never seen, and reads it
    once more: the pixels and v of one file. A file only touched reads on as it was."""
    a = Path(make_small_dataset(tmp_path / "a", count=8, seed=1, shard_size=8))
    b = Path(make_small_dataset(tmp_path / "b", count=8, seed=2, shard_size=8))
    assert (a / "shard-00000.h5").stat().st_size == (b / "shard-00000.h5").stat().st_size
    ds, other = degrade.open_dataset(a), degrade.open_dataset(b)
    before = ds[1]
    os.utime(a / "shard-00000.h5", ns=(1, 1))  # touched: the same bytes
    again = ds[1]
    assert np.array_equal(again.lr, before.lr) and np.array_equal(again.v, before.v)
    shutil.copyfile(b / "shard-00000.h5", a / "shard-00000.h5")
    for read in (lambda d: d[1], lambda d: d[0:3][1], lambda d: d.shard_column("v", 0)[1]):
        got, want = read(ds), read(other)
        for key in ("lr", "hr", "v"):
            if hasattr(want, key):
                assert np.array_equal(getattr(got, key), getattr(want, key)), key
        if isinstance(want, np.ndarray):
            assert np.array_equal(got, want)
    ds.close()
    other.close()
