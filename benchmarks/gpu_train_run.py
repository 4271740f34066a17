#!/usr/bin/env python
"""The first real DASR model, unattended in one GPU call: data, 5 experts vs 1 expert, evaluation, export.

Steps, each writing into OUT as it finishes (a run cut short still leaves what it did):
  1. split the photos by file (a fixed ~10 % held out: benchmarks/_study.py);
  2. `degrade make-dataset` on all cores: level mix from the training photos (`--sharpen-hr`); a small
     mix set from the held-out photos (plain HR, as real images are) for validation during training;
  3. `dasr-train` with 5 experts for --minutes (the trainer's own wall-clock budget), then with 1 expert
     for exactly as many steps (capped by the same budget), bf16 on CUDA;
  4. `dasr-eval --hr-dir` on the held-out photos at levels 1, 2, 3 (fixed seeds) for both models:
     PSNR-Y / SSIM-Y (4-px crop), bicubic beside, predictor MAE per block, expert-mix statistics;
  5. OUT/model.safetensors: the 5-expert model (predictor + EMA generator, bf16, under 16 MiB) and
     OUT/compare.png: LR / bicubic / 1 expert / 5 experts / HR crops at each level; OUT/summary.md.

Usage (GPU): python benchmarks/gpu_train_run.py --photos PHOTOS --out $OUT
       (CPU dry run of the same path in a couple of minutes): python benchmarks/gpu_train_run.py --smoke --out /tmp/o
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT)]  # the checkout importable even where it is not installed
from _study import make_dataset, split_photos  # noqa: E402

# The levers to try at scale (docs/training.md, small-scale study): a predictor fed the LR's high-pass residual
# (the only input it learnt from), and a convex mix that varies with v from step 0, taught from the true v for
# the first steps (about a quarter of a 3-minute H100 run).
LEVER_ARGS = ["--predictor-input", "highpass", "--mixing", "softmax", "--mixing-temperature", "0.1",
              "--mapping-gain", "1.0", "--teacher-steps", "800"]
# The optimiser for a run of minutes, not days (docs/training.md, "Learning rate for a short run"): twice the
# release's rate (the rate that trains SRResNet from scratch), after a short warm-up, constant: at small scale
# a 5x lower rate cost 0.1-0.2 dB and a cosine decay gained nothing over the EMA.
OPTIM_ARGS = ["--lr", "2e-4", "--warmup-steps", "100"]


RESERVE_S = 120  # of --total-minutes, kept for what --max-minutes does not count: 2 trainer start-ups, evaluation
SAFETY_NET_S = 30  # the 1-expert run's time cap beyond its budget (it stops at the 5-expert run's step count)
START_SLACK_S = 120  # a dasr-train beyond its --max-minutes (start-up, recording, last save) before it is stopped
STOP_GRACE_S = 60  # after SIGTERM (dasr-train finishes its step and saves), before it is killed
MIN_RUN_S = 30  # the least a training run gets, however late it starts
EVAL_RESERVE_S = 45  # of --total-minutes, kept after the training runs' deadline for the evaluation (26-29 s on
# an H200, 2026-11-26); the runs stop STOP_GRACE_S before that at the latest


def run_minutes(asked: float, total_minutes: float, elapsed_s: float) -> float:
    """Each training run's budget: `asked`, or less where the time left of `total_minutes` after `elapsed_s`,
    RESERVE_S and SAFETY_NET_S does not hold two of it; never under a tenth of `asked` (the runs must still
    train)."""
    fits = (60 * total_minutes - elapsed_s - RESERVE_S - SAFETY_NET_S) / 2 / 60
    return max(min(asked, fits), asked / 10)


def wait_or_stop(out: Path, name: str, proc: subprocess.Popen, limit: float | None) -> tuple[int, bool]:
    """(proc's exit code, whether it was stopped): past `limit` seconds (None: no limit) it is asked to stop
    (SIGTERM: dasr-train then finishes its step, saves its checkpoint and model file, and exits 143) and
    killed STOP_GRACE_S later."""
    try:
        return proc.wait(timeout=limit), False
    except subprocess.TimeoutExpired:
        log(out, f"{name}: still running after {limit:.0f} s: stopping it (SIGTERM)")
        proc.terminate()
        try:
            return proc.wait(timeout=STOP_GRACE_S), True
        except subprocess.TimeoutExpired:
            log(out, f"{name}: killed, {STOP_GRACE_S} s after SIGTERM")
            proc.kill()
            return proc.wait(), True


def shm_workers(free: int, batch: int, patch: int) -> int:
    """Loader workers whose batches in flight (2 each, PyTorch's prefetch; uint8 HR and LR patches) take at
    most half of `free` bytes of /dev/shm (at least 1: a 64 MiB container default still gets a worker)."""
    batch_bytes = batch * 3 * (patch * patch + (patch // 4) ** 2)
    return max(1, int(free // 2 // (2 * batch_bytes)))


def log(out: Path, text: str) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {text}"
    print(line, flush=True)
    with open(out / "log.txt", "a") as f:
        f.write(line + "\n")


def log_cmd(out: Path, cmd: list[str]) -> list[str]:
    log(out, "$ " + shlex.join(cmd))
    return cmd


def train_run(out: Path, run_dir: Path, name: str, cmd: list[str], deadline: float | None = None) -> bool:
    """Run dasr-train `cmd` into a fresh `run_dir` (its console in run_dir.stderr), stopped (wait_or_stop)
    START_SLACK_S past its --max-minutes or at `deadline` (time.perf_counter(); a first attempt gets at
    least MIN_RUN_S, a retry needs that much left), whichever comes first; stopped, it saves and counts as
    done where it wrote its model file.
    A failure before the first logged step (a path only the GPU takes: the CUDA graph's recording, the
    expert-impl probe) is logged with the end of its console and retried once on the reference path,
    --expert-impl grouped --no-cuda-graph (eager, no probe), with --max-minutes less the failed attempt's
    time (the script's total must hold). False when the run failed for good, so the caller keeps what the
    other run made."""
    spent = 0.0  # seconds of a failed first attempt: the retry's --max-minutes gives them back
    for attempt in ([], ["--expert-impl", "grouped", "--no-cuda-graph"]):  # click keeps an option's last value
        if attempt and "--max-minutes" in cmd:
            budget = float(cmd[cmd.index("--max-minutes") + 1])
            if budget - spent / 60 < budget / 10:  # too little left to train anything: keep the total instead
                log(out, f"{name}: no retry, {spent:.0f} s of its {budget:.2f} minutes are spent")
                return False
            attempt += ["--max-minutes", f"{budget - spent / 60:.3f}"]
        shutil.rmtree(run_dir, ignore_errors=True)  # a rerun of this script starts its runs afresh
        err = run_dir.with_suffix(".stderr")
        args = cmd + attempt
        minutes = [float(args[i + 1]) for i, x in enumerate(args[:-1]) if x == "--max-minutes"]
        limit = 60 * minutes[-1] + START_SLACK_S if minutes else None  # the last one counts, as in click
        if deadline is not None:
            left = max(deadline - time.perf_counter(), MIN_RUN_S)
            limit = left if limit is None else min(limit, left)
        with open(err, "w") as console:
            started = time.perf_counter()
            proc = subprocess.Popen(log_cmd(out, args), stdout=subprocess.DEVNULL, stderr=console)
            code, stopped = wait_or_stop(out, name, proc, limit)
        if code == 0:
            return True
        if stopped and (run_dir / "model.safetensors").exists():  # it saved on SIGTERM: a run cut short, kept
            log(out, f"{name}: stopped (exit {code}) after saving its model at step {last_step(run_dir)}")
            return True
        if stopped:  # out of time, not a failed GPU path: no retry
            log(out, f"{name}: stopped (exit {code}) before it saved a model")
            return False
        spent = time.perf_counter() - started
        tail = err.read_text(errors="replace")[-3000:]
        log(out, f"{name}: dasr-train exit {code} after {spent:.0f} s; its last lines:\n{tail}")
        if attempt or last_step(run_dir) > 0:  # it trained before failing: a rerun would not fit the budget
            return False
        if deadline is not None and deadline - time.perf_counter() < MIN_RUN_S:
            log(out, f"{name}: failed before its first logged step; no retry, "
                     f"{max(deadline - time.perf_counter(), 0):.0f} s left before the runs' deadline")
            return False
        log(out, f"{name}: failed before its first logged step; once more with --expert-impl grouped "
                 "--no-cuda-graph")
    return False


def salvage(out: Path, run_dir: Path, name: str, experts: str, end: float) -> None:
    """What a failed run leaves into OUT: its metrics so far, and for the 5-expert run a model file made
    from its newest checkpoint (`dasr-export`; --ckpt-every 1000) where it wrote none itself."""
    if (run_dir / "metrics.jsonl").exists():
        shutil.copyfile(run_dir / "metrics.jsonl", out / f"metrics-e{experts}.jsonl")
    if experts != "5" or (out / "model.safetensors").exists() or not any(run_dir.glob("ckpt-*.pt")):
        return
    cmd = [sys.executable, "-c", "from cli.sr import export_main; export_main()", str(run_dir), "-o",
           str(out / "model.safetensors")]
    try:  # by `end` (time.perf_counter()), the script's total
        done = subprocess.run(log_cmd(out, cmd), capture_output=True, text=True,
                              timeout=max(5.0, end - time.perf_counter()))
    except subprocess.TimeoutExpired:
        log(out, f"{name}: dasr-export out of time")
        return
    log(out, f"{name}: model.safetensors from its newest checkpoint" if done.returncode == 0 else
        f"{name}: dasr-export exit {done.returncode}: {done.stderr.strip()[-500:]}")


def last_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return json.loads(lines[-1])["step"] if lines else 0


def val_table(run_dir: Path) -> list[str]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "val" in r]
    out = ["| step | L1 PSNR-Y | L2 PSNR-Y | L3 PSNR-Y | bicubic L1/L2/L3 | predictor MAE | learning rate "
           "| samples/s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p, b = r["val"]["psnr_y"], r["val"]["bicubic_psnr_y"]
        out.append(f"| {r['step']} | " + " | ".join(f"{p.get(k, float('nan')):.2f}" for k in "123")
                   + " | " + "/".join(f"{b.get(k, float('nan')):.2f}" for k in "123")
                   + f" | {r['val']['mae']['all']:.4f} | {r['lr']:.2e} | {r['samples_per_s']:.0f} |")
    return out


def final_table(evals: dict[str, dict]) -> list[str]:
    """Per level: bicubic and each evaluated model, the 5-expert model's gain over bicubic and, where both were
    evaluated, over the 1-expert model."""
    both = "5 experts" in evals and "1 expert" in evals
    out = ["| level | bicubic PSNR-Y / SSIM-Y | " + " | ".join(f"{k} PSNR-Y / SSIM-Y" for k in evals)
           + " | 5 experts - bicubic |" + (" 5 experts - 1 expert |" if both else ""),
           "|---" * (len(evals) + 3 + both) + "|"]
    first = next(iter(evals.values()))["levels"]
    for lv in first:
        b = first[lv]
        cells = [f"{e['levels'][lv]['psnr_y']:.2f} / {e['levels'][lv]['ssim_y']:.4f}" for e in evals.values()]
        five, one = evals.get("5 experts"), evals.get("1 expert")
        gain = f"{five['levels'][lv]['psnr_y'] - b['bicubic_psnr_y']:+.2f} dB" if five else "-"
        vs1 = f"{five['levels'][lv]['psnr_y'] - one['levels'][lv]['psnr_y']:+.2f} dB" if five and one else "-"
        out.append(f"| {lv} | {b['bicubic_psnr_y']:.2f} / {b['bicubic_ssim_y']:.4f} | " + " | ".join(cells)
                   + f" | {gain} |" + (f" {vs1} |" if both else ""))
    return out


def picture(models: dict[str, Path], held: list[Path], path: Path, seed: int) -> None:
    """LR (nearest x4) / bicubic / each model / HR, one row per level, a 96-px HR crop of one held-out photo."""
    import cv2
    import numpy as np
    import torch
    import torch.nn.functional as F

    import degrade
    from dasr_model.infer import load_checkpoint_model, to_image, to_tensor
    from degrade.io import crop_to_multiple, to_uint8

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    nets = {k: load_checkpoint_model(p).to(dev) for k, p in models.items()}
    hr = to_uint8(crop_to_multiple(degrade.read_image(held[0]), 4)).astype(np.float32) / 255
    c = 96
    y0, x0 = (hr.shape[0] // 2) // 4 * 4, (hr.shape[1] // 2) // 4 * 4
    rows = []
    for level in (1, 2, 3):
        params = degrade.sample_params(level, np.random.default_rng(np.random.SeedSequence([seed, 0, level])))
        lr = degrade.apply(hr, params)
        lr_t = to_tensor(lr).to(dev)
        tiles = {"LR": np.kron(lr, np.ones((4, 4, 1), np.float32)),
                 "bicubic": to_image(F.interpolate(lr_t, scale_factor=4, mode="bicubic", align_corners=False))}
        with torch.no_grad():
            for k, m in nets.items():
                tiles[k] = to_image(m(lr_t))
        tiles["HR"] = hr
        crops = [np.clip(t[y0 : y0 + c, x0 : x0 + c], 0, 1) for t in tiles.values()]
        big = [cv2.resize(cr, (2 * c, 2 * c), interpolation=cv2.INTER_NEAREST) for cr in crops]
        row = np.concatenate([np.pad(b, ((24, 4), (2, 2), (0, 0)), constant_values=1.0) for b in big], axis=1)
        row = (row * 255).round().astype(np.uint8)[..., ::-1].copy()  # BGR for cv2
        for i, name in enumerate(tiles):
            cv2.putText(row, f"L{level} {name}", (i * (2 * c + 4) + 6, 17), cv2.FONT_HERSHEY_SIMPLEX, 0.45,
                        (0, 0, 0), 1, cv2.LINE_AA)
        rows.append(row)
    cv2.imwrite(str(path), np.concatenate(rows, axis=0))


def default_work(photos: Path, train_count: int, smoke: bool) -> Path:
    """A work folder of this checkout's and these datasets' own, under the temporary folder: two checkouts, or a
    smoke run and a full one, sharing one found each other's datasets (made by a different command) and
    stopped; a rerun with the same ones resumes them."""
    key = f"{ROOT}|{Path(photos).resolve()}|{train_count}|{smoke}".encode()
    return Path(tempfile.gettempdir()) / f"dasr-gpu-run-{hashlib.sha1(key).hexdigest()[:10]}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=Path, help="Photo folder (default with --smoke: the bundled samples).")
    ap.add_argument("--out", type=Path, required=True, help="Results (log, tables, model.safetensors, picture).")
    ap.add_argument("--work", type=Path,
                    help="Datasets and runs (default: a temporary folder of this checkout's and these datasets' own, "
                         "kept for a rerun).")
    ap.add_argument("--minutes", type=float, help="Training budget of each of the two runs (default 3; smoke 0.25).")
    ap.add_argument("--total-minutes", type=float, default=9.5,
                    help="The whole script's budget: where the datasets took long, each run gets less than --minutes "
                         f"so that the runs, their start-up and the evaluation ({RESERVE_S} s kept) still fit.")
    ap.add_argument("--batch-size", type=int, default=48)
    ap.add_argument("--train-count", type=int, default=16000)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 4), help="Loader processes.")
    ap.add_argument("--val-every", type=int, default=250)
    ap.add_argument("--extra", default="", help="More dasr-train arguments, e.g. '--lr 2e-4'.")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny sizes, bundled photos, about a minute.")
    a = ap.parse_args(argv)
    # the steps' processes (python -m cli.train, ...) import the checkout from any folder, installed or not
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    out = a.out
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    size = []
    if a.smoke:
        import degrade

        a.photos = a.photos or Path(degrade.sample_images()[0]).parent
        a.minutes = a.minutes or 0.25
        a.batch_size, a.train_count, a.val_every, a.workers = 4, 64, 5, 1
        LEVER_ARGS[LEVER_ARGS.index("--teacher-steps") + 1] = "10"
        OPTIM_ARGS[OPTIM_ARGS.index("--warmup-steps") + 1] = "5"
        size = ["--blocks", "2", "--features", "16", "--device", "cpu", "--precision", "bf16"]  # the GPU's arithmetic
    a.minutes = a.minutes or 3.0
    if a.photos is None:
        ap.error("--photos is required (except with --smoke)")
    work = a.work or default_work(a.photos, a.train_count, a.smoke)
    work.mkdir(parents=True, exist_ok=True)

    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.machine()})"
    command = "python benchmarks/gpu_train_run.py " + " ".join(argv if argv is not None else sys.argv[1:])
    head = [f"# DASR training run ({datetime.date.today()})", "",
            f"- device: {device}; torch {torch.__version__}; {os.cpu_count()} CPU cores",
            f"- command: `{command}`"]
    log(out, " | ".join(head[2:]))
    if Path("/dev/shm").is_dir():  # the loader's workers hand batches over there: a small one kills them
        free = shutil.disk_usage("/dev/shm").free
        log(out, f"/dev/shm: {free / 2**30:.1f} GiB free")
        fit = shm_workers(free, a.batch_size, 64 if a.smoke else 256)
        if fit < a.workers:
            log(out, f"--workers {a.workers} -> {fit}: their batches in flight must fit in half of /dev/shm")
            a.workers = fit

    # 1-2. photos and datasets
    train_files, held = split_photos(a.photos)
    patch = 64 if a.smoke else 256
    crop = patch // 4
    log(out, f"photos: {len(train_files)} for training, {len(held)} held out ({', '.join(p.name for p in held)})")
    t = time.perf_counter()
    try:
        train_ds = make_dataset(train_files, work / "train", level="mix", count=a.train_count, patch=patch, seed=1,
                                jobs=a.jobs, sharpen_hr=True)  # LR from the sharpened HR: the better pairing measured
        val_ds = make_dataset(held, work / "val-mix", level="mix", count=8 if a.smoke else 96, patch=patch, seed=7,
                              jobs=a.jobs)
    except subprocess.CalledProcessError as exc:  # its own error is on the console above: one line here
        raise SystemExit(f"degrade make-dataset failed (exit {exc.returncode}) in {work}; its error is above "
                         "(datasets made with other options there: give another --work)") from None
    log(out, f"datasets made in {time.perf_counter() - t:.0f} s")
    held_dir = work / "held-out"
    held_dir.mkdir(exist_ok=True)
    for p in held:
        link = held_dir / p.name
        if not link.exists():
            link.symlink_to(p.resolve())

    # 3. two runs with the same steps: 5 experts within the budget, then 1 expert for as many steps
    minutes = run_minutes(a.minutes, a.total_minutes, time.perf_counter() - started)
    if minutes < a.minutes:
        log(out, f"{time.perf_counter() - started:.0f} s spent before training: each run gets {minutes:.2f} minutes "
                 f"(not {a.minutes}) to fit --total-minutes {a.total_minutes}")
    runs = {"5 experts": work / "run-e5", "1 expert": work / "run-e1"}
    steps = None
    done_steps: dict[str, int] = {}  # the steps each run made (the 1-expert run's time cap could stop it early)
    chosen: dict[str, tuple[str, str]] = {}  # --expert-impl asked for (auto; grouped on a retry), what ran
    missing: list[str] = []  # what did not happen, for the summary (log.txt has the details)

    # the summary, written after each run and after the evaluation (a run cut short still has it so far)
    evals: dict[str, dict] = {}

    def summary() -> None:
        lines = head + ["", f"Training: level mix, {a.train_count} patches of {patch} px from {len(train_files)} "
                        f"photos; batch {a.batch_size}, LR crop {crop}; steps: "
                        + ", ".join(f"{k} {v}" for k, v in done_steps.items())
                        + f" ({minutes:.2f} minutes for 5 experts); lever: `{' '.join(LEVER_ARGS)}`; optimiser: "
                        f"`{' '.join(OPTIM_ARGS)}` {a.extra}".rstrip(), "",
                        *[f"- expert convolutions ({name}, `--expert-impl {asked}`): {how}"
                          for name, (asked, how) in chosen.items()],
                        *([f"- the 1-expert run stopped at step {done_steps['1 expert']} of the 5-expert run's "
                           f"{steps}: the comparison is not like for like"]
                          if done_steps.get("1 expert", steps) != steps else []),
                        *[f"- {m}" for m in missing],
                        ""]
        for name, run_dir in runs.items():
            if name in done_steps:  # the runs trained so far
                lines += [f"## Validation over steps, {name} (held-out mix patches, EMA generator)", "",
                          *val_table(run_dir), ""]
        if evals:
            lines += [f"## Held-out photos ({len(held)}), per level (`dasr-eval --hr-dir`, seed 0)", "",
                      *final_table(evals), ""]
        for name, e in evals.items():
            mix = e["mixing"]
            lines += [f"- {name}: predictor MAE " + ", ".join(f"{k} {v:.4f}" for k, v in e["mae"].items())
                      + f"; a std {mix['std']:.4f} (within level {mix['std_within_level']:.4f}), between levels "
                      f"{mix['between_level']:.4f}; mean a by level {mix['mean_by_level']}"]
        lines += ["", f"Total wall time: {time.perf_counter() - started:.0f} s"
                  + ("" if evals else " (before the evaluation)")]
        (out / "summary.md").write_text("\n".join(lines) + "\n")

    for name, run_dir in list(runs.items()):
        experts = "5" if name == "5 experts" else "1"
        cmd = [sys.executable, "-m", "cli.train", "--shards", str(train_ds), "--val-shards", str(val_ds),
               "--out", str(run_dir), "--experts", experts, "--steps", str(steps or 1_000_000),
               # the 1-expert run stops at the 5-expert run's step count; its time cap is only a safety net
               "--max-minutes", f"{minutes if steps is None else minutes + 0.5:.3f}",
               "--batch-size", str(a.batch_size), "--lr-crop", str(crop),
               # a checkpoint every 1000 steps: a run that fails late still leaves a model (salvage below)
               "--workers", str(a.workers), "--val-every", str(a.val_every), "--ckpt-every", "1000",
               "--log-every", "10",  # losses read back every 10 steps: the GPU does not wait for the host
               "--val-samples", "8" if a.smoke else "96", *LEVER_ARGS, *OPTIM_ARGS, *size,
               *shlex.split(a.extra)]
        t = time.perf_counter()
        # each run stopped (and saved) before the total's end, the evaluation's share kept
        deadline = started + 60 * a.total_minutes - EVAL_RESERVE_S - STOP_GRACE_S
        if deadline - t < MIN_RUN_S:  # datasets or the first run took the time: nothing fits any more
            missing.append(f"{name}: not trained, {max(deadline - t, 0):.0f} s left before the runs' deadline")
            log(out, missing[-1])
            summary()
            if name == "5 experts":
                raise SystemExit(f"{name}: no time left to train (--total-minutes {a.total_minutes})")
            del runs[name]
            break
        if not train_run(out, run_dir, name, cmd, deadline=deadline):
            salvage(out, run_dir, name, experts, started + 60 * a.total_minutes)
            missing.append(f"{name}: dasr-train failed or was stopped before it saved a model (log.txt)")
            del runs[name]  # the 5-expert model is still evaluated and exported
            summary()
            if name == "5 experts":
                raise SystemExit(f"{name}: dasr-train failed (log.txt has its errors)")
            break
        done = done_steps[name] = last_step(run_dir)
        steps = steps or done
        config = json.loads((run_dir / "config.json").read_text())
        info = config["run"]
        how = f"{info['expert_impl']}, {info['memory_format']}"
        if "expert_impl_probe_ms" in info:  # on a GPU: what auto timed
            probe = ", ".join(f"{k} {v:.1f}" for k, v in info["expert_impl_probe_ms"].items())
            how += f" (probe, ms per step of forward + backward, no optimiser update: {probe})"
        chosen[name] = (config["expert_impl"], how)
        log(out, f"{name}: {done} steps in {time.perf_counter() - t:.0f} s; expert convs {how}")
        shutil.copyfile(run_dir / "metrics.jsonl", out / f"metrics-e{experts}.jsonl")
        if name == "5 experts":  # the product, in OUT before anything else can fail
            shutil.copyfile(run_dir / "model.safetensors", out / "model.safetensors")
        summary()

    # the evaluation on the held-out photos per level, both models at once (it degrades on the CPU: the two
    # share the cores), stopped at the total's end
    procs = {}
    for name, run_dir in runs.items():
        cmd = [sys.executable, "-c", "from cli.sr import eval_main; eval_main()", "--model",
               str(run_dir / "model.safetensors"), "--hr-dir", str(held_dir), "--levels", "1,2,3", "--seed", "0",
               "--precision", "fp32", "--json"]  # fp32 as the first run's table (auto is bf16 on a GPU now)
        files = run_dir.with_suffix(".eval.json"), run_dir.with_suffix(".eval.stderr")  # files: no pipe to fill
        with open(files[0], "w") as stdout, open(files[1], "w") as stderr:
            procs[name] = subprocess.Popen(log_cmd(out, cmd), stdout=stdout, stderr=stderr), files
    for name, (proc, files) in procs.items():
        left = 60 * a.total_minutes - (time.perf_counter() - started)
        if wait_or_stop(out, f"{name}: dasr-eval", proc, max(left, 5.0))[0] != 0:
            tail = files[1].read_text(errors="replace")[-3000:]
            log(out, f"{name}: dasr-eval exit {proc.returncode}; its last lines:\n{tail}")
            missing.append(f"{name}: its evaluation failed or ran out of time (log.txt)")
            continue
        evals[name] = json.loads(files[0].read_text())
        (out / "eval.json").write_text(json.dumps(evals, indent=1))
        log(out, f"{name}: " + ", ".join(f"L{k} {v['psnr_y']:.2f} dB (bicubic {v['bicubic_psnr_y']:.2f})"
                                         for k, v in evals[name]["levels"].items()))
    if "5 experts" not in evals:
        summary()
        raise SystemExit("5 experts: dasr-eval failed (log.txt has its errors)")
    # 5. the summary, then the picture of the evaluated models (the model is in OUT already)
    summary()
    picture({k: d / "model.safetensors" for k, d in runs.items() if k in evals}, held, out / "compare.png", seed=0)
    size_mib = (out / "model.safetensors").stat().st_size / 2**20
    log(out, f"done in {time.perf_counter() - started:.0f} s; model.safetensors {size_mib:.1f} MiB")


if __name__ == "__main__":
    main()
