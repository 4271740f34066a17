#!/usr/bin/env python
"""dasr-sr speed: G on one LR image, per-sample expert mixing vs the experts fused once per image.

For each LR size (square, one image, the full model: 5 experts, 16 blocks, 64 features, random weights
at the release's init), milliseconds per image, median of --repeats after --warmup:

- `experts fp32`: `model.sr(lr, a)`, every layer mixing its K experts for the image (the "grouped"
  expert conv: fused per-sample kernel + grouped conv), float32 (the baseline of the ratio column);
- `fused fp32`: `dasr_model.infer.super_resolve(model, lr, a)`, which mixes every layer once into a
  plain MSRResNet (`reused_fused_net`: the thread's network from the last image, overwritten) and runs
  that; the fuse is part of the time and also shown alone;
- on CUDA (or with --bf16) also `experts bf16 (autocast)` and `fused bf16 channels_last`
  (`super_resolve(..., dtype=torch.bfloat16, channels_last=True)`);
- on CUDA, experiments dasr-sr does not run: the bf16 path with cudnn.benchmark (cuDNN times its
  algorithms per shape), and the fused network's forward as a CUDA graph (fp32 and bf16; the fuse
  still runs per call, into the weights the graph reads), which removes the per-layer launch cost, and
  in bf16 the fuse and the network as one graph (the fuse waits for nothing on the host: recordable),
  also with the element-wise operations on 1-D views of the feature maps (`MSRResNet.pointwise = "flat"`);
- with CUDA or --bf16, `fused bf16 channels_last, network alone`: that network eager on the whole image
  without super_resolve's harness, then the same with `pointwise = "flat"` (`..., flat element-wise`: an
  experiment for PyTorch's element-wise kernels, bench_pointwise.py), each on a network of its own, and
  `..., last conv as 8 channels`: the last convolution (64 -> 3) padded with zero-weight outputs and
  sliced back (pad_last: cuDNN's 3-channel kernel is slow); on CUDA also each residual block's conv1, bias
  and ReLU as one cuDNN call (relu_in_cudnn), alone and with the padding, eager and (both) in the CUDA
  graph of fuse and network: exact experiments, the same sums;
- with --compile SIZES, last (after --profile), in a table of its own (with --compile-only, the only other
  rows are the `experts fp32` ones): at those sizes (also in --sizes)
  the bf16 channels_last fused network through torch.compile in each of --compile-modes (default:
  default and reduce-overhead; max-autotune also times Triton's convolution templates, whose epilogues
  can take the bias adds, against cuDNN's kernels; inductor fuses the convolutions' bias adds, the
  activations and the pixel shuffles; the fuse still runs per call), against that size's `experts fp32`
  row, and with reduce-overhead among them also that mode on the padded network; the first call, the
  compilation, is in the label; a failed compilation is a row saying so, and
  without a C compiler (inductor needs one) the rows say they were skipped.

max|diff| is against the `experts fp32` output (float32 images in about [0, 1]). CUDA fp32 convolutions
use TF32 when torch.backends.cudnn.allow_tf32 is on (printed at the top; PyTorch's default is on).

--profile SIZE: after the table, where the time of dasr-sr's own path goes at LR SIZE (`fused bf16
channels_last` on CUDA or with --bf16, else `fused fp32`; cudnn.benchmark on CUDA): wall against
device-busy time per image and the kernels (operators on a CPU) that take the most.

Usage: python benchmarks/bench_infer.py [--device auto] [--sizes 128,256,512] [--experts 5]
       [--warmup 2] [--repeats 5] [--bf16] [--compile 512] [--compile-modes default,max-autotune] [--profile 512]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import shlex
import shutil
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from _layouts import layout_table, trace_layouts
from _profile import first_line, free_cached, profile_calls, sync

from dasr_model.infer import fuse_experts, reused_fused_net, super_resolve
from dasr_model.model import DASR, DASRConfig, MSRResNet
from dasr_model.runs import pick_device
from dasr_model.train import COMPILE_MODES


def print_row(size: int, label: str, ms: float, base_ms: float, fuse_ms: float | None, peak: float | None,
              diff: float) -> None:
    """One row of TABLE_HEAD's table."""
    print(f"| {size} | {label} | {ms:.1f} | {base_ms / ms:.2f}x | {'-' if fuse_ms is None else f'{fuse_ms:.2f}'} | "
          f"{'-' if peak is None else f'{peak:.0f}'} | {diff:.1e} |", flush=True)


def print_failed(size: int, label: str, exc: BaseException) -> None:
    """A row saying that `label` failed at `size`, with the error's first line: the table goes on."""
    print(f"| {size} | {label} | failed: {first_line(exc)} | | | | |", flush=True)


TABLE_HEAD = ("| LR | path | ms/image | speed-up vs experts fp32 | fuse ms | peak MiB | max abs diff |\n"
              "|---:|---|---:|---:|---:|---:|---:|")


def timed(fn: Callable[[], torch.Tensor], device: torch.device, warmup: int, repeats: int
          ) -> tuple[float, torch.Tensor, float | None]:
    """Median ms of fn(), its last output, and the peak CUDA memory (MiB) during the timed calls."""

    for _ in range(warmup):
        fn()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    out = None
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    assert out is not None
    return 1000 * statistics.median(times), out, peak


def fuse_once(model: DASR, a: torch.Tensor, **kwargs) -> torch.Tensor:
    """What super_resolve does before its first tile: the mix fused into the thread's reused network."""
    with reused_fused_net(model, a, **kwargs) as net:
        return net.conv_first.weight


LAST_CHANNELS = 8  # the padded last convolution's output channels: 3 real, 5 of zero weights


def pad_last(net: MSRResNet) -> None:
    """An experiment: `net`'s last convolution (64 -> 3 channels) computed with LAST_CHANNELS outputs, the
    extra ones of zero weights and biases, then sliced back to its 3: exact (each real channel sums the same
    products; a different kernel may round them otherwise). On the H200 cuDNN ran the 3-channel one at
    9 TMAC/s (0.80 of the 3.8 ms the convolutions took at LR 512), its outputs unaligned to tensor-core tiles.
    The padded weights are made from the fused ones on every call, so a fuse into `net` reaches them."""
    conv = net.conv_last

    def forward(x: torch.Tensor) -> torch.Tensor:
        w, b = conv.weight, conv.bias
        extra = LAST_CHANNELS - w.shape[0]
        weight = torch.cat([w, w.new_zeros(extra, *w.shape[1:])]).contiguous(memory_format=torch.channels_last)
        return F.conv2d(x, weight, torch.cat([b, b.new_zeros(extra)]), padding=1)[:, :w.shape[0]]

    conv.forward = forward


def relu_in_cudnn(net: MSRResNet) -> None:
    """An experiment (CUDA only): each residual block's first convolution, its bias add and its ReLU as one
    cuDNN call (torch.cudnn_convolution_relu, the bias in the convolution's epilogue): the same sums, one
    rounding fewer. In the eager profile at LR 512 those 16 bias adds and ReLUs took 0.9 of 10 ms."""
    for block in net.body:
        def forward(x: torch.Tensor, like: torch.Tensor | None = None, c1=block.conv1, c2=block.conv2) -> torch.Tensor:
            return x + c2(torch.cudnn_convolution_relu(x, c1.weight, c1.bias, (1, 1), (1, 1), (1, 1), 1))

        block.forward = forward


def both_tweaks(net: MSRResNet) -> None:
    pad_last(net)
    relu_in_cudnn(net)


def graphed(model: DASR, lr: torch.Tensor, a: torch.Tensor, dtype: torch.dtype | None,
            channels_last: bool, with_fuse: bool = False, pointwise: str = "4d",
            tweak: Callable[[MSRResNet], None] | None = None) -> Callable[[], torch.Tensor]:
    """The fused network's forward as a CUDA graph, built on the first call (after cuDNN's search, on a
    side stream, as CUDA graphs need): each call fuses the mix into the same reused network (its weights
    stay where the graph reads them), copies lr into the graph's input and replays it. `with_fuse`: the
    fuse is recorded too (it keeps the mix on the device: no host wait), and each call copies lr and a
    into the graph's inputs and replays the whole of it, on a network of its own, whose element-wise
    operations run as `pointwise` says (`MSRResNet.pointwise`) and which `tweak` changes (an experiment)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    state: dict[str, object] = {}

    def run() -> torch.Tensor:
        with reused_fused_net(model, a, dtype=dtype, channels_last=channels_last) as net:
            return replay(net)

    def replay(net: torch.nn.Module) -> torch.Tensor:
        if "graph" not in state:
            static_x, static_a = lr.contiguous(memory_format=fmt).clone(), a.clone()

            def forward() -> torch.Tensor:
                if with_fuse:
                    model.generator.fuse(static_a, into=net)
                return net(static_x)

            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    forward()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_y = forward()
            state.update(graph=graph, x=static_x, a=static_a, y=static_y, net=net)
        if state["net"] is not net:
            raise RuntimeError("the reused network changed under the graph")
        state["x"].copy_(lr)  # type: ignore[union-attr]
        state["a"].copy_(a)  # type: ignore[union-attr]
        state["graph"].replay()  # type: ignore[union-attr]
        return state["y"].clone()  # type: ignore[union-attr]  # the next replay overwrites the graph's output

    if with_fuse:  # a network of its own, which the graph fuses into (the thread's reused one is another row's)
        own = fuse_experts(model.generator, a, dtype=dtype, channels_last=channels_last)
        own.pointwise = pointwise
        if tweak is not None:
            tweak(own)
        return lambda: replay(own)
    return run


def network_alone(model: DASR, lr: torch.Tensor, a: torch.Tensor, pointwise: str,
                  tweak: Callable[[MSRResNet], None] | None = None) -> Callable[[], torch.Tensor]:
    """The fused bf16 channels_last network on the whole image, without super_resolve's harness (its tiling
    buffer, finiteness check and layout conversions), on a network of its own whose element-wise operations
    run as `pointwise` says (`MSRResNet.pointwise`; "flat": on 1-D views of the feature maps, the same bits):
    the mix fused into it per call, as dasr-sr does into the reused one. A row each way: twins. `tweak`
    changes the network (an experiment: :func:`pad_last`, :func:`relu_in_cudnn`)."""
    net = fuse_experts(model.generator, a, dtype=torch.bfloat16, channels_last=True)
    net.pointwise = pointwise
    if tweak is not None:
        tweak(net)

    def run() -> torch.Tensor:
        model.generator.fuse(a, into=net)
        return net(lr.contiguous(memory_format=torch.channels_last))

    return run


def compiled(model: DASR, lr: torch.Tensor, a: torch.Tensor, mode: str, backend: str,
             tweak: Callable[[MSRResNet], None] | None = None) -> Callable[[], torch.Tensor]:
    """dasr-sr's bf16 channels_last path on the whole image with the fused network through torch.compile
    (`mode`; inductor fuses each convolution's bias add, activation and the pixel shuffles into generated
    kernels; reduce-overhead adds CUDA graphs), compiled on the first call. The network is its own (the
    thread's reused one changes with the other rows' settings, and a new module is a new compilation);
    each call fuses the mix into it in place, as dasr-sr does into the reused one, and the compiled code
    reads its weights as inputs."""
    net = fuse_experts(model.generator, a, dtype=torch.bfloat16, channels_last=True)
    if tweak is not None:  # an experiment (pad_last)
        tweak(net)
    # a mode is inductor's (the aot_eager of CPU dry runs warns about it, or on torch 2.1 fails)
    fn = torch.compile(net, backend=backend, dynamic=False, **({"mode": mode} if backend == "inductor" else {}))

    def run() -> torch.Tensor:
        model.generator.fuse(a, into=net)
        # a copy: with reduce-overhead the output lives in the CUDA graph's pool, which the next call overwrites
        return fn(lr.contiguous(memory_format=torch.channels_last)).clone()

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--sizes", default="128,256,512", help="LR sides (square images), comma-separated")
    ap.add_argument("--experts", type=int, default=5)
    ap.add_argument("--small", action="store_true", help="2 blocks of 8 features (16 of 64): dry runs on a CPU")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--bf16", action="store_true",
                    help="time the bf16 paths on a CPU too (on CUDA they always run): the GPU's path, for dry runs")
    ap.add_argument("--compile", default="", metavar="SIZES",
                    help="at these LR sizes also the fused bf16 channels_last network through torch.compile, in the "
                         "--compile-modes (their first call, the compilation, is said in seconds)")
    ap.add_argument("--compile-modes", default="default,reduce-overhead",
                    help="torch.compile's modes for --compile, comma-separated, a row each: default, reduce-overhead, "
                         "max-autotune, max-autotune-no-cudagraphs")
    ap.add_argument("--compile-backend", default="inductor", help=argparse.SUPPRESS)  # aot_eager: CPU dry runs
    ap.add_argument("--profile", type=int, metavar="SIZE",
                    help="after the table, profile dasr-sr's own path on one LR image of SIZE x SIZE")
    ap.add_argument("--compile-only", action="store_true",
                    help="of the table, only the `experts fp32` rows the --compile rows are compared with")
    args = ap.parse_args()
    if unknown := [m for m in args.compile_modes.split(",") if m.strip() and m.strip() not in COMPILE_MODES[1:]]:
        ap.error(f"--compile-modes: unknown {', '.join(unknown)}; choose from {', '.join(COMPILE_MODES[1:])}")
    device = pick_device(args.device)
    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine() or "CPU"
    print(f"command: {shlex.join([sys.executable.rsplit('/', 1)[-1], *sys.argv])}")
    print(f"machine: {platform.node()}; {platform.platform()}; device: {device} ({name}); "
          f"CPU threads: {torch.get_num_threads()}")
    print(f"date: {datetime.datetime.now().isoformat(timespec='seconds')}; torch {torch.__version__}"
          + (f"; CUDA {torch.version.cuda}; cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}" if cuda else ""))
    config = DASRConfig(num_experts=args.experts, **(dict(num_feat=8, num_block=2, predictor_feat=8) if args.small
                                                     else {}))
    print(f"model: DASR, {args.experts} experts, {config.num_block} blocks, {config.num_feat} features; one image; "
          f"median of {args.repeats} after {args.warmup} warm-up\n")

    torch.manual_seed(0)
    model = DASR(config).to(device).eval()
    print(TABLE_HEAD)
    bases: dict[int, tuple[torch.Tensor, torch.Tensor, float, torch.Tensor]] = {}  # lr, a, ms, output
    for size in (int(s) for s in args.sizes.split(",")):
        lr = torch.rand(1, 3, size, size, device=device)
        with torch.no_grad():
            _, a = model.predict(lr)
        paths: list[tuple[str, Callable[[], torch.Tensor], dict]] = [
            ("experts fp32", lambda: model.sr(lr, a), {}),
            ("fused fp32", lambda: super_resolve(model, lr, a), {}),
        ]
        if cuda or args.bf16:
            def experts_bf16() -> torch.Tensor:
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    return model.sr(lr, a).float()

            paths += [("experts bf16 (autocast)", experts_bf16, {}),
                      ("fused bf16 channels_last",
                       lambda: super_resolve(model, lr, a, dtype=torch.bfloat16, channels_last=True),
                       {"dtype": torch.bfloat16, "channels_last": True}),
                      ("fused bf16 channels_last, network alone", network_alone(model, lr, a, "4d"),
                       {"dtype": torch.bfloat16, "channels_last": True}),
                      ("fused bf16 channels_last, network alone, flat element-wise",
                       network_alone(model, lr, a, "flat"), {"dtype": torch.bfloat16, "channels_last": True}),
                      (f"fused bf16 channels_last, network alone, last conv as {LAST_CHANNELS} channels",
                       network_alone(model, lr, a, "4d", pad_last), {"dtype": torch.bfloat16, "channels_last": True})]
        if cuda:  # experiments, after the paths dasr-sr has: cuDNN's algorithm search, then CUDA graphs
            paths += [("fused bf16 channels_last, cudnn.benchmark",
                       lambda: super_resolve(model, lr, a, dtype=torch.bfloat16, channels_last=True),
                       {"dtype": torch.bfloat16, "channels_last": True, "benchmark": True}),
                      ("fused fp32, cudnn.benchmark + CUDA graph", graphed(model, lr, a, None, False),
                       {"benchmark": True}),
                      ("fused bf16 channels_last, cudnn.benchmark + CUDA graph",
                       graphed(model, lr, a, torch.bfloat16, True),
                       {"dtype": torch.bfloat16, "channels_last": True, "benchmark": True}),
                      ("fused bf16 channels_last, cudnn.benchmark + CUDA graph of fuse and network",
                       graphed(model, lr, a, torch.bfloat16, True, with_fuse=True),
                       {"dtype": torch.bfloat16, "channels_last": True, "benchmark": True}),
                      ("fused bf16 channels_last, cudnn.benchmark + CUDA graph of fuse and network, flat element-wise",
                       graphed(model, lr, a, torch.bfloat16, True, with_fuse=True, pointwise="flat"),
                       {"dtype": torch.bfloat16, "channels_last": True, "benchmark": True}),
                      ("fused bf16 channels_last, network alone, conv1 + ReLU in cuDNN",
                       network_alone(model, lr, a, "4d", relu_in_cudnn),
                       {"dtype": torch.bfloat16, "channels_last": True}),
                      (f"fused bf16 channels_last, network alone, last conv as {LAST_CHANNELS} channels + conv1 + ReLU "
                       "in cuDNN", network_alone(model, lr, a, "4d", both_tweaks),
                       {"dtype": torch.bfloat16, "channels_last": True}),
                      (f"fused bf16 channels_last, cudnn.benchmark + CUDA graph of fuse and network, last conv as "
                       f"{LAST_CHANNELS} channels + conv1 + ReLU in cuDNN",
                       graphed(model, lr, a, torch.bfloat16, True, with_fuse=True, tweak=both_tweaks),
                       {"dtype": torch.bfloat16, "channels_last": True, "benchmark": True})]
        if args.compile_only:  # the baseline alone: the time goes to the compilation (the speed run's last step)
            paths = paths[:1]
        base_ms, base_out = None, None
        for label, fn, fuse_kw in paths:
            torch.backends.cudnn.benchmark = fuse_kw.pop("benchmark", False)
            with torch.no_grad():
                try:
                    ms, out, peak = timed(fn, device, args.warmup, args.repeats)
                except RuntimeError as e:  # an experiment that fails on this machine: said, and the table goes on
                    print_failed(size, label, e)
                    continue
                fuse_ms = (timed(lambda: fuse_once(model, a, **fuse_kw), device, 1, args.repeats)[0]
                           if label.startswith("fused") else None)
            if base_ms is None:
                base_ms, base_out = ms, out
                bases[size] = (lr, a, ms, out)
            print_row(size, label, ms, base_ms, fuse_ms, peak, (out.float() - base_out.float()).abs().max().item())
            del out
        torch.backends.cudnn.benchmark = False
        free_cached(device)
    if args.profile:
        print_profile(model, device, args.profile, bf16=cuda or args.bf16)
    if args.compile:  # last: a compilation's cost and failures are the least known
        print_compiled(model, device, [int(s) for s in args.compile.split(",")], bases, args)


def print_compiled(model: DASR, device: torch.device, sizes: list[int],
                   bases: dict[int, tuple[torch.Tensor, torch.Tensor, float, torch.Tensor]],
                   args: argparse.Namespace) -> None:
    """The table's rows for the fused bf16 channels_last network through torch.compile (:func:`compiled`),
    against the same size's `experts fp32` row above: a failed compilation is a row saying so."""
    print(f"\n### torch.compile ({args.compile_backend}): the fused bf16 channels_last network\n\n{TABLE_HEAD}",
          flush=True)
    no_compiler = args.compile_backend == "inductor" and not any(shutil.which(c) for c in ("cc", "gcc", "clang"))
    for size in sizes:
        if size not in bases:
            print(f"| {size} | torch.compile | not in --sizes | | | | |", flush=True)
            continue
        lr, a, base_ms, base_out = bases[size]
        modes = [m.strip() for m in args.compile_modes.split(",") if m.strip()]
        # and the experiment: the last convolution padded (pad_last), compiled the way CUDA graphs come with
        padded = [("reduce-overhead", pad_last)] if "reduce-overhead" in modes else []
        for mode, tweak in [(m, None) for m in modes] + padded:
            label = f"fused bf16 channels_last, torch.compile {mode}" + (
                f", last conv as {LAST_CHANNELS} channels" if tweak is not None else "")
            if no_compiler:  # inductor builds its kernels with the system C compiler
                print(f"| {size} | {label} | skipped: no C compiler (cc, gcc, clang) | | | | |", flush=True)
                continue
            with torch.no_grad():
                try:
                    run = compiled(model, lr, a, mode, args.compile_backend, tweak)
                    sync(device)
                    start = time.perf_counter()
                    run()
                    sync(device)
                    first = time.perf_counter() - start
                    ms, out, peak = timed(run, device, args.warmup, args.repeats)
                except RuntimeError as e:  # dynamo's and inductor's failures are RuntimeErrors: said, and on
                    print_failed(size, label, e)
                    continue
                fuse_ms = timed(lambda: fuse_once(model, a, dtype=torch.bfloat16, channels_last=True), device, 1,
                                args.repeats)[0]
            print_row(size, f"{label} (first call {first:.0f} s)", ms, base_ms, fuse_ms, peak,
                      (out.float() - base_out.float()).abs().max().item())
            del out


def print_profile(model: DASR, device: torch.device, size: int, bf16: bool) -> None:
    """A heading, then where one image's time goes in dasr-sr's own path (fuse included), after 2 warm-ups,
    and which of its operators mix memory layouts on feature-map-sized tensors (benchmarks/_layouts.py)."""
    cuda = device.type == "cuda"
    what = "fused bf16 channels_last" if bf16 else "fused fp32"
    print(f"\n### Profile: LR {size}, {what}{', cudnn.benchmark' if cuda else ''}\n", flush=True)
    lr = torch.rand(1, 3, size, size, device=device)
    kwargs = {"dtype": torch.bfloat16, "channels_last": True} if bf16 else {}
    torch.backends.cudnn.benchmark = cuda
    try:
        with torch.no_grad():
            _, a = model.predict(lr)

            def run() -> torch.Tensor:
                return super_resolve(model, lr, a, **kwargs)

            for _ in range(2):
                run()
            print(profile_calls(run, device, unit="image"), flush=True)
            # a quarter of the network's LR feature map or more
            print(layout_table(trace_layouts(run, model.config.num_feat * size * size // 4), unit="image",
                               flagged_only=True), flush=True)
    finally:
        torch.backends.cudnn.benchmark = False


if __name__ == "__main__":
    main()
