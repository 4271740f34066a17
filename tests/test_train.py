"""dasr-train on CPU: targets, paired crops, checkpoints, exact resume, a tiny end-to-end run."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from click.testing import CliRunner  # noqa: E402
from scipy import ndimage  # noqa: E402

from cli.train import main as train_cli  # noqa: E402
from dasr_model.checkpoints import load_checkpoint  # noqa: E402
from dasr_model.data import PairedShards, StepBatchSampler, unsharp_mask  # noqa: E402
from dasr_model.metrics import psnr_y  # noqa: E402
from dasr_model.model import DASR, DASRConfig  # noqa: E402
from dasr_model.modelfile import MODEL_FILE  # noqa: E402
from dasr_model.train import TrainConfig, train  # noqa: E402
from degrade.augment import dihedral_image, dihedral_vector  # noqa: E402

from .conftest import make_small_dataset  # noqa: E402

TINY = DASRConfig(num_experts=2, num_feat=8, num_block=1, predictor_feat=8)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]  # skipped without a CUDA device (conftest.py)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return make_small_dataset(tmp_path_factory.mktemp("train") / "ds", count=12, seed=1, shard_size=12)


def test_unsharp_mask_matches_an_independent_computation():
    rng = np.random.default_rng(0)
    img = rng.random((1, 3, 40, 48)).astype(np.float64)
    x = np.arange(51) - 25
    k = np.exp(-0.5 * (x / 8.0) ** 2)
    k /= k.sum()

    def blur(a):  # 'mirror' = reflect without repeating the edge (PyTorch 'reflect')
        return ndimage.correlate1d(ndimage.correlate1d(a, k, axis=-1, mode="mirror"), k, axis=-2, mode="mirror")

    residual = img - blur(img)
    soft = blur((np.abs(residual) * 255 > 10).astype(np.float64))
    expected = soft * np.clip(img + 0.5 * residual, 0, 1) + (1 - soft) * img
    got = unsharp_mask(torch.from_numpy(img)).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-9)
    flat = torch.full((1, 3, 32, 32), 0.4, dtype=torch.float64)
    torch.testing.assert_close(unsharp_mask(flat), flat)


def test_psnr_y_of_a_known_error():
    hr = np.full((16, 16, 3), 0.5)
    sr = hr.copy()
    sr[4:-4, 4:-4, :] += 10 / 255  # Y moves by 10 * (65.481 + 128.553 + 24.966) / 255 = 8.588
    expected = 10 * np.log10(255**2 / (10 * 219 / 255) ** 2)
    assert float(psnr_y(sr, hr)) == pytest.approx(expected, abs=0.05)


class _Sample:
    def __init__(self, lr):
        self.lr = lr
        self.hr = np.kron(lr, np.ones((4, 4, 1), np.uint8))  # HR = LR blocks: survives paired flips/rotations
        self.v = np.linspace(0, 1, 33, dtype=np.float32)

    @property
    def params(self):
        raise AssertionError("the loader parsed a record")  # items need pixels and v only: no JSON per item


TURNS = [dict(flip_lr=a, flip_ud=b, rot90=k) for a in (False, True) for b in (False, True) for k in range(4)]


def _crops(img, c):
    return [img[:, y : y + c, x : x + c] for y in range(img.shape[1] - c + 1) for x in range(img.shape[2] - c + 1)]


def test_paired_crops_flips_and_rotations_stay_aligned():
    rng = np.random.default_rng(0)
    data = [_Sample(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)) for _ in range(3)]
    ds = PairedShards(data, lr_crop=6, seed=3)
    seen = set()
    for step in range(30):
        item = ds[(step, 0, step % 3)]
        lr, hr = item["lr"].numpy(), item["hr"].numpy()
        assert lr.shape == (3, 6, 6) and hr.shape == (3, 24, 24)
        np.testing.assert_array_equal(np.kron(lr, np.ones((1, 4, 4))), hr)
        # v follows the transform the picture went through (found by trying all 8 on the stored LR)
        assert item["lr"].dtype == item["hr"].dtype == torch.uint8  # pixels travel as stored
        stored = data[step % 3].lr.transpose(2, 0, 1)[None]
        turns = [t for t in TURNS if any(np.array_equal(lr, c) for c in _crops(dihedral_image(
            stored[0].transpose(1, 2, 0), **t).transpose(2, 0, 1), 6))]
        assert turns and all(np.array_equal(item["v"].numpy(), dihedral_vector(data[0].v, **t)) for t in turns)
        seen.add(lr.tobytes())
    assert len(seen) > 20
    assert ds[(5, 1, 2)]["lr"].equal(ds[(5, 1, 2)]["lr"])  # a key always gives the same crop


def test_batches_are_a_function_of_the_step():
    a = list(StepBatchSampler(100, 4, start=0, stop=6, seed=1))
    b = list(StepBatchSampler(100, 4, start=3, stop=6, seed=1))
    assert a[3:] == b
    halves = [list(StepBatchSampler(100, 2, start=0, stop=6, seed=1, rank=r, world_size=2)) for r in (0, 1)]
    assert [h0 + h1 for h0, h1 in zip(*halves)] == a


def test_each_step_draws_its_own_batch():
    """Step s's indices are drawn from (seed, s): with the step left out of the seed every step took the same
    batch (one batch for the whole run) and every test passed (a mutation audit: the tests compared a run
    with itself). Oracle: 50 steps of 8 from 1000 are 50 different batches, and their 400 draws hold about
    1000 (1 - e^-0.4) = 330 distinct indices (a repeated batch: 8)."""
    batches = list(StepBatchSampler(1000, 8, start=0, stop=50, seed=1))
    assert len({tuple(i for _, _, i in b) for b in batches}) == 50
    assert len({i for b in batches for _, _, i in b}) > 300


def test_a_crop_the_size_of_the_patch_is_the_patch_and_every_offset_is_drawn():
    """The crop's corner is drawn from 0..L-c inclusive: drawn from 0..L-c-1, a crop the size of the
    patch raised and the last row and column were never the edge of a crop, and every test passed (a
    mutation audit: their crops were smaller, any offset looked right). Oracle: the stored LR itself for
    lr_crop 8 of an 8x8 patch; for lr_crop 6, all 3 x 3 corners, found by matching the crop against the
    stored LR's windows."""
    lr = np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    whole = PairedShards([_Sample(lr)], lr_crop=8, augment=False)[(0, 0, 0)]
    np.testing.assert_array_equal(whole["lr"].numpy().transpose(1, 2, 0), lr)
    ds = PairedShards([_Sample(lr)], lr_crop=6, augment=False)
    corners = set()
    for step in range(200):
        got = ds[(step, 0, 0)]["lr"].numpy().transpose(1, 2, 0)
        corners |= {(y, x) for y in range(3) for x in range(3) if np.array_equal(lr[y : y + 6, x : x + 6], got)}
    assert corners == {(y, x) for y in range(3) for x in range(3)}


def test_block_mae_is_each_blocks_own_mean():
    """block_mae's per-block MAE is the mean over that block's entries alone: taking one entry of the next
    block in (lo:hi + 1) passed every test (a mutation audit: the errors compared were equal in both paths).
    Oracle: an error of i / 100 at entry i, whose block means are worked from the layout's bounds with numpy."""
    from dasr_model.data import block_mae
    from degrade.layout import BLOCKS

    err = np.arange(33) / 100
    got = block_mae(torch.zeros(2, 33) + torch.tensor(err, dtype=torch.float32), torch.zeros(2, 33))
    assert got["all"] == pytest.approx(err.mean(), rel=1e-6)
    assert set(got) == {"all", *BLOCKS}
    for name, (lo, hi) in BLOCKS.items():
        assert got[name] == pytest.approx(err[lo:hi].mean(), rel=1e-6), name


def _cfg(shards, out, steps, **kw):
    kw = {"model": TINY, "ckpt_every": 2, "batch_size": 2, "device": "cpu", "workers": 0, **kw}
    return TrainConfig(shards=shards, out=str(out), steps=steps, lr_crop=8, **kw)


def test_resume_equals_uninterrupted(shards, tmp_path):
    train(_cfg(shards, tmp_path / "full", 4))
    train(_cfg(shards, tmp_path / "split", 2))
    train(_cfg(shards, tmp_path / "split", 4), resume=True)
    full, split = load_checkpoint(tmp_path / "full" / "ckpt-4.pt"), load_checkpoint(tmp_path / "split" / "ckpt-4.pt")
    for key in ("model", "ema_generator"):
        for name, tensor in full[key].items():
            assert torch.equal(tensor, split[key][name]), name
    assert full["optimizer"]["state"][0]["step"] == split["optimizer"]["state"][0]["step"]



def _assert_same_state(a, b, where="checkpoint"):
    """Every entry of two checkpoints equal: tensors bit for bit (optimiser moments included), the rest ==."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (where, sorted(set(a) ^ set(b)))
        for key in a:
            _assert_same_state(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_state(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    else:
        assert a == b, (where, a, b)


def test_a_run_stopped_by_sigterm_mid_schedule_resumes_to_the_same_bits(shards, tmp_path):
    """Resume is exact: a run with every part whose state a checkpoint carries (GAN, its optimiser, the
    teacher phase, a cosine schedule inside and past its warm-up, the EMA warm-up, validations, loader
    workers, 2 then 0, the uninterrupted run 0) stopped by SIGTERM at step 3 of 8 and resumed ends with every
    tensor of its checkpoint, Adam's moments of both optimisers included, equal to the uninterrupted run's,
    on one torch thread count (another is a note: see the test after)."""
    import os
    import signal

    def stop_at_3(step, metrics):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    kw = dict(gan=True, teacher_steps=4, lr_schedule="cosine", warmup_steps=2, val_shards=shards, val_every=3,
              val_samples=4, log_every=1, ckpt_every=8, model=DASRConfig(num_experts=2, num_feat=8, num_block=1,
                                                                          predictor_feat=8, mixing="softmax"))
    train(_cfg(shards, tmp_path / "full", 8, **kw))
    last = train(_cfg(shards, tmp_path / "split", 8, workers=2, **kw), progress=stop_at_3)
    assert last["step"] == 3 and last["stopped_by"] == "SIGTERM"
    notes: list[str] = []
    train(_cfg(shards, tmp_path / "split", 8, **kw), resume=True, notify=notes.append)
    assert not [n for n in notes if "computed on" in n]
    full, split = (load_checkpoint(tmp_path / run / "ckpt-8.pt") for run in ("full", "split"))
    assert {"discriminator", "optimizer_d", "computed_on"} <= set(full)
    _assert_same_state({k: v for k, v in full.items() if k != "config"},
                       {k: v for k, v in split.items() if k != "config"})


def test_a_resume_on_another_thread_count_or_torch_says_it_is_exact_to_rounding_only(shards, tmp_path,
                                                                                         monkeypatch):
    """The CPU's backward splits its sums over torch's threads, so a resume computed with another thread
    count (or another torch, or device) rounds otherwise: about 1e-8 after a few steps, more with GAN. The
    checkpoint records what it was computed on, and such a resume says so in a note."""
    train(_cfg(shards, tmp_path / "run", 2))
    ckpt = load_checkpoint(tmp_path / "run" / "ckpt-2.pt")
    threads = torch.get_num_threads()

    def cpu(n):
        return f"cpu ({n} thread{'s' if n != 1 else ''}), torch {torch.__version__}"

    assert ckpt["computed_on"] == cpu(threads) and ckpt["global_batch"] == 2
    notes: list[str] = []
    torch.set_num_threads(threads + 1)
    try:
        train(_cfg(shards, tmp_path / "run", 4), resume=True, notify=notes.append)
    finally:
        torch.set_num_threads(threads)
    said = [n for n in notes if "computed on" in n]
    assert said == [f"note: ckpt-2.pt was computed on {cpu(threads)}, this resume on {cpu(threads + 1)}: its result "
                    "equals an uninterrupted run's to float rounding, not bit for bit (sums split over other threads "
                    "or kernels round otherwise; on a CPU, OMP_NUM_THREADS sets the threads)"]
    # another batch size (or, under torchrun, process count: --batch-size is per process) is another note: the
    # batches themselves differ
    notes.clear()
    train(_cfg(shards, tmp_path / "run", 5, batch_size=3), resume=True, notify=notes.append)
    assert [n for n in notes if "batches" in n] == [
        "note: ckpt-4.pt was trained with batches of 2 samples; this resume takes 3 (1 process(es) x --batch-size 3), "
        "so its batches, and its result, differ from an uninterrupted run's (--batch-size 2 gives the same batches)"]
    # a GPU by its model, not its index (DDP's ranks differ in it), and a DDP run's processes
    import dasr_model.train as train_module

    monkeypatch.setattr(train_module, "describe_device", lambda device: f"{device} (NVIDIA H200)")
    assert train_module.computed_on(torch.device("cuda", 3), 4) == \
        f"cuda (NVIDIA H200), 4 processes, torch {torch.__version__}"
    assert train_module.computed_on(torch.device("cuda", 0)) == train_module.computed_on(torch.device("cuda", 1))


def test_checkpoint_round_trip_gives_identical_outputs(shards, tmp_path, monkeypatch):
    """The checkpoint holds the model as trained: the run's own model object (kept by a spy on the class)
    and the one loaded from its last checkpoint give the same outputs (a save of anything else, e.g. a
    fresh init, fails here; loading one file twice and comparing the two could not tell)."""
    import dasr_model.train as train_module

    built = []

    class Spy(DASR):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(train_module, "DASR", Spy)
    train(_cfg(shards, tmp_path / "run", 2))
    assert len(built) == 1
    ckpt = load_checkpoint(tmp_path / "run" / "ckpt-2.pt")
    model = DASR(TrainConfig.from_dict(ckpt["config"]).model)
    model.load_state_dict(ckpt["model"])
    trained = built[0].eval()
    lr = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(model.eval()(lr), trained(lr))


def test_tiny_end_to_end_cli_run(shards, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(train_cli, [
        "--shards", shards, "--val-shards", shards, "--out", str(out), "--steps", "3", "--batch-size", "2",
        "--lr-crop", "8", "--workers", "0", "--val-every", "3", "--ckpt-every", "2", "--experts", "2",
        "--blocks", "1", "--features", "8", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.glob("ckpt-*.pt")) == ["ckpt-2.pt", "ckpt-3.pt"]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3]
    val = lines[-1]["val"]
    assert set(val["mae"]) == {"all", "kernel", "resize", "noise", "jpeg"}
    assert all(np.isfinite(x) for x in val["psnr_y"].values())
    assert "perceptual loss off" in result.output
    line = next(x for x in result.output.splitlines() if x.startswith("step 3: val PSNR-Y "))  # whole, not cut
    assert all(f"L{k} {v:.2f} (bicubic " in line for k, v in val["psnr_y"].items()) and "predictor MAE" in line


def test_a_validation_set_made_with_sharpen_hr_is_noted(shards, tmp_path):
    """Validation LR from the sharpened HR is scored against the plain HR, which real images are not; the
    README's walk-through made one so without a word: dasr-train notes it (and not for a plain set)."""
    from degrade import shards as dsm

    scan = dsm.scan_sources([], 64)
    sharp = tmp_path / "sharp"
    dsm.make_dataset(dsm.DatasetConfig(level=2, count=2, patch_size=64, seed=1, shard_size=2, compression="none",
                                       source_root=scan.root, sources=tuple(scan.sources), sharpen_hr=True), sharp)
    common = ["--shards", shards, "--steps", "1", "--batch-size", "2", "--lr-crop", "8", "--workers", "0",
              "--experts", "2", "--blocks", "1", "--features", "8", "--device", "cpu"]
    for val, noted in ((sharp, True), (shards, False)):
        res = CliRunner().invoke(train_cli, [*common, "--val-shards", str(val), "--out", str(tmp_path / f"r{noted}")])
        assert res.exit_code == 0, res.output
        assert ("was made with --sharpen-hr" in " ".join(res.output.split())) is noted


def test_each_validation_is_printed_once_with_log_every(shards, tmp_path):
    """--log-every N hands the last logged line to the progress report on every step until the next; its
    validation line was printed again each time (3 copies of each at --log-every 4 --val-every 2)."""
    result = CliRunner().invoke(train_cli, [
        "--shards", shards, "--val-shards", shards, "--out", str(tmp_path / "run"), "--steps", "6", "--batch-size",
        "2", "--lr-crop", "8", "--workers", "0", "--val-every", "2", "--log-every", "4", "--val-samples", "3",
        "--experts", "2", "--blocks", "1", "--features", "8", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    printed = [x.split(":")[0] for x in result.output.splitlines() if ": val PSNR-Y " in x]
    assert printed == ["step 2", "step 4", "step 6"]


def test_the_last_step_is_validated_when_val_every_does_not_divide_steps(shards, tmp_path):
    """A run scores its validation set every val_every steps and at its last step: without the last step,
    every test passed (a mutation audit: their steps were multiples of val_every). Oracle: steps 3 with
    val_every 2 logs validation at steps 2 and 3, read from metrics.jsonl."""
    train(_cfg(shards, tmp_path / "run", 3, val_shards=shards, val_every=2, val_samples=2))
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "val" in x] == [2, 3]


def test_validation_during_training_scores_as_dasr_eval_does(shards):
    """ValidationSet (batched, on the device, experts mixed per sample, PSNR-Y reduced in torch) against
    evaluate_pairs (dasr-eval's path: one image at a time, experts fused, numpy metrics) on the same samples:
    the same PSNR-Y and bicubic PSNR-Y per level and the same predictor MAE. The tolerance, 1e-6 dB, leaves
    room for a pixel rounding to the other 8-bit level between the two float paths (measured: 1e-14)."""
    from dasr_model.evaluate import ValidationSet, evaluate_pairs, pairs_from_shards

    torch.manual_seed(0)
    model = DASR(DASRConfig(num_experts=3, num_block=2, num_feat=16, mapping_gain=1.0))
    with torch.no_grad():  # an untrained generator is almost its bilinear base: give it some output of its own
        for p in model.generator.parameters():
            p.add_(0.02 * torch.randn_like(p))
    pairs = pairs_from_shards(shards)
    want = evaluate_pairs(model, pairs, torch.device("cpu"))
    val = ValidationSet(pairs, torch.device("cpu"))
    val.batches = [idx[i : i + 5] for idx in val.batches for i in range(0, len(idx), 5)]  # several batches
    got = val(model, model.generator)
    assert len(val) == len(pairs) == 12 and len(val.batches) == 3
    assert set(got["psnr_y"]) == set(want["levels"]) and len(want["levels"]) > 1
    for level, r in want["levels"].items():
        assert got["psnr_y"][level] == pytest.approx(r["psnr_y"], abs=1e-6)
        assert got["bicubic_psnr_y"][level] == pytest.approx(r["bicubic_psnr_y"], abs=1e-9)
        assert abs(r["psnr_y"] - r["bicubic_psnr_y"]) > 0.01  # the generator is not bicubic: the test can tell
    assert got["mae"] == pytest.approx(want["mae"], abs=1e-7)
    assert model.training and model.generator.training  # put back as it was


def test_validation_predicts_a_long_lr_as_dasr_eval_does():
    """An LR side over 1024 px (once area-shrunk for the predictor) gives the same scores in both paths:
    both call infer.predict, which now hands the predictor the image as it is."""
    from dasr_model.evaluate import Pairs, ValidationSet, evaluate_pairs

    rng = np.random.default_rng(1)
    lr = np.round(rng.random((1100, 24, 3)) * 255).astype(np.float32) / 255
    hr = np.round(rng.random((4400, 96, 3)) * 255).astype(np.float32) / 255
    pairs = Pairs(1, lambda: iter([(2, hr, lr, np.full(33, 0.5, np.float32))]))
    torch.manual_seed(0)
    model = DASR(DASRConfig(num_experts=2, num_block=1, num_feat=8, predictor_feat=8, mapping_gain=1.0))
    want = evaluate_pairs(model, pairs, torch.device("cpu"))
    got = ValidationSet(pairs, torch.device("cpu"))(model, model.generator)
    assert got["psnr_y"]["2"] == pytest.approx(want["levels"]["2"]["psnr_y"], abs=1e-6)
    assert got["mae"] == pytest.approx(want["mae"], abs=1e-6)


def test_a_resume_keeps_the_runs_options_unless_given_again(shards, tmp_path):
    """`--resume` with only --shards and --out continues the run it resumes: its seed (the batches), rate,
    GAN term, EMA, teacher steps, model and --steps, listing those that differ from the defaults, the model's
    first. Oracle: 2 steps then a resume equals 3 steps in one go with every option given (the same weights),
    where the defaults (seed 0, no GAN, ...) would differ."""
    opts = ["--shards", shards, "--batch-size", "2", "--lr-crop", "8", "--workers", "0", "--device", "cpu",
            "--experts", "2", "--blocks", "1", "--features", "8", "--seed", "3", "--lr", "3e-4", "--gan",
            "--ema-decay", "0.9", "--teacher-steps", "1", "--no-sharpen", "--mixing", "softmax",
            "--mixing-temperature", "0.5", "--mapping-gain", "1", "--predictor-input", "highpass"]
    whole, part = tmp_path / "whole", tmp_path / "part"
    for out, steps in ((whole, "3"), (part, "2")):
        res = CliRunner().invoke(train_cli, [*opts, "--out", str(out), "--steps", steps])
        assert res.exit_code == 0, res.output
    res = CliRunner().invoke(train_cli, ["--shards", shards, "--out", str(part), "--resume", "--workers", "0",
                                         "--device", "cpu", "--steps", "3"])
    assert res.exit_code == 0, res.output
    assert "resuming with the run's own options (ckpt-2.pt" in res.output and "--gan" in res.output
    assert "--seed 3" in res.output and "--no-sharpen" in res.output
    kept = " ".join(res.output.split()).split("resuming with the run's own options (ckpt-2.pt; given ones win): ")[1]
    assert kept.startswith("--experts 2, --blocks 1, --features 8, --mixing softmax, --mixing-temperature 0.5, "
                           "--mapping-gain 1.0, --predictor-input highpass, --batch-size 2, "), kept  # the model first
    config = json.loads((part / "config.json").read_text())
    assert (config["seed"], config["gan"], config["lr"], config["sharpen_gt"]) == (3, True, 3e-4, False)
    a, b = (load_checkpoint(d / "ckpt-3.pt") for d in (whole, part))
    for key in ("model", "ema_generator"):
        for name, t in a[key].items():
            assert torch.allclose(t, b[key][name], atol=1e-6), (key, name)
    res = CliRunner().invoke(train_cli, ["--shards", shards, "--out", str(part), "--resume", "--workers", "0",
                                         "--device", "cpu", "--steps", "4", "--lr", "1e-4"])
    assert res.exit_code == 0, res.output  # options given again win (and the change is noted)
    assert json.loads((part / "config.json").read_text())["lr"] == 1e-4 and "continuing with" in res.output
    res = CliRunner().invoke(train_cli, ["--shards", shards, "--out", str(part), "--resume", "--workers", "0",
                                         "--device", "cpu"])
    assert res.exit_code == 0 and "already at step 4 (--steps 4)" in res.output  # the run's own end


def test_a_resume_given_another_mapping_gain_keeps_the_runs_and_says_so(shards, tmp_path):
    """--mapping-gain only scales a new run's initial mapping weights: a resume given another value trains on
    (it was refused as another model) with the run's value on record and a note, and the library's resume
    accepts a config that differs only there."""
    out = tmp_path / "run"
    base = ["--shards", shards, "--out", str(out), "--workers", "0", "--device", "cpu"]
    res = CliRunner().invoke(train_cli, [*base, "--steps", "1", "--batch-size", "2", "--lr-crop", "8",
                                         "--experts", "2", "--blocks", "1", "--features", "8", "--mapping-gain", "0.5"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(train_cli, [*base, "--resume", "--steps", "2", "--mapping-gain", "2"])
    assert res.exit_code == 0, res.output
    assert "note: --mapping-gain only scales a new run's initial weights: this resume keeps its run's (0.5)" \
        in " ".join(res.output.split())
    assert load_checkpoint(out / "ckpt-2.pt")["config"]["model"]["mapping_gain"] == 0.5
    res = CliRunner().invoke(train_cli, [*base, "--resume", "--steps", "2", "--mapping-gain", "0.5"])
    assert res.exit_code == 0 and "mapping-gain only" not in res.output  # the run's own value: nothing to say
    cfg = TrainConfig.from_dict(load_checkpoint(out / "ckpt-2.pt")["config"])
    other = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, mapping_gain=3.0), steps=3)
    train(other, resume=True)  # the library's resume: the checkpoint's model but for the init-only gain
    assert load_checkpoint(out / "ckpt-3.pt")["step"] == 3


def test_a_resume_from_another_folder_reads_the_runs_own_paths(shards, tmp_path, monkeypatch):
    """Paths typed relative (--val-shards, --vgg-weights, --init-from, --shards) are recorded absolute: a
    resume started from another folder, which holds another `val` (a level-3 set where the run validated on
    level 2), validates on the run's own set. They were stored as typed, so that resume validated on the other
    set without a word. A config recorded relative (by an earlier version) is read from the resume's folder,
    with a note saying so."""
    first, second = tmp_path / "a", tmp_path / "b"
    make_small_dataset(first / "val", count=4, seed=9, shard_size=4, level=2)
    make_small_dataset(second / "val", count=4, seed=9, shard_size=4, level=3)
    out = tmp_path / "run"
    base = ["--out", str(out), "--workers", "0", "--device", "cpu"]
    monkeypatch.chdir(first)
    res = CliRunner().invoke(train_cli, [*base, "--shards", os.path.relpath(shards), "--steps", "1",
                                         "--batch-size", "2", "--lr-crop", "8", "--experts", "2", "--blocks", "1",
                                         "--features", "8", "--val-shards", "val", "--val-samples", "2",
                                         "--val-every", "1"])
    assert res.exit_code == 0, res.output
    config = json.loads((out / "config.json").read_text())
    assert (config["val_shards"], config["shards"]) == (str(first / "val"), os.path.abspath(shards))
    monkeypatch.chdir(second)
    res = CliRunner().invoke(train_cli, [*base, "--shards", shards, "--resume", "--steps", "2"])
    assert res.exit_code == 0, res.output
    levels = [set(json.loads(line)["val"]["psnr_y"]) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert levels == [{"2"}, {"2"}]  # the run's own validation set both times (level 3 is the other folder's)
    ckpt = torch.load(out / "ckpt-2.pt", weights_only=True)  # an earlier version's record: the path as typed
    ckpt["config"]["val_shards"] = "val"
    torch.save(ckpt, out / "ckpt-2.pt")
    res = CliRunner().invoke(train_cli, [*base, "--shards", shards, "--resume", "--steps", "3"])
    assert res.exit_code == 0, res.output
    assert f"note: --val-shards val (the run's) was recorded relative to the folder it started in; this resume " \
           f"reads, and records, {second / 'val'}" in " ".join(res.output.split())
    assert torch.load(out / "ckpt-3.pt", weights_only=True)["config"]["val_shards"] == str(second / "val")
    monkeypatch.chdir(first)  # recorded absolute by that resume: the next one, from anywhere, reads the same set
    res = CliRunner().invoke(train_cli, [*base, "--shards", shards, "--resume", "--steps", "4"])
    assert res.exit_code == 0 and "recorded relative" not in res.output, res.output
    levels = [set(json.loads(line)["val"]["psnr_y"]) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert levels[2:] == [{"3"}, {"3"}]


def test_a_resume_can_turn_off_what_the_run_had(shards, tmp_path):
    """Each flag has its off switch (--no-gan, --no-channels-last, --sharpen, --ema-warmup), --no-val and
    --no-vgg clear inherited paths, and a run's validation set that is gone is named with its origin."""
    import shutil

    val = tmp_path / "val"
    shutil.copytree(shards, val)
    out = tmp_path / "run"
    base = ["--shards", shards, "--out", str(out), "--workers", "0", "--device", "cpu"]
    res = CliRunner().invoke(train_cli, [*base, "--steps", "1", "--batch-size", "2", "--lr-crop", "8",
                                         "--experts", "2", "--blocks", "1", "--features", "8", "--gan",
                                         "--channels-last", "--no-ema-warmup", "--no-sharpen",
                                         "--val-shards", str(val), "--val-samples", "2"])
    assert res.exit_code == 0, res.output
    shutil.rmtree(val)
    res = CliRunner().invoke(train_cli, [*base, "--resume", "--steps", "2"])
    assert res.exit_code == 1 and f"--val-shards {val} (the run's, from ckpt-1.pt): no such file or folder; " \
        "give --val-shards again, or --no-val" in res.output.replace("\n", "")
    res = CliRunner().invoke(train_cli, [*base, "--resume", "--steps", "2", "--no-val", "--val-shards", shards])
    assert res.exit_code == 2 and "contradict" in res.output
    res = CliRunner().invoke(train_cli, [*base, "--resume", "--steps", "2", "--no-val", "--no-gan",
                                         "--no-channels-last", "--ema-warmup", "--sharpen"])
    assert res.exit_code == 0, res.output
    config = json.loads((out / "config.json").read_text())
    assert config["val_shards"] is None and not config["gan"] and not config["channels_last"]
    assert config["ema_warmup"] and config["sharpen_gt"] and config["batch_size"] == 2
    assert "--gan" not in res.output.split("resuming with")[1].splitlines()[0]
    res = CliRunner().invoke(train_cli, [*base, "--resume", "--steps", "3", "--experts", "5"])
    assert res.exit_code == 1 and "num_experts 2 (asked: 5); a resume takes its model from the checkpoint: " \
        "leave those options out" in res.output.replace("\n", "")


def test_cli_bad_input(tmp_path):
    result = CliRunner().invoke(train_cli, ["--shards", str(tmp_path), "--out", str(tmp_path / "r")])
    assert result.exit_code == 1 and "not a dataset folder" in result.output
    result = CliRunner().invoke(train_cli, ["--shards", str(tmp_path), "--out", str(tmp_path / "r"), "--resume"])
    assert result.exit_code == 1 and "not a dataset folder" in result.output
    assert "Usage" in CliRunner().invoke(train_cli, ["--help"]).output
    (tmp_path / "photo.jpg").write_bytes(b"x")  # refused before the data and model are built
    result = CliRunner().invoke(train_cli, ["--shards", str(tmp_path), "--out", str(tmp_path / "photo.jpg")])
    assert result.exit_code == 1 and "photo.jpg: is a file, not a run folder" in result.output


def test_the_time_left_never_passes_the_max_minutes_budget(shards, tmp_path):
    """With --max-minutes the run stops when the budget is spent, whatever --steps says: the bar's time left
    is the smaller of the steps' estimate and the budget left (a constant-rate run of --steps 1000000
    --max-minutes 30 showed hours). The trainer reports the budget left with each step; the column takes it."""
    from rich.progress import Progress

    from cli.train import TimeLeftColumn

    clock = [0.0]
    for deadline, shown in ((None, "277:46:20"), (60.0, "0:00:40"), (5.0, "0:00:00")):
        bar = Progress(TimeLeftColumn(), get_time=lambda: clock[0])
        task = bar.add_task("train", total=10**6, deadline=deadline)
        for clock[0] in (0.0, 10.0, 20.0):
            bar.update(task, completed=int(clock[0]))  # 1 step a second: 999,980 s for the rest
        assert str(TimeLeftColumn().render(bar.tasks[0])) == shown, deadline
    seen = []
    cfg = TrainConfig(shards=shards, out=str(tmp_path / "run"), steps=2, batch_size=2, lr_crop=8, workers=0,
                      device="cpu", max_minutes=60, model=TINY)
    train(cfg, progress=lambda step, m: seen.append(m.get("budget_left")))
    assert len(seen) == 2 and 3500 < seen[1] <= seen[0] <= 3600
    train(dataclasses.replace(cfg, out=str(tmp_path / "free"), max_minutes=None),
          progress=lambda step, m: seen.append(m.get("budget_left")))
    assert seen[2:] == [None, None]  # no budget, no deadline: rich's own estimate


def test_cli_out_of_memory_is_one_line_naming_what_to_lower(shards, tmp_path, monkeypatch):
    """The CPU allocator's RuntimeError and Python's MemoryError end dasr-train in one line naming the options
    that set the memory (--val-samples too with a validation set, held whole from the start), as CUDA's
    OutOfMemoryError did; any other RuntimeError keeps its traceback."""
    import dasr_model.train as train_module

    def raising(error):
        return lambda *args, **kwargs: (_ for _ in ()).throw(error)

    args = ["--shards", shards, "--workers", "0", "--device", "cpu", "--experts", "2", "--blocks", "1",
            "--features", "8", "--lr-crop", "8", "--batch-size", "2", "--steps", "2"]
    cpu_oom = "DefaultCPUAllocator: can't allocate memory: you tried to allocate 737280000 bytes. Error code 12"
    for i, error in enumerate((RuntimeError(cpu_oom), MemoryError())):
        monkeypatch.setattr(train_module, "train_step", raising(error))
        res = CliRunner().invoke(train_cli, [*args, "--out", str(tmp_path / f"run{i}")])
        assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.output
        assert res.output.strip().splitlines()[-1] == \
            "Error: out of memory on cpu at --batch-size 2, --lr-crop 8; lower one of them"
    monkeypatch.setattr(train_module, "ValidationSet", raising(MemoryError()))  # loaded before the first step
    res = CliRunner().invoke(train_cli, [*args, "--out", str(tmp_path / "val"), "--val-shards", shards,
                                         "--val-samples", "4"])
    assert res.exit_code == 1 and "Error: out of memory on cpu at --batch-size 2, --lr-crop 8, --val-samples 4 " \
        "(the validation set is held whole from the start); lower one of them" in res.output, res.output
    monkeypatch.setattr(train_module, "train_step", raising(RuntimeError("a shape bug")))
    res = CliRunner().invoke(train_cli, [*args, "--out", str(tmp_path / "bug")])
    assert isinstance(res.exception, RuntimeError) and str(res.exception) == "a shape bug"  # a bug: as it was


def test_dataloader_worker_processes_give_the_same_batches(shards):
    """The shard reader opens its files lazily per process, and batches depend only on (seed, step)."""
    from torch.utils.data import DataLoader

    ds = PairedShards(shards, lr_crop=8, seed=4)

    def batches(workers):
        sampler = StepBatchSampler(len(ds), 3, start=0, stop=4, seed=4)
        return [b["lr"] for b in DataLoader(ds, batch_sampler=sampler, num_workers=workers)]

    for a, b in zip(batches(0), batches(2)):
        assert torch.equal(a, b)


def _vgg_file(path):
    """Random VGG19 weights saved in torchvision's layout (features.N.*, plus a classifier to ignore)."""
    from dasr_model import losses

    layers, in_ch = [], 3
    for item in losses._VGG19:
        if item == "M":
            layers.append(torch.nn.MaxPool2d(2))
        else:
            layers += [torch.nn.Conv2d(in_ch, item, 3, padding=1), torch.nn.ReLU()]
            in_ch = item
    state = {f"features.{k}": v for k, v in torch.nn.Sequential(*layers).state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(2, 2)
    torch.save(state, path)
    return path


def test_perceptual_loss_is_zero_for_equal_images_and_positive_otherwise(tmp_path):
    from dasr_model.losses import VGGPerceptualLoss

    loss = VGGPerceptualLoss(_vgg_file(tmp_path / "vgg.pth"))
    a, b = torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)
    assert float(loss(a, a)) == 0.0 and float(loss(a, b)) > 0


def test_gan_and_perceptual_terms_train_and_resume_exactly(shards, tmp_path):
    vgg = str(_vgg_file(tmp_path / "vgg.pth"))
    train(_cfg(shards, tmp_path / "run", 2, gan=True, vgg_weights=vgg))
    last = train(_cfg(shards, tmp_path / "run", 3, gan=True, vgg_weights=vgg), resume=True)
    assert {"gan", "discriminator", "perceptual"} <= set(last) and last["step"] == 3
    train(_cfg(shards, tmp_path / "full", 3, gan=True, vgg_weights=vgg))
    a, b = load_checkpoint(tmp_path / "run" / "ckpt-3.pt"), load_checkpoint(tmp_path / "full" / "ckpt-3.pt")
    for key in ("model", "ema_generator", "discriminator"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), (key, name)


def test_ctrl_c_saves_a_checkpoint_and_stops(shards, tmp_path):
    import os
    import signal

    def interrupt(step, metrics):
        if step == 1:
            os.kill(os.getpid(), signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)  # the default handler, or SIG_IGN under nohup / a background job
    last = train(_cfg(shards, tmp_path / "run", 5), progress=interrupt)
    assert last["step"] == 1 and last["stopped_by"] == "SIGINT"
    assert sorted(p.name for p in (tmp_path / "run").glob("ckpt-*.pt")) == ["ckpt-1.pt"]
    assert signal.getsignal(signal.SIGINT) is before  # handler restored


def test_discriminator_gives_per_pixel_logits():
    from dasr_model.losses import UNetDiscriminatorSN

    assert UNetDiscriminatorSN(num_feat=8)(torch.rand(2, 3, 32, 40)).shape == (2, 1, 32, 40)


@pytest.mark.parametrize("channels_last", [False, True])
def test_l1_loss_is_pytorchs_with_the_gradient_in_the_images_layout(channels_last):
    """The same value (to float32 rounding) and the same gradient, bit for bit, as F.l1_loss; the gradient
    laid out as the image (F.l1_loss's mean makes a channels_last image's gradient NCHW)."""
    from dasr_model.losses import l1_loss

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    gen = torch.Generator().manual_seed(0)
    sr = torch.randn(3, 3, 16, 20, generator=gen).contiguous(memory_format=fmt).requires_grad_(True)
    target = torch.randn(3, 3, 16, 20, generator=gen).contiguous(memory_format=fmt)
    target[0, 0, 0, :3] = sr[0, 0, 0, :3].detach()  # ties: sign 0, as F.l1_loss
    ours, ref = l1_loss(sr, target), torch.nn.functional.l1_loss(sr, target)
    torch.testing.assert_close(ours, ref, rtol=2e-7, atol=0)
    (g_ours,), (g_ref,) = torch.autograd.grad(ours, sr), torch.autograd.grad(ref, sr)
    assert torch.equal(g_ours, g_ref) and (g_ours == 0).sum() == 3
    assert g_ours.is_contiguous(memory_format=fmt)
    assert g_ref.is_contiguous()  # why: F.l1_loss's gradient is NCHW whatever the image's layout


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 1, 1, 1), (2, 2, 1, 4), (3, 4, 2, 1), (2, 5, 8, 8)])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("impl", ["lerp", "matmul"])
def test_upsample2x_equals_pytorchs_bilinear_interpolation_and_its_gradient(shape, channels_last, impl):
    """float64: the two differ by rounding alone (1e-15), edges (1-px images) included."""
    from dasr_model.losses import upsample2x

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).contiguous(
        memory_format=fmt).requires_grad_(True)
    ref = torch.nn.functional.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    got = upsample2x(x, impl)
    g = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    (grad_ref,), (grad_got,) = torch.autograd.grad(ref, x, g), torch.autograd.grad(got, x, g)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-14)
    torch.testing.assert_close(grad_got, grad_ref, rtol=0, atol=1e-14)
    if channels_last and min(shape[1], shape[2] * shape[3]) > 1:  # (a 1-channel or 1-pixel tensor is both)
        assert got.is_contiguous(memory_format=torch.channels_last) and not got.is_contiguous()


@pytest.mark.parametrize("impl", ["lerp", "matmul"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_upsample2x_in_bf16_is_within_bf16_rounding(impl, channels_last):
    """bf16 in, bf16 out: within one bf16 step (2^-8 on [0.5, 1)) of the float32 up-sampling of the same
    bf16 input (two roundings: the first axis's result, then the output); the format kept."""
    from dasr_model.losses import upsample2x

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.rand(2, 4, 6, 5, generator=torch.Generator().manual_seed(0)).bfloat16().contiguous(memory_format=fmt)
    ref = torch.nn.functional.interpolate(x.float(), scale_factor=2, mode="bilinear", align_corners=False)
    got = upsample2x(x, impl)
    assert got.dtype == torch.bfloat16 and got.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(got.float(), ref, rtol=0, atol=2 ** -8)
    with pytest.raises(ValueError, match="takes \\(N, C, H, W\\)"):
        upsample2x(torch.rand(3, 4, 5), impl)


def test_interp_matrix2x_rows_are_pytorchs_weights():
    """Row i of the (2n, n) matrix is F.interpolate's x2 output i of the unit vectors (an independent
    oracle: PyTorch's kernel applied to the identity), for n = 1 (every output copies the one sample) to 9."""
    from dasr_model.losses import interp_matrix2x

    for n in range(1, 10):
        eye = torch.eye(n, dtype=torch.float64)[:, None, None, :]  # n images of 1 x n: unit vector j in image j
        ref = torch.nn.functional.interpolate(eye, size=(1, 2 * n), mode="bilinear", align_corners=False)
        assert torch.equal(interp_matrix2x(n, dtype=torch.float64), ref[:, 0, 0, :].T)
    assert set(interp_matrix2x(5).unique().tolist()) == {0.0, 0.25, 0.75, 1.0}


@pytest.mark.parametrize("upsample", ["lerp", "matmul", "auto"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_discriminator_upsampling_ways_agree_with_the_release_way(upsample, channels_last):
    """float64: the discriminator's logits and parameter gradients with each up-sampling agree with
    F.interpolate's (the release's way) to rounding; "auto" takes the way auto_upsample names; an unknown way
    is refused."""
    from dasr_model.losses import UNetDiscriminatorSN, upsample2x

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    torch.manual_seed(0)
    disc = UNetDiscriminatorSN(num_feat=8).double().to(memory_format=fmt)
    release = copy.deepcopy(disc)
    disc.upsample, release.upsample = upsample, "interpolate"
    img = torch.rand(2, 3, 32, 24, dtype=torch.float64).contiguous(memory_format=fmt)
    ours, theirs = disc(img), release(img)  # (each forward steps its own power iteration, alike)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)
    ours.sum().backward()
    theirs.sum().backward()
    for (name, a), b in zip(disc.named_parameters(), release.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-10, msg=name)
    if upsample == "auto":  # on a CPU, in float64: PyTorch's on channels_last features, else the matrix products
        feats = torch.rand(2, 8, 6, 5, dtype=torch.float64).contiguous(memory_format=fmt)
        assert torch.equal(disc._upsample(feats), upsample2x(feats, "interpolate" if channels_last else "matmul"))
    with pytest.raises(ValueError, match="discriminator upsample must be one of auto, interpolate, lerp, matmul"):
        disc.upsample = "nearest"


def test_auto_upsample_is_the_fastest_way_measured():
    """The discriminator's "auto" up-sampling (each choice from bench_upsample.py's tables): the matrix
    products on a GPU; on a CPU PyTorch's kernel for channels_last features, the matrix products for NCHW
    float32 and float64, the lerps for NCHW bf16 and float16."""
    from dasr_model.losses import auto_upsample

    for cl in (False, True):
        for dtype in (torch.float32, torch.bfloat16):
            assert auto_upsample(True, cl, dtype) == "matmul"
            assert auto_upsample(False, True, dtype) == "interpolate"
    assert [auto_upsample(False, False, d) for d in (torch.float32, torch.float64, torch.bfloat16, torch.float16)] == [
        "matmul", "matmul", "lerp", "lerp"]


@pytest.mark.cuda
def test_auto_upsample_on_a_gpu_is_the_matrix_products():
    """On CUDA the discriminator's "auto" up-sampling gives upsample2x's "matmul" output, bit for bit, in
    bf16 channels_last (the training step's case) and float32 NCHW."""
    from dasr_model.losses import UNetDiscriminatorSN, upsample2x

    disc = UNetDiscriminatorSN(num_feat=8).cuda()
    for dtype, fmt in ((torch.bfloat16, torch.channels_last), (torch.float32, torch.contiguous_format)):
        feats = torch.rand(2, 8, 6, 5, device="cuda", dtype=dtype).contiguous(memory_format=fmt)
        assert torch.equal(disc._upsample(feats), upsample2x(feats, "matmul"))


def test_ddp_with_gloo_equals_one_process_with_the_global_batch(shards, tmp_path):
    """torchrun, 2 CPU processes x batch 1 == 1 process x batch 2 (gradients are averaged). The DDP run is
    asked for 6 steps with metrics every 2 and checkpoints every 3, and rank 1 sends itself SIGINT after
    step 1: the ranks agree on stopping only at logged, checkpoint and last steps (no host sync per step),
    so both stop at step 2, the first logged step, save there, and are compared with a 2-step
    single-process run. Rank 0 alone validates, every step: each validation step is a logged step on both
    ranks (no stop agreement at step 1), and the logged losses are the ranks' mean, the single run's losses
    of the same global batch; samples/s counts both ranks' samples (a clock that ticks once a reading makes
    it the single run's exactly). Resumed at its end through dasr-train, both ranks have nothing to train
    and end together, and rank 0 alone prints the notes."""
    import subprocess
    import sys

    code = f"""
import os, signal, sys, types
import dasr_model.train as T
from dasr_model.model import DASRConfig

out, batch, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ticks = iter(range(10**6))
T.time = types.SimpleNamespace(perf_counter=lambda: float(next(ticks)))


def done(last):
    result = f"{{last['step']}} {{last.get('stopped_by') or last.get('nothing_to_train')}}"
    open(out + '.rank' + os.environ.get('RANK', '0'), 'w').write(result)
    return last


if len(sys.argv) > 4:
    from cli.train import main

    train = T.train
    T.train = lambda *args, **kwargs: done(train(*args, **kwargs))
    main(['--shards', {shards!r}, '--out', out, '--resume', '--steps', str(steps), '--workers', '0',
          '--device', 'cpu'])
else:
    hit = lambda step, m: os.environ.get('RANK') == '1' and step == 1 and os.kill(os.getpid(), signal.SIGINT)
    done(T.train(T.TrainConfig(shards={shards!r}, out=out, steps=steps, lr_crop=8, batch_size=batch, log_every=2,
                               workers=0, ckpt_every=3, device='cpu', val_shards={shards!r}, val_every=1,
                               val_samples=4, model=DASRConfig(num_experts=2, num_feat=8, num_block=1,
                                                               predictor_feat=8)),
                 progress=hit))
"""
    script = tmp_path / "run.py"
    script.write_text(code)
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script), str(tmp_path / "ddp"), "1", "6"], capture_output=True, text=True, timeout=240)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert [(tmp_path / f"ddp.rank{r}").read_text() for r in (0, 1)] == ["2 another rank", "2 SIGINT"], ddp.stderr
    # resumed at its end: every rank has nothing to train, and they end together (none waits for another)
    again = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            str(script), str(tmp_path / "ddp"), "1", "2", "resume"], capture_output=True, text=True,
                           timeout=240)
    assert again.returncode == 0, again.stderr[-3000:]
    assert [(tmp_path / f"ddp.rank{r}").read_text() for r in (0, 1)] == ["2 True", "2 True"], again.stderr
    for note in ("resuming with the run's own options", "perceptual loss off", "training on the CPU is slow",
                 "is already at step 2 (--steps 2): nothing to train", "training samples"):
        assert again.stderr.count(note) == 1, (note, again.stderr)  # rank 0's only
    subprocess.run([sys.executable, str(script), str(tmp_path / "single"), "2", "2"], check=True, capture_output=True,
                   timeout=240)
    assert sorted(p.name for p in (tmp_path / "ddp").glob("ckpt-*.pt")) == ["ckpt-2.pt"]
    a, b = load_checkpoint(tmp_path / "ddp" / "ckpt-2.pt"), load_checkpoint(tmp_path / "single" / "ckpt-2.pt")
    # Summing the gradients in another order changes them by float rounding, and Adam turns a gradient
    # near zero into a step of up to lr = 1e-4 whatever its size: on such elements the two runs differ
    # by a few percent of a step (2e-6 seen). A broken sync (each rank on its own sample) moves weights
    # by whole steps, 1e-4.
    for name, tensor in a["model"].items():
        torch.testing.assert_close(tensor, b["model"][name], rtol=1e-4, atol=1e-5, msg=name)
    lines, single = ([json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
                     for run in ("ddp", "single"))
    assert [m["step"] for m in lines] == [m["step"] for m in single] == [1, 2] and all("val" in m for m in lines)
    for mine, theirs in zip(lines, single):
        assert mine["samples_per_s"] == theirs["samples_per_s"]
        for term in ("loss", "l1", "regression"):  # the same global batch; weights equal to rounding
            assert mine[term] == pytest.approx(theirs[term], rel=1e-4), (term, mine, theirs)


def test_under_torchrun_rank_0_alone_prints_the_notes_bar_and_last_line(shards, tmp_path, monkeypatch):
    """Every torchrun process runs dasr-train: the others' notes, progress bars and last lines repeated rank 0's
    (its samples/s and loss were rank 0's own), so rank 0 alone prints them; an error shows on any rank."""
    import dasr_model.train as train_module
    from dasr_model.errors import DASRError

    def fake_train(cfg, *, progress, notify, **kwargs):
        notify("a note from the trainer")
        progress(1, {"step": 1, "loss": 0.5, "samples_per_s": 2.0, "end": 1})
        return {"step": 1}

    monkeypatch.setattr(train_module, "train", fake_train)
    args = ["--shards", shards, "--workers", "0", "--device", "cpu", "--steps", "1"]
    for rank, shown in (("0", True), ("1", False)):
        monkeypatch.setenv("RANK", rank)
        res = CliRunner().invoke(train_cli, [*args, "--out", str(tmp_path / f"run{rank}")])
        assert res.exit_code == 0, res.output
        for line in ("a note from the trainer", "loss 0.5000", "perceptual loss off", "stopped at step 1"):
            assert (line in res.output) == shown, (rank, line, res.output)
    monkeypatch.setattr(train_module, "train", lambda *args, **kwargs: (_ for _ in ()).throw(DASRError("refused")))
    res = CliRunner().invoke(train_cli, [*args, "--out", str(tmp_path / "run1")])
    assert res.exit_code == 1 and res.output.strip() == "Error: refused"


def test_time_budget_saves_a_checkpoint_and_a_small_model_file(shards, tmp_path):
    from dasr_model.infer import load_checkpoint_model

    last = train(_cfg(shards, tmp_path / "run", 50, max_minutes=1e-9))
    assert last["step"] == 1
    assert [p.name for p in (tmp_path / "run").glob("ckpt-*.pt")] == ["ckpt-1.pt"]
    exported = load_checkpoint_model(tmp_path / "run" / MODEL_FILE)
    full = load_checkpoint_model(tmp_path / "run" / "ckpt-1.pt")  # EMA generator, float32
    lr = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(exported(lr), full(lr), atol=2e-2, rtol=0)  # bf16 weights


def test_exported_release_size_model_is_under_16_mib(tmp_path):
    from dasr_model.modelfile import save_model_file

    path = save_model_file(DASR(), tmp_path / MODEL_FILE)
    assert path.stat().st_size < 16 * 2**20


def test_teacher_steps_mix_the_experts_from_the_true_vector(shards, tmp_path):
    """With the mix from the true v, the SR loss reaches the mapping net but not the predictor's convs."""
    model = DASRConfig(num_experts=2, num_feat=8, num_block=1, predictor_feat=8, mapping_gain=1.0)
    runs = {}
    for name, teacher in (("student", 0), ("teacher", 1)):
        train(_cfg(shards, tmp_path / name, 1, teacher_steps=teacher, model=model, regression_weight=0.0))
        runs[name] = load_checkpoint(tmp_path / name / "ckpt-1.pt")["model"]
    conv = "predictor.ConvNet.0.weight"
    mapping = "predictor.MappingNet.0.weight"
    torch.manual_seed(0)
    init = DASR(model).state_dict()
    assert not torch.equal(runs["student"][conv], init[conv])  # v_hat feeds the mix: the SR loss reaches P
    assert torch.equal(runs["teacher"][conv], init[conv])  # true v feeds the mix, no regression: P untouched
    assert not torch.equal(runs["teacher"][mapping], init[mapping])


def test_an_existing_run_is_never_overwritten_without_resume(shards, tmp_path):
    train(_cfg(shards, tmp_path / "run", 1))
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()}
    with pytest.raises(ValueError, match="already holds a run"):
        train(_cfg(shards, tmp_path / "run", 2))
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before
    result = CliRunner().invoke(train_cli, ["--shards", shards, "--out", str(tmp_path / "run"), "--workers", "0",
                                            "--device", "cpu", "--blocks", "1", "--features", "8"])
    assert result.exit_code == 1 and "already holds a run" in result.output


def test_cli_resume_says_from_where_and_stops_when_done(shards, tmp_path):
    args = ["--shards", shards, "--out", str(tmp_path / "run"), "--workers", "0", "--device", "cpu", "--blocks",
            "1", "--features", "8", "--experts", "2", "--lr-crop", "8", "--batch-size", "2", "--ckpt-every", "1"]
    assert CliRunner().invoke(train_cli, [*args, "--steps", "1"]).exit_code == 0
    result = CliRunner().invoke(train_cli, [*args, "--steps", "2", "--resume"])
    assert result.exit_code == 0 and "resuming from ckpt-1.pt (step 1 of 2)" in " ".join(result.output.split())
    result = CliRunner().invoke(train_cli, [*args, "--steps", "2", "--resume"])
    text = " ".join(result.output.split())  # rich wraps long lines
    assert result.exit_code == 0 and "already at step 2 (--steps 2): nothing to train" in text
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2


def test_a_checkpoint_saved_before_the_bounds_resumes_and_a_new_run_past_them_is_refused(shards, tmp_path):
    """A config saved before TrainConfig had bounds may hold values past them: a huge --steps (how a cosine
    fit to --max-minutes was asked for) and a --max-minutes over 10^7. The budget is the saving call's (a
    resume takes its own) and a step count past MAX_STEPS reads as MAX_STEPS, which no run reaches: the
    resume goes on, with --steps or without (its fitted end stops it). A new run past the bounds is refused."""
    from dasr_model.checkpoints import save_checkpoint
    from dasr_model.errors import DASRError
    from dasr_model.train import MAX_STEPS

    args = ["--shards", shards, "--workers", "0", "--device", "cpu", "--blocks", "1", "--features", "8", "--experts",
            "2", "--lr-crop", "8", "--batch-size", "2", "--lr-schedule", "cosine"]
    for name, fitted in (("given", None), ("fitted", 3)):
        run = tmp_path / name
        assert CliRunner().invoke(train_cli, [*args, "--out", str(run), "--steps", "2"]).exit_code == 0
        ckpt = load_checkpoint(run / "ckpt-2.pt")
        ckpt["config"].update(steps=2**63 - 1, max_minutes=1e8)  # as the older version saved them
        if fitted is not None:
            ckpt["schedule_steps"] = fitted  # the end it fitted to its budget
        save_checkpoint(run / "ckpt-2.pt", ckpt)
    res = CliRunner().invoke(train_cli, [*args[:2], "--out", str(tmp_path / "given"), "--resume", "--workers", "0",
                                         "--device", "cpu", "--steps", "20", "--max-minutes", "1"])
    assert res.exit_code == 0 and "resuming from ckpt-2.pt (step 2 of 20)" in " ".join(res.output.split()), res.output
    assert load_checkpoint(tmp_path / "given" / "ckpt-20.pt")["config"]["max_minutes"] == 1
    res = CliRunner().invoke(train_cli, [*args[:2], "--out", str(tmp_path / "fitted"), "--resume", "--workers", "0",
                                         "--device", "cpu", "--max-minutes", "1"])
    assert res.exit_code == 0 and "resuming from ckpt-2.pt (step 2 of 3)" in " ".join(res.output.split()), res.output
    assert json.loads((tmp_path / "fitted" / "config.json").read_text())["steps"] == MAX_STEPS
    res = CliRunner().invoke(train_cli, [*args, "--out", str(tmp_path / "new"), "--steps", str(2**63 - 1)])
    assert res.exit_code == 2 and "--steps" in res.output and not (tmp_path / "new").exists()
    with pytest.raises(DASRError, match=f"^train config: steps must be from 1 to {MAX_STEPS}, got {2**63 - 1}$"):
        TrainConfig(shards=shards, out=str(tmp_path / "new"), steps=2**63 - 1)


def test_a_saved_config_reads_counts_past_their_bounds_as_the_bound_and_a_budget_past_it_as_none():
    """From a checkpoint, the counts that are only compared with a step or a number of things (past their
    bound they act as it) read as their bound, and a budget past its bound as None; a warm-up past it is
    refused (the rate divides by it: clamping would change every step's), a wrong type too, and a new config
    past the bounds in the same line as before."""
    from dasr_model.errors import DASRError
    from dasr_model.train import MAX_STEPS

    good = TrainConfig(shards="s", out="o", model=TINY).to_dict()
    huge = {"steps": 2**63 - 1, "teacher_steps": 10**20, "val_every": 10**16, "ckpt_every": 10**16,
            "log_every": 10**400, "keep_checkpoints": 10**7, "val_samples": 2_000_000}
    old = TrainConfig.from_dict({**good, **huge, "max_minutes": 1e8})
    assert (old.steps, old.teacher_steps, old.val_every, old.ckpt_every, old.log_every) == (MAX_STEPS,) * 5
    assert (old.keep_checkpoints, old.val_samples, old.max_minutes) == (10**6, 10**6, None)
    for budget in (float("inf"), float("nan"), 10**400):
        assert TrainConfig.from_dict({**good, "max_minutes": budget}).max_minutes is None
    assert TrainConfig.from_dict({**good, "max_minutes": 90.0}).max_minutes == 90.0  # within: kept as saved
    assert TrainConfig.from_dict({**good, "workers": 2000}).workers == 1024  # the saving call's, as the budget
    with pytest.raises(DASRError, match="^train config: workers must be from 0 to 1024, got 2000$"):
        TrainConfig(shards="s", out="o", workers=2000)
    with pytest.raises(DASRError, match=f"^train config: warmup_steps must be from 0 to {MAX_STEPS}, got 10+1$"):
        TrainConfig.from_dict({**good, "warmup_steps": MAX_STEPS + 1})
    with pytest.raises(DASRError, match="^train config: max_minutes must be float or null, got '90'$"):
        TrainConfig.from_dict({**good, "max_minutes": "90"})  # a wrong type is still refused
    for name, value in huge.items():
        with pytest.raises(DASRError, match=f"^train config: {name} must be from "):
            TrainConfig(shards="s", out="o", **{name: value})
    with pytest.raises(DASRError, match="^train config: max_minutes must be a finite number from 0 to 10000000, "):
        TrainConfig(shards="s", out="o", max_minutes=1e8)


def test_ema_decay_warms_up_like_tensorflows_and_reaches_the_set_decay():
    from dasr_model.train import ema_decay_at

    cfg = TrainConfig(shards="", out="", ema_decay=0.999)
    assert ema_decay_at(0, cfg) == pytest.approx(0.1) and ema_decay_at(90, cfg) == pytest.approx(0.91)
    assert ema_decay_at(8990, cfg) == pytest.approx(0.999) and ema_decay_at(10**6, cfg) == 0.999
    assert all(ema_decay_at(t, cfg) <= ema_decay_at(t + 1, cfg) for t in range(0, 10000, 7))
    off = TrainConfig(shards="", out="", ema_decay=0.999, ema_warmup=False)
    assert ema_decay_at(0, off) == 0.999
    # The initial weights' share in the EMA after 2750 updates: 0.999^2750 without the warm-up, ~0 with it.
    share = math.prod(ema_decay_at(t, cfg) for t in range(2750))
    assert 0.999**2750 > 0.06 and share < 1e-6


def test_resume_says_when_the_ema_settings_change_and_old_configs_had_no_warmup(shards, tmp_path):
    notes = []
    train(_cfg(shards, tmp_path / "run", 1))
    train(_cfg(shards, tmp_path / "run", 2, ema_warmup=False), resume=True, notify=notes.append)
    assert any("was trained with EMA decay 0.999 warm-up; continuing with 0.999 without warm-up" in n for n in notes)
    notes.clear()
    train(_cfg(shards, tmp_path / "run", 3, ema_warmup=False), resume=True, notify=notes.append)
    assert not any("EMA" in n for n in notes)
    old = load_checkpoint(tmp_path / "run" / "ckpt-2.pt")["config"]
    del old["ema_warmup"]  # a checkpoint written before the warm-up existed
    assert TrainConfig.from_dict(old).ema_warmup is False


def test_training_updates_the_ema_with_the_warmed_up_decay(shards, tmp_path):
    """Two steps: the EMA after them, recomputed here from the two checkpoints' models with the decays of
    updates 0 and 1 (0.1 and 2/11), equals the run's; with --no-ema-warmup, 0.999 both times."""
    for warm in (True, False):
        out = tmp_path / f"w{warm}"
        train(_cfg(shards, out, 2, ckpt_every=1, keep_checkpoints=0, ema_warmup=warm))
        torch.manual_seed(0)
        ema = DASR(TINY).generator.state_dict()  # the EMA starts as the initial generator
        for step, decay in ((1, 0.1 if warm else 0.999), (2, 2 / 11 if warm else 0.999)):
            model = load_checkpoint(out / f"ckpt-{step}.pt")["model"]
            ema = {k: t.lerp(model[f"generator.{k}"], 1 - decay) for k, t in ema.items()}
        got = load_checkpoint(out / "ckpt-2.pt")["ema_generator"]
        for k, t in got.items():
            torch.testing.assert_close(t, ema[k], rtol=0, atol=1e-7, msg=k)


def test_ema_update_is_a_lerp_of_every_generator_parameter():
    """After one step the EMA generator is exactly ema + (1 - decay) (model - ema) per parameter, the
    update computed independently here with a lerp_ per parameter (the step uses one multi-tensor op)."""
    import copy

    from dasr_model.train import StepParts, train_step

    torch.manual_seed(0)
    cfg = TrainConfig(shards="", out="", model=TINY, ema_decay=0.9)
    model = DASR(TINY)
    ema = copy.deepcopy(model.generator).requires_grad_(False)
    with torch.no_grad():
        for q in ema.parameters():
            q.add_(0.01 * torch.randn_like(q))  # differs from the model, so the update does something
    before = copy.deepcopy(ema)
    parts = StepParts(net=model, model=model, ema=ema, opt=torch.optim.Adam(model.parameters(), lr=1e-3))
    train_step(parts, cfg, torch.rand(2, 3, 8, 8), torch.rand(2, 3, 32, 32), torch.rand(2, 33), bf16=False)
    with torch.no_grad():
        for old, new, m in zip(before.parameters(), ema.parameters(), model.generator.parameters()):
            assert torch.equal(new, old.clone().lerp_(m, 1 - 0.9))
            assert not torch.equal(new, old)


@pytest.mark.parametrize("device", DEVICES)
def test_as_float_is_x_over_255_exactly(device):
    """Every 8-bit value becomes exactly x / 255 (float32 true division, as the loader did on the CPU);
    anything but uint8 is refused (dividing twice would be silent). On CUDA too, where a plain
    .div_(255) would be 1 ulp off for about half the values."""
    from dasr_model.data import as_float

    x = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    expected = torch.tensor([v / 255 for v in range(256)], dtype=torch.float64).float().reshape(1, 1, 16, 16)
    assert torch.equal(as_float(x, device).cpu(), expected)
    with pytest.raises(TypeError, match="uint8"):
        as_float(x.float(), device)


def test_log_every_reads_losses_only_when_it_logs_and_trains_the_same(shards, tmp_path, monkeypatch):
    """--log-every 3 over 7 steps (checkpoints every 5): metrics lines at 3, 5 (a checkpoint), 6 and 7
    (the last); the host reads the losses at those steps only; the weights equal a run that logs every step."""
    import dasr_model.train as train_module

    reads = []
    real_step = train_module.train_step

    def watched_step(*args, **kwargs):
        losses = real_step(*args, **kwargs)
        step_no = len(reads)
        reads.append(False)

        class Loss(torch.Tensor):  # reading it (float) marks this step as read
            def __float__(self, _i=step_no):
                reads[_i] = True
                return float(self.as_subclass(torch.Tensor))

        return {k: v.as_subclass(Loss) for k, v in losses.items()}

    monkeypatch.setattr(train_module, "train_step", watched_step)
    train(_cfg(shards, tmp_path / "sparse", 7, ckpt_every=5, log_every=3))
    monkeypatch.undo()
    lines = [json.loads(x) for x in (tmp_path / "sparse" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [3, 5, 6, 7]
    assert [i + 1 for i, r in enumerate(reads) if r] == [3, 5, 6, 7]
    train(_cfg(shards, tmp_path / "dense", 7, ckpt_every=5))
    a, b = load_checkpoint(tmp_path / "sparse" / "ckpt-7.pt"), load_checkpoint(tmp_path / "dense" / "ckpt-7.pt")
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name


def test_log_every_a_stop_between_logged_steps_logs_and_saves_that_step(shards, tmp_path):
    import os
    import signal

    def interrupt(step, metrics):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    last = train(_cfg(shards, tmp_path / "run", 9, log_every=4, ckpt_every=100), progress=interrupt)
    assert last["step"] == 2 and last["stopped_by"] == "SIGINT" and math.isfinite(last["loss"])
    assert [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [2]
    assert (tmp_path / "run" / "ckpt-2.pt").exists()


def test_log_every_a_non_finite_loss_stops_before_any_checkpoint_holds_it(shards, tmp_path, monkeypatch):
    """A NaN loss from step 2 on (log every 4, checkpoint every 3) is seen at step 3, because a checkpoint
    step is always read back first: the error comes before any checkpoint could hold the NaN weights."""
    import dasr_model.train as train_module

    real_step, calls = train_module.train_step, []

    def nan_from_step_2(*args, **kwargs):
        losses = real_step(*args, **kwargs)
        calls.append(1)
        if len(calls) >= 2:
            losses["loss"] = torch.tensor(float("nan"))
        return losses

    monkeypatch.setattr(train_module, "train_step", nan_from_step_2)
    with pytest.raises(FloatingPointError, match="loss became nan"):
        train(_cfg(shards, tmp_path / "run", 9, log_every=4, ckpt_every=3))
    assert not list((tmp_path / "run").glob("ckpt-*.pt")) and len(calls) == 3


def test_cli_log_every_writes_sparse_metrics_and_shows_progress(shards, tmp_path):
    args = ["--shards", shards, "--out", str(tmp_path / "run"), "--workers", "0", "--device", "cpu", "--blocks",
            "1", "--features", "8", "--experts", "2", "--lr-crop", "8", "--batch-size", "2", "--steps", "5",
            "--log-every", "2"]
    result = CliRunner().invoke(train_cli, args)
    assert result.exit_code == 0, result.output
    assert [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [2, 4, 5]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["log_every"] == 2


def _channels_last(t) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def _watch_steps(monkeypatch) -> list[tuple]:
    """Wrap train_step: for every step, (model's strategy, EMA's strategy, predictor weights channels_last,
    LR batch channels_last, discriminator present, its weights channels_last or None)."""
    import dasr_model.train as train_module

    seen, real = [], train_module.train_step

    def watched(p, cfg, lr, target, v, bf16, **kw):
        disc = getattr(p.disc, "module", p.disc)
        seen.append((p.model.generator.conv_first.impl, p.ema.conv_first.impl,
                     _channels_last(p.model.predictor.ConvNet[0].weight), _channels_last(lr), disc is not None,
                     _channels_last(disc.conv1.weight_orig) if disc is not None else True))
        return real(p, cfg, lr, target, v, bf16, **kw)

    monkeypatch.setattr(train_module, "train_step", watched)
    return seen


def _weights(run_dir, step):
    return load_checkpoint(run_dir / f"ckpt-{step}.pt")


def _assert_trained_alike(a, b, init, atol):
    """Every weight of runs a and b within atol, and the runs moved the weights by far more than atol.

    The runs use batch 3: with an even batch, the regression term's gradient on a bias of v_hat (a sum of
    +-1 signs) can cancel exactly, and Adam turns a gradient of float-rounding size (1e-9, near its eps)
    into an update of 1e-5, which then differs between two exact computations."""
    moved = max((a["model"][k] - init[k]).abs().max().item() for k in init)
    assert moved > 30 * atol, f"the runs barely trained ({moved:.2g}): the comparison would say nothing"
    for key in ("model", "ema_generator"):
        for name, tensor in a[key].items():
            torch.testing.assert_close(tensor, b[key][name], rtol=0, atol=atol, msg=f"{key} {name}")


@pytest.mark.parametrize("impl,gan", [("stacked", True), ("dense", False)])
def test_channels_last_trains_like_nchw(shards, tmp_path, monkeypatch, impl, gan):
    """--channels-last with a strategy that keeps it, against the grouped NCHW reference: the same weights
    after 3 Adam steps to 1e-6 (they move by 3e-4 at lr 1e-4; float rounding differs, nothing else), the
    model file written from the channels_last weights the same as the checkpoint's, and config.json says."""
    from dasr_model.infer import load_checkpoint_model

    model = DASRConfig(num_experts=2, num_feat=8, num_block=1, predictor_feat=8, mapping_gain=1.0)
    train(_cfg(shards, tmp_path / "ref", 3, model=model, gan=gan, batch_size=3, expert_impl="grouped"))
    seen = _watch_steps(monkeypatch)
    train(_cfg(shards, tmp_path / "cl", 3, model=model, gan=gan, batch_size=3, expert_impl=impl, channels_last=True))
    monkeypatch.undo()
    assert len(seen) == 3 and all(s == (impl, impl, True, True, gan, True) for s in seen), seen
    torch.manual_seed(0)
    a, b = _weights(tmp_path / "cl", 3), _weights(tmp_path / "ref", 3)
    _assert_trained_alike(a, b, DASR(model).state_dict(), atol=1e-6)
    # Not the discriminator's weights: 27k of its 4.4M gradients are under 1e-7 at init, where Adam turns
    # float rounding into updates of up to its learning rate; its gradients are compared in the next test.
    run = json.loads((tmp_path / "cl" / "config.json").read_text())
    assert run["channels_last"] is True and run["run"]["memory_format"] == "channels_last"
    assert run["run"]["expert_impl"] == impl
    lr = torch.rand(1, 3, 8, 8)
    with torch.no_grad():  # bf16 weights in the model file, float32 in the checkpoint
        torch.testing.assert_close(load_checkpoint_model(tmp_path / "cl" / MODEL_FILE)(lr),
                                   load_checkpoint_model(tmp_path / "cl" / "ckpt-3.pt")(lr), atol=2e-2, rtol=0)


def test_compile_trains_like_eager_without_graph_breaks(shards, tmp_path, monkeypatch):
    """--compile: the step's network goes through torch.compile in the mode asked for, in one graph per
    variant (no graph breaks; a second graph where --teacher-steps ends), and trains like eager (1e-6 after
    3 steps). Inductor needs a C++ compiler and ~40 s per graph on CPU, so the test traces through
    dynamo and AOT autograd with the aot_eager backend; benchmarks/gpu_speed_run.py runs inductor on CUDA."""
    from torch._dynamo.utils import counters

    import dasr_model.train as train_module

    real_compile, modes = torch.compile, []

    def aot_eager(net, mode=None, dynamic=None):
        modes.append(mode)
        return real_compile(net, backend="aot_eager", dynamic=dynamic)

    model = DASRConfig(num_experts=2, num_feat=8, num_block=1, predictor_feat=8, mapping_gain=1.0)
    train(_cfg(shards, tmp_path / "eager", 3, model=model, teacher_steps=1, batch_size=3))
    torch._dynamo.reset()
    counters.clear()
    monkeypatch.setattr(train_module.torch, "compile", aot_eager)
    train(_cfg(shards, tmp_path / "compiled", 3, model=model, teacher_steps=1, batch_size=3, compile="reduce-overhead"))
    monkeypatch.undo()
    assert modes == ["reduce-overhead"]
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 2  # teacher step (v_mix given) and the rest
    torch.manual_seed(0)
    _assert_trained_alike(_weights(tmp_path / "compiled", 3), _weights(tmp_path / "eager", 3),
                          DASR(model).state_dict(), atol=1e-6)
    assert json.loads((tmp_path / "compiled" / "config.json").read_text())["compile"] == "reduce-overhead"
    torch._dynamo.reset()


def test_compile_mode_is_checked_and_the_cli_passes_both_options(shards, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="compile must be one of"):
        train(_cfg(shards, tmp_path / "bad", 1, compile="fast"))
    monkeypatch.setenv("WORLD_SIZE", "2")  # under DDP: no CUDA-graph modes, refused before anything starts
    for mode in ("reduce-overhead", "max-autotune"):
        with pytest.raises(ValueError, match="records CUDA graphs"):
            train(_cfg(shards, tmp_path / "bad", 1, compile=mode))
    monkeypatch.delenv("WORLD_SIZE")
    assert not (tmp_path / "bad").exists()
    result = CliRunner().invoke(train_cli, ["--shards", shards, "--out", str(tmp_path / "bad"), "--compile", "fast"])
    assert result.exit_code == 2 and "fast" in result.output
    args = ["--shards", shards, "--out", str(tmp_path / "run"), "--workers", "0", "--device", "cpu", "--blocks",
            "1", "--features", "8", "--experts", "2", "--lr-crop", "8", "--batch-size", "2", "--steps", "1",
            "--channels-last", "--expert-impl", "stacked", "--precision", "bf16"]
    result = CliRunner().invoke(train_cli, args)
    assert result.exit_code == 0, result.output
    run = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (run["channels_last"], run["expert_impl"], run["compile"], run["precision"]) == (True, "stacked", "off",
                                                                                          "bf16")
    assert run["run"]["dtype"] == "bfloat16 autocast"


def test_cli_choices_match_the_library():
    from dasr_model.config import EXPERT_IMPLS
    from dasr_model.train import COMPILE_MODES, PRECISIONS

    params = {p.name: p for p in train_cli.params}
    assert tuple(params["expert_impl"].type.choices) == ("auto", *EXPERT_IMPLS)
    assert tuple(params["compile_mode"].type.choices) == COMPILE_MODES
    assert tuple(params["precision"].type.choices) == PRECISIONS


@pytest.mark.parametrize("impl", ["grouped", "stacked"])
def test_channels_last_step_gives_the_same_gradients(impl):
    """One train_step with the GAN term from the same weights and batch, NCHW against channels_last:
    every gradient of G and P within 1e-4 of its tensor's largest (float32 rounding: ~3e-6). D's gradients
    within 1e-2: D sees sr, which differs by float rounding (1e-7), and D's leaky ReLUs turn that into up
    to 1.2e-3 between two exact NCHW strategies too; D alone, fed the same input, is held to 1e-4 below."""
    import copy

    from dasr_model.losses import UNetDiscriminatorSN
    from dasr_model.model import set_expert_impl
    from dasr_model.train import StepParts, train_step

    torch.manual_seed(0)
    cfg = TrainConfig(shards="", out="", gan=True, model=DASRConfig(num_experts=2, num_feat=8, num_block=1,
                                                                     predictor_feat=8, mapping_gain=1.0))
    model0, disc0 = DASR(cfg.model), UNetDiscriminatorSN()
    lr, hr, v = torch.rand(3, 3, 8, 8), torch.rand(3, 3, 32, 32), torch.rand(3, 33)
    grads = []
    for fmt, strategy in ((torch.contiguous_format, "grouped"), (torch.channels_last, impl)):
        model, disc = set_expert_impl(copy.deepcopy(model0), strategy), copy.deepcopy(disc0)
        model.predictor.to(memory_format=fmt)
        disc.to(memory_format=fmt)
        parts = StepParts(net=model, model=model, ema=copy.deepcopy(model.generator).requires_grad_(False),
                          opt=torch.optim.Adam(model.parameters()), disc=disc,
                          opt_d=torch.optim.Adam(disc.parameters()))
        train_step(parts, cfg, lr.contiguous(memory_format=fmt), unsharp_mask(hr).contiguous(memory_format=fmt), v,
                   bf16=False)
        if fmt == torch.channels_last:
            assert disc.conv1.weight_orig.is_contiguous(memory_format=torch.channels_last)
        grads.append({f"{part} {k}": p.grad.clone() for part, m in (("G+P", model), ("D", disc))
                      for k, p in m.named_parameters()})
    ref, got = grads
    assert ref.keys() == got.keys()
    for name, g in ref.items():
        err, rel = (got[name] - g).abs().max().item(), 1e-2 if name.startswith("D ") else 1e-4
        assert 0 < g.abs().max().item(), f"{name}: no gradient"
        assert err <= rel * g.abs().max().item(), f"{name}: {err:.3g} vs max {g.abs().max().item():.3g}"


def test_channels_last_discriminator_gives_the_same_gradients_and_power_iteration():
    """The spectral-norm discriminator in channels_last, fed the same images as in NCHW (three forward
    passes, as a step makes, each one power iteration): gradients and the u, v vectors within 1e-4 of
    each tensor's largest value (float32 rounding: ~3e-6)."""
    import copy

    from dasr_model.losses import UNetDiscriminatorSN, gan_loss

    torch.manual_seed(0)
    disc0 = UNetDiscriminatorSN()
    images = [torch.rand(3, 3, 32, 32) for _ in range(3)]
    states = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        disc = copy.deepcopy(disc0).to(memory_format=fmt)
        loss = sum(gan_loss(disc(x.contiguous(memory_format=fmt)), real=i % 2 == 0) for i, x in enumerate(images))
        loss.backward()
        states.append({**{k: p.grad for k, p in disc.named_parameters()},
                       **{k: b for k, b in disc.named_buffers() if k.endswith(("_u", "_v"))}})
    ref, got = states
    assert len(ref) == 2 + 3 * 8 + 2  # conv0 weight + bias; 8 spectral-norm convs: weight_orig, u, v; conv9 w + b
    for name, t in ref.items():
        err = (got[name] - t).abs().max().item()
        assert err <= 1e-4 * t.abs().max().item(), f"{name}: {err:.3g} vs max {t.abs().max().item():.3g}"


def test_auto_expert_impl_on_cpu_is_grouped_and_trains_exactly_like_it(shards, tmp_path):
    train(_cfg(shards, tmp_path / "auto", 2))  # expert_impl "auto" is the default
    train(_cfg(shards, tmp_path / "grouped", 2, expert_impl="grouped"))
    a, b = _weights(tmp_path / "auto", 2), _weights(tmp_path / "grouped", 2)
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    run = json.loads((tmp_path / "auto" / "config.json").read_text())
    assert run["expert_impl"] == "auto" and run["run"]["expert_impl"] == "grouped"
    assert run["run"]["memory_format"] == "NCHW" and "expert_impl_probe_ms" not in run["run"]
    with pytest.raises(ValueError, match="expert_impl must be one of auto, grouped"):
        train(_cfg(shards, tmp_path / "bad", 1, expert_impl="winograd"))


def _probe_parts(gan: bool):
    import copy

    from dasr_model.losses import UNetDiscriminatorSN
    from dasr_model.model import set_expert_impl
    from dasr_model.train import StepParts

    torch.manual_seed(0)
    model = set_expert_impl(DASR(TINY), "bmm")
    model.predictor.to(memory_format=torch.channels_last)
    disc = UNetDiscriminatorSN(num_feat=8).to(memory_format=torch.channels_last) if gan else None
    return StepParts(net=model, model=model, ema=copy.deepcopy(model.generator),
                     opt=torch.optim.Adam(model.parameters()), disc=disc,
                     opt_d=torch.optim.Adam(disc.parameters()) if gan else None)


def test_probe_times_each_candidate_in_its_layout_and_leaves_everything_as_it_was():
    """A clock that advances by a set duration per strategy: the probe reports exactly those durations;
    each candidate ran whole training steps (G, P and D) on input in its own memory format, with the
    predictor and discriminator in that format; afterwards weights, EMA, the discriminator's power-iteration
    vectors, gradients, optimiser state, strategy and memory formats are as they were."""
    from dasr_model.train import AUTO_CANDIDATES, probe_expert_impls

    parts = _probe_parts(gan=True)
    model, disc = parts.model, parts.disc
    before = {k: t.clone() for m in (model, disc, parts.ema) for k, t in m.state_dict().items()}
    cost = {"grouped": 5.0, "dense": 3.0, "stacked": 1.0, "bmm": 4.0, "folded": 2.0}
    now = [0.0]

    def clock() -> float:
        now[0] += cost[model.generator.conv_first.impl]
        return now[0]

    seen = []
    hooks = [model.generator.conv_first.register_forward_pre_hook(
                 lambda m, args: seen.append(("G", m.impl, _channels_last(args[0])))),
             model.predictor.register_forward_pre_hook(
                 lambda m, args: seen.append(("P", _channels_last(m.ConvNet[0].weight), _channels_last(args[0])))),
             disc.register_forward_pre_hook(
                 lambda m, args: seen.append(("D", _channels_last(m.conv1.weight_orig), _channels_last(args[0]))))]
    cfg = TrainConfig(shards="", out="", gan=True, model=TINY)
    times = probe_expert_impls(parts, cfg, (2, 3, 8, 8), False, AUTO_CANDIDATES, repeats=2, clock=clock)
    for h in hooks:
        h.remove()
    assert times == {(impl, cl): cost[impl] for impl, cl in AUTO_CANDIDATES}
    # per step: P, G, then D three times (G's GAN term, real, fake); 3 steps per candidate. D's fake input is
    # G's output, channels_last for the channels_last candidates (dense and stacked keep the format).
    expected = [x for impl, cl in AUTO_CANDIDATES for _ in range(3)
                for x in (("P", cl, cl), ("G", impl, cl), ("D", cl, cl), ("D", cl, cl), ("D", cl, cl))]
    assert seen == expected
    after = {k: t for m in (model, disc, parts.ema) for k, t in m.state_dict().items()}
    assert all(torch.equal(t, before[k]) for k, t in after.items())
    assert all(p.grad is None for m in (model, disc) for p in m.parameters())
    assert not parts.opt.state and not parts.opt_d.state and all(p.requires_grad for p in disc.parameters())
    assert {m.impl for m in model.modules() if hasattr(m, "impl")} == {"bmm"}
    assert _channels_last(model.predictor.ConvNet[0].weight) and _channels_last(disc.conv1.weight_orig)


def test_probe_skips_a_candidate_out_of_memory_and_raises_other_errors():
    from dasr_model.train import AUTO_CANDIDATES, probe_expert_impls

    parts = _probe_parts(gan=False)
    cfg = TrainConfig(shards="", out="", model=TINY)
    failing = {"dense": torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9 GiB"),
               "stacked": RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED")}

    def fail(m, args):
        if m.impl in failing:
            raise failing[m.impl]

    hook = parts.model.generator.conv_first.register_forward_pre_hook(fail)
    times = probe_expert_impls(parts, cfg, (2, 3, 8, 8), False, AUTO_CANDIDATES, repeats=1)
    assert set(times) == {("grouped", False), ("bmm", False), ("folded", True)}
    assert parts.model.generator.conv_first.impl == "bmm"
    failing["grouped"] = RuntimeError("expected scalar type Float but found Half")  # a bug, not memory
    with pytest.raises(RuntimeError, match="expected scalar type"):
        probe_expert_impls(parts, cfg, (2, 3, 8, 8), False, AUTO_CANDIDATES, repeats=1)
    hook.remove()
    assert parts.model.generator.conv_first.impl == "bmm"  # restored on the way out too


def test_probe_seconds_count_in_the_budget_but_not_in_samples_per_s(shards, tmp_path, monkeypatch):
    """The expert-impl probe (a stand-in sleeping 1 s here) is spent within --max-minutes, but the logged
    samples/s is the training's: with the probe's second in it, step 1's 2 samples would read under 2/s."""
    import dasr_model.train as train_module

    def slow_choice(*args, **kwargs):
        time.sleep(1.0)
        return "grouped", False, {"grouped": 1.0}

    monkeypatch.setattr(train_module, "choose_expert_impl", slow_choice)
    last = train(_cfg(shards, tmp_path / "run", 5, max_minutes=0.9 / 60))  # 0.9 s: spent by the probe
    assert last["step"] == 1 and last["stopped_by"] == "max_minutes"
    assert last["samples_per_s"] > 2.0


def test_auto_on_a_gpu_takes_the_fastest_candidate_and_training_applies_it(shards, tmp_path, monkeypatch):
    """choose_expert_impl on a (named) CUDA device picks the probe's fastest candidate, restricted to
    channels_last ones by --channels-last; train() applies what "auto" chose to the model, the EMA copy,
    the predictor, the discriminator and the batches (the same weights as that strategy set by hand), and
    records it with the probe's times."""
    import dasr_model.train as train_module

    fake = {("grouped", False): 0.004, ("dense", True): 0.003, ("stacked", True): 0.002, ("bmm", False): 0.005}
    asked = []

    def probe(parts, cfg, shape, bf16, candidates):
        asked.append((shape, list(candidates)))
        return {c: fake.get(c, 0.001 if c == ("grouped", True) else 0.009) for c in candidates}

    monkeypatch.setattr(train_module, "probe_expert_impls", probe)
    cfg = _cfg(shards, tmp_path / "x", 1, batch_size=4)
    impl, cl, ms = train_module.choose_expert_impl(None, cfg, torch.device("cuda"), True, (8, 6))
    assert (impl, cl) == ("stacked", True) and ms["stacked channels_last"] == pytest.approx(2.0)
    assert asked[-1] == ((4, 3, 8, 6), list(train_module.AUTO_CANDIDATES))
    impl, cl, _ = train_module.choose_expert_impl(None, _cfg(shards, tmp_path / "x", 1, channels_last=True),
                                                  torch.device("cuda"), True, (8, 8))
    assert (impl, cl) == ("grouped", True)  # channels_last candidates only: grouped in channels_last was fastest
    assert all(layout for _, layout in asked[-1][1])
    # Under DDP: the probe runs at the per-process batch (--batch-size is per process), and each candidate
    # counts at its slowest rank: here the other rank ran out of memory with stacked, so dense wins.
    import torch.distributed as dist

    def other_rank(t, op=None):
        t.copy_(torch.maximum(t, torch.tensor([0.004, 0.003, float("inf"), 0.005, 0.009], dtype=t.dtype)))

    monkeypatch.setattr(dist, "all_reduce", other_rank)
    monkeypatch.setattr(dist, "get_backend", lambda: "gloo")  # the reduction's tensor on the CPU here
    impl, cl, ms = train_module.choose_expert_impl(None, cfg, torch.device("cuda"), True, (8, 8), world=2)
    assert asked[-1][0] == (4, 3, 8, 8) and (impl, cl) == ("dense", True) and "stacked channels_last" not in ms
    monkeypatch.setattr(train_module, "probe_expert_impls", lambda *a: {})
    monkeypatch.setattr(dist, "all_reduce", lambda t, op=None: None)
    with pytest.raises(ValueError, match="every strategy ran out of GPU memory at batch 4"):
        train_module.choose_expert_impl(None, cfg, torch.device("cuda"), True, (8, 8))

    monkeypatch.setattr(train_module, "choose_expert_impl",
                        lambda *a, **kw: ("stacked", True, {"grouped": 4.0, "stacked channels_last": 2.0}))
    seen = _watch_steps(monkeypatch)
    model = DASRConfig(num_experts=2, num_feat=8, num_block=1, predictor_feat=8, mapping_gain=1.0)
    train(_cfg(shards, tmp_path / "auto", 2, model=model, gan=True, batch_size=3))
    monkeypatch.undo()
    assert seen == [("stacked", "stacked", True, True, True, True)] * 2  # model, EMA, P, batch, D: as chosen
    train(_cfg(shards, tmp_path / "hand", 2, model=model, gan=True, batch_size=3, expert_impl="stacked",
               channels_last=True))
    a, b = _weights(tmp_path / "auto", 2), _weights(tmp_path / "hand", 2)
    for key in ("model", "ema_generator", "discriminator"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key} {name}"
    run = json.loads((tmp_path / "auto" / "config.json").read_text())["run"]
    assert (run["expert_impl"], run["memory_format"]) == ("stacked", "channels_last")
    assert run["expert_impl_probe_ms"] == {"grouped": 4.0, "stacked channels_last": 2.0}


@pytest.mark.parametrize("device", DEVICES)
def test_probe_times_every_candidate_for_real_under_bf16(device):
    """The probe as a GPU run calls it (bf16 autocast, GAN): every candidate runs real training steps
    and gets a positive time. On the CPU, CPU autocast stands in for the GPU's: the dtypes must fit."""
    from dasr_model.train import AUTO_CANDIDATES, probe_expert_impls

    parts = _probe_parts(gan=True)
    parts.model.to(device), parts.disc.to(device), parts.ema.to(device)
    cfg = TrainConfig(shards="", out="", gan=True, model=TINY)
    times = probe_expert_impls(parts, cfg, (2, 3, 8, 8), True, AUTO_CANDIDATES, repeats=1)
    assert set(times) == set(AUTO_CANDIDATES) and all(t > 0 for t in times.values())


@pytest.mark.cuda
def test_cuda_auto_takes_the_graphs_choice_or_probes_and_trains(shards, tmp_path):
    """dasr-train's defaults on a GPU: bf16, a CUDA graph, and with more than one expert GRAPH_CHOICE untimed;
    without the graph (--no-cuda-graph) expert_impl auto times every candidate. Both train."""
    from dasr_model.train import AUTO_CANDIDATES, GRAPH_CHOICE

    assert TINY.num_experts > 1
    train(_cfg(shards, tmp_path / "run", 2, device="cuda"))
    run = json.loads((tmp_path / "run" / "config.json").read_text())["run"]
    assert (run["expert_impl"], run["memory_format"] == "channels_last") == GRAPH_CHOICE
    assert not run.get("expert_impl_probe_ms") and run["dtype"] == "bfloat16 autocast"
    train(_cfg(shards, tmp_path / "eager", 2, device="cuda", cuda_graph=False))
    run = json.loads((tmp_path / "eager" / "config.json").read_text())["run"]
    assert len(run["expert_impl_probe_ms"]) == len(AUTO_CANDIDATES) and run["dtype"] == "bfloat16 autocast"


@pytest.mark.parametrize("gan", [False, True])
def test_a_bf16_step_gives_the_gradients_of_the_fp32_step(gan):
    """One train_step under bf16 autocast (CPU autocast here, CUDA's on a GPU) against the same step in
    float32, from the same weights and batch: the gradients of G, of P (with the mapping net) and of D
    point the same way (cosine > 0.995 per network; seen 0.9989 to 1.0) and are as large (norms within
    3 %); the losses agree to 1 %. The optimisers have lr 0, so the gradients are read after the step.
    A bf16 step towards the inverted target gives G a cosine of -0.25 (-0.09 with the GAN)."""
    import copy

    from dasr_model.losses import UNetDiscriminatorSN
    from dasr_model.train import StepParts, train_step

    cfg = TrainConfig(shards="", out="", gan=gan, model=TINY)
    gen = torch.Generator().manual_seed(1)
    lr, target = torch.rand(3, 3, 12, 12, generator=gen), torch.rand(3, 3, 48, 48, generator=gen)
    v = torch.rand(3, 33, generator=gen)
    grads, losses = {}, {}
    for bf16 in (True, False):
        torch.manual_seed(0)
        model = DASR(DASRConfig(num_experts=2, num_feat=8, num_block=1, predictor_feat=8, mapping_gain=1.0))
        disc = UNetDiscriminatorSN(num_feat=8) if gan else None
        parts = StepParts(net=model, model=model, ema=copy.deepcopy(model.generator).requires_grad_(False),
                          opt=torch.optim.Adam(model.parameters(), lr=0.0), disc=disc,
                          opt_d=torch.optim.Adam(disc.parameters(), lr=0.0) if gan else None)
        losses[bf16] = {k: float(t) for k, t in train_step(parts, cfg, lr, target, v, bf16).items()}
        nets = {"G": model.generator, "P": model.predictor, **({"D": disc} if gan else {})}
        grads[bf16] = {k: torch.cat([p.grad.flatten().float() for p in m.parameters()]) for k, m in nets.items()}
    for name, b in grads[False].items():
        a = grads[True][name]
        assert float(b.norm()) > 0, name
        assert float(torch.nn.functional.cosine_similarity(a, b, dim=0)) > 0.995, name
        assert abs(float(a.norm() / b.norm()) - 1) < 0.03, name
    for k, x in losses[False].items():
        assert losses[True][k] == pytest.approx(x, rel=1e-2), k


@pytest.mark.parametrize("impl,channels_last", [("grouped", False), ("stacked", True)])
def test_bf16_precision_runs_the_step_in_bf16_with_float32_weights(shards, tmp_path, monkeypatch, impl,
                                                                     channels_last):
    """--precision bf16 on the CPU (CPU autocast): the path a GPU run takes by default, with the GAN, the
    teacher phase and validation. The generator's convolutions compute in bf16, weights and EMA stay
    float32, and after 3 steps the weights differ from the fp32 run's (the precision took effect; how
    close bf16's gradients are is the test above: 3 Adam steps move no weight by more than about 4e-4,
    so the 2e-3 bound here only catches a blow-up); config.json says which arithmetic ran."""
    import dasr_model.train as train_module

    dtypes = []
    real_step = train_module.train_step

    def watched(parts, *args, **kwargs):
        hook = parts.model.generator.conv_first.register_forward_hook(lambda m, a, out: dtypes.append(out.dtype))
        try:
            return real_step(parts, *args, **kwargs)
        finally:
            hook.remove()

    monkeypatch.setattr(train_module, "train_step", watched)
    runs = {}
    for precision in ("bf16", "fp32"):
        cfg = _cfg(shards, tmp_path / precision, 3, gan=True, teacher_steps=1, val_shards=shards, val_every=2,
                   val_samples=2, expert_impl=impl, channels_last=channels_last, precision=precision)
        last = train(cfg)
        assert last["step"] == 3 and math.isfinite(last["loss"]) and "val" in last
        runs[precision] = load_checkpoint(tmp_path / precision / "ckpt-3.pt")
        run = json.loads((tmp_path / precision / "config.json").read_text())
        assert run["precision"] == precision
        assert run["run"]["dtype"] == ("bfloat16 autocast" if precision == "bf16" else "float32")
    assert dtypes == [torch.bfloat16] * 3 + [torch.float32] * 3
    moved = 0
    for key in ("model", "ema_generator"):
        for name, a in runs["bf16"][key].items():
            b = runs["fp32"][key][name]
            assert a.dtype == b.dtype, name  # float32 weights (and int buffers) either way
            if a.is_floating_point():
                torch.testing.assert_close(a, b, atol=2e-3, rtol=0, msg=name)  # 3 Adam steps of 1e-4 each
                moved += not torch.equal(a, b)
    assert moved > 0
    with pytest.raises(ValueError, match="precision must be one of"):  # DASRError is a ValueError
        train(_cfg(shards, tmp_path / "bad", 1, precision="fp16"))


@pytest.mark.parametrize("cores,local,workers", [(1, None, 1), (2, None, 1), (5, None, 2), (16, None, 8),
                                                 (64, None, 8), (16, "2", 4), (16, "8", 1), (64, "4", 8)])
def test_default_loader_workers_follow_the_cores(monkeypatch, cores, local, workers):
    """Half the cores, shared among torchrun's processes on the machine (LOCAL_WORLD_SIZE), 1 to 8."""
    import cli.train as cli_train

    monkeypatch.setattr(cli_train.os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    if local is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
    assert cli_train.default_workers() == workers


def test_cli_without_workers_uses_the_default(shards, tmp_path, monkeypatch):
    import cli.train as cli_train

    monkeypatch.setattr(cli_train, "default_workers", lambda: 0)  # no worker processes in this test
    args = ["--shards", shards, "--out", str(tmp_path / "run"), "--device", "cpu", "--blocks", "1", "--features",
            "8", "--experts", "2", "--lr-crop", "8", "--batch-size", "2", "--steps", "1"]
    assert CliRunner().invoke(train_cli, args).exit_code == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["workers"] == 0


def test_more_loader_processes_than_cores_get_a_note():
    from dasr_model.train import workers_note

    assert workers_note(2, 2) is None and workers_note(0, 1) is None and workers_note(4, 16, world=4) is None
    assert "1024 loader processes on 2 cores" in workers_note(1024, 2)
    assert "8 loader processes on 4 cores" in workers_note(4, 4, world=2)


def test_notes_for_a_dropped_discriminator_and_a_teacher_phase_that_never_ends(shards, tmp_path):
    """--resume --no-gan drops the discriminator and its optimiser state, which no later --resume --gan gets
    back; --teacher-steps past the run's end never lets the predictor's mix train: each is said."""
    notes: list[str] = []
    train(_cfg(shards, tmp_path / "gan", 2, gan=True))
    train(_cfg(shards, tmp_path / "gan", 3, gan=False), resume=True, notify=notes.append)
    assert any("has a discriminator, which this resume without --gan drops" in n for n in notes), notes
    notes.clear()
    train(_cfg(shards, tmp_path / "teach", 2, teacher_steps=5), notify=notes.append)
    assert "note: --teacher-steps 5 covers every step to 2: the expert mix comes from the true v throughout, " \
        "never from the predictor" in notes
    notes.clear()
    train(_cfg(shards, tmp_path / "short", 3, teacher_steps=2), notify=notes.append)
    assert not [n for n in notes if "teacher" in n]


def test_a_resume_that_changes_the_data_or_arithmetic_says_so(shards, tmp_path):
    """A resume given another --seed (other batches), --shards, --precision, --lr-crop or --sharpen continues
    differently from the uninterrupted run: one note names each change; the same shards spelt another way
    are the same."""
    notes: list[str] = []
    train(_cfg(shards, tmp_path / "run", 2))
    relative = os.path.relpath(shards)
    train(_cfg(relative, tmp_path / "run", 3), resume=True, notify=notes.append)
    assert not [n for n in notes if "continues with" in n]
    train(_cfg(shards, tmp_path / "run", 4, seed=5, sharpen_gt=False), resume=True, notify=notes.append)
    assert [n for n in notes if "continues with" in n] == [
        "note: ckpt-3.pt continues with --seed 0 -> 5, --sharpen on -> off: its steps from here differ from an "
        "uninterrupted run's"]


def test_the_loss_is_the_weighted_sum_and_the_predictor_learns_from_the_regression_term():
    """train_step's loss is pixel_weight x L1 + regression_weight x the L1 between v_hat and v, and the
    regression term is what teaches the predictor: with its gradient cut (detached), every test passed (a
    mutation audit). Oracle: with pixel_weight 0 the loss is the regression term and the predictor's
    parameters alone move (the generator has no gradient: Adam moves it by exactly 0); with other weights,
    the sum of the terms the step reports."""
    from dasr_model.train import train_step

    from .test_graphstep import _batch, _parts

    parts, cfg = _parts("cpu", gan=False)
    cfg = dataclasses.replace(cfg, pixel_weight=0.0, regression_weight=1.0)
    before = {k: p.detach().clone() for k, p in parts.model.named_parameters()}
    out = train_step(parts, cfg, *_batch(0, "cpu"), False)
    assert out["loss"].item() == out["regression"].item() > 0
    moved = {k for k, p in parts.model.named_parameters() if not torch.equal(p, before[k])}
    assert moved and {k.split(".")[0] for k in moved} == {"predictor"}, sorted(moved)[:5]
    parts, cfg = _parts("cpu", gan=False)
    cfg = dataclasses.replace(cfg, pixel_weight=0.3, regression_weight=2.0)
    out = train_step(parts, cfg, *_batch(1, "cpu"), False)
    assert out["loss"].item() == pytest.approx(0.3 * out["l1"].item() + 2 * out["regression"].item(), rel=1e-6)
