"""Source images of a dataset: the scan that lists and checks them, and a per-worker cache of decoded images."""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from degrade.discover import SOURCE_SUFFIXES, find_images
from degrade.errors import DatasetError, DegradeError
from degrade.io import (
    ImageError,
    check_max_pixels,
    decode_image_uint8,
    max_file_bytes,
    read_image_sha256,
    read_regular_file,
    real_path,
)
from degrade.samples import sample_dir, sample_images
from degrade.shards.format import BUNDLED, Source

SOURCE_CACHE_BYTES = 1 << 30  # decoded source images kept per process (LRU by size)


@dataclass
class SourceScan:
    """What a scan of the SRC arguments found."""

    root: str
    sources: list[Source]
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    too_small: list[str] = field(default_factory=list)


def list_source_files(srcs: Sequence[str | os.PathLike]) -> dict[Path, Path]:
    """Files named directly, plus image files under folders (recursive), in a stable sorted order
    (`degrade.discover.find_images`), each file once: resolved (what a dataset records), to the path it was
    first found as (a link's own name, what the user sees)."""
    try:
        found = find_images(srcs, what="source images")
    except DegradeError as exc:  # a missing path or nothing found: a dataset's refusal
        raise DatasetError(str(exc)) from None
    unique: dict[Path, Path] = {}
    for f in found:
        unique.setdefault(real_path(f), f)
    return unique


def scan_sources(srcs: Sequence[str | os.PathLike], patch_size: int,
                 progress: Callable[[int, int], None] | None = None, *,
                 max_pixels: int | None = None) -> SourceScan:
    """Decode every candidate once: keep readable images with both sides >= `patch_size`.

    No SRC means the bundled sample photos. Paths are stored relative to the sources' common folder.
    `max_pixels` is the decoded-image cap, as in :func:`degrade.read_image` (None: :func:`degrade.io.pixel_limit`);
    a bad one is refused here, once (DatasetError), not as every image's read failure.
    """
    try:
        check_max_pixels(max_pixels)
    except DegradeError as exc:
        raise DatasetError(str(exc)) from None
    if srcs:
        found = list_source_files(srcs)
        files = list(found)
        root = Path(os.path.commonpath([f.parent for f in files]))
        root_text = str(root)
    else:
        files = [real_path(p) for p in sample_images()]
        found = dict(zip(files, files))
        root, root_text = real_path(sample_dir()), BUNDLED
    if (shown := _not_utf8(root_text)) is not None:  # the manifest and the shards store names as UTF-8
        raise DatasetError(f"{shown}: the sources' folder has a name that is not UTF-8; rename it")
    scan = SourceScan(root=root_text, sources=[])
    for n, f in enumerate(files):
        rel = f.relative_to(root).as_posix()
        if (shown := _not_utf8(rel)) is not None:
            scan.unreadable.append((shown, "its name is not UTF-8, which a dataset stores names as"))
        elif f.suffix.lower() not in SOURCE_SUFFIXES:  # a file named directly, or a link's target: any name
            # given by an image name that resolves to another (a link castle.png to a cache's blob, whose name
            # the dataset records): the name given is what the user knows
            link = found[f].suffix.lower() in SOURCE_SUFFIXES
            via = f", the target of the link {found[f]}" if link else ""
            scan.unreadable.append((rel, f"not an image file name{via} ({', '.join(SOURCE_SUFFIXES)}), which a "
                                         "dataset records and degrade verify re-reads a source only by; "
                                         + ("give a copy of the file" if link else "rename it")))
        else:
            _scan_one(scan, f, rel, patch_size, max_pixels)
        if progress:
            progress(n + 1, len(files))
    return scan


def _scan_one(scan: SourceScan, f: Path, rel: str, patch_size: int, max_pixels: int | None) -> None:
    """File `f` (named `rel`) into `scan`: a source, too small, or unreadable and why."""
    try:
        data = read_regular_file(f, max_file_bytes(max_pixels))  # never a FIFO or device; bounded size
        # the same decoding and checks (pixel cap first) as the workers' read_image
        img = decode_image_uint8(data, max_pixels=max_pixels)
    except OSError as exc:
        scan.unreadable.append((rel, exc.strerror or str(exc)))
    except ImageError as exc:
        scan.unreadable.append((rel, str(exc).removeprefix(f"{f}: ")))  # the reason, without the path
    else:
        h, w = img.shape[:2]
        if min(h, w) < patch_size:
            scan.too_small.append(rel)
        else:
            scan.sources.append(Source(rel, hashlib.sha256(data).hexdigest(), h, w))


def _not_utf8(name: str) -> str | None:
    """None if `name` (a path as the OS gave it: bytes that are not UTF-8 become lone surrogates) encodes as
    UTF-8; else the name to show, its bytes as escapes (\\xff)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(name).decode("utf-8", "backslashreplace")
    return None


class SourceCache:
    """Decoded source images as 8-bit RGB (16-bit rounded to 8 bit, gray copied, alpha dropped), LRU by size.

    Up to `max_bytes` of images stay decoded, so a corpus that fits is decoded once per cache (one per
    worker); beyond that, decoding a source costs once per sample. Images are read-only. A pickled cache
    arrives empty: decoded images never travel between processes.
    """

    def __init__(self, max_bytes: int = SOURCE_CACHE_BYTES):
        self.max_bytes = max_bytes
        self._images: OrderedDict[str, NDArray[np.uint8]] = OrderedDict()

    def load(self, path: str, *, max_pixels: int | None = None, sha256: str | None = None) -> NDArray[np.uint8]:
        """The decoded image at `path`; `max_pixels` as in :func:`degrade.read_image` (None: this process's cap).
        With `sha256` (the scan's), the bytes decoded must have that digest: a source replaced after the scan
        (or another file at the same path on a remote worker) is a DatasetError, not another photo's pixels
        stored under this one's name."""
        image = self._images.pop(path, None)
        if image is None:  # 8 bit straight from the decode (the float32 image took 34 bytes a pixel at the peak)
            image, digest = read_image_sha256(path, max_pixels=max_pixels, uint8=True)
            if sha256 is not None and digest != sha256:
                raise DatasetError(f"{path}: changed since it was scanned (its SHA-256 differs from the "
                                   "manifest's); restore it, or make the dataset anew in a new --out")
            image.setflags(write=False)
        self._images[path] = image
        total = sum(a.nbytes for a in self._images.values())
        while total > self.max_bytes and len(self._images) > 1:
            total -= self._images.popitem(last=False)[1].nbytes
        return image

    @property
    def paths(self) -> list[str]:
        """The cached images' paths, least recently used first."""
        return list(self._images)

    def __getstate__(self) -> dict[str, Any]:
        return {"max_bytes": self.max_bytes, "_images": OrderedDict()}
