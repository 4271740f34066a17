"""The whole training step as one CUDA graph (`dasr-train --cuda-graph`).

An eager step launches hundreds of small kernels (37 expert convolutions, each mixed per sample, forward
and backward, then Adam, the EMA and the discriminator), and the host's time to launch them can exceed
the GPU's time to run them. A CUDA graph records the launches once and replays them with one call.

The recording follows PyTorch's whole-network capture: the first `warmup` steps run eagerly on a side
stream (cuDNN's algorithm search, Adam's state, the allocator's pools), the next one is recorded into
the graph, and every step from then on, the recorded one included, copies its batch into the graph's
input tensors and replays it. Every batch is trained on once, as in an eager run. What changes from step
to step enters through tensors the graph reads: the batch, the learning rate (the optimisers' `lr` is
one 0-d tensor, Adam in its `capturable` mode) and the EMA's weight (1 - its decay). Autocast runs
without its weight cache (a cached cast would be a stale tensor in a replay).

Single process only (DDP's hooks are outside the recording), and not with `torch.compile`'s
reduce-overhead (graphs of its own). A batch of another shape than the recorded one runs eagerly.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from dasr_model.errors import DASRError

StepFn = Callable[..., dict[str, Tensor]]  # step(*inputs, ema_weight=TENSOR) -> loss terms


class GraphedStep:
    """`step(*inputs, ema_weight=TENSOR)` (one training step returning its loss terms as 0-d tensors; the
    tensor holds the EMA's lerp weight, 1 - decay) replayed
    from a CUDA graph. Call it as ``graphed(*inputs, rate=..., ema_decay=...)``: it sets every param group
    of `optimizers` to learning rate `rate`, then steps on `inputs`; it returns the step's loss terms (the
    graph's own tensors, overwritten by the next call: read them before it)."""

    def __init__(self, step: StepFn, optimizers: Sequence[torch.optim.Optimizer], device: torch.device, *,
                 warmup: int = 3):
        if device.type != "cuda" or not torch.cuda.is_available():
            raise DASRError(f"a CUDA graph needs a CUDA device; this step runs on {device.type}")
        if warmup < 1:
            raise DASRError(f"a CUDA graph needs at least one eager warm-up step, got warmup={warmup}")
        self.step, self.device, self.warmup = step, device, warmup
        self.rate = torch.zeros((), device=device)
        self.ema_weight = torch.zeros((), device=device)
        for opt in optimizers:
            for group in opt.param_groups:
                group["capturable"] = True  # Adam's step counts stay on the device, its arithmetic sync-free
                group["lr"] = self.rate
                for p in group["params"]:  # a resumed optimiser keeps its step counts on the host
                    state = opt.state.get(p, {})
                    if "step" in state and state["step"].device != p.device:
                        state["step"] = state["step"].to(p.device, torch.float32)
        self.stream = torch.cuda.Stream(device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: list[Tensor] = []
        self.outputs: dict[str, Tensor] = {}
        self.eager_steps = 0  # steps that ran eagerly: the warm-up, and batches of another shape

    def __call__(self, *inputs: Tensor, rate: float, ema_decay: float) -> dict[str, Tensor]:
        self.rate.fill_(rate)
        self.ema_weight.fill_(1 - ema_decay)  # as train_step's float path: 1 - decay in double, then float32
        if self.graph is None and self.eager_steps < self.warmup:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                out = self._eager(inputs)
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
            return out
        if self.graph is None:
            self.inputs = [t.clone() for t in inputs]  # clone keeps each input's memory format
            graph = torch.cuda.CUDAGraph()
            # recorded, not run (the replay below runs this step); "thread_local": the data loader's pinning
            # thread may allocate host memory meanwhile, which the default ("global") would fail
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self.outputs = self.step(*self.inputs, ema_weight=self.ema_weight)
            self.graph = graph  # only a whole recording: one that raised leaves none to replay
        elif [(t.shape, t.stride()) for t in inputs] != [(t.shape, t.stride()) for t in self.inputs]:
            return self._eager(inputs)
        else:
            for mine, theirs in zip(self.inputs, inputs):
                mine.copy_(theirs, non_blocking=True)
        self.graph.replay()
        return self.outputs

    def _eager(self, inputs: Sequence[Tensor]) -> dict[str, Tensor]:
        self.eager_steps += 1
        with warnings.catch_warnings():  # Adam's note that a capturable optimiser steps outside a capture: intended
            warnings.filterwarnings("ignore", message=".*capturable=True.*", category=UserWarning)
            return self.step(*inputs, ema_weight=self.ema_weight)


def plain_optimizer_state(state: dict) -> dict:
    """An optimiser's state_dict as an eager optimiser holds it: a GraphedStep's tensor learning rate as a
    float and `capturable` off, so that a checkpoint resumes anywhere (a CPU's Adam refuses capturable)."""
    groups = []
    for group in state["param_groups"]:
        group = dict(group)
        if isinstance(group.get("lr"), Tensor):
            group["lr"] = float(group["lr"])
        if group.get("capturable"):
            group["capturable"] = False
        groups.append(group)
    return {**state, "param_groups": groups}
