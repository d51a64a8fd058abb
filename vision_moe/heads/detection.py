"""Detection: a ViTDet simple feature pyramid on the backbone's stride-p map feeding torchvision's FCOS parts.

torchvision's ``FCOS`` wants a backbone that it calls itself; ours needs the task and returns MoE aux records,
so this head drives FCOS's parts directly: ``FCOSHead`` (towers, focal / GIoU / centerness losses, box coder),
``AnchorGenerator`` (one point per location), ``FCOS.compute_loss`` (centre sampling and scale-range matching)
and ``FCOS.postprocess_detections`` (top-k, decoding, clipping, ``batched_nms``). Nothing is re-implemented.
Images arrive already resized and normalised by the data pipeline, so FCOS's ``GeneralizedRCNNTransform`` is
not used and boxes stay in input-pixel coordinates.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from timm.layers import LayerNorm2d
from torchvision.models.detection import FCOS
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.fcos import FCOSHead
from torchvision.models.detection.image_list import ImageList

from .dense import tokens_to_map

__all__ = ["SimpleFeaturePyramid", "FCOSDetectionHead"]


class SimpleFeaturePyramid(nn.Module):
    """ViTDet (detectron2 ``modeling/backbone/vit.py``): one plain-ViT map -> several levels by deconvs / pooling.

    ``scale_factors`` (e.g. (4, 2, 1, 0.5)) give each level's scale relative to the input map.
    """

    def __init__(self, in_channels: int, out_channels: int, scale_factors: Sequence[float] = (2.0, 1.0, 0.5)) -> None:
        super().__init__()
        self.scale_factors = tuple(float(s) for s in scale_factors)
        self.stages = nn.ModuleList()
        for s in self.scale_factors:
            c = in_channels
            if s == 4.0:
                layers = [
                    nn.ConvTranspose2d(c, c // 2, 2, 2),
                    LayerNorm2d(c // 2),
                    nn.GELU(),
                    nn.ConvTranspose2d(c // 2, c // 4, 2, 2),
                ]
                c = c // 4
            elif s == 2.0:
                layers, c = [nn.ConvTranspose2d(c, c // 2, 2, 2)], c // 2
            elif s == 1.0:
                layers = []
            elif s == 0.5:
                layers = [nn.MaxPool2d(2, 2)]
            elif s == 0.25:
                layers = [nn.MaxPool2d(4, 4)]
            else:
                raise ValueError(f"unsupported scale factor {s}; expected 4, 2, 1, 0.5 or 0.25")
            layers += [
                nn.Conv2d(c, out_channels, 1, bias=False),
                LayerNorm2d(out_channels),
                nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
                LayerNorm2d(out_channels),
            ]
            self.stages.append(nn.Sequential(*layers))
        self.out_channels = out_channels

    def level_sizes(self, grid: tuple[int, int]) -> list[tuple[int, int]]:
        """(h, w) of each level for an input map of size ``grid``."""
        out = []
        for s in self.scale_factors:
            if s >= 1:
                out.append((int(grid[0] * s), int(grid[1] * s)))
            else:
                k = int(round(1 / s))
                out.append((grid[0] // k, grid[1] // k))
        return out

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # (B, C, h, w) -> [(B, C', h*s, w*s)]
        return [stage(x) for stage in self.stages]


class _GroupNormNCHW(nn.GroupNorm):
    """``nn.GroupNorm`` computed on a contiguous (NCHW) copy and returned in the input's memory format.

    PyTorch's CPU group norm on a channels-last tensor is an order of magnitude slower than on NCHW (torch 2.14.1,
    AVX2: 6.1 vs 0.56 ms forward + backward for (16, 32, 16, 16)); the trainer runs convolutions channels-last
    (``train.channels_last``), so the FCOS towers' norms paid it. Same parameters and state-dict keys; outputs
    equal ``nn.GroupNorm``'s."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.is_contiguous():
            return super().forward(x)
        y = super().forward(x.contiguous())
        channels_last = x.is_contiguous(memory_format=torch.channels_last)
        return y.contiguous(memory_format=torch.channels_last) if channels_last else y


def convert_group_norms(module: nn.Module, cls: type[nn.GroupNorm] = _GroupNormNCHW) -> None:
    """Make every group norm under ``module`` a ``cls`` (weights kept): :class:`_GroupNormNCHW` for training,
    plain ``nn.GroupNorm`` to measure what that is worth (``benchmarks/bench_step_parts.py``)."""
    for parent in module.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.GroupNorm) and type(child) is not cls:
                gn = cls(child.num_groups, child.num_channels, child.eps, child.affine)
                gn.load_state_dict(child.state_dict())
                setattr(parent, name, gn)


class FCOSDetectionHead(nn.Module):
    """Simple feature pyramid + torchvision ``FCOSHead``; losses, matching and decoding from torchvision FCOS.

    ``forward`` returns the raw head tensors ``(cls_logits (B, A, K), bbox_regression (B, A, 4),
    bbox_ctrness (B, A, 1))`` with A the points of all levels; :meth:`loss` and :meth:`postprocess` take them.
    """

    def __init__(
        self,
        embed_dim: int,
        num_classes: int,
        patch_size: int = 16,
        channels: int = 256,
        num_convs: int = 4,
        scale_factors: Sequence[float] = (4.0, 2.0, 1.0, 0.5),
        num_prefix_tokens: int = 1,
        center_sampling_radius: float = 1.5,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.6,
        detections_per_img: int = 100,
        topk_candidates: int = 1000,
    ) -> None:
        super().__init__()
        if channels % 32:
            raise ValueError(f"detection head channels must be a multiple of 32 (FCOS GroupNorm(32)), got {channels}")
        self.num_classes, self.num_prefix_tokens = num_classes, num_prefix_tokens
        self.fpn = SimpleFeaturePyramid(embed_dim, channels, scale_factors)
        self.strides = [patch_size / s for s in self.fpn.scale_factors]
        # FCOS: one point per location, "anchor" size = the level's stride (scale ranges are 4x..8x of it).
        self.anchor_generator = AnchorGenerator(tuple((int(s),) for s in self.strides), ((1.0,),) * len(self.strides))
        self.head = FCOSHead(channels, 1, num_classes, num_convs=num_convs)
        convert_group_norms(self.head)
        self.box_coder = det_utils.BoxLinearCoder(normalize_by_size=True)
        # Attributes FCOS.compute_loss / FCOS.postprocess_detections read from ``self``.
        self.center_sampling_radius = center_sampling_radius
        self.score_thresh, self.nms_thresh = score_thresh, nms_thresh
        self.detections_per_img, self.topk_candidates = detections_per_img, topk_candidates

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int], image_size: tuple[int, int]):
        feats = self.fpn(tokens_to_map(tokens, grid, self.num_prefix_tokens))
        out = self.head(feats)
        return out["cls_logits"], out["bbox_regression"], out["bbox_ctrness"]

    def _level_counts(self, image_size: tuple[int, int], patch_grid: tuple[int, int]) -> list[int]:
        return [h * w for h, w in self.fpn.level_sizes(patch_grid)]

    def anchors(
        self, image_size: tuple[int, int], patch_grid: tuple[int, int] | None = None, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """(A, 4) xyxy FCOS points (as degenerate boxes of the level stride) for an input of ``image_size``."""
        patch_grid = patch_grid if patch_grid is not None else self._grid_from(image_size)
        feats = [torch.empty(1, 0, h, w, device=device) for h, w in self.fpn.level_sizes(patch_grid)]
        images = ImageList(torch.empty(1, 0, *image_size, device=device), [tuple(image_size)])
        return self.anchor_generator(images, feats)[0]

    def _split(self, raw, image_size):
        cls_logits, bbox_reg, ctr = raw
        anchors = self.anchors(image_size, device=cls_logits.device).to(cls_logits.dtype)
        if anchors.shape[0] != cls_logits.shape[1]:
            raise ValueError(f"{cls_logits.shape[1]} head outputs but {anchors.shape[0]} points for {image_size}")
        return {"cls_logits": cls_logits, "bbox_regression": bbox_reg, "bbox_ctrness": ctr}, anchors

    def loss(self, raw, targets: list[dict], image_size: tuple[int, int]) -> dict[str, torch.Tensor]:
        """torchvision FCOS losses: focal classification, GIoU regression, centerness BCE."""
        head_outputs, anchors = self._split(raw, image_size)
        head_outputs = {k: v.float() for k, v in head_outputs.items()}
        counts = self._level_counts(image_size, self._grid_from(image_size))
        b = head_outputs["cls_logits"].shape[0]
        dev = anchors.device
        tg = [{"boxes": t["boxes"].to(dev).float(), "labels": t["labels"].to(dev)} for t in targets]
        return FCOS.compute_loss(self, tg, head_outputs, [anchors.float()] * b, counts)

    def _grid_from(self, image_size: tuple[int, int]) -> tuple[int, int]:
        p = self.strides[self.fpn.scale_factors.index(1.0)] if 1.0 in self.fpn.scale_factors else None
        if p is None:
            raise ValueError("the pyramid needs a scale-1 level")
        return int(image_size[0] // p), int(image_size[1] // p)

    @torch.no_grad()
    def postprocess(self, raw, image_size: tuple[int, int]) -> list[dict[str, torch.Tensor]]:
        """Decode points, keep the top candidates per level and run ``batched_nms``: boxes/scores/labels per image."""
        head_outputs, anchors = self._split(raw, image_size)
        counts = self._level_counts(image_size, self._grid_from(image_size))
        b = head_outputs["cls_logits"].shape[0]
        split = {k: list(v.float().split(counts, dim=1)) for k, v in head_outputs.items()}
        split_anchors = [list(anchors.float().split(counts))] * b
        return FCOS.postprocess_detections(self, split, split_anchors, [tuple(image_size)] * b)
