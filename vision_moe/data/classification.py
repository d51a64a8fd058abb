"""ImageNet-style class folders (``root/<class>/<image>``), indexed with torchvision's ImageFolder logic."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from .common import check_tasks, finalize_sample, read_image


class ImageFolderClassification(torch.utils.data.Dataset):
    """``root/<split>/<class>/<image>`` (``split=None``: ``root/<class>/<image>``).

    Classes are the sorted sub-folder names (as torchvision's ImageFolder); images are read with PIL and
    unreadable ones raise BadSampleError instead of crashing."""

    def __init__(
        self,
        root: str | Path,
        split: str | None = None,
        tasks: Sequence[str] | None = None,
        transform: Any = None,
    ):
        self.root = Path(root) / split if split else Path(root)
        self.split = split
        if not self.root.is_dir():
            raise ValueError(f"{self.root}: class folder root not found")
        self.transform = transform
        self.tasks = check_tasks(tasks, ("classification",), type(self).__name__)
        self.classes, self.class_to_idx = find_classes(str(self.root))
        self.samples = make_dataset(str(self.root), self.class_to_idx, extensions=IMG_EXTENSIONS)
        self.num_classes = {"classification": len(self.classes)}

    def __len__(self) -> int:
        return len(self.samples)

    def load_raw(self, index: int) -> dict[str, Any]:
        path, label = self.samples[index]
        return {"image": read_image(path), "image_id": index, "class_label": label}

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        return finalize_sample(self.load_raw(index), self.transform, self.tasks)
