"""dasr_model: the DASR network (spec: shared/spec/model.md).

Implemented: the network (`DASR`: predictor + K-expert MSRResNet), the released-weights loader, the
shard data pipeline and the training loop with optional GAN / perceptual terms and DDP (`dasr-train`,
docs/training.md), three exact ways to compute the expert convolutions (`set_expert_impl`) and the
per-image fused plain generator for inference (`ExpertMSRResNet.fuse`). Not yet: GPU measurements of
those and a real training run (issue 5).
"""

from dasr_model.model import (
                              DASR,
                              EXPERT_IMPLS,
                              DASRConfig,
                              DegradationPredictor,
                              ExpertMSRResNet,
                              MSRResNet,
                              load_release_weights,
                              set_expert_impl,
)

__all__ = ["DASR", "DASRConfig", "DegradationPredictor", "EXPERT_IMPLS", "ExpertMSRResNet", "MSRResNet",
           "load_release_weights", "set_expert_impl"]
