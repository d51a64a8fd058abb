"""``create_model`` / ``list_models`` over the models this package registers with timm."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

import timm
import torch.nn as nn

from . import models  # noqa: F401  (registers the entry points)

__all__ = ["create_model", "list_models", "model_family", "FAMILIES"]

# model family -> the modules of vision_moe.models whose entry points belong to it. 'vit': task-routed ViT
# backbones (made into multi-task models with one head per task); 'restoration': image-to-image networks whose
# tasks are degradations (models/restoration.py wraps them for the engine).
FAMILIES: dict[str, tuple[str, ...]] = {"vit": ("moe_vit",), "restoration": ("mofme",)}


def list_models(pattern: str = "*", family: str | None = None) -> list[str]:
    """Names of vision-moe's registered models (a subset of ``timm.list_models()``), filtered by a glob and,
    optionally, by family (``'vit'`` or ``'restoration'``)."""
    if family is not None and family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {sorted(FAMILIES)}")
    modules = [m for f, ms in FAMILIES.items() if family in (None, f) for m in ms]
    names = sorted(n for m in modules for n in timm.list_models(module=m))
    return [n for n in names if fnmatch.fnmatch(n, pattern)]


def model_family(name: str) -> str:
    """The family of a registered model: ``'vit'`` or ``'restoration'``."""
    for family in FAMILIES:
        if name in list_models(family=family):
            return family
    raise ValueError(f"unknown model {name!r}; vision-moe models are {list_models()}")


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
