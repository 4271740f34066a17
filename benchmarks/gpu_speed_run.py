#!/usr/bin/env python
"""DASR speed on the GPU, unattended in one call: training steps, inference, bf16 vs float32, the loader.

Steps, each writing into OUT as it finishes (a run cut short still leaves what it did), each a separate
process with a timeout: its share of the --minutes budget plus what the steps before it left, less the
shares the steps after it keep:
  1. OUT/environment.txt: GPU, driver, torch / CUDA / cuDNN versions, cores, date, the command; with
     --tests, then the CUDA tests of the graphed and folded steps (their output's end in OUT/log.txt);
  2. a level-2 dataset on all cores (`degrade make-dataset`), for the loader;
  3. OUT/train.md: `benchmarks/bench_train.py`: ms per step at batch 48 / 16 / 6 (LR 64), without and with
     the GAN term, in bf16 autocast, for grouped expert convs (dense, stacked and bmm were slower on an
     H200: docs/benchmarks.md) and folded with the batch, predictor and discriminator in channels_last
     (dasr-train's default on a GPU), each eager and as one CUDA graph per step (`dasr-train
     --cuda-graph`), beside the float32 grouped eager step with the release's up-sampling (the release's
     way) in the same run; the loader's samples/s with 0 to all cores;
  3b. appended to OUT/train.md: the graphed folded channels_last step at batch 48, without and with GAN,
     with the generator's last convolution (64 to 3 channels per sample, slow as a grouped convolution)
     dense on the unfolded batch (`bench_train.py --impl folded+dense-last:cl`, an experiment);
  4. OUT/profile.md: `bench_train.py --profile-only --cuda-graph`: where a step's time goes, batch 48, bf16,
     folded in channels_last (the fastest on an H200), eager and graphed, without and with GAN: wall
     against GPU-busy time per step, and the kernels that take the most (a busy time far below the
     wall: the step waits on launches);
  5. OUT/infer.md: `benchmarks/bench_infer.py`: ms per image at LR 128 / 256 / 512, per-sample experts
     in float32 (the baseline) against the experts fused once per image, bf16 and channels_last, and at
     LR 512 that fused network through torch.compile (default, reduce-overhead); then a profile of
     dasr-sr's path at LR 512 (where an image's GPU time goes: the 4x target's next lead);
  5b. appended to OUT/infer.md: `dasr-sr` end to end over a folder of 16 LR-512 images, outputs written
     one after another (--write-threads 0) against 1, 2, 4 and 8 writer threads (`benchmarks/bench_sr.py`;
     the default is at most 4: on this machine a 2048-px PNG took 150-230 ms to encode at any zlib level,
     so 4 threads may still leave the GPU waiting);
  6. OUT/bf16.md: bf16 against float32 on real images: PSNR-Y of `dasr-sr`'s output (experts fused once,
     whole image, rounded to 8 bit) against the HR for each bundled photo (HR: a 256-px centre crop; LR:
     degraded at level 1, fixed seed), and the outputs' largest difference before rounding; with --model
     if given (e.g. issue 11's model.safetensors), else seeded untrained weights, whose output is almost
     the interpolated input, so only the difference before rounding says anything there;
  7. OUT/compile.md, last (the least known cost: a cold inductor build of forward and backward per row):
     the fastest eager strategy and memory format of train.md at the largest batch, compiled
     (`torch.compile`, as `dasr-train --compile`) in the default mode and in reduce-overhead (CUDA graphs
     of the network alone), and two experiments dasr-train does not run: the network compiled (default
     mode), then the residual blocks compiled alone, each inside the whole-step CUDA graph (the fastest
     no-GAN batch-48 step on an H200 was reduce-overhead's, 2.97x, short of the 3x target; the whole-step
     graph beats it with GAN); without and with GAN, beside the float32 baseline (its
     eager twin is in train.md); skipped, and said so, without a C compiler for Triton;
  7b. appended to OUT/compile.md: both experiments for the no-GAN batch-48 step together, the network
     compiled inside the whole-step CUDA graph with the last convolution dense (`bench_train.py --impl
     folded+dense-last:cl --compile net+graph`), without and with GAN, beside the float32 baseline;
  7c. appended to OUT/infer.md, last of all (its autotuning time is unknown, so it takes what the others
     left and cuts nothing): the fused bf16 channels_last network at LR 512 through torch.compile's
     max-autotune (Triton's convolution templates, whose epilogues can take the bias adds, timed against
     cuDNN's kernels; `bench_infer.py --compile-modes max-autotune`);
  8. OUT/summary.md: all of it in one page, led by the fastest training step per batch and GAN setting.

Usage (GPU): python benchmarks/gpu_speed_run.py --out $OUT [--tests] [--model model.safetensors] [--minutes 8]
CPU dry run of the same path with tiny sizes (under a minute):
       python benchmarks/gpu_speed_run.py --smoke --out /tmp/o
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# Shares of the --minutes budget per step, in order: a step may take its share plus what the steps before
# it left, less the shares the steps after it keep.
# Compiling is the least known (a cold inductor build of forward and backward, then three rows that may
# reuse its caches): it runs last, so that a cut costs only its own rows; inference and the bf16 check are
# a few dozen small timed calls each.
# On an H200 (2026-11-26) the dataset took 3 s, 18 step rows 85 s (the table now has 30), 4 profiles 36 s,
# inference 10 s (it now compiles the fused network twice at LR 512, some 20-40 s each, a guess from the
# training step's compilations), the bf16 check 9 s, the compile rows 85 s. The eager profiles now also
# trace layouts (a step under a dispatch mode) and on torch 2.11 export the profiler's Chrome trace for the
# strides: a few seconds each, more share for the profiles.
# With --tests, the CUDA tests first (25 s on the H200): without it their share goes to the steps after.
# The up-sampling step is a guess: 18 small timed calls (a few s), then 4 graphed batch-48 step rows (some 5 s
# each, as the table's): its share came from infer, compile, train and profile.
# The element-wise step was a guess too (20 timed small calls, each profiled, then 2 graphed batch-48 rows);
# its share went to the dense-last step that replaced it (2 graphed batch-48 rows, some 10 s each).
# On an H200 (2026-11-27, --tests --minutes 9): tests 31 s, dataset 4, train 116, up-sampling 9 + 23,
# element-wise 8 + 21 (since replaced), profiles 35, inference 27 (both compilations included), bf16 9, compile 84
# (8 rows): 373 s of 540.
# The compile table has 10 rows since (net+graph); after it, last, inference through max-autotune (Triton's
# convolution templates autotuned: its time unknown, so it takes what the others left, and cuts nothing).
# The up-sampling step (32 s, 2026-11-27) settled its question (the matrix products, dasr-train's default on a
# GPU since): its share goes to the two no-GAN experiments together ("combo": 4 rows, two of them compiled, some
# 30-40 s each as the compile table's), after the compile step, whose inductor caches they may reuse.
# dasr-sr over a folder ("sr-folder": 11 runs of 16 LR-512 images, some 2 s each, a guess from the network's
# 11 ms and a 2048-px PNG's 0.15-0.23 s per image) takes a share from inference, which used 27 s of its 65.
# Inference has 4 more rows per size since (the last convolution padded, conv1 + ReLU in cuDNN, eager and in
# the graph: about 1 s each) and one more reduce-overhead compilation at LR 512 (some 5-10 s): within its share.
# A review's timeline of the run as it is now (2026-11-27, no GPU: the last H200 run plus the new rows) reaches
# the combo step at some 415-480 s, which needs about 65 s (a cold inductor build of the dense-last network): the
# autotune step has no share of its own and takes only what combo leaves (it compiles with max-autotune after the
# float32 baseline alone, --compile-only: a build of minutes, so most likely cut; it cuts nothing).
SHARES = {"tests": 0.06, "dataset": 0.03, "train": 0.30, "dense-last": 0.04, "profile": 0.10,
          "infer": 0.09, "sr-folder": 0.03, "bf16": 0.03, "compile": 0.20, "combo": 0.12, "autotune": 0.0}
# what the speed paths' exactness rests on, and dasr-train's default GPU path: their tests marked cuda (-m cuda)
GPU_TESTS = ("tests/test_graphstep.py", "tests/test_expert_impl.py", "tests/test_train.py",
             "tests/test_benchmarks.py")  # the last: bench_infer's experiments against the plain network
TESTS_FLOOR_S = 90  # the CUDA tests' least time (at most a fifth of the budget), whatever their share
DATASET_FLOOR_S = 15  # the loader table's dataset (1,200 samples: 3 s on an H200 machine), however long the tests ran
STEP_COLUMNS = ("batch", "GAN", "precision", "expert impl", "memory format", "compile", "ms/step")
UPSAMPLE_COLUMN = 10  # bench_train's last column: the discriminator's up-sampling ("-" without GAN)


def step_rows(text: str, source: str = "") -> list[dict[str, str]]:
    """The training-step rows of bench_train's tables in `text` (columns STEP_COLUMNS, then more; the
    discriminator's up-sampling, where the row has that column, as "D up-sampling"), each with "table":
    `source` and the number of its table there (one bench_train process per table: rows compare within one)."""
    rows = []
    table = 0
    for line in text.splitlines():
        if line.startswith("| batch | GAN |"):
            table += 1
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) >= len(STEP_COLUMNS) and cells[0].isdigit():
            try:
                float(cells[6])
            except ValueError:
                continue
            rows.append({**dict(zip(STEP_COLUMNS, cells)), "table": f"{source}#{table}"})
            if len(cells) > UPSAMPLE_COLUMN:
                rows[-1]["D up-sampling"] = cells[UPSAMPLE_COLUMN]
    return rows


def fastest_eager(rows: list[dict[str, str]]) -> str | None:
    """bench_train's --impl item (IMPL or IMPL:cl) of the fastest eager row at the largest batch without
    GAN, outside the float32 baseline; None without such rows."""
    pool = [r for r in rows if r["GAN"] == "no" and r["compile"] == "eager" and r["precision"] != "float32"]
    pool = pool or [r for r in rows if r["GAN"] == "no" and r["compile"] == "eager"]  # CPU: all float32
    if not pool:
        return None
    top = max(int(r["batch"]) for r in pool)
    best = min((r for r in pool if int(r["batch"]) == top), key=lambda r: float(r["ms/step"]))
    return best["expert impl"] + (":cl" if best["memory format"] == "channels_last" else "")


def fastest_table(rows: list[dict[str, str]]) -> str:
    """The fastest row per (batch, GAN), with its speed-up over the float32 grouped eager row of its own
    table (the same process, as bench_train's column); where its table has none, over another table's,
    marked "*" (another process: machines' and processes' spreads enter the ratio)."""
    lines = ["| batch | GAN | fastest step | ms/step | vs float32 grouped NCHW eager |", "|---:|---|---|---:|---:|"]
    marked = False
    for key in sorted({(int(r["batch"]), r["GAN"]) for r in rows}):
        group = [r for r in rows if (int(r["batch"]), r["GAN"]) == key]
        best = min(group, key=lambda r: float(r["ms/step"]))
        base = [r for r in group if (r["precision"], r["expert impl"], r["memory format"], r["compile"])
                == ("float32", "grouped", "NCHW", "eager")]
        own = [r for r in base if r.get("table") == best.get("table")]
        ratio = "-"
        if base:
            ratio = f"{float((own or base)[0]['ms/step']) / float(best['ms/step']):.2f}x" + ("" if own else " *")
            marked = marked or not own
        what = f"{best['precision']}, {best['expert impl']}, {best['memory format']}, {best['compile']}"
        if best.get("D up-sampling", "-") != "-":
            what += f", D up-sampling {best['D up-sampling']}"
        lines.append(f"| {key[0]} | {key[1]} | {what} | {best['ms/step']} | {ratio} |")
    if marked:
        lines.append("\n\\* against the float32 step of another table of this run (another process)")
    return "\n".join(lines) + "\n"


def read_or_missing(path: Path) -> str:
    return path.read_text() if path.exists() else "(missing)\n"


def append_sections(target: Path, parts: list[tuple[Path, str]]) -> None:
    """Each (file, title) appended to `target` as a section (eight files come back from a device call)."""
    with open(target, "a") as f:
        for path, title in parts:
            f.write(f"\n\n## {title}\n\n{read_or_missing(path)}")


def log(out: Path, text: str) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {text}"
    print(line, flush=True)
    with open(out / "log.txt", "a") as f:
        f.write(line + "\n")


def child_env() -> dict[str, str]:
    """The environment of the steps: unbuffered, and the checkout importable (benchmarks/X.py puts only
    benchmarks/ on the path) even where the project is not installed."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}


def step(out: Path, name: str, cmd: list[str], target: Path, timeout: float) -> bool:
    """Run `cmd` (unbuffered), its output into `target` as it comes; False (logged) when it fails or runs
    out of time."""
    log(out, f"{name}: $ {shlex.join(cmd)} (at most {timeout:.0f} s)")
    start = time.perf_counter()
    with open(target, "w") as f:
        try:
            done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=max(timeout, 1.0), cwd=ROOT,
                                  env=child_env())
        except subprocess.TimeoutExpired:
            log(out, f"{name}: stopped after {timeout:.0f} s; {target.name} holds what it finished")
            return False
    log(out, f"{name}: exit {done.returncode} in {time.perf_counter() - start:.0f} s")
    return done.returncode == 0


def environment(args: argparse.Namespace) -> str:
    import torch

    lines = [f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
             f"command: {shlex.join([sys.executable.rsplit('/', 1)[-1], *sys.argv])}",
             f"machine: {platform.node()}; {platform.platform()}; {os.cpu_count()} cores",
             f"torch {torch.__version__}; CUDA {torch.version.cuda}; cuDNN {torch.backends.cudnn.version()}"]
    if torch.cuda.is_available():
        lines.append(f"GPU: {torch.cuda.get_device_name(0)}")
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True)
        lines.append(f"nvidia-smi: {smi.stdout.strip() or smi.stderr.strip()}")
    lines.append(f"model for bf16 vs float32: {args.model or 'seeded untrained weights'}")
    return "\n".join(lines) + "\n"


def bf16_table(model_path: str | None, device_name: str, smoke: bool) -> str:
    """bf16 vs float32 SR on the bundled photos: PSNR-Y against the HR, and the outputs' largest difference."""
    import torch

    import degrade
    from dasr_model.config import DASRConfig
    from dasr_model.infer import load_model, predict, super_resolve, to_tensor, upscale
    from dasr_model.metrics import psnr_y
    from dasr_model.model import DASR
    from degrade.io import read_image

    device = torch.device(device_name)
    if model_path:
        loaded = load_model(model_path)
        model, what = loaded.model, loaded.describe()
    else:
        torch.manual_seed(0)
        cfg = DASRConfig(num_experts=2, num_feat=8, num_block=1, predictor_feat=8) if smoke else DASRConfig()
        model, what = DASR(cfg), ("seeded untrained weights (torch.manual_seed(0)): the output is almost the "
                                  "interpolated input; read the difference before rounding")
    model = model.to(device).eval()
    side = 64 if smoke else 256
    rows = ["| photo | PSNR-Y float32 | PSNR-Y bf16 | bf16 - float32 (dB) | max abs diff, 8-bit output (0-255) "
            "| max abs diff before rounding (0-255) |", "|---|---:|---:|---:|---:|---:|"]
    diffs = []
    for i, path in enumerate(degrade.sample_images()[: 2 if smoke else None]):
        img = read_image(path)
        h, w = img.shape[:2]
        y, x = (h - side) // 2, (w - side) // 2
        hr = np.ascontiguousarray(img[y : y + side, x : x + side])
        params = degrade.sample_params(1, np.random.default_rng(np.random.SeedSequence([10, i])))
        lr = degrade.apply(hr, params)  # float32 on 8-bit levels
        with torch.no_grad():
            sr32, _ = upscale(model, lr, device=device)  # what dasr-sr writes: uint8
            # what `dasr-sr --precision bf16` runs: bf16, channels_last on a GPU
            sr16, _ = upscale(model, lr, device=device, dtype=torch.bfloat16, channels_last=device.type == "cuda")
            lr_t = to_tensor(lr).to(device)
            _, a = predict(model, lr_t)
            raw = (super_resolve(model, lr_t, a) - super_resolve(model, lr_t, a, dtype=torch.bfloat16)).abs().max()
        p32, p16 = psnr_y(sr32 / 255.0, hr), psnr_y(sr16 / 255.0, hr)
        diffs.append(p16 - p32)
        big = int(np.abs(sr32.astype(np.int16) - sr16.astype(np.int16)).max())
        rows.append(f"| {path.name} | {p32:.3f} | {p16:.3f} | {p16 - p32:+.4f} | {big} | {255 * float(raw):.2e} |")
    rows.append(f"| mean | | | {np.mean(diffs):+.4f} | |")
    tf32 = (f"; float32 is what `dasr-sr --precision fp32` runs here: cuDNN may use TF32 for its convolutions "
            f"(torch.backends.cudnn.allow_tf32 = {torch.backends.cudnn.allow_tf32}, PyTorch's default; a 10-bit "
            "mantissa against bf16's 7)" if device.type == "cuda" else "")
    return (f"model: {what}; device: {device}; HR {side}x{side} centre crops, LR at level 1 (seeds [10, i]); "
            f"PSNR-Y with a 4-px crop; experts fused once per image, whole image{tf32}\n\n" + "\n".join(rows)
            + "\n")


PYTEST_ARGS = ("-v", "-rfEs", "--tb=short", "-p", "no:cacheprovider")  # the CUDA tests' run (see main)


def tests_for_log(text: str, tail: int = 8000, width: int = 300) -> str:
    """What of the tests' output joins log.txt: every test's outcome line (PASSED, FAILED, ERROR, SKIPPED)
    and pytest's summary lines first, which a long traceback would push out of the tail, then the tail. Each
    line is cut at `width` characters: where CI is set, pytest prints a failure's whole message on its line."""
    lines = [x[:width] for x in text.splitlines() if re.search(r"(^(FAILED|ERROR|SKIPPED) )|( (PASSED|FAILED|ERROR"
                                                               r"|SKIPPED)( |$))", x)]
    return "\n".join(["test outcomes:", *lines, "", "the output's tail:", text[-tail:]])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, help="scratch folder for the dataset (default: OUT/../gpu-speed-work)")
    ap.add_argument("--model", help="a trained model for the bf16 check (model file, checkpoint or run folder)")
    ap.add_argument("--minutes", type=float, default=8.0, help="the whole run's budget")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: the same path in under a minute")
    ap.add_argument("--tests", action="store_true",
                    help=f"first run the tests marked cuda in {', '.join(GPU_TESTS)} (skipped elsewhere); the output's "
                         "end goes into log.txt")
    ap.add_argument("--bf16-only", action="store_true", help=argparse.SUPPRESS)  # step 5, run as its own process
    args = ap.parse_args(argv)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)

    import torch

    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    if args.bf16_only:
        print(bf16_table(args.model, device, args.smoke), end="")
        return 0
    work = args.work or out.parent / "gpu-speed-work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    total = 60 * args.minutes
    budget_end = time.perf_counter() + total
    (out / "environment.txt").write_text(environment(args))
    log(out, "environment.txt written")
    cores = os.cpu_count() or 1
    py = sys.executable

    def allowed(name: str) -> float:
        """Seconds for step `name`: what is left of the budget, less the shares of the steps after it."""
        later = list(SHARES)[list(SHARES).index(name) + 1 :]
        return budget_end - time.perf_counter() - total * sum(SHARES[k] for k in later)

    if args.tests:  # before any figure: the graphed and folded steps' exactness on this device
        # the tests marked cuda alone (they skip on a CPU, as in the smoke run; CI runs the rest of those files)
        # -v: a test that hangs to the step's limit is named by the last line; -rfEs: pytest's -r replaces
        # its default fE, so -rs alone dropped the FAILED lines from the summary
        step(out, "tests", [py, "-m", "pytest", *PYTEST_ARGS, "-m", "cuda", *GPU_TESTS], work / "tests.txt",
             max(allowed("tests"), min(TESTS_FLOOR_S, 0.2 * total)))
        with open(out / "log.txt", "a") as f:  # eight files come back from a device call: the tests join the log
            f.write(tests_for_log((work / "tests.txt").read_text()) + "\n")

    shards = work / "ds"
    count = 64 if args.smoke else 1200
    made = step(out, "dataset", [py, "-m", "cli.main", "make-dataset", "--out", str(shards), "--count", str(count),
                                 "--level", "2", "--jobs", str(min(cores, max(1, count // 100)))],
                work / "dataset.txt", max(allowed("dataset"), DATASET_FLOOR_S))  # tests that ran long: still a set
    if args.smoke:
        # bf16 as on the GPU (CPU autocast), so the smoke run takes the GPU's arithmetic path and tables
        # and a small network (2 blocks of 8 features): the same code, less of it to trace and time
        train_args = ["--batch-sizes", "2", "--lr-size", "8", "--warmup", "0", "--repeats", "1", "--precision", "bf16",
                      "--loader-workers", "0", "--loader-batch", "2", "--loader-steps", "2", "--small"]
        infer_args = ["--sizes", "16", "--warmup", "0", "--repeats", "1", "--experts", "2", "--bf16", "--profile", "16",
                      "--compile", "16", "--compile-backend", "aot_eager", "--small"]
    else:
        workers = sorted({0, 4, cores // 2, cores})
        # the largest batch first: the headline rows, and what the compile step builds on, come before any cut
        train_args = ["--batch-sizes", "48,16,6", "--warmup", "3", "--repeats", "5",
                      "--loader-workers", ",".join(map(str, workers)), "--loader-batch", "48", "--loader-steps", "30"]
        infer_args = ["--sizes", "128,256,512", "--warmup", "2", "--repeats", "5", "--profile", "512",
                      "--compile", "512"]
    loader = ["--shards", str(shards)] if made else []  # without the dataset: the step times alone
    # not dense, stacked, bmm: on an H200 (2026-11-26, docs/benchmarks.md) dense was slower than grouped in
    # every 5-expert row of the step table, stacked and bmm in the trainer's probe (batch 48, no GAN); not
    # folded with NCHW batches, which only the batch's own layout tells from folded:cl (dasr-train's default
    # on a GPU); each row eager and as one CUDA graph per step
    step(out, "train", [py, "benchmarks/bench_train.py", "--device", device, *loader, "--gan",
                        "--impl", "grouped,folded:cl", "--cuda-graph", "--fp32-baseline", *train_args],
         out / "train.md", allowed("train"))
    # the step table alone (before the dense-last table below is appended): what the compile step builds on
    eager_rows = step_rows((out / "train.md").read_text()) if (out / "train.md").exists() else []
    # the generator's last convolution dense on the unfolded batch, the rest folded (64 to 3 channels per sample:
    # cuDNN's grouped kernels took 3 of the no-GAN batch-48 step's 24 ms on an H200): the graphed channels_last
    # step at batch 48, without and with GAN (train.md has its all-folded twin), appended to train.md too. (The
    # element-wise experiment this step ran before, 2026-11-27, changed nothing: docs/benchmarks.md.)
    dl_train = (["--batch-sizes", "2", "--lr-size", "8", "--warmup", "0", "--repeats", "1", "--precision", "bf16",
                 "--small"] if args.smoke  # eager steps: a CPU records no CUDA graph
                else ["--batch-sizes", "48", "--warmup", "3", "--repeats", "5", "--cuda-graph", "--compile-only"])
    step(out, "dense-last", [py, "benchmarks/bench_train.py", "--device", device, "--gan", "--impl",
                             "folded+dense-last:cl", *dl_train], work / "dense-last.txt", allowed("dense-last"))
    append_sections(out / "train.md", [
        (work / "dense-last.txt", "The step with the last convolution dense (bench_train.py)")])
    # the bf16 folded channels_last step (train.md has its times), eager and graphed: on the GPU batch 48
    # without, then with GAN; one batch without GAN in the smoke run (profiling on a CPU is slow)
    profile_args = (["--batch-sizes", "2", "--lr-size", "8", "--precision", "bf16", "--small"] if args.smoke
                    else ["--batch-sizes", "48", "--gan"])
    step(out, "profile", [py, "benchmarks/bench_train.py", "--device", device, "--impl", "folded:cl", "--profile-only",
                          "--cuda-graph", *profile_args], out / "profile.md", allowed("profile"))
    step(out, "infer", [py, "benchmarks/bench_infer.py", "--device", device, *infer_args],
         out / "infer.md", allowed("infer"))
    # dasr-sr end to end over a folder: outputs written one after another, then on writer threads (the PNG
    # encoding of a x4 output outlasts the network on a GPU), appended to infer.md
    folder_args = (["--small", "--count", "3", "--size", "32", "--threads", "0,1", "--repeat", "1"] if args.smoke
                   else ["--count", "16", "--size", "512", "--threads", "0,1,2,4,8"])
    step(out, "sr-folder", [py, "benchmarks/bench_sr.py", "--device", device, *folder_args], work / "sr-folder.txt",
         allowed("sr-folder"))
    append_sections(out / "infer.md", [(work / "sr-folder.txt", "dasr-sr over a folder (bench_sr.py)")])
    step(out, "bf16", [py, "benchmarks/gpu_speed_run.py", "--bf16-only", "--out", str(out),
                       *(["--model", args.model] if args.model else []), *(["--smoke"] if args.smoke else [])],
         out / "bf16.md", allowed("bf16"))
    best = fastest_eager(eager_rows) or "folded:cl"  # no eager rows (the train step failed): the H200's fastest
    want = 2 if args.smoke else 48
    largest = max([int(r["batch"]) for r in eager_rows] or [want])
    if largest != want:
        log(out, f"compile: train.md has no batch-{want} rows (cut short?): compiling at batch {largest}")
    log(out, f"compile: the fastest eager step at batch {largest} without GAN: {best}")
    if args.smoke:  # inductor needs minutes on a CPU for this model: the same path, traced without codegen
        if best != "folded":  # which is fastest on a CPU is noise; on an H200 folded was (2026-11-26)
            log(out, "compile: smoke: compiling folded in its place (the GPU's fastest eager step at batch 48)")
            best = "folded"
        compile_args = ["--lr-size", "8", "--warmup", "0", "--repeats", "1", "--compile", "default,blocks",
                        "--compile-backend", "aot_eager", "--precision", "bf16", "--small"]
    else:
        # and two experiments: the network compiled (default mode), then the residual blocks compiled alone, each
        # inside the whole-step CUDA graph
        compile_args = ["--warmup", "3", "--repeats", "5", "--compile",
                        "default,reduce-overhead,net+graph,blocks+graph"]
    compiler = next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
    if compiler is None and not args.smoke:  # Triton builds its kernel launchers with the system C compiler
        log(out, "compile: skipped, no C compiler (cc, gcc, clang) for Triton; its time goes to the next steps")
        (out / "compile.md").write_text("skipped: no C compiler (cc, gcc, clang) for Triton on this machine\n")
    else:  # compiled rows only (train.md has their eager twins), beside the float32 baseline of this run
        # (the smoke run traces without GAN only: the GAN row traces the same network again, 8 s on 2 cores)
        step(out, "compile", [py, "benchmarks/bench_train.py", "--device", device, *([] if args.smoke else ["--gan"]),
                              "--impl", best,
                              "--batch-sizes", str(largest), "--fp32-baseline", "--compile-only", *compile_args],
             out / "compile.md", allowed("compile"))
    # both no-GAN batch-48 experiments together: the network compiled inside the whole-step graph, the last
    # convolution dense (each alone is in compile.md / train.md), beside the float32 baseline; appended to compile.md
    if args.smoke:  # no CUDA graph on a CPU: the network compiled (traced, aot_eager), as the smoke compile step
        combo_args = ["--batch-sizes", "2", "--lr-size", "8", "--warmup", "0", "--repeats", "1", "--compile", "default",
                      "--compile-backend", "aot_eager", "--precision", "bf16", "--small"]
    else:
        combo_args = ["--gan", "--batch-sizes", "48", "--warmup", "3", "--repeats", "5", "--compile", "net+graph"]
    if compiler is None and not args.smoke:
        log(out, "combo: skipped, no C compiler (cc, gcc, clang) for Triton")
    else:
        step(out, "combo", [py, "benchmarks/bench_train.py", "--device", device, "--impl", "folded+dense-last:cl",
                            "--fp32-baseline", "--compile-only", *combo_args], work / "combo.txt", allowed("combo"))
        append_sections(out / "compile.md", [
            (work / "combo.txt", "Compiled in the whole-step graph, the last convolution dense (bench_train.py)")])
    # last: the fused network at LR 512 through max-autotune, appended to infer.md (eight files come back)
    tune_args = (["--sizes", "16", "--warmup", "0", "--repeats", "1", "--experts", "2", "--bf16", "--small",
                  "--compile", "16", "--compile-backend", "aot_eager"] if args.smoke
                 else ["--sizes", "512", "--warmup", "2", "--repeats", "5", "--compile", "512", "--compile-only"])
    if compiler is None and not args.smoke:
        log(out, "autotune: skipped, no C compiler (cc, gcc, clang) for Triton")
    else:
        step(out, "autotune", [py, "benchmarks/bench_infer.py", "--device", device, *tune_args,
                               "--compile-modes", "max-autotune"], work / "autotune.txt", allowed("autotune"))
        append_sections(out / "infer.md", [
            (work / "autotune.txt", "The fused network through max-autotune (bench_infer.py, after the compile step)")])
    parts = ["environment.txt", "train.md", "profile.md", "compile.md", "infer.md", "bf16.md"]
    rows = [r for p in ("train.md", "compile.md") if (out / p).exists()
            for r in step_rows((out / p).read_text(), p)]
    (out / "summary.md").write_text("# DASR speed run\n\n## The fastest training step\n\n" + fastest_table(rows)
                                    + "\n" + "\n".join(
        f"## {p}\n\n" + read_or_missing(out / p) for p in parts))
    log(out, "summary.md written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
