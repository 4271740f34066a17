"""Test sets to keep and share: whole HR images degraded at fixed levels and seeds, as image folders.

`make_testset(HR_DIR, OUT)` (`degrade make-testset`) writes

    OUT/HR/NAME.png                   each HR image, cropped at the bottom/right to a multiple of 4, 8-bit RGB
    OUT/LR/level{L}/NAME.png          its x4 LR at level L (8-bit RGB, as degrade.apply made it: exact)
    OUT/params/level{L}/NAME.json     the parameter record (`degrade apply HR/NAME.png --params ...` replays it)
    OUT/manifest.json                 the set: format, seed, levels, and each file's SHA-256 and v, one
                                      line per image

NAME is the image's path under HR_DIR without its suffix, so HR and LR files pair by name (the layout of
DIV2K-style paired folders: BasicSR's paired datasets, `dasr-eval --lr-dir OUT/LR/level2 --hr-dir OUT/HR`).
The LR of image i (its position in sorted order) at level L comes from the parameter draw
SeedSequence([seed, i, L]): the draw `dasr-eval --hr-dir HR_DIR --seed S` makes, so `dasr-eval --testset OUT`
gives the numbers `dasr-eval --hr-dir` gives, with v for the predictor's MAE, without degrading again.

`open_testset(OUT)` reads a set back. A manifest is data, not instructions: its names must be plain
relative paths inside the set, every file is read bounded and checked against its SHA-256, and the
vectors must be the layout's length, each entry in [0, 1] as encode makes it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import operator
import os
import platform
import re
import secrets
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from degrade._version import __version__
from degrade.discover import find_images, relative_names
from degrade.errors import DegradeError
from degrade.io import (
    crop_to_multiple,
    encode_image,
    make_folders,
    open_regular,
    read_image,
    read_image_sha256,
    read_regular_file,
    real_path,
    to_uint8,
    umask,
    write_bytes_atomic,
)
from degrade.params import DegradationParams
from degrade.pipeline import apply
from degrade.recipe import SCALE
from degrade.sampling import sample_params
from degrade.strictjson import DuplicateKey, strict_json
from degrade.vector import VECTOR_LAYOUT, VECTOR_LENGTH, encode

TESTSET_FORMAT = "degrade-testset-v1"
MANIFEST_NAME = "manifest.json"
# 1.44 kB an image at 3 levels with short names (measured; v's 99 numbers are half of it): room for some
# 46,000 images. make_testset measures its manifest before any work and refuses one over this.
MANIFEST_BYTES = 64 << 20
MIN_TEST_SIDE = 64  # an HR side below this leaves an LR under 16 px: too little for the degradations and SSIM
TEST_LEVELS = (1, 2, 3)
_SHA256 = re.compile(r"[0-9a-f]{64}")
PARAMS_BYTES = 1 << 20  # a parameter record is about 2 kB
# an image's name (its last part) in bytes: its files, NAME.json the longest, are written as
# .NAME.json.XXXXXXXX.tmp first, and a file's name is at most 255 bytes
MAX_NAME_BYTES = 255 - len(".") - len(".json") - len(".XXXXXXXX.tmp")


def testset_params(level: int, seed: int, index: int) -> DegradationParams:
    """The parameters of image `index` (its position in sorted order) at `level` in a test set of `seed`."""
    return sample_params(level, np.random.default_rng(np.random.SeedSequence([seed, index, level])))


def read_test_hr(path: str | os.PathLike) -> np.ndarray:
    """An HR image as a test set holds it: cropped at the bottom/right to a multiple of 4, 8-bit RGB (uint8);
    DegradeError where a side is under MIN_TEST_SIDE."""
    hr = to_uint8(crop_to_multiple(read_image(path), SCALE))
    if min(hr.shape[:2]) < MIN_TEST_SIDE:
        raise DegradeError(f"{path}: {hr.shape[1]}x{hr.shape[0]} px (cropped to a multiple of {SCALE}) is too "
                           f"small for a test image: at least {MIN_TEST_SIDE} px a side")
    return hr


def testset_names(files: Sequence[Path], root: Path) -> list[str]:
    """Each file's name in a test set: its path under `root` without suffix (posix). Two files that would
    share one (a.png and a.jpg), or whose files in the set would be a file and a folder of one path (a.jpg
    makes HR/a.png, a.png/b.png makes HR/a.png/b.png), are a DegradeError naming both."""
    names: dict[str, Path] = {}
    for f, name in zip(files, relative_names(files, root)):
        if not _plain_name(name):  # the set's own reader refuses it: refused before any work, not after
            raise DegradeError(f"{f}: its name in a test set would be {name!r}, not a plain relative path "
                               "(no '.' or '..' part, no backslash); rename it")
        if len(os.fsencode(PurePosixPath(name).name)) > MAX_NAME_BYTES:  # a file's name at most 255 bytes
            raise DegradeError(f"{f}: its name is too long for a test set's files (at most {MAX_NAME_BYTES} "
                               "bytes without the suffix, with room for the temporary name each is written as)")
        if name in names:
            raise DegradeError(f"{names[name]} and {f}: two images of one name in a test set; keep one")
        names[name] = f
    written = {name + suffix: f for name, f in names.items() for suffix in (".png", ".json")}  # HR, LR, params
    for name, f in names.items():
        for folder in PurePosixPath(name).parents[:-1]:  # all but '.'
            if str(folder) in written:
                raise DegradeError(f"{written[str(folder)]} and {f}: {folder} would be both a file in the test set "
                                   f"and the folder holding {name}.png; rename one of them")
    return list(names)


class _Degrade:
    """One image of a test set, in a worker: its HR and each level's LR, encoded, with its record."""

    def __init__(self, files: Sequence[Path], levels: Sequence[int], seed: int):
        self.files, self.levels, self.seed = list(files), list(levels), seed

    def __call__(self, index: int) -> tuple[bytes, list[tuple[bytes, bytes]]]:
        hr = read_test_hr(self.files[index])
        out = []
        for level in self.levels:
            params = testset_params(level, self.seed, index)
            lr = apply(hr, params)
            record = (json.dumps(params.to_dict(), indent=2, sort_keys=True) + "\n").encode()
            out.append((encode_image(lr), record))
        return encode_image(hr), out


def make_testset(src: str | os.PathLike, out: str | os.PathLike, *, levels: Sequence[int] = TEST_LEVELS,
                 seed: int = 0, jobs: int = 1, progress: Callable[[int, int], None] | None = None
                 ) -> dict[str, Any]:
    """Write the test set of the images in folder `src` (searched recursively) into `out`, which must not
    exist or be an empty folder; missing parents of `out` are made. The set is built in a hidden folder
    (beside a new `out`, inside an empty one, which keeps its permissions, owner and mount) and moved into
    place when complete: `out` never holds half a set, and a failure or an interrupt leaves nothing, the
    parents this call made included. A set whose manifest would be over MANIFEST_BYTES (open_testset's
    limit) is refused before any image is read. The bytes do not depend on `jobs`. `progress(done, total)`
    is called once the images are found and checked (done 0) and after each image. Returns the manifest."""
    src, out = Path(src), Path(out)
    levels = _check_levels(levels)
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DegradeError(f"seed must be an integer >= 0, got {seed!r}")  # what open_testset reads back
    seed = int(seed)  # JSON holds no numpy integer
    if not src.is_dir():
        raise DegradeError(f"{src}: not a folder")
    if real_path(out) == real_path(src) or real_path(src) in real_path(out).parents:  # a later run's search
        raise DegradeError(f"{out} lies inside {src}: its HR and LR images would be taken for HR photos by the "  # of
                           "next run on that folder; choose a folder outside it")  # the folder would find them
    _check_empty(out)
    files = find_images([src], what="HR images")
    names = testset_names(files, src)
    # The manifest, drawn before any image is read (a draw takes some 60 us: seconds for 30,000 images) with
    # each SHA-256 still a placeholder of its length: its size is the final size, so a set open_testset
    # would refuse is refused here, not after hours of degrading.
    unknown = "0" * 64
    images: list[dict[str, Any]] = [
        {"name": name, "source": f.relative_to(src).as_posix(), "hr": unknown,
         "lr": {str(level): {"sha256": unknown, "params_sha256": unknown,
                             "v": [float(x) for x in encode(testset_params(level, seed, i))]} for level in levels}}
        for i, (name, f) in enumerate(zip(names, files))]
    manifest = {"format": TESTSET_FORMAT, "degrade_version": __version__, "vector_layout": VECTOR_LAYOUT,
                "scale": SCALE, "seed": seed, "levels": levels, "source": str(real_path(src)), "images": images}
    size = len(_manifest_bytes(manifest))
    if size > MANIFEST_BYTES:
        fit = len(files) * MANIFEST_BYTES // size
        raise DegradeError(f"{src}: {len(files)} images at {len(levels)} level(s) make a manifest of "
                           f"{size / 2**20:.1f} MiB, over the {MANIFEST_BYTES / 2**20:g} MiB a test set may have; "
                           f"split them into sets of at most about {fit} images")
    from degrade.shards.executor import OrderedMap

    made: list[Path] = []
    moved: list[str] = []  # what this call moved into an existing `out`: on a failure, exactly that goes
    tmp: Path | None = None
    held = contextlib.ExitStack()  # the hidden folder's lock: this run's while it lives (_remove_stale)
    try:  # from the first folder made: whatever stops the call (a progress callback's Ctrl-C too) takes it back
        made = make_folders(out.parent)
        if progress is not None:
            progress(0, len(files))
        existing = out.is_dir()
        _remove_stale(out if existing else out.parent)
        for attempt in (0, 1):
            try:
                with _signals_held():  # a stop between the folder's making and `tmp` would leave it behind
                    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, suffix=".tmp", dir=out if existing else out.parent))
                    held.enter_context(_hold_folder(tmp))
                    token = _mark_owner(tmp)
                break
            except FileNotFoundError as exc:  # a parent another run made, and took back as it failed, meanwhile
                if attempt:
                    raise _hidden_folder_error(exc, out, existing) from None
                made += make_folders(out.parent)
            except OSError as exc:
                raise _hidden_folder_error(exc, out, existing) from None
        with OrderedMap(_Degrade(files, levels, seed), jobs=jobs) as run:
            for done, (entry, (hr_png, lrs)) in enumerate(zip(images, run(range(len(files)))), 1):
                name = entry["name"]
                entry["hr"] = _put(tmp / "HR" / f"{name}.png", hr_png)
                for level, (lr_png, record) in zip(levels, lrs):
                    item = entry["lr"][str(level)]
                    item["sha256"] = _put(tmp / "LR" / f"level{level}" / f"{name}.png", lr_png)
                    item["params_sha256"] = _put(tmp / "params" / f"level{level}" / f"{name}.json", record)
                with contextlib.suppress(OSError):  # alive: _remove_stale leaves one touched within STALE_S
                    os.utime(tmp)
                if progress is not None:
                    progress(done, len(files))
        _check_still_ours(tmp, token)
        (tmp / OWNER).unlink()  # not part of the set
        write_bytes_atomic(tmp / MANIFEST_NAME, _manifest_bytes(manifest))
        if existing:  # one filesystem: each move is a rename, the manifest (the set's mark) last
            _check_empty(out)  # again: another run may have filled it meanwhile
            for part in ("HR", "LR", "params", MANIFEST_NAME):
                os.rename(tmp / part, out / part)
                moved.append(part)
            with contextlib.suppress(OSError):  # the set is complete: an empty hidden folder left is harmless
                tmp.rmdir()
        else:
            os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes it 0700: give the set the usual permissions
            os.rename(tmp, out)  # a folder made there meanwhile, with files, makes this fail: nothing lost
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        held.close()
        for part in moved:  # a failure between the renames: take back what this call put there, nothing else
            shutil.rmtree(out / part, ignore_errors=True)
        for folder in sorted(made, key=lambda f: len(f.parts), reverse=True):  # deepest first; one another
            # run has put something in meanwhile stays
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    held.close()
    return manifest


def _hidden_folder_error(exc: OSError, out: Path, existing: bool) -> OSError:
    """The failure to make (or mark) the hidden folder, naming `out`: the folder's own path, which the user
    never gave, said '/sys/kernel/.make-testset.XXXX.tmp: Operation not permitted' (and in /proc 'No such
    file or directory'). The same OSError subclass, for the same errno."""
    where = "inside it" if existing else f"beside it in {out.parent}"
    return OSError(exc.errno, f"cannot create the test set {where}: {exc.strerror or exc}", str(out))


def _manifest_bytes(manifest: dict[str, Any]) -> bytes:
    """The manifest as written: the set's fields one a line, then one line per image ("images" last).
    json.dumps(indent=1) put each number of v on a line of its own, 2 kB an image: 34,000 images made a
    manifest over MANIFEST_BYTES, which open_testset then refused."""
    fields = [f" {json.dumps(key)}: {json.dumps(value)}" for key, value in manifest.items() if key != "images"]
    images = ",\n".join("  " + json.dumps(e, separators=(",", ":")) for e in manifest["images"])
    return ("{\n" + ",\n".join(fields) + ',\n "images": [\n' + images + "\n ]\n}\n").encode()


TMP_PREFIX = ".make-testset."
OWNER = ".owner"  # in a hidden folder, while its run works: this machine's boot id, then the run's random token
STALE_S = 15 * 60  # a hidden folder another machine made, unlocked and untouched this long, is a killed run's:
# each run touches its own after each image (where locks are not shared between machines, the age still
# keeps a live one)


def _boot_id() -> str:
    """This running kernel's identity (Linux's boot id; elsewhere the host name): runs under one kernel share
    its locks, so for them an unlocked folder is a dead run's at once."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return "host " + platform.node()


def _mark_owner(tmp: Path) -> str:
    """Write `tmp`/OWNER (the boot id and a new random token); returns the token."""
    token = secrets.token_hex(16)
    (tmp / OWNER).write_text(f"{_boot_id()}\n{token}\n")
    return token


def _owner(folder: Path | str) -> tuple[str, str] | None:
    """(boot id, token) of a hidden folder's OWNER, or None (none, or not ours to read)."""
    try:
        lines = read_regular_file(Path(folder) / OWNER, 256).decode("utf-8", "replace").splitlines()
    except (DegradeError, OSError):
        return None
    return (lines[0], lines[1]) if len(lines) >= 2 else None


def _open_folder(folder: Path | str) -> int:
    """A descriptor of `folder` itself (never through a symlink), to flock it."""
    return os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0))


@contextlib.contextmanager
def _hold_folder(folder: Path) -> Iterator[None]:
    """An exclusive flock on `folder` itself for the block: the hidden folder is this run's while it lives
    (its --jobs workers are started afresh and hold nothing; a kill -9 of the run lets go). On a file
    system without locks, or without POSIX (Windows), no lock."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = _open_folder(folder)
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield
    finally:
        os.close(fd)


def _check_still_ours(tmp: Path, token: str) -> None:
    """DegradeError unless `tmp` still holds this run's OWNER token: a folder removed meanwhile (by hand, or
    by another machine's make-testset where locks are not shared) was made again by the writes into it,
    holding only the images after its removal (and no token: an inode number alone may be reused)."""
    owner = _owner(tmp)
    if owner is None or owner[1] != token:
        raise DegradeError(f"{tmp}: the set's hidden folder was removed while it was written; nothing was written "
                           "to OUT: run the command again")


def _remove_stale(where: Path) -> None:
    """Remove the hidden folders killed make_testset runs left in `where` (kill -9, a power loss: nothing
    of theirs ran to take them back), each taken under its lock (_hold_folder), if no run holds it: at once
    if a run under this kernel made it (its OWNER says so: this kernel's locks are the truth), else once
    untouched for STALE_S. Inside an existing `out` they would otherwise stay in the finished set's folder."""
    try:
        import fcntl
    except ImportError:
        return
    now, here = time.time(), _boot_id()
    try:
        entries = list(os.scandir(where))
    except OSError:  # not listable (a folder one may write into but not read): nothing to clean there
        return
    for entry in entries:
        if not (entry.name.startswith(TMP_PREFIX) and entry.name.endswith(".tmp")):
            continue
        try:
            if not entry.is_dir(follow_symlinks=False):
                continue
            owner = _owner(entry.path)
            if (owner is None or owner[0] != here) and now - entry.stat(follow_symlinks=False).st_mtime < STALE_S:
                continue
            fd = _open_folder(entry.path)
        except OSError:  # gone meanwhile, or not ours to open: leave it
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # a run at work holds it (or no locks here): leave it
                continue
            shutil.rmtree(entry.path, ignore_errors=True)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM held back for the block (POSIX; delivered, and their handlers run, when it ends)."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    held = {signal.SIGINT, signal.SIGTERM}
    before = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def _check_empty(out: Path) -> None:
    """DegradeError unless `out` is absent or an empty folder; a hidden folder another make_testset left
    there (killed, or still at work) does not count, so a retry after a hard kill is not refused."""
    if out.is_symlink() and not out.exists():  # a link to nothing: the set's folder could not be made there
        raise DegradeError(f"{out}: a symbolic link to nothing; a test set is written into a new or empty folder")
    if not out.exists():
        return
    if not out.is_dir():
        raise DegradeError(f"{out}: exists and is not a folder; a test set is written into a new or empty one")
    other = next((p for p in out.iterdir() if not (p.name.startswith(TMP_PREFIX) and p.name.endswith(".tmp"))), None)
    if other is not None:
        raise DegradeError(f"{out}: exists and is not an empty folder (it holds {other.name}); a test set is written "
                           "into a new or empty one")


def _put(path: Path, data: bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, data)
    return hashlib.sha256(data).hexdigest()


def _check_levels(levels: Sequence[int]) -> list[int]:
    try:  # integers (numpy's too): 1.7 was read as level 1
        levels = list(levels)
        out = [operator.index(x) for x in levels if not isinstance(x, (bool, np.bool_))]
    except TypeError:
        levels, out = [levels], []
    if not out or len(out) != len(levels) or len(set(out)) != len(out) or not set(out) <= set(TEST_LEVELS):
        raise DegradeError(f"levels {list(levels)}: expected distinct levels among 1, 2, 3")
    return out


@dataclass(frozen=True)
class TestImage:
    __test__ = False  # not a pytest class
    name: str
    hr_sha256: str
    lr: dict[int, tuple[str, np.ndarray]]  # level -> (SHA-256 of the LR file, v)
    # level -> SHA-256 of the params file; None where the manifest has none (sets written before it had)
    params_sha256: dict[int, str | None] = field(default_factory=dict)


@dataclass(frozen=True)
class TestSet:
    """A test set read back (open_testset): its folder, seed, levels and images, in the order written."""

    __test__ = False  # not a pytest class

    root: Path
    seed: int
    levels: list[int]
    images: list[TestImage]

    def hr_path(self, image: TestImage) -> Path:
        return self.root / "HR" / f"{image.name}.png"

    def lr_path(self, image: TestImage, level: int) -> Path:
        return self.root / "LR" / f"level{level}" / f"{image.name}.png"

    def params_path(self, image: TestImage, level: int) -> Path:
        return self.root / "params" / f"level{level}" / f"{image.name}.json"

    def pairs(self, levels: Sequence[int] | None = None
              ) -> Iterator[tuple[int, str, np.ndarray, np.ndarray, np.ndarray]]:
        """(level, name, HR, LR, v) for each image and each of `levels` (default: all the set's), image by
        image; HR and LR as read_image gives them (float32 in [0, 1]). A file whose bytes do not match
        the manifest's SHA-256 is a DegradeError naming it; the params files are checked too, so a set whose
        records were edited is not scored as if whole, and v (the manifest's, which has no checksum of its
        own) must be the encoding of the image's record, as `degrade verify` checks a dataset's."""
        wanted = self.levels if levels is None else list(levels)
        missing = [lv for lv in wanted if lv not in self.levels]
        if missing:
            raise DegradeError(f"{self.root}: no level {missing[0]} in this test set (it has "
                               f"{', '.join(map(str, self.levels))})")
        for image in self.images:
            hr = _read_checked(self.root, self.hr_path(image), image.hr_sha256)
            for level in wanted:
                sha, v = image.lr[level]
                params_sha = image.params_sha256.get(level)
                if params_sha is not None:
                    path = self.params_path(image, level)
                    _check_inside(self.root, path)
                    raw = read_regular_file(path, PARAMS_BYTES)
                    _check_sha256(path, hashlib.sha256(raw).hexdigest(), params_sha)
                    _check_v(path, raw, level, v)
                lr = _read_checked(self.root, self.lr_path(image, level), sha)
                if hr.shape[:2] != (SCALE * lr.shape[0], SCALE * lr.shape[1]):
                    raise DegradeError(f"{self.lr_path(image, level)}: {lr.shape[1]}x{lr.shape[0]} px is not "
                                       f"1/{SCALE} of its HR ({hr.shape[1]}x{hr.shape[0]} px)")
                yield level, image.name, hr, lr, v


def _check_v(path: Path, raw: bytes, level: int, v: np.ndarray) -> None:
    """The manifest's v and level for an image must be its record's (a digit edited in the manifest's v
    changed the predictor's scores, and nothing said so)."""
    try:
        record = DegradationParams.from_json(raw.decode("utf-8"))
        encoded = encode(record)
    except UnicodeDecodeError:
        raise DegradeError(f"{path}: not UTF-8") from None
    except DegradeError as exc:
        raise DegradeError(f"{path}: {exc}") from None
    if record.level != level or not np.allclose(encoded, v, rtol=0, atol=1e-6):
        raise DegradeError(f"{path}: the manifest's v or level for this image does not match its record "
                           "(an edited manifest?)")


def _read_checked(root: Path, path: Path, sha256: str) -> np.ndarray:
    """The image at `path`, which must lie inside the set's folder `root` once links are resolved (a
    linked folder or file leading out of the set is refused), and whose bytes must match `sha256`."""
    _check_inside(root, path)
    img, digest = read_image_sha256(path)
    _check_sha256(path, digest, sha256)
    return img


def _check_inside(root: Path, path: Path) -> None:
    if real_path(root) not in real_path(path).parents:
        raise DegradeError(f"{path}: leads out of the test set (a symbolic link); refused")


def _check_sha256(path: Path, digest: str, sha256: str) -> None:
    if digest != sha256:
        raise DegradeError(f"{path}: its bytes differ from the test set's manifest (SHA-256); the set is damaged "
                           "or was edited")


def enclosing_testset(path: str | os.PathLike) -> Path | None:
    """The test set folder (make_testset's) that `path` is or lies inside, resolved; None where there is none.
    A folder counts where its manifest.json opens with this format's field (only the first 4 kB are read)."""
    here = real_path(path)
    for folder in (here, *here.parents):
        with contextlib.suppress(OSError, DegradeError):  # a FIFO there hung dasr-eval --save-sr: not opened
            with open_regular(folder / MANIFEST_NAME) as f:
                if f'"format": "{TESTSET_FORMAT}"' in f.read(4096).decode("utf-8", "replace"):
                    return folder
    return None


def open_testset(path: str | os.PathLike) -> TestSet:
    """Read the manifest of the test set in folder `path` (make_testset); DegradeError naming what is wrong."""
    root = Path(path)
    where = root / MANIFEST_NAME
    if not where.exists() and not where.is_symlink():
        raise DegradeError(f"{root}: not a test set (no {MANIFEST_NAME}; `degrade make-testset` writes one)")
    try:  # a regular file, bounded (ImageError otherwise: a DegradeError naming it)
        text = read_regular_file(where, MANIFEST_BYTES)
    except OSError as exc:
        raise DegradeError(f"{where}: cannot read ({exc.strerror or exc})") from None
    try:
        m = strict_json(text)
    except DuplicateKey as exc:
        raise DegradeError(f"{where}: not a readable JSON manifest ({exc})") from None
    except (ValueError, RecursionError) as exc:  # bad JSON or UTF-8, a 5000-digit number, nesting 100000 deep
        raise DegradeError(f"{where}: not a readable JSON manifest ({type(exc).__name__})") from None

    def bad(what: str) -> DegradeError:
        return DegradeError(f"{where}: {what}")

    if not isinstance(m, dict) or m.get("format") != TESTSET_FORMAT:
        raise bad(f"not a {TESTSET_FORMAT} manifest (format {m.get('format') if isinstance(m, dict) else None!r})")
    if m.get("vector_layout") != VECTOR_LAYOUT or m.get("scale") != SCALE:
        raise bad(f"vector layout {m.get('vector_layout')!r}, scale {m.get('scale')!r}: this version reads "
                  f"{VECTOR_LAYOUT}, x{SCALE}")
    seed, levels, images = m.get("seed"), m.get("levels"), m.get("images")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise bad(f"seed {seed!r}: expected an integer >= 0")
    if not isinstance(levels, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in levels):
        raise bad(f"levels {levels!r}: expected a list of levels")
    try:
        levels = _check_levels(levels)
    except DegradeError as exc:
        raise bad(str(exc)) from None
    if not isinstance(images, list) or not images:
        raise bad("no images")
    seen: set[str] = set()
    out = []
    for i, e in enumerate(images):
        if not isinstance(e, dict):
            raise bad(f"image {i}: expected an object")
        name = e.get("name")
        if not _plain_name(name):
            raise bad(f"image {i}: name {name!r} is not a plain relative path inside the set")
        if name in seen:
            raise bad(f"image {i}: name {name!r} appears twice")
        seen.add(name)
        lr = e.get("lr")
        if not _sha(e.get("hr")) or not isinstance(lr, dict) or sorted(lr) != sorted(map(str, levels)):
            raise bad(f"{name}: expected its HR's SHA-256 and one LR entry per level {levels}")
        entries, params = {}, {}
        for level in levels:
            item = lr[str(level)]
            if not isinstance(item, dict) or not _sha(item.get("sha256")) or not _vector(item.get("v")):
                raise bad(f"{name}, level {level}: expected the LR's SHA-256 and a vector of {VECTOR_LENGTH} finite "
                          "numbers in [0, 1]")
            if "params_sha256" in item and not _sha(item["params_sha256"]):  # absent: a set made before it was kept
                raise bad(f"{name}, level {level}: params_sha256 {item['params_sha256']!r} is not a SHA-256")
            entries[level] = (item["sha256"], np.asarray(item["v"], np.float32))
            params[level] = item.get("params_sha256")
        out.append(TestImage(name, e["hr"], entries, params))
    return TestSet(root, seed, levels, out)


def _plain_name(name: Any) -> bool:
    """A relative posix path of plain parts: no empty, '.' or '..' part, no backslash, no NUL, not absolute,
    and one the OS can take (a lone surrogate such as '\\ud800' in a manifest cannot be a file name)."""
    if not isinstance(name, str) or not name or "\\" in name or "\x00" in name or name.startswith("/"):
        return False
    try:
        os.fsencode(name)
    except UnicodeError:
        return False
    return all(part not in ("", ".", "..") for part in name.split("/")) and not PurePosixPath(name).is_absolute()


def _sha(x: Any) -> bool:
    return isinstance(x, str) and _SHA256.fullmatch(x) is not None


def _vector(v: Any) -> bool:
    """33 numbers, each in [0, 1] as encode makes them (NaN fails the comparison; 1e30 would pass a finite
    check and give a predictor MAE of 1e28; an integer of 400 digits compares without becoming a float)."""
    return (isinstance(v, list) and len(v) == VECTOR_LENGTH
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x <= 1 for x in v))
