"""Do the experts earn their place? Statistics of the expert mix a and of the experts themselves.

- :func:`mixing_stats`: how much a varies across samples (overall and within each level) and how far
  the per-level means sit apart. A mix that is the same for every sample makes K experts act as one.
- :func:`expert_stats`: how different the experts have become. `update_cosine` compares what training
  changed in each expert (W_k - W_k at init): identical updates give 1, unrelated ones about 0.
  `relative_distance` is the mean pairwise ||W_i - W_j|| over the mean ||W_k||.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from dasr_model.model import ExpertConv2d


def mixing_stats(a: Tensor, levels: Tensor) -> dict[str, Any]:
    """a (N, K) expert mixes, levels (N,) ints -> spread of a across samples and levels.

    `std`: the standard deviation of a over samples, averaged over experts; `std_within_level`: the
    same inside each level, averaged over levels; `between_level`: the standard deviation of the
    per-level mean mixes, averaged over experts; `mean_by_level`: those means.
    """
    a, levels = a.detach().double().cpu(), levels.cpu()
    by_level = {int(lv): a[levels == lv] for lv in torch.unique(levels)}
    means = torch.stack([x.mean(0) for x in by_level.values()])
    return {
        "std": float(a.std(0, correction=0).mean()),
        "std_within_level": float(torch.stack([x.std(0, correction=0).mean() for x in by_level.values()]).mean()),
        "between_level": float(means.std(0, correction=0).mean()) if len(by_level) > 1 else 0.0,
        "mean_by_level": {str(lv): [round(float(x), 4) for x in m] for lv, m in zip(by_level, means)},
    }


def _expert_weights(module: nn.Module) -> list[tuple[str, Tensor]]:
    return [(name, m.weight) for name, m in module.named_modules() if isinstance(m, ExpertConv2d)]


def expert_stats(generator: nn.Module, initial: Mapping[str, Tensor] | None = None) -> dict[str, float]:
    """How different the K experts of `generator` are; `initial` is its state dict at step 0.

    Flattens each expert over every expert convolution. Returns `relative_distance` and, given
    `initial`, `update_cosine` (mean over expert pairs of the cosine between their updates).
    """
    layers = _expert_weights(generator)
    k = layers[0][1].shape[0]
    if k < 2:
        return {}
    flat = torch.cat([w.detach().double().reshape(k, -1) for _, w in layers], dim=1)
    pairs = list(itertools.combinations(range(k), 2))
    norm = flat.norm(dim=1).mean()
    out = {"relative_distance": float(sum((flat[i] - flat[j]).norm() for i, j in pairs) / len(pairs) / norm)}
    if initial is not None:
        start = torch.cat([initial[f"{name}.weight"].detach().double().reshape(k, -1) for name, _ in layers], dim=1)
        delta = flat - start
        cos = [torch.nn.functional.cosine_similarity(delta[i], delta[j], dim=0) for i, j in pairs]
        out["update_cosine"] = float(sum(cos) / len(cos))
    return out


__all__ = ["expert_stats", "mixing_stats"]
