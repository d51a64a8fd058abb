"""Datasets in their real on-disk formats, albumentations transforms, multi-task sampling, built-in data."""

from .classification import ImageFolderClassification
from .coco import CocoDetection, load_coco_json
from .common import (
    DENSE_TASKS,
    IGNORE_INDEX,
    TASKS,
    BadSampleError,
    SkipBadSamples,
    collate_multitask,
    stack_target,
)
from .multitask import NYUDv2, NYUDv2MT, PascalContext, PascalContextMT
from .sampling import MultiTaskBatch, MultiTaskLoader, ShardedInfiniteSampler, TaskScheduler
from .segmentation import PairedSegmentationFolders, SegmentationFolder, ade20k, voc_segmentation
from .transforms import build_transforms

__all__ = [
    "TASKS",
    "DENSE_TASKS",
    "IGNORE_INDEX",
    "BadSampleError",
    "SkipBadSamples",
    "collate_multitask",
    "stack_target",
    "CocoDetection",
    "load_coco_json",
    "ImageFolderClassification",
    "SegmentationFolder",
    "PairedSegmentationFolders",
    "ade20k",
    "voc_segmentation",
    "PascalContextMT",
    "PascalContext",
    "NYUDv2MT",
    "NYUDv2",
    "build_transforms",
    "MultiTaskBatch",
    "MultiTaskLoader",
    "ShardedInfiniteSampler",
    "TaskScheduler",
]
