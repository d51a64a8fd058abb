"""Accumulating metrics for classification and dense pixel tasks (update(...) then compute() -> dict)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage


def _np(x: torch.Tensor | np.ndarray) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


class ClassificationMetric:
    """Top-k accuracy from logits (B, C) and labels (B,)."""

    def __init__(self, topk: Sequence[int] = (1, 5)):
        self.topk = tuple(topk)
        self.reset()

    def reset(self) -> None:
        self.correct = {k: 0 for k in self.topk}
        self.count = 0

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        logits, labels = torch.as_tensor(logits).detach().cpu(), torch.as_tensor(labels).detach().cpu()
        if logits.dim() != 2 or labels.shape != logits.shape[:1]:
            raise ValueError(
                f"ClassificationMetric: expected logits (B, C) and labels (B,), got "
                f"{tuple(logits.shape)} and {tuple(labels.shape)}"
            )
        kmax = min(max(self.topk), logits.shape[1])
        top = logits.topk(kmax, dim=1).indices  # (B, kmax)
        hit = top == labels[:, None]
        for k in self.topk:
            self.correct[k] += int(hit[:, :k].any(dim=1).sum())
        self.count += len(labels)

    def compute(self) -> dict[str, float]:
        return {f"top{k}": self.correct[k] / max(self.count, 1) for k in self.topk}


class SegmentationMetric:
    """Confusion-matrix mIoU and pixel accuracy; ``pred`` is labels (B, H, W) or logits (B, C, H, W)."""

    def __init__(self, num_classes: int, ignore_index: int = 255):
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.reset()

    def reset(self) -> None:
        self.confusion = np.zeros((self.num_classes, self.num_classes), np.int64)  # rows: target, cols: pred

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        pred = torch.as_tensor(pred)
        if pred.dim() == 4:
            pred = pred.argmax(1)
        p, t = _np(pred).reshape(-1).astype(np.int64), _np(target).reshape(-1).astype(np.int64)
        if p.shape != t.shape:
            raise ValueError(
                f"SegmentationMetric: prediction {tuple(pred.shape)} and target {tuple(np.shape(target))} do not match"
            )
        keep = t != self.ignore_index
        p, t = p[keep], t[keep]
        if t.size and (t.max() >= self.num_classes or t.min() < 0):
            raise ValueError(f"SegmentationMetric: target label {t.max()} outside 0..{self.num_classes - 1}")
        p = np.clip(p, 0, self.num_classes - 1)
        self.confusion += np.bincount(t * self.num_classes + p, minlength=self.num_classes**2).reshape(
            self.num_classes, self.num_classes
        )

    def compute(self) -> dict[str, float | list[float]]:
        c = self.confusion.astype(np.float64)
        tp = np.diag(c)
        union = c.sum(0) + c.sum(1) - tp
        present = union > 0  # classes absent from both target and prediction do not count
        iou = np.where(present, tp / np.maximum(union, 1), np.nan)
        return {
            "mIoU": float(np.nanmean(iou)) if present.any() else float("nan"),
            "pixel_acc": float(tp.sum() / max(c.sum(), 1)),
            "per_class_iou": [float(x) for x in iou],
        }


class SaliencyMetric:
    """Max F-measure (beta^2 = 0.3) over fixed thresholds, precision/recall averaged over images, as in ASTMT."""

    def __init__(self, thresholds: Sequence[float] | None = None, beta2: float = 0.3):
        self.thresholds = np.asarray(thresholds if thresholds is not None else np.linspace(0.05, 0.95, 19))
        self.beta2 = beta2
        self.reset()

    def reset(self) -> None:
        self.prec = np.zeros(len(self.thresholds))
        self.rec = np.zeros(len(self.thresholds))
        self.n = 0

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """pred: probabilities (B, 1, H, W) in [0, 1]; target: (B, 1, H, W) in {0, 1}."""
        p, t = _np(pred), _np(target) > 0.5
        p = p.reshape(len(p), -1)
        t = t.reshape(len(t), -1)
        for pi, ti in zip(p, t):
            pb = pi[None, :] >= self.thresholds[:, None]  # (T, P)
            tp = (pb & ti[None]).sum(1)
            self.prec += tp / np.maximum(pb.sum(1), 1) if ti.any() else (pb.sum(1) == 0).astype(float)
            self.rec += tp / ti.sum() if ti.any() else 1.0
            self.n += 1

    def compute(self) -> dict[str, float]:
        prec, rec = self.prec / max(self.n, 1), self.rec / max(self.n, 1)
        f = (1 + self.beta2) * prec * rec / np.maximum(self.beta2 * prec + rec, 1e-12)
        i = int(np.argmax(f))
        return {"maxF": float(f[i]), "threshold": float(self.thresholds[i])}


class NormalsMetric:
    """Angular error in degrees between predicted and target normals (B, 3, H, W); all-zero targets are invalid."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.errors: list[np.ndarray] = []

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        p, t = torch.as_tensor(pred).detach().float().cpu(), torch.as_tensor(target).detach().float().cpu()
        valid = t.norm(dim=1) > 1e-6  # (B, H, W)
        p = torch.nn.functional.normalize(p, dim=1)
        t = torch.nn.functional.normalize(t, dim=1)
        cos = (p * t).sum(1).clamp(-1, 1)
        self.errors.append(torch.rad2deg(torch.acos(cos))[valid].numpy())

    def compute(self) -> dict[str, float]:
        e = np.concatenate(self.errors) if self.errors else np.zeros(0)
        if e.size == 0:
            return {"mean_angle": float("nan"), "median_angle": float("nan"), "within_11.25": float("nan")}
        return {
            "mean_angle": float(e.mean()),
            "median_angle": float(np.median(e)),
            "within_11.25": float((e < 11.25).mean()),
        }


class DepthMetric:
    """Depth RMSE (and abs. relative error) over valid pixels (target > 0), pooled over the dataset."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.sq = 0.0
        self.rel = 0.0
        self.n = 0

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        p, t = _np(pred).astype(np.float64), _np(target).astype(np.float64)
        valid = t > 0
        d = p[valid] - t[valid]
        self.sq += float((d**2).sum())
        self.rel += float((np.abs(d) / t[valid]).sum())
        self.n += int(valid.sum())

    def compute(self) -> dict[str, float]:
        if self.n == 0:
            return {"rmse": float("nan"), "abs_rel": float("nan")}
        return {"rmse": float(np.sqrt(self.sq / self.n)), "abs_rel": self.rel / self.n}


class EdgeMetric:
    """Edge F-measure at a fixed threshold set; ODS = best threshold for the whole dataset.

    Matching follows the BSDS idea with a distance tolerance (``tolerance`` x image diagonal, 0.0075 as in
    PASCAL-Context work): a predicted edge pixel is correct if a ground-truth edge lies within the tolerance,
    a ground-truth pixel is recalled if a prediction lies within it. Hand-written because the BSDS benchmark
    (bipartite matching, MATLAB/C++) has no maintained Python package; this distance-transform version does
    not enforce one-to-one matching, so it can be slightly higher than the official number.
    """

    def __init__(self, thresholds: Sequence[float] | None = None, tolerance: float = 0.0075):
        self.thresholds = np.asarray(thresholds if thresholds is not None else np.linspace(0.05, 0.95, 19))
        self.tolerance = tolerance
        self.reset()

    def reset(self) -> None:
        t = len(self.thresholds)
        self.tp_p = np.zeros(t)  # matched predicted pixels
        self.n_p = np.zeros(t)  # predicted pixels
        self.tp_g = np.zeros(t)  # recalled ground-truth pixels
        self.n_g = np.zeros(t)  # ground-truth pixels

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """pred: edge probabilities (B, 1, H, W); target: (B, 1, H, W) in {0, 1} (255 = ignore is treated as 0)."""
        p, t = _np(pred), _np(target)
        p = p.reshape(-1, *p.shape[-2:])
        t = t.reshape(-1, *t.shape[-2:])
        for pi, ti in zip(p, t):
            gt = (ti > 0.5) & (ti <= 1)
            tol = max(1.0, self.tolerance * float(np.hypot(*pi.shape)))
            dist_to_gt = ndimage.distance_transform_edt(~gt) if gt.any() else np.full(gt.shape, np.inf)
            for k, thr in enumerate(self.thresholds):
                pb = pi >= thr
                self.n_p[k] += pb.sum()
                self.tp_p[k] += (pb & (dist_to_gt <= tol)).sum()
                self.n_g[k] += gt.sum()
                if gt.any() and pb.any():
                    self.tp_g[k] += (gt & (ndimage.distance_transform_edt(~pb) <= tol)).sum()

    def compute(self) -> dict[str, float]:
        prec = self.tp_p / np.maximum(self.n_p, 1)
        rec = self.tp_g / np.maximum(self.n_g, 1)
        f = 2 * prec * rec / np.maximum(prec + rec, 1e-12)
        i = int(np.argmax(f))
        return {
            "odsF": float(f[i]),
            "threshold": float(self.thresholds[i]),
            "precision": float(prec[i]),
            "recall": float(rec[i]),
        }


def multi_task_delta(
    results: dict[str, float], single_task_results: dict[str, float], higher_is_better: dict[str, bool]
) -> float:
    """Multi-task performance Δm in percent (Maninis et al.; Vandenhende et al.):
    mean over tasks of (-1)^l_i (M_mt - M_st) / M_st * 100, with l_i = 1 when lower is better."""
    keys = list(single_task_results)
    for k in keys:
        if k not in results:
            raise KeyError(f"multi_task_delta: {k!r} has a single-task reference but no multi-task result")
        if k not in higher_is_better:
            raise KeyError(f"multi_task_delta: {k!r} missing in higher_is_better")
        if single_task_results[k] == 0:
            raise ValueError(f"multi_task_delta: single-task reference for {k!r} is 0; Δm is undefined")
    if not keys:
        raise ValueError("multi_task_delta: no single-task references given")
    terms = [
        (1.0 if higher_is_better[k] else -1.0) * (results[k] - single_task_results[k]) / single_task_results[k]
        for k in keys
    ]
    return 100.0 * float(np.mean(terms))
