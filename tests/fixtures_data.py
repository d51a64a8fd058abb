"""Helpers that write tiny datasets in their real on-disk formats (COCO, ADE20K/VOC, ImageNet folders,
PASCAL-Context multi-task, NYUD-v2 multi-task) for the data tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def rand_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def write_coco(root: Path, rng: np.random.Generator | None = None) -> tuple[Path, Path]:
    """4 images (one without boxes); categories with non-contiguous ids 3, 7, 11; one crowd box; one zero-width
    box. Returns (img_dir, ann_file)."""
    rng = rng or np.random.default_rng(0)
    img_dir = root / "train2017"
    img_dir.mkdir(parents=True, exist_ok=True)
    sizes = [(40, 60), (48, 32), (32, 32), (36, 50)]  # (H, W)
    images = []
    for i, (h, w) in enumerate(sizes):
        name = f"{i + 1:012d}.jpg"
        Image.fromarray(rand_image(rng, h, w)).save(img_dir / name, quality=95)
        images.append({"id": i + 1, "file_name": name, "height": h, "width": w})
    anns = [
        {"id": 1, "image_id": 1, "category_id": 3, "bbox": [2, 3, 10, 12], "area": 120, "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 11, "bbox": [20, 5, 30, 20], "area": 600, "iscrowd": 0},
        {"id": 3, "image_id": 1, "category_id": 7, "bbox": [0, 0, 60, 40], "area": 2400, "iscrowd": 1},
        {"id": 4, "image_id": 2, "category_id": 7, "bbox": [4, 4, 0, 10], "area": 0, "iscrowd": 0},  # no width
        {"id": 5, "image_id": 2, "category_id": 7, "bbox": [5.5, 6.5, 10.0, 20.0], "area": 200, "iscrowd": 0},
        {"id": 6, "image_id": 4, "category_id": 11, "bbox": [1, 1, 8, 8], "area": 64, "iscrowd": 0},
    ]  # image 3 has no boxes
    cats = [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}, {"id": 11, "name": "bird"}]
    ann_dir = root / "annotations"
    ann_dir.mkdir(exist_ok=True)
    ann_file = ann_dir / "instances_train2017.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return img_dir, ann_file


def write_ade20k(root: Path, n: int = 3, rng: np.random.Generator | None = None) -> Path:
    """ADEChallengeData2016 layout: images/{training,validation}/*.jpg + annotations/.../*.png (0 = other)."""
    rng = rng or np.random.default_rng(1)
    for split in ("training", "validation"):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            name = f"ADE_{split[:5]}_{i:08d}"
            Image.fromarray(rand_image(rng, 24, 32)).save(root / "images" / split / f"{name}.jpg")
            lab = rng.integers(0, 5, (24, 32)).astype(np.uint8)
            Image.fromarray(lab).save(root / "annotations" / split / f"{name}.png")
    return root


def write_imagenet_folders(root: Path, classes=("n01440764", "n01443537", "n01484850"), per_class: int = 2) -> Path:
    """ImageNet-style train/<wnid>/*.JPEG folders."""
    rng = np.random.default_rng(2)
    for c in classes:
        d = root / "train" / c
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rand_image(rng, 20, 28)).save(d / f"{c}_{i}.JPEG", format="JPEG")
    return root / "train"
