"""dasr_model: the DASR network, its training and its use (needs PyTorch).

The flow: `degrade make-dataset` shards -> `data` (paired crops, flips and rotations with v kept
true) -> `model` (`DASR`: predictor + K-expert MSRResNet; `config`: its hyper-parameters) -> `train`
(`dasr-train`; `checkpoints`) -> `modelfile` (the pickle-free model file, `dasr-export`) -> `infer`
(`dasr-sr`) and `evaluate` (`dasr-eval`). `release` loads the released DASR weights. docs/training.md
and docs/inference.md describe them; no GPU-trained model exists yet.
"""

from dasr_model.config import DASRConfig
from dasr_model.model import DASR, EXPERT_IMPLS, DegradationPredictor, ExpertMSRResNet, MSRResNet, set_expert_impl
from dasr_model.release import load_release_weights

__all__ = ["DASR", "DASRConfig", "DegradationPredictor", "EXPERT_IMPLS", "ExpertMSRResNet", "MSRResNet",
           "load_release_weights", "set_expert_impl"]
