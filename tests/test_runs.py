"""dasr-train runs as a user meets them: never overwritten, signals save, resume is clean, damaged
checkpoints skipped, old ones pruned, errors in one line before the first step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import cv2  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from cli.sr import eval_main, sr_main  # noqa: E402
from cli.train import main as train_cli  # noqa: E402
from dasr_model.checkpoints import latest_intact, load_checkpoint, save_checkpoint  # noqa: E402
from dasr_model.errors import DASRError  # noqa: E402
from dasr_model.evaluate import evaluate_pairs, pairs_from_shards  # noqa: E402
from dasr_model.infer import load_checkpoint_model, super_resolve, to_image, to_tensor, upscale  # noqa: E402
from dasr_model.model import DASRConfig  # noqa: E402
from dasr_model.train import TrainConfig, train  # noqa: E402
from degrade.io import to_uint8  # noqa: E402

from .conftest import make_small_dataset  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = DASRConfig(num_experts=2, num_feat=8, num_block=1, predictor_feat=8)
TINY_ARGS = ["--workers", "0", "--device", "cpu", "--blocks", "1", "--features", "8", "--experts", "2",
             "--lr-crop", "8", "--batch-size", "2"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return make_small_dataset(tmp_path_factory.mktemp("runs") / "ds", count=8, seed=3, shard_size=8)


def _cfg(shards, out, steps, **kw):
    return TrainConfig(shards=shards, out=str(out), steps=steps, batch_size=2, lr_crop=8, workers=0, device="cpu",
                       model=TINY, **kw)


def _steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _ckpts(run: Path) -> list[str]:
    return sorted((p.name for p in run.glob("ckpt-*.pt")), key=lambda n: int(n[5:-3]))


def test_a_run_that_failed_before_its_first_step_does_not_block_its_folder(shards, tmp_path):
    """What a run leaves when it fails after its checks but before step 1 (a NaN at step 0, out of device
    memory): config.json and an empty metrics.jsonl. The corrected retry starts there; a folder whose log
    has steps but no checkpoint is still a run, and the refusal says --restart, not --resume."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"shards": shards, "steps": 5, "run": {"device": "cpu"}}))
    (run / "metrics.jsonl").write_bytes(b"")
    retry = CliRunner().invoke(train_cli, ["--shards", shards, "--out", str(run), "--steps", "1", *TINY_ARGS])
    assert retry.exit_code == 0, retry.output
    assert _steps(run) == [1] and json.loads((run / "config.json").read_text())["steps"] == 1
    logged = tmp_path / "logged"
    logged.mkdir()
    (logged / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "lo')  # the second line torn
    refused = CliRunner().invoke(train_cli, ["--shards", shards, "--out", str(logged), "--steps", "1", *TINY_ARGS])
    assert refused.exit_code == 1 and "stopped before its first checkpoint" in " ".join(refused.output.split())
    resumed = CliRunner().invoke(train_cli, ["--shards", shards, "--out", str(logged), "--resume", *TINY_ARGS])
    assert resumed.exit_code == 1 and "--restart" in resumed.output


@pytest.mark.parametrize("files", [{"config.json": '{"my": "important settings"}'},
                                   {"config.json": "not JSON"},
                                   {"metrics.jsonl": "my notes\n"},
                                   {"config.json": '{"my": 1}', "metrics.jsonl": ""}],
                         ids=["json", "text", "notes", "both"])
def test_a_new_run_never_overwrites_a_config_or_metrics_it_did_not_write(shards, tmp_path, files):
    """Without --resume or --restart a run rewrites config.json and metrics.jsonl: refused where they are not a
    dasr-train run's, both left as they were."""
    out = tmp_path / "proj"
    out.mkdir()
    for name, text in files.items():
        (out / name).write_text(text)
    result = CliRunner().invoke(train_cli, ["--shards", shards, "--out", str(out), "--steps", "1", *TINY_ARGS])
    assert result.exit_code == 1 and "is not a file of a dasr-train run" in " ".join(result.output.split())
    result = CliRunner().invoke(train_cli, ["--shards", shards, "--out", str(out), "--steps", "1", "--restart",
                                            *TINY_ARGS])  # --restart deletes a run's files, not these
    assert result.exit_code == 1 and "a run would delete it" in " ".join(result.output.split())
    assert {p.name: p.read_text() for p in out.iterdir()} == files


def test_odd_files_in_a_run_folder_are_never_read_whole_or_waited_on(tmp_path):
    """A config.json that is /dev/zero (read until MemoryError), deep brackets (RecursionError) or a folder,
    a metrics.jsonl that is a FIFO (open hung): each is simply not a run's."""
    import os

    from dasr_model.runs import foreign_run_file

    for name, make in (("config.json", lambda p: p.symlink_to("/dev/zero")),
                       ("config.json", lambda p: p.write_text("[" * 200_000)), ("config.json", lambda p: p.mkdir()),
                       ("metrics.jsonl", lambda p: os.mkfifo(p))):
        out = tmp_path / f"run-{len(list(tmp_path.iterdir()))}"
        out.mkdir()
        make(out / name)
        assert foreign_run_file(out) == name


def test_a_config_of_an_older_trainer_is_a_runs_own(shards, tmp_path):
    """Configs written before the "run" record was added (2026-11-26) are a dasr-train run's: a retry of one
    that failed before its first logged step starts there, as for a newer one."""
    run = tmp_path / "old"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(TrainConfig(shards=shards, out=str(run)).to_dict()))
    (run / "metrics.jsonl").write_bytes(b"")
    result = CliRunner().invoke(train_cli, ["--shards", shards, "--out", str(run), "--steps", "1", *TINY_ARGS])
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def one_step_run(shards, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("one") / "run"
    train(_cfg(shards, run, 1, gan=True, sharpen_gt=False))
    return run


def _optimizer_state(ckpt: dict, how: str) -> None:
    state = ckpt["optimizer"]
    if how == "shape":
        state["state"][0]["exp_avg"] = torch.zeros(3)
    else:
        state["param_groups"][0]["betas"] = (0.9,)


@pytest.mark.parametrize("edit,message", [
    ({"steps": "9"}, "steps must be int"),
    ({"ckpt_every": 0}, "ckpt_every must be from 1 to 1000000000000000"),
    ({"log_every": 0}, "log_every must be from 1 to 1000000000000000"),
    ({"batch_size": 0}, "Error: train config: batch_size must be from 1 to 65536"),  # one prefix, not two
    ({"batch_size": 10**11}, "batch_size must be from 1 to 65536"),  # was a 745 GiB allocation
    ({"teacher_steps": None}, "teacher_steps must be int"),
    ({"seed": -1}, "seed must be from 0"),
    ({"lr": float("nan")}, "lr must be a finite number"),
    ({"gan": "yes"}, "gan must be bool"),
    ("shape", "exp_avg of shape (3,) is for another parameter"),
    ("betas", "betas (0.9,) are not two numbers"),
])
def test_a_checkpoint_whose_config_or_state_lies_is_refused_in_one_line(one_step_run, shards, tmp_path, edit,
                                                                        message):
    """A checkpoint is data: its config and optimiser state are checked before they are used (each of these
    was a traceback: TypeError, ZeroDivisionError, IndexError, MemoryError, a RuntimeError at the first step)."""
    run = tmp_path / "run"
    run.mkdir()
    ckpt = load_checkpoint(one_step_run / "ckpt-1.pt")
    if isinstance(edit, dict):
        ckpt["config"].update(edit)
    else:
        _optimizer_state(ckpt, edit)
    save_checkpoint(run / "ckpt-1.pt", ckpt)
    result = CliRunner().invoke(train_cli, ["--shards", shards, "--out", str(run), "--resume", "--steps", "2",
                                            "--gan", "--no-sharpen", *TINY_ARGS])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert message in " ".join(result.output.split()), result.output


def test_train_config_takes_numpy_numbers_and_no_crop_and_refuses_out_of_bounds_options_in_one_line(shards,
                                                                                                     tmp_path):
    """Numbers of numpy's types (a sweep's np.logspace) are numbers; lr_crop None trains on whole patches; an
    option beyond the config's bounds is one line from the CLI (the config's refusal was a traceback)."""
    cfg = TrainConfig(shards=shards, out=str(tmp_path / "np"), steps=np.int64(1), batch_size=2, lr=np.float64(1e-4),
                      betas=(np.float32(0.9), 0), lr_crop=None, workers=0, device="cpu", model=TINY)
    assert type(cfg.steps) is int and type(cfg.lr) is float and [type(b) for b in cfg.betas] == [float, float]
    assert train(cfg)["step"] == 1
    assert list(load_checkpoint(tmp_path / "np" / "ckpt-1.pt")["config"]["betas"]) == [0.8999999761581421, 0.0]
    with pytest.raises(DASRError, match="train config: lr must be a finite number, got an integer too large"):
        TrainConfig.from_dict({**cfg.to_dict(), "lr": 10**400, "model": TINY.to_dict()})
    with pytest.raises(DASRError, match="model config: mapping_gain must be a finite number"):
        TrainConfig.from_dict({**cfg.to_dict(), "model": {**TINY.to_dict(), "mapping_gain": 10**400}})
    import cli.train
    import dasr_model.train

    assert (cli.train.MAX_STEPS, cli.train.MAX_MINUTES) == (dasr_model.train.MAX_STEPS, dasr_model.train.MAX_MINUTES)
    for option, value in (("--batch-size", "70000"), ("--lr-crop", "70000"), ("--workers", "2000"),
                          ("--seed", str(2**64)), ("--warmup-steps", str(10**400)), ("--steps", str(10**400)),
                          ("--max-minutes", "1e308")):  # the last three overflowed floats in the first steps
        result = CliRunner().invoke(train_cli, ["--shards", shards, "--out", str(tmp_path / "r"), "--steps", "1",
                                                *TINY_ARGS, option, value])
        assert result.exit_code == 2 and option in result.output and isinstance(result.exception, SystemExit)


def test_restart_deletes_the_old_run_only_when_asked(shards, tmp_path):
    run = tmp_path / "run"
    train(_cfg(shards, run, 2, ckpt_every=1))
    (run / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    refused = CliRunner().invoke(train_cli, ["--shards", shards, "--out", str(run), "--steps", "1", *TINY_ARGS])
    assert refused.exit_code == 1 and "already holds a run" in refused.output and "--restart" in refused.output
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # refused: nothing touched
    both = CliRunner().invoke(train_cli, ["--shards", shards, "--out", str(run), "--resume", "--restart", *TINY_ARGS])
    assert both.exit_code == 2
    again = CliRunner().invoke(train_cli, ["--shards", shards, "--out", str(run), "--steps", "1", "--restart",
                                           *TINY_ARGS])
    assert again.exit_code == 0, again.output
    assert _ckpts(run) == ["ckpt-1.pt"] and _steps(run) == [1] and (run / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("to", ["the process", "its group"])
def test_sigterm_leaves_a_resumable_checkpoint(shards, tmp_path, to):
    """Also when the signal reaches the loader's worker processes too, as torchrun's stop and a scheduler's
    preemption of a process group send it: PyTorch's workers died of it, and the run ended in a traceback
    ('DataLoader worker ... is killed by signal: Terminated') without a checkpoint."""
    run = tmp_path / "run"
    workers = ["--workers", "2"] if to == "its group" else []
    proc = subprocess.Popen([sys.executable, "-m", "cli.train", "--shards", shards, "--out", str(run),
                             "--steps", "100000", "--ckpt-every", "100000", *TINY_ARGS, *workers],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while not ((run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text().count("\n") >= 2):
        assert time.monotonic() < deadline and proc.poll() is None, proc.stdout.read() if proc.poll() else "slow"
        time.sleep(0.1)
    if to == "its group":
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 143, output
    assert "SIGTERM: saved" in output
    (ckpt,) = run.glob("ckpt-*.pt")
    step = load_checkpoint(ckpt)["step"]
    assert step >= 2 and _steps(run) == list(range(1, step + 1))
    resumed = CliRunner().invoke(train_cli, ["--shards", shards, "--out", str(run), "--steps", str(step + 1),
                                             "--resume", *TINY_ARGS])
    assert resumed.exit_code == 0, resumed.output
    assert _steps(run) == list(range(1, step + 2))


def test_a_resume_without_a_readable_checkpoint_says_so_and_warns_once(shards, tmp_path):
    """The command and the trainer each looked for the newest intact checkpoint: each damaged one was
    warned about twice."""
    run = tmp_path / "run"
    args = ["--shards", shards, "--out", str(run), *TINY_ARGS]
    assert CliRunner().invoke(train_cli, [*args, "--steps", "2"]).exit_code == 0
    (run / "ckpt-2.pt").write_bytes((run / "ckpt-2.pt").read_bytes()[:500])
    result = CliRunner().invoke(train_cli, [*args, "--steps", "4", "--resume"])
    assert result.exit_code == 1 and result.output.count("skipping ckpt-2.pt") == 1, result.output
    assert "--resume: no readable checkpoint" in result.output
    # a folder that never held a run (a new one, a typo) has nothing to start over: --restart was the advice
    result = CliRunner().invoke(train_cli, ["--shards", shards, "--out", str(tmp_path / "new"), *TINY_ARGS,
                                            "--steps", "2", "--resume"])
    assert result.exit_code == 1 and "holds no checkpoint to resume; start a run there without --resume" in \
        result.output and "--restart" not in result.output, result.output


def test_resume_after_a_kill_keeps_each_step_once_and_skips_a_damaged_checkpoint(shards, tmp_path):
    run = tmp_path / "run"
    train(_cfg(shards, run, 4, ckpt_every=2))
    # What kill -9 during step 5 of a longer run leaves: metrics past the checkpoint, a torn last line,
    # and a newer checkpoint that was half copied (restored from a backup, say).
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 5, "loss": 1.0}) + "\n" + '{"step": 6, "lo')
    (run / "ckpt-6.pt").write_bytes((run / "ckpt-4.pt").read_bytes()[:1000])
    (run / "ckpt-best.pt").write_bytes(b"not ours")
    notes = []
    last = train(_cfg(shards, run, 6, ckpt_every=2), resume=True, notify=notes.append)
    assert last["step"] == 6
    assert any("skipping ckpt-6.pt" in n for n in notes) and any("resuming from ckpt-4.pt" in n for n in notes)
    assert _steps(run) == [1, 2, 3, 4, 5, 6]
    assert (run / "ckpt-best.pt").read_bytes() == b"not ours"
    reference = tmp_path / "ref"
    train(_cfg(shards, reference, 6, ckpt_every=2))
    a, b = load_checkpoint(run / "ckpt-6.pt"), load_checkpoint(reference / "ckpt-6.pt")
    assert all(torch.equal(t, b["model"][k]) for k, t in a["model"].items())


def test_the_metrics_log_is_synced_to_disk_before_each_checkpoint(shards, tmp_path, monkeypatch):
    """A checkpoint survives a power loss (atomic, synced); the log lines up to its step must too, or a
    resume after one would continue from a step whose history is gone. Each save is preceded by a sync of
    metrics.jsonl holding that step's line."""
    import dasr_model.train as train_module

    run = tmp_path / "run"
    events = []
    real_fsync = os.fsync

    def fsync(fd):
        name = os.readlink(f"/proc/self/fd/{fd}")
        if name.endswith("metrics.jsonl"):
            events.append(("metrics synced", _steps(run)[-1] if (run / "metrics.jsonl").read_text() else None))
        real_fsync(fd)

    real_save = train_module.save_checkpoint
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(train_module, "save_checkpoint", lambda path, state: (
        events.append(("saved", int(Path(path).stem[5:]))), real_save(path, state)))
    train(_cfg(shards, run, 3, ckpt_every=2))
    assert events == [("metrics synced", 2), ("saved", 2), ("metrics synced", 3), ("saved", 3)]


def test_a_checkpoint_save_on_a_full_disk_says_so(tmp_path, monkeypatch):
    """torch's zip writer turns a failed write into a RuntimeError that has lost its reason ('unexpected pos
    4093120 vs 4093008'): the error is the OS's, naming the checkpoint, and the save leaves nothing behind."""
    import errno

    from cli.common import os_error

    class FullDisk:
        """The checkpoint's temporary file, on a disk with room for 1000 more bytes."""

        def __init__(self, f):
            self.f, self.room = f, 1000

        def write(self, data):
            if len(data) > self.room:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.room -= len(data)
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    real_fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda fd, mode: FullDisk(real_fdopen(fd, mode)))
    with pytest.raises(OSError) as caught:
        save_checkpoint(tmp_path / "ckpt-2.pt", {"step": 2, "model": {"w": torch.zeros(10_000)}})
    assert caught.value.errno == errno.ENOSPC
    assert os_error(caught.value) == f"{tmp_path / 'ckpt-2.pt'}: No space left on device"  # dasr-train's line
    assert list(tmp_path.iterdir()) == []


def test_old_checkpoints_are_pruned_and_config_records_what_ran(shards, tmp_path):
    run = tmp_path / "run"
    notes = []
    train(_cfg(shards, run, 5, ckpt_every=1, keep_checkpoints=2), notify=notes.append)
    assert _ckpts(run) == ["ckpt-4.pt", "ckpt-5.pt"]
    config = json.loads((run / "config.json").read_text())
    assert config["device"] == "cpu" and config["run"]["device"].startswith("cpu (")
    assert config["run"]["parameters"] == TINY.parameter_count() and config["run"]["dtype"] == "float32"
    assert not list(run.glob("*.tmp"))
    assert any("float32" in n and f"{TINY.parameter_count():,} parameters" in n for n in notes)
    train(_cfg(shards, tmp_path / "all", 3, ckpt_every=1, keep_checkpoints=0))
    assert _ckpts(tmp_path / "all") == ["ckpt-1.pt", "ckpt-2.pt", "ckpt-3.pt"]
    assert latest_intact(tmp_path / "nothing-here") is None


@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX locks")
def test_a_second_dasr_train_on_a_running_folder_is_refused_and_the_lock_lives_with_the_run(shards, tmp_path):
    """RUN/.dasr-train.lock, held by the run: another dasr-train on the folder (here the lock held by this
    test, on a file description of its own, as another process's would be) is refused in one line before
    it reads anything, with nothing written, set aside or deleted, --restart and --resume included; once
    free the run goes ahead and leaves no lock file. A run refused before it wrote anything leaves no
    folder where it made one, parents included, also through ".."."""
    from degrade.io import exclusive_lock

    run = tmp_path / "run"
    train(_cfg(shards, run, 2, ckpt_every=1, keep_checkpoints=0))
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    assert ".dasr-train.lock" not in before and "ckpt-2.pt" in before
    with exclusive_lock(run / ".dasr-train.lock", maker="test", busy="held", error=RuntimeError):
        for extra in ([], ["--restart"], ["--resume", "--steps", "3"]):
            result = CliRunner().invoke(train_cli, ["--shards", shards, "--out", str(run), "--steps", "1",
                                                    *TINY_ARGS, *extra])
            assert result.exit_code == 1 and "Traceback" not in result.output, result.output
            assert result.output.count("\n") == 1 and \
                f"{run}: another dasr-train is running in this folder" in result.output, result.output
        assert {p.name: p.read_bytes() for p in run.iterdir() if p.name != ".dasr-train.lock"} == before
    train(_cfg(shards, run, 3), resume=True)
    assert _steps(run) == [1, 2, 3] and not (run / ".dasr-train.lock").exists()
    for deep in (tmp_path / "a" / "b" / "run", tmp_path / "c" / ".." / "d"):
        with pytest.raises(DASRError, match="larger than the dataset's LR patches"):
            train(replace(_cfg(shards, deep, 1), lr_crop=40))
        refused = CliRunner().invoke(train_cli, ["--shards", shards, "--out", str(deep), *TINY_ARGS, "--lr-crop",
                                                 "40"])
        assert refused.exit_code == 1 and "larger than" in refused.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


@pytest.mark.parametrize("other", [4, 3, 6])
def test_processes_that_would_resume_from_different_steps_are_stopped(monkeypatch, other):
    """Under torchrun rank 0 reads the newest checkpoint holding the run folder, the others without: if a
    checkpoint was saved in between, they would start from different steps. One all-reduce (faked here:
    another rank at step `other`) finds that, on every rank."""
    import torch.distributed as dist

    from dasr_model.train import check_ranks_start_together

    def all_reduce(t, op):
        assert op == dist.ReduceOp.MAX
        t.copy_(torch.maximum(t, torch.tensor([other, -other])))

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    if other == 4:
        check_ranks_start_together(4, torch.device("cpu"))
    else:
        with pytest.raises(DASRError, match=f"start from different steps \\({min(4, other)} and {max(4, other)}\\)"):
            check_ranks_start_together(4, torch.device("cpu"))


def test_holding_a_run_folder_removes_only_the_empty_folders_it_made(tmp_path, monkeypatch):
    """hold_run_folder's clean-up: each folder it made that the block left empty goes, also beside a folder
    the run wrote into (a path through ".."); an error inside the block is the block's (a missing file
    there is not taken for the race it retries on); a link to nothing is refused in one line; ranks other
    than 0 make and hold nothing."""
    from dasr_model.train import hold_run_folder

    monkeypatch.chdir(tmp_path)
    with hold_run_folder("x/c/../d"):
        Path("x/d/metrics.jsonl").write_text("")
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == ["x", "x/d", "x/d/metrics.jsonl"]
    with pytest.raises(FileNotFoundError, match="the block's own"):
        with hold_run_folder("y/run"):
            raise FileNotFoundError("the block's own")
    assert not Path("y").exists()
    Path("dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(DASRError, match="dangling: is a symlink to nothing"):
        with hold_run_folder("dangling"):
            pass
    monkeypatch.setenv("RANK", "1")
    with hold_run_folder("z/run"):
        assert not Path("z").exists()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX locks")
@pytest.mark.parametrize("next_holds_it", [False, True])
def test_a_lock_file_its_holder_removed_while_we_opened_it_is_not_ours(tmp_path, monkeypatch, next_holds_it):
    """exclusive_lock(remove=True) deletes its file while still holding it. A process that had opened that
    file just before gets a lock on a file no path names: it must open the path again, and take that
    lock if it is free, or be refused if the next run holds it, whose file it must leave alone (it
    deleted it before, and a third run then ran beside the second). Simulated: the file is replaced right
    after our first open, and held by another open file description or not."""
    import fcntl

    import degrade.io as dio

    lock = tmp_path / ".lock"
    real_open, opened, held = os.open, [], []

    def open_then_replaced(path, flags, mode=0o777):
        fd = real_open(path, flags, mode)
        if not opened:  # the first open: the old holder removes the file, the next run makes its own
            os.unlink(path)
            lock.write_bytes(b"next")
            if next_holds_it:
                held.append(open(lock, "a"))
                fcntl.flock(held[0], fcntl.LOCK_EX | fcntl.LOCK_NB)
        opened.append(fd)
        return fd

    monkeypatch.setattr(dio.os, "open", open_then_replaced)
    if next_holds_it:
        with pytest.raises(RuntimeError, match="busy"):
            with dio.exclusive_lock(lock, maker="test", busy="busy", error=RuntimeError, remove=True):
                pass
        assert lock.read_bytes() == b"next"  # the next run's lock file, still there
        held[0].close()
    else:
        with dio.exclusive_lock(lock, maker="test", busy="busy", error=RuntimeError, remove=True):
            assert len(opened) == 2 and lock.read_bytes() == b"next"  # the path's file, opened again
        assert not lock.exists()


@pytest.mark.parametrize("args,message", [
    (["--lr-crop", "40"], "--lr-crop 40 is larger than the dataset's LR patches (16x16)"),
    (["--lr-crop", "6"], "--lr-crop 6: the sharpened target needs an LR side of at least 7"),  # was a traceback
    (["--lr-crop", "9", "--gan"], "--lr-crop 9: the GAN's discriminator needs an even LR side"),  # was a traceback
    (["--features", "4096"], "over the limit"),
    (["--device", "tpu"], "not a device name"),
    (["--device", "cuda:7"], "cuda"),
])
def test_bad_runs_are_one_line_before_anything_is_written(shards, tmp_path, args, message):
    if args[-1].startswith("cuda") and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    run = tmp_path / "run"
    result = CliRunner().invoke(train_cli, ["--shards", shards, "--out", str(run), "--steps", "1", *TINY_ARGS, *args])
    assert result.exit_code == 1 and message in " ".join(result.output.split()), result.output
    assert "Traceback" not in result.output and not run.exists()


def test_the_smallest_crops_the_refusals_allow_do_train(shards, tmp_path):
    """The bounds above are the step's own: 7 with the sharpened target, an even crop with the GAN."""
    for name, extra in (("sharp", ["--lr-crop", "7"]), ("gan", ["--lr-crop", "10", "--gan", "--no-sharpen"])):
        result = CliRunner().invoke(train_cli, ["--shards", shards, "--out", str(tmp_path / name), "--steps", "1",
                                                *TINY_ARGS, *extra])
        assert result.exit_code == 0, result.output


def test_a_damaged_label_stops_training_naming_the_data_not_the_rate(shards, tmp_path, monkeypatch):
    """A v of NaN in the shards stopped the run as 'loss became nan ... the last checkpoint before it is
    intact (lower --lr?)', with no checkpoint there. Now the sample is named; a NaN loss says whether a
    checkpoint exists."""
    import h5py

    src = Path(make_small_dataset(tmp_path / "ds", count=8, seed=3, shard_size=8))
    with h5py.File(src / "shard-00000.h5", "r+") as f:
        f["v"][5, 0] = np.nan
    args = ["--shards", str(src), "--out", str(tmp_path / "run"), "--steps", "8", *TINY_ARGS]
    result = CliRunner().invoke(train_cli, args)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "training data: sample 5: its v is not 33 numbers in [0, 1]" in " ".join(result.output.split())
    _losses_become_nan(monkeypatch)
    result = CliRunner().invoke(train_cli, ["--shards", shards, "--out", str(tmp_path / "nan"), *args[4:]])
    assert result.exit_code == 1 and "loss became nan at step 1; no checkpoint was written" in " ".join(
        result.output.split()), result.output


def _losses_become_nan(monkeypatch) -> None:
    """Every training step's loss reads NaN from here (the step itself runs as ever)."""
    import dasr_model.train as train_module

    real_step = train_module.train_step

    def nan_loss(*a, **kw):
        losses = real_step(*a, **kw)
        losses["loss"] = torch.tensor(float("nan"))
        return losses

    monkeypatch.setattr(train_module, "train_step", nan_loss)


def test_weights_that_blew_up_between_logged_steps_are_not_saved_and_lr_is_bounded(shards, tmp_path, monkeypatch):
    """The loss is checked at logged steps only: weights that became NaN since were saved as a checkpoint,
    which the error then called intact. And --lr 1e39 ended in Adam's overflow traceback."""
    import dasr_model.train as train_module

    real_step = train_module.train_step
    calls = []

    def blow_up(parts, *a, **kw):  # the update of step 2 (not a logged step) blows up
        losses = real_step(parts, *a, **kw)
        calls.append(1)
        if len(calls) == 2:
            with torch.no_grad():
                next(parts.model.parameters()).fill_(float("nan"))
        return losses

    monkeypatch.setattr(train_module, "train_step", blow_up)
    run = tmp_path / "run"
    result = CliRunner().invoke(train_cli, ["--shards", shards, "--out", str(run), "--steps", "4", "--log-every", "4",
                                            "--ckpt-every", "2", *TINY_ARGS])
    text = " ".join(result.output.split())
    assert result.exit_code == 1 and "the weights became NaN or infinite by step 2" in text, text
    assert not list(run.glob("ckpt-*.pt")) and "no checkpoint was written" in text
    result = CliRunner().invoke(train_cli, ["--shards", shards, "--out", str(tmp_path / "lr"), "--lr", "1e39",
                                            *TINY_ARGS])
    assert result.exit_code == 2 and "--lr" in result.output and "Traceback" not in result.output


def test_mixing_temperature_and_mapping_gain_are_bounded_and_a_nan_loss_names_them(shards, tmp_path, monkeypatch):
    """--mixing-temperature 1e-300 and --mapping-gain 1e300 trained into a NaN loss at step 1, whose message
    blamed --lr alone: both are bounded (the bounds themselves train), and a NaN loss names a sharp mix or a
    large gain beside the rate where the run has them."""

    base = ["--shards", shards, "--steps", "1", *TINY_ARGS]
    for option, value in (("--mixing-temperature", "1e-300"), ("--mapping-gain", "1e300")):
        result = CliRunner().invoke(train_cli, [*base, "--out", str(tmp_path / "run"), option, value])
        assert result.exit_code == 2 and f"Invalid value for '{option}'" in result.output, result.output
    result = CliRunner().invoke(train_cli, [*base, "--out", str(tmp_path / "bounds"), "--mixing", "softmax",
                                            "--mixing-temperature", "1e-3", "--mapping-gain", "1e3"])
    assert result.exit_code == 0, result.output
    _losses_become_nan(monkeypatch)
    result = CliRunner().invoke(train_cli, [*base, "--out", str(tmp_path / "nan"), "--mixing", "softmax",
                                            "--mixing-temperature", "0.01", "--mapping-gain", "10"])
    assert result.exit_code == 1 and "loss became nan at step 1; no checkpoint was written (lower --lr, or try a " \
        "higher --mixing-temperature than 0.01 or a lower --mapping-gain than 10)" in " ".join(result.output.split())
    result = CliRunner().invoke(train_cli, [*base, "--out", str(tmp_path / "nan-linear"), "--mapping-gain", "1"])
    assert result.exit_code == 1 and "no checkpoint was written (lower --lr?)" in result.output  # the rate alone
    # started from a model of that sharp mix and large gain: its temperature cannot change (refused as another
    # model) and its gain shaped no weight, so the rate alone is named
    result = CliRunner().invoke(train_cli, [*base, "--out", str(tmp_path / "nan-init"), "--init-from",
                                            str(tmp_path / "bounds")])
    assert result.exit_code == 1 and "no checkpoint was written (lower --lr?)" in result.output, result.output


@pytest.mark.parametrize("value", [np.nan, 5.0, -0.5])
def test_a_damaged_label_is_refused_by_evaluation_and_validation_as_by_training(shards, tmp_path, value):
    """dasr-eval scored a v of 5 (an 'MAE' of 1.49) or NaN (null), and validation logged NaN into
    metrics.jsonl (not JSON); both now refuse the sample as training does. A negative entry (-0.5) is
    refused too: with the lower bound dropped from the check, every test passed (a mutation audit: the
    damaged values were NaN and above 1). Oracle: v's documented range, [0, 1]."""
    import h5py

    src = Path(make_small_dataset(tmp_path / "ds", count=4, seed=3, shard_size=4))
    with h5py.File(src / "shard-00000.h5", "r+") as f:
        f["v"][2, 7] = value
    with pytest.raises(Exception, match="sample 2: its v is not 33 numbers in \\[0, 1\\]") as caught:
        pairs_from_shards(src)  # when the pairs are made, before any is read
    assert len(pairs_from_shards(src, limit=2)) == 2  # the first two are sound
    assert type(caught.value).__name__ == "DatasetError"
    run = tmp_path / "run"
    CliRunner().invoke(train_cli, ["--shards", shards, "--out", str(run), "--steps", "1", *TINY_ARGS])
    model = run / "model.safetensors"
    result = CliRunner().invoke(eval_main, ["--model", str(model), "--shards", str(src), "--device", "cpu"])
    assert result.exit_code == 1 and "sample 2: its v is not 33 numbers" in " ".join(result.output.split())
    result = CliRunner().invoke(train_cli, ["--shards", shards, "--out", str(tmp_path / "val"), "--steps", "4",
                                            "--val-shards", str(src), "--val-every", "3", *TINY_ARGS])
    # refused before the first step (not at the first validation, with the steps before it lost)
    assert result.exit_code == 1 and "validation data: sample 2: its v is not 33 numbers" in " ".join(
        result.output.split()), result.output
    assert not (tmp_path / "val").exists()


@pytest.mark.parametrize("workers", ["0", "2"])
def test_a_truncated_shard_stops_training_with_one_line(tmp_path, workers):
    src = Path(make_small_dataset(tmp_path / "ds", count=8, seed=3, shard_size=4))
    shard = sorted(src.glob("shard-*.h5"))[1]  # opened lazily: by a loader worker when there are workers
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size * 2 // 3])  # a copy cut short
    result = CliRunner().invoke(train_cli, ["--shards", str(src), "--out", str(tmp_path / "run"), "--steps", "4",
                                            *TINY_ARGS, "--workers", workers])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    last = " ".join(result.output.split()).rsplit("Error: ", 1)[1]
    assert "shard-00001.h5" in last and "truncated" in last and len(last) < 300


@pytest.mark.parametrize("where", ["data", "step"])
def test_a_failed_run_has_ended_its_loader_workers_when_the_error_reaches_the_caller(tmp_path, where):
    """A damaged shard read by a worker, or an error in the step's own code: either way the loader's worker
    processes have ended before train() raises, not when Python's cycle collector reaches the loader
    (which closes its queues first: PyTorch's shutdown then waits 5 s per worker before killing it).
    The collector is off, so only train() itself can have ended them."""
    import gc
    import multiprocessing

    src = Path(make_small_dataset(tmp_path / "ds", count=8, seed=3, shard_size=4))
    if where == "data":
        shard = sorted(src.glob("shard-*.h5"))[1]
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size * 2 // 3])

    def fail(step, last):
        raise RuntimeError("the step's code failed")

    before = {p.pid for p in multiprocessing.active_children()}
    gc.disable()
    try:
        with pytest.raises(DASRError if where == "data" else RuntimeError) as caught:
            train(TrainConfig(shards=str(src), out=str(tmp_path / "run"), steps=6, batch_size=2, lr_crop=8, workers=2,
                              device="cpu", model=TINY), progress=fail if where == "step" else None)
        # still held here: the error, its traceback and every frame it passed through
        assert caught.value.__traceback__ is not None
        left = [p for p in multiprocessing.active_children() if p.pid not in before]
    finally:
        gc.enable()
    assert left == []


def test_commands_say_when_torch_is_missing(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    for command, args in ((train_cli, ["--shards", str(tmp_path), "--out", str(tmp_path / "r")]),
                          (sr_main, ["x.png", "-o", str(tmp_path)]), (eval_main, ["--hr-dir", str(tmp_path)])):
        result = CliRunner().invoke(command, args)
        assert result.exit_code == 1 and "PyTorch is not installed" in result.output, result.output


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    torch.manual_seed(0)
    from dasr_model.model import DASR

    return DASR(TINY).eval()


def test_upscale_assembles_uint8_tiles_equal_to_the_whole_image(model):
    img = np.random.default_rng(5).random((37, 29, 3)).astype(np.float32)
    # a tile under 1 px divided by zero, or (negative) returned memory never written; a negative overlap
    # cut each tile's own region short: refused
    for kw, message in ((dict(tile=0), "at least 1 px a side"), (dict(tile=-12), "at least 1 px a side"),
                        (dict(tile=12, overlap=-1), "overlap must be at least 0")):
        with pytest.raises(DASRError, match=message):
            upscale(model, img, **kw)
        with torch.no_grad(), pytest.raises(DASRError, match=message):
            lr = to_tensor(img)
            super_resolve(model, lr, model.predict(lr)[1], **kw)
    whole, v_hat = upscale(model, img)
    tiled, v_tiled = upscale(model, img, tile=12, overlap=8)  # receptive-field radius of TINY: 6 px
    assert whole.dtype == np.uint8 and whole.shape == (148, 116, 3)
    assert torch.equal(v_hat, v_tiled)
    assert np.abs(tiled.astype(int) - whole.astype(int)).max() <= 1  # float rounding at the .5 boundary only
    with torch.no_grad():
        lr = to_tensor(img)
        reference = to_uint8(to_image(super_resolve(model, lr, model.predict(lr)[1])))
    assert np.abs(whole.astype(int) - reference.astype(int)).max() <= 1


def test_sr_skips_unreadable_files_and_exits_1(tmp_path, model):
    from dasr_model.modelfile import save_model_file

    path = save_model_file(model, tmp_path / "m.safetensors", dtype=torch.float32)
    src = tmp_path / "in"
    src.mkdir()
    cv2.imwrite(str(src / "a.png"), np.zeros((8, 8, 3), np.uint8))
    (src / "b.png").write_bytes(b"not a png")
    cv2.imwrite(str(src / "c.png"), np.full((8, 8, 3), 200, np.uint8))
    result = CliRunner().invoke(sr_main, [str(src), "-o", str(tmp_path / "out"), "--model", str(path)])
    text = " ".join(result.output.split())
    assert result.exit_code == 1 and "skipped" in text and "b.png" in text and "1 of 3 input(s)" in text
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a_x4.png", "c_x4.png"]
    for bad in ("nan,1", "inf,0", "1,2,3"):
        res = CliRunner().invoke(sr_main, [str(src / "a.png"), "-o", str(tmp_path / "o2"), "--model", str(path),
                                           "--mix", bad])
        assert res.exit_code == 2 and "--mix" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(sr_main, [str(src / "a.png"), "-o", str(tmp_path / "o3"), "--model", str(path),
                                       "--set", "noise1.strength=nan"])
    assert res.exit_code == 1 and "finite" in res.output


def test_eval_reports_progress_for_every_pair(shards, model):
    calls = []
    pairs = pairs_from_shards(shards)
    result = evaluate_pairs(model, pairs, torch.device("cpu"), progress=lambda: calls.append(1))
    assert len(calls) == len(pairs) == 8 == sum(r["images"] for r in result["levels"].values())


def test_checkpoint_and_model_file_load_the_same_network(shards, tmp_path):
    last = train(_cfg(shards, tmp_path / "run", 1))
    assert last["step"] == 1
    a = load_checkpoint_model(tmp_path / "run" / "ckpt-1.pt")
    b = load_checkpoint_model(tmp_path / "run" / "model.safetensors")
    lr = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(a(lr), b(lr), atol=2e-2, rtol=0)  # bf16 weights in the model file
    assert os.path.getsize(tmp_path / "run" / "model.safetensors") < os.path.getsize(tmp_path / "run" / "ckpt-1.pt")


def test_training_leaves_the_callers_torch_rng_alone(shards, tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train(_cfg(shards, tmp_path / "run", 1, val_shards=shards, val_every=1, val_samples=2))
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("mode", ["lr", "highpass"])
def test_the_tiled_predictor_equals_the_whole_image_pass(mode):
    from dasr_model.model import DASR

    torch.manual_seed(1)
    model = DASR(DASRConfig(num_experts=2, num_feat=8, num_block=1, predictor_feat=8, predictor_input=mode)).eval()
    for h, w in ((70, 58), (131, 97)):  # odd sizes: the stride-2 layer's last row/column
        lr = torch.rand(2, 3, h, w)
        with torch.no_grad():
            whole = model.predict(lr)
            for tile in (16, 20, 33):
                tiled = model.predict(lr, tile=tile)
                torch.testing.assert_close(tiled[0], whole[0], rtol=0, atol=1e-6)
                torch.testing.assert_close(tiled[1], whole[1], rtol=0, atol=1e-6)


def test_a_damaged_newer_checkpoint_is_set_aside_not_kept_by_pruning(shards, tmp_path):
    run = tmp_path / "run"
    args = ["--shards", shards, "--out", str(run), "--ckpt-every", "1", *TINY_ARGS]
    assert CliRunner().invoke(train_cli, [*args, "--steps", "6", "--keep-checkpoints", "0"]).exit_code == 0
    (run / "ckpt-6.pt").write_bytes(b"PK\x03\x04garbage")
    args += ["--keep-checkpoints", "1"]
    result = CliRunner().invoke(train_cli, [*args, "--steps", "6", "--resume"])  # really at step 5: trains one
    text = " ".join(result.output.split())
    assert result.exit_code == 0 and "nothing to train" not in text and "resuming from ckpt-5.pt" in text, text
    assert _ckpts(run) == ["ckpt-6.pt"] and (run / "ckpt-6.pt.damaged").exists()
    assert load_checkpoint(run / "ckpt-6.pt")["step"] == 6
    again = CliRunner().invoke(train_cli, [*args, "--steps", "6", "--resume"])
    assert again.exit_code == 0 and "nothing to train" in " ".join(again.output.split())
    assert _steps(run) == [1, 2, 3, 4, 5, 6]


def test_undecodable_metrics_lines_are_dropped_on_resume(shards, tmp_path):
    run = tmp_path / "run"
    train(_cfg(shards, run, 2, ckpt_every=1))
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(b"\xff\xfe garbage\n" + b'{"step": true}\n' + b'{"step": 2.0}\n')
    train(_cfg(shards, run, 3, ckpt_every=1), resume=True)
    assert _steps(run) == [1, 2, 3]


def test_checkpoint_configs_are_checked_field_by_field():
    good = TrainConfig(shards="s", out="o", model=TINY).to_dict()
    assert TrainConfig.from_dict(good) == TrainConfig(shards="s", out="o", model=TINY)
    for bad, message in (({**good, "betas": 5}, "train config"), ({**good, "betas": [1, 2, 3]}, "two numbers"),
                         ({k: v for k, v in good.items() if k != "model"}, "no model config"),
                         ({**good, "model": {**TINY.to_dict(), "num_experts": 0}}, "num_experts")):
        with pytest.raises(DASRError, match=message):
            TrainConfig.from_dict(bad)


def test_resume_removes_the_half_written_files_of_a_kill(shards, tmp_path):
    """Each save writes a uniquely named temporary file, so one a kill left behind is never overwritten:
    --resume removes ours (a preempted run would otherwise collect checkpoint-sized hidden files)."""
    run = tmp_path / "run"
    train(_cfg(shards, run, 2))
    (run / ".ckpt-4.pt.k2j4x8ab.tmp").write_bytes(b"half")
    (run / ".notes.txt.abcdefgh.tmp").write_text("not ours")
    train(_cfg(shards, run, 3), resume=True)
    assert not (run / ".ckpt-4.pt.k2j4x8ab.tmp").exists() and (run / ".notes.txt.abcdefgh.tmp").exists()


def test_restart_also_removes_half_written_files_and_a_model_file_counts_as_a_run(shards, tmp_path):
    from dasr_model.model import DASR
    from dasr_model.modelfile import save_model_file

    run = tmp_path / "run"
    run.mkdir()
    save_model_file(DASR(TINY), run / "model.safetensors")
    (run / "ckpt-9.pt.tmp").write_bytes(b"half")  # the older fixed name
    (run / ".ckpt-9.pt.k2j4x8ab.tmp").write_bytes(b"half")  # degrade.io.atomic_writer's, after a hard kill
    (run / ".model.safetensors.q0w9e8r7.tmp").write_bytes(b"half")
    (run / "keep.txt").write_text("mine")
    (run / ".notes.txt.abcdefgh.tmp").write_text("not ours")
    (run / "ckpt-7.pt.damaged").write_bytes(b"half")  # set aside by a resume: goes too (kept, it passed every
    (run / "notes.damaged").write_text("not ours")  # test: a mutation audit); a name not ours stays
    with pytest.raises(ValueError, match="already holds a run"):
        train(_cfg(shards, run, 1))
    train(_cfg(shards, run, 1), restart=True)
    assert sorted(p.name for p in run.iterdir()) == [".notes.txt.abcdefgh.tmp", "ckpt-1.pt", "config.json",
                                                       "keep.txt", "metrics.jsonl", "model.safetensors",
                                                       "notes.damaged"]


def test_sr_refuses_two_inputs_that_would_share_an_output_and_honours_max_pixels(tmp_path, model, monkeypatch):
    from dasr_model.modelfile import save_model_file
    from degrade.io import DEFAULT_MAX_PIXELS, MAX_PIXELS_ENV

    monkeypatch.setenv(MAX_PIXELS_ENV, str(DEFAULT_MAX_PIXELS))  # restored after the test: --max-pixels sets it

    path = save_model_file(model, tmp_path / "m.safetensors")
    (tmp_path / "in" / "sub").mkdir(parents=True)
    cv2.imwrite(str(tmp_path / "in" / "a.png"), np.zeros((12, 12, 3), np.uint8))
    cv2.imwrite(str(tmp_path / "in" / "sub" / "a.jpg"), np.zeros((12, 12, 3), np.uint8))
    result = CliRunner().invoke(sr_main, [str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--model", str(path)])
    assert result.exit_code == 1 and "would both be written as a_x4.png" in " ".join(result.output.split())
    assert not (tmp_path / "out").exists()
    capped = CliRunner().invoke(sr_main, [str(tmp_path / "in" / "a.png"), "-o", str(tmp_path / "o2"), "--model",
                                          str(path), "--max-pixels", "100"])
    assert capped.exit_code == 1 and "1 of 1 input(s) could not be read" in " ".join(capped.output.split())
    both = CliRunner().invoke(sr_main, [str(tmp_path / "in" / "a.png"), "-o", str(tmp_path / "o3"), "--model",
                                        str(path), "--checkpoint", str(path)])
    assert both.exit_code == 2 and "not both" in both.output


def test_sr_never_overwrites_one_of_its_inputs(tmp_path, model):
    """`dasr-sr dir/* -o dir` over a folder holding x.png and the user's own x_x4.png: x.png's output would
    overwrite x_x4.png, which would then be upscaled itself. Refused before any work, the files untouched."""
    from dasr_model.modelfile import save_model_file

    path = save_model_file(model, tmp_path / "m.safetensors")
    cv2.imwrite(str(tmp_path / "x.png"), np.zeros((16, 20, 3), np.uint8))
    cv2.imwrite(str(tmp_path / "x_x4.png"), np.full((10, 10, 3), 7, np.uint8))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    result = CliRunner().invoke(sr_main, [str(tmp_path / "x.png"), str(tmp_path / "x_x4.png"), "-o", str(tmp_path),
                                          "--model", str(path)])
    assert result.exit_code == 1 and "would overwrite the input" in " ".join(result.output.split())
    assert isinstance(result.exception, SystemExit)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_a_model_file_lost_after_the_last_checkpoint_is_written_by_the_resume_with_nothing_to_train(shards, tmp_path,
                                                                                                   monkeypatch):
    """The model file is written after the last checkpoint: a full disk (or a kill) between the two left a run
    at its end with no model file, and --resume had nothing to train and wrote none. Its failure now says the
    checkpoint is saved and what to do; the resume writes the model file (or one of an older step)."""
    import dasr_model.train as train_module
    from dasr_model.modelfile import MODEL_FILE, read_model_file

    real = train_module.save_model_file

    def full(*args, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(train_module, "save_model_file", full)
    args = ["--shards", shards, "--out", str(tmp_path / "run"), "--steps", "2", *TINY_ARGS]
    result = CliRunner().invoke(train_cli, args)
    text = " ".join(result.output.split())
    assert result.exit_code == 1 and f"{tmp_path / 'run' / MODEL_FILE}: not written (No space left on device); " \
        "ckpt-2.pt is saved: once that is mended, --resume writes the model file" in text, text
    assert not (tmp_path / "run" / MODEL_FILE).exists() and (tmp_path / "run" / "ckpt-2.pt").exists()
    monkeypatch.setattr(train_module, "save_model_file", real)
    result = CliRunner().invoke(train_cli, [*args, "--resume"])
    assert result.exit_code == 0 and f"wrote {MODEL_FILE} from ckpt-2.pt" in " ".join(result.output.split())
    model, meta = read_model_file(tmp_path / "run" / MODEL_FILE)
    ema = load_checkpoint(tmp_path / "run" / "ckpt-2.pt")["ema_generator"]
    assert meta["step"] == "2" and all(torch.equal(model.generator.state_dict()[k], v.to(torch.bfloat16).float())
                                       for k, v in ema.items())  # (the model file holds bf16 weights)
    result = CliRunner().invoke(train_cli, [*args, "--resume"])  # the model file current: left alone
    assert result.exit_code == 0 and "wrote" not in result.output
    # a model file newer than the checkpoint resumed (the one it was written with damaged): kept, and said so
    def run(steps):
        return CliRunner().invoke(train_cli, ["--shards", shards, "--out", str(tmp_path / "run"), "--steps", steps,
                                              "--ckpt-every", "2", "--keep-checkpoints", "0", *TINY_ARGS, "--resume"])

    assert run("4").exit_code == 0
    newer = (tmp_path / "run" / MODEL_FILE).read_bytes()
    (tmp_path / "run" / "ckpt-4.pt").write_bytes((tmp_path / "run" / "ckpt-4.pt").read_bytes()[:1000])
    result = run("2")
    text = " ".join(result.output.split())
    assert result.exit_code == 0 and f"note: {MODEL_FILE} is of step 4, newer than ckpt-2.pt: left as it is" in text
    assert (tmp_path / "run" / MODEL_FILE).read_bytes() == newer


def test_damaged_validation_pixels_are_refused_before_the_first_step(tmp_path):
    """The validation samples' labels were checked up front, their pixels read at the first validation:
    a damaged chunk stopped the run there, losing every step since its last checkpoint (500 at the
    defaults). They are read before the first step now, and the error says it is the validation data."""
    import h5py

    val = Path(make_small_dataset(tmp_path / "val", count=4, seed=5, shard_size=4))
    train_data = make_small_dataset(tmp_path / "train", count=8, seed=6, shard_size=8)
    with h5py.File(val / "shard-00000.h5", "r+") as f:  # a dataset whose chunk no longer decodes
        del f["hr"]
        f.create_dataset("hr", data=np.zeros((4, 64, 64, 3), np.uint8), chunks=(1, 64, 64, 3), compression="gzip")
        offset = f["hr"].id.get_chunk_info(2).byte_offset
    with open(val / "shard-00000.h5", "r+b") as f:
        f.seek(offset)
        f.write(b"\xff" * 64)
    result = CliRunner().invoke(train_cli, ["--shards", train_data, "--val-shards", str(val), "--out",
                                            str(tmp_path / "run"), "--steps", "8", "--val-every", "4", *TINY_ARGS])
    text = " ".join(result.output.split())
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit) and "validation data: " in text, text
    assert not list((tmp_path / "run").glob("metrics.jsonl")) or (tmp_path / "run" / "metrics.jsonl").read_text() == ""


def test_a_checkpoint_that_lies_about_its_step_or_holds_a_nan_moment_is_refused(shards, tmp_path):
    """A ckpt-4.pt holding step 2 (a copy, a mix-up) was loaded as step 2, then set aside as damaged itself;
    a NaN in Adam's moments surfaced as 'loss became nan (lower --lr?)'; a stored step of 10**16 was 'nothing
    to train'. The first and last are damaged checkpoints now (skipped with a warning, an older one resumed),
    the second a refusal naming the optimiser's state."""
    run = tmp_path / "run"
    args = ["--shards", shards, "--out", str(run), "--ckpt-every", "2", "--keep-checkpoints", "0", *TINY_ARGS]
    assert CliRunner().invoke(train_cli, [*args, "--steps", "4"]).exit_code == 0
    good = load_checkpoint(run / "ckpt-4.pt")
    save_checkpoint(run / "ckpt-4.pt", {**good, "step": 10**16})
    with pytest.raises(DASRError, match="ckpt-4.pt: not a dasr-train checkpoint \\(its step is '10000000000000000'"):
        load_checkpoint(run / "ckpt-4.pt")
    save_checkpoint(run / "ckpt-4.pt", {**good, "step": 2})
    assert load_checkpoint(run / "ckpt-4.pt")["step"] == 2  # given by name (dasr-export, --init-from): as it is
    result = CliRunner().invoke(train_cli, [*args, "--steps", "4", "--resume"])
    text = " ".join(result.output.split())
    assert result.exit_code == 0 and "skipping ckpt-4.pt: it holds step 2, not its name's" in text, text
    assert "resuming from ckpt-2.pt" in text
    assert load_checkpoint(run / "ckpt-4.pt")["step"] == 4 and (run / "ckpt-4.pt.damaged").exists()
    bad = load_checkpoint(run / "ckpt-4.pt")
    next(iter(bad["optimizer"]["state"].values()))["exp_avg_sq"][0] = float("nan")
    save_checkpoint(run / "ckpt-4.pt", bad)
    result = CliRunner().invoke(train_cli, [*args, "--steps", "6", "--resume"])
    text = " ".join(result.output.split())
    assert result.exit_code == 1 and "exp_avg_sq holds NaN or infinite values" in text and "lower --lr" not in text


def test_a_handed_over_metrics_log_is_read_a_bounded_line_at_a_time(tmp_path):
    """truncate_metrics read the whole metrics.jsonl and logs_a_step any line's length: linked to /dev/zero
    it filled memory ('out of memory ... lower --batch-size'), a FIFO hung the resume (a security review).
    Now a regular file alone, a line at a time, an overlong line skipped whole."""
    from dasr_model.runs import METRICS_LINE_BYTES, logs_a_step, truncate_metrics

    log = tmp_path / "metrics.jsonl"
    rows = [json.dumps({"step": i, "l1": 0.1}) for i in (1, 2, 3)]
    log.write_bytes((rows[0] + "\n" + "x" * (3 * METRICS_LINE_BYTES) + "\n" + rows[1] + "\n" + rows[2] + "\n"
                     + '{"step": 4, "l1"').encode())
    assert logs_a_step(log) and truncate_metrics(log, 2) == 2
    assert log.read_text() == rows[0] + "\n" + rows[1] + "\n"
    for name, make in (("zero.jsonl", lambda p: p.symlink_to("/dev/zero")), ("fifo.jsonl", os.mkfifo)):
        make(tmp_path / name)
        for read in (logs_a_step, lambda p: truncate_metrics(p, 2)):
            with pytest.raises(DASRError, match="not a regular file"):
                read(tmp_path / name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo.jsonl", "metrics.jsonl", "zero.jsonl"]  # no .tmp


def test_the_newest_checkpoint_is_the_highest_step_not_the_last_name(tmp_path):
    """Checkpoint names are not zero-padded, so by name ckpt-9.pt sorts after ckpt-10.pt: a resume would
    go back to step 9 and pruning to one checkpoint would delete the newest. Sorted by name, every test
    passed (a mutation audit). Oracle: the steps as numbers."""
    from dasr_model.checkpoints import latest_checkpoint, list_checkpoints, prune_checkpoints

    for step in (9, 10, 100, 2):
        save_checkpoint(tmp_path / f"ckpt-{step}.pt", {"config": {}, "model": {}, "step": step})
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-2.pt", "ckpt-9.pt", "ckpt-10.pt", "ckpt-100.pt"]
    assert latest_checkpoint(tmp_path).name == "ckpt-100.pt"
    (tmp_path / "ckpt-100.pt").write_bytes(b"damaged")
    assert latest_intact(tmp_path)[1]["step"] == 10
    assert [p.name for p in prune_checkpoints(tmp_path, 2)] == ["ckpt-2.pt", "ckpt-9.pt"]
