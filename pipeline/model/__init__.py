"""NanoDet-Plus network: ShuffleNetV2 + GhostPAN + NanoDetPlusHead, with the SimpleConvHead AGM for training."""
from pipeline.model.detector import NanoDetPlus, build_model

__all__ = ["NanoDetPlus", "build_model"]
