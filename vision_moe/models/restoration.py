"""A restoration network as the engine runs it: the counterpart of :class:`~vision_moe.models.multitask.MultiTaskModel`
for image-to-image models, whose tasks are degradations.

A restoration network (any registered model of the ``'restoration'`` family) has the contract
``net(images, task=None | degradation, return_aux=False)`` -> restored image (B, 3, H, W) in [0, 1] (and its MoE
routing records). :class:`RestorationModel` gives it the interface the trainer, evaluator and checkpoints use for
every model: ``model(images, task, targets=None)`` -> ``{"out", "aux"[, "losses"]}``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._factory import create_model, model_family
from ..tasks import RestorationLoss, get_task, is_restoration, task_loss

__all__ = [
    "RestorationModel",
    "build_restoration_model",
    "restoration_route",
    "classifier_outputs",
    "per_image_tasks",
    "mixed_losses",
]


def restoration_route(
    tasks: Sequence[str],
    classifier_routed: bool,
    training: bool,
    train_routing: str,
    task: str | list[str],
    route: str | None,
) -> str | list[str]:
    """What a restoration network (or a multi-task model's restoration head) routes by: ``route`` ('auto' or a
    degradation of ``tasks``) when given; otherwise, when it routes by its own degradation classifier, 'auto' in
    eval mode and in training its ``train_routing`` ('forced': the images' own degradations ``task``); ``task``
    for every other network."""
    if route is not None:
        if route != "auto" and route not in tasks:
            raise ValueError(f"route {route!r}: expected 'auto' or one of {list(tasks)}")
        return route
    if classifier_routed and (not training or train_routing == "auto"):
        return "auto"
    return task


def classifier_outputs(
    result: dict[str, Any], tasks: Sequence[str], truth: list[str] | None, logits: torch.Tensor | None = None
) -> None:
    """A classifier-routed forward's ``predicted_task`` (per image, from the classifier's ``logits`` (B, E) over
    ``tasks``; default: the first routing record's, which is the classifier's) and, given the true degradations,
    ``classifier_loss`` (cross-entropy, unweighted) into ``result``."""
    if logits is None:
        if not result["aux"]:
            return
        logits = result["aux"][0].logits
    result["predicted_task"] = [tasks[i] for i in logits.argmax(-1).tolist()]
    if truth is not None:
        y = torch.tensor([list(tasks).index(t) for t in truth], device=logits.device)
        result["classifier_loss"] = F.cross_entropy(logits.float(), y)


def per_image_tasks(targets: list[dict], tasks: Sequence[str]) -> list[str]:
    """Each image's degradation in a batch that mixes them (``targets[i]["degradation"]``), checked against the
    degradations the model serves."""
    per_image = [t["degradation"] for t in targets]
    bad = sorted({t for t in per_image if t not in tasks})
    if bad:
        raise ValueError(f"unknown task {bad[0]!r} in the batch; this model serves {list(tasks)}")
    return per_image


def mixed_losses(
    out: torch.Tensor, targets: list[dict], per_image: list[str], losses: Any
) -> dict[str, dict[str, Any]]:
    """A mixed batch's ``task_losses`` (degradation -> its loss over its images) and ``task_counts`` (its number of
    images); ``losses``: degradation -> its RestorationLoss."""
    groups: dict[str, list[int]] = {}
    for i, t in enumerate(per_image):
        groups.setdefault(t, []).append(i)
    size = tuple(out.shape[-2:])
    task_losses = {
        t: sum(task_loss(t, losses[t], out[idx], [targets[i] for i in idx], size).values()) for t, idx in groups.items()
    }
    return {"task_losses": task_losses, "task_counts": {t: len(idx) for t, idx in groups.items()}}


class RestorationModel(nn.Module):
    """``.net`` (the restoration network), ``.tasks`` (its degradations), ``.losses`` (task -> RestorationLoss).

    A batch may mix degradations (all-in-one training): ``model(images, None, targets)`` takes each image's
    degradation from ``targets[i]["degradation"]``."""

    def __init__(self, net: nn.Module, losses: dict[str, RestorationLoss] | None = None) -> None:
        super().__init__()
        self.net = net
        self.tasks = tuple(net.tasks)
        bad = [t for t in (losses or {}) if t not in self.tasks]
        if bad:
            raise ValueError(f"losses for tasks {bad} the network does not serve; it serves {list(self.tasks)}")
        self.losses = nn.ModuleDict({t: (losses or {}).get(t) or RestorationLoss() for t in self.tasks})

    @property
    def classifier_routed(self) -> bool:
        """Whether the network routes by its own degradation classifier (DeMoE): its forward then takes
        ``task="auto"``, and the classifier has a loss and an accuracy."""
        return bool(getattr(self.net, "classifier_routed", False))

    def _route(self, task: str | list[str], route: str | None) -> str | list[str]:
        return restoration_route(
            self.tasks, self.classifier_routed, self.training, getattr(self.net, "train_routing", "forced"), task, route
        )

    def forward(
        self,
        images: torch.Tensor,
        task: str | None,
        targets: list[dict] | None = None,
        shared: Any = None,
        route: str | None = None,
    ) -> dict[str, Any]:
        """images (B, 3, H, W) normalised to [-1, 1] -> {"out": restored (B, 3, H, W) in [0, 1], "aux": [MoEAux],
        "losses": {name: tensor} if targets}. ``shared`` is accepted for the trainer's interface (nothing of a
        restoration network is shared between tasks). ``route``: what a classifier-routed network routes by
        ('auto', or a degradation to force; default: see ``_route``); such a network's result also holds
        ``predicted_task`` (the classifier's, per image) and, with targets, ``classifier_loss`` (its
        cross-entropy against the true degradation, unweighted).

        ``task=None`` with ``targets``: each image's own degradation (a mixed batch); the result then also holds
        ``task_losses`` (task -> its loss over its images) and ``task_counts`` (task -> its number of images)."""
        if task is None and targets is not None:
            return self._forward_mixed(images, targets, route)
        if task not in self.tasks:
            raise ValueError(f"unknown task {task!r}; this model serves {list(self.tasks)}")
        out, aux = self.net(images, self._route(task, route), return_aux=True)
        result: dict[str, Any] = {"out": out, "aux": aux}
        if self.classifier_routed:
            classifier_outputs(result, self.net.tasks, [task] * images.shape[0] if targets is not None else None)
        if targets is not None:
            result["losses"] = task_loss(task, self.losses[task], out, targets, tuple(images.shape[-2:]))
        return result

    def _forward_mixed(self, images: torch.Tensor, targets: list[dict], route: str | None = None) -> dict[str, Any]:
        per_image = per_image_tasks(targets, self.tasks)
        # routing by degradation: each image routed with its own (the network takes one task per image)
        if self.classifier_routed:
            per = self._route(per_image, route)
        else:
            per = per_image if getattr(self.net, "task_conditioned", False) else None
        out, aux = self.net(images, per, return_aux=True)
        result = {"out": out, "aux": aux, **mixed_losses(out, targets, per_image, self.losses)}
        if self.classifier_routed:
            classifier_outputs(result, self.net.tasks, per_image)
        return result

    def forward_shared(self, images: torch.Tensor) -> None:
        """Nothing of a restoration network is shared between tasks' forwards (see MultiTaskModel's)."""
        return None

    def moe_layers(self) -> list[tuple[str, nn.Module]]:
        return [(f"net.{n}", m) for n, m in self.net.moe_layers()]

    def set_capacity(self, capacity: int | None = None, capacity_factor: float | None = None) -> RestorationModel:
        self.net.set_capacity(capacity, capacity_factor)
        return self

    def specialize(self, task: str) -> nn.Module:
        """The network for one degradation (``net.specialize(task)``): ``forward(images)`` -> restored image."""
        if task not in self.tasks:
            raise ValueError(f"unknown task {task!r}; this model serves {list(self.tasks)}")
        return self.net.specialize(task)


def build_restoration_model(
    name: str,
    tasks: Sequence[str],
    img_size: int | tuple[int, int] = 64,
    *,
    losses: dict[str, RestorationLoss] | None = None,
    **overrides,
) -> RestorationModel:
    """The restoration network ``name`` (a registered model of the restoration family) serving the degradations
    ``tasks``, wrapped for the engine."""
    if model_family(name) != "restoration":
        raise ValueError(f"{name!r} is not a restoration model; expected one of the restoration family")
    tasks = list(tasks)
    bad = [t for t in tasks if not is_restoration(t)]
    if bad:
        get_task(bad[0])  # an unknown name gets the registry's message
        raise ValueError(f"tasks {bad} are not restoration tasks; a restoration model serves degradations")
    if "tasks" in overrides:
        raise ValueError("build_restoration_model sets the network's tasks itself")
    return RestorationModel(create_model(name, tasks=tasks, img_size=img_size, **overrides), losses)
