"""Hostile input and faults (issue 13): bounded memory, no crash, nothing read or left behind.

Each test names the attack or fault it tries; docs/dataset-format.md has the table of outcomes.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest

from degrade import dataset as dsm
from degrade.errors import DatasetError

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

    monkeypatch.setattr(dsm.os, "statvfs", lambda path: Full())
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
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_workers_end_within_seconds_when_make_dataset_is_killed(tmp_path, sig):
    out = tmp_path / "ds"
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "make-dataset", "--out", str(out), "--count", "20000",
                             "--patch-size", "64", "--jobs", "2"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, kids = time.monotonic() + 90, []
        while time.monotonic() < deadline:  # wait until the workers are making samples
            kids = _children(proc.pid)
            if len(kids) >= 2 and (out / ".shard-00000.h5.partial").exists():
                break
            time.sleep(0.2)
        assert len(kids) >= 2, "the workers never started"
    except BaseException:
        proc.kill()
        raise
    proc.send_signal(sig)
    proc.wait(timeout=30)
    start = time.monotonic()
    while any(_alive(k) for k in kids) and time.monotonic() - start < 10:
        time.sleep(0.1)
    left = [k for k in kids if _alive(k)]
    for k in left:  # do not leave them behind even when the test fails
        os.kill(k, signal.SIGKILL)
    assert not left, f"workers still alive {time.monotonic() - start:.1f} s after the parent died"


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_a_disk_that_fills_during_a_shard_still_ends_with_one_line_and_exit_1(tmp_path, jobs):
    """The free-space check is bypassed, so HDF5 itself meets ENOSPC (as when another program fills the disk)."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "5m"):
        pytest.skip("needs root to mount a small tmpfs")
    code = ("import sys; import degrade.dataset as d; d._check_free_space = lambda *a: None; "
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
