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


def _pascal_part_anno(h: int, w: int, with_person: bool) -> np.ndarray:
    """A Pascal-Part ``anno`` struct: one person (head + torso + left upper arm) and one dog without parts."""
    import scipy.io  # noqa: F401  (only needed by the caller's savemat)

    obj_dtype = [("class", "O"), ("class_ind", "O"), ("mask", "O"), ("parts", "O")]
    part_dtype = [("part_name", "O"), ("mask", "O")]
    objs = np.empty((1, 2 if with_person else 1), dtype=obj_dtype)
    dog = np.zeros((h, w), np.uint8)
    dog[-4:, -6:] = 1
    objs[0, 0] = ("dog", np.array([[12]], np.uint8), dog, np.zeros((0, 0)))
    if with_person:
        parts = np.empty((1, 3), dtype=part_dtype)
        for k, (name, rows) in enumerate([("head", slice(0, 3)), ("torso", slice(3, 8)), ("luarm", slice(8, 10))]):
            m = np.zeros((h, w), np.uint8)
            m[rows, 2:6] = 1
            parts[0, k] = (name, m)
        person = np.zeros((h, w), np.uint8)
        person[0:10, 2:6] = 1
        objs[0, 1] = ("person", np.array([[15]], np.uint8), person, parts)
    anno = np.empty((1, 1), dtype=[("imname", "O"), ("objects", "O")])
    anno[0, 0] = ("x", objs)
    return anno


def write_pascal_context(root: Path, ids=("2008_000002", "2008_000003"), h: int = 16, w: int = 20) -> Path:
    """PASCALContext folder in the ASTMT layout; the second image has no person."""
    import scipy.io

    rng = np.random.default_rng(3)
    for d in (
        "JPEGImages",
        "semseg/pascal-context",
        "human_parts",
        "sal_distill",
        "normals_distill",
        "pascal-context/trainval",
        "ImageSets/Context",
    ):
        (root / d).mkdir(parents=True, exist_ok=True)
    for k, i in enumerate(ids):
        Image.fromarray(rand_image(rng, h, w)).save(root / "JPEGImages" / f"{i}.jpg")
        sem = np.zeros((h, w), np.uint8)
        sem[0:10, 2:6] = 15
        sem[-1, :] = 255
        Image.fromarray(sem).save(root / "semseg" / "pascal-context" / f"{i}.png")
        scipy.io.savemat(root / "human_parts" / f"{i}.mat", {"anno": _pascal_part_anno(h, w, with_person=k == 0)})
        sal = np.zeros((h, w), np.uint8)
        sal[0:10, 2:6] = 200
        Image.fromarray(sal).save(root / "sal_distill" / f"{i}.png")
        nrm = np.zeros((h, w, 3), np.uint8)
        nrm[...] = (128, 128, 255)  # facing the camera
        nrm[:, : w // 2] = (255, 128, 128)  # pointing right
        Image.fromarray(nrm).save(root / "normals_distill" / f"{i}.png")
        label_map = np.full((h, w), 9, np.uint16)
        label_map[0:10, 2:6] = 284
        scipy.io.savemat(root / "pascal-context" / "trainval" / f"{i}.mat", {"LabelMap": label_map})
    (root / "ImageSets" / "Context" / "train.txt").write_text("\n".join(ids) + "\n")
    return root


def write_nyud(root: Path, ids=("0001", "0002"), h: int = 12, w: int = 16) -> Path:
    """NYUD_MT folder (ATRC/InvPT layout): .npy depth/normals/edges, 0 = void in segmentation."""
    rng = np.random.default_rng(4)
    for d in ("images", "segmentation", "depth", "normals", "edge", "gt_sets"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for i in ids:
        Image.fromarray(rand_image(rng, h, w)).save(root / "images" / f"{i}.jpg")
        seg = np.ones((h, w), np.uint8) * 5
        seg[0, :] = 0
        seg[5:, :] = 40
        Image.fromarray(seg).save(root / "segmentation" / f"{i}.png")
        np.save(root / "depth" / f"{i}.npy", np.linspace(0.5, 4.0, h * w, dtype=np.float32).reshape(h, w))
        n = np.zeros((h, w, 3), np.float32)
        n[..., 1] = -1.0
        np.save(root / "normals" / f"{i}.npy", n)
        e = np.zeros((h, w), np.float32)
        e[5, :] = 1
        np.save(root / "edge" / f"{i}.npy", e)
    (root / "gt_sets" / "val.txt").write_text("\n".join(ids) + "\n")
    return root
