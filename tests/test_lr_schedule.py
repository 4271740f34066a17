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
    kw = {"model": TINY, "ckpt_every": 10_000, "batch_size": 2, "device": "cpu", "lr": 1e-3, **kw}  # last step saves
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
    for name, kw in {"const": {}, "warm": {"warmup_steps": 4}}.items():
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
    notes, ends = [], {}

    def tick(step, m):
        clock[0] += 0.125
        ends[step] = m["end"]

    cfg = _cfg(shards, tmp_path / "run", 1000, lr_schedule="cosine", max_minutes=0.1)
    last = train(cfg, progress=tick, notify=notes.append)
    end = 7 + int(0.95 * (5 / (6 * 0.125 - 1 * 0.125)) * (6 - 6 * 0.125))
    assert end == 46
    assert last["step"] == end and last["stopped_by"] == "schedule"
    assert "--lr-schedule cosine fitted to --max-minutes 0.1: it ends at step 46" in notes
    assert (ends[6], ends[7], ends[46]) == (1000, 46, 46)  # what the progress bar is told
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
    # a constant rate ignores the fitted end (and says what changed), trains on, and still passes the end on
    last = train(_cfg(shards, run, 48), resume=True, notify=notes.append)
    assert last["step"] == 48 and "stopped_by" not in last
    assert ("note: ckpt-46.pt was trained with lr 0.001, cosine, 0 warm-up steps; continuing with lr 0.001, "
            "constant, 0 warm-up steps") in notes
    assert load_checkpoint(run / "ckpt-48.pt")["schedule_steps"] == end
    # a hostile checkpoint's end is refused, not trusted
    ckpt = load_checkpoint(run / "ckpt-46.pt")
    ckpt["schedule_steps"] = -3
    (run / "ckpt-48.pt").unlink()  # the newest checkpoint is the one resumed
    save_checkpoint(run / "ckpt-46.pt", ckpt)
    with pytest.raises(DASRError, match="schedule_steps must be a positive integer"):
        train(_cfg(shards, run, 1000, lr_schedule="cosine"), resume=True)


def test_a_cosine_run_extended_on_resume_says_its_rate_jumps(shards, tmp_path):
    """--steps sets where the cosine ends, so a resume with more steps raises the rate again (at the end of
    10 steps 2.4e-6 of 1e-4, then 5e-5): allowed, and said with both rates (it was silent)."""
    run = tmp_path / "run"
    train(_cfg(shards, run, 10, lr_schedule="cosine", lr=1e-4))
    notes = []
    train(_cfg(shards, run, 20, lr_schedule="cosine", lr=1e-4), resume=True, notify=notes.append)
    rates = {m["step"]: m["lr"] for m in _metrics(run)}
    assert rates[10] == pytest.approx(1e-4 * (1 + math.cos(math.pi * 9 / 10)) / 2)
    assert rates[11] == pytest.approx(1e-4 * (1 + math.cos(math.pi * 10 / 20)) / 2) == pytest.approx(5e-5)
    assert (f"note: the rate's schedule ended at step 10 and now ends at 20: the next step's rate is {5e-5:.3g}, "
            f"where the checkpoint's schedule gave {0.0:.3g}") in notes
    notes.clear()
    train(_cfg(shards, run, 22, lr=1e-4), resume=True, notify=notes.append)  # constant: its own note
    assert not any("schedule ended" in n for n in notes)


def test_a_run_resumed_before_its_fit_fits_then(shards, tmp_path, monkeypatch):
    """A first session too short to fit (0.5 s: 4 steps) saves no end; the resumed one measures steps 9 to 14
    of the run (its 5th to 10th) and fits where 95 % of the 5.25 s left of its 6 s runs out at 8 steps/s."""
    clock = _fake_clock(monkeypatch)

    def tick(step, m):
        clock[0] += 0.125

    last = train(_cfg(shards, tmp_path / "run", 1000, lr_schedule="cosine", max_minutes=0.5 / 60), progress=tick)
    assert last["step"] == 4 and last["stopped_by"] == "max_minutes"
    assert "schedule_steps" not in load_checkpoint(tmp_path / "run" / "ckpt-4.pt")
    notes = []
    last = train(_cfg(shards, tmp_path / "run", 1000, lr_schedule="cosine", max_minutes=0.1), resume=True,
                 progress=tick, notify=notes.append)
    end = 4 + 7 + int(0.95 * 8 * (6 - 0.75))
    assert last["step"] == end == 50 and last["stopped_by"] == "schedule"
    assert f"--lr-schedule cosine fitted to --max-minutes 0.1: it ends at step {end}" in notes


def test_a_fit_inside_the_warmup_warns_and_a_warmup_longer_than_the_run_is_refused(shards, tmp_path, monkeypatch):
    clock = _fake_clock(monkeypatch)

    def tick(step, m):
        clock[0] += 0.125

    notes = []
    last = train(_cfg(shards, tmp_path / "run", 1000, lr_schedule="cosine", warmup_steps=100, max_minutes=0.1),
                 progress=tick, notify=notes.append)
    assert last["step"] == 46
    assert ("--lr-schedule cosine fitted to --max-minutes 0.1: it ends at step 46; warning: inside the 100-step "
            "warm-up, so the rate never anneals (use fewer --warmup-steps)") in notes
    with pytest.raises(DASRError, match="--warmup-steps 10 leaves no step of --steps 10 to anneal"):
        train(_cfg(shards, tmp_path / "b", 10, lr_schedule="cosine", warmup_steps=10))
    assert train(_cfg(shards, tmp_path / "c", 2, warmup_steps=10))["step"] == 2  # a constant rate: only a ramp


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
    with pytest.raises(DASRError, match="warmup_steps must be from 0 to 1000000000000000"):
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


def test_cli_bar_follows_the_fitted_end_and_says_why_it_stopped(shards, tmp_path, monkeypatch):
    """The trainer tells the bar where the run ends (a fit moves it); the CLI names the fitted end as the stop."""
    def fake_train(cfg, *, resume, restart, progress, notify, source, checkpoint, held):
        progress(1, {"end": 1000})
        progress(7, {"end": 46})
        progress(46, {"end": 46, "step": 46, "loss": 0.1, "samples_per_s": 1.0})
        return {"step": 46, "stopped_by": "schedule"}

    monkeypatch.setattr(train_module, "train", fake_train)
    result = CliRunner().invoke(train_cli, ["--shards", shards, "--out", str(tmp_path / "run"), "--device", "cpu",
                                            "--steps", "1000", "--lr-schedule", "cosine", "--max-minutes", "1"])
    text = " ".join(result.output.split())
    assert result.exit_code == 0, result.output
    assert "46/46" in text and "/1000" not in text
    assert "stopped at step 46 (the end of --lr-schedule, fitted to --max-minutes)" in text
