"""Training curves from `dasr-train`'s metrics.jsonl, for `dasr-curves`: the loss, the predictor's error, the
learning rate and validation PSNR-Y per level against bicubic, one line per run (matplotlib, the plot extra)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from dasr_model.errors import DASRError

METRICS = "metrics.jsonl"
MAX_LINE = 1 << 16  # bytes; a line of ours is under 1 kB: a longer one is not ours
SERIES = ("loss", "l1", "regression", "gan", "perceptual", "lr")  # the per-step values drawn


def metrics_path(run: str | Path) -> Path:
    """A run folder's metrics.jsonl, or the file itself."""
    run = Path(run)
    return run / METRICS if run.is_dir() else run


def read_metrics(run: str | Path) -> dict[str, Any]:
    """The series of a run's metrics.jsonl: `step` and SERIES (NaN where a line lacks one), and at the
    validated steps `val_step`, `mae` and per level `psnr_y` / `bicubic_psnr_y`. A torn last line (a kill
    mid-write) is left out; any other line that is not a metrics line is a DASRError naming it."""
    from degrade.io import open_regular

    path = metrics_path(run)
    steps, validated = [], []  # values only: a long run logs 100k lines
    values: dict[str, list[float]] = {key: [] for key in SERIES}
    with open_regular(path) as f:  # a FIFO would block for ever
        lines = iter(lambda: f.readline(MAX_LINE + 1), b"")
        for number, line in enumerate(lines, 1):
            try:
                row = json.loads(line) if len(line) <= MAX_LINE else None
                if not isinstance(row, dict) or type(row.get("step")) is not int:
                    raise ValueError
            except ValueError:
                if not line.endswith(b"\n") and not f.read(1):  # the last line, torn
                    break
                raise DASRError(f"{path}: line {number} is not a dasr-train metrics line") from None
            steps.append(row["step"])
            for key, series in values.items():
                series.append(_number(row.get(key)))
            if isinstance(row.get("val"), dict):
                val = row["val"]
                validated.append((row["step"], _number(_get(val, "mae", "all")),
                                  {lv: (_number(_get(val, "psnr_y", lv)), _number(_get(val, "bicubic_psnr_y", lv)))
                                   for lv in (val.get("psnr_y") if isinstance(val.get("psnr_y"), dict) else {})}))
    if not steps:
        raise DASRError(f"{path}: no metrics yet")
    levels = sorted({lv for _, _, scores in validated for lv in scores}, key=str)
    nan = (math.nan, math.nan)
    return {"step": np.array(steps), **{key: np.array(series) for key, series in values.items()},
            "val_step": np.array([v[0] for v in validated]), "mae": np.array([v[1] for v in validated]),
            "psnr_y": {lv: np.array([v[2].get(lv, nan)[0] for v in validated]) for lv in levels},
            "bicubic_psnr_y": {lv: np.array([v[2].get(lv, nan)[1] for v in validated]) for lv in levels}}


def _get(d: dict, key: str, sub: str) -> Any:
    inner = d.get(key)
    return inner.get(sub) if isinstance(inner, dict) else None


def _number(x: Any) -> float:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else math.nan


def smooth(y: np.ndarray, n: int) -> np.ndarray:
    """The running mean of the last `n` values (fewer at the start), values that are not finite left out;
    NaN where y itself is NaN (a point with no value of its own is not drawn; an infinite one is).
    O(len(y)) at any `n`: each window is the tail of one block of `n` plus the head of the next (sums
    within blocks, so one huge value cannot cancel what follows its window)."""
    n = min(n, len(y))
    if n <= 1:  # each value its own mean
        return np.where(np.isfinite(y), y, np.nan)
    ok = np.isfinite(y)
    sums, seen = _window_sums(np.where(ok, y, 0.0), n), _window_sums(ok.astype(np.float64), n)
    with np.errstate(invalid="ignore", divide="ignore"):  # a point without a value of its own (a term a
        # resume dropped, --no-gan) is drawn as none, not as the mean of the values before it
        return np.where((seen > 0.5) & ~np.isnan(y), sums / np.maximum(seen, 1), np.nan)


def _window_sums(x: np.ndarray, n: int) -> np.ndarray:
    """Sums of x[max(0, i - n + 1) : i + 1] for every i."""
    blocks = np.zeros(-(-len(x) // n) * n)
    blocks[: len(x)] = x
    blocks = blocks.reshape(-1, n)
    head = np.cumsum(blocks, axis=1).ravel()  # from its block's start to i
    tail = np.cumsum(blocks[:, ::-1], axis=1)[:, ::-1].ravel()  # from i to its block's end
    i = np.arange(len(x))
    start = i - n + 1  # in the block before i's, unless it is i's block's start or before the series
    spans = (start >= 0) & (start < (i // n) * n)
    return head[i] + np.where(spans, tail[np.maximum(start, 0)], 0.0)


def plot_curves(runs: dict[str, dict[str, Any]], out: str | Path, *, window: int = 50) -> tuple[int, int]:
    """Draw the runs' curves (name -> read_metrics) into the PNG `out`; returns its size in pixels."""
    from degrade.plots import _pyplot, _save

    plt = _pyplot()
    levels = sorted({lv for r in runs.values() for lv in r["psnr_y"]}, key=str)
    adversarial_terms = any(np.isfinite(r[k]).any() for r in runs.values() for k in ("gan", "perceptual"))
    cols = max(3 + adversarial_terms, len(levels) + 1)
    rows = 2 if any(len(r["val_step"]) for r in runs.values()) else 1  # the second: validation
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.5 * rows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    shared_bicubic = _shared_bicubic(runs.values(), levels)
    (l1, regression, rate), psnr = axes[0][:3], dict(zip(levels, axes[-1]))
    adversarial = axes[0][3] if adversarial_terms else None  # the GAN and perceptual terms, where a run has them
    mae = axes[-1][len(levels)] if rows == 2 else None
    # the titles name the window the curves had: no run's curve averaged more than its own length
    shown = min(window, max((len(r["step"]) for r in runs.values()), default=window)) or window
    mean = f"mean of {shown} logged step{'s' if shown > 1 else ''}"
    for i, (name, r) in enumerate(runs.items()):
        c = colours[i % len(colours)]
        mark = {"marker": "."} if len(r["step"]) == 1 else {}  # one point draws no line
        l1.plot(r["step"], smooth(r["l1"], window), color=c, label=name, **mark)
        regression.plot(r["step"], smooth(r["regression"], window), color=c, label=name, **mark)
        rate.plot(r["step"], r["lr"], color=c, label=name, **mark)
        for key, style in (("gan", "-"), ("perceptual", ":")):
            if adversarial is not None and np.isfinite(r[key]).any():
                adversarial.plot(r["step"], smooth(r[key], window), color=c, linestyle=style, label=f"{name}: {key}",
                                 **mark)
        if mae is not None and len(r["val_step"]):
            mae.plot(r["val_step"], r["mae"], color=c, marker=".", label=name)
        for lv, ax in psnr.items():
            if lv in r["psnr_y"]:
                ax.plot(r["val_step"], r["psnr_y"][lv], color=c, marker=".", label=name)
                if not shared_bicubic:  # the runs validated on different sets: each its own bicubic
                    ax.plot(r["val_step"], r["bicubic_psnr_y"][lv], color=c, linestyle="--", alpha=0.6,
                            label=f"{name}: bicubic")
    for lv, ax in psnr.items():
        if shared_bicubic:
            ax.axhline(shared_bicubic[lv], color="black", linestyle="--", linewidth=1, label="bicubic")
        ax.set(title=f"validation PSNR-Y (dB), level {lv}" if lv != "0" else "validation PSNR-Y (dB), no level",
               xlabel="step")
    rate.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3), useOffset=False)
    l1.set(title=f"pixel L1 loss\n({mean})", xlabel="step", yscale="log")
    regression.set(title=f"v regression loss\n({mean})", xlabel="step", yscale="log")
    rate.set(title="learning rate", xlabel="step")
    if adversarial is not None:
        adversarial.set(title=f"GAN and perceptual\n({mean})", xlabel="step")
    if mae is not None:
        mae.set(title="predictor MAE of v (validation, all blocks)", xlabel="step")
    for ax in axes.flat:
        if ax.has_data():
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        else:
            ax.set_visible(False)
    try:
        fig.tight_layout()
        _save(fig, Path(out))  # atomic: a failed write leaves no half picture
        return fig.canvas.get_width_height()
    finally:
        plt.close(fig)


def _shared_bicubic(runs: Any, levels: list[str]) -> dict[str, float] | None:
    """Per level, the one bicubic PSNR-Y every run measured at every validation (the runs validated on one
    set, so bicubic is a constant line), else None."""
    shared = {}
    for lv in levels:
        values = np.concatenate([r["bicubic_psnr_y"].get(lv, np.array([math.nan])) for r in runs])
        if len(values) == 0 or np.isnan(values).any() or np.ptp(values) > 1e-9:
            return None
        shared[lv] = float(values[0])
    return shared
