"""Hostile input and faults (issue 13): bounded memory, no crash, nothing read or left behind.

Each test names the attack or fault it tries; docs/dataset-format.md has the table of outcomes.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import types
import zlib
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
from click.testing import CliRunner

import degrade
from cli.main import main
from degrade import shards as dsm
from degrade.errors import DatasetError, DegradeError, ImageError
from degrade.io import MAX_PIXELS_ENV, image_size, max_file_bytes
from degrade.pipeline import check_work

from .conftest import make_small_dataset

ROOT = Path(__file__).resolve().parent.parent


def _config(**kw) -> dsm.DatasetConfig:
    scan = dsm.scan_sources([], 64)
    base = dict(level="mix", count=40, patch_size=64, seed=5, shard_size=10, compression="none",
                source_root=scan.root, sources=tuple(scan.sources))
    return dsm.DatasetConfig(**{**base, **kw})


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.h5"))}


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_a_source_whose_name_is_not_utf8_is_skipped_as_unreadable(tmp_path):
    """A dataset stores source names as UTF-8: a name that is not (bytes the OS gives back as lone surrogates)
    crashed make-dataset with a UnicodeEncodeError's traceback after the scan, leaving a manifest and a lock."""
    hr = tmp_path / "hr"
    hr.mkdir()
    photo = degrade.sample_images()[0].read_bytes()
    (hr / "good.png").write_bytes(photo)
    bad = os.fsdecode(b"bad\xff\xfe.png")
    (hr / bad).write_bytes(photo)
    done = _cli("make-dataset", str(hr), "--out", str(tmp_path / "ds"), "--count", "2", "--patch-size", "64",
                "--jobs", "1")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "skipped unreadable bad\\xff\\xfe.png: its name is not UTF-8" in done.stderr, done.stderr
    assert [s.path for s in degrade.open_dataset(tmp_path / "ds").config.sources] == ["good.png"]


# --- disk full --------------------------------------------------------------------------------------


def test_injected_enospc_mid_shard_is_one_line_and_resumable(tmp_path, monkeypatch):
    reference = tmp_path / "ref"
    dsm.make_dataset(_config(), reference)
    out = tmp_path / "ds"
    writes = {"n": 0}
    real_setitem = h5py.Dataset.__setitem__

    def full_disk(self, key, value):
        writes["n"] += 1
        if writes["n"] > 20:  # the third shard, part-way
            raise OSError(errno.ENOSPC, "Driver write request failed (file write failed: ...\n, errno = 28)")
        return real_setitem(self, key, value)

    monkeypatch.setattr(h5py.Dataset, "__setitem__", full_disk)
    with pytest.raises(DatasetError) as info:
        dsm.make_dataset(_config(), out)
    message = str(info.value)
    assert "\n" not in message and "No space left on device" in message and "same command" in message
    assert not list(out.glob(".*.partial"))
    monkeypatch.setattr(h5py.Dataset, "__setitem__", real_setitem)
    dsm.make_dataset(_config(), out)  # the same command resumes
    assert _digests(out) == _digests(reference)


def test_too_little_free_space_is_refused_before_the_shard_is_started(tmp_path, monkeypatch):
    out = tmp_path / "ds"

    class Full:
        f_bavail, f_frsize = 10, 4096

    monkeypatch.setattr(os, "statvfs", lambda path: Full())
    with pytest.raises(DatasetError, match="not enough free space for shard-00000.h5"):
        dsm.make_dataset(_config(), out)
    assert not list(out.glob("*.h5")) and not list(out.glob(".*.partial"))


def test_shard_size_bound_holds(tmp_path):
    for compression in ("none", "gzip"):
        config = _config(compression=compression, count=23, shard_size=23)
        out = tmp_path / compression
        dsm.make_dataset(config, out)
        assert (out / "shard-00000.h5").stat().st_size <= dsm.shard_bytes_bound(config, 0)


def _mount_tmpfs(path: Path, size: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_a_real_full_disk_ends_with_one_line_exit_1_and_resumes(tmp_path, jobs):
    """A 5 MB tmpfs (needs root; skipped otherwise): before the fix, h5py segfaulted (exit 139)."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "5m"):
        pytest.skip("needs root to mount a small tmpfs")
    try:
        args = ["make-dataset", "--count", "120", "--patch-size", "128", "--shard-size", "40", "--jobs", jobs]
        for filler in (0, 1500, 3500):  # kB already taken: the disk fills in different shards
            for p in disk.iterdir():
                shutil.rmtree(p) if p.is_dir() else p.unlink()
            if filler:
                (disk / "filler").write_bytes(b"\0" * filler * 1024)
            done = _cli(*args, "--out", str(disk / "d"))
            errors = [line for line in done.stderr.splitlines() if line.startswith("Error")]
            assert done.returncode == 1, done.stderr[-2000:]
            assert len(errors) == 1 and "free space" in errors[0] and "Traceback" not in done.stderr
            assert not list((disk / "d").glob(".*.partial"))
        (disk / "filler").unlink()
        shutil.copytree(disk / "d", tmp_path / "d")  # the folder as the full disk left it, on a roomy disk
        assert _cli(*args, "--out", str(tmp_path / "d")).returncode == 0
        clean = tmp_path / "clean"
        assert _cli(*args, "--out", str(clean)).returncode == 0
        assert _digests(tmp_path / "d") == _digests(clean)
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


# --- no orphans ----------------------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended (its reaper may be slow)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("sig,group", [(signal.SIGKILL, False), (signal.SIGTERM, False), (signal.SIGTERM, True)])
def test_workers_end_within_seconds_when_make_dataset_is_killed(tmp_path, sig, group):
    """A SIGTERM (a scheduler's stop) ends make-dataset as Ctrl-C does: the hint to run it again, exit 143 (it
    used to die without a word); SIGKILL is sudden. Either way the workers end within seconds. A SIGTERM to
    the whole process group (`timeout`, Slurm, systemd) hung it at times (a worker killed while it sent a
    256-px chunk: loky's reader waited for ever), or was dropped in a finaliser and the run went on."""
    out = tmp_path / "ds"
    with open(tmp_path / "stderr", "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "cli.main", "make-dataset", "--out", str(out), "--count",
                                 "20000", "--jobs", "2", *(["--patch-size", "256", "--shard-size", "16"] if group
                                                          else ["--patch-size", "64"])], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=err, start_new_session=group)
    try:
        deadline, kids = time.monotonic() + 90, []
        while time.monotonic() < deadline:  # wait until the workers are making samples
            kids = _children(proc.pid)
            if len(kids) >= 2 and (out / ("shard-00001.h5" if group else ".shard-00000.h5.partial")).exists():
                break
            time.sleep(0.2)
        assert len(kids) >= 2, "the workers never started"
    except BaseException:
        proc.kill()
        raise
    if group:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL) if group else proc.kill()
        raise
    start = time.monotonic()
    while any(_alive(k) for k in kids) and time.monotonic() - start < 10:
        time.sleep(0.1)
    left = [k for k in kids if _alive(k)]
    for k in left:  # do not leave them behind even when the test fails
        os.kill(k, signal.SIGKILL)
    assert not left, f"workers still alive {time.monotonic() - start:.1f} s after the parent died"
    if sig == signal.SIGTERM:
        assert proc.returncode == 143, (tmp_path / "stderr").read_text()[-2000:]
        assert (tmp_path / "stderr").read_text().splitlines()[-1] == ("terminated: run the same command again to "
                                                                      "finish the dataset")


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_a_disk_that_fills_during_a_shard_still_ends_with_one_line_and_exit_1(tmp_path, jobs):
    """The free-space check is bypassed, so HDF5 itself meets ENOSPC (as when another program fills the disk)."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "5m"):
        pytest.skip("needs root to mount a small tmpfs")
    code = ("import sys; import degrade.shards.write as d; d._check_free_space = lambda *a: None; "
            "from cli.main import main; sys.argv[0] = 'degrade'; main()")
    try:
        for filler in (0, 1500, 3500):
            for p in disk.iterdir():
                shutil.rmtree(p) if p.is_dir() else p.unlink()
            if filler:
                (disk / "filler").write_bytes(b"\0" * filler * 1024)
            done = subprocess.run([sys.executable, "-c", code, "make-dataset", "--out", str(disk / "d"), "--count",
                                   "120", "--patch-size", "128", "--shard-size", "40", "--jobs", jobs],
                                  cwd=ROOT, capture_output=True, text=True, timeout=120)
            errors = [line for line in done.stderr.splitlines() if line.startswith("Error")]
            assert done.returncode == 1, done.stderr[-2000:]  # was 139 (segfault)
            assert len(errors) == 1 and "No space left on device" in errors[0], done.stderr[-2000:]
            assert not list((disk / "d").glob(".*.partial"))
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


# --- one error type -----------------------------------------------------------------------------------


def _png_claiming(path: Path, width: int, height: int) -> Path:
    """A small valid PNG whose IHDR is rewritten to claim width x height (CRC fixed)."""
    ok, buf = cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))
    data = bytearray(buf.tobytes())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


def test_library_refusals_are_degrade_errors(tmp_path):
    ds = degrade.open_dataset(make_small_dataset(tmp_path / "ds", count=4, seed=1, shard_size=4))
    refusals = [
        lambda: degrade.parse_level("4"),
        lambda: degrade.DegradationParams.from_json("{"),
        lambda: degrade.DegradationParams.from_dict({"level": 2}),
        lambda: degrade.read_image(tmp_path / "missing.png"),
        lambda: degrade.read_image(_png_claiming(tmp_path / "huge.png", 100000, 100000)),
        lambda: degrade.open_dataset(tmp_path / "missing"),
        lambda: ds[4],
        lambda: ds.column("hr"),
        lambda: degrade.apply(np.zeros((30, 30, 3), np.float32), degrade.sample_params(1, np.random.default_rng(0))),
        lambda: degrade.apply(np.zeros((32, 32, 3), np.float64), degrade.sample_params(1, np.random.default_rng(0))),
    ]
    for refuse in refusals:
        with pytest.raises(DegradeError):
            refuse()
    with pytest.raises(IndexError):  # still an IndexError for code that expects sequences to raise one
        ds[-5]


# --- resource bounds: images --------------------------------------------------------------------------


@pytest.mark.parametrize("ext", [".png", ".jpg", ".webp", ".bmp", ".tif", ".ppm", ".pgm", ".pam"])
def test_header_sizes_match_the_decoded_sizes(ext):
    image = np.random.default_rng(0).integers(0, 255, (37, 53, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(ext, image[..., 0] if ext == ".pgm" else image)
    assert ok and image_size(buf.tobytes()) == (53, 37)


@pytest.mark.parametrize("newline", [b"\n", b"\r", b"\r\n"])
def test_a_pnm_header_is_read_as_opencv_reads_it(newline):
    """OpenCV ends a PNM comment at CR as well as LF: a header read only up to LF took the comment's CR
    line for part of the comment and the maxval for the size (255x1), so a 150 MP file passed a 100 MP cap."""
    data = b"P5" + newline + b"# a comment" + newline + b"53 37" + newline + b"255" + newline + bytes(53 * 37)
    assert image_size(data) == (53, 37)
    assert degrade.io.decode_image(data).shape == (37, 53, 3)
    with pytest.raises(ImageError, match="above the"):
        degrade.io.decode_image(data, max_pixels=53 * 37 - 1)


def test_what_is_decoded_is_checked_against_the_cap_too(monkeypatch):
    """Beside the header's claim: a header parser that disagrees with the decoder must not open the cap."""
    ok, buf = cv2.imencode(".png", np.zeros((40, 50, 3), np.uint8))
    monkeypatch.setattr(degrade.io, "image_size", lambda data: (1, 1))
    with pytest.raises(ImageError, match="decoded 50x40 px, above the"):
        degrade.io.decode_image(buf.tobytes(), max_pixels=1999)


@pytest.mark.parametrize("claim", [(100000, 100000), (30000, 30000), (10001, 10000)])
def test_an_image_claiming_too_many_pixels_is_refused_before_decoding(tmp_path, monkeypatch, claim):
    path = _png_claiming(tmp_path / "bomb.png", *claim)
    assert path.stat().st_size < 1000
    monkeypatch.setattr(cv2, "imdecode", lambda *a: pytest.fail("decoded despite the header"))
    with pytest.raises(ImageError, match="above the 100 MP limit"):
        degrade.read_image(path)


def test_the_pixel_cap_can_be_raised_or_lowered(tmp_path, monkeypatch):
    path = tmp_path / "a.png"
    assert cv2.imwrite(str(path), np.zeros((40, 50, 3), np.uint8))
    assert degrade.read_image(path, max_pixels=2000).shape == (40, 50, 3)
    with pytest.raises(ImageError, match="above"):
        degrade.read_image(path, max_pixels=1999)
    monkeypatch.setenv(MAX_PIXELS_ENV, "1999")
    with pytest.raises(ImageError, match="above"):
        degrade.read_image(path)
    result = CliRunner().invoke(main, ["apply", str(path), "-o", str(tmp_path / "o.png"), "--max-pixels", "1000"])
    assert result.exit_code == 1 and "above the 0.001 MP limit" in result.output
    monkeypatch.setenv(MAX_PIXELS_ENV, str(10**23))  # overflowed the read of the file's bytes
    with pytest.raises(ImageError, match="at most 1099511627776"):
        degrade.read_image(path)
    monkeypatch.delenv(MAX_PIXELS_ENV)
    for bad in (1.5, 0, True, 2**41):
        with pytest.raises(ImageError, match="max_pixels must be an integer in \\[1, 2\\*\\*40\\]"):
            degrade.read_image(path, max_pixels=bad)
    # the largest cap reads a small file: the buffer follows the file's size, not the cap's 8 TB
    assert degrade.read_image(path, max_pixels=2**40).shape == (40, 50, 3)
    result = CliRunner().invoke(main, ["make-dataset", str(path), "--out", str(tmp_path / "ds2"), "--count", "2",
                                       "--max-pixels", str(2**41)])
    assert result.exit_code == 2 and "--max-pixels" in result.output and "skipped" not in result.output
    from degrade.errors import DatasetError

    with pytest.raises(DatasetError, match="max_pixels must be an integer"):  # from Python: once, not per image
        dsm.scan_sources([path], 32, max_pixels=2**41)
    monkeypatch.setenv(MAX_PIXELS_ENV, "abc")  # refused once, up front, not once per image read
    result = CliRunner().invoke(main, ["apply", str(path), "-o", str(tmp_path / "o.png")])
    assert result.exit_code == 1 and result.output.count("expected a positive number of pixels") == 1
    assert not (tmp_path / "o.png").exists()
    result = CliRunner().invoke(main, ["make-dataset", str(path), "--out", str(tmp_path / "ds"), "--count", "2"])
    assert result.exit_code == 1 and result.output.count("expected a positive number of pixels") == 1
    assert "skipped" not in result.output and not (tmp_path / "ds").exists()


def test_only_regular_files_are_read(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)  # opening it for reading would block until a writer comes
    for path in (fifo, Path("/dev/zero")):
        with pytest.raises(ImageError, match="not a regular file"):
            degrade.read_image(path)
    scan = dsm.scan_sources([fifo, "/dev/zero", *degrade.sample_images()[:1]], 64)
    reason = "not a regular file (a device, FIFO or socket is never read)"  # /dev/zero: refused by its name first
    assert [r.split(" (")[0] for _, r in scan.unreadable] == [reason.split(" (")[0], "not an image file name"]
    assert len(scan.sources) == 1


def test_files_above_the_byte_bound_are_refused_unread(tmp_path):
    big = tmp_path / "big.png"
    with open(big, "wb") as f:  # sparse: takes no disk
        f.truncate(max_file_bytes() + 1)
    with pytest.raises(ImageError, match="larger than"):
        degrade.read_image(big)


def test_make_dataset_skips_a_bomb_and_goes_on(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _png_claiming(src / "bomb.png", 100000, 100000)
    shutil.copy(degrade.sample_images()[0], src / "photo.png")
    result = CliRunner().invoke(main, ["make-dataset", str(src), "--out", str(tmp_path / "ds"), "--count", "4",
                                       "--patch-size", "64", "--jobs", "1"])
    assert result.exit_code == 0, result.output
    assert "skipped unreadable bomb.png" in result.output and "above the 100 MP limit" in result.output


def test_records_out_of_proportion_to_the_image_are_refused():
    big = np.zeros((2048, 2048, 3), np.float32)
    params = degrade.sample_params(2, np.random.default_rng(0))
    grown = dataclasses.replace(params, resize1=degrade.ResizeParams(scale=4.0, mode="bicubic"))
    with pytest.raises(DegradeError, match="resize1 x4 would turn the 2048x2048 image into 67.1 MP"):
        degrade.apply(big, grown)
    small = np.zeros((64, 64, 3), np.float32)  # the same record on a patch: 256x256 is fine
    assert degrade.apply(small, grown).shape == (16, 16, 3)
    for seed in range(200):  # every record the recipes draw passes on any image size
        record = degrade.sample_params("mix", np.random.default_rng(seed))
        check_work(big, record)


def test_noise_strength_is_bounded():
    record = degrade.sample_params(1, np.random.default_rng(0)).to_dict()
    record["noise1"] = {"type": "gaussian", "strength": 1e300, "gray": False, "seed": 1}
    with pytest.raises(DegradeError, match="strength must be in"):
        degrade.DegradationParams.from_dict(record)


def test_deeply_nested_json_is_a_refusal(tmp_path):
    deep = "[" * 100000 + "]" * 100000
    with pytest.raises(DegradeError, match="nested too deeply"):
        degrade.DegradationParams.from_json(deep)
    (tmp_path / "deep.json").write_text(deep)
    result = CliRunner().invoke(main, ["apply", "-o", str(tmp_path / "o.png"), "--params", str(tmp_path / "deep.json")])
    assert result.exit_code == 1 and "nested too deeply" in result.output and "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)  # CliRunner catches a raw exception: exit 1, no traceback


@pytest.mark.parametrize("case", ["fifo params", "params-out is -o", "params-out is the image", "-o is the image"])
def test_apply_refuses_hostile_file_arguments(tmp_path, case):
    image = tmp_path / "in.png"
    shutil.copy(degrade.sample_images()[0], image)
    before = image.read_bytes()
    out = tmp_path / "x.png"
    fifo = tmp_path / "p.json"
    os.mkfifo(fifo)
    args = {"fifo params": [str(image), "-o", str(out), "--params", str(fifo)],
            "params-out is -o": [str(image), "-o", str(out), "--params-out", str(out)],
            "params-out is the image": [str(image), "-o", str(out), "--params-out", str(image)],
            "-o is the image": [str(image), "-o", str(image)]}[case]
    result = CliRunner().invoke(main, ["apply", *args])
    assert result.exit_code == 1, result.output
    assert len([line for line in result.output.splitlines() if line.startswith("Error")]) == 1
    assert image.read_bytes() == before and not out.exists()


# --- resource bounds and trust: datasets ------------------------------------------------------------------


@pytest.fixture()
def small(tmp_path) -> Path:
    return Path(make_small_dataset(tmp_path / "small", count=6, seed=2, shard_size=3))


def _forge_shard(path: Path, **shapes) -> None:
    """Replace a shard by a tiny file that declares the given shapes (nothing allocated on disk)."""
    with h5py.File(path, "r") as f:
        attrs = dict(f.attrs)
    path.unlink()
    with h5py.File(path, "w") as f:
        f.attrs.update(attrs)
        n = shapes.get("n", 3)
        layout = {"hr": ((n, 64, 64, 3), "u1"), "lr": ((n, 16, 16, 3), "u1"), "v": ((n, 33), "f4"),
                  "level": ((n,), "u1"), "index": ((n,), "i8"), "source": ((n,), "i4"), "crop": ((n, 4), "i4")}
        for key, (shape, dtype) in layout.items():
            if key in shapes.get("drop", ()):
                continue
            shape = shapes.get(key, shape)
            chunks = shapes.get(f"{key}_chunks", (1, *shape[1:]) if len(shape) == 4 else None)
            f.create_dataset(key, shape=shape, dtype=dtype, chunks=chunks)
        f.create_dataset("params", shape=(n,), dtype=h5py.string_dtype())
    assert path.stat().st_size < 20000


@pytest.mark.parametrize("forgery,message", [
    ({"n": 100_000_000}, "declares 100000000 samples"),
    ({"v": (100_000_000, 33)}, "v is float32 (100000000, 33)"),
    ({"hr": (1, 60000, 60000, 3)}, "hr is uint8 (1, 60000, 60000, 3)"),
    ({"drop": ("v",)}, "dataset 'v' missing"),
    ({"hr_chunks": (3, 64, 64, 3)}, "expected one sample per chunk"),
])
def test_crafted_shards_are_refused_before_any_read(small, forgery, message, monkeypatch):
    lone = small / "shard-00001.h5"
    _forge_shard(lone, **forgery)
    real_read = h5py.Dataset.__getitem__

    def guarded(self, *args):
        if Path(self.file.filename).name == lone.name:
            pytest.fail("the forged shard was read before the check")
        return real_read(self, *args)

    monkeypatch.setattr(h5py.Dataset, "__getitem__", guarded)
    ds = degrade.open_dataset(small)
    with pytest.raises(DatasetError):
        ds[4]
    with pytest.raises(DatasetError):
        ds.column("v")
    monkeypatch.setattr(h5py.Dataset, "__getitem__", real_read)
    for args in (["inspect", str(small)], ["inspect", str(lone)], ["inspect", str(small), "--index", "4"]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        assert isinstance(result.exception, SystemExit), result.exception  # a raw exception also exits 1 here
    if "n" not in forgery:
        assert message in CliRunner().invoke(main, ["inspect", str(small)]).output
    assert any(message in p or "(100000000," in p for p in dsm.verify_dataset(small))


def test_a_lone_shard_with_a_huge_patch_is_refused(small):
    lone = small / "shard-00000.h5"
    _forge_shard(lone, hr=(3, 60000, 60000, 3), lr=(3, 15000, 15000, 3))
    with pytest.raises(DatasetError, match="patch size 60000"):
        degrade.open_dataset(lone)


def _forge_big_patches(model: Path, path: Path, n: int, p: int) -> None:
    """A lone shard of `n` real records whose patches are `p` px with no pixel on disk (read back as 0)."""
    with h5py.File(model, "r") as f:
        attrs, record = dict(f.attrs), f["params"][0]
        v = f["v"][0]
    with h5py.File(path, "w") as f:
        f.attrs.update(attrs)
        f.create_dataset("hr", shape=(n, p, p, 3), dtype="u1", chunks=(1, p, p, 3))
        f.create_dataset("lr", shape=(n, p // 4, p // 4, 3), dtype="u1", chunks=(1, p // 4, p // 4, 3))
        f.create_dataset("v", data=np.tile(v, (n, 1)))
        f.create_dataset("level", data=np.ones(n, np.uint8))
        f.create_dataset("index", data=np.arange(n, dtype=np.int64))
        f.create_dataset("source", data=np.zeros(n, np.int32))
        f.create_dataset("crop", data=np.zeros((n, 4), np.int32))
        f.create_dataset("params", data=[record] * n, dtype=h5py.string_dtype())
    assert path.stat().st_size < 100_000


def test_a_contact_sheet_of_huge_declared_patches_holds_one_patch_at_a_time(small, tmp_path, monkeypatch):
    """--grid on a 50 KB shard declaring 64 patches of 2000 px took 2 GB and 45 s: every patch was handed
    to matplotlib whole (which copies it). Now each is reduced to the sheet's cell as it is read and let go
    before the next one, so memory follows the picture, not the declared data."""
    pytest.importorskip("matplotlib")
    import weakref

    from matplotlib.axes import Axes

    from degrade import plots

    n, p = 8, 1024
    lone = tmp_path / "big.h5"
    _forge_big_patches(small / "shard-00000.h5", lone, n, p)
    drawn: list[tuple[int, ...]] = []
    real_imshow = Axes.imshow
    monkeypatch.setattr(Axes, "imshow", lambda self, img, **kw: drawn.append(img.shape) or real_imshow(self, img, **kw))
    ds = degrade.open_dataset(lone)
    handed_out: list[weakref.ref] = []  # every full-size patch the sheet was given
    alive_at_read: list[int] = []

    class Watched:  # the dataset, counting the patches still alive each time another sample is read
        def __getitem__(self, i: int):
            alive_at_read.append(sum(ref() is not None for ref in handed_out))
            sample = ds[i]
            handed_out.extend([weakref.ref(sample.hr), weakref.ref(sample.lr)])
            return sample

        def stored_index(self, i: int) -> int:
            return ds.stored_index(i)

    plots.contact_sheet(tmp_path / "g.png", Watched(), list(range(n)))
    assert len(drawn) == 2 * n and all(shape[0] <= 256 and shape[1] <= 256 for shape in drawn)  # a cell is ~220 px
    assert alive_at_read == [0] * n
    monkeypatch.setattr(Axes, "imshow", real_imshow)
    result = CliRunner().invoke(main, ["inspect", str(lone), "--png", str(tmp_path / "cli.png"), "--grid", str(n)])
    assert result.exit_code == 0, result.output


def test_a_byte_flipped_shard_is_caught_when_checksums_are_asked_for(small):
    path = small / "shard-00001.h5"
    with h5py.File(path, "r+") as f:
        f["lr"][0, 0, 0, 0] ^= 1
    assert degrade.open_dataset(small)[3] is not None  # the cheap path does not hash
    with pytest.raises(DatasetError, match="checksum differs"):
        degrade.open_dataset(small, checksums=True)
    result = CliRunner().invoke(main, ["inspect", str(small), "--checksums"])
    assert result.exit_code == 1 and "checksum differs" in result.output


def test_flipped_bytes_in_a_shards_structure_are_problems_or_refusals_never_a_traceback(small):
    """A flipped bit in the first 8 KiB of a shard (HDF5's object headers and dataspaces): h5py raises
    KeyError ("Unable to synchronously open object") or RuntimeError for some, which verify, open_dataset
    and a sample's read passed on as tracebacks. verify now lists each as a problem, the reader refuses it
    (DatasetError), and verify never calls such a copy clean."""
    path = small / "shard-00000.h5"
    clean = path.read_bytes()
    rng = np.random.default_rng(1)
    for position, bit in zip(rng.integers(0, 8192, 40), rng.integers(0, 8, 40)):
        data = bytearray(clean)
        data[position] ^= 1 << int(bit)
        path.write_bytes(bytes(data))
        assert dsm.verify_dataset(small), f"byte {position} bit {bit}: called clean"  # the checksum differs
        try:
            ds = degrade.open_dataset(small)
            ds[0], ds[len(ds) - 1]
        except (DatasetError, OSError):
            pass
    path.write_bytes(clean)


@pytest.mark.parametrize("mutate,message", [
    (lambda m: m["shards"][0].update(file="../../outside.h5"), "does not match the configuration"),
    (lambda m: m["shards"][0].update(count=10**8), "does not match the configuration"),
    (lambda m: m["shards"][1].update(shard=0), "does not match the configuration"),
    (lambda m: m.update(complete=False), "says complete=False"),
])
def test_a_manifest_cannot_point_outside_or_lie_about_counts(small, mutate, message):
    manifest = json.loads((small / "manifest.json").read_text())
    mutate(manifest)
    (small / "manifest.json").write_text(json.dumps(manifest))
    for call in (lambda: dsm.verify_dataset(small), lambda: degrade.open_dataset(small)):
        with pytest.raises(DatasetError, match=message):
            call()


def test_verify_finds_a_manifest_whose_configuration_sources_or_sizes_were_edited(small):
    """The manifest has no checksum of its own: a seed changed (6 for 5), a source's path and a shard's size
    were called OK. Each shard records the configuration and sources it was made with; verify compares."""
    assert dsm.verify_dataset(small) == []
    manifest = json.loads((small / "manifest.json").read_text())
    manifest["config"]["seed"] += 1
    manifest["config"]["sources"][0]["path"] = "elsewhere.png"
    manifest["shards"][0]["bytes"] += 1
    (small / "manifest.json").write_text(json.dumps(manifest))
    problems = dsm.verify_dataset(small)
    size = (small / "shard-00000.h5").stat().st_size
    assert f"shard-00000.h5: {size} bytes, the manifest says {size + 1}" in problems
    for shard in ("shard-00000.h5", "shard-00001.h5"):
        assert f"{shard}: made with another configuration than the manifest's (seed differs)" in problems
        assert f"{shard}: its sources table differs from the manifest's sources" in problems


def test_a_shard_link_out_of_the_folder_is_refused(small, tmp_path):
    outside = tmp_path / "outside.h5"
    shutil.move(small / "shard-00000.h5", outside)
    (small / "shard-00000.h5").symlink_to(outside)
    with pytest.raises(DatasetError, match="inside the dataset folder"):
        degrade.open_dataset(small)
    assert any("inside the dataset folder" in p for p in dsm.verify_dataset(small))


def test_deeply_nested_manifest_is_a_refusal(small):
    (small / "manifest.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(DatasetError, match="nested too deeply"):
        degrade.open_dataset(small)


def test_verify_regenerate_reads_no_file_the_manifest_points_at_outside_images(small, tmp_path):
    """source_root "/etc" + "passwd": not an image name; a huge "image": refused by size, unread."""
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "passwd").write_text("root:x:0:0")
    with open(secret / "huge.png", "wb") as f:
        f.truncate(max_file_bytes() + 1)  # sparse; reading it whole would take gigabytes
    manifest = json.loads((small / "manifest.json").read_text())
    manifest["config"]["source_root"] = str(secret)
    sources = manifest["config"]["sources"]
    for i, s in enumerate(sources):
        s["path"] = "passwd" if i % 2 == 0 else "huge.png"
    # a forgery verify's other checks pass: each shard says it was made so, and the manifest has its new bytes
    for entry in manifest["shards"]:
        path = small / entry["file"]
        with h5py.File(path, "r+") as f:
            f.attrs["command"] = json.dumps({k: v for k, v in manifest["config"].items() if k != "sources"},
                                            sort_keys=True)
            f.attrs["sources_sha256"] = dsm.DatasetConfig.from_dict(manifest["config"]).sources_digest()
            del f["sources"]
            f.create_dataset("sources", data=np.array([s["path"] for s in sources], dtype=h5py.string_dtype()))
        entry.update(sha256=hashlib.sha256(path.read_bytes()).hexdigest(), bytes=path.stat().st_size)
    (small / "manifest.json").write_text(json.dumps(manifest))
    problems = dsm.verify_dataset(small, regenerate=6)
    assert problems and all("refusing source" in p for p in problems), problems
    result = CliRunner().invoke(main, ["verify", str(small), "--regenerate", "6"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit), result.exception  # a raw exception also exits 1 here


def test_sr_and_eval_report_a_bomb_in_one_line(tmp_path):
    pytest.importorskip("torch")
    try:
        from cli.sr import eval_main, sr_main
        from dasr_model.checkpoints import save_checkpoint
        from dasr_model.model import DASR, DASRConfig
        from dasr_model.train import TrainConfig
    except ImportError as exc:  # the dasr_model API is another module's; this test only needs a tiny model
        pytest.skip(f"dasr_model API not available: {exc}")
    import torch

    tiny = DASRConfig(num_experts=2, num_feat=8, num_block=1, predictor_feat=8)
    torch.manual_seed(0)
    model = DASR(tiny)
    ckpt = tmp_path / "ckpt-1.pt"
    save_checkpoint(ckpt, {"config": TrainConfig(shards="", out="", model=tiny).to_dict(), "step": 1,
                           "model": model.state_dict(), "ema_generator": model.generator.state_dict()})
    hr = tmp_path / "hr"
    hr.mkdir()
    bomb = _png_claiming(hr / "bomb.png", 100000, 100000)
    sr = CliRunner().invoke(sr_main, [str(bomb), "-o", str(tmp_path / "out"), "--model", str(ckpt), "--device", "cpu"])
    ev = CliRunner().invoke(eval_main, ["--model", str(ckpt), "--hr-dir", str(hr), "--device", "cpu"])
    for result in (sr, ev):
        assert result.exit_code == 1 and "above the 100 MP limit" in result.output, result.output
        assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)


def test_a_write_error_that_h5py_only_reports_as_ignored_fails_the_shard(tmp_path, monkeypatch):
    """h5py 3.16 reports some failed writes (disk full) only through sys.unraisablehook ("exception
    ignored") and carries on; such a shard must not be renamed complete."""
    real_setitem = h5py.Dataset.__setitem__
    calls = {"n": 0}

    def swallowing(self, key, value):
        calls["n"] += 1
        if calls["n"] == 12:  # the second shard
            error = OSError(errno.ENOSPC, "Can't write data")
            sys.unraisablehook(types.SimpleNamespace(exc_type=OSError, exc_value=error, exc_traceback=None,
                                                     err_msg="Exception ignored in", object=None))
        return real_setitem(self, key, value)

    monkeypatch.setattr(h5py.Dataset, "__setitem__", swallowing)
    out = tmp_path / "ds"
    with pytest.raises(DatasetError, match="No space left on device"):
        dsm.make_dataset(_config(), out)
    assert [p.name for p in out.glob("*.h5")] == ["shard-00000.h5"] and not list(out.glob(".*.partial"))
    monkeypatch.setattr(h5py.Dataset, "__setitem__", real_setitem)
    dsm.make_dataset(_config(), out)
    reference = tmp_path / "ref"
    dsm.make_dataset(_config(), reference)
    assert _digests(out) == _digests(reference)


def test_a_symlink_loop_is_one_line_wherever_a_path_is_resolved(tmp_path):
    """Path.resolve() raises RuntimeError on a symlink loop before Python 3.13, which no CLI caught: an image,
    a shard and a dataset's source that are loops each end in one line, exit 1, never a traceback
    (degrade.io.real_path keeps the loop in the path, whose open then fails with ELOOP); an output named by
    a loop is written, its atomic rename replacing the link itself."""
    for name, to in (("loop.png", "loop.png"), ("a.png", "b.png"), ("b.png", "a.png"), ("pic.png", "pic.png")):
        (tmp_path / name).symlink_to(to)
    photo = degrade.sample_images()[0]
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(photo, src / "castle.png")
    data = tmp_path / "data"
    assert CliRunner().invoke(main, ["make-dataset", str(src), "--out", str(data), "--count", "4",
                                     "--patch-size", "64", "--shard-size", "2", "--jobs", "1"]).exit_code == 0
    for args, link in ((["apply", str(photo), "-o", str(tmp_path / "y.png"), "--params-out", str(tmp_path / "a.png")],
                        "a.png"), (["inspect", str(data), "--png", str(tmp_path / "pic.png")], "pic.png")):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0 and (tmp_path / link).is_file() and not (tmp_path / link).is_symlink(), args
    (data / "shard-00001.h5").unlink()
    (data / "shard-00001.h5").symlink_to("shard-00001.h5")
    (src / "castle.png").unlink()
    (src / "castle.png").symlink_to("castle.png")
    for args in (["apply", str(tmp_path / "loop.png"), "-o", str(tmp_path / "x.png")], ["verify", str(data)],
                 ["inspect", str(data), "--index", "3"], ["verify", str(data), "--regenerate", "2"]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), (args, result.output)
        assert "Traceback" not in result.output and "RuntimeError" not in result.output, result.output


def test_a_dataset_made_from_pnm_photos_verifies_with_regeneration(tmp_path):
    """PNM/PAM photos named directly are read (the README says so); verify --regenerate refused them as 'not
    an image file name', failing a valid dataset. (A folder search still leaves them out: finding them there
    would move every later image's position, and so its degradation, in test sets of such folders.)"""
    src = tmp_path / "src"
    src.mkdir()
    img = cv2.imread(str(degrade.sample_images()[0]))
    cv2.imwrite(str(src / "castle.ppm"), img)
    cv2.imwrite(str(src / "gray.pgm"), cv2.cvtColor(img, cv2.COLOR_BGR2GRAY))
    result = CliRunner().invoke(main, ["make-dataset", str(src / "castle.ppm"), str(src / "gray.pgm"), "--out",
                                       str(tmp_path / "ds"), "--count", "4", "--patch-size", "64", "--jobs", "1"])
    assert result.exit_code == 0 and "sources: 2 used" in " ".join(result.output.split()), result.output
    result = CliRunner().invoke(main, ["verify", str(tmp_path / "ds"), "--regenerate", "4"])
    assert result.exit_code == 0, result.output


def test_jobs_are_capped_at_the_chunks_to_make_and_two_per_core(tmp_path, monkeypatch):
    """--jobs had no bound: --jobs 1000 started 1000 worker processes (some 65 MB each) for a dataset of 16
    samples. Workers are capped at the chunks left to make and at 2 per usable core, and the CLI says so."""
    import degrade.shards.write as write_module

    started = []
    real = write_module.OrderedMap

    def spy(task, *, jobs, backend=None, ahead=None):
        started.append(jobs)
        return real(task, jobs=1, backend=backend, ahead=ahead)  # (the test's own: one process)

    monkeypatch.setattr(write_module, "OrderedMap", spy)
    monkeypatch.setattr(write_module, "usable_cores", lambda: 3)
    report = dsm.make_dataset(_config(count=40), tmp_path / "a", jobs=1000)  # 4 shards of 10: 4 chunks
    assert started == [4] and report.workers == 4
    report = dsm.make_dataset(_config(count=200), tmp_path / "b", jobs=1000)  # 20 chunks, 3 cores
    assert started[-1] == 6 and report.workers == 6
    result = CliRunner().invoke(main, ["make-dataset", "--out", str(tmp_path / "c"), "--count", "20",
                                       "--patch-size", "64", "--jobs", "9"])
    assert result.exit_code == 0 and "note: 2 worker process(es), not --jobs 9" in " ".join(result.output.split())
    result = CliRunner().invoke(main, ["make-dataset", "--out", str(tmp_path / "d"), "--count", "20",
                                       "--patch-size", "64"])  # auto: a cap is no news
    assert result.exit_code == 0 and "note:" not in result.output


def test_apply_writes_no_image_whose_parameter_record_it_would_refuse(tmp_path):
    """-o was written, then --params-out refused (a FIFO there): an LR image without the record it was made
    with. Both targets are checked before either is written."""
    os.mkfifo(tmp_path / "fifo.json")
    result = CliRunner().invoke(main, ["apply", str(degrade.sample_images()[0]), "-o", str(tmp_path / "lr.png"),
                                       "--params-out", str(tmp_path / "fifo.json")])
    assert result.exit_code == 1 and "fifo.json" in result.output and not (tmp_path / "lr.png").exists()


def test_a_tiff_that_gives_its_size_twice_is_refused_from_its_header():
    """libtiff takes a TIFF directory's first ImageWidth / ImageLength; the header check took the last: a
    6 MB file saying 32768 x 32768, then 16 x 16, decoded to 12.6 GB under a 4 MP cap (a security review)."""
    import struct

    def tiff(*sizes):
        entries = [struct.pack("<HHII", tag, 4, 1, value) for w, h in sizes for tag, value in ((256, w), (257, h))]
        return b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", len(entries)) + b"".join(entries) + bytes(4)

    assert image_size(tiff((16, 16))) == (16, 16)
    with pytest.raises(DegradeError, match="not a readable image"):
        image_size(tiff((32768, 32768), (16, 16)))
