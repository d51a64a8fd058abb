"""Metrics against known values: perfect, all wrong, and small hand-computed cases."""

import math

import numpy as np
import pytest
import torch
from fixtures_data import write_coco

from vision_moe.data import CocoDetection, build_transforms
from vision_moe.metrics import (
    ClassificationMetric,
    CocoDetectionMetric,
    DepthMetric,
    EdgeMetric,
    NormalsMetric,
    SaliencyMetric,
    SegmentationMetric,
    multi_task_delta,
)


def test_classification_topk():
    m = ClassificationMetric()
    logits = torch.tensor([[0.1, 0.9, 0, 0, 0, 0], [0.9, 0.1, 0.5, 0.4, 0.3, 0.2], [1, 2, 3, 4, 5, 6.0]])
    m.update(logits, torch.tensor([1, 2, 0]))
    # sample 0 top-1 hit; sample 1 label 2 is 2nd -> top-5 hit; sample 2 label 0 is last of 6 -> miss
    assert m.compute() == {"top1": pytest.approx(1 / 3), "top5": pytest.approx(2 / 3)}
    m.reset()
    m.update(torch.eye(4), torch.arange(4))
    assert m.compute()["top1"] == 1.0 and m.compute()["top5"] == 1.0  # fewer than 5 classes: top-5 = all
    with pytest.raises(ValueError, match="expected logits"):
        m.update(torch.zeros(3), torch.zeros(3))


def test_segmentation_hand_computed():
    m = SegmentationMetric(3)
    target = torch.tensor([[[0, 0, 1, 1], [2, 2, 255, 255]]])
    pred = torch.tensor([[[0, 1, 1, 1], [2, 0, 0, 1]]])
    m.update(pred, target)
    r = m.compute()
    # class 0: tp 1, union 3 (t0={0,1}, p0={0,5}); class 1: tp 2, union 3; class 2: tp 1, union 2
    assert r["per_class_iou"] == pytest.approx([1 / 3, 2 / 3, 1 / 2])
    assert r["mIoU"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert r["pixel_acc"] == pytest.approx(4 / 6)
    m.reset()
    m.update(torch.nn.functional.one_hot(target.clamp(max=2), 3).permute(0, 3, 1, 2).float(), target)  # logits
    assert m.compute()["mIoU"] == 1.0
    m.reset()
    m.update((target + 1) % 3, target)
    assert m.compute()["mIoU"] == 0.0 and m.compute()["pixel_acc"] == 0.0


def test_saliency_maxf():
    m = SaliencyMetric()
    t = torch.zeros(2, 1, 4, 4)
    t[:, :, :2] = 1
    m.update(t.clone(), t)
    assert m.compute()["maxF"] == pytest.approx(1.0)
    m.reset()
    m.update(1 - t, t)
    assert m.compute()["maxF"] == pytest.approx(0.0)
    m.reset()
    p = torch.zeros(1, 1, 4, 4)
    p[:, :, :1] = 1.0  # half of the positives, no false positives: P = 1, R = 0.5
    m.update(p, t[:1])
    assert m.compute()["maxF"] == pytest.approx(1.3 * 0.5 / (0.3 + 0.5))


def test_normals_angle():
    m = NormalsMetric()
    t = torch.zeros(1, 3, 2, 2)
    t[:, 2] = 1
    t[0, :, 1, 1] = 0  # invalid pixel
    p = torch.zeros(1, 3, 2, 2)
    p[:, 2] = 1
    p[0, :, 0, 0] = torch.tensor([1.0, 0, 0])  # 90 degrees off
    p[0, :, 1, 1] = torch.tensor([0.0, 0, -1])  # ignored (target invalid)
    m.update(p * 3.0, t)  # prediction scale does not matter
    r = m.compute()
    assert r["mean_angle"] == pytest.approx(30.0, abs=1e-3)
    assert r["median_angle"] == pytest.approx(0.0, abs=1e-2) and r["within_11.25"] == pytest.approx(2 / 3)


def test_depth_rmse():
    m = DepthMetric()
    t = torch.tensor([[[[1.0, 2.0], [0.0, 4.0]]]])
    m.update(torch.tensor([[[[1.0, 4.0], [9.0, 1.0]]]]), t)  # errors 0, 2, (invalid), 3
    assert m.compute()["rmse"] == pytest.approx(math.sqrt((0 + 4 + 9) / 3))
    assert m.compute()["abs_rel"] == pytest.approx((0 + 1 + 0.75) / 3)
    m.reset()
    m.update(t, t)
    assert m.compute()["rmse"] == 0.0


def test_edge_f():
    m = EdgeMetric()
    t = torch.zeros(1, 1, 20, 20)
    t[0, 0, 10, 2:18] = 1
    m.update(t.clone(), t)
    assert m.compute()["odsF"] == pytest.approx(1.0)
    shifted = torch.roll(t, 1, dims=2)  # 1 px off is within the (1 px minimum) tolerance
    m.reset()
    m.update(shifted, t)
    assert m.compute()["odsF"] == pytest.approx(1.0)
    m.reset()
    m.update(torch.roll(t, 6, dims=2), t)  # far away: nothing matches
    assert m.compute()["odsF"] == pytest.approx(0.0)
    m.reset()
    half = t.clone()
    half[0, 0, 10, 10:] = 0  # 8 of 16 GT pixels predicted, all correct: P = 1, R = 8/16 (1 px tolerance: 9/16)
    m.update(half, t)
    r = m.compute()
    assert r["precision"] == 1.0 and r["recall"] == pytest.approx(9 / 16)


def test_multi_task_delta():
    res = {"semseg": 0.55, "depth": 0.6}
    st = {"semseg": 0.5, "depth": 0.5}
    # semseg +10 %, depth (lower is better) -20 % -> mean -5 %
    assert multi_task_delta(res, st, {"semseg": True, "depth": False}) == pytest.approx(-5.0)
    assert multi_task_delta(st, st, {"semseg": True, "depth": False}) == 0.0
    with pytest.raises(KeyError, match="depth"):
        multi_task_delta({"semseg": 1.0}, st, {"semseg": True, "depth": False})


def _preds_from_targets(targets, shift=0.0):
    out = []
    for t in targets:
        b = t["boxes"].clone()
        b[:, [0, 2]] += shift
        out.append({"boxes": b, "scores": torch.ones(len(b)), "labels": t["labels"]})
    return out


def test_coco_metric_on_targets_perfect_and_shifted():
    targets = [
        {"image_id": 1, "boxes": torch.tensor([[2.0, 2, 22, 22], [30, 30, 50, 60]]), "labels": torch.tensor([0, 1])},
        {"image_id": 2, "boxes": torch.tensor([[5.0, 5, 45, 25]]), "labels": torch.tensor([1])},
        {"image_id": 3, "boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},
    ]
    m = CocoDetectionMetric()
    m.update(_preds_from_targets(targets), targets)
    r = m.compute()
    assert r["AP"] == pytest.approx(1.0) and r["AP50"] == pytest.approx(1.0)
    m.reset()
    m.update(_preds_from_targets(targets, shift=4.0), targets)
    r2 = m.compute()
    assert r2["AP"] < 0.9 and r2["AP50"] == pytest.approx(1.0)  # IoU >= 0.5 still, stricter IoUs fail
    m.reset()
    m.update(_preds_from_targets(targets, shift=25.0), targets)
    assert m.compute()["AP50"] < 0.5
    m.reset()
    m.update([{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0)}] * 3, targets)
    assert m.compute()["AP"] == 0.0


def test_coco_metric_against_dataset_annotations(tmp_path):
    img_dir, ann = write_coco(tmp_path)
    ds = CocoDetection(img_dir.parent, "train2017", transform=build_transforms(False, 32, tasks=("detection",)))
    samples = [ds[i] for i in range(len(ds))]
    targets = [t for _, t in samples]
    m = CocoDetectionMetric(ds.coco, ds.contiguous_to_cat_id)
    m.update(_preds_from_targets(targets), targets)  # resized boxes, mapped back through target['scale']
    r = m.compute()
    assert r["AP"] == pytest.approx(1.0, abs=0.02)
    m.reset()
    m.update(_preds_from_targets(targets, shift=3.0), targets)
    assert m.compute()["AP"] < r["AP"]
    assert np.isfinite(m.compute()["AP50"])
