"""A multi-task model: one task-conditioned MoE ViT backbone and one head per task.

``model(images, task, targets=None)`` runs the backbone once for ``task`` and returns
``{"out", "aux"[, "losses"][, "detections"]}``; routing records are returned, never stored.
``model.specialize(task)`` gives a plain single-task module for export.

Restoration is one more task of such a model: its degradation tasks (``deblur``, ``derain``, ...) share one head,
``heads["restoration"]``, DeMoE's MoE decoder (:class:`~vision_moe.models.demoe.MoEDecoderHead`), routed per image
by its degradation classifier, on the backbone's tokens for task ``"restoration"`` (blind to the degradation, which
"auto" does not know), as :class:`~vision_moe.models.demoe.DeMoEViT` runs it. A dense head reads the tokens only
(``head(tokens, grid, size)``); the restoration head also reads the image (``head(tokens, grid, images, route)``)
for its skips and its residual.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn

from .._factory import create_model
from ..tasks import RestorationLoss, build_head, get_task, is_restoration, task_loss
from .demoe import DeMoEViT, MoEDecoderHead, _check_tasks
from .moe_vit import token_stride
from .restoration import classifier_outputs, mixed_losses, per_image_tasks, restoration_route

__all__ = ["MultiTaskModel", "SpecializedTaskModel", "build_multitask_model", "RESTORATION"]

# the restoration head's key, and the backbone task its tokens are routed for (DeMoEViT's: restoration_network()
# hands the backbone specialised to it to DeMoEViT)
RESTORATION = DeMoEViT.BACKBONE_TASK


def _grid(backbone: nn.Module, images: torch.Tensor) -> tuple[int, int]:
    p = token_stride(backbone.patch_embed)
    h, w = images.shape[-2:]
    if h % p[0] or w % p[1]:
        raise ValueError(f"image size {(h, w)} is not a multiple of the patch size {tuple(p)}")
    return h // p[0], w // p[1]


class MultiTaskModel(nn.Module):
    """``.backbone`` (MoEVisionTransformer, headless), ``.heads`` (head name -> head), ``.tasks`` (the tasks it
    serves: one per head, and each degradation of the restoration head), ``.degradations``.

    ``losses``: the degradation tasks' RestorationLoss (default L1); ``train_routing``: what the restoration head
    routes by in training ('forced': each image's own degradation, as DeMoE trains; 'auto': its classifier)."""

    def __init__(
        self,
        backbone: nn.Module,
        heads: dict[str, nn.Module],
        losses: dict[str, RestorationLoss] | None = None,
        train_routing: str = "forced",
    ) -> None:
        super().__init__()
        missing = [t for t in heads if t not in backbone.tasks]
        if missing:
            raise ValueError(f"heads for tasks {missing} the backbone does not route; it routes {list(backbone.tasks)}")
        if train_routing not in ("forced", "auto"):
            raise ValueError(f"train_routing={train_routing!r}: expected 'forced' or 'auto'")
        self.backbone = backbone
        self.heads = nn.ModuleDict(heads)
        restore = heads.get(RESTORATION)
        self.degradations: tuple[str, ...] = tuple(restore.tasks) if restore is not None else ()
        self.tasks = tuple(t for t in heads if t != RESTORATION) + self.degradations
        bad = [t for t in (losses or {}) if t not in self.degradations]
        if bad:
            raise ValueError(f"losses for tasks {bad}: this model's degradation tasks are {list(self.degradations)}")
        self.losses = nn.ModuleDict({t: (losses or {}).get(t) or RestorationLoss() for t in self.degradations})
        self.train_routing = train_routing

    @property
    def classifier_routed(self) -> bool:
        """Whether the restoration head routes by its degradation classifier (the trainer then scores it routed
        four ways, see :func:`~vision_moe.engine.evaluator.evaluate_routes`)."""
        return bool(self.degradations) and getattr(self.heads[RESTORATION], "classifier", None) is not None

    def forward_shared(self, images: torch.Tensor) -> tuple[torch.Tensor, int, bool]:
        """The backbone's task-independent stages on ``images``, computed once for several tasks; pass the
        result as ``model(images, task, targets, shared=...)`` for each task (same outputs and gradients as
        separate forwards; see ``MoEVisionTransformer.num_shared_stages``)."""
        _grid(self.backbone, images)
        return self.backbone.forward_shared(images)

    def forward(
        self,
        images: torch.Tensor,
        task: str | None,
        targets: list[dict] | None = None,
        shared: tuple[torch.Tensor, int, bool] | None = None,
        route: str | None = None,
    ) -> dict[str, Any]:
        """images (B, 3, H, W) -> {"out": task output, "aux": [MoEAux], "losses": {name: tensor} if targets}.

        Outputs: classification logits (B, K); dense tasks (B, C, H, W); detection the raw FCOS tensors
        (cls_logits (B, A, K), bbox_regression (B, A, 4), bbox_ctrness (B, A, 1)) and, in eval mode, the decoded
        ``"detections"`` (list of dicts boxes/scores/labels); a degradation the restored image (B, 3, H, W) in
        [0, 1] (clamped in eval mode; the input in [-1, 1]), ``image_routing`` (the head's routing record: its
        classifier's logits and probabilities, the chosen experts and weights per image), ``predicted_task`` and,
        with targets, ``classifier_loss``; its "aux" holds the backbone's records only. ``route`` (degradations
        only): 'auto' or a degradation to force (default: 'auto' in eval mode, ``train_routing`` in training).
        ``task=None`` with ``targets``: a batch of restoration pairs that mixes degradations (each image's own,
        ``targets[i]["degradation"]``); the result then holds ``task_losses`` and ``task_counts`` as
        :class:`~vision_moe.models.restoration.RestorationModel`'s."""
        if task is None and targets is not None and self.degradations:
            return self._restore(images, per_image_tasks(targets, self.degradations), targets, shared, route)
        if task not in self.tasks:
            raise ValueError(f"unknown task {task!r}; this model has heads for {list(self.tasks)}")
        if task in self.degradations:
            return self._restore(images, task, targets, shared, route)
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

    def _restore(self, images, task: str | list[str], targets, shared, route) -> dict[str, Any]:
        """A degradation task (``task``: one for the batch, or one per image): the backbone's tokens for
        :data:`RESTORATION`, then the restoration head, routed as :func:`restoration_route` says."""
        grid = _grid(self.backbone, images)
        tokens, aux = self.backbone.forward_features(images, RESTORATION, return_aux=True, shared=shared)
        head = self.heads[RESTORATION]
        by = restoration_route(
            self.degradations, self.classifier_routed, self.training, self.train_routing, task, route
        )
        out, head_aux = head(tokens, grid, images, by)
        if not self.training:
            out = out.clamp(0.0, 1.0)
        # "aux" holds the backbone's records only, so that every task's list matches backbone.moe_layers() (balancing
        # loss, routing statistics); the head's per-image routing (its classifier's) is "image_routing"
        result: dict[str, Any] = {"out": out, "aux": aux}
        per_image = task if isinstance(task, list) else [task] * images.shape[0]
        if head_aux:
            result["image_routing"] = head_aux[0]
            truth = per_image if targets is not None else None
            classifier_outputs(result, self.degradations, truth, head_aux[0].logits)
        if targets is not None and isinstance(task, list):
            result.update(mixed_losses(out, targets, per_image, self.losses))
        elif targets is not None:
            result["losses"] = task_loss(task, self.losses[task], out, targets, tuple(images.shape[-2:]))
        return result

    def moe_layers(self) -> list[tuple[str, nn.Module]]:
        return [(f"backbone.{n}", m) for n, m in self.backbone.moe_layers()]

    def set_capacity(self, capacity: int | None = None, capacity_factor: float | None = None) -> MultiTaskModel:
        """Per-image expert capacity of every MoE layer (see ``MoEVisionTransformer.set_capacity``)."""
        self.backbone.set_capacity(capacity, capacity_factor)
        return self

    def restoration_network(self) -> nn.Module:
        """This model's degradation tasks as one restoration network (a
        :class:`~vision_moe.models.demoe.DeMoEViT` of copies of the backbone, specialised to :data:`RESTORATION`,
        and of the restoration head): ``net(images, task="auto" | degradation)`` equals this model's output for
        that route at the training size, and takes any size (padded to the patch size; there its position
        embedding is resampled bilinearly, as DeMoEViT's traceable one, where this model resamples as timm does).
        What ``tools/export.py`` exports for the degradation tasks (per degradation, and "auto")."""
        if not self.degradations:
            raise ValueError(f"this model has no degradation tasks; its tasks are {list(self.tasks)}")
        head = copy.deepcopy(self.heads[RESTORATION])
        return DeMoEViT.from_parts(self.backbone.specialize(RESTORATION), head, self.train_routing).train(self.training)

    def specialize(self, task: str) -> SpecializedTaskModel:
        """A single-task module (``backbone.specialize(task)`` + a copy of that task's head; a degradation: the
        backbone for :data:`RESTORATION` and the restoration head with that degradation's experts, no classifier,
        equal to this model forced to it)."""
        if task not in self.tasks:
            raise ValueError(f"unknown task {task!r}; this model has heads for {list(self.tasks)}")
        if task in self.degradations:
            backbone, head = self.backbone.specialize(RESTORATION), self.heads[RESTORATION].specialize(task)
        else:
            backbone, head = self.backbone.specialize(task), copy.deepcopy(self.heads[task])
        return SpecializedTaskModel(backbone, head, task).train(self.training)


class SpecializedTaskModel(nn.Module):
    """One task's model: ``forward(images)`` returns tensors only (see :meth:`MultiTaskModel.forward`'s "out")."""

    def __init__(self, backbone: nn.Module, head: nn.Module, task: str) -> None:
        super().__init__()
        self.backbone, self.head, self.task = backbone, head, task
        self.kind = get_task(task).kind

    def forward(self, images: torch.Tensor):
        grid = _grid(self.backbone, images)
        tokens = self.backbone.forward_features(images)
        if self.kind == "restoration":
            out, _ = self.head(tokens, grid, images, self.task)
            return out if self.training else out.clamp(0.0, 1.0)
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
    losses: dict[str, RestorationLoss] | None = None,
    **backbone_overrides,
) -> MultiTaskModel:
    """Backbone ``backbone`` (a registered vision-moe model, made headless) routed for ``tasks`` (task -> number
    of classes / channels; None for fixed-channel tasks), one head per task. ``head`` picks the dense head
    ('setr_pup' or 'linear'); ``head_kwargs`` go to :func:`vision_moe.tasks.build_head` (head_channels,
    head_norm, det_channels, det_num_convs, det_scale_factors, cls_pool), except ``restoration_head``: the
    arguments of the degradation tasks' shared :class:`~vision_moe.models.demoe.MoEDecoderHead` (width,
    dec_blocks, top_k, classifier_hidden, dispatcher, drop_rate) and ``train_routing``. ``losses``: the
    degradation tasks' RestorationLoss."""
    for t in tasks:
        get_task(t)
    if "num_classes" in backbone_overrides or "tasks" in backbone_overrides:
        raise ValueError("build_multitask_model sets the backbone's num_classes (0) and tasks itself")
    kwargs = dict(head_kwargs or {})
    restore = dict(kwargs.pop("restoration_head", None) or {})
    degradations = [t for t in tasks if is_restoration(t)]
    if restore and not degradations:
        raise ValueError(f"head_kwargs['restoration_head'] {restore}: none of the tasks {list(tasks)} is a degradation")
    train_routing = restore.pop("train_routing", "forced")
    perception = {t: n for t, n in tasks.items() if not is_restoration(t)}
    bb_tasks = list(perception) + ([RESTORATION] if degradations else [])
    bb = create_model(backbone, tasks=bb_tasks, num_classes=0, img_size=img_size, **backbone_overrides)
    p = token_stride(bb.patch_embed)[0]
    heads = {
        t: build_head(t, bb.embed_dim, n, p, bb.num_prefix_tokens, head=head, **kwargs) for t, n in perception.items()
    }
    if degradations:
        _check_tasks(degradations, restore.get("top_k", 1), train_routing, restore.get("dispatcher", "sparse"))
        heads[RESTORATION] = MoEDecoderHead(
            bb.embed_dim, degradations, p, num_prefix_tokens=bb.num_prefix_tokens, **restore
        )
    return MultiTaskModel(bb, heads, losses, train_routing)
