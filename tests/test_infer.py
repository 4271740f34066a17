"""dasr-sr / dasr-eval on CPU with a tiny model: tiling, --set, eval numbers, bad input."""

from __future__ import annotations

import contextlib
import errno
import json
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import cv2  # noqa: E402
from click.testing import CliRunner  # noqa: E402

import degrade  # noqa: E402
from cli.sr import OrderedWriters, eval_main, precision_kwargs, sr_main  # noqa: E402
from dasr_model.checkpoints import save_checkpoint  # noqa: E402
from dasr_model.infer import edit_vector, load_checkpoint_model, super_resolve, upscale  # noqa: E402
from dasr_model.metrics import psnr, psnr_y, ssim_y, y_channel  # noqa: E402
from dasr_model.model import DASR, DASRConfig  # noqa: E402
from dasr_model.train import TrainConfig  # noqa: E402

from .conftest import make_small_dataset, refuse_files_in  # noqa: E402

TINY = DASRConfig(num_experts=2, num_feat=8, num_block=1, predictor_feat=8)


def test_tiled_output_equals_untiled(ckpt):
    model = load_checkpoint_model(ckpt)
    lr = torch.rand(1, 3, 37, 29)
    _, a = model.predict(lr)
    with torch.no_grad():
        whole = model.sr(lr, a)
        tiled = super_resolve(model, lr, a, tile=12, overlap=8)  # receptive-field radius of TINY: 6 px
    torch.testing.assert_close(tiled, whole, rtol=0, atol=1e-5)


def test_the_predictor_sees_a_large_image_at_its_own_resolution(monkeypatch):
    """dasr-sr's v_hat comes from the LR as it is, whatever its size: a side over 1024 px was once shrunk
    first, which halved the noise the predictor saw. Oracle: the predictor called on the image itself."""
    from dasr_model import infer

    torch.manual_seed(0)
    model = DASR(TINY).eval()
    lr = torch.rand(1, 3, 6, 1100)
    seen = []
    plain = model.predictor.forward
    monkeypatch.setattr(model.predictor, "forward", lambda x, **kw: seen.append(x.shape) or plain(x, **kw))
    v_hat, a = infer.predict(model, lr)
    assert seen == [lr.shape]
    with torch.no_grad():
        want = model.predictor(lr)
    torch.testing.assert_close((v_hat, a), want, rtol=0, atol=0)


def _random_generator(config: DASRConfig, seed: int = 0) -> DASR:
    """A model whose every generator weight is random (the release init zeroes the residual's last layers,
    which would hide how far a pixel reaches), in float64."""
    torch.manual_seed(seed)
    model = DASR(config).double().eval()
    with torch.no_grad():
        for p in model.generator.parameters():
            p.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("blocks", [1, 2, 3])
def test_receptive_radius_is_how_far_one_lr_pixel_reaches(blocks):
    """Oracle: change one LR pixel and find the output pixels that move; the farthest, in LR cells, is
    receptive_radius (2 * blocks + 3) exactly: the default tile overlap is neither short nor wasteful."""
    from dasr_model.infer import receptive_radius

    model = _random_generator(DASRConfig(num_experts=2, num_feat=4, num_block=blocks, predictor_feat=8))
    r = receptive_radius(model.config)
    n = 2 * r + 9
    c = n // 2
    lr = torch.rand(1, 3, n, n, dtype=torch.float64)
    a = torch.tensor([[0.3, 0.7]], dtype=torch.float64)
    with torch.no_grad():
        poked = lr.clone()
        poked[..., c, c] += 0.5
        moved = (model.sr(poked, a) - model.sr(lr, a)).abs().amax(1)[0] > 0
    ys, xs = torch.nonzero(moved, as_tuple=True)
    assert r == 2 * blocks + 3
    assert max(int((ys // 4 - c).abs().max()), int((xs // 4 - c).abs().max())) == r


def test_tiles_with_the_default_overlap_give_the_whole_image_and_one_less_does_not():
    from dasr_model.infer import receptive_radius

    model = _random_generator(DASRConfig(num_experts=2, num_feat=4, num_block=2, predictor_feat=8))
    lr = torch.rand(1, 3, 45, 38, dtype=torch.float64)
    a = torch.tensor([[0.6, 0.4]], dtype=torch.float64)
    with torch.no_grad():
        whole = model.sr(lr, a)
        torch.testing.assert_close(super_resolve(model, lr, a, tile=16), whole, rtol=0, atol=1e-12)
        short = super_resolve(model, lr, a, tile=16, overlap=receptive_radius(model.config) - 1)
    assert float((short - whole).abs().max()) > 1e-6


def test_upscale_reports_each_tile(ckpt):
    """on_tile(done, total) after each output tile: what dasr-sr's second bar shows for a large image."""
    model = load_checkpoint_model(ckpt)
    img = np.random.default_rng(5).random((150, 140, 3), dtype=np.float32)
    for tile, total in ((64, 9), (100, 4), (None, 1), (512, 1)):
        seen = []
        upscale(model, img, tile=tile, on_tile=lambda d, t: seen.append((d, t)))
        assert seen == [(d, total) for d in range(1, total + 1)], tile


def test_set_changes_exactly_the_named_field():
    v = torch.rand(2, 33)
    v[:, 20:22] = torch.tensor([1.0, 0.0])  # stage-1 noise is Gaussian
    edited = edit_vector(v, {"noise1.strength": "15", "blur1.sigma_x": "1.5", "final.mode": "bicubic"})
    changed = (edited != v).any(dim=0).nonzero().ravel().tolist()
    assert set(changed) <= {18, 1, 30, 31, 32}
    assert torch.allclose(edited[:, 18], torch.tensor(0.5)) and torch.allclose(edited[:, 1], torch.tensor(0.5))
    assert edited[:, 30:33].tolist() == [[0, 0, 1], [0, 0, 1]]
    with pytest.raises(ValueError, match="unknown field"):
        edit_vector(v, {"noise9.strength": "1"})
    with pytest.raises(ValueError, match="outside"):
        edit_vector(v, {"noise1.strength": "50"})


def test_set_changes_the_expert_mix_the_generator_runs():
    """--set edits v, and the image must be made with the mix of the edited v: with the mix left at the
    predicted v's, only the printed reading changed (a mutation audit: no test looked at the image).
    Oracle: upscale with the mix of the returned v given explicitly; and the edit changes the image."""
    torch.manual_seed(0)
    model = DASR(TINY).eval()
    with torch.no_grad():  # experts far apart, so that another mix makes another image
        for p in model.parameters():
            p.normal_(0, 0.5)
    img = np.random.default_rng(0).random((24, 24, 3), dtype=np.float32)
    plain, v = upscale(model, img, tile=None)
    edited, v2 = upscale(model, img, tile=None, overrides={"noise1.type": "gaussian", "noise1.strength": "25",
                                                           "blur1.sigma_x": "3"})
    assert not torch.equal(model.mix(v2), model.mix(v))
    with torch.no_grad():
        want, _ = upscale(model, img, tile=None, mix=model.mix(v2))
    assert np.array_equal(edited, want) and not np.array_equal(edited, plain)


def test_set_a_noise_type_and_its_strength_in_either_order():
    """A strength's units are its step's noise type's: the type set beside it counts, whatever the order
    (Gaussian sigma 15 of [0, 30] -> 0.5, as above); out of the Poisson range, the message names the type."""
    v = torch.rand(1, 33)
    v[:, 20:22] = torch.tensor([0.0, 1.0])  # stage-1 noise is Poisson: strength in [0, 3]
    with pytest.raises(ValueError, match=r"outside \[0, 3\] for poisson noise, the type in v \(--set noise1.type"):
        edit_vector(v, {"noise1.strength": "15"})
    edited = edit_vector(v, {"noise1.strength": "15", "noise1.type": "gaussian"})
    assert edited[0, 20:22].tolist() == [1.0, 0.0] and edited[0, 18].item() == pytest.approx(0.5)


def test_a_strength_for_a_step_whose_v_sets_no_noise_type_is_refused():
    """A v whose noise1.type entries are all about 0 reads as no stage-1 noise; its strength's units were
    taken from the larger of two near-zero entries (Poisson here, where the user may have meant a Gaussian
    sigma): refused, naming the type to give; with the type given it is set."""
    v = torch.rand(1, 33)
    v[:, 20:22] = torch.tensor([-0.0103, -0.0056])
    with pytest.raises(ValueError, match="has no noise1 noise type .* give --set noise1.type=gaussian or poisson"):
        edit_vector(v, {"noise1.strength": "2"})
    edited = edit_vector(v, {"noise1.strength": "15", "noise1.type": "gaussian"})
    assert edited[0, 20:22].tolist() == [1.0, 0.0] and edited[0, 18].item() == pytest.approx(0.5)
    edited = edit_vector(v, {"noise1.strength": "0"})  # no noise: entry 0 under either type, no type needed
    assert edited[0, 18].item() == 0 and torch.equal(edited[:, 19:], v[:, 19:])
    # the library's dict: names and values stripped, a flag also as a bool (as before the checks moved)
    edited = edit_vector(v, {" noise1.type": "gaussian ", "noise1.gray": True})
    assert edited[0, 19:22].tolist() == [1.0, 1.0, 0.0]


def test_set_values_no_image_could_take_are_refused_before_any_work(ckpt, tmp_path):
    """A repeated name, a flag other than 0 or 1 (7 and 0.6 became 1), an even or fractional kernel size, a
    choice that is no choice, a value out of its field's range: one line before any image is read or the
    output folder made (a misspelt choice was 'skipped' once per image, and left an empty folder)."""
    from dasr_model.infer import parse_settings

    src = tmp_path / "in"
    src.mkdir()
    for name in ("a", "b"):
        cv2.imwrite(str(src / f"{name}.png"), np.full((12, 12, 3), 90, np.uint8))
    for settings, message in [
        (["noise1.gray=1", "noise1.gray=0"], "noise1.gray is given twice"),
        (["noise1.gray=7"], "is a flag: 0 or 1"),
        (["noise1.gray=0.6"], "is a flag: 0 or 1"),
        (["blur1.size=4"], "not an odd kernel size"),
        (["sinc.size=7.5"], "not an odd kernel size"),
        (["noise1.type=gausian"], "'gausian' is not one of gaussian, poisson"),
        (["blur1.sigma_x=9"], r"blur1.sigma_x: 9 is outside \[0, 3\]"),
        (["jpeg1.quality=abc"], "is not a number"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_settings(settings)
        out = tmp_path / "out"
        args = [str(src), "-o", str(out), "--model", str(ckpt), "--device", "cpu"]
        result = CliRunner().invoke(sr_main, args + [x for s in settings for x in ("--set", s)])
        assert result.exit_code != 0 and "skipped" not in result.output and not out.exists(), result.output
    assert parse_settings(["noise1.gray=1", "blur1.size=7", "noise1.type=gaussian"]) == {
        "noise1.gray": "1", "blur1.size": "7", "noise1.type": "gaussian"}


def test_metrics_against_independent_numbers():
    rng = np.random.default_rng(0)
    hr = rng.random((40, 40, 3)).astype(np.float32)
    assert psnr_y(hr, hr) == float("inf") and ssim_y(hr, hr) == pytest.approx(1.0)
    sr = np.clip(hr + 4 / 255, 0, 1)
    y_hr, y_sr = y_channel(hr)[4:-4, 4:-4], y_channel(sr)[4:-4, 4:-4]
    assert psnr_y(sr, hr) == pytest.approx(10 * np.log10(255**2 / np.mean((y_sr - y_hr) ** 2)))
    assert psnr(np.zeros(4), np.full(4, 255.0)) == pytest.approx(0.0)
    from dasr_model.errors import DASRError

    for a, b in ((np.ones((5, 5)), np.ones((5, 6))), (np.ones((0, 5)), np.ones((0, 5))), (np.ones(()), np.ones(()))):
        with pytest.raises(DASRError, match="non-empty arrays of one shape"):  # was numpy's error, inf or NaN
            psnr(a, b)
    from dasr_model.metrics import ssim

    planes = rng.integers(0, 256, (2, 40, 40)).astype(np.uint8)  # uint8 planes score as their float64 values
    assert psnr(*planes) == psnr(*planes.astype(np.float64))  # (their squares wrapped around: 30.9 dB for 13.5)
    assert ssim(*planes) == ssim(*planes.astype(np.float64))  # (gaussian_filter kept uint8: SSIM 1.92)
    # Flat images: the variance terms vanish, SSIM = (2 mu_a mu_b + C1) / (mu_a^2 + mu_b^2 + C1).
    a, b = np.full((40, 40, 3), 100 / 255, np.float32), np.full((40, 40, 3), 150 / 255, np.float32)
    ya, yb = y_channel(a)[0, 0], y_channel(b)[0, 0]
    c1 = (0.01 * 255) ** 2
    assert ssim_y(a, b) == pytest.approx((2 * ya * yb + c1) / (ya**2 + yb**2 + c1), rel=1e-9)
    noisy = np.clip(hr + rng.normal(0, 0.1, hr.shape), 0, 1).astype(np.float32)
    assert ssim_y(noisy, hr) < ssim_y(np.clip(hr + rng.normal(0, 0.02, hr.shape), 0, 1), hr) < 1


def test_metrics_in_strips_equal_the_whole_image_formulas(monkeypatch):
    """The metrics run in row strips (memory that follows a strip: a 6000 x 4000 HR's SSIM held 1.8 GB of
    whole-image float64 temporaries). Oracle: the whole-image formulas written out here, on an image of
    61 rows in strips of 7 (no strip boundary on a multiple of SSIM's window or of the crop)."""
    from scipy import ndimage

    from dasr_model import metrics

    rng = np.random.default_rng(5)
    hr = rng.random((61, 45, 3)).astype(np.float32)
    sr = np.clip(hr + rng.normal(0, 0.05, hr.shape), 0, 1).astype(np.float32)
    whole = {"y": y_channel(sr), "psnr_y": psnr_y(sr, hr), "ssim_y": ssim_y(sr, hr),
             "psnr_rgb": metrics.psnr_rgb(sr, hr)}
    monkeypatch.setattr(metrics, "STRIP_ROWS", 7)
    assert np.array_equal(y_channel(sr), whole["y"])  # per pixel: bit for bit

    def y_of(img):
        x = np.round(np.clip(img, 0, 1) * 255).astype(np.float64)
        return (16 + (65.481 * x[..., 0] + 128.553 * x[..., 1] + 24.966 * x[..., 2]) / 255)[4:-4, 4:-4]

    a, b = y_of(sr), y_of(hr)
    rgb = np.round(np.clip(np.stack([sr, hr]), 0, 1) * 255).astype(np.float64)[:, 4:-4, 4:-4]
    expected_rgb = 10 * np.log10(255**2 / np.mean((rgb[0] - rgb[1]) ** 2))

    def filt(x):
        return ndimage.gaussian_filter(x, 1.5, truncate=3.5, mode="constant")[5:-5, 5:-5]

    mu_a, mu_b = filt(a), filt(b)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * (filt(a * b) - mu_a * mu_b) + c2)) / (
        (mu_a**2 + mu_b**2 + c1) * (filt(a * a) - mu_a**2 + filt(b * b) - mu_b**2 + c2))
    for key, value, expected in (("psnr_y", psnr_y(sr, hr), 10 * np.log10(255**2 / np.mean((a - b) ** 2))),
                                 ("ssim_y", ssim_y(sr, hr), ssim_map.mean()),
                                 ("psnr_rgb", metrics.psnr_rgb(sr, hr), expected_rgb)):
        assert value == pytest.approx(expected, rel=1e-12, abs=0), key
        assert value == pytest.approx(whole[key], rel=1e-12, abs=0), key
    assert 0 < ssim_map.mean() < 1 and ssim_map.shape == (43, 27)


def test_metrics_clip_the_sr_image_and_crop_the_border_asked():
    """An SR image that overshoots [0, 1] scores as its clipped 8-bit rendering (a value of 1.2 would read
    as 306), and `crop` is the border each metric leaves out: with the clip removed, or the crop ignored by
    psnr_y and ssim_y, every test passed (a mutation audit: all images were in range, all crops 4). Oracle:
    the formulas written out on the clipped image's Y, cropped by 0, 4 and 8 px."""
    from dasr_model.metrics import ssim

    rng = np.random.default_rng(9)
    hr = rng.random((40, 36, 3)).astype(np.float32)
    sr = (hr + rng.normal(0, 0.2, hr.shape)).astype(np.float32)  # beyond [0, 1] in places
    assert sr.min() < 0 and sr.max() > 1

    def y_of(img, c):
        x = np.round(np.clip(img, 0, 1) * 255).astype(np.float64)
        y = 16 + (65.481 * x[..., 0] + 128.553 * x[..., 1] + 24.966 * x[..., 2]) / 255
        return y[c:y.shape[0] - c, c:y.shape[1] - c]

    for c in (0, 4, 8):
        a, b = y_of(sr, c), y_of(hr, c)
        assert psnr_y(sr, hr, crop=c) == pytest.approx(10 * np.log10(255**2 / np.mean((a - b) ** 2)), rel=1e-12)
        assert ssim_y(sr, hr, crop=c) == pytest.approx(ssim(a, b), rel=1e-12)
    assert psnr_y(sr, hr) == psnr_y(np.clip(sr, 0, 1), hr) and ssim_y(sr, hr) == ssim_y(np.clip(sr, 0, 1), hr)
    assert len({psnr_y(sr, hr, crop=c) for c in (0, 4, 8)}) == 3


def test_metrics_refuse_what_they_would_score_wrong():
    """uint8 images were clipped to [0, 1] (black and white: 25.8 dB for 31.5), an HR of another shape
    broadcast against the SR with crop 0, a shape numpy cannot broadcast a raw ValueError, and SSIM of an
    image too small for its window NaN: each a DASRError now; float images of one shape score as before."""
    from dasr_model.errors import DASRError
    from dasr_model.metrics import psnr_rgb

    rng = np.random.default_rng(3)
    hr = rng.random((40, 40, 3)).astype(np.float32)
    sr = np.clip(hr + rng.normal(0, 0.02, hr.shape), 0, 1).astype(np.float32)
    for fn in (psnr_y, psnr_rgb, ssim_y):
        with pytest.raises(DASRError, match="float in \\[0, 1\\], got uint8"):
            fn((sr * 255).astype(np.uint8), (hr * 255).astype(np.uint8))
        with pytest.raises(DASRError, match="differ in shape"):
            fn(sr, hr[:1], crop=0)
        with pytest.raises(DASRError, match="differ in shape"):
            fn(sr, hr[:, :30])
        with pytest.raises(DASRError, match="crop must be an integer"):
            fn(sr, hr, crop=-1)
        assert np.isfinite(fn(sr, hr))
    with pytest.raises(DASRError, match="leaves less than 11 px a side"):
        ssim_y(sr[:18, :18], hr[:18, :18])
    assert np.isfinite(ssim_y(sr[:19, :19], hr[:19, :19]))


def test_the_commands_leave_out_opencvs_own_log_lines(tmp_path):
    """A truncated image is one line, our 'not a readable image', without OpenCV's '[ERROR:0@...] ... can't
    read data' before it (OPENCV_LOG_LEVEL, when set, still decides). (A truncated PNG no longer reaches
    OpenCV: test_io's test_a_damaged_png_is_refused_before_libpng_prints_a_line.)"""
    import os
    import subprocess
    import sys

    bad = tmp_path / "t.bmp"
    bad.write_bytes(cv2.imencode(".bmp", cv2.imread(str(degrade.sample_images()[0])))[1].tobytes()[:3000])
    env = {k: v for k, v in os.environ.items() if k != "OPENCV_LOG_LEVEL"}
    run = [sys.executable, "-m", "cli.main", "apply", str(bad), "-o", str(tmp_path / "o.png")]
    root = Path(__file__).resolve().parents[1]
    quiet = subprocess.run(run, capture_output=True, text=True, env=env, cwd=root, timeout=60)
    assert quiet.returncode == 1 and quiet.stderr.strip().splitlines() == [f"Error: {bad}: not a readable image"]
    loud = subprocess.run(run, capture_output=True, text=True, env={**env, "OPENCV_LOG_LEVEL": "WARNING"}, cwd=root,
                          timeout=60)
    assert "ERROR" in loud.stderr  # the oracle: OpenCV does log this file


def test_sr_cli_writes_x4_pngs_and_prints_v(ckpt, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    cv2.imwrite(str(src / "a.png"), np.random.default_rng(1).integers(0, 255, (20, 24, 3), dtype=np.uint8))
    cv2.imwrite(str(src / "b.png"), np.random.default_rng(2).integers(0, 255, (150, 140, 3), dtype=np.uint8))
    result = CliRunner().invoke(sr_main, [str(src), "-o", str(tmp_path / "out"), "--model", str(ckpt),
                                          "--tile", "64", "--print-v", "--set", "jpeg1.quality=60", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert degrade.read_image(tmp_path / "out" / "a_x4.png").shape == (80, 96, 3)
    whole = CliRunner().invoke(sr_main, [str(src / "b.png"), "-o", str(tmp_path / "whole"), "--model", str(ckpt),
                                         "--tile", "0", "--set", "jpeg1.quality=60", "--device", "cpu"])
    assert whole.exit_code == 0, whole.output
    tiled = cv2.imread(str(tmp_path / "out" / "b_x4.png"))  # 3 x 3 tiles of 64
    assert tiled.shape == (600, 560, 3) and np.array_equal(tiled, cv2.imread(str(tmp_path / "whole" / "b_x4.png")))
    assert "reads as:" in result.output and "JPEG q 60" in result.output
    mixed = CliRunner().invoke(sr_main, [str(src / "a.png"), "-o", str(tmp_path / "m"), "--model", str(ckpt),
                                         "--mix", "1,0", "--device", "cpu"])
    assert mixed.exit_code == 0, mixed.output


def test_sr_refuses_an_output_of_nan_instead_of_writing_it_black(ckpt, tmp_path):
    """--mix 1e30,1e30 is finite, but the mixed weights overflow float32: every output value is NaN, which
    8-bit output turned into an all-black PNG, with exit 0. Now that image is skipped with a reason."""
    cv2.imwrite(str(tmp_path / "a.png"), np.random.default_rng(1).integers(0, 255, (70, 72, 3), dtype=np.uint8))
    for tile in ("64", "0"):  # tile by tile (4 tiles), and the whole image at once
        result = CliRunner().invoke(sr_main, [str(tmp_path / "a.png"), "-o", str(tmp_path / f"o{tile}"), "--model",
                                              str(ckpt), "--mix", "1e30,1e30", "--tile", tile, "--device", "cpu"])
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
        assert "NaN or infinite" in " ".join(result.output.split())
        assert not list((tmp_path / f"o{tile}").glob("*.png"))


def _louder_checkpoint(ckpt, path):
    """ckpt's model with every generator weight x6, saved at `path`: a residual that shows in 8-bit output."""
    model = load_checkpoint_model(ckpt)
    with torch.no_grad():
        for p in model.generator.parameters():
            p.mul_(6)
    save_checkpoint(path, {"config": TrainConfig(shards="", out="", model=TINY).to_dict(), "step": 1,
                           "model": model.state_dict(), "ema_generator": model.generator.state_dict()})
    return path


def test_sr_cli_precision_bf16_runs_the_fused_net_in_bf16(ckpt, tmp_path, monkeypatch):
    """--precision bf16 hands bf16 to the fused generator (channels_last only on a GPU) and writes what
    fp32 writes within bf16 rounding; the default is fp32. Weights x6, so the residual is not negligible."""
    import dasr_model.infer as infer

    path = _louder_checkpoint(ckpt, tmp_path / "ckpt-1.pt")
    src = tmp_path / "a.png"
    cv2.imwrite(str(src), np.random.default_rng(2).integers(0, 255, (20, 24, 3), dtype=np.uint8))
    asked, real = [], infer.reused_fused_net

    def spy(*args, **kwargs):
        asked.append((kwargs.get("dtype"), kwargs.get("channels_last")))
        return real(*args, **kwargs)

    monkeypatch.setattr(infer, "reused_fused_net", spy)
    outs = {}
    for precision in ("fp32", "bf16"):
        args = [str(src), "-o", str(tmp_path / precision), "--model", str(path), "--device", "cpu"]
        result = CliRunner().invoke(sr_main, args + (["--precision", "bf16"] if precision == "bf16" else []))
        assert result.exit_code == 0, result.output
        outs[precision] = cv2.imread(str(tmp_path / precision / "a_x4.png")).astype(int)
    assert asked == [(None, False), (torch.bfloat16, False)]
    base = cv2.resize(cv2.imread(str(src)), (96, 80), interpolation=cv2.INTER_LINEAR).astype(int)
    residual = np.abs(outs["fp32"] - base)
    assert residual.mean() > 2, residual.mean()  # the generator's residual shows in the output
    diff = np.abs(outs["bf16"] - outs["fp32"])
    # bf16's 8 mantissa bits on a residual of 7.7 levels on average (45 at most): seen max 1, mean 0.05
    assert 0 < diff.max() <= 3 and diff.mean() < 0.25


def test_eval_scores_the_bytes_sr_writes_at_each_precision(ckpt, tmp_path):
    """dasr-eval --precision is dasr-sr's: its --save-sr image equals dasr-sr's output byte for byte, in bf16
    as in fp32 (before, eval always ran fp32, while dasr-sr's default on a GPU is bf16). Weights x6, so that
    bf16 shows in the 8-bit output (asserted)."""
    from cli.sr import eval_main

    path = _louder_checkpoint(ckpt, tmp_path / "ckpt-1.pt")
    for name, size in (("lr", (20, 24, 3)), ("hr", (80, 96, 3))):
        (tmp_path / name).mkdir()
        cv2.imwrite(str(tmp_path / name / "a.png"), np.random.default_rng(2).integers(0, 255, size, np.uint8))
    written = {}
    for precision in ("fp32", "bf16"):
        common = ["--model", str(path), "--device", "cpu", "--precision", precision]
        res = CliRunner().invoke(sr_main, [str(tmp_path / "lr" / "a.png"), "-o", str(tmp_path / f"sr-{precision}"),
                                           *common])
        assert res.exit_code == 0, res.output
        res = CliRunner().invoke(eval_main, ["--lr-dir", str(tmp_path / "lr"), "--hr-dir", str(tmp_path / "hr"),
                                             "--save-sr", str(tmp_path / f"ev-{precision}"), "--json", *common])
        assert res.exit_code == 0, res.output
        written[precision] = (tmp_path / f"sr-{precision}" / "a_x4.png").read_bytes()
        assert (tmp_path / f"ev-{precision}" / "a.png").read_bytes() == written[precision]
    assert written["bf16"] != written["fp32"]


def test_sr_precision_auto_is_bf16_on_cuda_only(monkeypatch):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    bf16_gpu = {"dtype": torch.bfloat16, "channels_last": True}
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())  # no GPU here to select
    asked = []

    def supported(including_emulation=True):  # torch 2.3+'s signature: emulated bf16 must not count
        asked.append(including_emulation)
        return gpu_bf16

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported)
    gpu_bf16 = True  # an A100 / H100 / H200
    assert precision_kwargs("auto", cuda) == bf16_gpu and precision_kwargs("auto", cpu) == {}
    gpu_bf16 = False  # a T4 or V100: no bf16 units
    assert precision_kwargs("auto", cuda) == {} and asked == [False, False]
    assert precision_kwargs("bf16", cuda) == bf16_gpu
    assert precision_kwargs("bf16", cpu) == {"dtype": torch.bfloat16, "channels_last": False}
    assert precision_kwargs("fp32", cuda) == {} and precision_kwargs("fp32", cpu) == {}


def test_upscale_channels_last_equals_the_default_layout(ckpt, monkeypatch):
    """channels_last: the fused net's weights and every tile it sees are channels_last; the output is the
    default layout's up to float rounding."""
    import dasr_model.infer as infer

    model = load_checkpoint_model(ckpt)
    img = np.random.default_rng(3).random((19, 23, 3)).astype(np.float32)
    a, _ = upscale(model, img, tile=8)
    layouts, real = [], infer.reused_fused_net

    @contextmanager
    def spy(*args, **kwargs):
        with real(*args, **kwargs) as net:
            hook = net.register_forward_pre_hook(lambda m, x: layouts.append(
                (x[0].is_contiguous(memory_format=torch.channels_last) and not x[0].is_contiguous(),
                 m.conv_first.weight.is_contiguous(memory_format=torch.channels_last))))
            try:
                yield net
            finally:  # the network is kept for the thread's next image: no hook must stay on it
                hook.remove()

    monkeypatch.setattr(infer, "reused_fused_net", spy)
    b, _ = upscale(model, img, tile=8, channels_last=True)
    assert len(layouts) == 9 and all(x and w for x, w in layouts)  # 3 x 3 tiles of at most 8 px
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # the same numbers up to float rounding


def test_eval_on_shards_equals_an_independent_computation(ckpt, tmp_path):
    """dasr-eval's PSNR-Y and PSNR-RGB on shards, against the formulas written out on the model's 8-bit SR:
    each over the image less a 4-px border. PSNR-RGB was not checked, and scored over the whole image
    (crop 0) every test passed (a mutation audit)."""
    shards = make_small_dataset(tmp_path / "ds", count=6, seed=2, shard_size=6, level=2)
    result = CliRunner().invoke(eval_main, ["--model", str(ckpt), "--shards", shards, "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    model = load_checkpoint_model(ckpt)
    ds = degrade.open_dataset(shards)
    ours, rgb = [], []
    with torch.no_grad():
        for s in ds:
            lr = torch.from_numpy(s.lr.astype(np.float32).transpose(2, 0, 1) / 255)[None]
            sr = model(lr)[0].clamp(0, 1).permute(1, 2, 0).numpy()
            y_sr = 16 + (np.round(sr * 255) @ np.array([65.481, 128.553, 24.966])) / 255
            y_hr = 16 + (s.hr.astype(np.float64) @ np.array([65.481, 128.553, 24.966])) / 255
            ours.append(10 * np.log10(255**2 / np.mean((y_sr[4:-4, 4:-4] - y_hr[4:-4, 4:-4]) ** 2)))
            diff = np.round(sr * 255).astype(np.float64) - s.hr.astype(np.float64)
            rgb.append(10 * np.log10(255**2 / np.mean(diff[4:-4, 4:-4] ** 2)))
    assert data["levels"]["2"]["images"] == 6
    assert data["levels"]["2"]["psnr_y"] == pytest.approx(np.mean(ours), abs=1e-6)
    assert data["levels"]["2"]["psnr_rgb"] == pytest.approx(np.mean(rgb), abs=1e-6)
    assert set(data["mae"]) == {"all", "kernel", "resize", "noise", "jpeg"}


def test_eval_on_shards_made_with_sharpen_hr_is_noted_and_a_plain_set_is_not(ckpt, tmp_path):
    """A --sharpen-hr dataset's LR come from the sharpened HR but are scored against the plain HR, which real
    images are not: dasr-train notes it of a validation set, dasr-eval said nothing. Now it notes it on
    stderr (the JSON on stdout stays clean) and still scores, exit status 0."""
    from degrade import shards as dsm

    scan = dsm.scan_sources([], 64)
    sharp = tmp_path / "sharp"
    dsm.make_dataset(dsm.DatasetConfig(level=2, count=2, patch_size=64, seed=1, shard_size=2, compression="none",
                                       source_root=scan.root, sources=tuple(scan.sources), sharpen_hr=True), sharp)
    plain = make_small_dataset(tmp_path / "plain", count=2, seed=1, shard_size=2, level=2)
    for data, noted in ((sharp, True), (plain, False)):
        res = CliRunner().invoke(eval_main, ["--model", str(ckpt), "--shards", str(data), "--json", "--device", "cpu"])
        assert res.exit_code == 0, res.output
        assert json.loads(res.stdout)["levels"]["2"]["images"] == 2
        assert (f"note: the dataset {data} was made with --sharpen-hr: its LR images come from the sharpened HR but "
                "are scored against the plain HR" in " ".join(res.stderr.split())) is noted, res.stderr


def test_eval_from_an_hr_folder_is_reproducible(ckpt, tmp_path):
    hr_dir = tmp_path / "hr"
    hr_dir.mkdir()
    cv2.imwrite(str(hr_dir / "x.png"), np.random.default_rng(3).integers(0, 255, (66, 70, 3), dtype=np.uint8))
    args = ["--model", str(ckpt), "--hr-dir", str(hr_dir), "--levels", "1,3", "--json", "--device", "cpu"]
    first, second = CliRunner().invoke(eval_main, args), CliRunner().invoke(eval_main, args)
    assert first.exit_code == 0, first.output
    assert first.stdout == second.stdout and set(json.loads(first.stdout)["levels"]) == {"1", "3"}


def test_eval_tiles_like_dasr_sr_with_the_whole_image_result(ckpt, tmp_path):
    """dasr-eval computes SR as dasr-sr does (fused experts, tiles overlapping by the receptive field): its
    scores with 64-px tiles equal the whole-image ones."""
    hr_dir = tmp_path / "hr"
    hr_dir.mkdir()
    cv2.imwrite(str(hr_dir / "x.png"), np.random.default_rng(4).integers(0, 255, (320, 300, 3), dtype=np.uint8))
    runs = {}
    for tile in ("64", "0"):
        res = CliRunner().invoke(eval_main, ["--model", str(ckpt), "--hr-dir", str(hr_dir), "--levels", "2", "--json",
                                             "--device", "cpu", "--tile", tile])
        assert res.exit_code == 0, res.output
        runs[tile] = json.loads(res.stdout)["levels"]["2"]
    for key in ("psnr_y", "ssim_y", "psnr_rgb"):
        assert runs["64"][key] == pytest.approx(runs["0"][key], abs=1e-6)


@pytest.mark.parametrize("content,message", [("tiny", "is too small for a test image"), ("text", "x.png")])
def test_eval_names_the_hr_image_it_cannot_use(ckpt, tmp_path, content, message):
    hr_dir = tmp_path / "hr"
    hr_dir.mkdir()
    cv2.imwrite(str(hr_dir / "a.png"), np.zeros((80, 80, 3), np.uint8))
    if content == "tiny":
        cv2.imwrite(str(hr_dir / "x.png"), np.zeros((3, 3, 3), np.uint8))
    else:
        (hr_dir / "x.png").write_text("not an image")
    res = CliRunner().invoke(eval_main, ["--model", str(ckpt), "--hr-dir", str(hr_dir), "--device", "cpu"])
    assert res.exit_code == 1 and str(hr_dir / "x.png") in res.output and message in res.output
    assert "Traceback" not in res.output


def test_eval_json_is_strict_json():
    """JSON has no Infinity or NaN: a PSNR of SR equal to HR (infinite) is written as null."""
    from cli.sr import _finite_or_null

    result = {"levels": {"1": {"psnr_y": float("inf"), "ssim_y": 1.0, "images": 2}}, "mix": [[0.5, float("nan")]]}
    text = json.dumps(_finite_or_null(result), allow_nan=False)
    assert json.loads(text) == {"levels": {"1": {"psnr_y": None, "ssim_y": 1.0, "images": 2}}, "mix": [[0.5, None]]}


def test_a_run_folder_with_only_its_model_file_loads(ckpt, tmp_path):
    from dasr_model.infer import load_model
    from dasr_model.modelfile import save_model_file

    run = tmp_path / "run"
    run.mkdir()
    save_model_file(load_checkpoint_model(ckpt), run / "model.safetensors")
    loaded = load_model(run)
    assert loaded.kind == "model file" and loaded.path == str(run / "model.safetensors")
    (run / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no readable ckpt-\\*.pt or model.safetensors"):
        load_model(run)


def test_sr_cli_skips_an_image_it_cannot_upscale_and_names_it(ckpt, tmp_path, monkeypatch):
    """A refusal for one image (a --set value outside the range of that image's predicted noise type) skips
    that image, named, and the others are still written; exit 1. So does an output that cannot be written,
    where one image's alone (before, it ended the run); not a full disk, which every image's would meet."""
    import dasr_model.infer as infer

    src = tmp_path / "in"
    src.mkdir()
    for name, level in (("a", 20), ("b", 120), ("c", 220)):
        cv2.imwrite(str(src / f"{name}.png"), np.full((12, 12, 3), level, np.uint8))
    real = infer.upscale

    def refuse_b(model, image, **kw):
        if abs(float(image.mean()) * 255 - 120) < 10:
            raise infer.DASRError("noise1.strength: 5 is outside [0, 3]")
        return real(model, image, **kw)

    monkeypatch.setattr(infer, "upscale", refuse_b)
    result = CliRunner().invoke(sr_main, [str(src), "-o", str(tmp_path / "out"), "--model", str(ckpt),
                                          "--device", "cpu"])
    assert result.exit_code == 1 and f"skipped {src / 'b.png'}: noise1.strength: 5 is outside" in result.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a_x4.png", "c_x4.png"]
    assert "1 of 3 input(s) could not be read, upscaled or written" in result.output

    # an output that cannot be written is that image's failure (a folder in its place); a full disk stops the run
    out = tmp_path / "out2"
    (out / "b_x4.png").mkdir(parents=True)
    monkeypatch.setattr(infer, "upscale", real)
    result = CliRunner().invoke(sr_main, [str(src), "-o", str(out), "--model", str(ckpt), "--device", "cpu"])
    text = " ".join(result.output.split())
    assert result.exit_code == 1 and f"skipped {src / 'b.png'}: not written: {out / 'b_x4.png'}" in text, text
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == ["a_x4.png", "c_x4.png"]
    assert "1 of 3 input(s) could not be read, upscaled or written" in text
    written = []

    def full_disk(path, img):
        if written:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        written.append(path)

    monkeypatch.setattr(degrade, "write_image", full_disk)
    result = CliRunner().invoke(sr_main, [str(src), "-o", str(tmp_path / "out3"), "--model", str(ckpt),
                                          "--device", "cpu"])
    assert result.exit_code == 1 and len(written) == 1 and "skipped" not in result.output
    assert result.output.strip().splitlines()[-1] == f"Error: {tmp_path / 'out3' / 'b_x4.png'}: No space left on device"



def test_ordered_writers_report_in_order_bound_what_is_in_flight_and_raise_a_jobs_error():
    """dasr-sr's writer threads: results reported in the order given whatever order the jobs end in, at most
    2 x threads jobs and `budget` bytes in flight, a job over the budget done alone before submit returns,
    a job's exception raised in the caller (with the jobs not yet started dropped), and threads 0 the
    sequential way: each job done and reported inside submit."""
    lock, running, peak, reports = threading.Lock(), [0], [0], []

    def job(key, seconds):
        def run():
            with lock:
                running[0] += 1
                peak[0] = max(peak[0], running[0])
            time.sleep(seconds)
            with lock:
                running[0] -= 1
            return f"done {key}"
        return run

    with OrderedWriters(3, lambda key, result: reports.append((key, result, len(w.pending))), budget=100) as w:
        for key in range(8):  # the earliest jobs the slowest: they end last
            w.submit(key, 10, job(key, 0.05 * (8 - key) / 8))
            assert len(w.pending) <= 6 and w.held <= 100
        w.submit("big", 150, job("big", 0.01))  # over the budget: waits for every job before it, then alone
        assert not w.pending and w.held == 0 and reports[-1][:2] == ("big", "done big")
        w.drain()
    assert [r[:2] for r in reports] == [(k, f"done {k}") for k in range(8)] + [("big", "done big")]
    assert peak[0] == 3  # the pool's threads all busy at once

    started = []

    def fails():
        raise ZeroDivisionError("a bug")

    def slow(key):
        return lambda: (started.append(key), time.sleep(0.05))

    with pytest.raises(ZeroDivisionError, match="a bug"):
        with OrderedWriters(1, lambda key, result: None) as w:
            w.submit(0, 1, fails)
            w.submit(1, 1, slow(1))  # queued behind it
            w.drain()
    assert started in ([], [1])  # not started, or already under way: never a later one after the error

    seen = []
    w = OrderedWriters(0, lambda key, result: seen.append((key, result)))
    w.submit("a", 10**12, lambda: 1)
    assert seen == [("a", 1)] and w.pool is None

    # the byte budget binds before the count: 40-byte jobs, 100 bytes, 3 threads: two at a time at most
    running[0] = peak[0] = 0
    with OrderedWriters(3, lambda key, result: None, budget=100) as w:
        for key in range(6):
            w.submit(key, 40, job(key, 0.03))
            assert w.held <= 100
    assert peak[0] == 2

    # what is done is reported at the next submit, not once the queue is full
    reports.clear()
    with OrderedWriters(2, lambda key, result: reports.append(key)) as w:
        w.submit(0, 1, lambda: None)
        time.sleep(0.05)
        w.submit(1, 1, lambda: time.sleep(0.05))
        assert reports == [0]
        w.drain()
    assert reports == [0, 1]

    # an error of the caller's own (or Ctrl-C) lets the jobs given finish: their images are upscaled already
    started.clear()
    with pytest.raises(KeyError):
        with OrderedWriters(1, lambda key, result: None) as w:
            w.submit(1, 1, slow(1))
            w.submit(2, 1, slow(2))
            raise KeyError("the caller's")
    assert started == [1, 2]

    def full_disk_later():
        time.sleep(0.05)
        raise OSError(errno.ENOSPC, "No space left on device")

    started.clear()  # a job failing while the caller fails too: the jobs after it still do nothing
    with pytest.raises(KeyError):
        with OrderedWriters(1, lambda key, result: None) as w:
            w.submit(0, 1, full_disk_later)
            w.submit(1, 1, slow(1))
            raise KeyError("the caller's")
    assert started == [] and w.job_failed


def test_sr_cli_writes_the_same_bytes_with_writer_threads_and_reports_in_input_order(ckpt, tmp_path, monkeypatch):
    """--write-threads N: outputs written while the next image is upscaled give the bytes --write-threads 0
    gives; an image that fails after a slow one is still reported after it, and counted; --print-v's lines
    follow; a full disk stops the run at the next image."""
    import dasr_model.infer as infer_module
    src = tmp_path / "in"
    src.mkdir()
    for i, name in enumerate("abcde"):
        cv2.imwrite(str(src / f"{name}.png"), np.random.default_rng(i).integers(0, 255, (20 + i, 24, 3), np.uint8))
    (src / "c.png").write_bytes(b"not an image")
    outs = {}
    for threads in ("0", "3"):
        result = CliRunner().invoke(sr_main, [str(src), "-o", str(tmp_path / threads), "--model", str(ckpt),
                                              "--device", "cpu", "--write-threads", threads])
        assert result.exit_code == 1 and "1 of 5 input(s) could not be read" in " ".join(result.output.split())
        outs[threads] = {p.name: p.read_bytes() for p in (tmp_path / threads).iterdir()}
    assert sorted(outs["0"]) == ["a_x4.png", "b_x4.png", "d_x4.png", "e_x4.png"] and outs["0"] == outs["3"]

    real, order = degrade.write_image, []

    def slow_b(path, img):  # b's write fails long after c's refusal and d's write
        if path.name == "b_x4.png":
            time.sleep(0.3)
            order.append(path.name)
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        order.append(path.name)
        real(path, img)

    monkeypatch.setattr(degrade, "write_image", slow_b)
    result = CliRunner().invoke(sr_main, [str(src), "-o", str(tmp_path / "slow"), "--model", str(ckpt),
                                          "--device", "cpu", "--write-threads", "3", "--print-v"])
    assert result.exit_code == 1 and order.index("d_x4.png") < order.index("b_x4.png")  # really overlapped
    text = " ".join(result.output.split())  # (long paths wrap)
    b, c = text.index(f"skipped {src / 'b.png'}: not written: "), text.index(f"skipped {src / 'c.png'}: ")
    assert b < c < text.index(f"wrote 3 image(s) to {tmp_path / 'slow'}")  # c's after b's, as the inputs come
    assert "Permission denied" in text[b:c] and text.count("skipped") == 2
    # --print-v: an image's v once its output is written, in the inputs' order; none for b, never written
    assert text.index("a.png: v = ") < b < c < text.index("d.png: v = ") < text.index("e.png: v = ")
    assert "b.png: v = " not in text

    # a full disk stops the run at the next image, however many writers: the images after it not upscaled
    upscaled = []
    real_upscale = infer_module.upscale

    def counted(*args, **kw):  # (slowed: the writer thread has time to fail before the next image's end)
        upscaled.append(1)
        time.sleep(0.1)
        return real_upscale(*args, **kw)

    def full(path, img):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(degrade, "write_image", full)
    monkeypatch.setattr(infer_module, "upscale", counted)
    (src / "c.png").unlink()
    result = CliRunner().invoke(sr_main, [str(src), "-o", str(tmp_path / "full"), "--model", str(ckpt),
                                          "--device", "cpu", "--write-threads", "3"])
    assert result.exit_code == 1 and "No space left on device" in result.output and "skipped" not in result.output
    assert len(upscaled) == 2  # a's write failed while b was upscaled; c and d were not



CPU_OOM = "DefaultCPUAllocator: can't allocate memory: you tried to allocate 737280000 bytes. Error code 12"



def test_out_of_memory_knows_each_libraries_allocation_failure_and_nothing_else():
    from dasr_model.infer import out_of_memory

    def cv2_error(code):
        try:
            cv2.resize(np.zeros((2, 2), np.uint8), (0, 0))  # a real cv2.error (an assertion's, -215)
        except cv2.error as exc:
            exc.code = code if code is not None else exc.code
            return exc

    for exc in (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), MemoryError(),
                RuntimeError(CPU_OOM), RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 8"),
                RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED"),
                RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
                RuntimeError("MPS backend out of memory"), RuntimeError("miopenStatusAllocFailed"),
                cv2_error(cv2.Error.StsNoMem)):
        assert out_of_memory(exc), exc
    for exc in (RuntimeError("CUDA error: an illegal memory access was encountered"), ValueError("out of memory"),
                RuntimeError("shape mismatch"), cv2_error(None)):
        assert not out_of_memory(exc), exc


def test_out_of_memory_is_one_line_dasr_sr_skips_that_image_and_dasr_eval_names_it(ckpt, tmp_path, monkeypatch):
    """An allocation failure (the CPU allocator's RuntimeError, CUDA's OutOfMemoryError, numpy's MemoryError)
    while upscaling is a one-line DASRError saying what to lower, raised with no traceback of the failed call
    held (its tensors freed); dasr-sr skips that image and goes on; dasr-eval stops in one line naming the
    image. Any other RuntimeError keeps its traceback."""
    import dasr_model.evaluate as evaluate_module
    import dasr_model.infer as infer

    model = load_checkpoint_model(ckpt)
    real = infer.super_resolve

    def fails_on_wide(error):
        def run(model, lr, a, **kw):
            if lr.shape[-1] > 30:
                raise error
            return real(model, lr, a, **kw)
        return run

    image = np.random.default_rng(0).random((20, 40, 3), dtype=np.float32)
    for error in (RuntimeError(CPU_OOM), torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate"),
                  MemoryError()):
        monkeypatch.setattr(infer, "_tiles", lambda run, lr, *args, error=error: (_ for _ in ()).throw(error))
        with pytest.raises(infer.DASRError) as caught:
            upscale(model, image, tile=128)
        assert str(caught.value) == "out of memory on cpu upscaling a 40x20 px image in LR tiles of 128 px: use a " \
                                    "smaller --tile"
        assert caught.value.__context__ is None  # raised past the except block: the failed call's frames are gone
    with pytest.raises(infer.DASRError, match=r"image whole \(--tile 0\): use --tile$"):
        upscale(model, image, tile=None)
    monkeypatch.setattr(infer, "_tiles", lambda *args: (_ for _ in ()).throw(RuntimeError("a shape bug")))
    with pytest.raises(RuntimeError, match="a shape bug"):  # not an allocation failure: as it was
        upscale(model, image)
    monkeypatch.undo()

    src = tmp_path / "in"
    src.mkdir()
    for name, width in (("a", 24), ("b", 40), ("c", 24)):
        cv2.imwrite(str(src / f"{name}.png"), np.random.default_rng(1).integers(0, 255, (20, width, 3), np.uint8))
    real_tiles = infer._tiles

    def tiles(run, lr, *args):
        if lr.shape[-1] > 30:
            raise RuntimeError(CPU_OOM)
        return real_tiles(run, lr, *args)

    monkeypatch.setattr(infer, "_tiles", tiles)
    result = CliRunner().invoke(sr_main, [str(src), "-o", str(tmp_path / "out"), "--model", str(ckpt),
                                          "--device", "cpu", "--write-threads", "0"])
    text = " ".join(result.output.split())
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), text
    assert f"skipped {src / 'b.png'}: out of memory on cpu upscaling a 40x20 px image in LR tiles of 512 px" in text
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a_x4.png", "c_x4.png"]
    monkeypatch.undo()
    real_finish = infer.finish  # the output --outscale makes, on a writer thread: that image's too

    def finish(sr, alpha, outscale):
        if sr.shape[1] > 120:
            raise MemoryError
        return real_finish(sr, alpha, outscale)

    monkeypatch.setattr(infer, "finish", finish)
    result = CliRunner().invoke(sr_main, [str(src), "-o", str(tmp_path / "out2"), "--model", str(ckpt),
                                          "--device", "cpu", "--write-threads", "2"])
    text = " ".join(result.output.split())
    assert result.exit_code == 1 and f"skipped {src / 'b.png'}: out of memory making its x4 output" in text, text
    assert sorted(p.name for p in (tmp_path / "out2").iterdir()) == ["a_x4.png", "c_x4.png"]
    monkeypatch.undo()

    monkeypatch.setattr(evaluate_module, "super_resolve", fails_on_wide(RuntimeError(CPU_OOM)))
    lr_dir, hr_dir = tmp_path / "lr", tmp_path / "hr"
    lr_dir.mkdir(), hr_dir.mkdir()
    for name, width in (("a", 24), ("b", 40)):
        rng = np.random.default_rng(2)
        cv2.imwrite(str(lr_dir / f"{name}.png"), rng.integers(0, 255, (20, width, 3), np.uint8))
        cv2.imwrite(str(hr_dir / f"{name}.png"), rng.integers(0, 255, (80, 4 * width, 3), np.uint8))
    result = CliRunner().invoke(eval_main, ["--model", str(ckpt), "--device", "cpu", "--lr-dir", str(lr_dir),
                                            "--hr-dir", str(hr_dir), "--tile", "0"])
    text = " ".join(result.output.split())
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), text
    assert "Error: out of memory on cpu scoring b (40x20 px LR) for the whole image at once (--tile lowers " in text


def test_sr_cli_does_not_feed_its_own_outputs_back(ckpt, tmp_path):
    """OUT_DIR inside (or equal to) an input folder: a second run finds NAME_x4.png there but does not
    upscale it again; a NAME_x4.png given by name is still taken."""
    for case in ("same", "inside"):
        src = tmp_path / case
        src.mkdir()
        cv2.imwrite(str(src / "a.png"), np.zeros((8, 8, 3), np.uint8))
        out = src if case == "same" else src / "sr"
        for _ in range(2):
            result = CliRunner().invoke(sr_main, [str(src), "-o", str(out), "--model", str(ckpt), "--device", "cpu"])
            assert result.exit_code == 0, result.output
        assert sorted(p.relative_to(src).as_posix() for p in src.rglob("*.png")) == (
            ["a.png", "a_x4.png"] if case == "same" else ["a.png", "sr/a_x4.png"])
    same = tmp_path / "same"
    named = CliRunner().invoke(sr_main, [str(same / "a_x4.png"), "-o", str(same), "--model", str(ckpt), "--device",
                                         "cpu"])
    assert named.exit_code == 0 and (same / "a_x4_x4.png").exists()


@pytest.mark.parametrize("args,message", [
    (["x.png", "-o", "out", "--model", "{ckpt}", "--tile", "8"], "at least 64 LR px"),
    (["x.png", "-o", "out", "--model", "{ckpt}", "--mix", "1,0", "--set", "noise1.strength=5"], "give one of them"),
    (["x.png", "-o", "out", "--model", "missing.pt"], "no such"),
    (["notes.txt", "-o", "out", "--model", "{ckpt}"], "not a readable image"),
    (["x.png", "-o", "out", "--model", "{ckpt}", "--set", "bogus.field=1"], "unknown field"),
    (["x.png", "-o", "out", "--model", "{ckpt}", "--set", "noformat"], "NAME=VALUE"),
    (["x.png", "-o", "out", "--model", "{ckpt}", "--mix", "1,2,3"], "--mix needs 2"),
    (["x.png", "-o", "out", "--model", "notes.txt"], "neither a model file (dasr-train's or dasr-export's "),
])
def test_sr_bad_input_is_one_line(ckpt, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    cv2.imwrite("x.png", np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "notes.txt").write_text("not an image")
    result = CliRunner().invoke(sr_main, [a.replace("{ckpt}", str(ckpt)) for a in args] + ["--device", "cpu"])
    assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output


def _real_pairs(tmp_path, names: dict[str, tuple[str, str]]):
    """LR/HR folders of bundled-photo crops under the given (LR name, HR name) per pair; each HR is
    3 px wider and 2 px taller than 4x its LR (mod-crop leftovers), the LR a level-2 degradation of it."""
    lr_dir, hr_dir = tmp_path / "lr", tmp_path / "hr"
    lr_dir.mkdir()
    hr_dir.mkdir()
    truth = {}
    for i, (key, (lr_name, hr_name)) in enumerate(names.items()):
        hr = degrade.read_image(degrade.sample_images()[i])[:98, :135]
        lr = degrade.apply(hr[:96, :132], degrade.sample_params(2, np.random.default_rng(i)))
        degrade.write_image(lr_dir / lr_name, lr)
        degrade.write_image(hr_dir / hr_name, hr)
        truth[key] = (degrade.read_image(lr_dir / lr_name), np.round(hr[:96, :132] * 255) / 255)
    return lr_dir, hr_dir, truth


def test_eval_on_given_lr_hr_pairs_equals_an_independent_computation(ckpt, tmp_path):
    """Pairs match by name without a scale/role tag (DIV2K's x4, RealSR's _LR4 / _HR); each HR is cropped
    to 4x its LR. Oracle: the whole-image model output and the Y PSNR formula, per pair."""
    lr_dir, hr_dir, truth = _real_pairs(tmp_path, {"a": ("0801x4.png", "0801.png"),
                                                   "b": ("Canon_001_LR4.png", "Canon_001_HR.png")})
    res = CliRunner().invoke(eval_main, ["--model", str(ckpt), "--lr-dir", str(lr_dir), "--hr-dir", str(hr_dir),
                                         "--json", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    model = load_checkpoint_model(ckpt)
    ours = []
    with torch.no_grad():
        for lr, hr in truth.values():
            sr = model(torch.from_numpy(lr.transpose(2, 0, 1).copy())[None])[0].clamp(0, 1).permute(1, 2, 0).numpy()
            y_sr = 16 + (np.round(sr * 255) @ np.array([65.481, 128.553, 24.966])) / 255
            y_hr = 16 + (np.round(hr * 255) @ np.array([65.481, 128.553, 24.966])) / 255
            ours.append(10 * np.log10(255**2 / np.mean((y_sr[4:-4, 4:-4] - y_hr[4:-4, 4:-4]) ** 2)))
    assert set(data["levels"]) == {"0"} and data["levels"]["0"]["images"] == 2
    assert data["levels"]["0"]["psnr_y"] == pytest.approx(np.mean(ours), abs=1e-6)
    assert data["mae"] == {}
    table = CliRunner().invoke(eval_main, ["--model", str(ckpt), "--lr-dir", str(lr_dir), "--hr-dir", str(hr_dir),
                                           "--device", "cpu"])
    assert table.exit_code == 0 and "predictor MAE: none (the pairs carry no true v)" in table.stdout
    assert "│ given │" in table.stdout and "given images mean a:" in table.stdout  # not "level 0"


@pytest.mark.parametrize("lr_name,hr_name", [("box2x4.png", "box2.png"), ("tile_1920x1080.png", "tile_1920x1080.png"),
                                             ("0801x4m.png", "0801.png"), ("scene_x4.jpg", "scene_x1.png"),
                                             ("sub/Canon_001_LR4.png", "sub/Canon_001_HR.png"),
                                             ("fox2.png", "fox2_HR.png")])
def test_lr_hr_names_pair_by_the_first_rule_that_finds_one_partner(tmp_path, lr_name, hr_name):
    """The same name, else the LR's name without its tag, else both without (a name ending in x + digits,
    such as box2 or tile_1920x1080, is not cut where it pairs as it is; x + digits after a letter, as in fox2,
    is no tag: fox2.png once lost "x2" and found no partner, or the wrong one, fo.png; for Set5's babyx4.png
    see the next test)."""
    from dasr_model.evaluate import match_pairs

    files = {}
    for side, name in (("lr", lr_name), ("hr", hr_name), ("hr", "box.png"), ("lr", "box_x4.png")):
        (tmp_path / side / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / side / name).touch()
        files.setdefault(side, []).append(tmp_path / side / name)
    pairs = match_pairs(files["lr"], tmp_path / "lr", files["hr"], tmp_path / "hr")
    assert {(lr.name, hr.name) for lr, hr in pairs} == {(Path(lr_name).name, Path(hr_name).name),
                                                        ("box_x4.png", "box.png")}


def test_an_x_tag_after_a_letter_is_a_tag_only_where_every_lr_name_ends_in_it(tmp_path):
    """Set5's babyx4/birdx4 pair with baby/bird (every LR ends in x4); a fox2.png among other names is a
    word, and with its own HR missing it has no partner rather than the HR named fo."""
    from dasr_model.errors import DASRError
    from dasr_model.evaluate import match_pairs

    def pair(lrs, hrs):
        import shutil

        for side, names in (("lr", lrs), ("hr", hrs)):
            for n in names:
                (tmp_path / side / n).parent.mkdir(parents=True, exist_ok=True)
                (tmp_path / side / n).touch()
        try:
            return sorted((a.name, b.name) for a, b in match_pairs([tmp_path / "lr" / n for n in lrs], tmp_path / "lr",
                                                                  [tmp_path / "hr" / n for n in hrs], tmp_path / "hr"))
        finally:
            for side in ("lr", "hr"):
                shutil.rmtree(tmp_path / side)

    assert pair(["babyx4.png", "birdx4.png"], ["baby.png", "bird.png"]) == [("babyx4.png", "baby.png"),
                                                                             ("birdx4.png", "bird.png")]
    assert pair(["babyx4.png", "birdx4.png", "head.png"], ["baby.png", "bird.png", "head.png"])[0] == (
        "babyx4.png", "baby.png")  # two names share x4: a tag, beside an untagged one
    assert pair(["Set5/babyx4.png", "RealSR/Canon_001_LR4.png"], ["Set5/baby.png", "RealSR/Canon_001_HR.png"]) == [
        ("Canon_001_LR4.png", "Canon_001_HR.png"), ("babyx4.png", "baby.png")]  # each folder its own way
    assert pair(["zebrax4.png", "baboonx4.png", "ppt3x4.png"], ["zebra_HR.png", "baboon.png", "ppt3.png"]) == [
        ("baboonx4.png", "baboon.png"), ("ppt3x4.png", "ppt3.png"), ("zebrax4.png", "zebra_HR.png")]  # Set14
    with pytest.raises(DASRError, match="fox2.png: no HR partner"):
        pair(["fox2.png", "owl_x4.png"], ["fo.png", "owl.png"])
    with pytest.raises(DASRError, match="fox2.png: no HR partner"):  # owl_x2's tag is PAIR_TAG's: no company
        pair(["fox2.png", "owl_x2.png", "0801x2.png", "cat.png"], ["fo.png", "owl.png", "0801.png", "cat.png"])


@pytest.mark.parametrize("lrs,hrs", [
    (["babyx4.png", "0801x4.png"], ["baby.png", "0801.png"]),  # after a digit: PAIR_TAG's tag, the same x4
    (["babyx4.png", "comic_x4.png", "img_x4.png"], ["baby.png", "comic.png", "img.png"]),  # after a separator
])
def test_an_x_tag_after_a_letter_is_a_tag_where_every_lr_name_ends_in_it_whatever_precedes_it(tmp_path, lrs, hrs):
    """"All of them" counts every LR name that ends in the x + digits, not only those after a letter: babyx4
    beside 0801x4 or comic_x4 pairs with baby (it had no partner once PAIR_TAG's names stopped counting)."""
    from dasr_model.evaluate import match_pairs

    for side, names in (("lr", lrs), ("hr", hrs)):
        (tmp_path / side).mkdir()
        for n in names:
            (tmp_path / side / n).touch()
    pairs = match_pairs([tmp_path / "lr" / n for n in lrs], tmp_path / "lr", [tmp_path / "hr" / n for n in hrs],
                        tmp_path / "hr")
    assert sorted((a.name, b.name) for a, b in pairs) == sorted(zip(lrs, hrs))


@pytest.mark.parametrize("case,message", [
    ("unpaired", "1 HR image(s) without an LR partner, e.g. "),
    ("twice", "two LR images pair with "),
    ("ambiguous", "pairs with 2 HR images"),
    ("same name", "two HR images of one name"),
    ("size", "is not 4x its LR"),
])
def test_eval_refuses_lr_hr_folders_that_do_not_pair(ckpt, tmp_path, case, message):
    lr_dir, hr_dir, _ = _real_pairs(tmp_path, {"a": ("a_x4.png", "a.png"), "b": ("b.png", "b_HR.png")})
    if case == "unpaired":
        (lr_dir / "b.png").unlink()
    elif case == "twice":
        (lr_dir / "a_LR.png").write_bytes((lr_dir / "a_x4.png").read_bytes())
    elif case == "same name":
        cv2.imwrite(str(hr_dir / "a.jpg"), np.zeros((8, 8, 3), np.uint8))
    elif case == "ambiguous":  # b.png pairs by name with neither b_HR.png nor b_x1.png, and with both untagged
        (hr_dir / "b_x1.png").write_bytes((hr_dir / "b_HR.png").read_bytes())
    else:
        degrade.write_image(hr_dir / "b_HR.png", np.zeros((100, 135, 3), np.float32))  # 4 px too tall
    res = CliRunner().invoke(eval_main, ["--model", str(ckpt), "--lr-dir", str(lr_dir), "--hr-dir", str(hr_dir),
                                         "--device", "cpu"])
    assert res.exit_code == 1 and message in res.output and "Traceback" not in res.output, res.output


@pytest.mark.parametrize("extra,message", [([], "--lr-dir alone has nothing to compare with"),
                                           (["--hr-dir", "H", "--seed", "3"], "--seed chooses how --hr-dir")])
def test_eval_lr_dir_options_that_cannot_apply_are_usage_errors(ckpt, tmp_path, extra, message):
    (tmp_path / "H").mkdir()
    res = CliRunner().invoke(eval_main, ["--model", str(ckpt), "--lr-dir", str(tmp_path), "--device", "cpu",
                                         *[str(tmp_path / x) if x == "H" else x for x in extra]])
    assert res.exit_code == 2 and message in res.output, res.output


def _sr(ckpt, src, out, *extra):
    res = CliRunner().invoke(sr_main, [str(src), "-o", str(out), "--model", str(ckpt), "--device", "cpu", *extra])
    assert res.exit_code == 0, res.output
    return res


def test_sr_keeps_an_alpha_channel_upscaled_bicubic(ckpt, tmp_path):
    """Oracle: the RGB is what the same image without alpha gives; the alpha is torch's bicubic x4 (the same
    a = -0.75 kernel, edge pixels repeated) of the input's, to one level."""
    rng = np.random.default_rng(5)
    rgb = (degrade.read_image(degrade.sample_images()[2])[:30, :44] * 255).round().astype(np.uint8)
    yy, xx = np.mgrid[:30, :44]
    alpha = np.clip(xx * 6 + rng.integers(0, 20, (30, 44)), 0, 255).astype(np.uint8)
    (tmp_path / "in").mkdir()
    cv2.imwrite(str(tmp_path / "in" / "a.png"), np.dstack([rgb[..., ::-1], alpha]))
    cv2.imwrite(str(tmp_path / "plain.png"), rgb[..., ::-1])
    _sr(ckpt, tmp_path / "in" / "a.png", tmp_path / "out")
    _sr(ckpt, tmp_path / "plain.png", tmp_path / "ref")
    got = cv2.imread(str(tmp_path / "out" / "a_x4.png"), cv2.IMREAD_UNCHANGED)
    assert got.shape == (120, 176, 4)
    np.testing.assert_array_equal(got[..., :3], cv2.imread(str(tmp_path / "ref" / "plain_x4.png")))
    t = torch.from_numpy(alpha.astype(np.float64))[None, None]
    expected = torch.nn.functional.interpolate(t, scale_factor=4, mode="bicubic", align_corners=False)
    expected = expected[0, 0].clamp(0, 255).round().numpy()
    assert np.abs(got[..., 3].astype(float) - expected).max() <= 1


def test_sr_outscale_resizes_the_x4_result_and_names_it(ckpt, tmp_path):
    """Oracle for x2: INTER_AREA at a factor of 2 is the mean of each 2x2 block of the x4 output."""
    src = tmp_path / "a.png"
    cv2.imwrite(str(src), (degrade.read_image(degrade.sample_images()[0])[:25, :33, ::-1] * 255).round()
                .astype(np.uint8))
    _sr(ckpt, src, tmp_path / "x4")
    x4 = cv2.imread(str(tmp_path / "x4" / "a_x4.png")).astype(float)
    _sr(ckpt, src, tmp_path / "x2", "--outscale", "2")
    x2 = cv2.imread(str(tmp_path / "x2" / "a_x2.png")).astype(float)
    assert x2.shape == (50, 66, 3)
    blocks = x4.reshape(50, 2, 66, 2, 3).mean((1, 3))
    assert np.abs(x2 - blocks).max() <= 1
    _sr(ckpt, src, tmp_path / "x2", "--outscale", "2.5")
    assert cv2.imread(str(tmp_path / "x2" / "a_x2.5.png")).shape == (63, 83, 3)  # 62.5, 82.5: halves round up
    res = CliRunner().invoke(sr_main, [str(tmp_path / "x2"), "-o", str(tmp_path / "x2"), "--model", str(ckpt),
                                       "--device", "cpu"])  # its own outputs, at any scale, are not fed back in
    assert res.exit_code == 1 and "no input images besides this tool's own outputs" in res.output
    assert sorted(p.name for p in (tmp_path / "x2").iterdir()) == ["a_x2.5.png", "a_x2.png"]
    src7 = tmp_path / "b.png"
    cv2.imwrite(str(src7), np.zeros((5, 7, 3), np.uint8))
    _sr(ckpt, src7, tmp_path / "x2", "--outscale", "2.5")  # 17.5 and 12.5 px: halves round up
    assert cv2.imread(str(tmp_path / "x2" / "b_x2.5.png")).shape == (13, 18, 3)
    res = CliRunner().invoke(sr_main, [str(src7), "-o", str(tmp_path / "n"), "--model", str(ckpt), "--outscale",
                                       "nan"])
    assert res.exit_code == 2 and "not a number from 1 to 16" in res.output


def test_sr_outscale_beyond_the_pixel_cap_is_refused_before_the_work(ckpt, tmp_path, monkeypatch):
    from degrade.io import MAX_PIXELS_ENV

    monkeypatch.setenv(MAX_PIXELS_ENV, "400")  # --max-pixels sets it for the process: put back afterwards
    src = tmp_path / "a.png"
    cv2.imwrite(str(src), np.zeros((20, 20, 3), np.uint8))
    args = [str(src), "-o", str(tmp_path / "o"), "--model", str(ckpt), "--device", "cpu", "--max-pixels", "400"]
    res = CliRunner().invoke(sr_main, [*args, "--outscale", "16"])
    assert res.exit_code == 1 and "x16 of 20x20 px is 320x320 px, above 16 x the 0.0004 MP input limit" in res.output
    assert "Traceback" not in res.output
    assert CliRunner().invoke(sr_main, [*args, "--outscale", "4"]).exit_code == 0  # x4 of the largest input: fine


def test_alpha_is_read_where_the_file_has_one(tmp_path):
    from degrade.io import read_image_alpha

    rng = np.random.default_rng(1)
    bgra = rng.integers(0, 256, (9, 11, 4), np.uint8)
    for name, data in (("a.png", bgra), ("a16.png", bgra.astype(np.uint16) * 257), ("a.webp", bgra)):
        cv2.imwrite(str(tmp_path / name), data, [cv2.IMWRITE_WEBP_QUALITY, 101] if name.endswith("webp") else [])
        rgb, alpha = read_image_alpha(tmp_path / name)
        np.testing.assert_array_equal(alpha, bgra[..., 3])
        np.testing.assert_allclose(rgb, bgra[..., 2::-1] / 255, atol=1e-6)
    for name in ("b.png", "b.jpg"):
        cv2.imwrite(str(tmp_path / name), bgra[..., :3])
        assert read_image_alpha(tmp_path / name)[1] is None


def _png_with_chunk(bgr_or_bgra: np.ndarray, kind: bytes, data: bytes) -> bytes:
    """A PNG of the image with one more chunk before its first IDAT."""
    import struct
    import zlib

    png = cv2.imencode(".png", bgr_or_bgra)[1].tobytes()
    at = png.index(b"IDAT") - 4
    chunk = struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return png[:at] + chunk + png[at:]


@pytest.mark.parametrize("orientation", [1, 2, 3, 6, 8])
def test_alpha_is_turned_with_an_exif_orientation(tmp_path, orientation):
    """OpenCV turns the colour by a PNG's eXIf orientation but reads alpha without it. Oracle: the alpha is
    the red channel, so wherever the colour lands the alpha must equal it there."""
    import struct

    from degrade.io import read_image_alpha

    bgr = np.random.default_rng(orientation).integers(0, 256, (10, 16, 3), np.uint8)
    exif = b"MM\x00*" + struct.pack(">IH", 8, 1) + struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0) + bytes(4)
    (tmp_path / "a.png").write_bytes(_png_with_chunk(np.dstack([bgr, bgr[..., 2]]), b"eXIf", exif))
    rgb, alpha = read_image_alpha(tmp_path / "a.png")
    assert rgb.shape == ((16, 10, 3) if orientation in (6, 8) else (10, 16, 3))
    np.testing.assert_array_equal(alpha, np.round(rgb[..., 0] * 255))


@pytest.mark.parametrize("orientation", [2, 3, 5, 6, 7])
def test_the_alpha_of_a_one_colour_logo_follows_the_exif_orientation(tmp_path, orientation):
    """A solid colour looks the same under every turn: only the orientation tag can say how to turn the alpha.
    Oracle: OpenCV's own oriented decode of a PNG whose colour is that alpha, with the same tag."""
    import struct

    from degrade.io import read_image_alpha

    alpha = np.zeros((10, 16), np.uint8)
    alpha[:, :3] = 255  # a strip down one side
    alpha[:2, :] = 128  # and one along the top: every turn moves it somewhere else
    exif = b"MM\x00*" + struct.pack(">IH", 8, 1) + struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0) + bytes(4)
    (tmp_path / "logo.png").write_bytes(_png_with_chunk(np.dstack([np.full((10, 16, 3), 255, np.uint8), alpha]),
                                                        b"eXIf", exif))
    (tmp_path / "oracle.png").write_bytes(_png_with_chunk(np.repeat(alpha[..., None], 3, 2), b"eXIf", exif))
    expected = cv2.imread(str(tmp_path / "oracle.png"), cv2.IMREAD_GRAYSCALE)
    np.testing.assert_array_equal(read_image_alpha(tmp_path / "logo.png")[1], expected)


def test_a_gray_png_transparency_key_and_pam_alpha_are_read(tmp_path):
    import struct

    from degrade.io import read_image_alpha

    gray = np.array([[0, 50, 50], [200, 50, 0]], np.uint8).repeat(20, 0).repeat(20, 1)
    (tmp_path / "g.png").write_bytes(_png_with_chunk(gray, b"tRNS", struct.pack(">H", 50)))  # level 50: clear
    np.testing.assert_array_equal(read_image_alpha(tmp_path / "g.png")[1], np.where(gray == 50, 0, 255))
    rgba = np.random.default_rng(2).integers(0, 256, (6, 5, 4), np.uint8)
    header = b"P7\nWIDTH 5\nHEIGHT 6\nDEPTH 4\nMAXVAL 255\nTUPLTYPE RGB_ALPHA\nENDHDR\n"
    (tmp_path / "a.pam").write_bytes(header + rgba.tobytes())
    rgb, alpha = read_image_alpha(tmp_path / "a.pam")
    np.testing.assert_array_equal(alpha, rgba[..., 3])
    np.testing.assert_allclose(rgb, rgba[..., :3] / 255, atol=1e-6)


def test_a_png_transparency_chunk_is_an_alpha_channel(tmp_path):
    import struct

    from degrade.io import read_image_alpha

    bgr = np.zeros((6, 9, 3), np.uint8)
    bgr[:, 4:] = 200
    (tmp_path / "t.png").write_bytes(_png_with_chunk(bgr, b"tRNS", struct.pack(">HHH", 0, 0, 0)))  # black: clear
    _, alpha = read_image_alpha(tmp_path / "t.png")
    np.testing.assert_array_equal(alpha, np.where(bgr[..., 0] == 0, 0, 255))


def _tiff_with_orientation(bgra: np.ndarray, orientation: int) -> bytes:
    """OpenCV's TIFF of the image with an Orientation tag added: IFD0 copied to the end with the extra entry
    (its other entries point where they did), the header pointed at it."""
    import struct

    data = bytearray(cv2.imencode(".tiff", bgra)[1].tobytes())
    order = "<" if data[:2] == b"II" else ">"
    ifd = struct.unpack(order + "I", data[4:8])[0]
    n = struct.unpack(order + "H", data[ifd:ifd + 2])[0]
    entries = [bytes(data[ifd + 2 + 12 * k:ifd + 14 + 12 * k]) for k in range(n)]
    entries.append(struct.pack(order + "HHIHH", 0x0112, 3, 1, orientation, 0))
    entries.sort(key=lambda e: struct.unpack(order + "H", e[:2])[0])
    if len(data) % 2:
        data += b"\x00"
    data[4:8] = struct.pack(order + "I", len(data))
    return bytes(data) + struct.pack(order + "H", len(entries)) + b"".join(entries) + bytes(4)


@pytest.mark.parametrize("orientation", [1, 3, 6])
def test_tiff_and_webp_alpha_line_up_with_their_colour_under_an_orientation_tag(tmp_path, orientation):
    """OpenCV's TIFF decoder turns the colour and the alpha alike; whether it turns a WebP by its EXIF
    depends on the build (probed). Oracle: the alpha equals the red channel wherever the colour lands."""
    import struct

    from degrade.io import read_image_alpha

    bgr = np.random.default_rng(orientation).integers(1, 256, (10, 16, 3), np.uint8)
    bgra = np.dstack([bgr, bgr[..., 2]])
    (tmp_path / "a.tiff").write_bytes(_tiff_with_orientation(bgra, orientation))
    exif = b"MM\x00*" + struct.pack(">IH", 8, 1) + struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0) + bytes(4)
    webp = cv2.imencode(".webp", bgra, [cv2.IMWRITE_WEBP_QUALITY, 101])[1].tobytes()
    vp8x = b"VP8X" + struct.pack("<I", 10) + bytes([0x18, 0, 0, 0]) + (15).to_bytes(3, "little") + \
        (9).to_bytes(3, "little")
    body = vp8x + webp[12:] + b"EXIF" + struct.pack("<I", len(exif)) + exif
    (tmp_path / "a.webp").write_bytes(b"RIFF" + struct.pack("<I", 4 + len(body)) + b"WEBP" + body)
    for name in ("a.tiff", "a.webp"):
        rgb, alpha = read_image_alpha(tmp_path / name)
        assert alpha is not None, name
        np.testing.assert_array_equal(alpha, np.round(rgb[..., 0] * 255), err_msg=name)


@pytest.mark.parametrize("depth", [1, 2, 4, 8])
def test_a_low_bit_gray_png_transparency_key_is_matched_after_expansion(tmp_path, depth):
    """A 1/2/4-bit gray PNG's tRNS names a level in its own depth; OpenCV expands the samples to 8 bits.
    The PNG is written here byte by byte (OpenCV writes no low-bit gray)."""
    import struct
    import zlib

    levels = np.array([[0, 1, 1, 0], [1, 0, 0, 1]], np.uint8) * ((1 << depth) - 1)  # black and white
    rows = b"".join(b"\x00" + np.packbits(np.unpackbits(r[:, None], axis=1)[:, 8 - depth:]).tobytes()
                    for r in levels)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 4, 2, depth, 0, 0, 0, 0))
           + chunk(b"tRNS", struct.pack(">H", (1 << depth) - 1)) + chunk(b"IDAT", zlib.compress(rows))
           + chunk(b"IEND", b""))
    (tmp_path / "g.png").write_bytes(png)
    from degrade.io import read_image_alpha

    rgb, alpha = read_image_alpha(tmp_path / "g.png")
    np.testing.assert_array_equal(alpha, np.where(levels == 0, 255, 0))  # white (the key) is transparent


@pytest.mark.parametrize("where", ["after IEND", "bad CRC"])
def test_an_exif_chunk_libpng_ignores_does_not_turn_the_alpha(tmp_path, where):
    """libpng reads nothing after IEND and drops a chunk whose CRC fails; the alpha must not be turned by
    such a tag either. Oracle: OpenCV's own decode of a PNG whose colour is that alpha, with the same bytes."""
    import struct
    import zlib

    from degrade.io import read_image_alpha

    alpha = np.zeros((10, 16), np.uint8)
    alpha[:, :3], alpha[:2, :] = 255, 128
    exif = b"MM\x00*" + struct.pack(">IH", 8, 1) + struct.pack(">HHIHH", 0x0112, 3, 1, 3, 0) + bytes(4)
    chunk = struct.pack(">I", len(exif)) + b"eXIf" + exif + struct.pack(">I", zlib.crc32(b"eXIf" + exif))

    def tagged(img: np.ndarray) -> bytes:
        png = cv2.imencode(".png", img)[1].tobytes()
        if where == "after IEND":
            return png + chunk
        at = png.index(b"IDAT") - 4
        return png[:at] + chunk[:-4] + bytes(4) + png[at:]

    (tmp_path / "logo.png").write_bytes(tagged(np.dstack([np.full((10, 16, 3), 255, np.uint8), alpha])))
    (tmp_path / "oracle.png").write_bytes(tagged(np.repeat(alpha[..., None], 3, 2)))
    expected = cv2.imread(str(tmp_path / "oracle.png"), cv2.IMREAD_GRAYSCALE)
    np.testing.assert_array_equal(expected, alpha)  # OpenCV did not turn it
    np.testing.assert_array_equal(read_image_alpha(tmp_path / "logo.png")[1], expected)


def test_no_model_given_is_asked_for_without_a_not_both():
    """With neither --model nor the release weights the message asked for one "not both" (fresh-user review)."""
    from dasr_model.infer import load_model

    with pytest.raises(ValueError, match=r"give a model \(--model: a file, checkpoint or run folder\) or the "
                                         r"release weights \(--release-weights G P\)$"):
        load_model()
    with pytest.raises(ValueError, match="not both$"):
        load_model("m.safetensors", ("g.pth", "p.pth"))


def test_dasr_sr_skips_an_image_it_has_no_memory_to_read_and_goes_on(ckpt, tmp_path, monkeypatch):
    """numpy's MemoryError or OpenCV's StsNoMem while reading an input was a traceback that ended the run
    (the images after it never made); now that image is skipped in one line, as one that fails upscaling."""
    import degrade.io as io

    src = tmp_path / "in"
    src.mkdir()
    for name in ("a", "b", "c"):
        cv2.imwrite(str(src / f"{name}.png"), np.random.default_rng(1).integers(0, 255, (20, 24, 3), np.uint8))
    real = io.read_image_alpha
    for error in (MemoryError(), cv2.error("Insufficient memory")):
        if isinstance(error, cv2.error):
            error.code = cv2.Error.StsNoMem

        def read(path, *args, error=error, **kwargs):
            if Path(path).name == "b.png":
                raise error
            return real(path, *args, **kwargs)

        monkeypatch.setattr(io, "read_image_alpha", read)
        out = tmp_path / f"out-{type(error).__name__}"
        result = CliRunner().invoke(sr_main, [str(src), "-o", str(out), "--model", str(ckpt), "--device", "cpu"])
        text = " ".join(result.output.split())
        assert result.exit_code == 1 and f"skipped {src / 'b.png'}: out of memory reading it" in text, text
        assert sorted(p.name for p in out.iterdir()) == ["a_x4.png", "c_x4.png"]
    monkeypatch.setattr(io, "read_image_alpha", lambda *a, **k: (_ for _ in ()).throw(cv2.error("a bug")))
    result = CliRunner().invoke(sr_main, [str(src), "-o", str(tmp_path / "o3"), "--model", str(ckpt),
                                          "--device", "cpu"])
    assert isinstance(result.exception, cv2.error)  # not an allocation failure: a bug keeps its traceback


def test_dasr_sr_stopped_by_sigterm_leaves_no_partial_file(ckpt, tmp_path):
    """SIGTERM (a scheduler, `timeout`, `docker stop`) killed dasr-sr mid-write and left its hidden
    temporary file (134 MB in a review); now it ends the run as Ctrl-C does: the file being written is
    removed, exit status 143. The signal is sent from inside the PNG write, in a child process."""
    import subprocess
    import sys

    src = tmp_path / "a.png"
    cv2.imwrite(str(src), np.random.default_rng(1).integers(0, 255, (20, 24, 3), np.uint8))
    out = tmp_path / "out"
    script = (
        "import os, signal, sys\n"
        "import degrade.io as io\n"
        "real = io.write_bytes_atomic\n"
        "def write(path, data):\n"
        "    with io.atomic_writer(path) as f:\n"
        "        f.write(data[:10])\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "        f.write(data[10:])\n"
        "io.write_bytes_atomic = write\n"
        "from cli.sr import sr_main\n"
        f"sr_main([{str(src)!r}, '-o', {str(out)!r}, '--model', {str(ckpt)!r}, '--device', 'cpu',"
        " '--write-threads', '0'])\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 143, done.stderr
    assert out.is_dir() and list(out.iterdir()) == []  # no a_x4.png, no .a_x4.png.XXXXXXXX.tmp


def test_upscale_refuses_a_model_elsewhere_and_an_image_it_would_get_wrong():
    """From Python: a model on another device than `device` was torch's device-mismatch error (the docs'
    own GPU example did that: load_model gives the model on the CPU); a 0-255 float image came out all
    white, a uint8 or gray one was a torch error. Each is a one-line DASRError now."""
    from dasr_model.errors import DASRError

    torch.manual_seed(0)
    model = DASR(TINY).eval()
    image = np.random.default_rng(0).random((8, 8, 3), dtype=np.float32)
    with pytest.raises(DASRError, match=r"the model is on cpu and device is meta: move the model first "
                                        r"\(model.to\('meta'\)"):
        upscale(model, image, device="meta")
    for bad, why in ((image * 255, "values from .* to 2[0-9.]+ \\(divide 8-bit values by 255\\)"),
                     ((image * 255).astype(np.uint8), "float32 array in \\[0, 1\\].*got uint8"),
                     (image[..., 0], "got float32 \\(8, 8\\)"), (image.astype(np.float64), "got float64"),
                     (np.full((8, 8, 3), np.nan, np.float32), "values from nan")):
        with pytest.raises(DASRError, match=why):
            upscale(model, bad)
    for bad in (image.tolist(), image[0, 0], np.float32(0.5)):  # read for its shape first: Python errors
        with pytest.raises(DASRError, match="an image must be an \\(H, W, 3\\) float32 array"):
            upscale(model, bad)
    sr, _ = upscale(model, image)
    assert sr.shape == (32, 32, 3) and sr.dtype == np.uint8


def test_outputs_too_wide_for_png_and_names_near_the_limit(ckpt, tmp_path):
    """A PNG side is at most 1,000,000 px (libpng): a 2 x 260,000 input was upscaled and then failed with
    libpng's own lines; it is refused before the work now. And an output name of 242-255 bytes could not be
    written, its temporary name being 14 bytes longer: the temporary name is cut to fit."""
    from dasr_model.errors import DASRError
    from dasr_model.infer import output_size

    with pytest.raises(DASRError, match="is 1000004x8 px: a PNG side can be at most 1,000,000 px"):
        output_size(2, 250_001, 4.0)
    assert output_size(2, 250_000, 4.0) == (1_000_000, 8)
    with pytest.raises(DASRError, match="a PNG side can be at most"):
        output_size(62_501, 2, 16.0)
    src = tmp_path / "in"
    src.mkdir()
    name = "a" * (255 - len("_x4.png"))  # the output's name: 255 bytes
    cv2.imwrite(str(src / f"{name}.png"), np.zeros((8, 8, 3), np.uint8))
    result = CliRunner().invoke(sr_main, [str(src), "-o", str(tmp_path / "out"), "--model", str(ckpt),
                                          "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert [p.name for p in (tmp_path / "out").iterdir()] == [f"{name}_x4.png"]


def test_a_file_named_twice_is_upscaled_once(ckpt, tmp_path, monkeypatch):
    """`dasr-sr a.png a.png` upscaled and wrote it twice ("wrote 2 image(s)"); `a.png ./a.png` was refused
    as two inputs of one output name. A link keeps an output of its own."""
    monkeypatch.chdir(tmp_path)
    cv2.imwrite("a.png", np.zeros((8, 8, 3), np.uint8))
    Path("b.png").symlink_to("a.png")
    result = CliRunner().invoke(sr_main, ["a.png", "./a.png", str(tmp_path / "a.png"), ".", "-o", "out",
                                          "--model", str(ckpt), "--device", "cpu"])
    assert result.exit_code == 0 and "wrote 2 image(s)" in result.output, result.output
    assert sorted(p.name for p in Path("out").iterdir()) == ["a_x4.png", "b_x4.png"]


def test_dasr_eval_refuses_a_csv_it_could_not_write_and_two_sources_before_any_work(ckpt, tmp_path, monkeypatch):
    """--per-image in a read-only folder ran the whole evaluation, then lost it: now refused first. Two data
    sources were told 'give --shards, --hr-dir, --lr-dir or --testset', as if none were given."""
    import errno

    import dasr_model.evaluate as evaluate_module

    (tmp_path / "ro").mkdir()
    refuse_files_in(monkeypatch, tmp_path / "ro", OSError(errno.EROFS, "Read-only file system"))
    monkeypatch.setattr(evaluate_module, "evaluate_pairs", lambda *a, **k: pytest.fail("evaluated"))
    shards = make_small_dataset(tmp_path / "ds", count=2, seed=0, shard_size=2)
    result = CliRunner().invoke(eval_main, ["--model", str(ckpt), "--shards", shards, "--device", "cpu",
                                            "--per-image", str(tmp_path / "ro" / "x.csv")])
    assert result.exit_code == 1 and "ro/x.csv: Read-only file system" in result.output, result.output
    result = CliRunner().invoke(eval_main, ["--model", str(ckpt), "--shards", shards, "--hr-dir", str(tmp_path)])
    assert result.exit_code == 2 and "one of them (--hr-dir with --lr-dir: given pairs)" in result.output
    result = CliRunner().invoke(eval_main, ["--model", str(ckpt)])
    assert result.exit_code == 2 and "give --shards, --hr-dir, --lr-dir or --testset\n" in result.output


def test_dasr_sr_shows_a_name_with_control_characters_escaped_once(ckpt, tmp_path):
    """dasr-sr's skip line printed a name's escape sequence raw (a second review: `esc^[[31mred.png` reached
    the terminal), and a name with a newline twice. Names are shown escaped, once."""
    src = tmp_path / "in"
    src.mkdir()
    cv2.imwrite(str(src / "a.png"), np.random.default_rng(1).integers(0, 255, (20, 24, 3), dtype=np.uint8))
    (src / "esc\x1b[31mred.png").write_bytes(b"not a png")
    (src / "two\nlines.png").write_bytes(b"not a png")
    result = CliRunner().invoke(sr_main, [str(src), "-o", str(tmp_path / "out"), "--model", str(ckpt), "--device",
                                          "cpu"])
    assert "\x1b" not in result.output and "\nlines.png" not in result.output, result.output
    for name in ("esc\\x1b[31mred.png", "two\\nlines.png"):
        lines = [line for line in result.output.splitlines() if line.startswith("skipped") and name in line]
        assert len(lines) == 1 and lines[0].count("red.png" if "red" in name else "lines.png") == 1, result.output
