"""Where a benchmark's time goes: torch.profiler around a few calls, as a markdown table."""

from __future__ import annotations

import re
import statistics
import time
from collections import defaultdict
from collections.abc import Callable

import torch
from _layouts import layout_of


def sync(device: torch.device) -> None:
    """Wait for `device` (a CUDA one; a CPU's work is done when its call returns)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_cached(device: torch.device) -> None:
    """Give the caching allocator's free blocks back (CUDA), between rows. Never fatal: after a failed CUDA
    graph capture some torch versions leave the allocator thinking a capture is under way, and empty_cache
    then raises (an INTERNAL ASSERT); the rows after it must still run."""
    if device.type == "cuda":
        try:
            torch.cuda.empty_cache()
        except RuntimeError as exc:
            print(f"(empty_cache failed: {first_line(exc)}; going on)", flush=True)


def timed_steps(device: torch.device, n: int, step: Callable[[], object]) -> list[float]:
    """Seconds of each of `n` calls of step(), the device synchronised around each."""
    times = []
    for _ in range(n):
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def profile_calls(run: Callable[[], object], device: torch.device, steps: int = 3, top: int = 15,
                  unit: str = "step", operators: bool = True) -> str:
    """`steps` timed calls of run() (the device synchronised around each), then `steps` under
    torch.profiler; :func:`profile_table` of what the profiler saw, per `unit` (one call), and on CUDA
    with `operators` :func:`operator_table`, which operators launched those kernels (leave it out for a
    CUDA graph's replay: its kernels have no launching operator). On CUDA the profiler records input
    shapes, which adds to its own wall time, not to the kernels'. Warm run() up first."""
    from torch.profiler import ProfilerActivity, profile

    plain = timed_steps(device, steps, run)
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, record_shapes=cuda) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            run()
        sync(device)
        profiled = (time.perf_counter() - start) / steps
    table = profile_table(prof.key_averages(), steps, statistics.median(plain), profiled, cuda, top, unit)
    if not (cuda and operators):
        return table
    events = prof.events()
    # the Chrome trace only where the events lack strides (torch 2.11): exporting a GPU trace takes seconds
    strides = any(getattr(e, "structured_input_strides", None) for e in events)
    return table + "\n" + operator_table(events, steps, top, unit, None if strides else traced_inputs(prof))


def profile_table(events, steps: int, wall: float, profiled: float, cuda: bool, top: int = 15,
                  unit: str = "step") -> str:
    """Per `unit` (a step, an image): the unprofiled wall time, the time the device was busy (on CUDA the
    kernels and copies themselves, not the operators that launched them nor annotation spans such as the
    optimiser's; on a CPU the operators' own time) and the `top` entries by their own time, as a markdown
    table. Busy far below the wall: the call waits on the host (launches, Python), which CUDA graphs or
    compilation remove; busy close to it: the kernels themselves."""
    kind = "device" if cuda else "cpu"

    def own_us(e) -> float:
        return _own_us(e, cuda)

    if cuda:
        events = _device_events(events)
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
        name = short_kernel(e.key) if cuda else e.key[:70]
        lines.append(f"| `{name}` | {e.count / steps:.0f} | {ms:.2f} | {100 * ms / max(busy, 1e-9):.1f} % |")
    return "\n".join(lines) + "\n"


def _own_us(e, cuda: bool) -> float:
    """An event's own time in µs: on the device, or on the CPU (the attribute's name changed across torch
    versions: cuda -> device)."""
    names = ("self_device_time_total", "self_cuda_time_total") if cuda else ("self_cpu_time_total",)
    return next(float(getattr(e, n)) for n in names if hasattr(e, n))


def _device_events(events) -> list:
    """The kernels and copies themselves: CUDA events that are not annotation spans (the optimiser's step
    is a CUDA-typed user annotation whose time includes idle gaps)."""
    return [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA
            and not getattr(e, "is_user_annotation", False)]


# identifiers inside a kernel's templated name that say what it computes (the functor, the operator's own
# kernel function, a cast on load or store); the rest is namespaces and argument types
_TELLING = re.compile(r"[Ff]unctor|Cast|^launch_|_kernel(_cuda|_impl)?$|_impl(_nocast)?$|_nocast$|Ops?$")
_DTYPE = re.compile(r"\b(BFloat16|__nv_bfloat16|Half|__half|float|double|bool|long|int|short|(?:un)?signed char)\b")
_DTYPE_NAMES = {"__nv_bfloat16": "BFloat16", "__half": "Half"}  # CUDA's own names (cuDNN's kernels) as PyTorch's
_NOISE = {"at", "native", "c10", "std", "void", "memory", "detail", "BFloat16", "Half", "TensorIteratorBase",
          "__nv_bfloat16", "__half"}


def first_line(exc: BaseException, width: int = 120) -> str:
    """An error's first line, cut at `width`, for a table's cell (its type where the message is empty)."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:width]


def short_kernel(name: str, width: int = 100) -> str:
    """A CUDA kernel's name, readable in a table: the kernel itself (with its numeric template arguments:
    `elementwise_kernel<128, 4>` is PyTorch's strided element-wise kernel, `vectorized_elementwise_kernel<8>`
    its vectorised one), the first element type in its template (`[BFloat16]`) and the identifiers inside
    it that say what it computes (`BinaryFunctor, MulFunctor`, `direct_copy_kernel_cuda, LoadWithCast`).
    CUTLASS's generic wrappers (`Kernel2<...>`, `device_kernel<...>`) are named by their first template
    argument. Names without templates (cuDNN's, cuBLAS's) stay as they are, cut at `width`."""
    head = name.removeprefix("void ").replace("(anonymous namespace)::", "")
    cut = re.search(r"[<(]", head)
    if cut is None or not re.fullmatch(r"[\w:]+", head[: cut.start()]):  # not a C++ name: "Memcpy HtoD (...)"
        return head[:width]
    base = head[: cut.start()].rsplit("::", 1)[-1]
    rest = head[cut.start() :]
    inner = re.match(r"<\s*([\w:]+)", rest)
    if re.fullmatch(r"Kernel\d*|device_kernel", base) and inner:  # CUTLASS's wrappers: the kernel is the argument
        base = inner.group(1).rsplit("::", 1)[-1]
    nums = re.match(r"<\s*(\d+(?:\s*,\s*\d+)*)\s*[,>]", rest)
    label = base + (f"<{nums.group(1)}>" if nums else "")
    dtype = _DTYPE.search(rest)  # the first element type in the template: a bf16 and a float kernel differ
    label += f" [{_DTYPE_NAMES.get(dtype.group(1), dtype.group(1))}]" if dtype else ""
    seen: list[str] = []
    for tok in re.findall(r"[A-Za-z_]\w*", rest):
        if tok != base and tok not in _NOISE and tok not in seen and _TELLING.search(tok):
            seen.append(tok)
    text = label + (" · " + ", ".join(seen) if seen else "")
    return text if len(text) <= width else text[: width - 1] + "…"


def traced_inputs(prof) -> dict[int, tuple[list, list, list]]:
    """Per operator event id: its inputs' (shapes, strides, dtypes) as the profiler's Chrome trace records
    them ("Input Dims", "Input Strides", "Input type"): where this torch's events do not carry strides
    (torch 2.11 does not), its trace does. Empty where the trace has none, or cannot be exported (a
    profiler exports once)."""
    import json
    import tempfile

    try:  # (a profiler exports its trace once; a failed export costs the layouts, not the profile)
        with tempfile.TemporaryDirectory() as tmp:
            path = f"{tmp}/trace.json"
            prof.export_chrome_trace(path)
            with open(path) as f:
                trace = json.load(f)
    except (RuntimeError, OSError, ValueError):
        return {}
    found = {}
    for ev in trace.get("traceEvents", []):
        args = ev.get("args") or {}
        if ev.get("cat") == "cpu_op" and "External id" in args and "Input Strides" in args:
            found[args["External id"]] = (args.get("Input Dims", []), args["Input Strides"], args.get("Input type", []))
    return found


def operator_table(events, steps: int, top: int = 15, unit: str = "step",
                   inputs: dict[int, tuple[list, list, list]] | None = None) -> str:
    """Which operators launched the device time (torch.profiler events recorded with record_shapes): per
    operator, where it ran (its outermost operator, e.g. an autograd backward node, then its parent), and
    its tensor inputs (shape, :func:`_layouts.layout_of` of their strides, dtype), the calls, the device time
    of its own kernels, its share of all the kernels' time, and the kernel that took most of it, largest
    first. An element-wise operator whose inputs differ in layout, or that broadcasts one, runs PyTorch's
    strided kernel (`elementwise_kernel<128, 4>`), several times slower than the vectorised one for a
    transposition. Kernels replayed from a CUDA graph have no launching operator. Strides and dtypes come
    from the events where this torch's profiler hands them over (recent ones), else from `inputs`
    (:func:`traced_inputs`, by event id); without either the layouts read "?"."""
    total: dict[tuple[str, str], float] = defaultdict(float)
    calls: dict[tuple[str, str], int] = defaultdict(int)
    kernels: dict[tuple[str, str], dict[str, float]] = defaultdict(lambda: defaultdict(float))
    strides_known = False
    for e in events:
        launched = getattr(e, "kernels", None) or []
        if e.device_type != torch.autograd.DeviceType.CPU or not launched:
            continue
        traced = (inputs or {}).get(getattr(e, "id", None))
        strides_known |= bool(getattr(e, "structured_input_strides", None) or traced)
        key = (_where(e), _inputs(e, traced))
        calls[key] += 1
        for k in launched:
            total[key] += k.duration
            kernels[key][short_kernel(k.name)] += k.duration
    if not total:
        return "no operator launched a kernel (a CUDA graph's replay has none): no per-operator table\n"
    ran = sum(_own_us(e, True) for e in _device_events(events)) or sum(total.values())
    mine = sum(total.values())
    lines = [f"Operators by the device time of the kernels they launched themselves: {mine / steps / 1000:.1f} "
             f"of the {ran / steps / 1000:.1f} ms the kernels ran per {unit}"
             + ("" if strides_known else " (this torch's profiler records no strides: layouts read \"?\")") + ":", "",
             f"| operator (outermost > parent > itself) | inputs: shape layout dtype | calls per {unit} "
             f"| own device ms per {unit} | share | main kernel |", "|---|---|---:|---:|---:|---|"]
    for key in sorted(total, key=total.get, reverse=True)[:top]:
        ms = total[key] / steps / 1000
        main = max(kernels[key], key=kernels[key].get)
        lines.append(f"| `{key[0]}` | {key[1]} | {calls[key] / steps:.0f} | {ms:.2f} | {100 * total[key] / ran:.1f} % "
                     f"| `{main}` |")
    return "\n".join(lines) + "\n"


def _where(e) -> str:
    names = []
    while e is not None:
        name = e.name.removeprefix("autograd::engine::evaluate_function: ")
        if not names or names[-1] != name:
            names.append(name)
        e = e.cpu_parent
    names.reverse()  # outermost first
    return " > ".join(names if len(names) <= 3 else [names[0], names[-2], names[-1]])


def _inputs(e, traced: tuple[list, list, list] | None = None) -> str:
    """An operator event's tensor inputs as "shape layout dtype", a tensor list's one by one; at most 3;
    from the event's own fields, else from `traced` (shapes, strides, dtypes of :func:`traced_inputs`)."""
    if getattr(e, "structured_input_strides", None) or traced is None:
        shapes = getattr(e, "structured_input_shapes", None) or getattr(e, "input_shapes", None) or []
        strides = getattr(e, "structured_input_strides", None) or [[]] * len(shapes)
        dtypes = getattr(e, "input_dtypes", None) or [""] * len(shapes)
    else:
        shapes, strides, dtypes = traced
    tensors = []
    for shape, stride, dtype in zip(shapes, strides, dtypes):
        if isinstance(shape, (list, tuple)) and shape and all(isinstance(s, (list, tuple)) for s in shape):
            stride = stride if isinstance(stride, (list, tuple)) and len(stride) == len(shape) else [[]] * len(shape)
            tensors += [(sh, st, dtype) for sh, st in zip(shape, stride)]  # a tensor list (cat, foreach)
        else:
            tensors.append((shape, stride, dtype))
    parts = []
    for shape, stride, dtype in tensors:
        if not isinstance(shape, (list, tuple)) or not shape or not all(isinstance(s, int) for s in shape):
            continue  # a scalar, None, an empty list
        known = isinstance(stride, (list, tuple)) and len(stride) == len(shape)
        lay = layout_of(tuple(shape), tuple(stride)) if known else "?"
        parts.append(f"{'x'.join(map(str, shape))} {lay} {dtype}".rstrip())
    return ", ".join(parts[:3]) + (", …" if len(parts) > 3 else "") or "-"
