"""dasr_model: the DASR network (spec: shared/spec/model.md).

Implemented: the network (`DASR`: predictor + K-expert MSRResNet), the released-weights loader, the
shard data pipeline and the training loop with optional GAN / perceptual terms and DDP (`dasr-train`,
docs/training.md). Not yet: the GPU fast path, its measurements and a real training run (issue 5).
"""

from dasr_model.model import DASR, DASRConfig, DegradationPredictor, ExpertMSRResNet, load_release_weights

__all__ = ["DASR", "DASRConfig", "DegradationPredictor", "ExpertMSRResNet", "load_release_weights"]
