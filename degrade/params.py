"""The per-sample record of what the pipeline did, its validation and its JSON round trip.

"Sample, then apply": every random choice happens in :func:`degrade.sampling.sample_params`;
:func:`degrade.apply` is deterministic given the record. Records are frozen dataclasses.

Absent steps are ``None``. Kernels are stored canonically (docs/degradation.md): sigma_x >= sigma_y,
theta in [0, pi), isotropic kernels with theta = 0. A resize that keeps the size (s = 1, stage 1)
is the identity and is stored as absent.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
from numpy.typing import NDArray

from degrade.errors import DegradeError
from degrade.kernels import gaussian_kernel, sinc_kernel
from degrade.recipe import (
    FINAL_ORDERS,
    NOISE_TYPES,
    RESIZE_MODES,
    FinalOrder,
    NoiseType,
    ResizeMode,
)
from degrade.strictjson import DuplicateKey, strict_json

SEED_LIMIT = 2**53  # noise seeds stay exact in JSON readers that hold numbers as doubles
# Bounds that keep a hand-written record applicable in bounded time and memory (far wider than the
# vector layout's ranges, which encode() checks).
MAX_KERNEL_SIZE = 51
MIN_SIGMA, MAX_SIGMA = 1e-3, 20.0
MIN_OMEGA_C = 0.05
MIN_SCALE, MAX_SCALE = 0.01, 4.0
MAX_GAUSSIAN_SIGMA = 255.0  # in 0-255 units: noise as large as the whole range (recipes stop at 30)
MAX_POISSON_SCALE = 50.0  # recipes stop at 3


@dataclass(frozen=True, kw_only=True)
class BlurParams:
    """Gaussian blur kernel of docs/degradation.md: odd `size`, sigmas in pixels, `theta` in radians."""

    size: int
    sigma_x: float
    sigma_y: float
    theta: float

    @classmethod
    def canonical(cls, *, size: int, sigma_x: float, sigma_y: float, theta: float) -> BlurParams:
        """The same kernel written canonically: sigma_x >= sigma_y, theta in [0, pi) (docs/degradation.md)."""
        if sigma_x < sigma_y:
            sigma_x, sigma_y, theta = sigma_y, sigma_x, theta + math.pi / 2
        theta = math.fmod(theta, math.pi)
        if theta < 0:
            theta += math.pi
        if theta >= math.pi:  # fmod of a value just below a multiple of pi can round up to pi
            theta = 0.0
        if sigma_x == sigma_y:
            theta = 0.0
        return cls(size=int(size), sigma_x=float(sigma_x), sigma_y=float(sigma_y), theta=float(theta))

    @property
    def isotropic(self) -> bool:
        return self.sigma_x == self.sigma_y

    def kernel(self) -> NDArray[np.float64]:
        return gaussian_kernel(self.size, self.sigma_x, self.sigma_y, self.theta)


@dataclass(frozen=True, kw_only=True)
class SincParams:
    """Circular low-pass of docs/degradation.md: odd `size`, cut-off `omega_c` in radians per pixel."""

    size: int
    omega_c: float

    def kernel(self) -> NDArray[np.float64]:
        return sinc_kernel(self.size, self.omega_c)


@dataclass(frozen=True, kw_only=True)
class ResizeParams:
    """Resize by `scale` (stage 1: relative to the current size; stage 2: relative to P/4)."""

    scale: float
    mode: ResizeMode


@dataclass(frozen=True, kw_only=True)
class NoiseParams:
    """Additive noise. `strength` is the Gaussian sigma in 0-255 units, or the Poisson scale.

    `seed` seeds the generator of this step's pixel field, so the record reproduces the pixels.
    """

    type: NoiseType
    strength: float
    gray: bool
    seed: int


@dataclass(frozen=True, kw_only=True)
class JpegParams:
    """JPEG at the integer `quality` actually used by the codec."""

    quality: int


@dataclass(frozen=True, kw_only=True)
class FinalParams:
    """The last resize to (P/4, P/4) with `mode`; `order` is "A"/"B" for level 3, None otherwise."""

    order: FinalOrder | None
    mode: ResizeMode


_STEP_TYPES: dict[str, type] = {
    "blur1": BlurParams,
    "blur2": BlurParams,
    "sinc": SincParams,
    "resize1": ResizeParams,
    "resize2": ResizeParams,
    "noise1": NoiseParams,
    "noise2": NoiseParams,
    "jpeg1": JpegParams,
    "jpeg2": JpegParams,
    "final": FinalParams,
}
_TWO_STAGE_ONLY = ("blur2", "resize2", "noise2", "sinc", "jpeg2")


@dataclass(frozen=True, kw_only=True)
class DegradationParams:
    """Everything one sample's pipeline used (docs/degradation.md). Steps that did not happen are None.

    `level` is the level the record was drawn at (None for a record decoded from a vector, which
    does not say). One-stage pipelines (levels 1-2) have `final.order` None and no stage-2 steps.
    """

    level: int | None
    blur1: BlurParams | None
    resize1: ResizeParams | None
    noise1: NoiseParams | None
    jpeg1: JpegParams | None
    final: FinalParams
    blur2: BlurParams | None = None
    resize2: ResizeParams | None = None
    noise2: NoiseParams | None = None
    sinc: SincParams | None = None
    jpeg2: JpegParams | None = None

    def __post_init__(self) -> None:
        _normalise(self)
        _validate(self)

    @property
    def two_stage(self) -> bool:
        return self.final.order is not None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DegradationParams:
        """Strict inverse of :meth:`to_dict`: unknown or missing keys and bad values raise DegradeError."""
        if not isinstance(data, Mapping):
            raise DegradeError("a parameter record must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise DegradeError(f"unknown keys in parameter record: {sorted(unknown, key=repr)}")
        # Stage-2 keys may be left out only where the record itself says there is no second stage
        # (final.order null), as a one-stage record written by hand would; a two-stage record that
        # lacks one is truncated, not a record whose step was absent.
        final = data.get("final")
        one_stage = isinstance(final, Mapping) and final.get("order") is None
        kwargs: dict[str, Any] = {}
        for name in (f.name for f in fields(cls)):  # declaration order: the first missing key is named
            if name not in data:
                if name in _TWO_STAGE_ONLY and one_stage:
                    continue
                raise DegradeError(f"parameter record lacks {name!r}")
            value = data[name]
            if name == "level":
                kwargs[name] = None if value is None else _strict_int("level", value)
            elif name == "final" and value is None:
                raise DegradeError("final: expected an object, got null")
            else:
                kwargs[name] = None if value is None else _step_from_dict(name, value)
        return cls(**kwargs)

    @classmethod
    def from_json(cls, text: str) -> DegradationParams:
        if not isinstance(text, (str, bytes, bytearray)):
            raise DegradeError(f"not a parameter record: JSON text expected, got {type(text).__name__}")
        try:
            data = strict_json(text)
        except json.JSONDecodeError as exc:
            raise DegradeError(f"not valid JSON: {exc.msg} (line {exc.lineno})") from None
        except DuplicateKey as exc:
            raise DegradeError(f"not a parameter record: {exc}") from None
        except RecursionError:  # JSON nested thousands deep: a refusal, not a crash
            raise DegradeError("not a parameter record: JSON nested too deeply") from None
        except UnicodeDecodeError:  # bytes that are not UTF-8 (a ValueError too: before the digit limit's)
            raise DegradeError("not a parameter record: the JSON is not UTF-8 text") from None
        except ValueError:  # the only other ValueError of json.loads: an integer beyond int's digit limit
            raise DegradeError(f"not a parameter record: a number of more than {sys.get_int_max_str_digits()} "
                               "digits") from None
        return cls.from_dict(data)


def _strict_int(where: str, raw: Any) -> int:
    """A JSON integer (or an integral float such as 7.0); bools, strings and non-finite values are refused."""
    if (isinstance(raw, bool) or not isinstance(raw, (int, float)) or not math.isfinite(_as_float(raw))
            or raw != int(raw)):
        raise DegradeError(f"{where}: bad value {raw!r} (expected an integer)")
    return int(raw)


def _strict_float(where: str, raw: Any) -> float:
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not math.isfinite(_as_float(raw)):
        raise DegradeError(f"{where}: bad value {raw!r} (expected a finite number)")
    return float(raw)


def _as_float(raw: int | float) -> float:
    """float(raw), or inf for an integer beyond float's range (10**400: float() raises OverflowError)."""
    try:
        return float(raw)
    except OverflowError:
        return math.inf


def _step_from_dict(name: str, value: Any) -> Any:
    step_type = _STEP_TYPES[name]
    if not isinstance(value, Mapping):
        raise DegradeError(f"{name}: expected an object, got {type(value).__name__}")
    expected = {f.name: f for f in fields(step_type)}
    if set(value) != set(expected):
        raise DegradeError(f"{name}: expected keys {sorted(expected)}, got {sorted(value, key=repr)}")
    parsers = _FIELD_PARSERS[step_type]
    return step_type(**{key: parsers[key](f"{name}.{key}", raw) for key, raw in value.items()})


def _strict_bool(where: str, raw: Any) -> bool:
    if not isinstance(raw, bool):
        raise DegradeError(f"{where}: bad value {raw!r} (expected true or false)")
    return raw


def _choice(where: str, raw: Any) -> str:  # Literal choices: the set of names is checked by _validate
    if not isinstance(raw, str):
        raise DegradeError(f"{where}: bad value {raw!r} (expected a string)")
    return raw


def _optional_choice(where: str, raw: Any) -> str | None:
    return None if raw is None else _choice(where, raw)


# How each field of a step record is read from JSON, written out (not derived from type annotations,
# which are strings under `from __future__ import annotations` and would silently miss `int | None`).
_FIELD_PARSERS: dict[type, dict[str, Callable[[str, Any], Any]]] = {
    BlurParams: {"size": _strict_int, "sigma_x": _strict_float, "sigma_y": _strict_float, "theta": _strict_float},
    SincParams: {"size": _strict_int, "omega_c": _strict_float},
    ResizeParams: {"scale": _strict_float, "mode": _choice},
    NoiseParams: {"type": _choice, "strength": _strict_float, "gray": _strict_bool, "seed": _strict_int},
    JpegParams: {"quality": _strict_int},
    FinalParams: {"order": _optional_choice, "mode": _choice},
}
assert all({f.name for f in fields(t)} == set(p) for t, p in _FIELD_PARSERS.items())  # every field, once


def _api_int(where: str, raw: Any) -> int:
    """An integer field given from Python: int or a numpy integer, or an integral float (7.0, as JSON's
    reader takes it); not a bool, not 50.5."""
    if isinstance(raw, (float, np.floating)) and not isinstance(raw, bool) and math.isfinite(raw) and raw == int(raw):
        return int(raw)
    if isinstance(raw, (bool, np.bool_)) or not isinstance(raw, (int, np.integer)):
        raise DegradeError(f"invalid parameter record: {where}: bad value {raw!r} (expected an integer)")
    return int(raw)


def _api_float(where: str, raw: Any) -> float:
    """A real field given from Python: int, float or a numpy number (not a bool, not a string); an integer
    beyond float's range reads as inf, which the range checks then refuse."""
    if isinstance(raw, (bool, np.bool_)) or not isinstance(raw, (int, float, np.integer, np.floating)):
        raise DegradeError(f"invalid parameter record: {where}: bad value {raw!r} (expected a number)")
    return _as_float(raw)


def _api_bool(where: str, raw: Any) -> bool:
    if not isinstance(raw, (bool, np.bool_)):
        raise DegradeError(f"invalid parameter record: {where}: bad value {raw!r} (expected True or False)")
    return bool(raw)


def _api_choice(where: str, raw: Any) -> Any:  # a name's spelling is _validate's to check
    return str(raw) if isinstance(raw, str) else raw


_API_KINDS = {_strict_int: (_api_int, (int,)), _strict_float: (_api_float, (float,)),
              _strict_bool: (_api_bool, (bool,)), _choice: (_api_choice, (str,)),
              _optional_choice: (_api_choice, (str, type(None)))}
# per step type: (field, how a Python value of it is read, the types it is already in), looked up once
_API_FIELDS = {t: tuple((name, *_API_KINDS[parse]) for name, parse in parsers.items())
               for t, parsers in _FIELD_PARSERS.items()}


def _normalise(p: DegradationParams) -> None:
    """A record built from Python holds the types its JSON holds: numpy scalars (np.int64 seeds, np.float32
    strengths, np.bool_ gray) become int, float and bool, so the record saves and reads back; a value of
    the wrong kind (a bool level or seed, quality 50.5, size '7', gray 'no') is refused, as from_json
    refuses it. A record already in those types (every one from_json or sample_params makes) is left as is."""
    if p.level is not None and type(p.level) is not int:
        object.__setattr__(p, "level", _api_int("level", p.level))
    for name, step_type in _STEP_TYPES.items():
        step = getattr(p, name)
        if not isinstance(step, step_type):  # a wrong or absent step: _validate's to say
            continue
        specs = _API_FIELDS[step_type]
        if all(type(getattr(step, field)) in exact for field, _, exact in specs):
            continue
        object.__setattr__(p, name, step_type(**{field: read(f"{name}.{field}", getattr(step, field))
                                                 for field, read, _ in specs}))


def _validate(p: DegradationParams) -> None:
    """Structural checks that make a record applicable; ranges of the vector layout are encode's job."""

    def fail(msg: str) -> None:
        raise DegradeError(f"invalid parameter record: {msg}")

    if p.level not in (None, 1, 2, 3) or isinstance(p.level, bool):
        fail(f"level must be 1, 2, 3 or null, got {p.level!r}")
    if not isinstance(p.final, FinalParams):
        fail("final must be a FinalParams")
    if p.level is not None and (p.level == 3) != (p.final.order is not None):
        fail(f"level {p.level} does not match the pipeline (final.order {p.final.order!r})")
    for name, step_type in _STEP_TYPES.items():
        step = getattr(p, name)
        if step is not None and not isinstance(step, step_type):
            fail(f"{name} must be a {step_type.__name__} or None")
    for name in ("blur1", "blur2"):
        b = getattr(p, name)
        if b is None:
            continue
        if not 3 <= b.size <= MAX_KERNEL_SIZE or b.size % 2 == 0:
            fail(f"{name}.size must be odd, in [3, {MAX_KERNEL_SIZE}], got {b.size}")
        if not (MAX_SIGMA >= b.sigma_x >= b.sigma_y >= MIN_SIGMA):
            fail(f"{name} sigmas must satisfy {MAX_SIGMA:g} >= sigma_x >= sigma_y >= {MIN_SIGMA:g}, "
                 f"got {b.sigma_x}, {b.sigma_y}")
        if not 0 <= b.theta < math.pi:
            fail(f"{name}.theta must be in [0, pi), got {b.theta}")
        if b.isotropic and b.theta != 0:  # canonical: v's theta entry (and decode) say 0 for it
            fail(f"{name} is isotropic (sigma_x == sigma_y): its theta must be 0, got {b.theta}")
    if p.sinc is not None:
        if not 3 <= p.sinc.size <= MAX_KERNEL_SIZE or p.sinc.size % 2 == 0:
            fail(f"sinc.size must be odd, in [3, {MAX_KERNEL_SIZE}], got {p.sinc.size}")
        if not MIN_OMEGA_C <= p.sinc.omega_c <= math.pi:
            fail(f"sinc.omega_c must be in [{MIN_OMEGA_C:g}, pi], got {p.sinc.omega_c}")
    for name in ("resize1", "resize2"):
        r = getattr(p, name)
        if r is not None:
            if not MIN_SCALE <= r.scale <= MAX_SCALE:
                fail(f"{name}.scale must be in [{MIN_SCALE:g}, {MAX_SCALE:g}], got {r.scale}")
            if r.mode not in RESIZE_MODES:
                fail(f"{name}.mode must be one of {RESIZE_MODES}, got {r.mode!r}")
    for name in ("noise1", "noise2"):
        n = getattr(p, name)
        if n is not None:
            if n.type not in NOISE_TYPES:
                fail(f"{name}.type must be one of {NOISE_TYPES}, got {n.type!r}")
            top = MAX_GAUSSIAN_SIGMA if n.type == "gaussian" else MAX_POISSON_SCALE
            if not (math.isfinite(n.strength) and 0 < n.strength <= top):  # 0 is no noise: None, as v reads it
                fail(f"{name}.strength must be in (0, {top:g}] for {n.type} noise (no noise: None), got {n.strength}")
            if not 0 <= n.seed < SEED_LIMIT:
                fail(f"{name}.seed must be in [0, 2**53), got {n.seed}")
    for name in ("jpeg1", "jpeg2"):
        j = getattr(p, name)
        if j is not None and not 1 <= j.quality <= 99:  # 100 encodes "no JPEG" in v (docs/degradation.md)
            fail(f"{name}.quality must be an integer in [1, 99], got {j.quality}")
    if p.final.mode not in RESIZE_MODES:
        fail(f"final.mode must be one of {RESIZE_MODES}, got {p.final.mode!r}")
    if p.final.order not in (None, *FINAL_ORDERS):
        fail(f"final.order must be 'A', 'B' or null, got {p.final.order!r}")
    if p.two_stage:
        if p.resize2 is None:
            fail("a two-stage record (final.order set) needs resize2")
    else:
        present = [name for name in _TWO_STAGE_ONLY if getattr(p, name) is not None]
        if present:
            fail(f"a one-stage record (final.order null) cannot have {', '.join(present)}")
