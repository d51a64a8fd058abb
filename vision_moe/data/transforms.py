"""albumentations pipelines that move image, boxes and every dense map together.

Dense maps all go through albumentations as masks (nearest-neighbour resampling, so labels, binary maps,
invalid-zero depth and unit normals are never blended). Normals are passed as a mask rather than an extra
image so that colour jitter and normalisation never touch them; their x component is negated here when
the horizontal flip fired (albumentations does not know what a normal is).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch

from .common import DENSE_TASKS, IGNORE_INDEX, TASKS

_LABEL_MAPS = ("semseg", "human_parts")
DEFAULT_MEAN = (0.5, 0.5, 0.5)
DEFAULT_STD = (0.5, 0.5, 0.5)


def _hw(img_size: int | Sequence[int] | None) -> tuple[int, int] | None:
    if img_size is None:
        return None
    if isinstance(img_size, int):
        return (img_size, img_size)
    if len(img_size) != 2:
        raise ValueError(f"img_size: expected an int or (H, W), got {img_size!r}")
    return (int(img_size[0]), int(img_size[1]))


def class_from_mask(class_mask: np.ndarray, valid: np.ndarray, default: int) -> int:
    """The class covering the most pixels of ``class_mask`` (values 1..K are classes 0..K-1; 0 and 255 are not
    counted) inside ``valid``; ``default`` when no class pixel is left (a crop that cut every object off)."""
    m = np.asarray(class_mask)[np.asarray(valid, bool)]
    m = m[(m > 0) & (m != IGNORE_INDEX)].astype(np.int64) - 1
    return int(np.bincount(m).argmax()) if m.size else int(default)


class MultiTaskTransform:
    """Callable: raw numpy sample dict -> (image (3, H, W) float32, target dict of tensors)."""

    def __init__(self, compose: A.Compose, tasks: Sequence[str], deterministic_scale: bool):
        self.compose = compose
        self.tasks = tuple(tasks)
        self.deterministic_scale = deterministic_scale

    def __repr__(self) -> str:
        return f"MultiTaskTransform(tasks={self.tasks}, {self.compose!r})"

    def __call__(self, raw: dict[str, Any]) -> tuple[torch.Tensor, dict]:
        image = raw["image"]
        h0, w0 = image.shape[:2]
        kwargs: dict[str, Any] = {"image": image, "valid": np.ones((h0, w0), np.uint8)}
        dense = [k for k in DENSE_TASKS if k in self.tasks and k in raw]
        for k in dense:
            kwargs[k] = raw[k]
        # the image class is defined by visible pixels (built-in data): a training crop re-derives it; evaluation
        # keeps the stored label (its resizing must not flip near-ties)
        relabel = "classification" in self.tasks and "class_mask" in raw and not self.deterministic_scale
        if relabel:
            kwargs["class_mask"] = raw["class_mask"]
        has_boxes = "detection" in self.tasks and "boxes" in raw
        if has_boxes:
            boxes = np.asarray(raw["boxes"], np.float32).reshape(-1, 4).copy()
            boxes[:, 0::2] = boxes[:, 0::2].clip(0, w0)
            boxes[:, 1::2] = boxes[:, 1::2].clip(0, h0)
            keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            kwargs["bboxes"] = boxes[keep]
            kwargs["labels"] = np.asarray(raw["labels"], np.int64).reshape(-1)[keep]
        else:
            kwargs["bboxes"] = np.zeros((0, 4), np.float32)
            kwargs["labels"] = np.zeros((0,), np.int64)
        out = self.compose(**kwargs)
        flipped = any(name == "HorizontalFlip" for name, _ in out.get("applied_transforms", []))

        img = torch.from_numpy(np.ascontiguousarray(out["image"].transpose(2, 0, 1))).float()  # (3, H, W)
        pad = torch.from_numpy(out["valid"] == 0)  # (H, W) True where padding was added
        target: dict[str, Any] = {"image_id": int(raw.get("image_id", -1))}
        if "classification" in self.tasks and "class_label" in raw:
            label = int(raw["class_label"])
            if relabel:
                label = class_from_mask(out["class_mask"], out["valid"] > 0, label)
            target["class_label"] = torch.tensor(label, dtype=torch.int64)
        if has_boxes:
            target["boxes"] = torch.as_tensor(np.asarray(out["bboxes"], np.float32).reshape(-1, 4))
            target["labels"] = torch.as_tensor(np.asarray(out["labels"], np.int64).reshape(-1))
            target["orig_size"] = torch.tensor([h0, w0], dtype=torch.int64)
            if self.deterministic_scale:
                # (sx, sy): transformed / original pixels, to map predicted boxes back for COCOeval
                target["scale"] = torch.tensor(self._scale(out, h0, w0), dtype=torch.float32)
        for k in dense:
            m = out[k]
            if k in _LABEL_MAPS:
                t = torch.from_numpy(np.ascontiguousarray(m).astype(np.int64))
                t[pad] = IGNORE_INDEX
            elif k == "normals":
                n = np.ascontiguousarray(m, dtype=np.float32).copy()
                if flipped:
                    n[..., 0] = -n[..., 0]
                t = torch.from_numpy(n.transpose(2, 0, 1).copy())  # (3, H, W)
                t[:, pad] = 0.0
            else:  # saliency, edges, depth: (1, H, W) float
                t = torch.from_numpy(np.ascontiguousarray(m, dtype=np.float32)[None].copy())
                t[:, pad] = 0.0
            target[k] = t
        return img, target

    @staticmethod
    def _scale(out: dict, h0: int, w0: int) -> tuple[float, float]:
        valid = out["valid"]
        rows = int((valid.max(axis=1) > 0).sum())
        cols = int((valid.max(axis=0) > 0).sum())
        return (cols / w0, rows / h0)


def build_transforms(
    train: bool,
    img_size: int | Sequence[int] | None,
    mean: Sequence[float] = DEFAULT_MEAN,
    std: Sequence[float] = DEFAULT_STD,
    tasks: Sequence[str] = TASKS,
    scale: tuple[float, float] = (0.5, 1.0),
    hflip: float = 0.5,
    color_jitter: float = 0.8,
    seed: int | None = None,
) -> MultiTaskTransform:
    """albumentations pipeline for image + boxes + masks.

    train: RandomResizedCrop(img_size, scale) -> HorizontalFlip -> ColorJitter -> Normalize(mean, std).
    eval: LongestMaxSize(max(img_size)) -> PadIfNeeded(img_size, top-left, ignore/zero fill) -> Normalize.
    ``img_size=None`` keeps the native size (eval) and only normalises.
    """
    for t in tasks:
        if t not in TASKS:
            raise ValueError(f"build_transforms: unknown task {t!r}; expected one of {list(TASKS)}")
    hw = _hw(img_size)
    ops: list[A.BasicTransform] = []
    if train:
        if hw is None:
            raise ValueError("build_transforms: train=True needs an img_size")
        ops += [
            A.RandomResizedCrop(size=hw, scale=scale, ratio=(3 / 4, 4 / 3), mask_interpolation=cv2.INTER_NEAREST),
            A.HorizontalFlip(p=hflip),
            A.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.05, p=color_jitter),
        ]
    elif hw is not None:
        ops += [
            A.LongestMaxSize(max_size=max(hw), mask_interpolation=cv2.INTER_NEAREST),
            A.PadIfNeeded(
                min_height=hw[0],
                min_width=hw[1],
                position="top_left",
                border_mode=cv2.BORDER_CONSTANT,
                fill=0,
                fill_mask=0,
            ),
        ]
    ops.append(A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0))
    additional = {k: "mask" for k in (*DENSE_TASKS, "valid", "class_mask")}
    with warnings.catch_warnings():  # "no transform to process bboxes" when eval keeps the native size
        warnings.simplefilter("ignore", UserWarning)
        compose = A.Compose(
            ops,
            bbox_params=A.BboxParams(
                format="pascal_voc", label_fields=["labels"], min_area=1.0, min_visibility=0.2, clip=True
            ),
            additional_targets=additional,
            save_applied_params=True,
            seed=seed,
            strict=True,
        )
    return MultiTaskTransform(compose, tasks, deterministic_scale=not train)
