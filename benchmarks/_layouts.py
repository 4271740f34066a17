"""Which operators of a call move large tensors in mismatched memory layouts: a dispatch-level trace.

A GPU's element-wise kernels are vectorised only when every operand has the same dense layout and none
is broadcast. An add of an NCHW and a channels_last tensor, or a convolution handed a gradient in
another layout than it computes in (it converts it first), runs a strided kernel that transposes, which
reads memory several times slower; an operand broadcast against the others (a bias, a gradient's
expand) runs the same strided kernel, without the transposition. torch.profiler names such kernels
(`elementwise_kernel<128, 4, ...>`) but not the operator behind them; this trace names the operator,
its operands' layouts and how often a call runs it.

Each operand's layout is the order of its dimensions by stride, outermost first, as letters ("NCHW",
"NHWC"; a size-1 dimension is left out, as it has no order: a folded (1, N*C, H, W) channels_last
tensor reads "HWC"); "broadcast" for an expanded tensor, "strided" for one otherwise not dense (gaps or
overlaps). A call mixes layouts where two of its operands or outputs of the largest one's image size
(not its weights) differ in layout, and broadcasts where an element-wise operator reads an input
broadcast (:class:`Call`). The trace sees operators as dispatched (autograd's backward ones included),
not what a kernel converts inside itself: a convolution whose operands differ mixes layouts for that
reason.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

# operators that return views or only metadata: no kernel moves data
_NO_DATA = ("view", "_unsafe_view", "permute", "transpose", "t", "squeeze", "unsqueeze", "expand", "select",
            "slice", "as_strided", "alias", "detach", "unflatten", "unbind", "split", "chunk", "narrow",
            "empty", "empty_strided", "new_empty_strided", "new_empty", "empty_like", "_reshape_alias",
            "lift_fresh", "set_", "resize_", "is_same_size", "_to_copy_noop")
# operators whose smaller operands are weights, biases or other inputs, not broadcast element-wise
_NOT_ELEMENTWISE = {"convolution", "convolution_backward", "mm", "bmm", "addmm", "baddbmm", "matmul", "cat", "stack",
                    "upsample_bilinear2d", "upsample_bilinear2d_backward", "pixel_shuffle", "pixel_unshuffle",
                    "index", "index_put", "scatter", "gather", "embedding", "linear"}
_LETTERS = {1: "N", 2: "NC", 3: "NCL", 4: "NCHW", 5: "NCDHW"}


def layout(t: torch.Tensor) -> str:
    """t's dimensions ordered by stride, outermost first, as letters of NCHW (size-1 dimensions left
    out); "broadcast" when a dimension has stride 0 (an expand), "strided" when t is otherwise not dense,
    "-" for a 0-d or one-element tensor."""
    return layout_of(tuple(t.shape), tuple(t.stride()))


def layout_of(shape: tuple[int, ...], strides: tuple[int, ...]) -> str:
    """:func:`layout` from a shape and its strides (as torch.profiler records them)."""
    names = _LETTERS.get(len(shape), "".join(chr(ord("a") + i) for i in range(len(shape))))
    dims = [d for d in range(len(shape)) if shape[d] != 1]
    if not dims:
        return "-"
    if any(strides[d] == 0 for d in dims):
        return "broadcast"
    dims.sort(key=lambda d: -strides[d])
    expected = 1
    for d in reversed(dims):  # dense: each stride is the product of the inner sizes
        if strides[d] != expected:
            return "strided"
        expected *= shape[d]
    return "".join(names[d] for d in dims)


class Call(NamedTuple):
    """One kind of call: the operator, its largest tensor's shape, its image-sized operands' layouts ->
    its outputs', whether those mix layouts (two order their common dimensions differently, or one is
    not dense) and whether it broadcasts an input (an expanded one, a smaller one such as a bias, a 0-d
    CUDA tensor) in an element-wise way, as a CUDA convolution with a bias does inside (cuDNN computes
    without it, PyTorch adds it after); on a GPU either runs PyTorch's strided element-wise kernel."""

    op: str
    shape: tuple[int, ...]
    layouts: str
    mixed: bool
    broadcast: bool


class LayoutTrace(TorchDispatchMode):
    """Counts the :class:`Call` s made under it whose largest tensor (in or out) has at least `min_numel`
    elements."""

    def __init__(self, min_numel: int) -> None:
        super().__init__()
        self.min_numel = min_numel
        self.calls: Counter[Call] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name.rstrip("_") in _NO_DATA or name in _NO_DATA:
            return out
        ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]  # (tree_leaves: torch 2.2+)
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if not ins + outs:
            return out
        largest = max(ins + outs, key=torch.Tensor.numel)
        if largest.numel() < self.min_numel:
            return out
        broadcast = name not in _NOT_ELEMENTWISE and any(_broadcasts(t, largest) for t in ins)
        # on a GPU PyTorch adds a convolution's bias after cuDNN's kernel, as an add broadcast inside it (a
        # CPU's kernels add it themselves)
        broadcast |= name == "convolution" and largest.device.type != "cpu" and isinstance(args[2], torch.Tensor)
        ins, outs = _like(ins, largest), _like(outs, largest)
        mixed = any(not _agree(a, b) for i, a in enumerate(ins + outs) for b in (ins + outs)[i + 1 :])
        self.calls[Call(str(func), tuple(largest.shape), f"{_names(ins)} -> {_names(outs)}", mixed, broadcast)] += 1
        return out


def _broadcasts(t: torch.Tensor, largest: torch.Tensor) -> bool:
    """t is read broadcast against `largest`: expanded (a stride-0 dimension), or smaller and broadcastable
    to it, or a 0-d tensor on a GPU (a CPU 0-d one, as a Python number becomes, a kernel takes as a scalar)."""
    if t.dim() == 0:
        return t.device.type != "cpu" and largest.device.type != "cpu"
    if layout(t) == "broadcast":
        return True
    if t.numel() >= largest.numel():
        return False
    try:
        return torch.broadcast_shapes(t.shape, largest.shape) == largest.shape
    except RuntimeError:
        return False


def _like(tensors: list[torch.Tensor], largest: torch.Tensor) -> list[torch.Tensor]:
    """The operands that carry the same image as the largest: for a 4-D one those of its height and width
    (a 3-channel gradient beside 64-channel features; not a 3x3 weight, not a bias), else those of its shape."""
    if largest.dim() == 4:
        return [t for t in tensors if t.dim() == 4 and t.shape[-2:] == largest.shape[-2:]]
    return [t for t in tensors if t.shape == largest.shape]


def _agree(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Both dense, and their dimensions that are not size 1 in either in the same order by stride."""
    la, lb = layout(a), layout(b)
    if "strided" in (la, lb):
        return False
    if "broadcast" in (la, lb):  # one value read over and over (a gradient's expand): no order to mismatch
        return True
    common = [d for d in range(a.dim()) if a.shape[d] != 1 and b.shape[d] != 1]
    return sorted(common, key=lambda d: -a.stride(d)) == sorted(common, key=lambda d: -b.stride(d))


def _names(tensors: list[torch.Tensor]) -> str:
    names = [layout(t) for t in tensors]
    if len(names) > 4:  # a multi-tensor (foreach) operator: each layout once, with its count
        return ", ".join(f"{n} x{k}" for n, k in Counter(names).items())
    return ", ".join(names) or "-"


def trace_layouts(run: Callable[[], object], min_numel: int) -> LayoutTrace:
    """run() once under a :class:`LayoutTrace` (warm it up first: a first call may differ)."""
    trace = LayoutTrace(min_numel)
    with trace:
        run()
    return trace


def layout_table(trace: LayoutTrace, unit: str = "step", flagged_only: bool = False) -> str:
    """The trace as a markdown table: calls that mix layouts first, then those that broadcast, then the rest,
    each by elements moved per `unit` (calls times the largest tensor's elements)."""
    rows = sorted(trace.calls.items(), key=lambda kv: (not kv[0].mixed, not kv[0].broadcast,
                                                       -kv[1] * math.prod(kv[0].shape)))
    mixed = sum(n for c, n in trace.calls.items() if c.mixed)
    broadcast = sum(n for c, n in trace.calls.items() if c.broadcast and not c.mixed)
    lines = [f"Of {sum(trace.calls.values())} calls per {unit} on tensors of {trace.min_numel:,} elements or more, "
             f"{mixed} mix layouts and {broadcast} more broadcast an input (on a GPU both run PyTorch's strided "
             "element-wise kernel; a transposition between layouts is the slow one)", "",
             f"| operator | largest shape | layouts in -> out | calls per {unit} | strided kernel on a GPU |",
             "|---|---|---|---:|---|"]
    for c, n in rows:
        flag = "**mixed layouts**" if c.mixed else "broadcast" if c.broadcast else ""
        if flagged_only and not flag:
            continue
        lines.append(f"| `{c.op}` | {'x'.join(map(str, c.shape))} | {c.layouts} | {n} | {flag} |")
    return "\n".join(lines) + "\n"
