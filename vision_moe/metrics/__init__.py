"""Task metrics: COCO mAP (pycocotools), mIoU, top-k, saliency maxF, normals angle, edge F (ODS), depth RMSE."""

from .dense import (
    ClassificationMetric,
    DepthMetric,
    EdgeMetric,
    NormalsMetric,
    SaliencyMetric,
    SegmentationMetric,
    multi_task_delta,
)
from .detection import CocoDetectionMetric

__all__ = [
    "ClassificationMetric",
    "CocoDetectionMetric",
    "DepthMetric",
    "EdgeMetric",
    "NormalsMetric",
    "SaliencyMetric",
    "SegmentationMetric",
    "multi_task_delta",
]
