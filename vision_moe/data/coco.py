"""COCO detection JSON read with pycocotools."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import numbers
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO

from .common import check_tasks, finalize_sample, read_image

_logger = logging.getLogger(__name__)


def _fail(path: Path, what: str) -> ValueError:
    return ValueError(f"{path}: malformed COCO JSON: {what}")


def _check_id(path: Path, where: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise _fail(path, f"{where}: expected an integer, got {value!r}")


def _finite(v: float) -> bool:
    try:
        return math.isfinite(v)
    except OverflowError:  # an integer too large for a float
        return False


def load_coco_json(ann_file: str | Path) -> tuple[COCO, int]:
    """Validate a COCO instances JSON and index it with pycocotools.

    Boxes with non-positive width/height or a NaN / inf value are dropped (returned count); missing ``area`` /
    ``iscrowd`` are filled.
    Raises a one-line ValueError naming the file and what was expected.
    """
    path = Path(ann_file)
    with open(path, "rb") as f:
        raw = f.read()
    try:
        data = json.loads(raw)  # bytes: UTF-8 (or a BOM-marked UTF-16/32) as the JSON standard allows
    except json.JSONDecodeError as e:
        raise _fail(path, f"not valid JSON ({e})") from None
    except UnicodeDecodeError as e:
        bad = f"byte 0x{e.object[e.start]:02x} at offset {e.start}"
        raise _fail(path, f"not UTF-8 text ({bad}); expected a JSON text file") from None
    except RecursionError:
        raise _fail(path, "JSON nested too deeply; expected a COCO instances object") from None
    if not isinstance(data, dict):
        raise _fail(path, f"expected a JSON object at top level, got {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise _fail(path, f"missing top-level key {key!r}; expected 'images', 'annotations', 'categories'")
        if not isinstance(data[key], list):
            raise _fail(path, f"{key!r} must be a list")
    image_ids: dict[int, int] = {}  # id -> index in 'images'
    for i, img in enumerate(data["images"]):
        for key in ("id", "file_name"):
            if not isinstance(img, dict) or key not in img:
                raise _fail(path, f"images[{i}] missing key {key!r}; expected 'id' and 'file_name'")
        _check_id(path, f"images[{i}].id", img["id"])
        if not isinstance(img["file_name"], str) or not img["file_name"]:
            raise _fail(path, f"images[{i}].file_name = {img['file_name']!r}; expected a non-empty string")
        if img["id"] in image_ids:
            first = image_ids[img["id"]]
            raise _fail(path, f"images[{i}].id = {img['id']} repeats images[{first}].id; expected unique image ids")
        image_ids[img["id"]] = i
    if not data["categories"]:  # a detector with no classes would train on nothing but background
        raise _fail(path, "'categories' is empty; expected at least one category")
    cat_ids: dict[int, int] = {}
    for i, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or "id" not in cat:
            raise _fail(path, f"categories[{i}] missing key 'id'")
        _check_id(path, f"categories[{i}].id", cat["id"])
        if cat["id"] in cat_ids:
            first = cat_ids[cat["id"]]
            raise _fail(path, f"categories[{i}].id = {cat['id']} repeats categories[{first}].id; expected unique ids")
        cat_ids[cat["id"]] = i
    kept, dropped = [], 0
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict):
            raise _fail(path, f"annotations[{i}] is not an object")
        for key in ("image_id", "category_id", "bbox"):
            if key not in ann:
                raise _fail(path, f"annotations[{i}] missing key {key!r}; expected 'image_id', 'category_id', 'bbox'")
        for key in ("image_id", "category_id", "id"):
            if key in ann:
                _check_id(path, f"annotations[{i}].{key}", ann[key])
        bbox = ann["bbox"]
        if (
            not isinstance(bbox, list)
            or len(bbox) != 4
            or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in bbox)
        ):
            raise _fail(path, f"annotations[{i}].bbox = {bbox!r}; expected 4 numbers [x, y, width, height]")
        if ann["image_id"] not in image_ids:
            raise _fail(path, f"annotations[{i}].image_id = {ann['image_id']!r} is not in 'images'")
        if ann["category_id"] not in cat_ids:
            raise _fail(path, f"annotations[{i}].category_id = {ann['category_id']!r} is not in 'categories'")
        if not all(_finite(v) for v in bbox) or bbox[2] <= 0 or bbox[3] <= 0:
            dropped += 1  # empty, or NaN / inf (Python's json reads NaN and Infinity): no usable box
            continue
        ann = dict(ann)
        ann.setdefault("id", i + 1)
        ann.setdefault("iscrowd", 0)
        ann.setdefault("area", float(bbox[2] * bbox[3]))
        kept.append(ann)
    if len({a["id"] for a in kept}) != len(kept):
        raise _fail(path, "duplicate annotation 'id' values; expected unique ids")
    data = dict(data, annotations=kept)
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.createIndex()
    if dropped:
        _logger.warning("%s: dropped %d boxes with non-positive width or height or a NaN / inf value", path, dropped)
    return coco, dropped


class CocoDetection(torch.utils.data.Dataset):
    """COCO-format detection: ``root/<split>/<file_name>`` + ``root/annotations/instances_<split>.json``
    (``ann_file`` / ``img_dir`` override either path).

    Crowd regions are left out of the targets (COCOeval still ignores matches to them through ``.coco``);
    images without boxes are kept; category ids map to contiguous labels 0..K-1 in sorted id order.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train2017",
        tasks: Sequence[str] | None = None,
        transform: Any = None,
        ann_file: str | Path | None = None,
        img_dir: str | Path | None = None,
    ):
        root = Path(root)
        self.split = split
        self.img_dir = Path(img_dir) if img_dir is not None else root / split
        self.ann_file = Path(ann_file) if ann_file is not None else root / "annotations" / f"instances_{split}.json"
        if not self.ann_file.exists():
            raise ValueError(f"{self.ann_file}: COCO annotation file not found")
        self.transform = transform
        self.tasks = check_tasks(tasks, ("detection",), type(self).__name__)
        self.coco, self.num_dropped_boxes = load_coco_json(self.ann_file)
        self.ids = sorted(self.coco.imgs)
        self.contiguous_to_cat_id = sorted(self.coco.cats)
        self.cat_id_to_contiguous = {c: i for i, c in enumerate(self.contiguous_to_cat_id)}
        self.class_names = [self.coco.cats[c].get("name", str(c)) for c in self.contiguous_to_cat_id]
        self.num_classes = {"detection": len(self.contiguous_to_cat_id)}
        self.num_crowd = sum(int(a.get("iscrowd", 0)) for a in self.coco.anns.values())

    def __len__(self) -> int:
        return len(self.ids)

    def load_raw(self, index: int) -> dict[str, Any]:
        """The untransformed sample: image (H, W, 3) uint8, boxes (N, 4) xyxy, labels (N,)."""
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        path = self.img_dir / info["file_name"]
        image = read_image(path)
        anns = [a for a in self.coco.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
        boxes = np.array([a["bbox"] for a in anns], np.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
        labels = np.array([self.cat_id_to_contiguous[a["category_id"]] for a in anns], np.int64)
        return {"image": image, "image_id": int(image_id), "boxes": boxes, "labels": labels}

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        return finalize_sample(self.load_raw(index), self.transform, self.tasks)
