"""Manifests and shards that lie (about sizes, types, numbers or text) are refused in one line before
anything large is allocated; what reading returns is what the files store."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

import degrade
from cli.main import main
from degrade import shards as dsm
from degrade.errors import DatasetError, DegradeError, SampleIndexError, SampleIndexTypeError
from degrade.inspect import dataset_stats
from degrade.params import DegradationParams

from .conftest import make_small_dataset

HUGE = "9" * 5000  # more digits than Python turns into an int by default (4300)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """9 samples of 64 px in shards of 3."""
    return Path(make_small_dataset(tmp_path_factory.mktemp("lying") / "ds", count=9, seed=2, shard_size=3))


@pytest.fixture()
def small(reference, tmp_path) -> Path:
    """A fresh copy of `reference` to damage."""
    return Path(shutil.copytree(reference, tmp_path / "ds"))


def _edit_manifest(folder: Path, edit) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    edit(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _rehash(folder: Path) -> None:
    """The manifest's checksum and size of each shard made true again after a shard was edited (a lying dataset
    whose manifest agrees with its shards)."""
    def rehash(m):
        for e in m["shards"]:
            data = (folder / e["file"]).read_bytes()
            e.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())

    _edit_manifest(folder, rehash)


def _cli(*args) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    return result.output


# --- 1: a fixed-length `params` dataset -------------------------------------------------------------------


def test_fixed_length_params_are_refused_before_they_are_read(small, monkeypatch):
    """A few MB of file declaring S100000 x n gzip-chunked rows that were never written (2 GB to read)."""
    path = small / "shard-00001.h5"
    with h5py.File(path, "r+") as f:
        del f["params"]
        f.create_dataset("params", (3,), dtype="S100000", chunks=(1,), compression="gzip")
    real_read = h5py.Dataset.__getitem__

    def guarded(self, *args):
        if self.name == "/params" and Path(self.file.filename).name == path.name:
            pytest.fail("params was read before the check")
        return real_read(self, *args)

    monkeypatch.setattr(h5py.Dataset, "__getitem__", guarded)
    for target in (small, path):
        with pytest.raises(DatasetError, match=re.escape("params is |S100000") + ".*expected variable-length strings"):
            degrade.open_dataset(target).column("params")
    monkeypatch.setattr(h5py.Dataset, "__getitem__", real_read)
    assert "expected variable-length strings" in _cli("inspect", path, "--json")
    assert any("expected variable-length strings" in p for p in dsm.verify_dataset(small))


# --- 2: numbers too large -----------------------------------------------------------------------------------


def test_a_number_with_thousands_of_digits_is_a_refusal(reference, small, tmp_path):
    config = degrade.open_dataset(reference).config
    text = (small / "manifest.json").read_text().replace('"seed": 2', f'"seed": {HUGE}')
    (small / "manifest.json").write_text(text)
    for call in (lambda: degrade.open_dataset(small), lambda: dsm.verify_dataset(small),
                 lambda: dsm.make_dataset(config, small)):  # a resume reads the manifest
        with pytest.raises(DatasetError, match="unreadable manifest .a number of more than 4300 digits.$"):
            call()
    assert "more than 4300 digits" in _cli("inspect", small)
    with pytest.raises(DegradeError, match="not a parameter record: a number of more than 4300 digits$"):
        DegradationParams.from_json(f'{{"level": {HUGE}}}')
    (tmp_path / "p.json").write_text(f'{{"level": {HUGE}}}')
    result = CliRunner().invoke(main, ["apply", "-o", str(tmp_path / "o.png"), "--params", str(tmp_path / "p.json")])
    assert result.exit_code == 1 and "more than 4300 digits" in result.output, result.output


@pytest.mark.parametrize("count", ["1e400", "Infinity", "-Infinity", "NaN", str(10**30), str(2**63)])
def test_counts_beyond_int64_are_refused(small, count):
    text = (small / "manifest.json").read_text()
    (small / "manifest.json").write_text(text.replace('"count": 9', f'"count": {count}'))
    for call in (lambda: degrade.open_dataset(small), lambda: dsm.verify_dataset(small)):
        with pytest.raises(DatasetError, match="malformed dataset configuration: --count must be"):
            call()


@pytest.mark.parametrize("n", [10**30, 2**62])
def test_a_huge_count_with_a_matching_shard_entry_is_refused(small, n):
    """count = shard_size = n and one shard entry of n samples: len(range) overflowed for 10**30; below
    2**63 the shard's shapes (or its size) give it away before anything is read."""
    def edit(m):
        m["config"].update(count=n, shard_size=n)
        m["shards"] = [dict(m["shards"][0], count=n)]
    _edit_manifest(small, edit)
    message = "--count must be in" if n >= 2**63 else f"expected uint8 \\({n}, 64, 64, 3\\)"
    with pytest.raises(DatasetError, match=message):
        degrade.open_dataset(small)[0]
    assert "count must be in" in _cli("inspect", small) if n >= 2**63 else "expected uint8" in _cli("inspect", small)
    if n >= 2**63:
        with pytest.raises(DatasetError, match=message):
            dsm.verify_dataset(small)
    else:
        assert any(str(n) in p for p in dsm.verify_dataset(small))


# --- 3: the configuration is validated, not coerced ----------------------------------------------------------


@pytest.mark.parametrize("key,value,message", [
    ("seed", -5, "--seed must be a non-negative integer"),
    ("seed", True, "--seed must be a non-negative integer"),
    ("seed", 2.0, "--seed must be a non-negative integer"),
    ("count", "9", "--count must be an integer"),
    ("count", 9.0, "--count must be an integer"),
    ("count", 9.7, "--count must be an integer"),
    ("count", True, "--count must be an integer"),
    ("patch_size", "64", "--patch-size must be an integer"),
    ("shard_size", 0, "--shard-size must be in"),
    ("level", "2", "--level must be"),
    ("level", True, "--level must be"),
    ("level", 2.0, "--level must be"),
    ("compression", 1, "--compression must be"),
    ("source_root", 7, "source_root must be a string"),
    ("sharpen_hr", 1, "sharpen_hr must be true or false"),
    ("sources", {}, "sources must be a list"),
    ("height", 10, "smaller than the 64-px patch"),
    ("height", -1, "height and width must be in"),
    ("width", "512", "height and width must be an integer"),
    ("width", 2**40, "height and width must be in"),
    ("sha256", 5, "must be strings"),
    ("sha256", "../x", "sha256 must be 64 lowercase hex digits"),
])
def test_the_configuration_is_checked_not_coerced(small, key, value, message):
    def edit(m):
        if key in ("height", "width", "sha256"):
            for s in m["config"]["sources"]:
                s[key] = value
        else:
            m["config"][key] = value
    _edit_manifest(small, edit)
    for call in (lambda: degrade.open_dataset(small), lambda: dsm.verify_dataset(small, regenerate=3)):
        with pytest.raises(DatasetError, match=f"malformed dataset configuration: .*{message}"):
            call()
    assert message.split()[0] in _cli("verify", small, "--regenerate", 3)


def test_the_writers_configuration_reads_back_equal(reference):
    config = degrade.open_dataset(reference).config
    assert dsm.DatasetConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


# --- 4: text that is not UTF-8 --------------------------------------------------------------------------------


def test_a_record_that_is_not_utf8_is_refused(small):
    path = small / "shard-00001.h5"
    with h5py.File(path, "r+") as f:
        del f["params"]
        f.create_dataset("params", (3,), dtype=h5py.string_dtype("utf-8"))[:] = [b"\xff\xfe{"] * 3
    ds = degrade.open_dataset(small)
    message = f"{path}: params: not valid UTF-8 .byte 0xff at offset 0.$"
    for call in (lambda: ds[3], lambda: ds[2:5], lambda: ds[::-1], lambda: ds.column("params"),
                 lambda: degrade.open_dataset(path)[0]):
        with pytest.raises(DatasetError, match=message):
            call()
    assert ds[2].params is not None  # the other shards read as before
    assert "not valid UTF-8" in _cli("inspect", small, "--index", 3)
    assert "not valid UTF-8" in _cli("inspect", path)
    assert any("not valid UTF-8" in p for p in dsm.verify_dataset(small))


# --- 5: a slice checks its shards before allocating -------------------------------------------------------


def test_a_slice_checks_the_shards_before_allocating_the_batch(small):
    """A patch of 2**20 px (its sources claiming to be as large): a batch of 3 would be about 10 TB."""
    def edit(m):
        m["config"]["patch_size"] = 2**20
        for s in m["config"]["sources"]:
            s.update(height=2**20, width=2**20)
    _edit_manifest(small, edit)
    ds = degrade.open_dataset(small)
    for key in (slice(0, 3), slice(None, None, -1)):
        with pytest.raises(DatasetError, match="patch size 1048576"):
            ds[key]


# --- 6: malformed lone shards ---------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["scalar v", "null v", "null hr", "format pair", "format number"])
def test_malformed_lone_shards_are_refused_in_one_line(small, damage):
    path = small / "shard-00000.h5"
    with h5py.File(path, "r+") as f:
        if damage.endswith(" v") or damage.endswith(" hr"):
            key = damage.split()[1]
            dtype = f[key].dtype
            del f[key]
            f.create_dataset(key, data=np.zeros((), dtype) if damage.startswith("scalar") else h5py.Empty(dtype))
        elif damage == "format pair":
            f.attrs["format"] = ["degrade-shards", "degrade-shards"]
        else:
            f.attrs["format"] = 1
    with pytest.raises(DatasetError):
        degrade.open_dataset(path)
    _cli("inspect", path)


# --- 7: the indices a batch reports are the stored ones -------------------------------------------------------


def test_batches_report_the_stored_global_indices(small):
    lone = degrade.open_dataset(small / "shard-00001.h5")
    assert lone[0:2].indices.tolist() == [3, 4] and lone[::-1].indices.tolist() == [5, 4, 3]
    assert [lone.stored_index(i) for i in (0, 1, 2, -1, np.int64(1))] == [3, 4, 5, 5, 4]
    with pytest.raises(SampleIndexTypeError):
        lone.stored_index(1.0)
    with pytest.raises(SampleIndexError):
        lone.stored_index(3)

    def drop_the_middle_shard(m):
        m["shards"].pop(1)
        m["complete"] = False
    _edit_manifest(small, drop_the_middle_shard)
    gap = degrade.open_dataset(small, allow_incomplete=True)
    assert gap[:].indices.tolist() == [0, 1, 2, 6, 7, 8]
    assert gap[::-2].indices.tolist() == [8, 6, 1] and gap[1:5:3].indices.tolist() == [1, 7]
    assert gap.stored_index(3) == 6
    assert gap[0:6].indices.tolist() == gap.column("index").tolist()


# --- 8: JSON output stays JSON ----------------------------------------------------------------------------


def test_statistics_of_a_v_holding_nan_are_null_in_json(small):
    with h5py.File(small / "shard-00000.h5", "r+") as f:
        v = f["v"][:]
        v[0, 0] = np.nan
        f["v"][:] = v
    result = CliRunner().invoke(main, ["inspect", str(small), "--json"])
    assert result.exit_code == 0, result.output

    def refuse(token):
        raise AssertionError(f"{token} is not JSON")
    stats = json.loads(result.output, parse_constant=refuse)
    first = stats["fields"][0]
    assert first["min"] is None and first["mean"] is None and first["max"] is None
    assert all(f["mean"] is not None for f in stats["fields"][1:] if f["absent"] < 9)


def test_a_dataset_with_no_finished_shard_is_one_line(small):
    def no_shards(m):
        m["shards"] = []
        m["complete"] = False
    _edit_manifest(small, no_shards)
    ds = degrade.open_dataset(small, allow_incomplete=True)
    assert ds.column("v").shape == (0, 33) and ds.column("params") == [] and len(ds[:]) == 0
    with pytest.raises(DatasetError, match="no samples yet"):
        dataset_stats(ds)
    assert "no samples yet" in _cli("inspect", small)


def test_another_vector_layout_is_refused_in_the_manifest_and_in_each_shard(small):
    """v's 33 numbers mean what the layout says: a dataset or a shard of another layout (a later version's,
    even at the same length) is refused where it is opened, not read with this version's meaning (the test
    set's reader did already; the shards' did not: training ran on one)."""
    assert dsm.open_dataset(small)[0].v.shape == (33,)
    _edit_manifest(small, lambda m: m.update(vector_layout="dasr33-v2"))
    assert "vector layout 'dasr33-v2' (this code reads dasr33-v1)" in _cli("verify", small)
    with pytest.raises(DatasetError, match="vector layout 'dasr33-v2'"):
        dsm.open_dataset(small)
    _edit_manifest(small, lambda m: m.update(vector_layout="dasr33-v1"))
    with h5py.File(small / "shard-00001.h5", "r+") as f:
        f.attrs["vector_layout"] = "dasr33-v2"
    ds = dsm.open_dataset(small)  # (checksums are compared on demand only)
    assert ds[0].v.shape == (33,)  # shard 0 is fine
    with pytest.raises(DatasetError, match=r"shard-00001.h5: vector layout 'dasr33-v2'"):
        ds[3]
    with pytest.raises(DatasetError, match=r"shard-00001.h5: vector layout 'dasr33-v2'"):
        dsm.open_dataset(small / "shard-00001.h5")  # a lone shard


@pytest.mark.parametrize("key,value", [("sha256", "0" * 64), ("height", 9999), ("width", 65)])
def test_an_edited_source_record_fails_verify_and_regeneration_lists_it(small, key, value):
    """A manifest whose sources table was edited (a source's SHA-256, height or width) passed a plain verify:
    each shard pins the table by a digest now. For shards without it (made before), --regenerate ended the
    whole check at a size edit with one fatal error blaming an unchanged photo; it lists each sample now."""
    assert CliRunner().invoke(main, ["verify", str(small)]).exit_code == 0
    _edit_manifest(small, lambda m: m["config"]["sources"][0].update({key: value}))
    result = CliRunner().invoke(main, ["verify", str(small)])
    assert result.exit_code == 1 and "its sources table differs from the manifest's sources" in result.output
    for shard in small.glob("shard-*.h5"):  # shards made before the digest was recorded: the regeneration's
        with h5py.File(shard, "r+") as f:  # problem to find, sample by sample
            del f.attrs["sources_sha256"]
    _rehash(small)  # the manifest of those shards
    if key == "sha256":
        assert CliRunner().invoke(main, ["verify", str(small)]).exit_code == 0  # what a plain verify cannot see
    result = CliRunner().invoke(main, ["verify", str(small), "--regenerate", "9"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert lines[0].startswith("problem: sample ") and lines[-1].endswith("problem(s) found"), result.output



def test_a_malformed_sources_digest_is_a_listed_problem(small):
    """verify compares a shard's sources_sha256 as text: an array, a number or undecodable bytes there is that
    shard's listed problem, never a traceback."""
    for value in (np.array([1, 2]), 7, b"\xff\xfe"):
        with h5py.File(small / "shard-00000.h5", "r+") as f:
            f.attrs["sources_sha256"] = value
        result = CliRunner().invoke(main, ["verify", str(small)])
        assert result.exit_code == 1 and "Traceback" not in result.output, (value, result.output)
        assert "shard-00000.h5: its sources table differs from the manifest's sources" in result.output


def _replace_sources(shard: Path, make) -> None:
    with h5py.File(shard, "r+") as f:
        del f["sources"]
        make(f)


@pytest.mark.parametrize("damage", ["external link", "soft link", "scalar", "huge", "fixed length", "numbers"])
def test_a_shards_sources_table_is_checked_before_verify_reads_it(small, tmp_path, damage):
    """verify reads each shard's `sources` table (nothing else does): it gets the row datasets' checks first,
    so a link to another file (a FIFO here, whose open would block for ever), a scalar, or a declared shape
    out of proportion to the file is that shard's problem, read from nowhere."""
    fifo = tmp_path / "fifo.h5"
    os.mkfifo(fifo)
    text = h5py.string_dtype()
    make = {"external link": lambda f: f.__setitem__("sources", h5py.ExternalLink(str(fifo), "sources")),
            "soft link": lambda f: f.__setitem__("sources", h5py.SoftLink("/params")),
            "scalar": lambda f: f.create_dataset("sources", data=b"castle.png", dtype=text),
            "huge": lambda f: f.create_dataset("sources", shape=(30_000_000,), dtype=text),
            "fixed length": lambda f: f.create_dataset("sources", data=np.array([b"x" * 9] * 6, dtype="S9")),
            "numbers": lambda f: f.create_dataset("sources", data=np.arange(6))}[damage]
    _replace_sources(small / "shard-00001.h5", make)
    _rehash(small)
    result = CliRunner().invoke(main, ["verify", str(small)])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    problems = [line for line in result.output.splitlines() if line.startswith("problem: ")]
    expected = ("(dataset 'sources' missing or a link)" if "link" in damage else
                "shard-00001.h5: sources is ")
    assert len(problems) == 1 and expected in problems[0], result.output


@pytest.mark.parametrize("value", [5, "[1]", "not json", "[" * 100_000 + "]" * 100_000, np.array([1, 2]), b"\xff"])
def test_a_damaged_command_attribute_is_a_listed_problem(small, value):
    """The configuration a shard records (its `command` attribute, JSON) of another type, not JSON, no object,
    or nested past the parser's depth: the shard was made with another configuration, said in one listed
    problem, not a traceback (nor "unreadable HDF5" for the parser's recursion error)."""
    with h5py.File(small / "shard-00000.h5", "r+") as f:
        f.attrs["command"] = value
    _rehash(small)
    result = CliRunner().invoke(main, ["verify", str(small)])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    problems = [line for line in result.output.splitlines() if line.startswith("problem: ")]
    assert len(problems) == 1 and "shard-00000.h5: made with another configuration than the manifest's (" \
        in problems[0], result.output


def _share_one_string(path: Path, dataset: str, size: int) -> None:
    """Every row of a shard's variable-length string dataset pointed at one `size`-byte string: it is
    written once (row 0), then row 0's 16-byte pointer (length, heap address, object index) copied over
    the others, as a crafted file would hold it."""
    with h5py.File(path, "r+") as f:
        f[dataset][0] = "x" * size
        at, rows = f[dataset].id.get_offset(), f[dataset].shape[0]
    with open(path, "r+b") as fh:
        fh.seek(at)
        pointer = fh.read(16)
        fh.seek(at)
        fh.write(pointer * rows)


def test_rows_sharing_one_long_string_are_refused_without_inflating(tmp_path, monkeypatch):
    """A 10 MB shard whose 2,000 params rows all point at one 2 MB string read as 4-8 GB (a security
    review): verify, inspect and batch reads read the whole column. Rows are now read in blocks whose
    worst case (each row the file's size) fits STRING_BUDGET, here made 4 files' worth, each row checked
    against PARAMS_JSON_BYTES. Oracle: numpy's peak (tracemalloc) against the inflated size."""
    import tracemalloc

    from degrade.shards import strings

    folder = Path(make_small_dataset(tmp_path / "ds", count=64, seed=2, shard_size=64))
    shard = folder / "shard-00000.h5"
    _share_one_string(shard, "params", 1 << 18)
    _rehash(folder)
    with h5py.File(shard, "r") as f:
        assert len(f["params"][5]) == 1 << 18 and shard.stat().st_size < 2 << 20  # 64 x 256 kB = 16 MB inflated
    ds = dsm.open_dataset(folder)
    monkeypatch.setattr(strings, "STRING_BUDGET", 4 * shard.stat().st_size)
    tracemalloc.start()
    with pytest.raises(DatasetError, match="params: row 0 holds a string of 262144 bytes, more than 1024"):
        ds.shard_column("params", 0)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 4 * (1 << 18) + (1 << 20), peak  # a block of 4 rows at most, not 64
    with pytest.raises(DatasetError, match="holds a string of 262144 bytes"):
        ds[0:16]
    with pytest.raises(DatasetError, match="row 5 holds a string of 262144 bytes"):  # one sample alike
        ds[5]
    out = _cli("verify", folder)
    assert "shard-00000.h5: params: row 0 holds a string of 262144 bytes, more than 1024" in out, out


def test_an_array_attribute_is_not_read(small):
    """An array attribute can point every element at one long string (8 GB from a 10 MB shard in the
    review): attributes are read only where they hold one value; an array is named by its shape."""
    with h5py.File(small / "shard-00000.h5", "r+") as f:
        del f.attrs["vector_layout"]
        f.attrs.create("vector_layout", ["dasr33-v1"] * 64, dtype=h5py.string_dtype())
    _rehash(small)
    with pytest.raises(DatasetError, match=r"vector layout <an array attribute of shape \(64,\), not read>"):
        dsm.open_dataset(small)[0]


# --- 9: columns a forger edited, the manifest's checksums made to agree ---------------------------------------


def _forge_crop(f) -> None:
    y, x = (int(n) for n in f["crop"][1][:2])
    f["crop"][1, 0] = y - 1 if y > 0 else y + 1  # a crop the source would allow, not the one its stream drew


FORGED = {  # column: (its forgery in row 1 of shard-00001.h5, --regenerate, the problem verify lists)
    "index": (lambda f: f["index"].__setitem__(1, 3), 0, "shard-00001.h5: sample indices are not 3..5"),
    "level": (lambda f: f["level"].__setitem__(1, 1 + f["level"][1] % 3), 0,
              "shard-00001.h5 row 1: v or level does not match the parameter record"),
    "source": (lambda f: f["source"].__setitem__(1, 6), 0, "shard-00001.h5: source rows outside 0..5"),
    "crop": (_forge_crop, 9, "sample 4: source or crop differs from its stream"),
}


@pytest.mark.parametrize("column", FORGED)
def test_verify_lists_a_forged_column_whose_checksum_the_forger_fixed(small, column):
    """A shard's index, level, source and crop columns, each edited in one row with the manifest's checksum
    and size made true again (_rehash), are verify's one problem: with the index check dropped, the level
    left out of the record comparison, a source row of len(sources) let through (<= for <), or the crop left
    out of --regenerate's comparison, every test passed (a mutation audit: their tampering changed pixels, v
    or a level outside 1-3). Oracle: the stored values (row 1 of shard 1 is sample 4; 6 sources; 9 samples),
    and the one line each check writes."""
    assert json.loads((small / "manifest.json").read_text())["config"]["count"] == 9
    assert len(json.loads((small / "manifest.json").read_text())["config"]["sources"]) == 6
    forge, regenerate, problem = FORGED[column]
    assert dsm.verify_dataset(small, regenerate=regenerate) == []
    with h5py.File(small / "shard-00001.h5", "r+") as f:
        before = f[column][1].copy()
        forge(f)
        assert not np.array_equal(f[column][1], before)
    _rehash(small)
    assert dsm.verify_dataset(small, regenerate=regenerate) == [problem]


def test_verify_counts_the_samples_the_shards_hold_against_the_manifest(small):
    """verify adds up the samples of the shards it could read and lists a shortfall against the manifest's
    count: without that line every test passed (a mutation audit). A forged count alone cannot reach it:
    the manifest's shard list must be what its count implies (a count of 10 over 3 shards of 3 is refused
    before anything is opened), so the line comes with the missing shard it adds up. Oracle: 9 samples in
    shards of 3, one shard gone: 6 held."""
    _edit_manifest(small, lambda m: m["config"].update(count=10))
    with pytest.raises(DatasetError, match="says complete=True but lists 3 of 4 shards"):
        dsm.verify_dataset(small)
    _edit_manifest(small, lambda m: m["config"].update(count=9))
    (small / "shard-00001.h5").unlink()
    assert dsm.verify_dataset(small) == ["shard-00001.h5: missing", "the shards hold 6 samples, the manifest says 9"]
