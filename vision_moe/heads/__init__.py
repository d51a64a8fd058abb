"""Task heads: classification, dense pixel decoders (SETR-PUP, linear) and detection (simple pyramid + FCOS)."""

from .classification import ClassificationHead
from .dense import LinearUpsampleHead, SetrPupHead, tokens_to_map
from .detection import FCOSDetectionHead, SimpleFeaturePyramid

__all__ = [
    "ClassificationHead",
    "FCOSDetectionHead",
    "LinearUpsampleHead",
    "SetrPupHead",
    "SimpleFeaturePyramid",
    "tokens_to_map",
]
