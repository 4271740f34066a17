"""make-dataset shards: schema, determinism, resume, bad inputs, refusal, verify, the reading API."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
from click.testing import CliRunner

import degrade
from cli.main import main
from degrade import shards as dsm
from degrade.io import MAX_PIXELS_ENV
from degrade.shards.write import _exclusive_lock


def _config(scan: dsm.SourceScan, **kw) -> dsm.DatasetConfig:
    # gzip, not lzf: h5py's LZF filter does not always give the same compressed bytes for the same chunk
    # (seen: one chunk 1 byte shorter, same pixels), so byte-for-byte comparisons would be flaky.
    base = dict(level="mix", count=20, patch_size=64, seed=3, shard_size=8, compression="gzip",
                source_root=scan.root, sources=tuple(scan.sources))
    return dsm.DatasetConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def bundled() -> dsm.SourceScan:
    return dsm.scan_sources([], 64)


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, bundled) -> Path:
    out = tmp_path_factory.mktemp("ref") / "ds"
    dsm.make_dataset(_config(bundled), out)
    return out


def test_shard_schema(reference, bundled):
    manifest = json.loads((reference / "manifest.json").read_text())
    assert manifest["complete"] and manifest["vector_layout"] == "dasr33-v1"
    assert [s["file"] for s in manifest["shards"]] == ["shard-00000.h5", "shard-00001.h5", "shard-00002.h5"]
    assert [s["count"] for s in manifest["shards"]] == [8, 8, 4]
    with h5py.File(reference / "shard-00002.h5", "r") as f:
        assert f["hr"].shape == (4, 64, 64, 3) and f["hr"].dtype == np.uint8
        assert f["lr"].shape == (4, 16, 16, 3) and f["lr"].dtype == np.uint8
        assert f["v"].shape == (4, 33) and f["v"].dtype == np.float32
        assert f["level"].dtype == np.uint8 and f["index"][:].tolist() == [16, 17, 18, 19]
        assert f["crop"].shape == (4, 4) and f["source"].dtype == np.int32
        assert f["hr"].chunks == (1, 64, 64, 3) and f["hr"].compression == "gzip"
        assert h5py.check_string_dtype(f["params"].dtype).encoding == "utf-8"
        assert [s.decode() for s in f["sources"][:]] == [s.path for s in bundled.sources]
        assert f.attrs["vector_layout"] == "dasr33-v1" and f.attrs["format_version"] == 1
        assert set(json.loads(f.attrs["recipes"])) == {"1", "2", "3", "mix_probs"}
        assert json.loads(f.attrs["command"])["level"] == "mix"
        assert f.attrs["package_version"] == degrade.__version__
        for row in range(4):
            record = degrade.DegradationParams.from_json(f["params"][row].decode())
            np.testing.assert_array_equal(degrade.encode(record), f["v"][row])
            assert record.level == f["level"][row]
            y, x, h, w = f["crop"][row]
            src = bundled.sources[f["source"][row]]
            assert 0 <= y <= src.height - h and 0 <= x <= src.width - w and h == w == 64


def test_stored_hr_is_the_source_crop_and_lr_its_degradation(reference, bundled):
    ds = degrade.open_dataset(reference)
    with h5py.File(reference / "shard-00001.h5", "r") as f:
        y, x, h, w = f["crop"][2]
        source = bundled.sources[f["source"][2]]
    photo = degrade.io.to_uint8(degrade.read_image(degrade.samples.sample_dir() / source.path))
    sample = ds[10]
    np.testing.assert_array_equal(sample.hr, photo[y : y + h, x : x + w])
    lr = degrade.apply(sample.hr.astype(np.float32) / np.float32(255), sample.params)
    np.testing.assert_array_equal(sample.lr, degrade.io.to_uint8(lr))


def test_each_sample_draws_source_crop_and_record_from_one_stream_in_the_documented_order(reference, bundled):
    """Missed: drawing the record from a fresh copy of the sample's stream (not after the source and crop
    draws) survived; every test regenerated samples with the code that made them. Oracle: the draws of
    docs/dataset-format.md ("How each sample is drawn") redone here: one generator
    default_rng(SeedSequence(S, spawn_key=(i,))), then rng.integers(n_sources), rng.integers(H - P + 1),
    rng.integers(W - P + 1), sample_params(level, rng), compared with the stored source, crop and record."""
    config = _config(bundled)
    with h5py.File(reference / "shard-00000.h5", "r") as f:
        stored = [(int(f["source"][i]), tuple(int(c) for c in f["crop"][i]),
                   degrade.DegradationParams.from_json(f["params"][i].decode())) for i in range(5)]
    for i, (source, crop, params) in enumerate(stored):
        rng = np.random.default_rng(np.random.SeedSequence(config.seed, spawn_key=(i,)))
        src = int(rng.integers(len(bundled.sources)))
        y = int(rng.integers(bundled.sources[src].height - 64 + 1))
        x = int(rng.integers(bundled.sources[src].width - 64 + 1))
        assert (source, crop) == (src, (y, x, 64, 64)), i
        assert params == degrade.sample_params("mix", rng), i


def test_same_bytes_for_any_number_of_jobs(reference, bundled, tmp_path):
    dsm.make_dataset(_config(bundled), tmp_path / "j2", jobs=2)
    assert _digests(tmp_path / "j2") == _digests(reference)


def test_shard_size_changes_only_the_packing(reference, bundled, tmp_path):
    dsm.make_dataset(_config(bundled, shard_size=20), tmp_path / "one")
    a, b = degrade.open_dataset(reference), degrade.open_dataset(tmp_path / "one")
    for i in (0, 9, 19):
        assert a[i].params == b[i].params and np.array_equal(a[i].lr, b[i].lr)


class Interrupt(Exception):
    pass


def test_interrupted_then_resumed_equals_uninterrupted(reference, bundled, tmp_path):
    out = tmp_path / "ds"
    done = []

    def stop_after_12(n: int) -> None:
        done.append(n)
        if sum(done) >= 12:  # during the second shard
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        dsm.make_dataset(_config(bundled), out, progress=stop_after_12)
    names = sorted(p.name for p in out.iterdir())
    assert names == [".lock", "manifest.json", "shard-00000.h5"]  # nothing half-written that looks complete
    assert not json.loads((out / "manifest.json").read_text())["complete"]
    with pytest.raises(dsm.DatasetError, match="incomplete"):
        degrade.open_dataset(out)
    report = dsm.make_dataset(_config(bundled), out)
    assert report.reused_shards == 1 and report.made == 12
    assert _digests(out) == _digests(reference)


def test_interrupted_with_worker_processes_then_resumed_equals_uninterrupted(reference, bundled, tmp_path):
    """With --jobs 2 the workers run ahead across shard boundaries (one stream of chunks); an interruption
    must still leave only whole shards, and resuming must give the same bytes."""
    out = tmp_path / "ds"
    done = []

    def stop_in_the_second_shard(n: int) -> None:
        done.append(n)
        if sum(done) >= 12:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        dsm.make_dataset(_config(bundled), out, jobs=2, progress=stop_in_the_second_shard)
    assert sorted(p.name for p in out.iterdir()) == [".lock", "manifest.json", "shard-00000.h5"]
    report = dsm.make_dataset(_config(bundled), out, jobs=2)
    assert report.reused_shards == 1 and report.made == 12
    assert _digests(out) == _digests(reference)


def test_a_sample_maker_is_compared_by_configuration_and_pickles_without_its_cache(bundled):
    """Equal makers let loky reuse its worker processes across runs (initargs compare equal)."""
    maker = dsm.SampleMaker(_config(bundled))
    maker.sample(0)
    assert maker.cache.paths  # a decoded source
    assert maker == dsm.SampleMaker(_config(bundled)) and maker != dsm.SampleMaker(_config(bundled, seed=4))
    clone = pickle.loads(pickle.dumps(maker))
    assert clone == maker and clone.cache.paths == []
    chunk = clone(range(2, 4))  # the executor's task: a chunk of samples
    assert chunk["index"].tolist() == [2, 3] and chunk["hr"].shape == (2, 64, 64, 3)
    np.testing.assert_array_equal(chunk["lr"][1], dsm.make_sample(_config(bundled), 3)[2].lr)


def test_each_shard_is_synced_to_disk_before_its_rename_and_the_manifest_after(tmp_path, monkeypatch):
    """After a power loss a shard the manifest lists holds its samples: its bytes are synced before the
    rename gives it its name, and the manifest's atomic write (synced, then its folder) comes after."""
    from .conftest import make_small_dataset

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(b))), real_replace(a, b)))
    out = tmp_path / "ds"
    make_small_dataset(out, count=4, seed=1, shard_size=2)
    shard_events = [(kind, Path(p).name) for kind, p in events if "shard-" in Path(p).name]
    assert shard_events == [("fsync", ".shard-00000.h5.partial"), ("replace", "shard-00000.h5"),
                            ("fsync", ".shard-00001.h5.partial"), ("replace", "shard-00001.h5")]
    manifests = [i for i, (kind, p) in enumerate(events) if kind == "replace" and Path(p).name == "manifest.json"]
    last_shard = next(i for i, (kind, p) in enumerate(events) if kind == "replace" and p.endswith("shard-00001.h5"))
    assert manifests and manifests[-1] > last_shard  # the manifest that lists the last shard comes after it
    assert all(events[i - 1][0] == "fsync" and events[i + 1] == ("fsync", str(out)) for i in manifests)


def test_resume_recovers_from_a_crash_between_rename_and_manifest(reference, bundled, tmp_path):
    out = tmp_path / "ds"
    dsm.make_dataset(_config(bundled), out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["shards"] = manifest["shards"][:1]
    manifest["complete"] = False
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / ".shard-00002.h5.partial").write_bytes(b"half a shard")
    dsm.make_dataset(_config(bundled), out)
    assert _digests(out) == _digests(reference)


def test_a_changed_command_is_refused(reference, bundled):
    before = _digests(reference)
    for change in ({"level": 2}, {"seed": 4}, {"count": 21}, {"compression": "lzf"}):
        with pytest.raises(dsm.DatasetError, match="different command"):
            dsm.make_dataset(_config(bundled, **change), reference)
    assert _digests(reference) == before


def test_another_version_refuses_to_finish_a_dataset_and_keeps_a_complete_ones_record(bundled, tmp_path,
                                                                                       monkeypatch):
    """Resumed by another degrade version, a dataset mixed two versions' shards (their samples could
    differ) with no word, and verify passed it (a review). Shards to make (missing, or damaged and to be
    made again) are refused now, in one line naming both versions, with nothing changed; an unfinished
    dataset's refusal comes from check_target, which make-dataset runs before its scan. A complete dataset
    is left as it is, its manifest still naming the version that made it (a second review: the first fix
    refused it too, and _study's datasets, reused when complete, with it)."""
    import degrade.shards.write as write

    out = tmp_path / "ds"
    dsm.make_dataset(_config(bundled, count=4, shard_size=2), out)
    made_by = json.loads((out / "manifest.json").read_text())["package_version"]
    complete = _digests(out)
    monkeypatch.setattr(write, "__version__", "9.9.9")
    assert dsm.make_dataset(_config(bundled, count=4, shard_size=2), out).reused_shards == 2
    assert _digests(out) == complete
    refusal = rf"^{out} was made by degrade {made_by}, and this is 9.9.9: its %s shards would be another version's"
    with (out / "shard-00001.h5").open("r+b") as f:  # damaged: to be made again
        f.seek(4000)
        f.write(b"\xff" * 8)
    damaged = _digests(out)
    with pytest.raises(dsm.DatasetError, match=refusal % "missing or damaged"):
        dsm.make_dataset(_config(bundled, count=4, shard_size=2), out)
    assert _digests(out) == damaged
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["shards"], manifest["complete"] = manifest["shards"][:1], False
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / "shard-00001.h5").unlink()
    unfinished = _digests(out)
    for make in (lambda: write.check_target(out, 4, 2), lambda: dsm.make_dataset(_config(bundled, count=4,
                                                                                         shard_size=2), out)):
        with pytest.raises(dsm.DatasetError, match=refusal % "missing"):
            make()
    assert _digests(out) == unfinished


def test_the_refusal_names_an_option_a_configuration_leaves_out_when_off(bundled, tmp_path):
    """sharpen_hr is left out of a configuration when off: a dataset made with it, asked again without it,
    was refused as made 'by a different command ()', naming nothing; and the other way round."""
    dsm.make_dataset(_config(bundled, count=2, shard_size=2, sharpen_hr=True), tmp_path / "sharp")
    dsm.make_dataset(_config(bundled, count=2, shard_size=2), tmp_path / "plain")
    for folder, asked, said in (("sharp", False, "sharpen_hr True -> False"),
                                ("plain", True, "sharpen_hr False -> True")):
        with pytest.raises(dsm.DatasetError, match=rf"different command \({said}\)"):
            dsm.make_dataset(_config(bundled, count=2, shard_size=2, sharpen_hr=asked), tmp_path / folder)


@pytest.mark.parametrize("first", [True, False])
def test_a_manifest_write_killed_before_its_rename_leaves_nothing_in_the_way(bundled, reference, tmp_path, first):
    """kill -9 inside a manifest write leaves its temporary file (.manifest.json.XXXX.tmp). In the first write
    the folder then held no manifest but that file, and the same command was refused ('not empty, holds no
    manifest.json'); in a later one the file stayed in the dataset for ever. The resume now takes it away."""
    out = tmp_path / "ds"
    if first:
        out.mkdir()
        (out / ".lock").write_bytes(b"")
    else:
        shutil.copytree(reference, out)
    (out / ".manifest.json.k1ll3d_.tmp").write_text('{"half": ')
    dsm.make_dataset(_config(bundled), out)
    assert _digests(out) == _digests(reference)  # (hidden files included: none is left)


def test_a_source_named_without_an_image_suffix_is_skipped_as_verify_would_refuse_it(tmp_path, monkeypatch):
    """A file named directly is read whatever its name, but verify --regenerate re-reads a source only by an
    image file name: a dataset made from `castle` or `castle.jfif` (or a link to a cache's blob, whose name the
    dataset records) could never pass it. The scan now skips such a file as unreadable, saying why; a PNM named
    directly is still a source."""
    photo = np.random.default_rng(5).integers(0, 256, (80, 80, 3), dtype=np.uint8)
    _write(tmp_path / "a.ppm", photo)
    for name in ("castle", "castle.jfif", "2c987c5c"):
        (tmp_path / name).write_bytes((tmp_path / "a.ppm").read_bytes())
    (tmp_path / "links").mkdir()  # a content-addressed cache's layout (DVC, git-annex): the dataset records the
    (tmp_path / "links" / "kite.png").symlink_to(tmp_path / "2c987c5c")  # target's name, which verify refuses
    scan = dsm.scan_sources([tmp_path / "castle", tmp_path / "castle.jfif", tmp_path / "a.ppm",
                             tmp_path / "links"], 64)
    assert [s.path for s in scan.sources] == ["a.ppm"]
    assert [(name, reason.split(" (")[0]) for name, reason in scan.unreadable] == [
        ("castle", "not an image file name"), ("castle.jfif", "not an image file name"),
        ("2c987c5c", f"not an image file name, the target of the link {tmp_path / 'links' / 'kite.png'}")]
    assert scan.unreadable[2][1].endswith("give a copy of the file")
    monkeypatch.chdir(tmp_path)  # a plain file given by a relative path is no link (its resolved path differs)
    scan = dsm.scan_sources(["castle.jfif", "a.ppm"], 64)
    assert scan.unreadable[0][1].startswith("not an image file name (") and scan.unreadable[0][1].endswith("rename it")
    dsm.make_dataset(_config(scan, count=4, shard_size=4), tmp_path / "ds")
    assert dsm.verify_dataset(tmp_path / "ds", regenerate=4) == []


def test_verify_regenerates_sources_past_the_default_cap_with_max_pixels(tmp_path, monkeypatch):
    """A dataset made with make-dataset --max-pixels from a photo above the default cap could not be verified
    with --regenerate: verify had no --max-pixels (the error's hint named one), and the source's refusal ended
    the whole check with one fatal line. verify now takes --max-pixels, and a source above the cap is each
    sample's listed problem."""
    _write(tmp_path / "src" / "a.png", np.random.default_rng(6).integers(0, 256, (96, 128, 3), dtype=np.uint8))
    monkeypatch.setenv("DEGRADE_MAX_PIXELS", "10000")  # the default cap, scaled down: the photo is 12,288 px
    made = CliRunner().invoke(main, ["make-dataset", str(tmp_path / "src"), "--out", str(tmp_path / "ds"),
                                     "--count", "3", "--patch-size", "64", "--jobs", "1", "--max-pixels", "20000"])
    assert made.exit_code == 0, made.output
    result = CliRunner().invoke(main, ["verify", str(tmp_path / "ds"), "--regenerate", "3"])
    problems = [line for line in result.output.splitlines() if line.startswith("problem: sample ")]
    assert result.exit_code == 1 and len(problems) == 3 and "above the 0.01 MP limit" in problems[0], result.output
    result = CliRunner().invoke(main, ["verify", str(tmp_path / "ds"), "--regenerate", "3", "--max-pixels", "20000"])
    assert result.exit_code == 0 and "OK (3 samples regenerated bit for bit)" in result.output, result.output


def test_a_foreign_non_empty_folder_is_refused(bundled, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(dsm.DatasetError, match="not empty"):
        dsm.make_dataset(_config(bundled), tmp_path)


def _write(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), array)


@pytest.fixture()
def messy_folder(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    src = tmp_path / "photos"
    _write(src / "a_rgb.png", rng.integers(0, 255, (80, 96, 3), dtype=np.uint8))
    _write(src / "sub" / "b_16bit.png", rng.integers(0, 65535, (72, 72, 3), dtype=np.uint16))
    _write(src / "sub" / "c_gray.png", rng.integers(0, 255, (70, 90), dtype=np.uint8))
    _write(src / "d_alpha.png", rng.integers(0, 255, (64, 64, 4), dtype=np.uint8))
    _write(src / "e_tiny.png", rng.integers(0, 255, (40, 200, 3), dtype=np.uint8))
    (src / "f_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (src / "g_text.png").write_text("this is not a picture")
    (src / "readme.txt").write_text("ignored: not an image suffix")
    return src


def test_bad_inputs_are_reported_not_fatal(messy_folder, tmp_path):
    scan = dsm.scan_sources([messy_folder], 64)
    assert [s.path for s in scan.sources] == ["a_rgb.png", "d_alpha.png", "sub/b_16bit.png", "sub/c_gray.png"]
    assert scan.too_small == ["e_tiny.png"]
    assert [p for p, _ in scan.unreadable] == ["f_corrupt.jpg", "g_text.png"]
    out = tmp_path / "ds"
    dsm.make_dataset(_config(scan, count=24), out)
    ds = degrade.open_dataset(out)
    with h5py.File(out / "shard-00000.h5", "r") as f:
        used = set(f["source"][:].tolist())
    assert len(ds) == 24 and used <= {0, 1, 2, 3}
    for i in range(len(ds)):
        assert ds[i].hr.dtype == np.uint8 and ds[i].hr.shape == (64, 64, 3)
    assert dsm.verify_dataset(out, regenerate=6) == []


def test_gray_source_gives_gray_rgb_patches(tmp_path):
    _write(tmp_path / "g" / "gray.png", np.random.default_rng(1).integers(0, 255, (64, 64), dtype=np.uint8))
    scan = dsm.scan_sources([tmp_path / "g"], 64)
    dsm.make_dataset(_config(scan, count=2), tmp_path / "ds")
    hr = degrade.open_dataset(tmp_path / "ds")[0].hr
    assert np.array_equal(hr[..., 0], hr[..., 1]) and np.array_equal(hr[..., 1], hr[..., 2])


def test_empty_or_unusable_sources_are_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(dsm.DatasetError, match="no source images"):
        dsm.scan_sources([tmp_path / "empty"], 64)
    with pytest.raises(dsm.DatasetError, match="no such file"):
        dsm.scan_sources([tmp_path / "missing"], 64)
    _write(tmp_path / "small" / "s.png", np.zeros((10, 10, 3), np.uint8))
    scan = dsm.scan_sources([tmp_path / "small"], 64)
    with pytest.raises(dsm.DatasetError, match="no usable source images"):
        _config(scan)


@pytest.mark.parametrize("bad", [{"patch_size": 66}, {"count": 0}, {"shard_size": 0}, {"compression": "zstd"}])
def test_bad_options_are_refused(bundled, bad):
    with pytest.raises(dsm.DatasetError):
        _config(bundled, **bad)


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_verify_catches_tampering(reference, tmp_path):
    assert dsm.verify_dataset(reference, regenerate=20) == []

    pixels = _copy(reference, tmp_path / "pixels")
    with h5py.File(pixels / "shard-00001.h5", "r+") as f:
        f["lr"][3, 5, 5, 0] ^= 1
    assert any("checksum" in p for p in dsm.verify_dataset(pixels))
    # A forger who also fixes the manifest checksum is caught by regeneration.
    manifest = json.loads((pixels / "manifest.json").read_text())
    manifest["shards"][1].update(sha256=hashlib.sha256((pixels / "shard-00001.h5").read_bytes()).hexdigest(),
                                 bytes=(pixels / "shard-00001.h5").stat().st_size)
    (pixels / "manifest.json").write_text(json.dumps(manifest))
    assert dsm.verify_dataset(pixels) == []
    assert dsm.verify_dataset(pixels, regenerate=20) == [
        "sample 11: regenerated pixels or v differ from the stored ones"]

    vector = _copy(reference, tmp_path / "vector")
    with h5py.File(vector / "shard-00000.h5", "r+") as f:
        f["v"][2, 18] = 0.99
    assert any("row 2: v or level does not match" in p for p in dsm.verify_dataset(vector))


def test_verify_lists_a_record_outside_the_vector_ranges_and_goes_on(reference, tmp_path):
    """A valid record that encode() refuses (sigma 10 px, beyond v's 3 px) is one problem naming its shard
    and row, not an abort that hides the rest."""
    bad = _copy(reference, tmp_path / "bad")
    with h5py.File(bad / "shard-00000.h5", "r+") as f:
        record = json.loads(f["params"][1])
        record["blur1"]["sigma_x"] = 10.0
        f["params"][1] = json.dumps(record)
        f["v"][4, 18] = 0.99  # and a second, later problem in the same shard
    with h5py.File(bad / "shard-00002.h5", "r+") as f:
        f["level"][0] = 7  # and one in another shard
    problems = dsm.verify_dataset(bad)
    assert any(p.startswith("shard-00000.h5 row 1: parameter record cannot be encoded as v (blur1.sigma_x")
               for p in problems), problems
    assert any(p.startswith("shard-00000.h5 row 4: v or level does not match") for p in problems), problems
    assert "shard-00002.h5: level outside 1-3" in problems
    result = CliRunner().invoke(main, ["verify", str(bad)])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert "shard-00000.h5 row 1" in result.output and "shard-00002.h5: level outside" in result.output


def test_verify_refuses_source_paths_that_leave_the_root(reference, tmp_path):
    forged = _copy(reference, tmp_path / "forged")
    manifest = json.loads((forged / "manifest.json").read_text())
    manifest["config"]["sources"][0]["path"] = "../../../etc/passwd"
    (forged / "manifest.json").write_text(json.dumps(manifest))
    config = dsm.DatasetConfig.from_dict(manifest["config"])
    with pytest.raises(dsm.DatasetError, match="refusing source path"):
        config.source_path(0)


def test_reading_api(reference, bundled):
    ds = degrade.open_dataset(reference)
    assert len(ds) == 20
    s = ds[13]
    assert s.hr.shape == (64, 64, 3) and s.lr.shape == (16, 16, 3) and s.v.shape == (33,)
    assert isinstance(s.params, degrade.DegradationParams)
    assert np.array_equal(ds[-1].lr, ds[19].lr)
    with pytest.raises(IndexError):
        ds[20]
    assert sum(1 for _ in ds) == 20
    # Any single sample can be regenerated alone from (seed, index).
    _, _, fresh = dsm.make_sample(_config(bundled), 13)
    assert np.array_equal(fresh.lr, s.lr) and fresh.params == s.params
    # Picklable for DataLoader workers; reopens its files lazily in the new process.
    clone = pickle.loads(pickle.dumps(ds))
    assert np.array_equal(clone[5].hr, ds[5].hr)
    one = degrade.open_dataset(reference / "shard-00001.h5")
    assert len(one) == 8 and np.array_equal(one[0].lr, ds[8].lr)


def test_open_dataset_refuses_non_datasets(tmp_path):
    with pytest.raises(dsm.DatasetError, match="not a dataset folder"):
        degrade.open_dataset(tmp_path)
    (tmp_path / "x.h5").write_bytes(b"nope")
    with pytest.raises(dsm.DatasetError, match="not an HDF5 file"):
        degrade.open_dataset(tmp_path / "x.h5")


def test_cli_make_dataset_and_verify(tmp_path, messy_folder):
    runner = CliRunner()
    out = tmp_path / "ds"
    args = ["make-dataset", str(messy_folder), "--out", str(out), "--count", "10", "--patch-size", "64",
            "--jobs", "1", "--level", "3"]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "made 10 samples (level 3: 10)" in result.output
    assert "1 smaller than 64 px skipped, 2 unreadable" in result.output
    assert "skipped unreadable f_corrupt.jpg" in result.output
    again = runner.invoke(main, args)
    assert again.exit_code == 0 and "nothing to do" in again.output
    changed = runner.invoke(main, [*args[:-1], "2"])
    assert changed.exit_code == 1 and "different command (level 3 -> 2)" in changed.output
    verified = runner.invoke(main, ["verify", str(out), "--regenerate", "3"])
    assert verified.exit_code == 0 and "OK" in verified.output


@pytest.mark.parametrize("args,message", [
    (["make-dataset", "nowhere"], "no such file"),
    (["make-dataset", "--patch-size", "66"], "multiple of 4"),
    (["make-dataset", "--compression", "zstd"], "zstd"),
    (["verify", "."], "not a dataset folder"),
    (["make-dataset", "--out", "afile/sub", "--count", "2"], "Not a directory"),
    (["inspect", "--help"], "Usage"),
])
def test_cli_bad_input(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("a file, not a folder")
    result = CliRunner().invoke(main, args)
    assert (result.exit_code != 0) == (args[-1] != "--help")
    assert message in result.output and "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception


@pytest.mark.parametrize("command", ["make-dataset", "verify"])
def test_cli_help(command):
    assert CliRunner().invoke(main, [command, "--help"]).exit_code == 0


def test_dask_cluster_on_loopback_gives_the_same_bytes(reference, tmp_path, monkeypatch):
    """The chunks are made by the cluster's workers, and with the --max-pixels given to make-dataset: the workers
    were started with a DEGRADE_MAX_PIXELS far below the sources, which must not apply to them."""
    distributed = pytest.importorskip("dask.distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=None, env={MAX_PIXELS_ENV: "1000"}) as cluster:
        # Patched after the workers started: a chunk made in this process is counted, one made by a worker
        # (which imports its own, unpatched SampleMaker) is not.
        made_here: list[range] = []
        chunk = dsm.SampleMaker.chunk
        monkeypatch.setattr(dsm.SampleMaker, "__call__", lambda self, rows: made_here.append(rows) or chunk(self, rows))
        result = CliRunner().invoke(main, [
            "make-dataset", "--out", str(tmp_path / "dask"), "--level", "mix", "--count", "20", "--patch-size", "64",
            "--seed", "3", "--shard-size", "8", "--compression", "gzip", "--dask-scheduler", cluster.scheduler_address,
            "--max-pixels", "1000000",
        ])
    assert result.exit_code == 0, result.output
    assert made_here == []  # joblib ran nothing locally
    assert _digests(tmp_path / "dask") == _digests(reference)


def test_the_pixel_cap_travels_with_the_task_not_the_workers_environment(reference, bundled, monkeypatch):
    """A Dask worker is someone else's long-lived process: make-dataset's cap must reach it inside the task."""
    from degrade.shards.executor import _call_in_worker

    stored = degrade.open_dataset(reference)
    expected = np.stack([stored[0].lr, stored[1].lr])
    task = pickle.loads(pickle.dumps(dsm.SampleMaker(_config(bundled), max_pixels=10**6)))  # as it travels
    monkeypatch.setenv(MAX_PIXELS_ENV, "1000")  # the worker's own setting, far below the 512 px wide sources
    np.testing.assert_array_equal(_call_in_worker(task, range(0, 2))["lr"], expected)
    with pytest.raises(degrade.ImageError, match="above the 0.001 MP limit"):  # without a cap, the worker's own
        _call_in_worker(dsm.SampleMaker(_config(bundled)), range(0, 2))
    report = dsm.make_dataset(_config(bundled, count=2), reference.parent / "capped", max_pixels=10**6)
    assert report.made == 2


def test_make_dataset_max_pixels_is_used_and_left_out_of_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(MAX_PIXELS_ENV, "2000000")  # put back after the test whatever the command does
    result = CliRunner().invoke(main, ["make-dataset", "--out", str(tmp_path / "d"), "--count", "2",
                                       "--max-pixels", "1000"])
    assert result.exit_code == 1 and "above the 0.001 MP limit" in result.output, result.output
    assert os.environ[MAX_PIXELS_ENV] == "2000000"  # handed to the library, not through this process's settings


def test_unreachable_dask_scheduler_is_a_clear_error(tmp_path, monkeypatch):
    pytest.importorskip("dask.distributed")
    monkeypatch.setattr("cli.main.DASK_CONNECT_TIMEOUT", "1s")  # the wait itself is Dask's: 10 s add nothing here
    result = CliRunner().invoke(main, ["make-dataset", "--out", str(tmp_path / "d"), "--count", "2",
                                       "--dask-scheduler", "tcp://127.0.0.1:9"])
    assert result.exit_code == 1 and "cannot reach the Dask scheduler" in result.output


def test_source_cache_is_bounded_by_bytes():
    paths = [str(p) for p in degrade.sample_images()[:3]]
    cache = dsm.SourceCache()
    first = cache.load(paths[0])
    cache.max_bytes = first.nbytes + 1
    assert cache.load(paths[0]) is first  # cached
    cache.load(paths[1])
    assert cache.paths == [paths[1]]  # the older image was evicted
    assert not first.flags.writeable
    assert pickle.loads(pickle.dumps(cache)).paths == []  # decoded images never travel between processes


def test_a_second_run_on_the_same_folder_is_refused_while_the_first_holds_the_lock(bundled, tmp_path):
    out = tmp_path / "ds"
    out.mkdir()
    with _exclusive_lock(out):
        with pytest.raises(dsm.DatasetError, match="another make-dataset run"):
            dsm.make_dataset(_config(bundled), out)


def test_resume_replaces_a_damaged_shard_of_the_same_size(reference, bundled, tmp_path):
    out = _copy(reference, tmp_path / "ds")
    data = bytearray((out / "shard-00001.h5").read_bytes())
    data[-100] ^= 0xFF
    (out / "shard-00001.h5").write_bytes(bytes(data))
    report = dsm.make_dataset(_config(bundled), out)
    assert report.reused_shards == 2 and report.made == 8
    assert _digests(out) == _digests(reference)


def test_many_shards_keep_few_files_open(bundled, tmp_path, monkeypatch):
    monkeypatch.setattr(dsm.ShardDataset, "MAX_OPEN", 2)
    dsm.make_dataset(_config(bundled, count=6, shard_size=1), tmp_path / "ds")
    ds = degrade.open_dataset(tmp_path / "ds")
    assert [ds[i].params.level for i in range(6)] == ds.column("level").tolist()
    assert len(ds._handles) == 2


def test_a_reopened_shard_is_checked_again_only_if_its_file_changed(bundled, tmp_path, monkeypatch):
    """Random draws over more shards than stay open reopen them all the time, and each reopen ran the whole
    structural check again (4.6 of a reopen's 4.8 ms: training over 60 shards ran at a third of its speed).
    A shard is now checked once per process while its file is the one checked (device, inode, size,
    modification time), and again once it is not. Open shards keep no chunk cache (8 MiB per dataset held
    for reads that never come back to a chunk)."""
    import degrade.shards.read as read

    monkeypatch.setattr(dsm.ShardDataset, "MAX_OPEN", 1)
    checks = []
    real = read.check_shard
    monkeypatch.setattr(read, "check_shard", lambda f, path, **kw: checks.append(path.name) or real(f, path, **kw))
    dsm.make_dataset(_config(bundled, count=4, shard_size=2), tmp_path / "ds")
    ds = degrade.open_dataset(tmp_path / "ds")
    for i in (0, 2, 1, 3, 0, 2):  # each read reopens its shard
        ds[i]
    assert checks == ["shard-00000.h5", "shard-00001.h5"]
    # HDF5's chunk cache only where chunks are compressed (this dataset: gzip), to spare a decompression when
    # a chunk is read again (the next epoch); none for plain ones: (metadata, slots, bytes, w0)
    assert ds._shard(0).file.id.get_access_plist().get_cache()[2] == 8 << 20
    ds[2]  # shard 0 closed again
    os.utime(tmp_path / "ds" / "shard-00000.h5", ns=(1, 1))  # another file there, as far as a reader can tell
    ds[0]
    assert checks == ["shard-00000.h5", "shard-00001.h5", "shard-00000.h5"]
    monkeypatch.setattr(dsm.ShardDataset, "MAX_OPEN", 3)
    dsm.make_dataset(_config(bundled, count=8, shard_size=2, compression="none"), tmp_path / "plain")
    plain = degrade.open_dataset(tmp_path / "plain")
    assert plain._shard(0).file.id.get_access_plist().get_cache()[2] == 0
    for i in range(8):
        plain[i]
    assert len(plain._handles) == 3  # MAX_OPEN plain shards; compressed ones at most MAX_OPEN_COMPRESSED
    monkeypatch.setattr(dsm.ShardDataset, "MAX_OPEN_COMPRESSED", 2)
    for i in range(4):
        ds[i]
    assert len(ds._handles) == 2


def test_float_tiff_is_reported_unreadable_by_the_scan(tmp_path):
    _write(tmp_path / "src" / "ok.png", np.zeros((64, 64, 3), np.uint8))
    floats = np.random.default_rng(0).random((64, 64, 3)).astype(np.float32)
    assert cv2.imwrite(str(tmp_path / "src" / "float.tiff"), floats)
    scan = dsm.scan_sources([tmp_path / "src"], 64)
    assert [s.path for s in scan.sources] == ["ok.png"]
    assert scan.unreadable[0][0] == "float.tiff" and "unsupported sample type" in scan.unreadable[0][1]


@pytest.mark.parametrize("mutate,message", [
    (lambda m: m.pop("config"), "malformed manifest"),
    (lambda m: m["shards"][0].pop("file"), "malformed manifest"),
    (lambda m: m.update(complete="yes"), "malformed manifest"),
    (lambda m: m["config"].update(count="many"), "malformed dataset configuration"),
])
def test_hand_edited_manifests_give_one_clear_error(reference, tmp_path, mutate, message):
    out = _copy(reference, tmp_path / "ds")
    manifest = json.loads((out / "manifest.json").read_text())
    mutate(manifest)
    (out / "manifest.json").write_text(json.dumps(manifest))
    for call in (lambda: dsm.verify_dataset(out), lambda: degrade.open_dataset(out)):
        with pytest.raises(dsm.DatasetError, match=message):
            call()


def test_unsharp_mask_numpy_equals_the_trainers_torch_version(hr_patch):
    """degrade.sharpen (cv2, float32) against dasr_model.data.unsharp_mask (torch, float64), 1e-5."""
    torch = pytest.importorskip("torch")
    from dasr_model.data import unsharp_mask as torch_usm
    from degrade.sharpen import unsharp_mask

    got = unsharp_mask(hr_patch)
    ref = torch_usm(torch.from_numpy(np.asarray(hr_patch, np.float64).transpose(2, 0, 1))[None])[0]
    np.testing.assert_allclose(got, ref.numpy().transpose(1, 2, 0), atol=1e-5)
    assert np.abs(got - hr_patch).max() > 0.05  # it does sharpen a photo
    with pytest.raises(ValueError, match="sides"):
        unsharp_mask(np.zeros((20, 40, 3), np.float32))


def test_sharpen_hr_degrades_the_sharpened_patch_and_stores_the_plain_one(tmp_path):
    from degrade import shards as dsm
    from degrade.io import to_uint8
    from degrade.sharpen import unsharp_mask

    scan = dsm.scan_sources([], 64)
    common = dict(level=2, count=3, patch_size=64, seed=4, shard_size=3, compression="none",
                  source_root=scan.root, sources=tuple(scan.sources))
    plain = dsm.DatasetConfig(**common)
    sharp = dsm.DatasetConfig(**common, sharpen_hr=True)
    assert "sharpen_hr" not in plain.to_dict() and sharp.to_dict()["sharpen_hr"] is True
    assert dsm.DatasetConfig.from_dict(sharp.to_dict()) == sharp
    assert dsm.DatasetConfig.from_dict(plain.to_dict()) == plain
    dsm.make_dataset(sharp, tmp_path / "s")
    ds = degrade.open_dataset(tmp_path / "s")
    for i, s in enumerate(ds):
        _, _, ref = dsm.make_sample(plain, i)
        np.testing.assert_array_equal(s.hr, ref.hr)  # the same plain patch is stored
        expected = to_uint8(degrade.apply(unsharp_mask(s.hr.astype(np.float32) / 255), s.params))
        np.testing.assert_array_equal(s.lr, expected)
        assert not np.array_equal(s.lr, ref.lr)
    with pytest.raises(dsm.DatasetError, match="sharpen_hr"):  # resuming with other options is refused
        dsm.make_dataset(plain, tmp_path / "s")


def _small_config(count: int = 4, shard_size: int = 2):
    from degrade import shards as dsm

    scan = dsm.scan_sources([], 64)
    return dsm.DatasetConfig(level="mix", count=count, patch_size=64, seed=0, shard_size=shard_size,
                             compression="none", source_root=scan.root, sources=tuple(scan.sources))


def test_the_lock_file_is_never_followed_or_waited_on(tmp_path):
    """DIR/.lock as a symlink (it created its target outside the dataset) or a FIFO (the open waited for a
    reader for ever) is refused in one line, touching nothing; a folder refused for its foreign manifest
    is left without a stray .lock."""
    import os

    from degrade import shards as dsm
    from degrade.errors import DatasetError

    outside = tmp_path / "outside"
    for kind in ("symlink", "fifo"):
        out = tmp_path / kind
        out.mkdir()
        if kind == "symlink":
            (out / ".lock").symlink_to(outside)
        else:
            os.mkfifo(out / ".lock")
        with pytest.raises(DatasetError, match=r"\.lock: is (a symlink|not a regular file)"):
            dsm.make_dataset(_small_config(), out)
        assert not outside.exists() and sorted(p.name for p in out.iterdir()) == [".lock"]
    foreign = tmp_path / "webapp"
    foreign.mkdir()
    (foreign / "manifest.json").write_text('{"name": "a web app"}')
    with pytest.raises(DatasetError):
        dsm.make_dataset(_small_config(), foreign)
    assert sorted(p.name for p in foreign.iterdir()) == ["manifest.json"]


def test_configs_of_earlier_versions_still_hold(tmp_path):
    """What earlier versions accepted stays accepted: a seed of any size (SeedSequence takes it; a bound
    would strand datasets made with one), and sources given as the list scan_sources returns."""
    from degrade import shards as dsm

    scan = dsm.scan_sources([], 64)
    config = dsm.DatasetConfig(level=2, count=2, patch_size=64, seed=4611686018427387904000, shard_size=2,
                               compression="none", source_root=scan.root, sources=list(scan.sources))
    assert isinstance(config.sources, tuple)
    dsm.make_dataset(config, tmp_path / "ds")
    assert len(dsm.open_dataset(tmp_path / "ds")) == 2


def test_resume_makes_a_symlinked_shard_again(tmp_path):
    """A shard replaced by a symlink to an identical copy elsewhere was 'already complete' on resume, while
    the reader refuses symlinks; it is made again, as a regular file, with the same bytes."""
    from degrade import shards as dsm

    out = tmp_path / "ds"
    dsm.make_dataset(_small_config(), out)
    original = (out / "shard-00001.h5").read_bytes()
    (tmp_path / "elsewhere.h5").write_bytes(original)
    (out / "shard-00001.h5").unlink()
    (out / "shard-00001.h5").symlink_to(tmp_path / "elsewhere.h5")
    report = dsm.make_dataset(_small_config(), out)
    assert report.reused_shards == 1 and not (out / "shard-00001.h5").is_symlink()
    assert (out / "shard-00001.h5").read_bytes() == original
    assert len(dsm.open_dataset(out)) == 4


def test_a_dataset_too_large_to_plan_is_refused_first(tmp_path, run_cli=None):
    """--count had no bound: a billion samples took 6.6 GB of plan before the first sample, 10**30 hung.
    Now at most 100M samples in at most 100,000 shards, refused before anything is made."""
    from click.testing import CliRunner

    from cli.main import main
    from degrade import shards as dsm
    from degrade.errors import DatasetError

    for count, shard_size in ((10**8 + 1, 10**6), (200_001, 2)):
        with pytest.raises(DatasetError, match="at most 100,000,000 samples in at most 100,000 shards"):
            dsm.make_dataset(_small_config(count, shard_size), tmp_path / "big")
    assert not (tmp_path / "big").exists()
    result = CliRunner().invoke(main, ["make-dataset", "--out", str(tmp_path / "big"), "--count", str(10**9)])
    assert result.exit_code == 2 and "--count" in result.output and not (tmp_path / "big").exists()


def test_make_sample_refuses_an_index_the_dataset_does_not_hold(tmp_path):
    """make_sample(cfg, count) returned a sample that is not in the dataset."""
    from degrade.errors import SampleIndexError

    from .conftest import make_small_dataset

    src = make_small_dataset(tmp_path / "ds", count=4, seed=1, shard_size=4)
    cfg = degrade.open_dataset(src).config
    assert dsm.make_sample(cfg, 3)[2].v.shape == (33,)
    for bad in (4, -1, True, 1.0):
        with pytest.raises(SampleIndexError, match="out of range: the dataset has 4 samples"):
            dsm.make_sample(cfg, bad)


def test_a_manifest_or_record_that_names_a_key_twice_is_refused(tmp_path):
    """A JSON object naming a key twice says two things (Python keeps the last, other readers the first):
    a dataset manifest, a test set's manifest and a parameter record doing so are refused in one line."""
    from degrade.errors import DegradeError
    from degrade.params import DegradationParams

    from .conftest import make_small_dataset

    out = tmp_path / "ds"
    make_small_dataset(out, count=2, seed=1, shard_size=2)
    text = (out / "manifest.json").read_text()
    (out / "manifest.json").write_text(text.replace('"count": 2,', '"count": 2, "count": 1,', 1))
    with pytest.raises(dsm.DatasetError, match="unreadable manifest .*'count' appears twice in one object"):
        degrade.open_dataset(out)
    with pytest.raises(DegradeError, match="not a parameter record: the key 'level' appears twice"):
        DegradationParams.from_json('{"level": 1, "level": 2}')
    ts = tmp_path / "ts"
    degrade.make_testset(degrade.sample_images()[0].parent, ts, levels=(1,), seed=0)
    text = (ts / "manifest.json").read_text()
    (ts / "manifest.json").write_text(text.replace('"seed": 0,', '"seed": 0, "seed": 1,', 1))
    with pytest.raises(DegradeError, match="not a readable JSON manifest .*'seed' appears twice"):
        degrade.open_testset(ts)


def test_sharpen_hr_is_said_by_a_folder_and_by_a_lone_shard(tmp_path):
    """ds.sharpen_hr says whether the LR was degraded from the sharpened HR, for a dataset folder and for a
    lone shard (whose config is None: the option was only in its raw command attribute, so the documented
    replay silently gave other bytes); a shard whose command attribute is damaged is refused in one line."""
    import h5py

    from degrade import shards as dsm

    scan = dsm.scan_sources([], 64)
    common = dict(level=2, count=2, patch_size=64, seed=4, shard_size=2, compression="none",
                  source_root=scan.root, sources=tuple(scan.sources))
    for sharpen in (False, True):
        out = tmp_path / f"s{sharpen}"
        dsm.make_dataset(dsm.DatasetConfig(**common, sharpen_hr=sharpen), out)
        for path in (out, out / "shard-00000.h5"):
            assert degrade.open_dataset(path).sharpen_hr is sharpen
    lone = tmp_path / "lone.h5"
    lone.write_bytes((tmp_path / "sTrue" / "shard-00000.h5").read_bytes())
    for damaged in ("not json", "[1]", '{"sharpen_hr": "yes"}'):
        with h5py.File(lone, "r+") as f:
            f.attrs["command"] = damaged
        with pytest.raises(dsm.DatasetError, match="does not say whether the HR was sharpened"):
            degrade.open_dataset(lone)


def test_a_source_replaced_after_the_scan_is_refused_not_stored_under_its_name(tmp_path):
    """The scan pins each source by its SHA-256; the workers decoded whatever the file held when they read it.
    A photo replaced by another of the same size between the scan and a worker's read (or another file at the
    same path on a remote Dask worker) was stored under the first one's name and passed verify. Now the bytes
    a worker decodes must have the scan's digest; the shards made before the change are kept."""
    rng = np.random.default_rng(4)
    photo = rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)
    _write(tmp_path / "src" / "a.png", photo)
    scan = dsm.scan_sources([tmp_path / "src"], 64)
    _write(tmp_path / "src" / "a.png", 255 - photo)  # the same size and name, other pixels
    with pytest.raises(dsm.DatasetError, match=r"a\.png: changed since it was scanned \(its SHA-256 differs"):
        dsm.make_dataset(_config(scan, count=4, shard_size=2), tmp_path / "ds")
    _write(tmp_path / "src" / "a.png", photo)  # restored: the same command finishes, with the scanned pixels
    dsm.make_dataset(_config(scan, count=4, shard_size=2), tmp_path / "ds")
    ds = degrade.open_dataset(tmp_path / "ds")
    for i in range(len(ds)):
        y, x = ds.column("crop")[i][:2]
        assert np.array_equal(ds[i].hr, photo[y:y + 64, x:x + 64, ::-1])  # (cv2.imwrite took it as BGR)
