"""Evaluation of a multi-task model on each task's held-out split with the metrics of ``vision_moe.metrics``."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import dataset_tasks
from ..tasks import get_task, stack_key
from .routing import add_expert_loads

__all__ = [
    "build_metric",
    "update_metric",
    "evaluate_task",
    "evaluate_routes",
    "agreement_targets",
    "task_dataset",
    "heldout_loader",
]

_logger = logging.getLogger(__name__)


def build_metric(task: str, dataset: Any, num_classes: int | None, crop_border: int = 0):
    """The task's metric accumulator, configured from its dataset (COCO ground truth, number of classes);
    restoration metrics cut ``crop_border`` pixels from each side."""
    from .. import metrics as M

    spec = get_task(task)
    cls = getattr(M, spec.metric)
    if spec.kind == "restoration":
        return cls(crop_border)
    if spec.kind == "detection":
        return cls(dataset.coco, dataset.contiguous_to_cat_id)
    if spec.metric == "SegmentationMetric":
        return cls(num_classes, ignore_index=255)
    return cls()


def update_metric(task: str, metric: Any, result: dict, targets: list[dict]) -> None:
    """Feed one batch of model output (``MultiTaskModel.forward``'s dict) and targets to ``metric``."""
    kind = get_task(task).kind
    out = result.get("out")  # detection results carry "detections" instead
    if kind == "classification":
        labels = torch.stack([torch.as_tensor(t["class_label"]) for t in targets]).long()
        metric.update(out.float().cpu(), labels)
    elif kind == "detection":
        dets = [{k: v.cpu() for k, v in d.items()} for d in result["detections"]]
        metric.update(dets, targets)
    elif kind == "restoration":  # the ground truth, and the degraded input for its baseline, in [0, 1]
        metric.update(out.float().cpu(), [t["gt"] for t in targets], [t["lq"] for t in targets])
        if "predicted_task" in result:  # a classifier-routed model: its degradation classifier's accuracy
            metric.update_classifier(result["predicted_task"], [task] * len(targets))
    elif task in ("semseg", "human_parts"):
        metric.update(out.argmax(1).cpu(), stack_key(targets, task))
    elif task in ("saliency", "edges"):
        metric.update(torch.sigmoid(out.float()).cpu(), stack_key(targets, task))
    elif task == "normals":
        metric.update(F.normalize(out.float(), dim=1).cpu(), stack_key(targets, task))
    elif task == "depth":
        metric.update(out.float().cpu(), stack_key(targets, task))
    else:
        raise ValueError(f"no metric adapter for task {task!r}")


def task_datasets(
    cfg: Any,
    tasks: Sequence[str] | None = None,
    split: str = "val",
    img_size: Any = None,
    roots: dict[int, Any] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """task -> dataset for every task of experiment config ``cfg`` (or ``tasks``): the first dataset labelling it,
    its held-out (``split="val"``) or training (``"train"``) split with the evaluation transform (no augmentation);
    of a restoration set, the subset of that degradation. Each dataset is built once for all its tasks. The one
    place held-out (and calibration) data is built: the trainer's evaluations, ``tools/eval.py`` and the exported
    graphs' evaluation all read it.

    ``img_size`` evaluates at another size than the config's (the data itself, e.g. generated built-in data, stays
    the config's); ``roots``: dataset index -> where its data is now; ``progress``: a bar if built-in data has to
    be generated."""
    import dataclasses

    from ..data.transforms import build_transforms
    from .data import build_dataset, split_by_task

    out: dict[str, Any] = {}
    for i, dcfg in enumerate(cfg.data.datasets):
        ds_tasks = [t for t in dataset_tasks(dcfg, cfg.tasks) if tasks is None or t in tasks]
        if not ds_tasks or all(t in out for t in ds_tasks):
            continue
        if roots and i in roots:
            dcfg = dataclasses.replace(dcfg, root=str(roots[i]))
        name = dcfg.val_split if split == "val" else dcfg.train_split
        ds = build_dataset(dcfg, cfg, name, train=False, tasks=ds_tasks, progress=progress)
        if img_size is not None:
            ds.transform = build_transforms(False, img_size, cfg.data.mean, cfg.data.std, ds_tasks)
        for sub, sub_tasks in split_by_task(ds, ds_tasks):
            for t in sub_tasks:
                out.setdefault(t, sub)
    return out


def task_dataset(
    cfg: Any, task: str, split: str = "val", img_size: Any = None, root: Any = None, progress: bool = False
):
    """The dataset of ``task`` as :func:`task_datasets` builds it; ``root`` replaces the root of the dataset that
    labels it."""
    labelling = [i for i, d in enumerate(cfg.data.datasets) if task in dataset_tasks(d, cfg.tasks)]
    if not labelling:
        raise ValueError(f"no dataset in the config labels task {task!r}")
    roots = None if root is None else {labelling[0]: root}
    found = task_datasets(cfg, [task], split, img_size, roots, progress)
    if task not in found:
        raise ValueError(f"the {split} split of data.datasets[{labelling[0]}] has no images of task {task!r}")
    return found[task]


def heldout_loader(cfg: Any, dataset: Any, limit: int = 0, batch_size: int | None = None, workers: int | None = None):
    """The evaluation DataLoader over ``dataset`` (its first ``limit`` samples when > 0): unreadable samples
    dropped from their batch (:class:`~vision_moe.data.SkipBadSamples`), targets as a list of dicts; images of
    differing sizes (restoration sets without ``uniform_size``) one at a time, never padded together."""
    from ..data import SkipBadSamples, collate_multitask

    base = dataset.dataset if isinstance(dataset, torch.utils.data.Subset) else dataset
    uniform = getattr(base, "uniform_size", True)
    ds = dataset if not limit or limit >= len(dataset) else torch.utils.data.Subset(dataset, range(limit))
    return torch.utils.data.DataLoader(
        SkipBadSamples(ds),
        batch_size=(batch_size or cfg.data.eval_batch_size) if uniform else 1,
        shuffle=False,
        collate_fn=collate_multitask,
        num_workers=cfg.data.num_workers if workers is None else workers,
        generator=torch.Generator(),
    )


def agreement_targets(task: str, result: dict) -> list[dict] | None:
    """A reference model's predictions as targets (argmax class, argmax mask), so :func:`update_metric` scores
    another model's agreement with it; None for tasks without such a reading (detection, regression)."""
    kind = get_task(task).kind
    out = result["out"]
    if kind == "classification":
        return [{"class_label": int(v)} for v in out.float().argmax(1).cpu()]
    if task in ("semseg", "human_parts"):
        return [{task: m} for m in out.argmax(1).cpu()]
    return None


def _images_drawn(loader, batches: int) -> int | None:
    """Samples the loader's first ``batches`` batches were drawn with (before unreadable ones were dropped), or
    None for a loader that cannot tell (no ``batch_size`` or an unsized dataset)."""
    bs = getattr(loader, "batch_size", None)
    try:
        n = len(loader.dataset)
    except (AttributeError, TypeError):
        return None
    return min(n, batches * bs) if bs else None


@torch.no_grad()
def evaluate_task(
    model: nn.Module,
    task: str,
    loader,
    dataset: Any,
    num_classes: int | None,
    device: torch.device,
    max_batches: int = 0,
    amp_ctx=None,
    crop_border: int = 0,
    routing: dict | None = None,
    reference: nn.Module | None = None,
    route: str | None = None,
) -> dict[str, float]:
    """Run ``task`` over ``loader`` in eval mode and return the metric's ``compute()``.

    ``routing``: a dict that receives the task's assignments per expert of each MoE layer on these images
    (:func:`vision_moe.engine.routing.add_expert_loads`), for the routing heatmaps.
    ``reference``: another model of the same task (e.g. the float model of a fixed-point one); its predictions
    are scored as targets too, giving ``agreement_<metric>`` (top-1 agreement, mIoU between the two masks) for
    classification and segmentation tasks.

    When the MoE layers have a capacity limit, ``moe_dropped_fraction`` (assignments dropped over all MoE layers
    and images) is added.

    ``route``: what a classifier-routed restoration model routes by ('auto', or a degradation to force; default
    'auto' in eval mode), e.g. to score it forced to the true or to a wrong degradation.

    Unreadable images (dropped from their batch by :class:`~vision_moe.data.SkipBadSamples` /
    ``collate_multitask``) are skipped: they are left out of the evaluated image set, their ground truth
    included (COCOeval scores only the images passed to the metric: ``imgIds`` are the images it saw), so the
    metrics describe the readable images exactly as if the others were not in the split. Their number is added
    as ``skipped_images`` and logged, so a metric over fewer images than the split holds never goes unnoticed."""
    if max_batches is not None and max_batches < 0:
        raise ValueError(f"max_batches must be >= 0 (0 = the whole split), got {max_batches}")
    was = model.training
    model.eval()
    metric = build_metric(task, dataset, num_classes, crop_border)
    agree = build_metric(task, dataset, num_classes, crop_border) if reference is not None else None
    if reference is not None:
        reference.eval()
    assigned = dropped = 0
    seen = batches = 0
    try:
        for i, batch in enumerate(loader):
            if max_batches and i >= max_batches:
                break
            images, targets = batch[0], batch[1]
            batches, seen = i + 1, seen + len(targets)
            if len(targets) == 0:
                continue
            kw = {"route": route} if route is not None else {}
            if amp_ctx is not None:
                with amp_ctx():
                    result = model(images.to(device), task, **kw)
            else:
                result = model(images.to(device), task, **kw)
            update_metric(task, metric, result, targets)
            if routing is not None:
                add_expert_loads(routing, task, result.get("aux") or ())
            if agree is not None:
                ref_targets = agreement_targets(task, reference(images.to(device), task))
                if ref_targets is None:
                    agree = None
                else:
                    update_metric(task, agree, result, ref_targets)
            for a in result.get("aux") or ():
                if a.keep is not None:
                    assigned += a.keep.numel()
                    dropped += int((~a.keep).sum())
        out = {k: float(v) for k, v in metric.compute().items() if isinstance(v, (int, float))}
        if agree is not None:
            out.update({f"agreement_{k}": float(v) for k, v in agree.compute().items() if isinstance(v, (int, float))})
        if assigned:
            out["moe_dropped_fraction"] = dropped / assigned
        total = _images_drawn(loader, batches)
        if total is not None and total > seen:
            out["skipped_images"] = total - seen
            _logger.warning(
                "%s: %d of %d held-out images were unreadable and skipped; the metrics cover the other %d "
                "(the skipped images and their ground truth are not evaluated)",
                task,
                total - seen,
                total,
                seen,
            )
        return out
    finally:
        model.train(was)


def evaluate_routes(
    model: nn.Module,
    loaders: dict[str, tuple[Any, Any]],
    device: torch.device,
    max_batches: int = 0,
    amp_ctx=None,
    crop_border: int = 0,
) -> dict[str, dict[str, float]]:
    """A classifier-routed restoration model (DeMoE, or a multi-task model's restoration head) on each
    degradation's held-out images, routed four ways:
    ``input_psnr`` (the degraded input), ``psnr_auto`` (by its classifier), ``psnr_forced`` (forced to the true
    degradation's experts), ``psnr_wrong`` (the mean over the other degradations' experts forced) and
    ``psnr_wrong_<d>`` for each; ``classifier_accuracy``. ``loaders``: task -> (loader, dataset), as
    :func:`~vision_moe.engine.trainer.val_loaders` gives."""
    tasks = tuple(getattr(model, "degradations", None) or model.tasks)  # a multi-task model: its degradations
    out: dict[str, dict[str, float]] = {}
    for task, (loader, ds) in loaders.items():
        if task not in tasks:
            continue
        args = (model, task, loader, ds, None, device, max_batches, amp_ctx, crop_border)

        def run(route: str, args=args) -> dict[str, float]:
            return evaluate_task(*args, route=route)

        auto = run("auto")
        row = {
            "input_psnr": auto["input_psnr"],
            "psnr_auto": auto["psnr"],
            "psnr_forced": run(task)["psnr"],
            "classifier_accuracy": auto.get("classifier_accuracy", float("nan")),
        }
        wrong = {f"psnr_wrong_{t}": run(t)["psnr"] for t in tasks if t != task}
        row["psnr_wrong"] = sum(wrong.values()) / len(wrong) if wrong else float("nan")
        out[task] = {**row, **wrong}
    return out
