"""The model's hyper-parameters (`DASRConfig`), stored in every checkpoint and model file, and their bounds."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, get_args

from dasr_model.errors import DASRError
from degrade.vector import VECTOR_LENGTH  # 33, layout "dasr33-v1"

MIXINGS = ("linear", "softmax")
PREDICTOR_INPUTS = ("lr", "highpass")
ExpertImpl = Literal["grouped", "dense", "stacked", "bmm", "folded"]
EXPERT_IMPLS: tuple[str, ...] = get_args(ExpertImpl)
# A config read from a file is data: sizes are bounded before anything is allocated. 100M parameters
# (400 MB in float32) is 13x the released 5-expert model; larger nets are refused, not attempted.
MAX_PARAMETERS = 100_000_000
# Layer counts are bounded apart from the parameters: a file declaring a million 1-feature blocks holds few
# parameters, yet building its modules took 25 s and 1.6 GB per 100,000 blocks before its tensors were read.
MAX_BLOCKS = 256  # residual blocks (16 in DASR's MSRResNet)
MAX_EXPERTS = 64  # experts (5 in DASR)


@dataclass(frozen=True)
class DASRConfig:
    """Hyper-parameters, stored in every checkpoint (never guessed from tensor shapes)."""

    num_experts: int = 5
    num_feat: int = 64
    num_block: int = 16
    scale: int = 4
    predictor_feat: int = 64
    mapping_hidden: int = 15
    # How v becomes the expert mix a. "linear": a = MappingNet(v) as released (released weights need it);
    # "softmax": a = softmax(MappingNet(v) / mixing_temperature), a convex mix (docs/training.md).
    mixing: str = "linear"
    mixing_temperature: float = 1.0
    # Scale of the mapping net's last layer at init: 0.1 starts a near 1/K for every v; 1 lets a vary with v.
    mapping_gain: float = 0.1
    # What the predictor sees: "lr" (as released) or "highpass", the LR minus its 3x3 local mean, x10
    # (texture, noise and JPEG traces without brightness; learns where "lr" stays constant, docs/training.md).
    predictor_input: str = "lr"

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            want = type(f.default)  # every field has a default of its type (int, float or str)
            if want is float and isinstance(value, int) and not isinstance(value, bool):
                try:
                    value = float(value)
                except OverflowError:  # 10**400 from a file's JSON
                    raise DASRError(f"model config: {f.name} must be a finite number, got an integer of "
                                    f"{value.bit_length()} bits") from None
                object.__setattr__(self, f.name, value)
            if type(value) is not want:
                raise DASRError(f"model config: {f.name} must be {want.__name__}, got {value!r}")
        for name in ("num_experts", "num_feat", "num_block", "predictor_feat", "mapping_hidden"):
            if getattr(self, name) < 1:
                raise DASRError(f"model config: {name} must be at least 1, got {getattr(self, name)}")
        for name, most in (("num_block", MAX_BLOCKS), ("num_experts", MAX_EXPERTS)):
            if getattr(self, name) > most:
                raise DASRError(f"model config: {name} must be at most {most}, got {getattr(self, name)}")
        if self.scale != 4:
            raise DASRError(f"model config: only scale 4 is implemented, got {self.scale}")
        if self.mixing not in MIXINGS:
            raise DASRError(f"model config: mixing must be one of {', '.join(MIXINGS)}, got {self.mixing!r}")
        if self.predictor_input not in PREDICTOR_INPUTS:
            raise DASRError(f"model config: predictor_input must be one of {', '.join(PREDICTOR_INPUTS)}, "
                            f"got {self.predictor_input!r}")
        for name in ("mixing_temperature", "mapping_gain"):
            if not 0 < getattr(self, name) < math.inf:
                raise DASRError(f"model config: {name} must be a finite number > 0, got {getattr(self, name)}")
        if self.parameter_count() > MAX_PARAMETERS:
            raise DASRError(f"model config: {self.parameter_count():,} parameters is over the limit of "
                            f"{MAX_PARAMETERS:,} (num_experts {self.num_experts}, num_feat {self.num_feat}, "
                            f"num_block {self.num_block})")

    def parameter_count(self) -> int:
        """The number of parameters DASR(self) holds, from the sizes alone (nothing is allocated)."""
        k, f, p, h = self.num_experts, self.num_feat, self.predictor_feat, self.mapping_hidden

        def conv(i: int, o: int, side: int) -> int:
            return o * i * side * side + o

        gen = (conv(3, f, 3) + 2 * self.num_block * conv(f, f, 3) + 2 * conv(f, 4 * f, 3) + conv(f, f, 3)
               + conv(f, 3, 3))
        chans = [3, p, p, p, p, p, VECTOR_LENGTH]
        pred = sum(conv(chans[i], chans[i + 1], 5) for i in range(6))
        mapping = (VECTOR_LENGTH * h + h) + (h * k + k)
        return k * gen + pred + mapping

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> DASRConfig:
        """A config read from a file: every field must be there, nothing else; sizes are bounded."""
        if not isinstance(d, dict):
            raise DASRError("model config: expected a mapping of field names to values")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known, key=str)
        if unknown:
            raise DASRError(f"model config: unknown field(s) {', '.join(map(str, unknown))}")
        missing = sorted(known - set(d))
        if missing:  # a default would silently change the model (mixing, predictor_input, ...)
            raise DASRError(f"model config: missing field(s) {', '.join(missing)}")
        return cls(**d)
