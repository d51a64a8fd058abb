"""The task registry: task name -> head builder, loss, metric and target format.

Target formats follow the data contract: ``class_label`` int64 scalar; ``boxes`` float32 (N, 4) xyxy pixels +
``labels`` int64 (N,); ``semseg`` / ``human_parts`` int64 (H, W) with 255 = ignore; ``saliency`` / ``edges``
float32 (1, H, W) in {0, 1}; ``normals`` float32 (3, H, W) unit vectors (all-zero = invalid); ``depth``
float32 (1, H, W) (0 = invalid). Losses are M³ViT's.

Restoration tasks (one per degradation: ``derain``, ``dehaze``, ...; kind ``'restoration'``) have no head: a
restoration model maps the image to the restored image. Their target is ``gt`` float32 (3, H, W) in [0, 1] (and
``lq``, the degraded input in [0, 1], for the input baseline); loss L1 (or Charbonnier, and an optional VGG16
perceptual term, see :class:`RestorationLoss`); metric PSNR / SSIM (:class:`~vision_moe.metrics.RestorationMetric`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .heads import ClassificationHead, FCOSDetectionHead, LinearUpsampleHead, SetrPupHead

__all__ = [
    "TaskSpec",
    "TASKS",
    "DEGRADATIONS",
    "RESTORATION_LOSSES",
    "RestorationLoss",
    "get_task",
    "is_restoration",
    "build_head",
    "task_loss",
    "stack_key",
    "DENSE_HEADS",
]

_logger = logging.getLogger(__name__)

IGNORE_INDEX = 255
# the degradations a restoration model removes, one task each: rain streaks, haze, snow, raindrops, motion blur,
# defocus blur, low light, noise (the built-in data makes all but raindrops)
DEGRADATIONS = ("derain", "dehaze", "desnow", "deraindrop", "deblur", "defocus", "lowlight", "denoise")
EDGE_POS_WEIGHT = 0.95  # M³ViT's BalancedBinaryCrossEntropyLoss(pos_weight=0.95)


def stack_key(targets: list[dict], key: str, device: torch.device | None = None) -> torch.Tensor:
    """Stack one dense target key of a batch into (B, ...)."""
    out = torch.stack([t[key] for t in targets])
    return out.to(device) if device is not None else out


def _ce_loss(key: str) -> Callable:
    def loss(out: torch.Tensor, targets: list[dict]) -> dict[str, torch.Tensor]:
        y = stack_key(targets, key, out.device).long()  # (B, H, W)
        return {key: F.cross_entropy(out.float(), y, ignore_index=IGNORE_INDEX)}

    return loss


def _saliency_loss(out: torch.Tensor, targets: list[dict]) -> dict[str, torch.Tensor]:
    y = stack_key(targets, "saliency", out.device).float()
    return {"saliency": F.binary_cross_entropy_with_logits(out.float(), y)}


def _edge_loss(out: torch.Tensor, targets: list[dict]) -> dict[str, torch.Tensor]:
    """Weighted BCE: positives weighted 0.95, negatives 0.05 (edges are rare)."""
    y = stack_key(targets, "edges", out.device).float()
    w = torch.where(y > 0.5, torch.full_like(y, EDGE_POS_WEIGHT), torch.full_like(y, 1.0 - EDGE_POS_WEIGHT))
    return {"edges": F.binary_cross_entropy_with_logits(out.float(), y, weight=w)}


def _normals_loss(out: torch.Tensor, targets: list[dict]) -> dict[str, torch.Tensor]:
    """L1 between the L2-normalised prediction and the target, on valid (non-zero) pixels."""
    y = stack_key(targets, "normals", out.device).float()  # (B, 3, H, W)
    valid = (y.abs().sum(1, keepdim=True) > 0).expand_as(y)
    pred = F.normalize(out.float(), dim=1)
    return {"normals": F.l1_loss(pred[valid], y[valid]) if valid.any() else out.sum() * 0.0}


def _depth_loss(out: torch.Tensor, targets: list[dict]) -> dict[str, torch.Tensor]:
    """L1 on valid (positive) depth pixels."""
    y = stack_key(targets, "depth", out.device).float()
    valid = y > 0
    return {"depth": F.l1_loss(out.float()[valid], y[valid]) if valid.any() else out.sum() * 0.0}


def _cls_loss(out: torch.Tensor, targets: list[dict]) -> dict[str, torch.Tensor]:
    y = torch.stack([torch.as_tensor(t["class_label"]) for t in targets]).long().to(out.device)
    return {"classification": F.cross_entropy(out.float(), y)}


def _restoration_l1(out: torch.Tensor, targets: list[dict]) -> dict[str, torch.Tensor]:
    return {"l1": F.l1_loss(out.float(), stack_key(targets, "gt", out.device).float())}


RESTORATION_LOSSES = ("l1", "charbonnier")
CHARBONNIER_EPS = 1e-3  # as MPRNet / Restormer


def _vgg16_cache_file() -> Path:
    from torchvision.models import VGG16_Weights

    return Path(torch.hub.get_dir()) / "checkpoints" / Path(VGG16_Weights.IMAGENET1K_V1.url).name


def _vgg16_features() -> nn.Module | None:
    """torchvision's ImageNet VGG16 up to relu3_3 from the torch hub cache, or None when it is not there (nothing
    is downloaded: training must not depend on the network)."""
    from torchvision.models import vgg16

    path = _vgg16_cache_file()
    if not path.is_file():
        return None
    net = vgg16()
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return net.features[:16].eval().requires_grad_(False)


class RestorationLoss(nn.Module):
    """The loss of a restoration task: ``kind`` ('l1' or 'charbonnier', sqrt(d^2 + 1e-6)) on the image in [0, 1],
    plus ``perceptual_weight`` x the MSE of VGG16 features (relu1_2, relu2_2, relu3_3; MoFME's recipe uses 0.04).

    The perceptual term runs only when torchvision's VGG16 ImageNet weights are in the torch hub cache (nothing
    is downloaded); otherwise a warning says so once and the term is left out. The VGG weights are not part of
    the model's state (not registered as a submodule)."""

    _VGG_TAPS = (3, 8, 15)  # relu1_2, relu2_2, relu3_3 in torchvision's vgg16.features
    _MEAN, _STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

    def __init__(self, kind: str = "l1", perceptual_weight: float = 0.0) -> None:
        super().__init__()
        if kind not in RESTORATION_LOSSES:
            raise ValueError(f"restoration loss {kind!r}: expected one of {list(RESTORATION_LOSSES)}")
        self.kind, self.perceptual_weight = kind, float(perceptual_weight)
        self._vgg: list[nn.Module] = []  # a list: kept out of the module tree (and the checkpoint)
        if self.perceptual_weight > 0:
            vgg = _vgg16_features()
            if vgg is None:
                _logger.warning(
                    "perceptual loss left out: VGG16 weights are not in the torch hub cache (%s); fetch them once "
                    "with: python -c 'import torchvision; torchvision.models.vgg16(weights=\"DEFAULT\")'",
                    _vgg16_cache_file(),
                )
            else:
                self._vgg.append(vgg)

    @property
    def perceptual_active(self) -> bool:
        return bool(self._vgg)

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        vgg = self._vgg[0].to(x.device)
        mean = x.new_tensor(self._MEAN).view(1, 3, 1, 1)
        std = x.new_tensor(self._STD).view(1, 3, 1, 1)
        x, feats = (x - mean) / std, []
        for i, layer in enumerate(vgg):
            x = layer(x)
            if i in self._VGG_TAPS:
                feats.append(x)
        return feats

    def forward(self, out: torch.Tensor, targets: list[dict]) -> dict[str, torch.Tensor]:
        gt = stack_key(targets, "gt", out.device).float()
        out = out.float()
        if self.kind == "l1":
            losses = {"l1": F.l1_loss(out, gt)}
        else:
            losses = {"charbonnier": torch.sqrt((out - gt).square() + CHARBONNIER_EPS**2).mean()}
        if self._vgg:
            fo, fg = self._features(out), self._features(gt)
            losses["perceptual"] = self.perceptual_weight * sum(F.mse_loss(a, b) for a, b in zip(fo, fg))
        return losses


@dataclass(frozen=True)
class TaskSpec:
    """What a task is: its head kind, the target keys it reads, fixed output channels (None = from the data),
    its loss, and the metric reported for it (class name in ``vision_moe.metrics`` and its headline key)."""

    name: str
    kind: str  # 'classification' | 'detection' | 'dense' | 'restoration'
    target_keys: tuple[str, ...]
    out_channels: int | None
    loss: Callable | None
    metric: str
    primary: str
    higher_is_better: bool


TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in [
        TaskSpec(
            "classification", "classification", ("class_label",), None, _cls_loss, "ClassificationMetric", "top1", True
        ),
        TaskSpec("detection", "detection", ("boxes", "labels"), None, None, "CocoDetectionMetric", "AP50", True),
        TaskSpec("semseg", "dense", ("semseg",), None, _ce_loss("semseg"), "SegmentationMetric", "mIoU", True),
        TaskSpec(
            "human_parts", "dense", ("human_parts",), None, _ce_loss("human_parts"), "SegmentationMetric", "mIoU", True
        ),
        TaskSpec("saliency", "dense", ("saliency",), 1, _saliency_loss, "SaliencyMetric", "maxF", True),
        TaskSpec("normals", "dense", ("normals",), 3, _normals_loss, "NormalsMetric", "mean_angle", False),
        TaskSpec("edges", "dense", ("edges",), 1, _edge_loss, "EdgeMetric", "odsF", True),
        TaskSpec("depth", "dense", ("depth",), 1, _depth_loss, "DepthMetric", "rmse", False),
        *(
            TaskSpec(d, "restoration", ("gt",), 3, _restoration_l1, "RestorationMetric", "psnr", True)
            for d in DEGRADATIONS
        ),
    ]
}

DENSE_HEADS = ("setr_pup", "linear")


def is_restoration(task: str) -> bool:
    """Whether ``task`` is a degradation (an image-to-image restoration task)."""
    return task in TASKS and TASKS[task].kind == "restoration"


def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; expected one of {sorted(TASKS)}")
    return TASKS[name]


def build_head(
    task: str,
    embed_dim: int,
    num_outputs: int | None,
    patch_size: int,
    num_prefix_tokens: int = 1,
    head: str = "setr_pup",
    head_channels: int = 256,
    head_norm: str = "bn",
    det_channels: int = 256,
    det_num_convs: int = 4,
    det_scale_factors: tuple[float, ...] = (4.0, 2.0, 1.0, 0.5),
    cls_pool: str = "token",
) -> nn.Module:
    """The head for ``task``. ``num_outputs`` is the number of classes (classification, detection, semseg,
    human_parts) or channels; tasks with fixed channels (saliency 1, normals 3, edges 1, depth 1) accept None."""
    spec = get_task(task)
    if spec.kind == "restoration":
        raise ValueError(f"task {task!r} is a restoration task: it has no head; train it with a restoration model")
    n = num_outputs if num_outputs is not None else spec.out_channels
    if n is None or n <= 0:
        raise ValueError(f"task {task!r} needs a positive number of classes, got {num_outputs!r}")
    if spec.out_channels is not None and n != spec.out_channels:
        raise ValueError(f"task {task!r} has {spec.out_channels} output channels, got {n}")
    if spec.kind == "classification":
        return ClassificationHead(embed_dim, n, pool=cls_pool, num_prefix_tokens=num_prefix_tokens)
    if spec.kind == "detection":
        return FCOSDetectionHead(
            embed_dim,
            n,
            patch_size=patch_size,
            channels=det_channels,
            num_convs=det_num_convs,
            scale_factors=det_scale_factors,
            num_prefix_tokens=num_prefix_tokens,
        )
    if head == "setr_pup":
        return SetrPupHead(
            embed_dim,
            n,
            patch_size=patch_size,
            channels=head_channels,
            norm=head_norm,
            num_prefix_tokens=num_prefix_tokens,
        )
    if head == "linear":
        return LinearUpsampleHead(embed_dim, n, num_prefix_tokens=num_prefix_tokens)
    raise ValueError(f"unknown dense head {head!r}; expected one of {list(DENSE_HEADS)}")


def task_loss(
    task: str, head: nn.Module, out, targets: list[dict], image_size: tuple[int, int]
) -> dict[str, torch.Tensor]:
    """The task's loss terms (a dict; their sum is the task loss). For a restoration task ``head`` is its
    :class:`RestorationLoss` (or None: plain L1)."""
    spec = get_task(task)
    if spec.kind == "restoration" and head is not None:
        return head(out, targets)
    if spec.kind == "detection":
        return {f"det_{k}": v for k, v in head.loss(out, targets, image_size).items()}
    return spec.loss(out, targets)
