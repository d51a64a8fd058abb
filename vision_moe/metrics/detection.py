"""COCO box AP through pycocotools COCOeval."""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

_logger = logging.getLogger(__name__)


def _np(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


class CocoDetectionMetric:
    """Accumulates detections and scores them with COCOeval (bbox): AP (0.5:0.95), AP50, AP75.

    With ``coco_gt`` (a dataset's ``.coco``) predictions are mapped back to original pixels through each
    target's ``scale`` (sx, sy) and category ids through ``contiguous_to_cat_id``, and scored against the
    original annotations (crowd regions included, as COCOeval expects). Without it, the ground truth is built
    from the targets passed to ``update`` (boxes in the same, transformed pixels).
    """

    def __init__(self, coco_gt: COCO | None = None, contiguous_to_cat_id: Sequence[int] | None = None):
        if coco_gt is not None and contiguous_to_cat_id is None:
            contiguous_to_cat_id = sorted(coco_gt.cats)
        self.coco_gt = coco_gt
        self.contiguous_to_cat_id = list(contiguous_to_cat_id) if contiguous_to_cat_id is not None else None
        self.reset()

    def reset(self) -> None:
        self.dets: list[dict] = []
        self.gts: list[dict] = []
        self.images: dict[int, dict] = {}

    def _cat(self, label: int) -> int:
        return self.contiguous_to_cat_id[label] if self.contiguous_to_cat_id is not None else label + 1

    def update(self, preds: Sequence[dict], targets: Sequence[dict]) -> None:
        """preds: per image dict(boxes (N, 4) xyxy, scores (N,), labels (N,)); targets: dataset target dicts."""
        if len(preds) != len(targets):
            raise ValueError(f"CocoDetectionMetric: {len(preds)} predictions for {len(targets)} targets")
        for p, t in zip(preds, targets):
            image_id = int(t["image_id"])
            boxes = _np(p["boxes"]).astype(np.float64).reshape(-1, 4)
            if self.coco_gt is not None and "scale" in t:
                sx, sy = _np(t["scale"]).astype(np.float64).reshape(2)
                boxes = boxes / np.array([sx, sy, sx, sy])
            for b, s, lab in zip(boxes, _np(p["scores"]).reshape(-1), _np(p["labels"]).reshape(-1)):
                self.dets.append(
                    {
                        "image_id": image_id,
                        "category_id": self._cat(int(lab)),
                        "score": float(s),
                        "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                    }
                )
            if self.coco_gt is None:
                h, w = (int(v) for v in t.get("size", (0, 0)))
                self.images[image_id] = {"id": image_id, "height": h, "width": w}
                for b, lab in zip(_np(t["boxes"]).reshape(-1, 4), _np(t["labels"]).reshape(-1)):
                    bw, bh = float(b[2] - b[0]), float(b[3] - b[1])
                    self.gts.append(
                        {
                            "id": len(self.gts) + 1,
                            "image_id": image_id,
                            "category_id": self._cat(int(lab)),
                            "bbox": [float(b[0]), float(b[1]), bw, bh],
                            "area": bw * bh,
                            "iscrowd": 0,
                        }
                    )
            else:
                self.images[image_id] = {"id": image_id}

    def compute(self) -> dict[str, float]:
        if not self.images:
            return {"AP": float("nan"), "AP50": float("nan"), "AP75": float("nan")}
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its tables
            if self.coco_gt is None:
                n_cls = max([g["category_id"] for g in self.gts + self.dets], default=1)
                if self.contiguous_to_cat_id is not None:
                    cats = [{"id": c} for c in self.contiguous_to_cat_id]
                else:
                    cats = [{"id": c} for c in range(1, n_cls + 1)]
                gt = COCO()
                gt.dataset = {"images": list(self.images.values()), "annotations": self.gts, "categories": cats}
                gt.createIndex()
            else:
                gt = self.coco_gt
            if not self.dets:
                return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
            dt = gt.loadRes([dict(d) for d in self.dets])
            ev = COCOeval(gt, dt, iouType="bbox")
            ev.params.imgIds = sorted(self.images)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        s = ev.stats
        out = {"AP": float(s[0]), "AP50": float(s[1]), "AP75": float(s[2])}
        return {k: (float("nan") if v < 0 else v) for k, v in out.items()}  # -1: no ground truth at all
