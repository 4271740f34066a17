"""NIQE (dasr_model.niqe) against BasicSR's implementation of the MATLAB release, its parameter file, and
dasr-eval's NIQE columns."""

from __future__ import annotations

import math
import re
import warnings

import numpy as np
import pytest

from dasr_model.errors import DASRError
from dasr_model.niqe import _features, _nearest, _shape_table, imresize_half, load_niqe_params, niqe

from .niqe_golden import FEATURES, GOLDEN, HALF, feature_block, half_input, luma_images, make_params, one_block_features


def test_scores_equal_basicsr():
    """Oracle: BasicSR 1.4.2's niqe() (tests/niqe_golden.py). It resizes the half scale in float32 (torch),
    this in float64 as MATLAB does; the shape fit's 0.001 grid turns that into up to 6e-5 relative here."""
    params = make_params()
    images = luma_images()
    assert set(images) == set(GOLDEN)
    for name, y in images.items():
        assert niqe(y, params) == pytest.approx(GOLDEN[name], rel=2e-4), name
    assert niqe(images["blurred"], params) > niqe(images["photo"], params)  # blur is less natural


def test_the_block_features_and_the_half_scale_equal_basicsr():
    np.testing.assert_allclose(_features(feature_block()[None])[0], FEATURES, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(imresize_half(half_input()), HALF, atol=2e-7)  # BasicSR's float32
    assert imresize_half(np.ones((13, 10))).shape == (7, 5)
    np.testing.assert_allclose(imresize_half(np.full((9, 8), 3.0)), 3.0)  # weights sum to 1 at the edges too


def test_batched_block_features_equal_a_block_at_a_time():
    """_features fits all blocks of a row at once, and finds each shape by bisection of the rising ratio
    table. Oracle: the release's way, block by block with a search of the whole table, on textured blocks
    of several kinds and on the odd ones (flat: NaN; no negative values; a ratio beyond the table's end).
    Tolerance 1e-12 relative: the sums are taken in another order; the shapes, grid values, are equal."""
    rng = np.random.default_rng(5)
    blocks = [rng.standard_normal((96, 96)), rng.laplace(size=(96, 96)) ** 3, rng.random((96, 96)) - 0.3,
              np.sign(rng.standard_normal((96, 96))), np.zeros((96, 96)), rng.random((96, 96)),
              np.where(rng.random((96, 96)) < 0.999, 0.0, 1.0) * rng.standard_normal((96, 96))]
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the flat and one-signed blocks' empty means
        got = _features(np.stack(blocks))
        expected = np.array([one_block_features(b) for b in blocks])
    assert got.shape == (len(blocks), 18)
    np.testing.assert_array_equal(got[:, [0, 2, 6, 10, 14]], expected[:, [0, 2, 6, 10, 14]])  # every shape
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=0, equal_nan=True)
    assert np.isnan(got[4]).sum() == 13 and np.isfinite(got[:4]).all()  # flat: only the shapes are numbers


def test_the_shape_search_is_the_whole_table_search():
    """_nearest bisects the ratio table, which must rise strictly, and picks what argmin over the whole
    table picks: in range, between two entries, on an entry, beyond either end, NaN and infinite."""
    _, ratios = _shape_table()
    assert (np.diff(ratios) > 0).all()
    rng = np.random.default_rng(0)
    r = np.concatenate([rng.uniform(0, 1, 5000), ratios[::97], (ratios[:-1:89] + ratios[1::89]) / 2,
                        [-1.0, 0.0, ratios[0], ratios[-1], 2.0, np.nan, np.inf, -np.inf]])
    with np.errstate(invalid="ignore"):
        expected = [np.argmin((ratios - x) ** 2) for x in r]
    np.testing.assert_array_equal(_nearest(ratios, r), expected)


def test_block_rows_and_half_scale_strips_equal_the_whole_image(monkeypatch):
    """NIQE normalises a row of blocks at a time (the window's reach of rows around it) and halves the
    image in strips, so its memory follows a strip. Oracle: the whole-image normalisation by
    scipy.ndimage.convolve (the release's, which this takes from OpenCV's filter2D) with the Gaussian window
    and a lopsided one, and MATLAB's separable resize as two dense matrix products, on 5 x 3 blocks with
    strips of 7 rows."""
    from scipy import ndimage

    from dasr_model import metrics
    from dasr_model import niqe as niqe_module

    rng = np.random.default_rng(2)
    img = np.round(ndimage.gaussian_filter(rng.random((5 * 96, 3 * 96)), 1.0) * 255)  # some texture
    lopsided = rng.random((7, 7)) * np.arange(1, 8)[:, None] ** 2  # a window a flip or transpose would change
    for window in (make_params()["gaussian_window"], lopsided / lopsided.sum()):
        mu = ndimage.convolve(img, window, mode="nearest")
        sigma = np.sqrt(np.abs(ndimage.convolve(img * img, window, mode="nearest") - mu * mu))
        normalised = (img - mu) / (sigma + 1)
        expected = [_features(normalised[None, r:r + 96, c:c + 96])[0] for c in range(0, 288, 96)
                    for r in range(0, 480, 96)]
        np.testing.assert_allclose(niqe_module._scale_features(img, window, 96), expected, rtol=1e-12, atol=0)
    down, across = (niqe_module._half_weights(n).toarray() for n in img.shape)
    monkeypatch.setattr(metrics, "STRIP_ROWS", 7)
    np.testing.assert_allclose(imresize_half(img, unit=255), down @ (img / 255) @ across.T * 255, rtol=1e-13,
                               atol=1e-10)


def test_the_luma_is_rounded_halves_up_as_matlab_rounds():
    """NIQE rounds the luma first, halves up (MATLAB's round of non-negative values); numpy's round sends
    halves to the even neighbour, and with it every test passed (a mutation audit). Oracle: an integer
    image plus 0.5 scores as that image plus 1, and differs from the image itself."""
    params = make_params()
    y = np.round(luma_images()["photo"][:200, :300])
    assert niqe(y + 0.5, params) == niqe(y + 1, params) != niqe(y, params)


def test_too_small_an_image_is_refused():
    params = make_params()
    with pytest.raises(DASRError, match="two 96 x 96 blocks at least"):
        niqe(np.zeros((100, 190)), params)
    assert np.isfinite(niqe(luma_images()["photo"][:96, :192], params))


def _save(path, **arrays):
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return path


def test_the_parameter_file_is_read_without_pickles_and_checked(tmp_path):
    params = make_params()
    loaded = load_niqe_params(_save(tmp_path / "p.npz", **params, extra=np.zeros(3)))
    for key, value in params.items():  # the mean as BasicSR stores it, (1, 36), read as (36,)
        np.testing.assert_array_equal(loaded[key], value.reshape(loaded[key].shape))
    assert loaded["mu_pris_param"].shape == (36,)
    window = params["gaussian_window"]
    bad = {"missing": ({k: v for k, v in params.items() if k != "gaussian_window"}, "no 'gaussian_window'"),
           "shape": ({**params, "mu_pris_param": np.zeros(18)}, "expected real numbers of shape (36,)"),
           "complex": ({**params, "mu_pris_param": np.zeros(36, complex)}, "expected real numbers"),
           "nan": ({**params, "cov_pris_param": np.full((36, 36), np.nan)}, "holds NaN or infinite values"),
           "window": ({**params, "gaussian_window": window * 2}, "its window must be non-negative and sum to 1"),
           "object": ({**params, "mu_pris_param": np.array([object()] * 36)}, "not a readable NIQE parameter file")}
    for name, (arrays, message) in bad.items():
        with pytest.raises(DASRError, match=re.escape(message)):
            load_niqe_params(_save(tmp_path / f"{name}.npz", **arrays))
    (tmp_path / "text.npz").write_text("not a zip")
    np.save(tmp_path / "one.npy", params["cov_pris_param"])
    with open(tmp_path / "huge.npy", "wb") as f:  # 192 bytes whose header declares 728 TiB: np.load allocates it
        np.lib.format.write_array_header_1_0(f, {"descr": "<f8", "fortran_order": False, "shape": (10**7, 10**7)})
    for name in ("text.npz", "one.npy", "huge.npy"):
        with pytest.raises(DASRError, match="not a readable NIQE parameter file"):
            load_niqe_params(tmp_path / name)
    import zipfile  # a member that inflates far past the file: refused from the archive's directory

    with zipfile.ZipFile(tmp_path / "bomb.npz", "w", zipfile.ZIP_DEFLATED) as z:
        for key, value in params.items():
            buf = __import__("io").BytesIO()
            np.save(buf, np.zeros(2**24, np.uint8) if key == "mu_pris_param" else value)
            z.writestr(f"{key}.npy", buf.getvalue())
    assert (tmp_path / "bomb.npz").stat().st_size < 2**16
    with pytest.raises(DASRError, match="its mu_pris_param unpacks to over"):
        load_niqe_params(tmp_path / "bomb.npz")
    with zipfile.ZipFile(tmp_path / "header.npz", "w") as z:  # a short member whose header claims 728 TiB
        for key, value in params.items():
            buf = __import__("io").BytesIO()
            np.save(buf, value)
            data = buf.getvalue()
            if key == "cov_pris_param":
                data = data.replace(b"(36, 36)", b"(9999999, 9999999)").replace(b"  \n", b"\n", 1)
            z.writestr(f"{key}.npy", data)
    with pytest.raises(DASRError, match=re.escape("its cov_pris_param declares (9999999, 9999999)")):
        load_niqe_params(tmp_path / "header.npz")
    with pytest.raises(DASRError, match="positive semi-definite"):  # symmetric, but every score would be NaN
        load_niqe_params(_save(tmp_path / "neg.npz", **{**params, "cov_pris_param": -np.eye(36)}))


def test_a_damaged_archive_is_one_line_whatever_zipfile_zlib_or_numpy_raise(tmp_path):
    """Damage that reached dasr-eval as a traceback (from an independent review's fuzzing): a deflate stream
    that does not inflate (zlib.error), a member of an unsupported compression method (NotImplementedError)
    or encrypted (RuntimeError), a .npy header that does not parse (tokenize.TokenError). Each is the
    loader's one-line DASRError."""
    import io
    import zipfile

    params = make_params()

    def archive(name: str, method: int, edit, member_edit=bytes):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", method) as z:
            for key, value in params.items():
                member = io.BytesIO()
                np.save(member, value)
                z.writestr(f"{key}.npy", member_edit(member.getvalue()))  # its CRC that of the edited bytes
        path = tmp_path / name
        path.write_bytes(edit(bytearray(buf.getvalue())))
        return path

    def inflate_fails(data: bytearray) -> bytes:  # the first member's deflate stream, its block type made invalid
        start = 30 + int.from_bytes(data[26:28], "little") + int.from_bytes(data[28:30], "little")
        data[start] |= 0b110  # BTYPE 11: reserved, an error in every inflater
        return bytes(data)

    def method(value: int, flag: int = 0):
        def edit(data: bytearray) -> bytes:
            for sig, at in ((b"PK\x03\x04", 8), (b"PK\x01\x02", 10)):  # local headers and the directory
                i = data.find(sig)
                while i >= 0:
                    data[i + at:i + at + 2] = value.to_bytes(2, "little")
                    data[i + at - 2] |= flag
                    i = data.find(sig, i + 4)
            return bytes(data)
        return edit

    cases = {
        "zlib.npz": (zipfile.ZIP_DEFLATED, inflate_fails),
        "deflate64.npz": (zipfile.ZIP_STORED, method(9)),
        "encrypted.npz": (zipfile.ZIP_STORED, method(0, flag=1)),
        "header.npz": (zipfile.ZIP_STORED, bytes, lambda d: d.replace(b"), }", b"), (", 1)),  # '{... (' unclosed
    }
    for name, (how, *edits) in cases.items():
        with pytest.raises(DASRError, match="not a readable NIQE parameter file"):
            load_niqe_params(archive(name, how, *edits))


def test_an_image_without_two_textured_blocks_is_refused():
    params = make_params()
    flat = np.full((200, 300), 120.0)
    with pytest.raises(DASRError, match="two 96 x 96 blocks with texture, and this image has 0"):
        niqe(flat, params)


def test_dasr_eval_scores_real_lr_alone_with_niqe(ckpt, tmp_path):
    """Oracle: NIQE of the model's whole-image output and of torch's bicubic x4 (Y on 8-bit levels, 4-px crop),
    computed here; no HR, so no PSNR."""
    import json

    import torch
    from click.testing import CliRunner

    import degrade
    from cli.sr import eval_main
    from dasr_model.infer import load_checkpoint_model, to_image, to_tensor
    from dasr_model.metrics import y_channel

    params_file = _save(tmp_path / "p.npz", **make_params())
    lr_dir = tmp_path / "lr"
    lr_dir.mkdir()
    for i in range(2):
        degrade.write_image(lr_dir / f"{i}.png", degrade.read_image(degrade.sample_images()[i])[:30, :56])
    args = ["--model", str(ckpt), "--lr-dir", str(lr_dir), "--device", "cpu", "--niqe-params", str(params_file)]
    res = CliRunner().invoke(eval_main, [*args, "--json"])
    assert res.exit_code == 0, res.output
    level = json.loads(res.stdout)["levels"]["0"]
    assert set(level) == {"images", "niqe", "bicubic_niqe", "niqe_images"} and level["images"] == 2
    model, params = load_checkpoint_model(ckpt), make_params()
    ours, bicubic = [], []
    with torch.no_grad():
        for i in range(2):
            lr = to_tensor(degrade.read_image(lr_dir / f"{i}.png"))
            ours.append(niqe(y_channel(to_image(model(lr)))[4:-4, 4:-4], params))
            bic = torch.nn.functional.interpolate(lr, scale_factor=4, mode="bicubic", align_corners=False)
            bicubic.append(niqe(y_channel(to_image(bic))[4:-4, 4:-4], params))
    assert level["niqe"] == pytest.approx(np.mean(ours), rel=1e-3)
    assert level["bicubic_niqe"] == pytest.approx(np.mean(bicubic), rel=1e-6)
    table = CliRunner().invoke(eval_main, args, terminal_width=80)
    assert table.exit_code == 0 and "NIQE (no reference; lower: more natural)" in table.stdout
    assert "PSNR" not in table.stdout
    degrade.write_image(lr_dir / "flat.png", np.full((30, 56, 3), 0.5, np.float32))  # no statistics: left out
    res = CliRunner().invoke(eval_main, [*args, "--json"])
    assert res.exit_code == 0, res.output
    with_flat = json.loads(res.stdout)["levels"]["0"]
    assert with_flat["images"] == 3 and with_flat["niqe_images"] == 2
    assert with_flat["niqe"] == pytest.approx(level["niqe"], rel=1e-9)


def test_dasr_eval_niqe_beside_psnr_and_its_refusals(ckpt, tmp_path):
    import json

    from click.testing import CliRunner

    import degrade
    from cli.sr import eval_main

    params_file = _save(tmp_path / "p.npz", **make_params())
    hr_dir = tmp_path / "hr"
    hr_dir.mkdir()
    degrade.write_image(hr_dir / "a.png", degrade.read_image(degrade.sample_images()[0])[:120, :224])
    base = ["--model", str(ckpt), "--device", "cpu"]
    res = CliRunner().invoke(eval_main, [*base, "--hr-dir", str(hr_dir), "--levels", "2", "--json", "--niqe-params",
                                         str(params_file)])
    assert res.exit_code == 0, res.output
    assert {"psnr_y", "niqe", "bicubic_niqe"} <= set(json.loads(res.stdout)["levels"]["2"])
    for extra, code, message in (([], 2, "--lr-dir alone has nothing to compare with"),
                                 (["--niqe-params", str(params_file), "--lpips-alexnet", "a", "--lpips-lin", "b"], 2,
                                  "LPIPS compares with an HR image"),
                                 (["--niqe-params", str(hr_dir / "a.png")], 1, "not a readable NIQE parameter file")):
        res = CliRunner().invoke(eval_main, [*base, "--lr-dir", str(hr_dir), *extra])
        assert res.exit_code == code and message in res.output and "Traceback" not in res.output, res.output


def test_an_image_that_either_column_cannot_score_is_left_out_of_both(ckpt, tmp_path, monkeypatch):
    """Otherwise the model's and bicubic's means would be over different images. Oracle: NIQE refused for
    bicubic on the second image only; both columns are the first image's, and one image counts."""
    import json

    from click.testing import CliRunner

    import dasr_model.evaluate as evaluate
    import degrade
    from cli.sr import eval_main

    calls = []

    def fake(img, params):
        calls.append(len(calls))
        return math.nan if len(calls) == 4 else float(len(calls))  # model, bicubic; model, bicubic (refused)

    monkeypatch.setattr(evaluate, "_niqe_or_nan", fake)
    lr_dir = tmp_path / "lr"
    lr_dir.mkdir()
    for i in range(2):
        degrade.write_image(lr_dir / f"{i}.png", np.full((30, 56, 3), 0.5, np.float32))
    res = CliRunner().invoke(eval_main, ["--model", str(ckpt), "--lr-dir", str(lr_dir), "--device", "cpu", "--json",
                                         "--niqe-params", str(_save(tmp_path / "p.npz", **make_params()))])
    assert res.exit_code == 0, res.output
    level = json.loads(res.stdout)["levels"]["0"]
    assert (level["niqe"], level["bicubic_niqe"], level["niqe_images"], level["images"]) == (1.0, 2.0, 1, 2)


def test_dasr_eval_of_lr_images_alone_fails_when_niqe_scores_none(ckpt, tmp_path, monkeypatch):
    """With --lr-dir alone NIQE is all a run measures: none scored (every image too small or flat) is an
    error, not a table of nothing with exit status 0."""
    import json

    from click.testing import CliRunner

    import dasr_model.evaluate as evaluate
    import degrade
    from cli.sr import eval_main

    lr_dir = tmp_path / "lr"
    lr_dir.mkdir()
    for i in range(2):
        degrade.write_image(lr_dir / f"{i}.png", np.full((30, 56, 3), 0.5, np.float32))
    args = ["--model", str(ckpt), "--lr-dir", str(lr_dir), "--device", "cpu", "--json",
            "--niqe-params", str(_save(tmp_path / "p.npz", **make_params()))]
    monkeypatch.setattr(evaluate, "_niqe_or_nan", lambda img, params: math.nan)
    res = CliRunner().invoke(eval_main, args)
    assert res.exit_code == 1 and "NIQE could score none of the 2 image(s)" in res.output, res.output
    monkeypatch.setattr(evaluate, "_niqe_or_nan", lambda img, params: 3.0)
    res = CliRunner().invoke(eval_main, args)
    assert res.exit_code == 0 and json.loads(res.stdout)["levels"]["0"]["niqe_images"] == 2
