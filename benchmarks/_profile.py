"""Where a benchmark's time goes: torch.profiler around a few calls, as a markdown table."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def profile_calls(run: Callable[[], object], device: torch.device, steps: int = 3, top: int = 15,
                  unit: str = "step") -> str:
    """`steps` timed calls of run() (the device synchronised around each), then `steps` under
    torch.profiler; :func:`profile_table` of what the profiler saw, per `unit` (one call). Warm run() up
    first."""
    from torch.profiler import ProfilerActivity, profile

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    plain = []
    for _ in range(steps):
        sync()
        start = time.perf_counter()
        run()
        sync()
        plain.append(time.perf_counter() - start)
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            run()
        sync()
        profiled = (time.perf_counter() - start) / steps
    return profile_table(prof.key_averages(), steps, statistics.median(plain), profiled, cuda, top, unit)


def profile_table(events, steps: int, wall: float, profiled: float, cuda: bool, top: int = 15,
                  unit: str = "step") -> str:
    """Per `unit` (a step, an image): the unprofiled wall time, the time the device was busy (on CUDA the
    kernels and copies themselves, not the operators that launched them nor annotation spans such as the
    optimiser's; on a CPU the operators' own time) and the `top` entries by their own time, as a markdown
    table. Busy far below the wall: the call waits on the host (launches, Python), which CUDA graphs or
    compilation remove; busy close to it: the kernels themselves."""
    kind = "device" if cuda else "cpu"

    def own_us(e) -> float:  # the attribute's name changed across torch versions (cuda -> device)
        names = ("self_device_time_total", "self_cuda_time_total") if cuda else ("self_cpu_time_total",)
        return next(float(getattr(e, n)) for n in names if hasattr(e, n))

    if cuda:
        events = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA
                  and not getattr(e, "is_user_annotation", False)]
    if not events:
        return (f"wall {1000 * wall:.1f} ms per {unit}; the profiler recorded no {kind} events (no CUPTI?): "
                "no breakdown\n")
    ops = sorted(events, key=own_us, reverse=True)
    busy = sum(own_us(e) for e in ops) / steps / 1000
    # kernels take as long under the profiler as without it, the host's work does not: CUDA's busy time is
    # set against the unprofiled wall; a CPU's operator times are profiled ones, set against the profiled wall
    base, which = (wall, "the wall") if cuda else (profiled, "the profiled wall")
    lines = [f"wall {1000 * wall:.1f} ms per {unit} ({1000 * profiled:.1f} under the profiler); {kind} busy "
             f"{busy:.1f} ms, {100 * busy / (1000 * base):.0f} % of {which}", "",
             f"| {'kernel' if cuda else 'operator'} | calls per {unit} | own {kind} ms per {unit} | share of busy |",
             "|---|---:|---:|---:|"]
    for e in ops[:top]:
        ms = own_us(e) / steps / 1000
        lines.append(f"| `{e.key[:70]}` | {e.count / steps:.0f} | {ms:.2f} | {100 * ms / max(busy, 1e-9):.1f} % |")
    return "\n".join(lines) + "\n"
