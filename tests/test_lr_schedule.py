"""The learning-rate schedule of dasr-train: warm-up, cosine, the end fitted to --max-minutes, resume."""

from __future__ import annotations

import json
import math
import types

import pytest

torch = pytest.importorskip("torch")

from click.testing import CliRunner  # noqa: E402

import dasr_model.train as train_module  # noqa: E402
from cli.train import main as train_cli  # noqa: E402
from dasr_model.checkpoints import load_checkpoint, save_checkpoint  # noqa: E402
from dasr_model.errors import DASRError  # noqa: E402
from dasr_model.model import DASR, DASRConfig  # noqa: E402
from dasr_model.train import LR_SCHEDULES, TrainConfig, lr_at, train  # noqa: E402

from .conftest import make_small_dataset  # noqa: E402

TINY = DASRConfig(num_experts=2, num_feat=8, num_block=1, predictor_feat=8)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return make_small_dataset(tmp_path_factory.mktemp("sched") / "ds", count=12, seed=1, shard_size=12)


def _cfg(shards, out, steps, **kw):
    kw = {"model": TINY, "ckpt_every": 2, "batch_size": 2, "device": "cpu", "lr": 1e-3, **kw}
    return TrainConfig(shards=shards, out=str(out), steps=steps, lr_crop=8, workers=0, **kw)


def _metrics(run) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _fake_clock(monkeypatch) -> list[float]:
    """train()'s clock made a list the test advances (each read adds 1 ns more, so no interval is 0);
    the speed measured over steps 2 to 7."""
    clock, reads = [0.0], [0]

    def perf_counter() -> float:
        reads[0] += 1
        return clock[0] + 1e-9 * reads[0]

    monkeypatch.setattr(train_module, "time", types.SimpleNamespace(perf_counter=perf_counter))
    monkeypatch.setattr(train_module, "FIT_FROM", 2)
    monkeypatch.setattr(train_module, "FIT_STEPS", 5)
    return clock


def test_lr_at_ramps_up_then_follows_half_a_cosine_down_to_zero():
    cos = TrainConfig(shards="", out="", lr=1e-3, lr_schedule="cosine", warmup_steps=4)
    # hand-computed: the ramp (step + 1) / 4, then p = (step - 4) / (14 - 4) and lr (1 + cos(pi p)) / 2
    expected = {0: 2.5e-4, 1: 5e-4, 3: 1e-3, 4: 1e-3, 9: 5e-4, 13: 1e-3 * (1 - 0.9510565162951535) / 2, 14: 0.0,
                20: 0.0}
    for step, lr in expected.items():
        assert lr_at(step, cos, 14) == pytest.approx(lr, rel=1e-12, abs=1e-18), step
    const = TrainConfig(shards="", out="", lr=1e-3, warmup_steps=2)
    assert [lr_at(s, const, 5) for s in range(5)] == [5e-4, 1e-3, 1e-3, 1e-3, 1e-3]
    assert [lr_at(s, TrainConfig(shards="", out="", lr=1e-3), 3) for s in range(3)] == [1e-3] * 3  # the release's
    assert LR_SCHEDULES == ("constant", "cosine")


def test_adam_takes_the_scheduled_rate(shards, tmp_path):
    """Adam's first update moves every weight with a non-zero gradient by lr (its m / sqrt(v) is +-1): a warm-up
    of 4 steps makes the first update a quarter of the constant run's, weight by weight."""
    torch.manual_seed(0)  # train() builds its model right after this call: the same initial weights
    start = DASR(TINY).state_dict()
    runs = {}
    for name, kw in {"const": {}, "warm": {"lr_schedule": "cosine", "warmup_steps": 4}}.items():
        train(_cfg(shards, tmp_path / name, 1, ckpt_every=1, **kw))
        runs[name] = load_checkpoint(tmp_path / name / "ckpt-1.pt")["model"]
    key = "generator.conv_first.weight"
    moved = (runs["const"][key] - start[key]).abs()
    ratio = (runs["warm"][key] - start[key]).abs()[moved > 5e-4] / moved[moved > 5e-4]
    assert ratio.numel() > 50
    torch.testing.assert_close(ratio, torch.full_like(ratio, 0.25), rtol=0.02, atol=0)
    assert [m["lr"] for m in _metrics(tmp_path / "warm")] == [2.5e-4]


def test_a_cosine_run_logs_its_rates_and_resumes_exactly(shards, tmp_path):
    kw = {"lr_schedule": "cosine", "warmup_steps": 2}
    train(_cfg(shards, tmp_path / "full", 6, **kw))
    train(_cfg(shards, tmp_path / "split", 3, **kw, ckpt_every=3))
    train(_cfg(shards, tmp_path / "split", 6, **kw), resume=True)
    full, split = load_checkpoint(tmp_path / "full" / "ckpt-6.pt"), load_checkpoint(tmp_path / "split" / "ckpt-6.pt")
    for key in ("model", "ema_generator"):
        for name, tensor in full[key].items():
            assert torch.equal(tensor, split[key][name]), name
    assert "schedule_steps" not in full  # the end is --steps: nothing more to keep
    # an independent formula: the ramp over 2 steps, then a cosine over the 4 left
    expected = [1e-3 * (s + 1) / 2 if s < 2 else 1e-3 * (1 + math.cos(math.pi * (s - 2) / 4)) / 2 for s in range(6)]
    assert [m["lr"] for m in _metrics(tmp_path / "full")] == pytest.approx(expected, rel=1e-12)
    assert [m["lr"] for m in _metrics(tmp_path / "split")] == pytest.approx(expected, rel=1e-12)


def test_a_cosine_schedule_is_fitted_to_the_time_budget_and_kept_on_resume(shards, tmp_path, monkeypatch):
    """A fake clock: every step takes 0.125 s, the budget is 6 s. The speed is measured from step 2 to step 7
    (FIT_FROM, FIT_STEPS made small), so the end is where 95 % of the 5.25 s left runs out at 8 steps/s."""
    clock = _fake_clock(monkeypatch)
    notes = []

    def tick(step, m):
        clock[0] += 0.125

    cfg = _cfg(shards, tmp_path / "run", 1000, lr_schedule="cosine", max_minutes=0.1)
    last = train(cfg, progress=tick, notify=notes.append)
    end = 7 + int(0.95 * (5 / (6 * 0.125 - 1 * 0.125)) * (6 - 6 * 0.125))
    assert end == 46
    assert last["step"] == end and last["stopped_by"] == "schedule"
    assert "--lr-schedule cosine fitted to --max-minutes 0.1: it ends at step 46" in notes
    run = tmp_path / "run"
    assert json.loads((run / "config.json").read_text())["run"]["schedule_steps"] == end
    assert load_checkpoint(run / "ckpt-46.pt")["schedule_steps"] == end
    rates = {m["step"]: m["lr"] for m in _metrics(run)}
    assert rates[7] == pytest.approx(1e-3 * (1 + math.cos(math.pi * 6 / 1000)) / 2)  # before the fit: over --steps
    assert rates[8] == pytest.approx(1e-3 * (1 + math.cos(math.pi * 7 / end)) / 2)  # after: over the fitted end
    assert rates[end] == pytest.approx(1e-3 * (1 + math.cos(math.pi * (end - 1) / end)) / 2) and rates[end] < 1e-5
    # a resume keeps the fitted end (the schedule is a function of the step), with or without a budget
    again = train(_cfg(shards, run, 1000, lr_schedule="cosine", max_minutes=5), resume=True, notify=notes.append)
    assert again == {"step": end, "nothing_to_train": True}
    assert any("its schedule fitted to --max-minutes ends at 46" in n for n in notes)
    # a hostile checkpoint's end is refused, not trusted
    ckpt = load_checkpoint(run / "ckpt-46.pt")
    ckpt["schedule_steps"] = -3
    save_checkpoint(run / "ckpt-46.pt", ckpt)
    with pytest.raises(DASRError, match="schedule_steps must be a positive integer"):
        train(_cfg(shards, run, 1000, lr_schedule="cosine"), resume=True)


def test_a_constant_rate_or_a_short_run_is_never_fitted(shards, tmp_path, monkeypatch):
    clock = _fake_clock(monkeypatch)

    def tick(step, m):
        clock[0] += 0.125

    last = train(_cfg(shards, tmp_path / "const", 60, max_minutes=0.1), progress=tick)
    assert last["step"] == 48 and last["stopped_by"] == "max_minutes"  # the budget alone ends it: 48 x 0.125 = 6 s
    last = train(_cfg(shards, tmp_path / "short", 7, lr_schedule="cosine", max_minutes=0.1), progress=tick)
    assert last["step"] == 7 and "stopped_by" not in last
    assert json.loads((tmp_path / "short" / "config.json").read_text())["run"]["schedule_steps"] == 7


def test_bad_schedule_settings_are_refused(shards, tmp_path):
    with pytest.raises(DASRError, match="lr_schedule must be one of constant, cosine"):
        train(_cfg(shards, tmp_path / "a", 2, lr_schedule="step"))
    with pytest.raises(DASRError, match="warmup_steps must be 0 or more"):
        train(_cfg(shards, tmp_path / "b", 2, warmup_steps=-1))


def test_cli_passes_the_schedule(shards, tmp_path):
    params = {p.name: p for p in train_cli.params}
    assert tuple(params["lr_schedule"].type.choices) == LR_SCHEDULES
    run = tmp_path / "run"
    result = CliRunner().invoke(train_cli, [
        "--shards", shards, "--out", str(run), "--workers", "0", "--device", "cpu", "--blocks", "1", "--features",
        "8", "--experts", "2", "--lr-crop", "8", "--batch-size", "2", "--steps", "3", "--lr", "2e-3",
        "--lr-schedule", "cosine", "--warmup-steps", "1"])
    assert result.exit_code == 0, result.output
    config = json.loads((run / "config.json").read_text())
    assert (config["lr"], config["lr_schedule"], config["warmup_steps"]) == (2e-3, "cosine", 1)
    assert [m["lr"] for m in _metrics(run)] == pytest.approx([2e-3, 2e-3, 1e-3])
    bad = CliRunner().invoke(train_cli, ["--shards", shards, "--out", str(tmp_path / "x"), "--warmup-steps", "-1"])
    assert bad.exit_code == 2


def test_a_resume_takes_the_new_rate_not_the_checkpoints(shards, tmp_path):
    """Adam's load_state_dict restores the rate it was saved with; the trainer sets the asked one every step."""
    train(_cfg(shards, tmp_path / "run", 2))
    train(_cfg(shards, tmp_path / "run", 3, lr=5e-4, ckpt_every=1), resume=True)
    assert [m["lr"] for m in _metrics(tmp_path / "run")] == [1e-3, 1e-3, 5e-4]
    assert load_checkpoint(tmp_path / "run" / "ckpt-3.pt")["optimizer"]["param_groups"][0]["lr"] == 5e-4
