"""Backbones and whole models. Importing this registers every entry point with timm."""

from .demoe import DeMoE
from .moe_vit import DEFAULT_TASKS, MoEVisionTransformer, TaskBlock, checkpoint_filter_fn, resolve_block_indices
from .mofme import MoFME

__all__ = [
    "DEFAULT_TASKS",
    "DeMoE",
    "MoEVisionTransformer",
    "MoFME",
    "TaskBlock",
    "checkpoint_filter_fn",
    "resolve_block_indices",
]
