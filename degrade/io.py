"""Image I/O: the one place where files become float32 RGB arrays and back (docs/degradation.md).

Reading accepts PNG, JPEG, WebP, BMP, TIFF and PNM/PAM files and converts, as documented in
docs/degradation.md: 8-bit and 16-bit samples are scaled to [0, 1] (x / 255, x / 65535); gray
becomes RGB by copying; an alpha channel is dropped (not composited; read_image_alpha returns it
apart); EXIF orientation is applied. Writing stores 8-bit RGB or RGBA in a lossless format (PNG, BMP, TIFF).

Reading is bounded (docs/dataset-format.md, trust model): only regular files, at most
max_file_bytes() long, are read, and the image size declared in the file's header is checked
against pixel_limit() before anything is decoded, so a small file that claims a huge image costs
nothing. Decoding then needs about 15 bytes per pixel at its peak (8-bit input); read_image_alpha's
second decode, for a file that has alpha, adds about 5 (a 16 MP RGBA PNG: 0.43 GB peak RSS against
read_image's 0.35 GB, 2026-11-26).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import os
import re
import stat
import struct
import tempfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import cv2
import numpy as np
from numpy.typing import NDArray

from degrade.errors import DegradeError, ImageError

LOSSLESS_SUFFIXES = (".png", ".bmp", ".tif", ".tiff")
DEFAULT_MAX_PIXELS = 100_000_000  # 100 MP: above real photos (a 61 MP full-frame camera), below a 10 GiB decode
MAX_PIXELS_ENV = "DEGRADE_MAX_PIXELS"  # raises (or lowers) the cap; `--max-pixels` of the CLIs sets it
FORMATS = "PNG, JPEG, WebP, BMP, TIFF or PNM"


def pixel_limit() -> int:
    """The largest image (width x height) that will be decoded: $DEGRADE_MAX_PIXELS or DEFAULT_MAX_PIXELS."""
    raw = os.environ.get(MAX_PIXELS_ENV)
    if raw is None:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_PIXELS_CEILING:
        raise ImageError(f"{MAX_PIXELS_ENV}={raw!r}: expected a positive number of pixels, at most "
                         f"{MAX_PIXELS_CEILING} (2**40)")
    return value


MAX_PIXELS_CEILING = 1 << 40  # a limit beyond any image (a 10^23 one overflowed the read of its bytes)


def check_max_pixels(max_pixels: int | None) -> int:
    """A read's pixel limit: `max_pixels`, an integer in [1, 2**40], or :func:`pixel_limit` for None;
    ImageError otherwise."""
    if max_pixels is None:
        return pixel_limit()
    if isinstance(max_pixels, (bool, np.bool_)) or not isinstance(max_pixels, (int, np.integer)) or not (
            1 <= max_pixels <= MAX_PIXELS_CEILING):
        raise ImageError(f"max_pixels must be an integer in [1, 2**40], got {max_pixels!r}")
    return int(max_pixels)


def max_file_bytes(pixels: int | None = None) -> int:
    """The largest image file read: an uncompressed 16-bit RGBA image of `pixels` pixels plus 64 MiB."""
    return 8 * check_max_pixels(pixels) + (64 << 20)


def real_path(path: str | os.PathLike) -> Path:
    """`path` absolute, with its symlinks followed where they lead somewhere: Path.resolve() as Python 3.13
    has it, where a symlink loop is left in the path (an open of it then fails with ELOOP, an OSError)
    instead of raising RuntimeError (Python 3.10-3.12), which no caller expects."""
    return Path(os.path.realpath(path))


def read_regular_file(path: str | os.PathLike, limit: int) -> bytes:
    """The bytes of `path`, which must be a regular file of at most `limit` bytes.

    A FIFO, device or socket is refused before it is opened (reading /dev/zero never ends, a FIFO
    blocks); the file is opened non-blocking and checked again, against a swap in between.
    Raises ImageError (a missing file, a folder, too large) or OSError (unreadable).
    """
    path = Path(path)
    try:
        f = open_regular(path, limit)
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    with f:  # the file's own size bounds the buffer (a read of limit + 1 bytes allocated that much first)
        size = os.fstat(f.fileno()).st_size
        data = f.read(min(limit, size) + 1)
        if size < len(data) <= limit:  # grown since its size was read: on, in bounded pieces, to EOF or the limit
            pieces = [data]
            while (got := sum(map(len, pieces))) <= limit and (more := f.read(min(1 << 24, limit + 1 - got))):
                pieces.append(more)
            data = b"".join(pieces)
    if len(data) > limit:
        raise ImageError(f"{path}: larger than {limit} bytes")
    return data


def open_regular(path: str | os.PathLike, limit: int | None = None) -> BinaryIO:
    """`path` opened for binary reading if it is a regular file (of at most `limit` bytes), else ImageError;
    a missing or unreadable file is the OSError it is. A FIFO or device is refused before it is opened, and
    the file is opened non-blocking and checked again, against a swap in between."""
    path = Path(path)
    _check_regular(path, os.stat(path), limit)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    f = os.fdopen(fd, "rb")
    try:
        _check_regular(path, os.fstat(fd), limit)
    except BaseException:
        f.close()
        raise
    return f


def _check_regular(path: Path, info: os.stat_result, limit: int | None) -> None:
    if stat.S_ISDIR(info.st_mode):
        raise ImageError(f"{path}: is a directory")
    if not stat.S_ISREG(info.st_mode):
        raise ImageError(f"{path}: not a regular file (a device, FIFO or socket is never read)")
    if limit is not None and info.st_size > limit:
        raise ImageError(f"{path}: {info.st_size} bytes, larger than the {limit}-byte limit")


def read_image(path: str | os.PathLike, *, max_pixels: int | None = None) -> NDArray[np.float32]:
    """Read an image file as (H, W, 3) float32 RGB in [0, 1].

    Refuses (ImageError) anything but a regular file of at most max_file_bytes(), and images whose
    header declares more than `max_pixels` pixels (default: :func:`pixel_limit`), before decoding.
    """
    return _read(path, max_pixels, lambda data: decode_image(data, max_pixels=max_pixels))


def read_image_sha256(path: str | os.PathLike, *, max_pixels: int | None = None,
                      uint8: bool = False) -> tuple[NDArray[np.float32] | NDArray[np.uint8], str]:
    """read_image's result (with `uint8`: as to_uint8 rounds it, decoded without the float image) and the
    SHA-256 (hex) of the bytes it was decoded from (one read)."""
    decode = decode_image_uint8 if uint8 else decode_image
    return _read(path, max_pixels, lambda data: (decode(data, max_pixels=max_pixels),
                                                 hashlib.sha256(data).hexdigest()))


def _read(path: str | os.PathLike, max_pixels: int | None, decode: Callable[[bytes], Any]) -> Any:
    """decode(the file's bytes), read bounded; a refusal or failure is an ImageError naming the file."""
    path = Path(path)
    try:
        data = read_regular_file(path, max_file_bytes(max_pixels))
    except OSError as exc:
        raise ImageError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        return decode(data)
    except ImageError as exc:
        raise ImageError(f"{path}: {exc}") from None


def read_image_alpha(path: str | os.PathLike, *, max_pixels: int | None = None
                     ) -> tuple[NDArray[np.float32], NDArray[np.uint8] | None]:
    """read_image's RGB, and the image's alpha channel as (H, W) uint8 (16-bit alpha rounded), or None for
    an image without one (decode_alpha says which formats can hold one)."""
    def decode(data: bytes) -> tuple[NDArray[np.float32], NDArray[np.uint8] | None]:
        rgb = decode_image(data, max_pixels=max_pixels)
        return rgb, decode_alpha(data, rgb)

    return _read(path, max_pixels, decode)


def decode_alpha(data: bytes, rgb: NDArray[np.float32]) -> NDArray[np.uint8] | None:
    """The alpha channel of encoded image bytes, as (H, W) uint8 aligned with `rgb`, their decode_image
    result; None where the file has none. Decoded only where the format can hold one (a PNG of colour
    type 4 or 6 or with a tRNS chunk, a WebP with alpha, a 32-bit BMP, TIFF, PAM). Reading with alpha
    does not apply the EXIF orientation decode_image applied (PNG, and WebP where this OpenCV honours its
    tag), so the alpha is turned as the file's tag says (_exif_orientation); a sample of the colour must
    then match `rgb`, or there is no alpha. A BMP's all-zero alpha means none was stored (as browsers read it)."""
    may, key = _alpha_source(data)
    if not may:
        return None
    try:
        img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error:
        return None  # decode_image read it: what it cannot read here is no alpha
    if img is None or img.dtype not in (np.uint8, np.uint16):
        return None
    if img.ndim == 2 and key is not None:  # a gray PNG whose tRNS names one transparent gray level
        alpha = np.where(img == key, np.uint8(0), np.uint8(255))
        colour = img[..., None]
    elif img.ndim == 3 and img.shape[2] in (2, 4):
        alpha, colour = img[..., -1], img[..., :-1]
    else:
        return None
    turn = ORIENTATIONS.get(_exif_orientation(data), ORIENTATIONS[1])
    alpha, colour = turn(alpha), turn(colour)
    if alpha.shape != rgb.shape[:2]:
        return None
    # The colour of this decode must be decode_image's (a PAM's comes in file order, so RGB or BGR), scaled
    # as it scales: by the sample type's range, or a PAM's MAXVAL
    full = _full_scale(data, colour.dtype)
    step = max(1, int(np.sqrt(alpha.size / 4096)))  # a sample of about 4096 pixels: the check costs no copy
    got = np.minimum(colour[::step, ::step].astype(np.float32) / np.float32(full), np.float32(1))
    want = rgb[::step, ::step]
    if not any(np.array_equal(got[..., order], want) for order in ([2, 1, 0], [0, 1, 2], [0, 0, 0])
               if got.shape[2] == 3 or order == [0, 0, 0]):
        return None
    if full not in (255, 65535):  # a PAM's MAXVAL: to 0-255, rounded to the nearest level
        alpha = ((np.minimum(alpha.astype(np.uint32), full) * 255 + full // 2) // full).astype(np.uint8)
    elif alpha.dtype == np.uint16:
        alpha = ((alpha.astype(np.uint32) + 128) // 257).astype(np.uint8)  # rounded to the nearest 8-bit level
    if data[:2] == b"BM" and not alpha.any():
        return None
    return np.ascontiguousarray(alpha)


# EXIF orientation -> the turn that shows an image as stored the way the tag says (what OpenCV applies)
ORIENTATIONS = {1: lambda a: a, 2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
                5: lambda a: np.swapaxes(a, 0, 1), 6: lambda a: np.rot90(a, -1),
                7: lambda a: np.rot90(a[:, ::-1], -1), 8: lambda a: np.rot90(a, 1)}


def _png_walk(d: bytes) -> Iterator[tuple[bytes, memoryview, int]]:
    """(type, data, stored CRC) of each whole chunk of a PNG, in order, through IEND; it ends early where the
    file ends inside a chunk. Each step moves on, so the walk is bounded by the file; slices of the view copy
    nothing (d may be any bytes-like object)."""
    i, view = 8, memoryview(d)
    while i + 12 <= len(d):
        n = struct.unpack(">I", view[i:i + 4])[0]
        if i + 12 + n > len(d):
            return
        kind = bytes(view[i + 4:i + 8])
        yield kind, view[i + 8:i + 8 + n], struct.unpack(">I", view[i + 8 + n:i + 12 + n])[0]
        if kind == b"IEND":
            return
        i += 12 + n


def _crc_holds(kind: bytes, data: memoryview, crc: int) -> bool:
    return zlib.crc32(data, zlib.crc32(kind)) == crc


def _png_chunks(d: bytes, past_idat: bool = False) -> Iterator[tuple[bytes, bytes]]:
    """(type, data) of a PNG's chunks whose CRC holds (libpng drops the others), up to its first IDAT, or up
    to IEND (what follows is not the image's)."""
    for kind, data, crc in _png_walk(d):
        if kind == b"IEND" or kind == b"IDAT" and not past_idat:
            return
        if _crc_holds(kind, data, crc):
            yield kind, bytes(data)


def _png_damage(d: bytes) -> str | None:
    """What makes libpng fail on a still PNG, found first: its chunks, followed by their lengths, end before
    a whole IEND chunk, or a critical chunk before it (IHDR, PLTE, IDAT: an upper-case first letter) fails
    its CRC. OpenCV fails on such a file anyway, but libpng first printed "libpng error: PNG input buffer is
    incomplete" or "libpng error: IDAT: CRC error" on the terminal, a line no caller can take back. Not
    caught, so still a libpng line: damage libpng only warns about (the CRC of IEND or of an ancillary
    chunk: the image is read) and damage inside a chunk whose CRC holds. An animated PNG (acTL before the
    first IDAT) is left to OpenCV, which reads its first frame by itself, without those checks."""
    for kind, data, crc in _png_walk(d):
        if kind in (b"IEND", b"acTL"):
            return None
        if 65 <= kind[0] <= 90 and not _crc_holds(kind, data, crc):  # critical: upper-case first letter
            return f"its {kind.decode('latin-1')!r} chunk fails its CRC"
    return "it ends before its IEND chunk"


def _alpha_source(d: bytes) -> tuple[bool, int | None]:
    """Whether the file's format can hold alpha, and a gray PNG's transparent level (its tRNS), if any."""
    if d[:8] == b"\x89PNG\r\n\x1a\n":
        if d[25:26] in (b"\x04", b"\x06"):  # colour type: gray + alpha, RGBA
            return True, None
        trns = next((data for kind, data in _png_chunks(d) if kind == b"tRNS"), None)
        if trns is None:
            return False, None
        if d[25:26] != b"\x00" or len(trns) < 2:  # palette and RGB: OpenCV expands tRNS to an alpha channel
            return True, None
        depth = d[24]  # a gray level of 1, 2 or 4 bits is decoded to 8 bits (x 255, 85, 17)
        return True, struct.unpack(">H", trns[:2])[0] * (255 // ((1 << depth) - 1) if depth < 8 else 1)
    if d[:4] == b"RIFF" and d[8:12] == b"WEBP":
        return (d[12:16] == b"VP8X" and len(d) > 20 and bool(d[20] & 0x10)) or d[12:16] == b"VP8L", None
    if d[:2] == b"BM":
        return len(d) >= 30 and struct.unpack("<H", d[28:30])[0] == 32, None
    return d[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+") or _is_pam(d), None  # TIFF, PAM


def _exif_orientation(d: bytes) -> int:
    """The EXIF orientation (1-8) this OpenCV applies to decode_image's colour but not to a decode with alpha:
    a PNG's eXIf or a WebP's EXIF tag, where this build honours the format's tag (_opencv_turns; OpenCV 4.x
    does not for WebP); 1 for anything else (a TIFF's decoder turns both decodes alike)."""
    tiff = None
    if d[:8] == b"\x89PNG\r\n\x1a\n" and _opencv_turns("png"):
        tiff = next((data for kind, data in _png_chunks(d, past_idat=True) if kind == b"eXIf"), None)
    elif (d[:4] == b"RIFF" and d[8:12] == b"WEBP" and d[12:16] == b"VP8X" and len(d) > 20 and d[20] & 0x08
          and _opencv_turns("webp")):  # the VP8X header says an EXIF chunk follows
        i = 12
        while i + 8 <= len(d) and tiff is None:
            n = struct.unpack("<I", d[i + 4:i + 8])[0]
            if d[i:i + 4] == b"EXIF" and i + 8 + n <= len(d):
                tiff = d[i + 8:i + 8 + n]
                tiff = tiff[6:] if tiff[:6] == b"Exif\x00\x00" else tiff  # some writers keep JPEG's prefix
            i += 8 + n + (n & 1)
    if not tiff:
        return 1
    try:
        order = {b"II": "<", b"MM": ">"}[tiff[:2]]
        ifd = struct.unpack(order + "I", tiff[4:8])[0]
        for k in range(struct.unpack(order + "H", tiff[ifd:ifd + 2])[0]):  # IFD0 only: at most 65535 steps
            tag, kind = struct.unpack(order + "HH", tiff[ifd + 2 + 12 * k:ifd + 6 + 12 * k])
            if tag == 0x0112 and kind == 3:
                value = struct.unpack(order + "H", tiff[ifd + 10 + 12 * k:ifd + 12 + 12 * k])[0]
                return value if value in ORIENTATIONS else 1
    except (KeyError, struct.error):
        pass
    return 1


@functools.lru_cache(maxsize=None)
def _opencv_turns(fmt: str) -> bool:
    """Whether this OpenCV build turns a `fmt` ("png" or "webp") image's colour by its EXIF orientation, and
    not its decode with alpha: probed once with a white-then-black 1 x 2 image tagged 6 (turned a quarter
    clockwise, white above black). False where it cannot say (no encoder for the format, say)."""
    exif = b"MM\x00*" + struct.pack(">IH", 8, 1) + struct.pack(">HHIHH", 0x0112, 3, 1, 6, 0) + bytes(4)
    img = np.full((1, 2, 4), 255, np.uint8)
    img[0, 1, :3] = 0  # white, then black
    try:
        ok, buf = cv2.imencode("." + fmt, img, [cv2.IMWRITE_WEBP_QUALITY, 101] if fmt == "webp" else [])
        if not ok:
            return False
        data = buf.tobytes()
        if fmt == "png":
            at = data.index(b"IDAT") - 4
            chunk = struct.pack(">I", len(exif)) + b"eXIf" + exif + struct.pack(">I", zlib.crc32(b"eXIf" + exif))
            data = data[:at] + chunk + data[at:]
        else:  # RIFF WEBP VP8L... -> VP8X (alpha and EXIF flags, canvas 2 x 1) + VP8L + EXIF
            vp8x = b"VP8X" + struct.pack("<I", 10) + bytes([0x18, 0, 0, 0]) + (1).to_bytes(3, "little") + bytes(3)
            body = vp8x + data[12:] + b"EXIF" + struct.pack("<I", len(exif)) + exif
            data = b"RIFF" + struct.pack("<I", 4 + len(body)) + b"WEBP" + body
        buf = np.frombuffer(data, np.uint8)
        colour = cv2.imdecode(buf, cv2.IMREAD_ANYCOLOR | cv2.IMREAD_ANYDEPTH)
        unchanged = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    except (cv2.error, ValueError):  # no encoder or decoder for the format in this build
        return False
    if colour is None or unchanged is None or colour.shape[:2] != (2, 1) or unchanged.shape[:2] != (1, 2):
        return False
    return bool(colour[0, 0].min() > 127 and colour[1, 0].max() < 128)  # clockwise: white above black


def decode_image(data: bytes, *, max_pixels: int | None = None) -> NDArray[np.float32]:
    """Encoded image bytes -> (H, W, 3) float32 RGB in [0, 1], with the conversions of read_image.

    Raises ImageError (message without a file name) for undecodable data, unsupported sample types,
    and images whose header declares more than `max_pixels` pixels (checked before decoding).
    """
    rgb, full = _decode_rgb(data, max_pixels)
    return _to_unit(rgb.astype(np.float32), full)


def decode_image_uint8(data: bytes, *, max_pixels: int | None = None) -> NDArray[np.uint8]:
    """to_uint8(decode_image(data)), the same bytes, without the float32 image (4 bytes a sample, and the
    passes over it: 34 bytes a pixel at the peak against about 7): 8-bit RGB at full scale 255 as decoded
    (to_uint8 of x / 255 is x), any other sample through a table of to_uint8 of each value's float."""
    rgb, full = _decode_rgb(data, max_pixels)
    if rgb.dtype == np.uint8 and full == 255:
        return rgb
    values = np.arange(np.iinfo(rgb.dtype).max + 1, dtype=np.float32)  # each sample value, as decode_image
    return to_uint8(_to_unit(values, full))[rgb]  # scales it


def _to_unit(samples: NDArray[np.float32], full: int) -> NDArray[np.float32]:
    """Decoded samples (as float32, scaled in place) over their full-intensity value: [0, 1]."""
    np.divide(samples, np.float32(full), out=samples)
    if full not in (255, 65535):  # a PNM sample above its maxval (a damaged file) is full intensity
        np.minimum(samples, np.float32(1), out=samples)
    return samples


def _decode_rgb(data: bytes, max_pixels: int | None) -> tuple[NDArray[np.uint8] | NDArray[np.uint16], int]:
    """decode_image's RGB before scaling (8 or 16 bit, as stored) and the sample value of full intensity."""
    limit = check_max_pixels(max_pixels)
    width, height = image_size(data)
    if width * height > limit:
        raise ImageError(f"{width}x{height} is {width * height / 1e6:.1f} MP, above the {limit / 1e6:g} MP limit "
                         f"(raise it with {MAX_PIXELS_ENV} or a command's --max-pixels)")
    buf = np.frombuffer(data, dtype=np.uint8)
    # ANYCOLOR|ANYDEPTH keeps 16 bit and gray, drops alpha and honours EXIF orientation. A PAM with alpha
    # comes out scrambled that way (OpenCV 4.x-5.0): it is read as stored (file order: RGB or gray, then
    # alpha) and its alpha dropped here; a PAM has no EXIF to honour.
    pam = _is_pam(data)
    damage = _png_damage(data) if data[:8] == b"\x89PNG\r\n\x1a\n" else None
    if damage:
        raise ImageError(f"not a readable image (a damaged PNG: {damage})")
    try:
        flags = cv2.IMREAD_UNCHANGED if pam else cv2.IMREAD_ANYCOLOR | cv2.IMREAD_ANYDEPTH
        img = cv2.imdecode(buf, flags) if buf.size else None
    except cv2.error as exc:  # e.g. OpenCV's own size limits: a refusal, not a crash
        raise ImageError(f"not a readable image ({' '.join(str(exc).split())[-120:]})") from None
    if img is None or img.size == 0:
        raise ImageError("not a readable image")
    if img.dtype not in (np.uint8, np.uint16):
        raise ImageError(f"unsupported sample type {img.dtype} (expected 8 or 16 bit)")
    if img.shape[0] * img.shape[1] > limit:  # the header's size was checked; so is what was decoded
        raise ImageError(f"decoded {img.shape[1]}x{img.shape[0]} px, above the {limit / 1e6:g} MP limit "
                         f"(raise it with {MAX_PIXELS_ENV} or a command's --max-pixels)")
    if pam and img.ndim == 3:
        img = img[..., 0] if img.shape[2] <= 2 else np.ascontiguousarray(img[..., 2::-1])  # RGB(A) -> BGR
    # To RGB while still 8/16-bit (a third of the memory of float32); values equal the older float path.
    if img.ndim == 2:
        rgb = np.repeat(img[..., None], 3, axis=2)
    else:  # BGR or BGRA (defensive: some decoders keep alpha)
        rgb = np.ascontiguousarray(img[..., 2::-1])
    del img
    return rgb, _full_scale(data, rgb.dtype)


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) declared in the header of a PNG, JPEG, WebP, BMP, TIFF or PNM/PAM file.

    Reads only the header, so the size can be checked before decoding. Raises ImageError for other
    formats and for headers that are cut short or declare an empty image.
    """
    try:
        size = _header_size(data)
    except (struct.error, IndexError, KeyError, ValueError):
        size = None
    if size is None:
        raise ImageError(f"not a readable image (not {FORMATS}, or its header is damaged)")
    width, height = size
    if width < 1 or height < 1:
        raise ImageError(f"not a readable image (its header declares {width}x{height})")
    return width, height


def _header_size(d: bytes) -> tuple[int, int] | None:
    if d[:8] == b"\x89PNG\r\n\x1a\n" and d[12:16] == b"IHDR":
        return struct.unpack(">II", d[16:24])
    if d[:2] == b"\xff\xd8":
        return _jpeg_size(d)
    if d[:4] == b"RIFF" and d[8:12] == b"WEBP":
        return _webp_size(d)
    if d[:2] == b"BM":
        if struct.unpack("<I", d[14:18])[0] == 12:  # BITMAPCOREHEADER: 16-bit sizes
            return struct.unpack("<HH", d[18:22])
        w, h = struct.unpack("<ii", d[18:26])
        return abs(w), abs(h)  # negative height: top-down rows
    if d[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return _tiff_size(d)
    if d[:1] == b"P" and d[1:2] in b"1234567" and d[1:2] != b"":
        return _pnm_header(d)[:2]
    return None


def _jpeg_size(d: bytes) -> tuple[int, int] | None:
    """Frame size from the first SOF marker (SOF0-15 except DHT C4, JPG C8, DAC CC)."""
    i = 2
    while i + 4 <= len(d):
        if d[i] != 0xFF:
            return None
        marker = d[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # stand-alone markers
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image / start of scan before any frame header
            return None
        length = struct.unpack(">H", d[i + 2:i + 4])[0]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            h, w = struct.unpack(">HH", d[i + 5:i + 9])
            return w, h
        if length < 2:
            return None
        i += 2 + length
    return None


def _webp_size(d: bytes) -> tuple[int, int] | None:
    chunk = d[12:16]
    if chunk == b"VP8X":
        w = int.from_bytes(d[24:27], "little") + 1
        h = int.from_bytes(d[27:30], "little") + 1
        return w, h
    if chunk == b"VP8L" and d[20] == 0x2F:
        bits = struct.unpack("<I", d[21:25])[0]
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8 " and d[23:26] == b"\x9d\x01\x2a":
        w, h = struct.unpack("<HH", d[26:30])
        return w & 0x3FFF, h & 0x3FFF
    return None


def _tiff_size(d: bytes) -> tuple[int, int] | None:
    """ImageWidth (256) and ImageLength (257) of the first IFD (the page OpenCV decodes); BigTIFF too. None
    where either is missing, of another type, or given twice."""
    e = "<" if d[:2] == b"II" else ">"
    big = struct.unpack(e + "H", d[2:4])[0] == 43
    if big:
        ifd = struct.unpack(e + "Q", d[8:16])[0]
        count, size, at = struct.unpack(e + "Q", d[ifd:ifd + 8])[0], 20, ifd + 8
    else:
        ifd = struct.unpack(e + "I", d[4:8])[0]
        count, size, at = struct.unpack(e + "H", d[ifd:ifd + 2])[0], 12, ifd + 2
    found: dict[int, int] = {}
    for n in range(min(count, 4096)):
        entry = d[at + n * size:at + (n + 1) * size]
        tag, kind = struct.unpack(e + "HH", entry[:4])
        if tag in (256, 257):
            if tag in found:  # said twice: libtiff takes the first, a 16 x 16 second hid 32768 x 32768 (12 GB)
                return None
            value = entry[12:] if big else entry[8:]
            fmt = {3: "H", 4: "I", 16: "Q"}.get(kind)
            if fmt is None:
                return None
            found[tag] = struct.unpack(e + fmt, value[:struct.calcsize(fmt)])[0]
    if 256 in found and 257 in found:
        return found[256], found[257]
    return None


PNM_HEADER_BYTES = 65536  # where a PNM/PAM header (comments included) must end; OpenCV reads longer ones too


def _pnm_header(d: bytes) -> tuple[int, int, int | None]:
    """(width, height, maxval) from a PNM (P1-P6; maxval None for the bitmaps P1 and P4) or PAM (P7) header,
    read as OpenCV's readers read them (:func:`_pnm_numbers`, :func:`_pam_header`): a header read otherwise
    declares another size or maxval than the one decoded. ValueError if it is not one."""
    if d[1:2] == b"7":
        width, height, _, maxval = _pam_header(d)
        size: tuple[int, int, int | None] = width, height, maxval
    else:
        values = _pnm_numbers(d, 2 if d[1:2] in (b"1", b"4") else 3)
        size = values[0], values[1], values[2] if len(values) == 3 else None
    if size[2] is not None and not 0 < size[2] < 65536:  # Netpbm's range: 0 or less would divide by it
        raise ValueError("PNM maxval outside 1-65535")
    return size


_SPACE = frozenset(b" \t\n\r\x0b\x0c")  # C's isspace
INT_MAX = 2**31 - 1  # OpenCV's bound on a PNM/PAM header number


def _pnm_numbers(d: bytes, n: int) -> list[int]:
    """The first `n` numbers of a P1-P6 header (after its magic), as OpenCV's reader reads them: before a
    number, whitespace and # comments (to CR or LF: a header split at LF only took a CR-ended comment's line
    for the comment and declared 255x1 for a 150 MP file) are skipped, anything else is no header; a number
    is its digits and ends at any other byte, which is consumed ("3 2#1" reads 3, 2 and 1; int() took "1_0"
    for 10). Any count of digits, leading zeros included, up to a value of INT_MAX (above it OpenCV refuses
    the file). Within the first PNM_HEADER_BYTES: a number the window cuts is a short header (ValueError)."""
    end, pos, out = min(len(d), PNM_HEADER_BYTES + 1), 2, []  # + 1: the byte that ends the last number
    for _ in range(n):
        while pos < end and not 48 <= d[pos] <= 57:
            if d[pos] == 35:  # '#': to the end of the line, which is consumed too
                while pos < end and d[pos] not in (10, 13):
                    pos += 1
            elif d[pos] not in _SPACE:
                raise ValueError("not a PNM header")
            pos += 1
        start = pos
        while pos < end and 48 <= d[pos] <= 57:
            pos += 1
        if pos >= end:  # cut by the window (or the file's end)
            raise ValueError("short PNM header")
        digits = d[start:pos].lstrip(b"0")  # at most 64 KiB of them; 11 or more left are above INT_MAX
        if len(digits) > 10 or int(digits or b"0") > INT_MAX:
            raise ValueError("PNM header number above INT_MAX")
        out.append(int(digits or b"0"))
        pos += 1  # the byte that ends a number
    return out


def _is_pam(d: bytes) -> bool:
    """Whether OpenCV reads `d` as a PAM: P7, then CR or LF (its reader refuses any other byte there)."""
    return d[:2] == b"P7" and d[2:3] in (b"\n", b"\r")


_PAM_FIELDS = (b"ENDHDR", b"HEIGHT", b"WIDTH", b"DEPTH", b"MAXVAL", b"TUPLTYPE")
_PAM_TUPLTYPES = (b"", b"BLACKANDWHITE", b"GRAYSCALE", b"GRAYSCALE_ALPHA", b"RGB", b"RGB_ALPHA")
_SPACES, _A_SPACE, _EOL = re.compile(rb"[ \t\n\r\x0b\x0c]*"), re.compile(rb"[ \t\n\r\x0b\x0c]"), re.compile(rb"[\r\n]")


def _pam_header(d: bytes) -> tuple[int, int, int, int]:
    """(width, height, depth, maxval) of a PAM (P7) header, read as OpenCV's reader (4.11 and later) reads it,
    line by line to ENDHDR: whitespace (line ends included) is skipped; a '#' starts a comment that runs to CR
    or LF; else an identifier of at most 8 bytes, ended by whitespace, that must be one of ENDHDR, WIDTH,
    HEIGHT, DEPTH, MAXVAL, TUPLTYPE exactly; its value runs (after more whitespace, unless CR or LF ended the
    identifier) to CR or LF, at most 255 bytes, trailing whitespace dropped. A number is an optional '-' and
    decimal digits, below INT_MAX; an empty value is 0. Refused (ValueError), as OpenCV refuses them: another
    byte than CR or LF after P7, an unknown identifier, a repeated WIDTH, HEIGHT, DEPTH or MAXVAL, a missing
    one, a TUPLTYPE other than those OpenCV names (exact case; the last one counts, an empty one is none), a
    MAXVAL above 65535, a DEPTH outside 1-4 or, without a TUPLTYPE, other than 1 or 3 at a MAXVAL below 256.
    Whether the TUPLTYPE fits the DEPTH is left to OpenCV's decoder (OpenCV 5 refuses RGB at DEPTH 1; 4.x does
    not). The header must end within the first PNM_HEADER_BYTES (ValueError)."""
    if not _is_pam(d):
        raise ValueError("not a PAM header")
    w = d[:PNM_HEADER_BYTES]
    pos, fields, tupltype = 3, {}, b""
    while True:
        pos = _SPACES.match(w, pos).end()
        if pos >= len(w):
            raise ValueError("short PAM header")
        if w[pos] == 35:  # '#': a comment, its CR or LF consumed
            eol = _EOL.search(w, pos)
            if eol is None:
                raise ValueError("short PAM header")
            pos = eol.end()
            continue
        space = _A_SPACE.search(w, pos, pos + 9)  # an identifier ends at whitespace within 8 bytes
        if space is None:
            raise ValueError("PAM identifier too long, or a short header")
        ident, pos = w[pos:space.start()].split(b"\0")[0], space.end()  # C strings: a NUL ends one
        if ident not in _PAM_FIELDS:
            raise ValueError("unknown PAM header field")
        value = b""
        if space.group() not in (b"\n", b"\r"):
            pos = _SPACES.match(w, pos).end()
            eol = _EOL.search(w, pos, pos + 256)
            if eol is None:
                raise ValueError("PAM header value longer than 255 bytes, or a short header")
            value, pos = w[pos:eol.start()].rstrip(b" \t\n\r\x0b\x0c").split(b"\0")[0], eol.end()
        if ident == b"ENDHDR":
            break
        if ident == b"TUPLTYPE":
            if value not in _PAM_TUPLTYPES:
                raise ValueError("unknown PAM TUPLTYPE")
            tupltype = value
            continue
        if ident in fields:
            raise ValueError("repeated PAM header field")
        number = re.fullmatch(rb"-?[0-9]+|[0-9]*", value)
        if number is None or int(value.lstrip(b"-").lstrip(b"0") or b"0") >= INT_MAX:  # at most 255 digits
            raise ValueError("PAM header value is not a number below INT_MAX")
        fields[ident] = int(value or b"0")
        if ident == b"MAXVAL" and fields[ident] > 65535:
            raise ValueError("PAM MAXVAL above 65535")
    if len(fields) < 4:
        raise ValueError("PAM header lacks WIDTH, HEIGHT, DEPTH or MAXVAL")
    depth, maxval = fields[b"DEPTH"], fields[b"MAXVAL"]
    if not 1 <= depth <= 4 or not tupltype and not (depth in (1, 3) and maxval < 256):
        raise ValueError("PAM DEPTH outside 1-4, or a layout OpenCV cannot tell without a TUPLTYPE")
    return fields[b"WIDTH"], fields[b"HEIGHT"], depth, maxval


def _full_scale(data: bytes, sample: np.dtype) -> int:
    """The sample value that means full intensity in what OpenCV decoded from `data`: 255 or 65535 by the
    sample type, but a PNM's maxval where OpenCV returns the file's values as they are. It does for the
    binary P5/P6 and for PAM at any maxval, and for the ASCII P2/P3 above 255 (below 256 it scales them to
    0-255 itself); the bitmaps P1/P4 decode to 0 and 255 (tests/test_io.py pins all of these). A PAM of
    MAXVAL 1 is refused (ImageError)."""
    full = 255 if sample == np.uint8 else 65535
    if data[:1] != b"P" or data[1:2] not in (b"2", b"3", b"5", b"6", b"7"):
        return full
    maxval = _pnm_header(data)[2]
    assert maxval is not None
    if data[1:2] == b"7" and maxval == 1:  # a byte per sample (Netpbm), which OpenCV reads as packed bits
        raise ImageError("a PAM of MAXVAL 1 (black and white) is not supported: store it as a PBM or PNG")
    return full if data[1:2] in (b"2", b"3") and maxval < 256 else maxval


def to_uint8(img: NDArray[np.floating] | NDArray[np.uint8]) -> NDArray[np.uint8]:
    """float [0, 1] -> uint8, rounding to the nearest level (values outside [0, 1] are clipped); uint8 as is."""
    if img.dtype == np.uint8:
        return img
    return np.rint(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)


def write_image(path: str | os.PathLike, img: NDArray[np.floating] | NDArray[np.uint8]) -> None:
    """Write (H, W, 3) RGB or (H, W, 4) RGBA, float in [0, 1] or uint8, as 8 bit to a lossless file,
    atomically (temp + rename). Float values a little outside [0, 1] are clipped; an image of another
    integer type, an empty one, or floats far outside (a 0-255 scale, NaN) are refused (ImageError)."""
    path = Path(path)
    try:
        data = encode_image(img, path.suffix)
    except ImageError as exc:
        raise ImageError(f"{path}: {exc}") from None
    write_bytes_atomic(path, data)


def encode_image(img: NDArray[np.floating] | NDArray[np.uint8], suffix: str = ".png") -> bytes:
    """The bytes write_image writes for a file with this suffix (8-bit RGB or RGBA, lossless)."""
    if suffix.lower() not in LOSSLESS_SUFFIXES:
        raise ImageError(f"output must be a lossless image ({', '.join(LOSSLESS_SUFFIXES)})")
    if not isinstance(img, np.ndarray):
        raise ImageError(f"expected an (H, W, 3) or (H, W, 4) image array, got a {type(img).__name__}")
    if img.ndim != 3 or img.shape[2] not in (3, 4) or 0 in img.shape:
        raise ImageError(f"expected an (H, W, 3) or (H, W, 4) image, got shape {img.shape}")
    if img.dtype != np.uint8 and not np.issubdtype(img.dtype, np.floating):
        hint = " (16-bit data: x / 65535)" if img.dtype == np.uint16 else ""
        raise ImageError(f"an image of dtype {img.dtype}: pass uint8, or float in [0, 1]{hint}")
    if img.dtype != np.uint8:  # a little outside [0, 1] is clipped (an SR output's overshoot); not a wrong scale
        low, high = float(img.min()), float(img.max())
        if not (low >= -1 and high <= 2):  # NaN and inf fail too
            from degrade.pipeline import _range_hint  # (here: pipeline imports this module)

            hint = _range_hint(low, high)
            raise ImageError(f"float values from {low:g} to {high:g}, where [0, 1] is expected"
                             + (f" ({hint})" if hint else ""))
    bgr = cv2.cvtColor(to_uint8(img), cv2.COLOR_RGB2BGR if img.shape[2] == 3 else cv2.COLOR_RGBA2BGRA)  # one copy
    ok, buf = cv2.imencode(suffix.lower(), bgr)
    if not ok:
        raise ImageError("OpenCV could not encode the image")
    return buf.tobytes()


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temporary file in the same folder, so no partial file is left."""
    with atomic_writer(path) as f:
        f.write(data)


def check_write_target(path: Path) -> Path:
    """What :func:`atomic_writer` refuses before it writes, for a caller that checks before long work:
    `path`'s folder missing or a file (ImageError); `path` a folder (IsADirectoryError), or a device, FIFO or
    socket, or a symlink to one (OSError EEXIST: a rename would replace it with a file). Returns the folder."""
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise ImageError(f"{path}: {directory} is not a folder" if directory.exists() else
                         f"{path}: folder {directory} does not exist")
    try:
        there = os.lstat(path).st_mode
    except FileNotFoundError:
        return directory
    except OSError as exc:
        raise _naming(exc, path) from None
    if stat.S_ISDIR(there):  # what the rename would fail with
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    if stat.S_ISLNK(there):  # the link is replaced, its target left alone: unless the link stands for a
        try:  # device or a FIFO (/dev/stdout is one), which the name must stay
            there = os.stat(path).st_mode
        except OSError:  # dangling, or its target unreachable: only the link is there to replace
            return directory
        if stat.S_ISDIR(there):  # a link to a folder: said as a folder (it read 'is a device')
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    if not stat.S_ISREG(there):
        kind = "a FIFO" if stat.S_ISFIFO(there) else "a socket" if stat.S_ISSOCK(there) else "a device"
        raise OSError(errno.EEXIST, f"exists and is {kind}, not a regular file; refusing to replace it", str(path))
    return directory


def check_can_write(path: Path) -> None:
    """check_write_target, and a file can be made in `path`'s folder (a read-only folder or file system, or
    no permission, was found only by the write, after the long work it follows): an OSError naming `path`.
    A hidden file is made and removed to find out, as atomic_writer's own first step makes one."""
    fd, probe = _temporary(path)
    os.close(fd)
    os.unlink(probe)


def _temporary(path: Path) -> tuple[int, str]:
    """atomic_writer's first step: check_write_target, then a new hidden file in `path`'s folder
    (`.NAME.XXXXXXXX.tmp`), as (descriptor, name); an OSError making it names `path`."""
    directory = check_write_target(path)
    try:
        return tempfile.mkstemp(prefix=f".{_tmp_stem(path.name)}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise _naming(exc, path) from None


TMP_NAME_EXTRA = len("..XXXXXXXX.tmp")  # atomic_writer's temporary name: the target's with these bytes around it


def _tmp_stem(name: str) -> str:
    """`name` cut to leave its temporary name within a file name's 255 bytes: a name of 242-255 bytes could
    be written, but its temporary one could not (File name too long)."""
    raw = os.fsencode(name)
    return name if len(raw) <= 255 - TMP_NAME_EXTRA else os.fsdecode(raw[: 255 - TMP_NAME_EXTRA])


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file that becomes `path` when the `with` block ends without an error.

    It is a new file with a unique name in `path`'s folder (`.NAME.XXXXXXXX.tmp`, NAME cut to fit 255
    bytes, created exclusively:
    never a fixed name, never through a symlink), synced to disk, renamed over `path` at the end (a symlink
    at `path` is replaced, not written through), and then the folder is synced, so that after a power loss
    `path` holds the old bytes or the new ones, never an empty file. On any failure it is removed and
    `path` is left as it was; an OSError then names `path` (with its errno and reason), not the temporary
    file. Refused before anything
    is written: a missing folder (ImageError), and a `path` that is there but neither a regular file nor a
    symlink to one or to nothing (an OSError: IsADirectoryError for a folder; for a device such as
    /dev/null, a FIFO or a socket, or a symlink to one such as /dev/stdout, which a rename would replace
    with a file, EEXIST).
    """
    path = Path(path)
    fd, tmp = _temporary(path)
    directory = Path(tmp).parent
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            mode = 0o666 & ~umask()  # mkstemp makes 0600: the usual permissions, on our own file where we can
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), mode)
            else:  # Windows before Python 3.13
                os.chmod(tmp, mode)
            f.flush()
            os.fsync(f.fileno())  # the bytes on disk before the name points at them
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError) and exc.filename in (None, tmp):  # ours (a write, the sync, the rename),
            raise _naming(exc, path) from None  # not one that names another file (a nested writer's)
        raise
    _sync_folder(directory)


def _sync_folder(directory: Path) -> None:
    """Sync a folder's entries to disk (the rename into it), where the OS can: POSIX opens folders; a
    file system that cannot sync one (EINVAL) leaves the file in place all the same."""
    if os.name != "posix":
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _naming(exc: OSError, path: Path) -> OSError:
    """`exc` (same errno and reason, so the same OSError subclass) as an error about `path`."""
    if exc.errno is None:
        return OSError(f"{path}: {exc}")
    return OSError(exc.errno, exc.strerror or os.strerror(exc.errno), str(path))


def umask() -> int:
    """The process's umask (read by setting and restoring it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def crop_to_multiple(img: NDArray, multiple: int) -> NDArray:
    """Crop the bottom/right so both sides are multiples of `multiple` (a view, not a copy)."""
    h, w = img.shape[:2]
    return img[: h - h % multiple, : w - w % multiple]


def make_folders(folder: Path) -> list[Path]:
    """Make `folder` and its missing parents; returns the folders this call made, deepest first, for a
    failed run to take back (one another process made meanwhile is not among them). A part that exists
    and is not a folder is a DegradeError; an OSError takes back what this call made."""
    missing = []
    while not folder.is_dir():
        if folder.exists() or folder.is_symlink():
            raise DegradeError(f"{folder}: exists and is not a folder")
        missing.append(folder)
        folder = folder.parent
    made: list[Path] = []
    try:
        for folder in reversed(missing):
            try:
                folder.mkdir()
            except FileExistsError:  # made meanwhile by another run: not this call's to take back
                continue
            made.insert(0, folder)
    except OSError:  # unwritable, or a file made there meanwhile: take back what this call made
        for folder in made:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    return made


@contextlib.contextmanager
def exclusive_lock(path: Path, *, maker: str, busy: str, error: type[Exception],
                   remove: bool = False) -> Iterator[None]:
    """Hold the lock file `path` exclusively (POSIX flock) for the block, made if missing: a second holder
    gets `error(busy)` at once. The kernel lets go when the holder's open file is closed everywhere: when
    the process dies, even by kill -9, and any process it forked (a DataLoader's workers) has ended too.
    `remove`: delete the file at the end, while still holding it. A process that opened it just before
    then holds a lock on a file no path names: it sees that and opens the path again (a few times; then
    `busy`), so two never hold "the" lock. Never through a symlink (it could create or touch a file outside
    the folder), never a FIFO (opening one waits for a reader for ever): `error` names what `path` is
    instead (`maker` makes its own); a lock file another user left behind still locks. A file system
    without locks (NFS without its lock service, say) is `error` naming it; a lock file made for a failed
    attempt is removed. Without POSIX locks (Windows), no lock."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    for _ in range(5):
        handle, made = _open_lock_file(path, maker, error)
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise error(busy) from None
            except OSError as exc:
                reason = os.strerror(exc.errno) if exc.errno else str(exc)
                if exc.errno in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise error(f"{path}: cannot lock it ({reason}); this file system does not lock files: use "
                                "a folder on a local disk") from None
                raise error(f"{path}: cannot lock it ({reason})") from None
        except BaseException:  # (a Ctrl-C too) the attempt's lock file goes with it
            handle.close()
            if made:
                with contextlib.suppress(OSError):
                    os.unlink(path)
            raise
        if _same_file(path, handle.fileno()):
            break
        handle.close()  # a file its holder removed, or replaced: the lock that counts is the path's
    else:
        raise error(busy)
    with handle:
        try:
            yield
        finally:
            if remove and _same_file(path, handle.fileno()):  # ours still: no one else unlinks a held lock file
                with contextlib.suppress(OSError):  # (a failure here must not hide the block's own error)
                    os.unlink(path)
            fcntl.flock(handle, fcntl.LOCK_UN)


def _open_lock_file(path: Path, maker: str, error: type[Exception]) -> tuple[BinaryIO, bool]:
    """`path` opened for exclusive_lock, and whether this call made it: a regular file, never through a
    symlink or a FIFO. Read-write (NFS locks exclusively only files open for writing); read-only where
    this user may not write it (a lock file another user left behind, a read-only mount)."""
    flags = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    what = "is not a regular file"
    fd, made = None, False
    try:
        for _ in range(5):
            try:
                fd, made = os.open(path, flags | os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
                break
            except FileExistsError:
                pass
            try:
                try:
                    fd = os.open(path, flags | os.O_RDWR)
                except PermissionError:
                    fd = os.open(path, flags | os.O_RDONLY)
                break
            except FileNotFoundError:  # its holder removed it between the two opens: make it again
                continue
            except OSError as exc:
                if exc.errno != errno.EISDIR:
                    raise
                fd = os.open(path, flags | os.O_RDONLY)  # a folder: refused below
                break
        else:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(path))
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENXIO):  # (ENXIO: a FIFO without a reader, opened for writing)
            raise
        what = "is a symlink" if exc.errno == errno.ELOOP else what
    if fd is None or not stat.S_ISREG(os.fstat(fd).st_mode):
        if fd is not None:
            os.close(fd)
        raise error(f"{path}: {what}; remove it ({maker} makes its own)")
    return os.fdopen(fd, "rb"), made


def _same_file(path: Path, fd: int) -> bool:
    try:
        now = os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    mine = os.fstat(fd)
    return (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino)

