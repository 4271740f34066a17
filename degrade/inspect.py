"""What a vector says: per-field readings, the applied pipeline, and dataset statistics.

Pure functions returning data; `degrade inspect` renders them as rich tables, sparklines, JSON, and
(with matplotlib, :mod:`degrade.plots`) pictures.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from degrade.errors import DatasetError
from degrade.layout import BLOCK_LABELS
from degrade.layout import block_of as layout_block_of
from degrade.params import BlurParams, DegradationParams, NoiseParams
from degrade.recipe import SCALE
from degrade.shards.read import ShardDataset
from degrade.shards.sample import parse_record
from degrade.vector import VECTOR_FIELDS, VectorField, check_vector, decode

SPARKS = "▁▂▃▄▅▆▇█"


def block_of(index: int) -> str:
    """How tables title the block of v holding entry `index` ("kernel", ..., "JPEG/final")."""
    return BLOCK_LABELS[layout_block_of(index)]


@dataclass(frozen=True)
class FieldReading:
    """One field of v: where it sits, the stored value(s), and what it means physically."""

    index: str  # "5" or "11-13"
    name: str
    block: str
    stored: tuple[float, ...]
    present: bool
    value: float | str | None  # physical value (number or choice); None when absent
    text: str  # the value in words with units, or "absent"


def _physical_text(f: VectorField, value: Any, step: Any) -> str:
    attr = f.attr
    if f.kind == "onehot":
        if f.name == "final.order":
            return {"A": "A (resize, sinc, JPEG)", "B": "B (JPEG, resize, sinc)"}[value]
        return {"gaussian": "Gaussian", "poisson": "Poisson"}.get(value, value)
    if f.kind == "flag":
        return "gray (luma only)" if value else "colour"
    if attr == "size":
        return f"{value} px"
    if attr in ("sigma_x", "sigma_y"):
        return f"{value:.2f} px"
    if attr == "theta":
        return f"{math.degrees(value):.1f} deg"
    if attr == "omega_c":
        return f"{value:.3f} rad/px ({value / math.pi:.2f} pi)"
    if attr == "scale":
        return f"x{value:.3f}"
    if attr == "strength":
        if isinstance(step, NoiseParams) and step.type == "gaussian":
            return f"sigma {value:.1f} / 255"
        return f"Poisson scale {value:.2f}"
    if attr == "quality":
        return f"JPEG q {value}"
    return f"{value}"


def read_fields(v: ArrayLike, params: DegradationParams | None = None) -> list[FieldReading]:
    """Per-field readings of v. Physical values come from `params` (a stored record) or decode(v)."""
    arr = check_vector(v)
    record = decode(arr) if params is None else params
    rows = []
    for f in VECTOR_FIELDS:
        step = getattr(record, f.step)
        value = None if step is None else getattr(step, f.attr)
        present = value is not None
        index = str(f.index) if f.width == 1 else f"{f.index}-{f.index + f.width - 1}"
        stored = tuple(float(x) for x in arr[f.slice])
        text = _physical_text(f, value, step) if present else "absent"
        rows.append(FieldReading(index, f.name, block_of(f.index), stored, present, value, text))
    return rows


def _blur_text(name: str, b: BlurParams) -> str:
    shape = f"isotropic sigma {b.sigma_x:.2f} px" if b.isotropic else (
        f"anisotropic sigma {b.sigma_x:.2f} x {b.sigma_y:.2f} px at {math.degrees(b.theta):.0f} deg")
    return f"{name}: {b.size}x{b.size} Gaussian, {shape}"


def _noise_text(name: str, n: NoiseParams) -> str:
    kind = "gray" if n.gray else "colour"
    if n.type == "gaussian":
        return f"{name}: {kind} Gaussian noise, sigma {n.strength:.1f} / 255"
    return f"{name}: {kind} Poisson noise, scale {n.strength:.2f}"


def pipeline_steps(params: DegradationParams, hr_size: int | None = None) -> list[str]:
    """The steps actually applied, in order, in words (sizes when the HR side `hr_size` is known)."""
    steps: list[str] = []
    size = hr_size

    def sized(scale_of: int | None, scale: float) -> str:
        return "" if scale_of is None else f" to {max(1, round(scale_of * scale))} px"

    if params.blur1:
        steps.append(_blur_text("blur", params.blur1))
    if params.resize1:
        steps.append(f"resize x{params.resize1.scale:.3f} ({params.resize1.mode}){sized(size, params.resize1.scale)}")
    if params.noise1:
        steps.append(_noise_text("noise", params.noise1))
    if params.jpeg1:
        steps.append(f"JPEG q {params.jpeg1.quality}")
    target = None if hr_size is None else hr_size // SCALE
    final_resize = f"resize to {'P/4' if target is None else f'{target} px'} ({params.final.mode})"
    if not params.two_stage:
        return [*steps, final_resize]
    if params.blur2:
        steps.append(_blur_text("blur 2", params.blur2))
    assert params.resize2 is not None
    steps.append(f"resize 2 x{params.resize2.scale:.3f} of P/4 ({params.resize2.mode})"
                 f"{sized(target, params.resize2.scale)}")
    if params.noise2:
        steps.append(_noise_text("noise 2", params.noise2))
    sinc = (f"sinc {params.sinc.size}x{params.sinc.size}, omega_c {params.sinc.omega_c / math.pi:.2f} pi"
            if params.sinc else None)
    jpeg2 = f"JPEG 2 q {params.jpeg2.quality}" if params.jpeg2 else None
    block = [final_resize, sinc, jpeg2] if params.final.order == "A" else [jpeg2, final_resize, sinc]
    return steps + [s for s in block if s]


CAPTION_LEGEND = ("L1-L3 level (decoded: from a vector); blur sigma_x[xsigma_y] in px; x1.00 stage-1 resize "
                  "scale; G/P Gaussian sigma / Poisson scale (g: gray); qNN JPEG quality; sinc cut-off as a "
                  "fraction of pi")


def caption(params: DegradationParams) -> str:
    """A one-line summary of the main parameters (for picture captions; CAPTION_LEGEND explains it)."""
    parts = [f"L{params.level}" if params.level else "decoded"]
    if params.blur1:
        parts.append(f"blur {params.blur1.sigma_x:.1f}"
                     + ("" if params.blur1.isotropic else f"x{params.blur1.sigma_y:.1f}"))
    if params.resize1:
        parts.append(f"x{params.resize1.scale:.2f}")
    for n in (params.noise1, params.noise2):
        if n:
            parts.append(f"{'G' if n.type == 'gaussian' else 'P'}{n.strength:.1f}{'g' if n.gray else ''}")
    for j in (params.jpeg1, params.jpeg2):
        if j:
            parts.append(f"q{j.quality}")
    if params.sinc:
        parts.append(f"sinc {params.sinc.omega_c / math.pi:.2f}pi")
    return " ".join(parts)


# --- datasets -----------------------------------------------------------------------------------


def _present_matrix(records: list[DegradationParams]) -> NDArray[np.bool_]:
    """(n, 33 fields) True where the field has a value in that sample's record, as read_fields says.

    Per field, not per step: the final step is in every record, but its `order` only in level-3 ones
    (one-stage records hold order null), so counting the step would call final.order present everywhere.
    """
    out = np.zeros((len(records), len(VECTOR_FIELDS)), bool)
    for i, r in enumerate(records):
        for j, f in enumerate(VECTOR_FIELDS):
            step = getattr(r, f.step)
            out[i, j] = step is not None and getattr(step, f.attr) is not None
    return out


def dataset_stats(ds: ShardDataset, *, bins: int = 16) -> dict[str, Any]:
    """Counts per level and, per entry of v: the share of samples where its field is present (has a
    value in the record), and over those samples only, min/mean/max and a histogram over [0, 1] (overall
    and per level); an absent field's identity value is counted in `absent`, not in the histogram; a
    value outside [0, 1] or NaN (a damaged dataset) in `outside`. Plain data, JSON-ready. Read one shard at
    a time: memory follows the largest shard, not the dataset (a parsed record is about 2 KB)."""
    if len(ds) == 0:
        raise DatasetError("the dataset holds no samples yet (no shard is finished)")
    edges = np.linspace(0.0, 1.0, bins + 1)
    n_fields, n_entries = len(VECTOR_FIELDS), sum(f.width for f in VECTOR_FIELDS)
    present_count = np.zeros(n_fields, np.int64)
    total, lo, hi = np.zeros(n_entries), np.full(n_entries, np.inf), np.full(n_entries, -np.inf)
    nan = np.zeros(n_entries, bool)
    outside = np.zeros(n_entries, np.int64)
    hist = np.zeros((n_entries, bins), np.int64)
    hist_by_level = {n: np.zeros((n_entries, bins), np.int64) for n in (1, 2, 3)}
    level_counts = {n: 0 for n in (1, 2, 3)}
    other = samples = 0
    for k in range(len(ds.files)):
        v = ds.shard_column("v", k).astype(np.float64)
        level = ds.shard_column("level", k).astype(int)
        name = Path(ds.files[k]).name
        present = _present_matrix([parse_record(t, f"sample {samples + r} ({name} row {r})")
                                   for r, t in enumerate(ds.shard_column("params", k))])
        samples += len(level)
        for n in (1, 2, 3):
            level_counts[n] += int((level == n).sum())
        other += int((~np.isin(level, (1, 2, 3))).sum())
        # what no histogram bin holds, in any sample (an absent field's entry holds a value too, its identity)
        outside += (~((v >= 0) & (v <= 1))).sum(axis=0)
        for j, f in enumerate(VECTOR_FIELDS):
            here = present[:, j]
            present_count[j] += int(here.sum())
            lv = level[here]
            for e in range(f.index, f.index + f.width):
                col = v[here, e]
                if not col.size:
                    continue
                nan[e] |= bool(np.isnan(col).any())
                with np.errstate(invalid="ignore", over="ignore"):  # +inf and -inf: a NaN sum, reported as null
                    total[e] += col.sum()
                lo[e], hi[e] = min(lo[e], col.min()), max(hi[e], col.max())
                hist[e] += np.histogram(col, edges)[0]
                for n in (1, 2, 3):
                    hist_by_level[n][e] += np.histogram(col[lv == n], edges)[0]
    fields = []
    for j, f in enumerate(VECTOR_FIELDS):
        count = int(present_count[j])
        for i, e in enumerate(range(f.index, f.index + f.width)):
            seen = count > 0 and not nan[e]  # a NaN made min, mean and max NaN: null, as JSON has no NaN
            fields.append({
                "index": e,
                "field": f.name if f.width == 1 else f"{f.name}[{f.choices[i]}]",
                "block": block_of(f.index),
                "min": _finite(lo[e]) if seen else None,
                "mean": _finite(total[e] / count) if seen else None,
                "max": _finite(hi[e]) if seen else None,
                "present_share": count / samples,
                "absent": samples - count,
                "outside": int(outside[e]),
                "histogram": hist[e].tolist(),
                "histogram_by_level": {str(n): hist_by_level[n][e].tolist() for n in (1, 2, 3)},
            })
    levels = {str(n): c for n, c in level_counts.items()}
    if other:  # a damaged or foreign level column: counted, not dropped
        levels["other"] = other
    return {"samples": samples, "levels": levels, "bin_edges": edges.tolist(), "fields": fields}


def _finite(x: Any) -> float | None:
    """A statistic as a float, or None (JSON null) when it is NaN or infinite (a damaged v): the
    NaN and Infinity tokens Python's json writes are not JSON."""
    x = float(x)
    return x if math.isfinite(x) else None


def sparkline(counts: list[int]) -> str:
    top = max(counts) if counts else 0
    if top == 0:
        return " " * len(counts)
    top_spark = len(SPARKS) - 1
    return "".join(" " if c == 0 else SPARKS[min(top_spark, int(c / top * top_spark + 0.5))] for c in counts)


def readings_to_json(rows: list[FieldReading]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]
