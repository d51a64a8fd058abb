"""``create_model`` / ``list_models`` over the models this package registers with timm."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

import timm
import torch.nn as nn

from . import models  # noqa: F401  (registers the entry points)

__all__ = ["create_model", "list_models"]


def list_models(pattern: str = "*") -> list[str]:
    """Names of vision-moe's registered models (a subset of ``timm.list_models()``), filtered by a glob."""
    names = sorted(timm.list_models(module="moe_vit"))
    return [n for n in names if fnmatch.fnmatch(n, pattern)]


def create_model(name: str, tasks: Sequence[str] | None = None, pretrained: bool = False, **overrides) -> nn.Module:
    """Build a registered model. ``tasks`` names the tasks its routers serve; any constructor argument
    can be overridden. ``pretrained_cfg_overlay=dict(file=PATH)`` with ``pretrained=True`` loads (and,
    for a dense timm ViT file, upcycles) local weights, as in timm."""
    known = list_models()
    if name not in known:
        raise ValueError(f"unknown model {name!r}; vision-moe models are {known}")
    if isinstance(tasks, str):  # tuple("depth") would be five one-letter tasks
        raise ValueError(f"tasks={tasks!r}: expected a list of task names, e.g. tasks=[{tasks!r}]")
    if tasks is not None:
        overrides["tasks"] = tuple(tasks)
    return timm.create_model(name, pretrained=pretrained, **overrides)
