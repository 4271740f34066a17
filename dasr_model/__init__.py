"""dasr_model: the DASR network (spec: shared/spec/model.md).

Implemented: the network (`DASR`: predictor + K-expert MSRResNet), the released-weights loader, the
shard data pipeline and an L1 + regression training loop (`dasr-train`, docs/training.md). Not yet:
GAN and perceptual losses, multi-GPU, the GPU fast path and its measurements (issue 5).
"""

from dasr_model.model import DASR, DASRConfig, DegradationPredictor, ExpertMSRResNet, load_release_weights

__all__ = ["DASR", "DASRConfig", "DegradationPredictor", "ExpertMSRResNet", "load_release_weights"]
