"""PSNR and SSIM of restored images, per image and then averaged over images, from scikit-image.

Why scikit-image: its ``peak_signal_noise_ratio`` / ``structural_similarity`` are the reference implementations
the field checks against (Wang et al.'s SSIM with ``gaussian_weights=True, sigma=1.5,
use_sample_covariance=False``), take ``data_range`` explicitly, compute one image at a time (so nothing is pooled
over a batch, unlike torchmetrics' default PSNR), and scikit-image is already a dependency of the data layer.

Conventions (BasicSR's ``calculate_psnr`` / ``calculate_ssim``): images are compared in [0, 1] (the model's output
clamped), ``crop_border`` pixels are cut from every side first, RGB with ``data_range=1``, and the Y channel of
ITU-R BT.601 YCbCr (scikit-image's ``rgb2ycbcr``: Y in [16, 235]) with ``data_range=255``. Identical images have
infinite PSNR; it is capped at :data:`PSNR_CAP` dB so averages stay finite.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

__all__ = ["psnr", "ssim", "RestorationMetric", "restoration_summary", "PSNR_CAP"]

PSNR_CAP = 100.0


def _hwc(img: torch.Tensor | np.ndarray) -> np.ndarray:
    """(3, H, W) tensor or (H, W, 3) array in [0, 1] -> (H, W, 3) float64 clipped to [0, 1]."""
    if isinstance(img, torch.Tensor):  # tensors are channels-first, arrays channels-last (as each library has it)
        img = img.detach().float().cpu().numpy().transpose(1, 2, 0)
    return np.clip(np.asarray(img, dtype=np.float64), 0.0, 1.0)


def _prepare(img, ref, crop_border: int, y_channel: bool) -> tuple[np.ndarray, np.ndarray, float]:
    from skimage.color import rgb2ycbcr

    a, b = _hwc(img), _hwc(ref)
    if a.shape != b.shape:
        raise ValueError(f"images of shapes {a.shape} and {b.shape}: expected the same (H, W, 3)")
    if crop_border:
        a, b = (
            a[crop_border:-crop_border, crop_border:-crop_border],
            b[crop_border:-crop_border, crop_border:-crop_border],
        )
    if y_channel:
        return rgb2ycbcr(a)[..., 0], rgb2ycbcr(b)[..., 0], 255.0
    return a, b, 1.0


def psnr(img, ref, crop_border: int = 0, y_channel: bool = False) -> float:
    """PSNR (dB) of one image against its reference, both RGB in [0, 1]; capped at :data:`PSNR_CAP`."""
    from skimage.metrics import peak_signal_noise_ratio

    a, b, rng = _prepare(img, ref, crop_border, y_channel)
    if np.array_equal(a, b):
        return PSNR_CAP
    return min(PSNR_CAP, float(peak_signal_noise_ratio(b, a, data_range=rng)))


def ssim(img, ref, crop_border: int = 0, y_channel: bool = False) -> float:
    """SSIM of one image against its reference (Gaussian window sigma 1.5, population covariance; colour
    channels averaged), both RGB in [0, 1]."""
    from skimage.metrics import structural_similarity

    a, b, rng = _prepare(img, ref, crop_border, y_channel)
    if min(a.shape[:2]) < 7:
        raise ValueError(f"SSIM needs at least 7x7 pixels after the crop border, got {a.shape[:2]}")
    kw = dict(data_range=rng, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    return float(structural_similarity(b, a, channel_axis=None if y_channel else -1, **kw))


class RestorationMetric:
    """Accumulates per-image PSNR / SSIM of the output and of the degraded input against the ground truth.

    ``compute()`` gives the means over images: ``psnr``, ``ssim`` (RGB), ``psnr_y``, ``ssim_y`` (Y channel), the
    same of the input (``input_psnr`` ...), ``psnr_gain`` (output minus input PSNR, RGB), ``images`` and
    ``crop_border``; with :meth:`update_classifier`, ``classifier_accuracy``."""

    def __init__(self, crop_border: int = 0):
        if crop_border < 0:
            raise ValueError(f"crop_border must be >= 0, got {crop_border}")
        self.crop_border = int(crop_border)
        self.reset()

    def reset(self) -> None:
        self.values: dict[str, list[float]] = {}
        self.classified: list[bool] = []

    def update_classifier(self, predicted: list[str], truth: list[str]) -> None:
        """A degradation classifier's predictions (DeMoE's) against the true degradations: ``classifier_accuracy``."""
        if len(predicted) != len(truth):
            raise ValueError(f"{len(predicted)} predictions for {len(truth)} images; expected as many")
        self.classified.extend(p == t for p, t in zip(predicted, truth))

    def _add(self, prefix: str, img, ref) -> None:
        c = self.crop_border
        for y, suffix in ((False, ""), (True, "_y")):
            self.values.setdefault(f"{prefix}psnr{suffix}", []).append(psnr(img, ref, c, y))
            self.values.setdefault(f"{prefix}ssim{suffix}", []).append(ssim(img, ref, c, y))

    def update(self, out: torch.Tensor, gt: torch.Tensor, lq: torch.Tensor | None = None) -> None:
        """out, gt (and the degraded input lq): (B, 3, H, W) in [0, 1], or lists of (3, H_i, W_i) tensors."""
        if len(out) != len(gt) or (lq is not None and len(lq) != len(gt)):
            raise ValueError(f"RestorationMetric: {len(out)} outputs, {len(gt)} ground truths; expected as many")
        for i in range(len(gt)):
            self._add("", out[i], gt[i])
            if lq is not None:
                self._add("input_", lq[i], gt[i])

    def compute(self) -> dict[str, float]:
        res = {k: float(np.mean(v)) for k, v in self.values.items()}
        if "psnr" in res and "input_psnr" in res:
            res["psnr_gain"] = res["psnr"] - res["input_psnr"]
        if self.classified:
            res["classifier_accuracy"] = float(np.mean(self.classified))
        res["images"] = float(len(self.values.get("psnr", [])))
        res["crop_border"] = float(self.crop_border)
        return res


_MEANED = ("psnr", "ssim", "psnr_y", "ssim_y", "input_psnr", "input_ssim", "input_psnr_y", "input_ssim_y")


def restoration_summary(metrics: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """The mean over every held-out image of several degradations' metrics (each task's means weighted by its
    number of images), and the number of degradations not worse than their input (``tasks_not_worse``)."""
    rows = [m for m in metrics.values() if m.get("images")]
    n = sum(m["images"] for m in rows)
    if not n:
        return {}
    out = {k: sum(m[k] * m["images"] for m in rows) / n for k in _MEANED if all(k in m for m in rows)}
    if "psnr" in out and "input_psnr" in out:
        out["psnr_gain"] = out["psnr"] - out["input_psnr"]
        out["tasks_not_worse"] = float(sum(m["psnr"] >= m["input_psnr"] for m in rows))
    if all("classifier_accuracy" in m for m in rows):
        out["classifier_accuracy"] = sum(m["classifier_accuracy"] * m["images"] for m in rows) / n
    out["images"] = float(n)
    out["tasks"] = float(len(rows))
    return out
