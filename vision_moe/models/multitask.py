"""A multi-task model: one task-conditioned MoE ViT backbone and one head per task.

``model(images, task, targets=None)`` runs the backbone once for ``task`` and returns
``{"out", "aux"[, "losses"][, "detections"]}``; routing records are returned, never stored.
``model.specialize(task)`` gives a plain single-task module for export.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn

from .._factory import create_model
from ..tasks import build_head, get_task, task_loss
from .moe_vit import token_stride

__all__ = ["MultiTaskModel", "SpecializedTaskModel", "build_multitask_model"]


def _grid(backbone: nn.Module, images: torch.Tensor) -> tuple[int, int]:
    p = token_stride(backbone.patch_embed)
    h, w = images.shape[-2:]
    if h % p[0] or w % p[1]:
        raise ValueError(f"image size {(h, w)} is not a multiple of the patch size {tuple(p)}")
    return h // p[0], w // p[1]


class MultiTaskModel(nn.Module):
    """``.backbone`` (MoEVisionTransformer, headless), ``.heads`` (task -> head), ``.tasks``."""

    def __init__(self, backbone: nn.Module, heads: dict[str, nn.Module]) -> None:
        super().__init__()
        missing = [t for t in heads if t not in backbone.tasks]
        if missing:
            raise ValueError(f"heads for tasks {missing} the backbone does not route; it routes {list(backbone.tasks)}")
        self.backbone = backbone
        self.heads = nn.ModuleDict(heads)
        self.tasks = tuple(heads)

    def forward_shared(self, images: torch.Tensor) -> tuple[torch.Tensor, int, bool]:
        """The backbone's task-independent stages on ``images``, computed once for several tasks; pass the
        result as ``model(images, task, targets, shared=...)`` for each task (same outputs and gradients as
        separate forwards; see ``MoEVisionTransformer.num_shared_stages``)."""
        _grid(self.backbone, images)
        return self.backbone.forward_shared(images)

    def forward(
        self,
        images: torch.Tensor,
        task: str,
        targets: list[dict] | None = None,
        shared: tuple[torch.Tensor, int, bool] | None = None,
    ) -> dict[str, Any]:
        """images (B, 3, H, W) -> {"out": task output, "aux": [MoEAux], "losses": {name: tensor} if targets}.

        Outputs: classification logits (B, K); dense tasks (B, C, H, W); detection the raw FCOS tensors
        (cls_logits (B, A, K), bbox_regression (B, A, 4), bbox_ctrness (B, A, 1)) and, in eval mode, the decoded
        ``"detections"`` (list of dicts boxes/scores/labels).
        """
        if task not in self.heads:
            raise ValueError(f"unknown task {task!r}; this model has heads for {list(self.tasks)}")
        grid = _grid(self.backbone, images)
        size = (images.shape[-2], images.shape[-1])
        tokens, aux = self.backbone.forward_features(images, task, return_aux=True, shared=shared)  # (B, P+N, C)
        head = self.heads[task]
        out = head(tokens, grid, size)
        result: dict[str, Any] = {"out": out, "aux": aux}
        if targets is not None:
            result["losses"] = task_loss(task, head, out, targets, size)
        if get_task(task).kind == "detection" and not self.training:
            result["detections"] = head.postprocess(out, size)
        return result

    def moe_layers(self) -> list[tuple[str, nn.Module]]:
        return [(f"backbone.{n}", m) for n, m in self.backbone.moe_layers()]

    def set_capacity(self, capacity: int | None = None, capacity_factor: float | None = None) -> MultiTaskModel:
        """Per-image expert capacity of every MoE layer (see ``MoEVisionTransformer.set_capacity``)."""
        self.backbone.set_capacity(capacity, capacity_factor)
        return self

    def specialize(self, task: str) -> SpecializedTaskModel:
        """A single-task module (``backbone.specialize(task)`` + a copy of that task's head)."""
        if task not in self.heads:
            raise ValueError(f"unknown task {task!r}; this model has heads for {list(self.tasks)}")
        return SpecializedTaskModel(self.backbone.specialize(task), copy.deepcopy(self.heads[task]), task).train(
            self.training
        )


class SpecializedTaskModel(nn.Module):
    """One task's model: ``forward(images)`` returns tensors only (see :meth:`MultiTaskModel.forward`'s "out")."""

    def __init__(self, backbone: nn.Module, head: nn.Module, task: str) -> None:
        super().__init__()
        self.backbone, self.head, self.task = backbone, head, task
        self.kind = get_task(task).kind

    def forward(self, images: torch.Tensor):
        grid = _grid(self.backbone, images)
        tokens = self.backbone.forward_features(images)
        return self.head(tokens, grid, (images.shape[-2], images.shape[-1]))

    def anchors(self, image_size: tuple[int, int]) -> torch.Tensor:
        """Detection only: the (A, 4) FCOS points for an input of ``image_size``."""
        if self.kind != "detection":
            raise ValueError(f"anchors() is for detection, this model is {self.task!r}")
        return self.head.anchors(tuple(image_size))

    def postprocess(self, raw, image_size: tuple[int, int]) -> list[dict[str, torch.Tensor]]:
        """Detection only: decode raw outputs and run torchvision ``batched_nms``."""
        if self.kind != "detection":
            raise ValueError(f"postprocess() is for detection, this model is {self.task!r}")
        return self.head.postprocess(raw, tuple(image_size))


def build_multitask_model(
    backbone: str,
    tasks: dict[str, int | None],
    img_size: int | tuple[int, int] = 224,
    head: str = "setr_pup",
    *,
    head_kwargs: dict | None = None,
    **backbone_overrides,
) -> MultiTaskModel:
    """Backbone ``backbone`` (a registered vision-moe model, made headless) routed for ``tasks`` (task -> number
    of classes / channels; None for fixed-channel tasks), one head per task. ``head`` picks the dense head
    ('setr_pup' or 'linear'); ``head_kwargs`` go to :func:`vision_moe.tasks.build_head` (head_channels,
    head_norm, det_channels, det_num_convs, det_scale_factors, cls_pool)."""
    for t in tasks:
        get_task(t)
    if "num_classes" in backbone_overrides or "tasks" in backbone_overrides:
        raise ValueError("build_multitask_model sets the backbone's num_classes (0) and tasks itself")
    bb = create_model(backbone, tasks=list(tasks), num_classes=0, img_size=img_size, **backbone_overrides)
    p = token_stride(bb.patch_embed)[0]
    heads = {
        t: build_head(t, bb.embed_dim, n, p, bb.num_prefix_tokens, head=head, **(head_kwargs or {}))
        for t, n in tasks.items()
    }
    return MultiTaskModel(bb, heads)
