"""LPIPS (dasr_model.lpips) against the reference `lpips` package, its invariants, the weight files it reads
(and the VGG19 file the trainer reads the same way), and dasr-eval's LPIPS columns."""

from __future__ import annotations

import json
import pickle
import re
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import cv2  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from cli.sr import eval_main  # noqa: E402
from dasr_model.errors import DASRError  # noqa: E402
from dasr_model.lpips import LPIPS, MIN_SIDE  # noqa: E402

from .lpips_golden import GOLDEN, image_pairs, make_weights  # noqa: E402


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return make_weights(tmp_path_factory.mktemp("lpips"))


def _t(img: np.ndarray):
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))[None]


def test_distances_equal_the_reference_package(weights):
    """Oracle: the `lpips` package (0.1.4) on torchvision's AlexNet with the same weights and images
    (tests/lpips_golden.py prints these numbers); float32 on CPU agrees to about 1e-7 relative."""
    model = LPIPS(*weights)
    pairs = image_pairs()
    assert set(pairs) == set(GOLDEN)
    for name, (a, b) in pairs.items():
        assert float(model(_t(a), _t(b))[0]) == pytest.approx(GOLDEN[name], rel=1e-5), name


def test_a_distance_is_zero_to_itself_symmetric_and_per_image(weights):
    model = LPIPS(*weights)
    (a, b), (_, c) = image_pairs()["noisy"], image_pairs()["other crop"]
    assert float(model(_t(a), _t(a))[0]) == 0.0
    ab, ba = float(model(_t(a), _t(b))[0]), float(model(_t(b), _t(a))[0])
    assert ab > 0 and ab == pytest.approx(ba, rel=1e-6)
    batch = model(torch.cat([_t(a), _t(a)]), torch.cat([_t(b), _t(c)]))  # each image of a batch on its own
    torch.testing.assert_close(batch, torch.stack([model(_t(a), _t(b))[0], model(_t(a), _t(c))[0]]))


def test_zip_files_and_wrapped_state_dicts_read_like_the_legacy_ones(weights, tmp_path):
    """The published files use the pre-1.6 format; a re-saved (zip) copy, or {"state_dict": ...}, is the same."""
    alexnet, lin = (torch.load(p, weights_only=True) for p in weights)
    torch.save({"state_dict": alexnet}, tmp_path / "alexnet.pth")
    torch.save(lin, tmp_path / "lin.pth")
    a, b = (_t(x) for x in image_pairs()["blurred"])
    assert torch.equal(LPIPS(tmp_path / "alexnet.pth", tmp_path / "lin.pth")(a, b), LPIPS(*weights)(a, b))


def _edit(path, out, change):
    state = torch.load(path, weights_only=True)
    change(state)
    torch.save(state, out, _use_new_zipfile_serialization=False)
    return out


@pytest.mark.parametrize("which,change,message", [
    (0, lambda s: s.pop("features.8.weight"), "no tensor 'features.8.weight'"),
    (0, lambda s: s.update({"features.0.weight": torch.zeros(64, 3, 7, 7)}), "is (64, 3, 7, 7), not (64, 3, 11, 11)"),
    (0, lambda s: s["features.3.bias"].__setitem__(5, float("nan")), "holds NaN or infinite values"),
    (1, lambda s: s.update({"lin2.model.1.weight": torch.zeros(1, 256, 1, 1)}), "not (1, 384, 1, 1)"),
    (1, lambda s: s.update({"lin0.model.1.weight": torch.zeros(1, 64, 1, 1, dtype=torch.int64)}), "no tensor"),
])
def test_wrong_weight_files_are_refused_by_name(weights, tmp_path, which, change, message):
    files = list(weights)
    files[which] = _edit(files[which], tmp_path / "bad.pth", change)
    with pytest.raises(DASRError, match=re.escape(message)) as err:
        LPIPS(*files)
    assert str(tmp_path / "bad.pth") in str(err.value) and "\n" not in str(err.value)


def test_the_two_files_swapped_or_not_torch_files_are_refused(weights, tmp_path):
    with pytest.raises(DASRError, match="AlexNet weights file: no tensor 'features.0.weight'"):
        LPIPS(weights[1], weights[0])
    (tmp_path / "x.pth").write_bytes(b"\x80\x02not a torch file")
    with pytest.raises(DASRError, match="not a torch.save file"):
        LPIPS(tmp_path / "x.pth", weights[1])
    with pytest.raises(OSError):
        LPIPS(tmp_path / "missing.pth", weights[1])


def test_a_legacy_file_claiming_a_huge_tensor_is_refused_without_allocating_it(tmp_path):
    """A pre-1.6 file's pickle claims each storage's size; torch checks it against the bytes that follow.
    Oracle: a 3-float file edited to claim 2**31 - 1 floats (8 GiB) is refused at once."""
    path = tmp_path / "w.pth"
    torch.save({"w": torch.ones(3)}, path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    claim = data.index(b"K\x03N")  # BININT1 3 (the storage's element count), then NONE (no view)
    path.write_bytes(data[:claim] + b"J" + (2**31 - 1).to_bytes(4, "little") + data[claim + 2:])
    from dasr_model.checkpoints import load_torch_file

    start = time.perf_counter()
    # torch 2.11 and 2.13 read the pickle and find the storage short; torch 2.1.2's weights-only reader
    # refuses the edited pickle itself
    with pytest.raises(DASRError, match="damaged or truncated|weights-only reader refused"):
        load_torch_file(path, "weights file", legacy=True)
    assert time.perf_counter() - start < 5  # a real 8 GiB fill would take far longer (not a speed test)
    with pytest.raises(DASRError, match="not a torch.save file"):  # only where a caller accepts the format
        load_torch_file(path, "checkpoint")


class _Bomb:
    """Pickles as bytearray(n): torch's weights-only reader allows the call, which fills n bytes."""

    def __init__(self, n: int):
        self.n = n

    def __reduce__(self):
        return bytearray, (self.n,)


@pytest.mark.parametrize("legacy", [True, False])
def test_a_file_that_calls_an_allocator_is_refused_before_torch_load_runs(tmp_path, legacy):
    """Oracle: torch.load(weights_only=True) itself returns the bytearray of such a file (so a 2 GiB one would
    fill 2 GiB from a few hundred bytes); ours refuses it from its pickle's opcodes, at once."""
    from dasr_model.checkpoints import load_torch_file

    small, big = tmp_path / "small.pth", tmp_path / "big.pth"
    for path, n in ((small, 1000), (big, 2**31)):
        torch.save({"w": torch.ones(3), "x": _Bomb(n)}, path, _use_new_zipfile_serialization=not legacy)
    try:  # torch 2.11 and 2.13 hand it over; torch 2.1.2's weights-only reader still refused bytearray
        assert torch.load(small, weights_only=True)["x"] == bytearray(1000)
    except pickle.UnpicklingError as exc:
        assert "bytearray" in str(exc)
    start = time.perf_counter()
    with pytest.raises(DASRError, match=r"big.pth: refused: not a weights file of tensors \(it calls "
                                        r"__builtin__.bytearray\)"):
        load_torch_file(big, "weights file", legacy=True)
    assert time.perf_counter() - start < 1  # filling 2 GiB takes seconds (not a speed test)


def test_every_truncation_of_a_legacy_file_is_a_one_line_refusal(weights, tmp_path):
    """A short read inside the pickle raised struct.error out of torch's reader (a traceback)."""
    from dasr_model.checkpoints import load_torch_file

    data = weights[1].read_bytes()
    for cut in range(1, len(data), 7):
        (tmp_path / "cut.pth").write_bytes(data[:cut])
        # torch 2.1.2's weights-only reader refuses some cuts itself: another line, one line still
        with pytest.raises(DASRError, match="cut.pth: (not a readable|refused: not a weights file)"):
            load_torch_file(tmp_path / "cut.pth", "weights file", legacy=True)


def test_a_legacy_file_whose_storages_are_not_all_in_it_is_refused(tmp_path):
    """torch reads only the storages its last pickle lists; one left off would be uninitialised memory
    read as weights. Oracle: the file rebuilt with an empty list loads in torch with a tensor of 3 floats."""
    from dasr_model.checkpoints import load_torch_file

    path = tmp_path / "w.pth"
    torch.save({"w": torch.ones(3)}, path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    import io
    import pickle
    import pickletools

    stream = io.BytesIO(data)
    for _ in range(4):  # magic, protocol, system info, the object
        for _ in pickletools.genops(stream):
            pass
    (tmp_path / "gap.pth").write_bytes(data[: stream.tell()] + pickle.dumps([], protocol=2))
    assert torch.load(tmp_path / "gap.pth", weights_only=True)["w"].shape == (3,)
    with pytest.raises(DASRError, match="gap.pth: refused: its tensors claim 1 storages of 12 bytes"):
        load_torch_file(tmp_path / "gap.pth", "weights file", legacy=True)
    assert torch.equal(load_torch_file(path, "weights file", legacy=True)["w"], torch.ones(3))


def test_images_must_match_and_be_large_enough(weights):
    model = LPIPS(*weights)
    with pytest.raises(DASRError, match="one shape"):
        model(torch.zeros(1, 3, 40, 40), torch.zeros(1, 3, 40, 44))
    assert MIN_SIDE == 31  # 30 px leave 2 px before AlexNet's second pool, which needs 3
    with pytest.raises(DASRError, match="at least 31x31"):
        model(torch.zeros(1, 3, 30, 64), torch.zeros(1, 3, 30, 64))
    assert model(torch.zeros(1, 3, 31, 31), torch.ones(1, 3, 31, 31)).isfinite().all()


def test_vgg_weights_with_the_wrong_layout_are_a_one_line_refusal(tmp_path):
    from dasr_model.losses import VGGPerceptualLoss

    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, tmp_path / "vgg.pth")
    with pytest.raises(DASRError, match="VGG19 weights file: no tensor 'features.0.bias'"):
        VGGPerceptualLoss(tmp_path / "vgg.pth")


def test_dasr_eval_reports_lpips_for_the_model_and_for_bicubic(ckpt, weights, tmp_path):
    """Oracle for the bicubic column: LPIPS of the x4 bicubic upscale (torch, as dasr-eval computes it) of the
    LR dasr-eval degraded, recomputed here from the same seed."""
    import degrade
    from dasr_model.infer import to_image, to_tensor

    hr_dir = tmp_path / "hr"
    hr_dir.mkdir()
    photo = (degrade.read_image(degrade.sample_images()[1])[:96, :120] * 255).round().astype(np.uint8)
    cv2.imwrite(str(hr_dir / "x.png"), photo[..., ::-1])
    args = ["--model", str(ckpt), "--hr-dir", str(hr_dir), "--levels", "2", "--json", "--device", "cpu"]
    res = CliRunner().invoke(eval_main, [*args, "--lpips-alexnet", str(weights[0]), "--lpips-lin", str(weights[1])])
    assert res.exit_code == 0, res.output
    level = json.loads(res.stdout)["levels"]["2"]
    hr = photo.astype(np.float32) / 255
    params = degrade.sample_params(2, np.random.default_rng(np.random.SeedSequence([0, 0, 2])))
    bic = torch.nn.functional.interpolate(to_tensor(degrade.apply(hr, params)), scale_factor=4, mode="bicubic",
                                          align_corners=False)
    bic = np.round(to_image(bic) * 255) / 255
    lpips = LPIPS(*weights)
    assert level["bicubic_lpips"] == pytest.approx(float(lpips(_t(bic.astype(np.float32)), _t(hr))[0]), rel=1e-5)
    from dasr_model.infer import load_checkpoint_model

    with torch.no_grad():  # the model's column: its whole-image output on 8-bit levels (dasr-eval tiles it)
        sr = load_checkpoint_model(ckpt)(to_tensor(degrade.apply(hr, params)))
    sr = (np.round(to_image(sr) * 255) / 255).astype(np.float32)
    assert level["lpips"] == pytest.approx(float(lpips(_t(sr), _t(hr))[0]), rel=1e-4)
    assert level["lpips"] != pytest.approx(level["bicubic_lpips"], rel=1e-3)
    plain = json.loads(CliRunner().invoke(eval_main, args).stdout)["levels"]["2"]
    assert "lpips" not in plain and plain["psnr_y"] == level["psnr_y"]  # LPIPS changes nothing else
    table = CliRunner().invoke(eval_main, [*args[:-3], "--device", "cpu", "--lpips-alexnet", str(weights[0]),
                                           "--lpips-lin", str(weights[1])], terminal_width=80)
    assert table.exit_code == 0, table.output
    assert "LPIPS (lower: closer)" in table.stdout
    assert f"{level['lpips']:.4f}" in table.stdout and f"{level['bicubic_lpips']:.4f}" in table.stdout


def test_dasr_eval_needs_both_lpips_files(ckpt, weights, tmp_path):
    res = CliRunner().invoke(eval_main, ["--model", str(ckpt), "--hr-dir", str(tmp_path), "--device", "cpu",
                                         "--lpips-alexnet", str(weights[0])])
    assert res.exit_code == 2 and "LPIPS needs both --lpips-alexnet and --lpips-lin" in res.output
    res = CliRunner().invoke(eval_main, ["--model", str(ckpt), "--hr-dir", str(tmp_path), "--device", "cpu",
                                         "--lpips-alexnet", str(weights[1]), "--lpips-lin", str(weights[1])])
    assert res.exit_code == 1 and "no tensor 'features.0.weight'" in res.output and "Traceback" not in res.output
