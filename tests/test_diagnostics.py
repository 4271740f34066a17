"""dasr_model.diagnostics on constructed cases with known answers."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from dasr_model.diagnostics import expert_stats, mixing_stats  # noqa: E402
from dasr_model.model import DASRConfig, ExpertMSRResNet  # noqa: E402


def test_mixing_stats_known_values():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    s = mixing_stats(a, torch.tensor([1, 1, 3, 3]))
    assert s["std"] == pytest.approx(0.5) and s["std_within_level"] == 0.0
    assert s["between_level"] == pytest.approx(0.5)
    assert s["mean_by_level"] == {"1": [1.0, 0.0], "3": [0.0, 1.0]}
    same = mixing_stats(torch.full((5, 3), 0.2), torch.tensor([1, 2, 3, 1, 2]))
    assert same["std"] == 0.0 and same["between_level"] == 0.0


def test_expert_stats_cosine_of_updates():
    torch.manual_seed(0)
    g = ExpertMSRResNet(num_experts=3, num_feat=8, num_block=1)
    initial = {k: t.clone() for k, t in g.state_dict().items()}
    with torch.no_grad():  # the same update for every expert: cosine 1, distances unchanged
        step = {n: torch.randn_like(p[0]) for n, p in g.named_parameters() if n.endswith("weight")}
        for n, p in g.named_parameters():
            if n in step:
                p += step[n]
    same = expert_stats(g, initial)
    assert same["update_cosine"] == pytest.approx(1.0)
    with torch.no_grad():  # updates +d, -d, +d/2: pair cosines -1, +1, -1
        for n, p in g.named_parameters():
            if n in step:
                p.copy_(initial[n])
                p[0] += step[n]
                p[1] -= step[n]
                p[2] += 0.5 * step[n]
    s = expert_stats(g, initial)
    assert s["update_cosine"] == pytest.approx((-1 + 1 - 1) / 3)
    assert math.isfinite(s["relative_distance"])
    assert expert_stats(ExpertMSRResNet(num_experts=1, num_feat=8, num_block=1)) == {}
    assert DASRConfig().mixing == "linear"
