"""Semantic segmentation folders: ADE20K (ADEChallengeData2016) and PASCAL VOC layouts."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .common import IGNORE_INDEX, BadSampleError, check_tasks, finalize_sample, read_image, read_label_png


class PairedSegmentationFolders(torch.utils.data.Dataset):
    """Images and label PNGs paired by file stem: ``img_dir/<stem><img_suffix>``, ``ann_dir/<stem><ann_suffix>``.

    ``reduce_zero_label`` applies the ADE20K convention (0 = "other" -> 255 ignore, 1..150 -> 0..149).
    ``split_file`` (one stem a line, as VOC's ImageSets) selects and orders the samples.
    """

    def __init__(
        self,
        img_dir: str | Path,
        ann_dir: str | Path,
        num_classes: int,
        transform: Any = None,
        reduce_zero_label: bool = False,
        img_suffix: str = ".jpg",
        ann_suffix: str = ".png",
        split_file: str | Path | None = None,
        tasks: Sequence[str] | None = None,
    ):
        self.img_dir, self.ann_dir = Path(img_dir), Path(ann_dir)
        self.transform = transform
        self.tasks = check_tasks(tasks, ("semseg",), type(self).__name__)
        self.reduce_zero_label = reduce_zero_label
        self.num_classes = {"semseg": int(num_classes)}
        if not self.img_dir.is_dir():
            raise ValueError(f"{self.img_dir}: image folder not found")
        if split_file is not None:
            stems = [s.strip() for s in Path(split_file).read_text().splitlines() if s.strip()]
        else:
            stems = sorted(p.name[: -len(img_suffix)] for p in self.img_dir.iterdir() if p.name.endswith(img_suffix))
        if not stems:
            raise ValueError(f"{self.img_dir}: no '*{img_suffix}' images found")
        self.samples = [(self.img_dir / f"{s}{img_suffix}", self.ann_dir / f"{s}{ann_suffix}") for s in stems]
        missing = [a for _, a in self.samples if not a.exists()]
        if missing:
            raise ValueError(f"{missing[0]}: annotation not found ({len(missing)} of {len(stems)} missing)")

    def __len__(self) -> int:
        return len(self.samples)

    def load_raw(self, index: int) -> dict[str, Any]:
        img_path, ann_path = self.samples[index]
        image = read_image(img_path)
        label = read_label_png(ann_path, image.shape[:2])
        if self.reduce_zero_label:
            label = np.where(label == 0, IGNORE_INDEX, label - 1)
        k = self.num_classes["semseg"]
        bad = (label >= k) & (label != IGNORE_INDEX)
        if bad.any():
            raise BadSampleError(ann_path, f"label {int(label[bad].max())} outside 0..{k - 1} (255 = ignore)")
        return {"image": image, "image_id": index, "semseg": label}

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        return finalize_sample(self.load_raw(index), self.transform, self.tasks)


class SegmentationFolder(PairedSegmentationFolders):
    """ADE20K-style folders: ``root/images/<split>/*.jpg`` + ``root/annotations/<split>/*.png``.

    Defaults are ADEChallengeData2016's: 150 classes, label 0 ("other") ignored and the rest shifted down.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "training",
        tasks: Sequence[str] | None = None,
        transform: Any = None,
        num_classes: int = 150,
        reduce_zero_label: bool = True,
        img_suffix: str = ".jpg",
        ann_suffix: str = ".png",
    ):
        root = Path(root)
        self.split = split
        if not (root / "images" / split).is_dir():
            found = sorted(p.name for p in (root / "images").iterdir()) if (root / "images").is_dir() else []
            raise ValueError(f"{root / 'images' / split}: split folder not found; found splits {found}")
        super().__init__(
            root / "images" / split,
            root / "annotations" / split,
            num_classes,
            transform,
            reduce_zero_label,
            img_suffix,
            ann_suffix,
            tasks=tasks,
        )


def ade20k(root: str | Path, split: str = "training", transform: Any = None) -> SegmentationFolder:
    """ADEChallengeData2016 (``split`` 'training' or 'validation'), 150 classes, 0 ignored."""
    if split not in ("training", "validation"):
        raise ValueError(f"ade20k: unknown split {split!r}; expected 'training' or 'validation'")
    return SegmentationFolder(root, split, transform=transform)


def voc_segmentation(root: str | Path, split: str = "train", transform: Any = None) -> PairedSegmentationFolders:
    """VOC2012: ``JPEGImages`` + palette PNGs in ``SegmentationClass`` (255 = boundary, ignored), 21 classes,
    samples listed in ``ImageSets/Segmentation/<split>.txt``."""
    root = Path(root)
    split_file = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not split_file.exists():
        raise ValueError(f"{split_file}: split list not found")
    return PairedSegmentationFolders(
        root / "JPEGImages", root / "SegmentationClass", 21, transform, split_file=split_file
    )
