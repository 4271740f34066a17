"""Image I/O conversions: 16-bit, gray, alpha, bad files, atomic lossless writes; the lock files."""

from __future__ import annotations

import os

import cv2
import numpy as np
import pytest

import degrade
from degrade.io import ImageError, crop_to_multiple, decode_image, read_image, write_image


def _write_raw(path, array) -> None:
    assert cv2.imwrite(str(path), array)


def test_bundled_samples_are_real_rgb_photos_with_sources():
    paths = degrade.sample_images()
    assert 4 <= len(paths) <= 8
    sources = (paths[0].parent / "SOURCES.tsv").read_text().splitlines()
    listed = {line.split("\t")[0] for line in sources[1:]}
    assert listed == {p.name for p in paths}
    assert all("CC0" in line for line in sources[1:])
    for p in paths:
        img = read_image(p)
        assert img.ndim == 3 and min(img.shape[:2]) >= 256 and img.std() > 0.05


def test_16bit_is_scaled_by_65535(tmp_path):
    raw = np.array([[[0, 32768, 65535]]], np.uint16).repeat(4, 0).repeat(4, 1)  # BGR on disk
    _write_raw(tmp_path / "deep.png", raw)
    img = read_image(tmp_path / "deep.png")
    np.testing.assert_allclose(img[0, 0], [1.0, 32768 / 65535, 0.0], rtol=1e-6)  # RGB


def test_gray_becomes_rgb(tmp_path):
    _write_raw(tmp_path / "gray.png", np.full((8, 8), 51, np.uint8))
    img = read_image(tmp_path / "gray.png")
    assert img.shape == (8, 8, 3)
    np.testing.assert_allclose(img, 0.2, atol=1e-7)


def test_alpha_is_dropped(tmp_path):
    raw = np.zeros((8, 8, 4), np.uint8)
    raw[..., 2] = 255  # red in BGRA
    raw[..., 3] = 0  # fully transparent: still red, alpha is ignored
    _write_raw(tmp_path / "alpha.png", raw)
    img = read_image(tmp_path / "alpha.png")
    assert img.shape == (8, 8, 3)
    np.testing.assert_array_equal(img[0, 0], [1.0, 0.0, 0.0])


@pytest.mark.parametrize("content,message", [(None, "no such file"), (b"", "not a readable image"),
                                             (b"hello, not an image", "not a readable image")])
def test_bad_files_raise_image_error(tmp_path, content, message):
    path = tmp_path / "x.png"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ImageError, match=message):
        read_image(path)


def test_a_damaged_png_is_refused_before_libpng_prints_a_line(tmp_path):
    """OpenCV fails on a PNG cut anywhere before the end of its IEND chunk, or with a critical chunk's CRC
    wrong, but libpng first printed "libpng error: PNG input buffer is incomplete" (or "IDAT: CRC error") on
    stderr, a stray line before the command's own (a review). A walk over the chunks refuses such a file
    first. Oracle: OpenCV's own decode, which fails on exactly the files refused: every cut of the last 40
    bytes and some in the pixel data, a byte flipped in each chunk (in an ancillary chunk and in IEND's CRC
    libpng only warns, and reads the image), and bytes after IEND, which it reads as the image."""
    import struct
    import subprocess
    import sys
    import zlib

    from degrade.io import _png_damage

    img = np.random.default_rng(0).integers(0, 255, (60, 90, 3), dtype=np.uint8)
    data = cv2.imencode(".png", img)[1].tobytes()
    text = b"Comment\0a photo"
    at = data.index(b"IDAT") - 4  # a tEXt chunk before the pixels: ancillary
    chunk = struct.pack(">I", len(text)) + b"tEXt" + text + struct.pack(">I", zlib.crc32(b"tEXt" + text))
    data = data[:at] + chunk + data[at:]
    np.testing.assert_array_equal(decode_image(data + b"trailing bytes"), img[..., ::-1] / np.float32(255))
    starts = [i for i in range(8, len(data) - 8) if data[i + 4:i + 8] in (b"IHDR", b"tEXt", b"IDAT", b"IEND")]
    cases = {f"cut at {cut}": data[:cut] for cut in [*range(len(data) - 40, len(data) + 1), 60, len(data) // 2]}
    for i in starts:  # a byte of the chunk's data (IEND has none: its CRC) flipped
        j = i + (11 if data[i + 4:i + 8] == b"IEND" else 9)
        cases[f"{data[i + 4:i + 8]} at {i} flipped"] = data[:j] + bytes([data[j] ^ 1]) + data[j + 1:]
    assert {data[i + 4:i + 8] for i in starts} == {b"IHDR", b"tEXt", b"IDAT", b"IEND"}
    for name, d in cases.items():
        cv_reads = cv2.imdecode(np.frombuffer(d, np.uint8), cv2.IMREAD_ANYCOLOR) is not None
        assert (_png_damage(d) is None) == cv_reads, name
        if not cv_reads:
            with pytest.raises(ImageError, match=r"^not a readable image \(a damaged PNG: (it ends before its IEND "
                                                 r"chunk|its '(IHDR|IDAT)' chunk fails its CRC)\)$"):
                decode_image(d)
    assert _png_damage(cases[f"b'tEXt' at {data.index(b'tEXt') - 4} flipped"]) is None
    assert _png_damage(cases[f"cut at {len(data)}"]) is None
    (tmp_path / "cut.png").write_bytes(cases[f"cut at {len(data) // 2}"])
    (tmp_path / "crc.png").write_bytes(cases[f"b'IDAT' at {data.index(b'IDAT') - 4} flipped"])
    code = ("import degrade\nfor name in ('cut.png', 'crc.png'):\n    try:\n        degrade.read_image(name)\n"
            "    except degrade.ImageError as e:\n        print(e)")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))})
    assert done.stderr == "" and done.stdout.count("a damaged PNG") == 2, done.stderr


def test_an_animated_png_is_left_to_opencv_and_any_bytes_like_input_is_read():
    """OpenCV reads an animated PNG's first frame by itself, without libpng's checks: a damaged second frame,
    or even the first frame's IDAT CRC, still read, and the chunk walk refused them (a second review). An
    acTL chunk before the pixels leaves the file to OpenCV. decode_image took a memoryview before the walk
    (an AttributeError since). Oracle: OpenCV's decode, the first frame's pixels."""
    import struct
    import zlib

    from degrade.io import _png_damage

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    img = np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    png = cv2.imencode(".png", img)[1].tobytes()
    at = png.index(b"IDAT") - 4
    idat = png[at:png.index(b"IEND") - 4]
    frame = struct.pack(">IIIIIHHBB", 0, 16, 16, 0, 0, 1, 1, 0, 0)
    head = png[:at] + chunk(b"acTL", struct.pack(">II", 2, 0)) + chunk(b"fcTL", frame)
    second = chunk(b"fcTL", struct.pack(">I", 1) + frame[4:]) + chunk(b"fdAT", struct.pack(">I", 2) + idat[8:-4])
    bad_idat = idat[:-4] + bytes([idat[-4] ^ 1]) + idat[-3:]
    for d in (head + idat + second + png[-12:], head + bad_idat + second + png[-12:], head + idat + second[:38]):
        assert _png_damage(d) is None
        assert cv2.imdecode(np.frombuffer(d, np.uint8), cv2.IMREAD_ANYCOLOR) is not None
        np.testing.assert_array_equal(decode_image(d), img[..., ::-1] / np.float32(255))
    np.testing.assert_array_equal(decode_image(memoryview(png)), img[..., ::-1] / np.float32(255))
    assert _png_damage(memoryview(png[:-20])) == "it ends before its IEND chunk"


def test_directory_raises_image_error(tmp_path):
    with pytest.raises(ImageError, match="directory"):
        read_image(tmp_path)


def test_write_read_round_trip_and_refusals(tmp_path):
    img = np.random.default_rng(0).random((10, 12, 3)).astype(np.float32)
    write_image(tmp_path / "out.png", img)
    back = read_image(tmp_path / "out.png")
    np.testing.assert_allclose(back, np.round(img * 255) / 255, atol=1e-7)
    with pytest.raises(ImageError, match="lossless"):
        write_image(tmp_path / "out.jpg", img)
    with pytest.raises(ImageError, match="does not exist"):
        write_image(tmp_path / "missing" / "out.png", img)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]  # no temp files left


def test_crop_to_multiple():
    assert crop_to_multiple(np.zeros((130, 70, 3)), 4).shape == (128, 68, 3)


def test_written_files_get_the_usual_permissions(tmp_path):
    import os

    write_image(tmp_path / "p.png", np.zeros((4, 4, 3), np.float32))
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "p.png").stat().st_mode & 0o777 == 0o666 & ~mask


def test_an_atomic_write_syncs_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    """So that after a power loss the path holds the old bytes or the new ones: without the syncs a
    rename could reach the disk before the data, leaving an empty checkpoint or shard manifest."""
    import os
    from pathlib import Path

    from degrade.io import write_bytes_atomic

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}")))),
                                                 real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", Path(b))), real_replace(a, b)))
    target = tmp_path / "ckpt.bin"
    write_bytes_atomic(target, b"new bytes")
    assert target.read_bytes() == b"new bytes"
    (kind0, first), (kind1, renamed), (kind2, folder) = events
    assert (kind0, kind1, kind2) == ("fsync", "replace", "fsync")
    assert first.parent == tmp_path and first.name.startswith(".ckpt.bin.") and renamed == target
    assert folder == tmp_path


def test_a_failed_atomic_write_names_the_target_and_leaves_no_temporary_file(tmp_path):
    import errno

    from degrade.io import write_bytes_atomic

    folder = tmp_path / "od"
    target = folder / "rgb_x4.png"
    target.mkdir(parents=True)  # the target path is a folder: the rename fails
    with pytest.raises(IsADirectoryError) as caught:
        write_bytes_atomic(target, b"data")
    assert caught.value.filename == str(target) and caught.value.errno == errno.EISDIR
    assert str(caught.value) == f"[Errno {errno.EISDIR}] Is a directory: '{target}'"
    assert [p.name for p in folder.iterdir()] == ["rgb_x4.png"]  # no .rgb_x4.png.XXXX.tmp left


@pytest.mark.parametrize("kind", ["fifo", "device", "file in place of the folder"])
def test_an_atomic_write_never_replaces_a_fifo_or_a_device_with_a_file(tmp_path, kind):
    """A rename over a FIFO or a device node (/dev/null as an output) would put a regular file in its place:
    refused before anything is written, the node left as it was."""
    import errno
    import os
    import stat

    from degrade.errors import ImageError
    from degrade.io import write_bytes_atomic

    target = tmp_path / "out.csv"
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "device":
        try:
            os.mknod(target, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # what /dev/null is
        except PermissionError:
            pytest.skip("making a device node needs root")
    else:
        target = tmp_path / "afile" / "out.csv"
        target.parent.write_bytes(b"x")
        with pytest.raises(ImageError, match="afile is not a folder"):
            write_bytes_atomic(target, b"data")
        return
    before = os.lstat(target)
    with pytest.raises(FileExistsError) as caught:
        write_bytes_atomic(target, b"data")
    assert caught.value.errno == errno.EEXIST and caught.value.filename == str(target)
    assert "not a regular file; refusing to replace it" in str(caught.value)
    after = os.lstat(target)
    assert (after.st_mode, after.st_ino) == (before.st_mode, before.st_ino)
    assert [p.name for p in tmp_path.iterdir()] == ["out.csv"]  # no temporary file left


def test_an_atomic_write_replaces_a_symlink_but_never_one_to_a_fifo(tmp_path):
    """A symlink is replaced, its target left alone (never written through); but a link that stands for a
    FIFO or a device (/dev/stdout is a symlink) must keep its name: refused."""
    import os

    from degrade.io import write_bytes_atomic

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    (tmp_path / "to-fifo").symlink_to(fifo)
    with pytest.raises(FileExistsError, match="is a FIFO, not a regular file"):
        write_bytes_atomic(tmp_path / "to-fifo", b"data")
    assert (tmp_path / "to-fifo").is_symlink()
    (tmp_path / "victim").write_bytes(b"kept")
    for name, target in (("to-file", tmp_path / "victim"), ("dangling", tmp_path / "nothing")):
        (tmp_path / name).symlink_to(target)
        write_bytes_atomic(tmp_path / name, b"new")
        assert not (tmp_path / name).is_symlink() and (tmp_path / name).read_bytes() == b"new"
    assert (tmp_path / "victim").read_bytes() == b"kept"


@pytest.mark.parametrize("img,message", [
    (np.full((4, 4, 3), 40000, np.uint16), "dtype uint16: pass uint8, or float in \\[0, 1\\] \\(16-bit data"),
    (np.full((4, 4, 3), 200, np.int64), "dtype int64"),
    (np.ones((4, 4, 3), bool), "dtype bool"),
    (np.full((4, 4, 3), 200.0, np.float32), "from 200 to 200, where \\[0, 1\\] is expected \\(an 8-bit image"),
    (np.full((4, 4, 3), np.nan, np.float32), "from nan to nan"),
    (np.zeros((0, 4, 3), np.float32), "got shape \\(0, 4, 3\\)"),
])
def test_write_image_refuses_what_it_would_write_wrong(tmp_path, img, message):
    """A uint16 or 0-255 float image was written all white (clipped), NaN black, an empty one raised cv2's
    error: refused, nothing written. A little outside [0, 1] (an SR output's overshoot) is still clipped."""
    from degrade.errors import ImageError

    with pytest.raises(ImageError, match=message):
        write_image(tmp_path / "x.png", img)
    assert not list(tmp_path.iterdir())
    write_image(tmp_path / "y.png", np.full((4, 4, 3), 1.04, np.float32))
    assert (degrade.read_image(tmp_path / "y.png") == 1.0).all()


def test_write_image_clips_a_small_undershoot_to_black(tmp_path):
    """An SR output a little below 0 is written black, as one a little above 1 is white: with the lower clip
    dropped, -0.04 became -10 and wrapped to 246 in uint8 (near white), and every test passed (a mutation
    audit: only the overshoot was written). Oracle: the 8-bit levels of the clipped values, worked by hand:
    -0.04 -> 0, 0.2 -> 51, 1.04 -> 255."""
    img = np.zeros((4, 6, 3), np.float32)
    img[:, :2], img[:, 2:4], img[:, 4:] = -0.04, 0.2, 1.04
    write_image(tmp_path / "y.png", img)
    back = np.round(read_image(tmp_path / "y.png") * 255)
    assert (back[:, :2] == 0).all() and (back[:, 2:4] == 51).all() and (back[:, 4:] == 255).all()


def test_atomic_writer_keeps_the_old_file_when_a_write_fails(tmp_path):
    import errno

    from degrade.io import atomic_writer

    kept = tmp_path / "kept.bin"
    kept.write_bytes(b"old")
    with pytest.raises(OSError) as caught, atomic_writer(kept) as f:  # a write fails half-way (a full disk)
        f.write(b"new, half")
        raise OSError(errno.EFBIG, "File too large")
    assert caught.value.errno == errno.EFBIG and caught.value.filename == str(kept)
    assert kept.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["kept.bin"]


@pytest.mark.parametrize("depth,tupltype", [(4, "RGB_ALPHA"), (2, "GRAYSCALE_ALPHA"), (3, "RGB"), (1, "GRAYSCALE")])
def test_pam_with_or_without_alpha_reads_its_colour_as_stored(tmp_path, depth, tupltype):
    """OpenCV's colour decode scrambles a PAM with alpha (its samples read 3 at a time from 4 per pixel).
    Oracle: the bytes written."""
    samples = np.random.default_rng(depth).integers(0, 256, (6, 5, depth), np.uint8)
    path = tmp_path / "a.pam"
    path.write_bytes(f"P7\nWIDTH 5\nHEIGHT 6\nDEPTH {depth}\nMAXVAL 255\nTUPLTYPE {tupltype}\nENDHDR\n".encode()
                     + samples.tobytes())
    want = samples[..., :3] if depth >= 3 else np.repeat(samples[..., :1], 3, axis=2)
    np.testing.assert_array_equal(np.round(degrade.read_image(path) * 255), want)


_PNM_WHITE_GREY = {  # format: (header, samples) of a 2x1 image, full intensity then 7 of maxval
    "P5": lambda m: b"P5\n2 1\n%d\n" % m + b"".join(v.to_bytes(1 if m < 256 else 2, "big") for v in (m, 7)),
    "P2": lambda m: b"P2\n2 1\n%d\n%d 7\n" % (m, m),
    "P6": lambda m: b"P6\n2 1\n%d\n" % m + b"".join(v.to_bytes(1 if m < 256 else 2, "big") * 3 for v in (m, 7)),
    "P3": lambda m: b"P3\n2 1\n%d\n%d %d %d 7 7 7\n" % (m, m, m, m),
    "P7": lambda m: b"P7\nWIDTH 2\nHEIGHT 1\nDEPTH 1\nMAXVAL %d\nTUPLTYPE GRAYSCALE\nENDHDR\n" % m
    + b"".join(v.to_bytes(1 if m < 256 else 2, "big") for v in (m, 7)),
}


@pytest.mark.parametrize("maxval", [1, 15, 200, 255, 1023, 4095, 65535])
@pytest.mark.parametrize("magic", sorted(_PNM_WHITE_GREY))
def test_a_pnm_sample_is_scaled_by_its_maxval(magic, maxval):
    """Netpbm: a sample means sample / maxval. OpenCV returns most PNMs' samples as they are (binary P5/P6
    and PAM at any maxval, ASCII above 255) and scales only ASCII below 256 to 0-255 itself; either way
    white reads 1.0 and 7 reads 7 / maxval (to 1/255 where OpenCV scaled: it truncates). A PAM of MAXVAL 1,
    which OpenCV reads as packed bits where Netpbm has a byte per sample, is refused."""
    if magic == "P7" and maxval == 1:
        with pytest.raises(ImageError, match="MAXVAL 1"):
            decode_image(_PNM_WHITE_GREY[magic](maxval))
        return
    img = decode_image(_PNM_WHITE_GREY[magic](maxval))
    assert img.shape == (1, 2, 3) and np.all(img[0, 0] == 1.0)
    grey = min(7, maxval) / maxval
    scaled_by_opencv = magic in ("P2", "P3") and maxval < 256
    np.testing.assert_allclose(img[0, 1], grey, atol=1 / 255 if scaled_by_opencv else 1e-7)


@pytest.mark.parametrize("maxval", [15, 255, 1023])
def test_a_pam_with_alpha_keeps_it_at_any_maxval(tmp_path, maxval):
    """Colour and alpha scaled by the PAM's MAXVAL alike (the alpha check compares the colour with what
    decode_image read: scaled by 255 alone it lost the alpha of a MAXVAL 15 file). Oracle: the samples
    written, alpha to 0-255 rounded."""
    rng = np.random.default_rng(maxval)
    samples = rng.integers(0, maxval + 1, (3, 4, 4))
    path = tmp_path / "a.pam"
    width = 1 if maxval < 256 else 2
    path.write_bytes(f"P7\nWIDTH 4\nHEIGHT 3\nDEPTH 4\nMAXVAL {maxval}\nTUPLTYPE RGB_ALPHA\nENDHDR\n".encode()
                     + b"".join(int(x).to_bytes(width, "big") for x in samples.ravel()))
    rgb, alpha = degrade.io.read_image_alpha(path)
    np.testing.assert_allclose(rgb, samples[..., :3] / maxval, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(alpha, np.floor(samples[..., 3] * 255 / maxval + 0.5).astype(np.uint8))


@pytest.mark.parametrize("maxval", [b"0", b"-1", b"65536"])
def test_a_pnm_maxval_outside_1_to_65535_is_refused(maxval):
    """A MAXVAL of 0 read as NaN pixels, -1 as negative ones (a PAM's MAXVAL went unchecked)."""
    for data in (b"P7\nWIDTH 2\nHEIGHT 1\nDEPTH 1\nMAXVAL " + maxval + b"\nTUPLTYPE GRAYSCALE\nENDHDR\n\x64\xc8",
                 b"P5\n2 1\n" + maxval + b"\n\x64\xc8"):
        with pytest.raises(ImageError, match="not a readable image"):
            decode_image(data)


def test_a_pnm_header_may_hold_long_comments():
    comments = b"# a comment line\n" * 500  # 8.5 KB: over the 4 KB once searched
    for data in (b"P7\n" + comments + b"WIDTH 2\nHEIGHT 1\nDEPTH 1\nMAXVAL 255\nTUPLTYPE GRAYSCALE\nENDHDR\n\x64\xc8",
                 b"P5\n" + comments + b"2 1\n255\n\x64\xc8"):
        np.testing.assert_allclose(decode_image(data)[0, :, 0], [100 / 255, 200 / 255])


def test_a_pnm_maxval_cut_by_the_header_window_is_refused_not_misread():
    """A comment long enough that '255' straddles the window's end read as maxval 25: every pixel white."""
    from degrade.io import PNM_HEADER_BYTES

    head = b"P5\n2 1\n"
    data = head + b"#" + b"c" * (PNM_HEADER_BYTES - len(head) - 4) + b"\n255\n" + bytes([100, 200])
    assert data.index(b"255") < PNM_HEADER_BYTES < data.index(b"255") + 3
    with pytest.raises(ImageError, match="not a readable image"):
        decode_image(data)
    short = head + b"#" + b"c" * (PNM_HEADER_BYTES - len(head) - 6) + b"\n255\n" + bytes([100, 200])  # inside
    np.testing.assert_allclose(decode_image(short)[0, :, 0], [100 / 255, 200 / 255])
    edge = head + b"#" + b"c" * (PNM_HEADER_BYTES - len(head) - 5) + b"\n255\n" + bytes([100, 200])
    assert edge.index(b"255") + 3 == PNM_HEADER_BYTES  # whole, its newline the first byte past the window
    np.testing.assert_allclose(decode_image(edge)[0, :, 0], [100 / 255, 200 / 255])


@pytest.mark.parametrize("header,declared", [
    (b"P5\n3 2\n1_0\n", (3, 2, 1)),  # int() took "1_0" for 10
    (b"P5\n3 2#1\n255\n", (3, 2, 1)),  # the byte ending 2 is consumed: "#1" is no comment, 1 the maxval
    (b"P5\n1_2 3\n255\n", (1, 2, 3)),  # int() took 12 x 3
    (b"P5 #c\r3 2\n255\n", (3, 2, 255)),  # a comment ends at CR
    (b"P5\n3\t2\x0b255 ", (3, 2, 255)),
    (b"P5\n3 2\n 255\n", (3, 2, 255)),
    (b"P5\n3 2\n0000000255\n", (3, 2, 255)),  # 10 digits or more were refused: OpenCV bounds the value
    (b"P5\n00000000003 2\n255\n", (3, 2, 255)),
    (b"P5\n3 2\n" + b"0" * 5000 + b"255\n", (3, 2, 255)),  # past int()'s 4300-digit limit
])
def test_a_pnm_header_reads_as_opencv_reads_it(header, declared):
    """OpenCV's reader: whitespace and comments (to CR or LF) before a number, a number its digits (any count,
    leading zeros included), ended by whatever byte follows, which is consumed. Oracle for the size: OpenCV's
    decode; the maxval from that rule."""
    from degrade.io import _pnm_header

    data = header + bytes(range(0, 60, 5))
    ref = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_ANYCOLOR | cv2.IMREAD_ANYDEPTH)
    assert _pnm_header(data) == declared and ref.shape[:2] == declared[1::-1]
    np.testing.assert_allclose(decode_image(data)[..., 0], np.minimum(ref / declared[2], 1), rtol=0, atol=1e-7)


def test_a_pbm_bitmap_reads_black_and_white():
    for data in (b"P4\n8 1\n" + bytes([0b10100000]), b"P1\n8 1\n1 0 1 0 0 0 0 0\n"):  # 1 is black
        np.testing.assert_array_equal(decode_image(data)[0, :, 0], [0, 1, 0, 1, 1, 1, 1, 1])


def _opencv_pam(data: bytes) -> np.ndarray | None:
    """OpenCV's decode of `data` as stored (IMREAD_UNCHANGED), or None where it refuses it."""
    try:
        return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error:
        return None


@pytest.mark.parametrize("header", [
    b"P5\n3 2\n2147483648\n",  # INT_MAX + 1
    b"P5\n3 02147483648\n255\n",
    b"P5\n4294967299 2\n255\n",  # 3 in 32 bits
])
def test_a_pnm_number_above_int_max_is_refused_as_opencv_refuses_it(header):
    """OpenCV bounds a header number by its value (INT_MAX), not its digits. Oracle: OpenCV's decode."""
    from degrade.io import _pnm_header

    data = header + bytes(range(0, 60, 5))
    assert _opencv_pam(data) is None
    with pytest.raises(ValueError, match="INT_MAX"):
        _pnm_header(data)
    with pytest.raises(ImageError, match="not a readable image"):
        decode_image(data)


_PAM_FIELDS = b"WIDTH 3\nHEIGHT 2\nDEPTH 1\nMAXVAL 255\n"


@pytest.mark.parametrize("header", [
    b"P7\rWIDTH 3\rHEIGHT 2\rDEPTH 1\rMAXVAL 255\rENDHDR\r",  # CR line ends
    b"P7\r\nWIDTH 3\r\nHEIGHT 2\r\nDEPTH 1\r\nMAXVAL 255\r\nENDHDR\r\n",
    b"P7\n# written before ENDHDR was\n" + _PAM_FIELDS + b"ENDHDR\n",  # ENDHDR in a comment
    b"P7\n  #c\n" + _PAM_FIELDS + b"ENDHDR\n",  # an indented one-word comment
    b"P7\n#c WIDTH 9\r" + _PAM_FIELDS + b"ENDHDR\n",  # a comment ends at CR
    b"P7\n\n \x0b\x0c\tWIDTH\t3\n  HEIGHT    2 \t\nDEPTH 1\nMAXVAL 255\nENDHDR\n",
    b"P7\nWIDTH \n3\nHEIGHT 2\nDEPTH 1\nMAXVAL 255\nENDHDR\n",  # a value on the next line
    b"P7\nWIDTH 00000000000003\nHEIGHT 2\nDEPTH 1\nMAXVAL " + b"0" * 252 + b"255\nENDHDR\n",  # 255 bytes
    b"P7\nWIDTH 3\x00x\nHEIGHT\x00z 2\nDEPTH 1\nMAXVAL 255\nENDHDR\n",  # C strings: a NUL ends one
    b"P7\n" + _PAM_FIELDS + b"TUPLTYPE GRAYSCALE\nTUPLTYPE\nENDHDR anything\n",  # empty TUPLTYPE: none
    b"P7\nWIDTH 3\nHEIGHT 2\nDEPTH 3\nMAXVAL 1023\nTUPLTYPE RGB\nENDHDR\n",
    b"P7\nTUPLTYPE GRAYSCALE_ALPHA \nWIDTH 3\nHEIGHT 2\nDEPTH 2\nMAXVAL 255\nENDHDR\n",
])
def test_a_pam_header_reads_as_opencv_reads_it(header):
    """OpenCV's PAM reader: whitespace skipped, a comment to CR or LF, identifiers exact, a value to CR or LF
    (the header was split at ENDHDR, lines and words: CR line ends, ENDHDR in a comment and an indented
    comment were refused). Oracle: OpenCV's decode as stored, for size, channels and sample type."""
    from degrade.io import image_size

    data = header + bytes(range(0, 144, 2))
    ref = _opencv_pam(data)
    assert ref is not None and image_size(data) == (ref.shape[1], ref.shape[0]) == (3, 2)
    maxval = 1023 if ref.dtype == np.uint16 else 255  # the only MAXVALs above
    colour = ref[..., :3] if ref.ndim == 3 and ref.shape[2] >= 3 else np.repeat(ref.reshape(2, 3, -1)[..., :1], 3, 2)
    np.testing.assert_allclose(decode_image(data), np.minimum(colour / maxval, 1), rtol=0, atol=1e-7)  # file order
    from degrade.io import _pam_header

    assert _pam_header(data) == (3, 2, 1 if ref.ndim == 2 else ref.shape[2], maxval)


@pytest.mark.parametrize("header", [
    b"P7 WIDTH 3\nHEIGHT 2\nDEPTH 1\nMAXVAL 255\nENDHDR\n",  # P7, then neither CR nor LF
    b"P7\nwidth 3\nHEIGHT 2\nDEPTH 1\nMAXVAL 255\nENDHDR\n",  # identifiers are exact
    b"P7\nFOO 1\n" + _PAM_FIELDS + b"ENDHDR\n",
    b"P7\nWIDTH 4\n" + _PAM_FIELDS + b"ENDHDR\n",  # repeated: the last one was read
    b"P7\nWIDTHWIDTH 3\n" + _PAM_FIELDS + b"ENDHDR\n",
    b"P7\nWIDTH\n3\nHEIGHT 2\nDEPTH 1\nMAXVAL 255\nENDHDR\n",  # WIDTH empty, then 3 an identifier
    b"P7\nWIDTH 3 # three\nHEIGHT 2\nDEPTH 1\nMAXVAL 255\nENDHDR\n",
    b"P7\nWIDTH +3\nHEIGHT 2\nDEPTH 1\nMAXVAL 255\nENDHDR\n",
    b"P7\nWIDTH 1_2\nHEIGHT 2\nDEPTH 1\nMAXVAL 255\nENDHDR\n",  # int() read 12
    b"P7\nWIDTH 2147483647\nHEIGHT 2\nDEPTH 1\nMAXVAL 255\nENDHDR\n",  # below INT_MAX only
    b"P7\nWIDTH " + b"0" * 255 + b"3\nHEIGHT 2\nDEPTH 1\nMAXVAL 255\nENDHDR\n",  # a value over 255 bytes
    b"P7\nWIDTH 3\nHEIGHT 2\nMAXVAL 255\nENDHDR\n",  # no DEPTH
    b"P7\nENDHDR\n" + _PAM_FIELDS,
    b"P7\n" + _PAM_FIELDS + b"TUPLTYPE \nENDHDR\n",  # the value is the next line's ENDHDR
    b"P7\n" + _PAM_FIELDS + b"TUPLTYPE grayscale\nENDHDR\n",
    b"P7\nWIDTH 3\nHEIGHT 2\nDEPTH 5\nMAXVAL 255\nTUPLTYPE RGB_ALPHA\nENDHDR\n",
    b"P7\nWIDTH 3\nHEIGHT 2\nDEPTH 2\nMAXVAL 255\nENDHDR\n",  # a layout OpenCV cannot tell
    b"P7\nWIDTH 3\nHEIGHT 2\nDEPTH 1\nMAXVAL 1023\nENDHDR\n",
])
def test_a_pam_header_opencv_refuses_is_refused(header):
    """Oracle: OpenCV's decode refuses each (the int() and line-split reader took most of them)."""
    from degrade.io import image_size

    data = header + bytes(range(0, 144, 2))
    assert _opencv_pam(data) is None
    for read in (image_size, decode_image):
        with pytest.raises(ImageError, match="not a readable image"):
            read(data)
    from degrade.io import _pam_header

    with pytest.raises(ValueError):
        _pam_header(data)


@pytest.mark.parametrize("newline", [b"\n", b"\r"])
def test_a_pam_reads_its_colour_and_alpha_as_stored_at_either_line_end(tmp_path, newline):
    """A CR-ended PAM is read as stored too, alpha apart. Oracle: the bytes written. (After a CR LF ending
    ENDHDR, OpenCV takes the LF for the first sample: its image, shifted a byte, is what decode_image reads.)"""
    samples = np.random.default_rng(7).integers(0, 256, (3, 4, 4), np.uint8)
    header = b"P7\nWIDTH 4\nHEIGHT 3\nDEPTH 4\nMAXVAL 255\nTUPLTYPE RGB_ALPHA\nENDHDR\n"
    path = tmp_path / "a.pam"
    path.write_bytes(header.replace(b"\n", newline) + samples.tobytes())
    rgb, alpha = degrade.io.read_image_alpha(path)
    np.testing.assert_array_equal(np.round(rgb * 255), samples[..., :3])
    np.testing.assert_array_equal(alpha, samples[..., 3])


def test_a_pam_claiming_too_many_pixels_is_refused_before_decoding(monkeypatch):
    """The size read from a PAM header goes through the pixel cap like any other; a header that ends past
    PNM_HEADER_BYTES is refused unread (OpenCV reads it; the window keeps the header read bounded)."""
    from degrade.io import PNM_HEADER_BYTES

    claim = b"P7\r#ENDHDR\rWIDTH 100000\rHEIGHT 100000\rDEPTH 3\rMAXVAL 255\rTUPLTYPE RGB\rENDHDR\r"
    monkeypatch.setattr(cv2, "imdecode", lambda *a: pytest.fail("decoded despite the header"))
    with pytest.raises(ImageError, match="above the 100 MP limit"):
        decode_image(claim + bytes(30))
    far = b"P7\n#" + b"c" * PNM_HEADER_BYTES + b"\nWIDTH 1\nHEIGHT 1\nDEPTH 1\nMAXVAL 255\nENDHDR\n\x00"
    with pytest.raises(ImageError, match="not a readable image"):
        decode_image(far)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX")
def test_a_lock_path_that_is_no_lock_file_is_refused_naming_it_and_leaks_nothing(tmp_path, monkeypatch):
    """exclusive_lock never locks through a symlink, a FIFO or a folder at its path (each a one-line refusal
    saying what to do); a file system without locks (flock's ENOLCK) is one too, which removes a lock file it
    made for the attempt and keeps one it found. No path leaks a file descriptor."""
    import errno
    import fcntl

    import degrade.io as dio

    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    def lock(path):
        with dio.exclusive_lock(path, maker="make-it", busy="busy", error=RuntimeError):
            pass

    (tmp_path / "target").write_text("")
    os.symlink(tmp_path / "target", tmp_path / "link")
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "folder").mkdir()
    before = fds()
    for name, what in (("link", "is a symlink"), ("dangling", "is a symlink"), ("fifo", "is not a regular file"),
                       ("folder", "is not a regular file")):
        with pytest.raises(RuntimeError, match=f"{name}: {what}; remove it \\(make-it makes its own\\)"):
            lock(tmp_path / name)
    assert not (tmp_path / "nowhere").exists()

    def no_locks(handle, how):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(RuntimeError, match=r"new.lock: cannot lock it \(No locks available\); this file system does "
                                           r"not lock files"):
        lock(tmp_path / "new.lock")
    assert not (tmp_path / "new.lock").exists()
    (tmp_path / "old.lock").write_text("")
    with pytest.raises(RuntimeError, match="cannot lock it"):
        lock(tmp_path / "old.lock")
    assert (tmp_path / "old.lock").exists() and fds() == before


@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX locks")
def test_a_lock_file_removed_between_our_two_opens_or_not_ours_to_write_still_locks(tmp_path, monkeypatch):
    """The lock file is made (O_EXCL) or opened read-write (NFS locks exclusively only files open for
    writing): removed by its holder between those two opens, it is made again (not "No such file"); one
    this user may not write (another's, left behind) is opened read-only and still locks. A refusal of
    flock other than "no locks here" says its reason; an interrupt there removes a lock file it made."""
    import errno
    import fcntl

    import degrade.io as dio

    real_open = os.open
    lock = tmp_path / ".lock"
    calls = []

    def racing(path, flags, mode=0o777):
        calls.append(flags)
        if len(calls) == 1:
            raise FileExistsError(errno.EEXIST, "exists")  # a holder's file, there at our first open...
        if len(calls) == 2:
            raise FileNotFoundError(errno.ENOENT, "gone")  # ...and gone at our second
        return real_open(path, flags, mode)

    monkeypatch.setattr(dio.os, "open", racing)
    with dio.exclusive_lock(lock, maker="t", busy="busy", error=RuntimeError, remove=True):
        assert lock.exists() and calls[2] & os.O_EXCL
    monkeypatch.setattr(dio.os, "open", real_open)

    lock.write_text("")

    def not_mine(path, flags, mode=0o777):
        if flags & os.O_RDWR and not flags & os.O_CREAT:
            raise PermissionError(errno.EACCES, "denied")
        return real_open(path, flags, mode)

    monkeypatch.setattr(dio.os, "open", not_mine)
    with dio.exclusive_lock(lock, maker="t", busy="busy", error=RuntimeError):
        with pytest.raises(RuntimeError, match="busy"):  # held read-only, and still exclusive
            with dio.exclusive_lock(lock, maker="t", busy="busy", error=RuntimeError):
                pass
    monkeypatch.setattr(dio.os, "open", real_open)

    def refuse(errno_):
        def flock(handle, how):
            if errno_ is None:
                raise KeyboardInterrupt
            raise OSError(errno_, os.strerror(errno_))
        return flock

    monkeypatch.setattr(fcntl, "flock", refuse(errno.EBADF))
    with pytest.raises(RuntimeError, match=r"cannot lock it \(Bad file descriptor\)$"):
        with dio.exclusive_lock(lock, maker="t", busy="busy", error=RuntimeError):
            pass
    monkeypatch.setattr(fcntl, "flock", refuse(None))
    with pytest.raises(KeyboardInterrupt):
        with dio.exclusive_lock(tmp_path / "new.lock", maker="t", busy="busy", error=RuntimeError):
            pass
    assert not (tmp_path / "new.lock").exists() and lock.exists()


def test_strict_json_refuses_a_key_named_twice_at_any_depth():
    """A JSON object naming a key twice says two things (Python keeps the last, other readers the first or
    refuse): our readers of files (model file header, manifests, parameter records) refuse it."""
    from degrade.strictjson import DuplicateKey, strict_json

    assert strict_json('{"a": 1, "b": [{"c": 2}, {"c": 3}]}') == {"a": 1, "b": [{"c": 2}, {"c": 3}]}
    for text in ('{"a": 1, "a": 2}', '{"x": [{"c": 1, "d": 0, "c": 2}]}', b'{"a": {}, "a": {}}'):
        with pytest.raises(DuplicateKey, match="appears twice in one object"):
            strict_json(text)
    assert issubclass(DuplicateKey, ValueError)


def test_a_folder_search_skips_links_to_folders_with_a_warning_and_the_clis_say_it_in_one_line(tmp_path):
    """find_images does not enter a symbolic link to a folder inside the folder searched (the images found,
    and their order, as before), but says so, naming the link (a DegradeWarning; it used to skip it
    silently). A link to a file is found; a folder given as a link is searched. The CLIs print the warning
    as one line, `warning: ...`."""
    import subprocess
    import sys
    import warnings

    from degrade.discover import find_images

    src, elsewhere = tmp_path / "src", tmp_path / "elsewhere"
    (src / "sub").mkdir(parents=True)
    elsewhere.mkdir()
    img = np.full((80, 80, 3), 128, np.uint8)
    for path in (src / "b.png", src / "sub" / "a.png", elsewhere / "c.png"):
        write_image(path, img)
    (src / "linked").symlink_to(elsewhere, target_is_directory=True)
    (src / "loop").symlink_to(src, target_is_directory=True)
    (src / "c.png").symlink_to(elsewhere / "c.png")
    (src / "gone.png").symlink_to(elsewhere / "gone.png")  # entries no reader reads were left out silently
    (src / "sub" / "dev.jpg").symlink_to(os.devnull)
    os.mkfifo(src / "fifo.png")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = find_images([src])
    assert [f.relative_to(src).as_posix() for f in found] == ["b.png", "c.png", "sub/a.png"]
    assert sorted(str(w.message) for w in caught if w.category is degrade.DegradeWarning) == [
        *(f"{src / name}: not a regular file (a link to nothing, a FIFO, a device), skipped"
          for name in ("fifo.png", "gone.png")),
        *(f"{src / name}: a link to a folder, not searched (a folder search does not follow links to folders)"
          for name in ("linked", "loop")),
        f"{src / 'sub' / 'dev.jpg'}: not a regular file (a link to nothing, a FIFO, a device), skipped"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning for a folder given as a link
        assert [f.name for f in find_images([src / "linked"])] == ["c.png"]
    res = subprocess.run([sys.executable, "-m", "cli.main", "make-testset", str(src), "--out", str(tmp_path / "ts"),
                          "--levels", "1"], capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert res.returncode == 0, res.stderr
    assert f"warning: {src / 'linked'}: a link to a folder, not searched" in res.stderr
    assert f"warning: {src / 'fifo.png'}: not a regular file" in res.stderr
    assert "DegradeWarning" not in res.stderr and "warnings.warn" not in res.stderr


def _pnm_every_value(maxval: int, depth: int) -> bytes:
    """A binary PGM holding every sample value 0 .. 2**depth - 1 (those above maxval too: a damaged file)."""
    n = 2 ** depth
    values = np.arange(n, dtype=">u2" if depth == 16 else np.uint8)
    return b"P5\n%d 1\n%d\n" % (n, maxval) + values.tobytes()


@pytest.mark.parametrize("case", ["8-bit PNG", "16-bit PNG", "gray 16-bit PNG", "JPEG", "BMP", "TIFF with alpha",
                                  "PGM maxval 1023", "PGM maxval 100", "PGM maxval 65535", "PGM maxval 255"])
def test_the_8_bit_decode_gives_the_bytes_of_the_float_decode_rounded(tmp_path, case):
    """decode_image_uint8 (make-dataset's sources: without the float32 image, 34 bytes a pixel at the peak)
    must give a dataset the bytes it had: to_uint8(decode_image(data)) exactly, for every sample value of
    every depth and full scale (a 16-bit or PNM sample through a table of the float path's own rounding)."""
    from degrade.io import decode_image_uint8, to_uint8

    rng = np.random.default_rng(3)
    every16 = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    if case.startswith("PGM"):
        maxval = int(case.split()[-1])
        data = _pnm_every_value(maxval, 16 if maxval > 255 else 8)
    else:
        array = {"8-bit PNG": rng.integers(0, 256, (40, 50, 3), dtype=np.uint8),
                 "16-bit PNG": np.stack([every16, every16.T, 65535 - every16], axis=2),
                 "gray 16-bit PNG": every16,
                 "JPEG": rng.integers(0, 256, (40, 50, 3), dtype=np.uint8),
                 "BMP": rng.integers(0, 256, (40, 50, 3), dtype=np.uint8),
                 "TIFF with alpha": rng.integers(0, 256, (40, 50, 4), dtype=np.uint8)}[case]
        suffix = {"JPEG": ".jpg", "BMP": ".bmp", "TIFF with alpha": ".tiff"}.get(case, ".png")
        ok, buf = cv2.imencode(suffix, array)
        assert ok
        data = buf.tobytes()
    fast, slow = decode_image_uint8(data), to_uint8(decode_image(data))
    assert fast.dtype == np.uint8 and fast.shape == slow.shape and np.array_equal(fast, slow)
    assert np.array_equal(to_uint8(np.arange(256, dtype=np.float32) / np.float32(255)), np.arange(256))  # 8 bit
