#!/usr/bin/env python
"""dasr-train speed: the data loader's samples/s, and seconds per training step per batch size.

- loader: `PairedShards` + `StepBatchSampler` through a torch DataLoader with --workers processes
  (LR crop 64 -> HR 256, flips/rotations), batches per second times batch size, nothing else running;
- steps: one full optimiser step of the DASR model (L1 + regression, EMA update; with --gan also the
  discriminator step) on random tensors already on the device, for each --batch-sizes, median of
  --repeats timed steps after --warmup steps. bf16 autocast on CUDA, float32 on CPU, as dasr-train
  (--precision bf16 / fp32 forces one).
  With --impl, once per expert-conv strategy (`dasr_model.model.set_expert_impl`: grouped, dense,
  stacked, bmm; exact alternatives, tests/test_expert_impl.py); an item `IMPL:cl` times that strategy
  with the batch, predictor and discriminator in channels_last memory format, and --channels-last adds
  such a row for each strategy that keeps the format through the generator (dense, stacked; the others
  turn it back into NCHW at every layer); `folded+dense-last` (an experiment) is folded but for the
  generator's last convolution, dense. --compile MODES adds, per row, the step with the network
  compiled by torch.compile in each mode (as `dasr-train --compile`; reduce-overhead adds CUDA graphs),
  warmed up at least 3 steps; or experiments dasr-train does not run: "blocks", each residual block of
  the generator compiled alone (one compilation for all 16), the rest eager, "blocks+graph", that
  step recorded as one CUDA graph, and "net+graph", the network compiled in the default mode inside the
  whole-step CUDA graph (a failed experiment is a row saying so); --cuda-graph adds the row
  with the whole step recorded as one CUDA graph and replayed (as `dasr-train --cuda-graph`; CUDA only)
  (--compile-only: the compiled / graphed rows without their eager twins). Peak GPU memory per step on
  CUDA; the first step's seconds (cuDNN's algorithm search with cudnn.benchmark, or the
  compilation, which later rows may shorten by reusing inductor's on-disk caches). --profile adds, after
  the table, each eager row's step under torch.profiler: wall against device-busy time per step, the
  operators (CUDA kernels on a GPU) that take the most, on a GPU which operators launched them (with their
  inputs' shapes, memory layouts and dtypes), and the operators on batch-sized tensors whose operands differ
  in memory layout (benchmarks/_layouts.py); --profile-only does that without the table.
  --disc-upsample times each GAN row with each listed x2 up-sampling of the discriminator
  (`UNetDiscriminatorSN.upsample`: auto, interpolate, lerp, matmul; the same numbers up to rounding,
  tests/test_train.py), named in the table's last column. --pointwise flat runs the generator's activations
  and residual sums on 1-D views of its feature maps (`ExpertMSRResNet.pointwise`; the same bits,
  tests/test_expert_impl.py): an experiment for PyTorch's element-wise kernels on CUDA (bench_pointwise.py).

Needs a dataset made with `degrade make-dataset` (patch 256) for the loader part.
Usage: python benchmarks/bench_train.py --shards DIR [--device auto] [--batch-sizes 6,16,48] [--gan]
       [--impl grouped,dense,stacked,bmm] [--channels-last] [--fp32-baseline] [--compile default,reduce-overhead]
       [--cuda-graph] [--profile | --profile-only] [--disc-upsample auto,matmul] [--pointwise flat]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import platform
import shlex
import statistics
import sys
import time

import torch
from _layouts import layout_table, trace_layouts
from _profile import first_line, free_cached, profile_calls, sync, timed_steps
from torch.utils.data import DataLoader

from dasr_model.data import PairedShards, StepBatchSampler, unsharp_mask
from dasr_model.errors import DASRError
from dasr_model.losses import DISC_UPSAMPLES, UNetDiscriminatorSN
from dasr_model.model import DASR, EXPERT_IMPLS, POINTWISE, DASRConfig, set_expert_impl
from dasr_model.runs import pick_device
from dasr_model.train import (
    COMPILE_MODES,
    StepParts,
    TrainConfig,
    compile_net,
    graphed_train_step,
    lay_out,
    out_of_memory,
    train_step,
)

KEEPS_CHANNELS_LAST = ("dense", "stacked")  # the strategies whose generator runs in channels_last throughout
# --compile experiments dasr-train does not run: each of the generator's residual blocks compiled on its own
# (regional compilation: one compilation serves the 16 blocks; inductor fuses each convolution's bias add with
# the ReLU or the residual add after it), the rest eager; "blocks+graph": that step recorded as one CUDA graph
# (the whole-step graph, which dasr-train --compile rules out); "net+graph": the whole network compiled (inductor's
# default mode, as dasr-train --compile default) inside the whole-step CUDA graph
BLOCK_MODES = ("blocks", "blocks+graph", "net+graph")
# --small: the release's networks with fewer blocks and features (the generator's 5 experts kept), for the GPU
# scripts' dry runs on a CPU: the same code, less of it to trace and time
SMALL = DASRConfig(num_feat=8, num_block=2, predictor_feat=8)
SMALL_NAME = "generator of 5 experts, 2 blocks, 8 features; discriminator of 8 features"
GRAPHED = ("graph", "blocks+graph", "net+graph")
# --impl folded+dense-last: an experiment dasr-train does not run: every expert convolution folded but the
# generator's last (64 to 3 channels per sample, which cuDNN's grouped kernels ran at some 4 TMAC/s on an H200:
# 3 of the no-GAN batch-48 step's 24 ms), dense on the batch unfolded (5x its FLOPs, 15 output channels)
DENSE_LAST = "+dense-last"


def bench_loader(shards: str, batch: int, workers: int, steps: int) -> float:
    ds = PairedShards(shards, lr_crop=64, seed=0)
    sampler = StepBatchSampler(len(ds), batch, start=0, stop=steps + 2, seed=0)
    it = iter(DataLoader(ds, batch_sampler=sampler, num_workers=workers))
    next(it), next(it)  # start-up
    start = time.perf_counter()
    n = sum(b["lr"].shape[0] for b in it)
    return n / (time.perf_counter() - start)


def setup_step(device: torch.device, batch: int, gan: bool, impl: str = "grouped", channels_last: bool = False,
               lr_size: int = 64, compile_mode: str = "off", compile_backend: str = "inductor",
               disc_upsample: str = "auto", pointwise: str = "4d", small: bool = False):
    """What one training step needs, as dasr-train builds it: (parts, cfg, lr, hr, v) on random data.
    `disc_upsample`: the discriminator's x2 up-sampling (`UNetDiscriminatorSN.upsample`; "interpolate":
    F.interpolate throughout, the release's way); `pointwise`: the generator's (`ExpertMSRResNet.pointwise`);
    `small`: the networks of `--small` (default: the release's sizes, as dasr-train's)."""
    torch.manual_seed(0)
    cfg = TrainConfig(shards="", out="", gan=gan, **({"model": SMALL} if small else {}))
    model = set_expert_impl(DASR(cfg.model), impl.removesuffix(DENSE_LAST)).to(device)
    if impl.endswith(DENSE_LAST):
        model.generator.conv_last.impl = "dense"
    model.generator.pointwise = pointwise
    disc = UNetDiscriminatorSN(num_feat=SMALL.num_feat if small else 64).to(device) if gan else None
    if disc is not None:
        disc.upsample = disc_upsample
    fmt = lay_out(channels_last, model.predictor, disc)  # as dasr-train does
    parts = StepParts(net=model, model=model, ema=copy.deepcopy(model.generator).requires_grad_(False),
                      opt=torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=cfg.betas), disc=disc,
                      opt_d=torch.optim.Adam(disc.parameters(), lr=cfg.lr, betas=cfg.betas) if disc else None)
    if compile_mode in ("blocks", "blocks+graph"):
        if not hasattr(torch.nn.Module, "compile"):
            raise DASRError(f"--compile {compile_mode} needs torch 2.2 or later (nn.Module.compile)")
        torch._dynamo.reset()
        for block in model.generator.body:  # in place (nn.Module.compile): parameters and EMA untouched
            block.compile(backend=compile_backend, dynamic=False)
    elif compile_mode not in ("off", "graph"):
        torch._dynamo.reset()  # each row compiles afresh: its first step is its compile time
        parts.net = compile_net(model, "default" if compile_mode == "net+graph" else compile_mode, compile_backend)
    lr = torch.rand(batch, 3, lr_size, lr_size, device=device).contiguous(memory_format=fmt)
    hr = unsharp_mask(torch.rand(batch, 3, 4 * lr_size, 4 * lr_size, device=device)).contiguous(memory_format=fmt)
    v = torch.rand(batch, 33, device=device)
    torch.backends.cudnn.benchmark = device.type == "cuda"  # as dasr-train: fixed shapes, algorithms timed once
    return parts, cfg, lr, hr, v


def make_runner(parts: StepParts, cfg: TrainConfig, lr, hr, v, bf16: bool, mode: str, device: torch.device):
    """(step(), the warm-up steps it needs): train_step on the batch, or with mode "graph" the step recorded
    as a CUDA graph as `dasr-train --cuda-graph` does (its eager warm-up, then the recording, then replays).
    DASRError without CUDA."""
    if mode not in GRAPHED:
        return (lambda: train_step(parts, cfg, lr, hr, v, bf16)), (3 if mode != "off" else 0)
    graphed = graphed_train_step(parts, cfg, bf16, device)
    return (lambda: graphed(lr, hr, v, rate=cfg.lr, ema_decay=cfg.ema_decay)), graphed.warmup + 2


def bench_step(device: torch.device, batch: int, gan: bool, warmup: int, repeats: int, impl: str = "grouped",
               channels_last: bool = False, lr_size: int = 64, bf16: bool | None = None,
               compile_mode: str = "off", compile_backend: str = "inductor",
               disc_upsample: str = "auto", pointwise: str = "4d",
               small: bool = False) -> tuple[float, float | None, float]:
    """Median seconds of `dasr_model.train.train_step` (the loop's own step) on random data, with the
    expert convolutions computed by `impl`; the peak GPU memory in GiB (None on CPU: over the timed steps,
    but for rows that replay CUDA graphs from the first step on, warm-up, algorithm search and recording
    included, since a replay allocates nothing and the graph's memory was allocated while recording); the
    first step's seconds. `bf16`: autocast to bfloat16 (default: on CUDA, as dasr-train; False times the float32 step).
    `compile_mode`: the network through torch.compile as `dasr-train --compile` does ("off": eager), or
    "graph": the whole step as a CUDA graph (`dasr-train --cuda-graph`; DASRError without CUDA). `disc_upsample`,
    `pointwise`, `small`: as :func:`setup_step`."""
    parts, cfg, lr, hr, v = setup_step(device, batch, gan, impl, channels_last, lr_size, compile_mode, compile_backend,
                                       disc_upsample, pointwise, small)
    bf16 = device.type == "cuda" if bf16 is None else bf16
    run, least = make_runner(parts, cfg, lr, hr, v, bf16, compile_mode, device)
    warmup = max(warmup, least)  # compiled CUDA graphs record on the step after the compiled warm-up; ours after 3
    replays = compile_mode in (*GRAPHED, "reduce-overhead")
    sync(device)
    if device.type == "cuda" and replays:
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    run()
    sync(device)
    first = time.perf_counter() - start
    for _ in range(warmup - 1):
        run()
    sync(device)
    if device.type == "cuda" and not replays:
        torch.cuda.reset_peak_memory_stats(device)
    times = timed_steps(device, repeats, run)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return statistics.median(times), peak, first


def profile_step(device: torch.device, batch: int, gan: bool, impl: str, channels_last: bool, lr_size: int,
                 bf16: bool, steps: int = 3, top: int = 15, mode: str = "off", pointwise: str = "4d",
                 small: bool = False) -> str:
    """Where a training step's time goes (eager, or with mode "graph" replayed from a CUDA graph): its
    warm-up unprofiled (cuDNN's search; the graph's recording), then :func:`_profile.profile_calls`; for an
    eager step then the operators on batch-sized tensors whose operands differ in memory layout
    (:mod:`_layouts`; a replay dispatches none)."""
    parts, cfg, lr, hr, v = setup_step(device, batch, gan, impl, channels_last, lr_size, pointwise=pointwise,
                                       small=small)
    run, least = make_runner(parts, cfg, lr, hr, v, bf16, mode, device)
    for _ in range(max(3, least)):
        run()
    table = profile_calls(run, device, steps, top, operators=mode == "off")  # a replay's kernels have no operator
    if mode == "off":  # a graph's replay dispatches no operators
        # a quarter of the generator's LR feature maps or more: the batch-sized tensors
        trace = trace_layouts(run, batch * parts.model.config.num_feat * lr_size * lr_size // 4)
        table += "\n" + layout_table(trace, flagged_only=True)
    return table


def print_profile(device: torch.device, batch: int, gan: bool, impl: str, channels_last: bool, lr_size: int,
                  bf16: bool, mode: str = "off", pointwise: str = "4d", small: bool = False) -> None:
    """A heading naming the row, then :func:`profile_step`'s table."""
    print(f"\n### Profile: batch {batch}, GAN {'yes' if gan else 'no'}, {'bf16 autocast' if bf16 else 'float32'}, "
          f"{impl_name(impl, pointwise)}, {'channels_last' if channels_last else 'NCHW'}, "
          f"{compiled_name(mode, 'inductor')}\n",
          flush=True)
    try:
        print(profile_step(device, batch, gan, impl, channels_last, lr_size, bf16, mode=mode, pointwise=pointwise,
                           small=small), flush=True)
    except DASRError as exc:  # a CUDA graph on a CPU
        print(f"not profiled: {exc}", flush=True)
    except RuntimeError as exc:  # out of memory, a failed recording: the profiles after it still run
        print(f"not profiled: failed: {first_line(exc, 200)}", flush=True)
    free_cached(device)


def impl_name(impl: str, pointwise: str) -> str:
    """The table's "expert impl" cell: the strategy, and "(flat)" where the generator's element-wise
    operations run on 1-D views (`ExpertMSRResNet.pointwise`)."""
    return impl if pointwise == "4d" else f"{impl} ({pointwise})"


def compiled_name(mode: str, backend: str) -> str:
    if mode in ("off", "graph", "blocks+graph", "net+graph"):
        return {"off": "eager", "graph": "cuda graph", "blocks+graph": "blocks compiled + cuda graph",
                "net+graph": "compiled + cuda graph"}[mode]
    if mode == "blocks":
        return "blocks compiled" + ("" if backend == "inductor" else f" ({backend})")
    return mode if backend == "inductor" else f"{mode} ({backend})"


def parse_impls(spec: str, channels_last: bool) -> list[tuple[str, bool]]:
    """--impl items ("dense", "dense:cl") as (strategy, channels_last) pairs, in order; with `channels_last`,
    a channels_last row follows each strategy that keeps the format. ValueError names an unknown item."""
    runs: list[tuple[str, bool]] = []
    for item in (x.strip() for x in spec.split(",") if x.strip()):
        impl, _, layout = item.partition(":")
        if (impl not in EXPERT_IMPLS and impl != "folded" + DENSE_LAST) or layout not in ("", "cl"):
            raise ValueError(f"unknown {item!r}; choose from {', '.join(EXPERT_IMPLS)}, each optionally with :cl "
                             f"(and folded{DENSE_LAST})")
        runs.append((impl, layout == "cl"))
    if channels_last:
        runs += [(impl, True) for impl, cl in list(runs) if not cl and impl in KEEPS_CHANNELS_LAST
                 and (impl, True) not in runs]
    if not runs:
        raise ValueError("no strategy given")
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-sizes", default="6,16,48")
    ap.add_argument("--loader-batch", type=int, default=48)
    ap.add_argument("--loader-workers", default="0,2")
    ap.add_argument("--loader-steps", type=int, default=20)
    ap.add_argument("--gan", action="store_true", help="also time steps with the GAN term")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--skip-steps", action="store_true")
    ap.add_argument("--impl", default="grouped",
                    help=f"expert-conv strategies to time, comma-separated: {','.join(EXPERT_IMPLS)}; "
                         "IMPL:cl for channels_last; folded+dense-last: folded, the last convolution dense")
    ap.add_argument("--channels-last", action="store_true",
                    help=f"also time {' and '.join(KEEPS_CHANNELS_LAST)} (when listed) in channels_last")
    ap.add_argument("--compile", default="", help=f"also time each row compiled in these modes, comma-separated: "
                                                  f"{','.join(COMPILE_MODES[1:])}; experiments: "
                                                  f"{','.join(BLOCK_MODES)} (the residual blocks compiled alone, "
                                                  "eager or in the whole-step CUDA graph; the network compiled "
                                                  "in that graph)")
    ap.add_argument("--cuda-graph", action="store_true",
                    help="also time each row as one CUDA graph per step (dasr-train --cuda-graph), after any "
                         "--compile modes; with --profile(-only), profile those rows too")
    ap.add_argument("--compile-only", action="store_true",
                    help="with --compile or --cuda-graph: time the --impl rows compiled / graphed only, not eager "
                         "(the float32 baseline stays)")
    ap.add_argument("--compile-backend", default="inductor", help=argparse.SUPPRESS)  # aot_eager: CPU dry runs
    ap.add_argument("--lr-size", type=int, default=64, help="LR crop side of the timed steps (HR: 4x)")
    ap.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                    help="the step rows' arithmetic, as dasr-train --precision (auto: bf16 autocast on CUDA, "
                         "float32 on CPU; bf16 on a CPU: the GPU's path, for dry runs)")
    ap.add_argument("--profile", action="store_true",
                    help="after the table, profile each eager row's step (torch.profiler): wall against device-busy "
                         "time per step and the operators (kernels on CUDA) that take the most")
    ap.add_argument("--profile-only", action="store_true",
                    help="profile the --impl rows (no float32 baseline) without timing the table first")
    ap.add_argument("--fp32-baseline", action="store_true",
                    help="also time the float32 step with the grouped strategy in NCHW and the discriminator's "
                         "F.interpolate up-sampling (the release's way; on CUDA the other rows are bf16), the base "
                         "of the speed-up column")
    ap.add_argument("--gan-only", action="store_true", help="time the GAN rows alone (implies --gan)")
    ap.add_argument("--disc-upsample", default="auto",
                    help="the discriminator's x2 up-sampling in the GAN rows, comma-separated, a row each: "
                         f"{','.join(DISC_UPSAMPLES)} (UNetDiscriminatorSN.upsample; the float32 baseline: "
                         "interpolate)")
    ap.add_argument("--pointwise", choices=POINTWISE, default="4d",
                    help="the generator's element-wise operations in every row but the float32 baseline "
                         "(ExpertMSRResNet.pointwise; flat: on 1-D views; the expert impl column says \"(flat)\")")
    ap.add_argument("--small", action="store_true", help=f"small networks ({SMALL_NAME}): dry runs on a CPU")
    args = ap.parse_args()
    try:
        impl_runs = parse_impls(args.impl, args.channels_last)
    except ValueError as exc:
        ap.error(f"--impl: {exc}")
    gan_settings = (True,) if args.gan_only else (False, True) if args.gan else (False,)
    ups = list(dict.fromkeys(u.strip() for u in args.disc_upsample.split(",") if u.strip()))
    if not ups or (unknown := [u for u in ups if u not in DISC_UPSAMPLES]):
        ap.error(f"--disc-upsample: choose from {', '.join(DISC_UPSAMPLES)}")
    modes = [m.strip() for m in args.compile.split(",") if m.strip()]
    if unknown := [m for m in modes if m not in (*COMPILE_MODES[1:], *BLOCK_MODES)]:
        ap.error(f"--compile: unknown {', '.join(unknown)}; choose from {', '.join(COMPILE_MODES[1:] + BLOCK_MODES)}")
    modes += ["graph"] if args.cuda_graph else []
    device = pick_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    print(f"command: {shlex.join([sys.executable.rsplit('/', 1)[-1], *sys.argv])}")
    print(f"date: {datetime.date.today()}; torch {torch.__version__}; device: {device} ({name}); "
          f"machine: {platform.node()}" + (f"; networks: {SMALL_NAME} (--small)" if args.small else "") + "\n")
    if args.shards:
        print("| loader workers | batch | samples/s |\n|---:|---:|---:|")
        for w in (int(x) for x in args.loader_workers.split(",")):
            try:  # a worker killed (a small /dev/shm: a bus error) must not cost the step rows after it
                rate = f"{bench_loader(args.shards, args.loader_batch, w, args.loader_steps):.1f}"
            except (RuntimeError, OSError) as exc:
                rate = f"failed: {first_line(exc)}"
            print(f"| {w} | {args.loader_batch} | {rate} |", flush=True)
        print()
    bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    if args.profile_only:  # the rows' order: each batch, without GAN first, each strategy
        for b in (int(x) for x in args.batch_sizes.split(",")):
            for gan in gan_settings:
                for impl, cl in impl_runs:
                    for mode in ("off", "graph") if args.cuda_graph else ("off",):
                        print_profile(device, b, gan, impl, cl, args.lr_size, bf16, mode, args.pointwise, args.small)
    elif not args.skip_steps:
        if device.type == "cuda":
            print(f"TF32 for float32 convolutions / matmuls: {torch.backends.cudnn.allow_tf32} / "
                  f"{torch.backends.cuda.matmul.allow_tf32}")
        precision = "bf16 autocast" if bf16 else "float32"
        fp32_base = args.fp32_baseline and bf16  # with float32 rows the first row is the baseline already
        first_impl, first_cl = impl_runs[0]
        base_name = ("float32 grouped NCHW eager" if fp32_base else
                     f"{precision} {impl_name(first_impl, args.pointwise)} {'channels_last' if first_cl else 'NCHW'} "
                     + (compiled_name(modes[0], args.compile_backend) if args.compile_only and modes else "eager"))
        print("| batch | GAN | precision | expert impl | memory format | compile | ms/step "
              f"| speed-up vs {base_name} | peak GiB | first step s | D up-sampling |\n"
              "|---:|---|---|---|---|---|---:|---:|---:|---:|---|")
        profiles = []
        for b in (int(x) for x in args.batch_sizes.split(",")):
            for gan in gan_settings:
                runs = [("float32", "grouped", False, "off", "interpolate")] if fp32_base else []
                eager = () if args.compile_only and modes else ("off",)
                runs += [(precision, impl, cl, mode, up) for impl, cl in impl_runs for mode in (*eager, *modes)
                         for up in (ups if gan else ["auto"])]
                base = None
                for prec, impl, cl, mode, up in runs:
                    pw = "4d" if prec == "float32" and fp32_base else args.pointwise  # the baseline: the release's
                    row = (f"| {b} | {'yes' if gan else 'no'} | {prec} | {impl_name(impl, pw)} "
                           f"| {'channels_last' if cl else 'NCHW'} "
                           f"| {compiled_name(mode, args.compile_backend)} |")
                    up_cell = f" {up if gan else '-'} |"
                    try:
                        timed = bench_step(device, b, gan, args.warmup, args.repeats, impl, cl, args.lr_size,
                                           bf16=prec != "float32", compile_mode=mode,
                                           compile_backend=args.compile_backend, disc_upsample=up, pointwise=pw,
                                           small=args.small)
                    except DASRError as exc:  # a CUDA graph on a CPU
                        print(f"{row} {exc} | - | - | - |{up_cell}", flush=True)
                        continue
                    except RuntimeError as exc:  # one row out of memory must not cost the rows after it, nor a
                        if not out_of_memory(exc) and mode == "off":  # compilation (dynamo's and inductor's errors
                            raise  # are RuntimeErrors) or a recording that fails: the eager rows are the reference
                        failure = "out of memory" if out_of_memory(exc) else f"failed: {first_line(exc)}"
                        timed = None
                    if timed is None:  # out of the except block: its traceback no longer holds the row's tensors
                        print(f"{row} {failure} | - | - | - |{up_cell}", flush=True)
                        free_cached(device)
                        continue
                    sec, peak, first = timed
                    if args.profile and mode in ("off", "graph") and (not gan or up == ups[0]):  # once per row
                        profiles.append((device, b, gan, impl, cl, args.lr_size, prec != "float32", mode, pw,
                                         args.small))
                    if base is None:
                        base = sec  # the first row: the float32 baseline, or the first strategy eager
                    print(f"{row} {1000 * sec:.1f} | {base / sec:.2f}x | {'-' if peak is None else f'{peak:.2f}'} "
                          f"| {first:.1f} |{up_cell}", flush=True)
                    free_cached(device)
        for how in profiles:
            print_profile(*how)


if __name__ == "__main__":
    main()
