"""Task metrics: COCO mAP (pycocotools), mIoU, top-k, saliency maxF, normals angle, edge F (ODS), depth RMSE,
PSNR / SSIM (scikit-image)."""

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
from .restoration import RestorationMetric, psnr, restoration_summary, ssim

__all__ = [
    "ClassificationMetric",
    "CocoDetectionMetric",
    "DepthMetric",
    "EdgeMetric",
    "NormalsMetric",
    "RestorationMetric",
    "SaliencyMetric",
    "SegmentationMetric",
    "multi_task_delta",
    "psnr",
    "restoration_summary",
    "ssim",
]
