"""dasr_model: the DASR network (spec: shared/spec/model.md).

Implemented: the network (`DASR`: predictor + K-expert MSRResNet) and the released-weights loader.
The trainer (`dasr-train`) is not implemented yet (issue 5).
"""

from dasr_model.model import DASR, DASRConfig, DegradationPredictor, ExpertMSRResNet, load_release_weights

__all__ = ["DASR", "DASRConfig", "DegradationPredictor", "ExpertMSRResNet", "load_release_weights"]
