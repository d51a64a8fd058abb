"""Datasets in their real on-disk formats, albumentations transforms, multi-task sampling, built-in data."""

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
from .sampling import MultiTaskBatch, MultiTaskLoader, ShardedInfiniteSampler, TaskScheduler
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
    "build_transforms",
    "MultiTaskBatch",
    "MultiTaskLoader",
    "ShardedInfiniteSampler",
    "TaskScheduler",
]
