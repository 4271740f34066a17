"""Pictures of samples and datasets (matplotlib, an optional extra: pip install '.[plot]' in the checkout)."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from degrade.errors import DegradeError
from degrade.inspect import CAPTION_LEGEND, caption, pipeline_steps, read_fields
from degrade.layout import BLOCK_LABELS, VECTOR_FIELDS, block_of
from degrade.params import DegradationParams
from degrade.shards.read import ShardDataset

BLOCK_COLOURS = {"kernel": "#4C72B0", "resize": "#55A868", "noise": "#C44E52", "jpeg": "#8172B2"}
LEVEL_COLOURS = {1: "#8ecae6", 2: "#219ebc", 3: "#fb8500"}
ABSENT_COLOUR = "#d9d9d9"
DPI = 100


def Patch(**kw: Any) -> Any:
    from matplotlib.patches import Patch as _Patch

    return _Patch(**kw)


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise DegradeError("pictures need matplotlib: pip install '.[plot]' in the checkout (the plot extra)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    import io

    from degrade.io import write_bytes_atomic

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    write_bytes_atomic(Path(path), buf.getvalue())


def _upscale_nearest(lr: np.ndarray, size: int) -> np.ndarray:
    f = size // lr.shape[0]
    return np.repeat(np.repeat(lr, f, axis=0), f, axis=1)


def sample_figure(path: Path, hr: np.ndarray | None, lr: np.ndarray | None, v: np.ndarray,
                  params: DegradationParams, title: str) -> tuple[int, int]:
    """HR, LR (nearest-upscaled to the HR size) and a bar chart of v by block, with the pipeline
    written underneath; without `hr` and `lr` (a vector alone), the chart and the pipeline only.
    Returns the picture's (width, height) in pixels."""
    plt = _pyplot()
    if hr is not None and lr is not None:
        fig, (ax_hr, ax_lr, ax) = plt.subplots(1, 3, figsize=(16, 7), gridspec_kw={"width_ratios": [1, 1, 2.6]})
        for a, img, label in ((ax_hr, hr, f"HR {hr.shape[1]}x{hr.shape[0]}"),
                              (ax_lr, _upscale_nearest(lr, hr.shape[0]),
                               f"LR {lr.shape[1]}x{lr.shape[0]} (nearest x4)")):
            a.imshow(img, interpolation="nearest")
            a.set_title(label)
            a.axis("off")
    else:
        fig, ax = plt.subplots(1, 1, figsize=(10, 7))
    present = [r.present for r in read_fields(v, params) for _ in r.stored]
    colours = [BLOCK_COLOURS[block_of(i)] if present[i] else ABSENT_COLOUR for i in range(len(v))]
    ax.bar(range(len(v)), v, color=colours)
    labels = []
    for f in VECTOR_FIELDS:
        labels += [f.name] if f.width == 1 else [f"{f.name}:{c}" for c in f.choices]
    ax.set_xticks(range(len(v)), labels, rotation=90, fontsize=7)
    for tick, is_present in zip(ax.get_xticklabels(), present):
        tick.set_color("black" if is_present else "#999999")
    ax.set_xlim(-0.7, len(v) - 0.3)
    ax.set_ylim(0, 1.15)
    ax.set_ylabel("v")
    ax.set_title("degradation vector v (dasr33-v1)")
    handles = [Patch(color=c, label=BLOCK_LABELS[key]) for key, c in BLOCK_COLOURS.items()]
    handles.append(Patch(color=ABSENT_COLOUR, label="absent step (identity value)"))
    ax.legend(handles=handles, loc="upper center", fontsize=8, ncols=5, frameon=False)
    steps = pipeline_steps(params, hr.shape[0] if hr is not None else None)
    per_line = 3 if hr is not None else 2  # the chart alone is narrower
    lines = ["  ->  ".join(steps[k : k + per_line]) for k in range(0, len(steps), per_line)]
    fig.text(0.01, 0.13, "pipeline:  " + "\n   ->  ".join(lines), va="top", family="monospace", fontsize=9)
    fig.suptitle(title)
    fig.subplots_adjust(left=0.01 if hr is not None else 0.07, right=0.99, top=0.88, bottom=0.3, wspace=0.12)
    _save(fig, path)
    size = fig.canvas.get_width_height()
    plt.close(fig)
    return size


def histogram_figure(path: Path, stats: dict[str, Any]) -> tuple[int, int]:
    """A grid of the 33 histograms of v, stacked by level, over the samples where the field is present
    (an absent field's identity value would be a spike that says nothing); titles give the absent count."""
    plt = _pyplot()
    fields = stats["fields"]
    cols = 6
    rows = math.ceil(len(fields) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 2.1 * rows))
    edges = np.array(stats["bin_edges"])
    centres, width = (edges[:-1] + edges[1:]) / 2, edges[1] - edges[0]
    for ax, f in zip(axes.ravel(), fields):
        bottom = np.zeros(len(centres))
        for lv in (1, 2, 3):
            counts = np.array(f["histogram_by_level"][str(lv)])
            ax.bar(centres, counts, width=width * 0.95, bottom=bottom, color=LEVEL_COLOURS[lv], label=f"level {lv}")
            bottom += counts
        absent = f" ({f['absent']} absent)" if f.get("absent") else ""
        ax.set_title(f"{f['index']}: {f['field']}{absent}", fontsize=8)
        ax.set_xlim(0, 1)
        ax.tick_params(labelsize=6)
    for ax in axes.ravel()[len(fields):]:
        ax.axis("off")
    axes.ravel()[0].legend(fontsize=6)
    levels = ", ".join(f"level {k}: {n}" if k != "other" else f"other levels: {n}" for k, n in stats["levels"].items()
                       if n)
    fig.suptitle(f"v over {stats['samples']} samples ({levels})")
    fig.tight_layout()
    _save(fig, path)
    size = fig.canvas.get_width_height()
    plt.close(fig)
    return size


# A contact sheet draws each image in a cell of about 2.2 x 2.7 inches, some 220 px wide at DPI: a patch is reduced
# to at most this side as it is read, so the sheet's memory follows the picture, not the patch size a shard
# declares (64 patches of 2000 px held whole, and copied by matplotlib, took 2 GB).
CELL_PX = 256


def _fit(img: np.ndarray, side: int) -> np.ndarray:
    """img: (h, w, 3) uint8 -> (side, side, 3) uint8: area-averaged when shrinking, nearest when enlarging
    (an LR's pixels stay visible as blocks)."""
    import cv2

    if img.shape[:2] == (side, side):
        return img.copy()  # never a view that would keep the whole patch alive
    shrink = img.shape[0] > side
    return cv2.resize(img, (side, side), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_NEAREST)


def contact_sheet(path: Path, ds: ShardDataset, indices: list[int]) -> tuple[int, int]:
    """HR / LR pairs of the given samples, captioned with index, level and main parameters.

    Each pair is drawn at most CELL_PX on a side (the LR nearest-upscaled to the HR's side, the HR
    area-averaged down where larger); one sample's full patches are held at a time."""
    plt = _pyplot()
    cols = min(4, len(indices))
    rows = math.ceil(len(indices) / cols)
    # constrained layout: tight_layout left the suptitle over a one-row sheet's captions, and three-line
    # captions over the row above
    fig, axes = plt.subplots(rows, 2 * cols, figsize=(4.4 * cols, 2.7 * rows), squeeze=False, layout="constrained")
    for ax in axes.ravel():
        ax.axis("off")
    for n, i in enumerate(indices):
        s = ds[i]
        side = min(s.hr.shape[0], CELL_PX)
        hr, lr, label = _fit(s.hr, side), _fit(s.lr, side), textwrap.fill(caption(s.params), 34)
        del s  # the full-size patches go before the next sample is read
        r, c = divmod(n, cols)
        axes[r, 2 * c].imshow(hr)
        axes[r, 2 * c + 1].imshow(lr, interpolation="nearest")
        axes[r, 2 * c].set_title(f"#{ds.stored_index(i)} HR", fontsize=8)
        axes[r, 2 * c + 1].set_title(label, fontsize=7)
    fig.suptitle("HR / LR (nearest-upscaled) pairs")
    fig.supxlabel(textwrap.fill("captions: " + CAPTION_LEGEND, 40 * cols), fontsize=7, x=0.01, ha="left")
    _save(fig, path)
    size = fig.canvas.get_width_height()
    plt.close(fig)
    return size


__all__ = ["contact_sheet", "histogram_figure", "read_fields", "sample_figure"]
