"""Pre- and post-processing for deployed graphs (library side).

``export/prepost.py`` is the NumPy copy that runs on the Jetson without vision_moe; tests check the two agree.
Preprocessing is the data pipeline's evaluation transform (:func:`vision_moe.data.transforms.build_transforms`:
LongestMaxSize -> top-left zero PadIfNeeded -> Normalize, with albumentations) generalised to a non-square input
(the image is fitted inside (H, W) with ``max_size_hw``; identical when the aspect ratios match).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

__all__ = ["preprocess", "sample_images", "load_images", "decode_detections", "detection_postprocess", "pad_reflect"]

_logger = logging.getLogger(__name__)

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
# scikit-image's bundled colour photographs (no download needed): the default parity / calibration images.
SKIMAGE_PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "immunohistochemistry",
    "hubble_deep_field",
    "colorwheel",
    "retina",
    "cat",
)


def preprocess(
    images: Sequence[np.ndarray],
    img_size: tuple[int, int],
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
) -> np.ndarray:
    """uint8 RGB (H, W, 3) images -> float32 (B, 3, H', W') batch, the evaluation transform of the data pipeline."""
    import albumentations as A
    import cv2

    h, w = int(img_size[0]), int(img_size[1])
    tf = A.Compose(
        [
            A.LongestMaxSize(max_size_hw=(h, w), interpolation=cv2.INTER_LINEAR),
            A.PadIfNeeded(min_height=h, min_width=w, position="top_left", border_mode=cv2.BORDER_CONSTANT, fill=0),
            A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0),
        ],
        strict=True,
    )
    out = [tf(image=np.ascontiguousarray(im[..., :3]))["image"].transpose(2, 0, 1) for im in images]
    return np.ascontiguousarray(np.stack(out), dtype=np.float32)


def _read_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def load_images(
    source: str | Path | None, n: int, offset: int = 0, skipped: list[str] | None = None
) -> list[np.ndarray]:
    """``n`` uint8 RGB images: from a folder (recursively; a built-in dataset root reads ``<split>/images``), or,
    with ``source=None``, scikit-image's bundled photographs (cycled).

    A folder's files are taken in sorted order from ``offset``, cycled when there are fewer than ``n``. A file
    that cannot be decoded is skipped with a warning (its ``"path: reason"`` appended to ``skipped``, once per
    file) and the next readable one taken instead; a folder none of whose images can be read raises ValueError.
    """
    if source is None:
        import skimage.data

        photos = [getattr(skimage.data, name)() for name in SKIMAGE_PHOTOS]
        photos = [np.stack([p] * 3, -1) if p.ndim == 2 else p[..., :3] for p in photos]
        return [photos[(offset + i) % len(photos)] for i in range(n)]
    from PIL import Image

    root = Path(source)
    if not root.is_dir():
        raise ValueError(f"calibration data {str(root)!r} is not a folder")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS and "images" in p.parts) or sorted(
        p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS
    )
    if not files:
        raise ValueError(f"calibration data {str(root)!r} holds no images ({', '.join(IMAGE_EXTS)})")
    images: list[np.ndarray] = []
    bad: dict[Path, str] = {}
    i = offset
    while len(images) < n:
        if len(bad) == len(files):
            first = next(iter(bad.values()))
            raise ValueError(
                f"calibration data {str(root)!r}: none of its {len(files)} images can be read (first: {first})"
            )
        f = files[i % len(files)]
        i += 1
        if f in bad:
            continue
        try:
            images.append(_read_rgb(f))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # PIL raises all of these
            bad[f] = f"{f}: {str(e).strip() or type(e).__name__}"
            _logger.warning("skipping unreadable image %s", bad[f])
            if skipped is not None:
                skipped.append(bad[f])
    return images


def sample_images(
    n: int,
    img_size: tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    source: str | Path | None = None,
    offset: int = 0,
    skipped: list[str] | None = None,
) -> np.ndarray:
    """(n, 3, H, W) float32 preprocessed real images (see :func:`load_images`; unreadable files go to ``skipped``)."""
    if n < 1:
        raise ValueError(f"need at least one image, got n={n}")
    return preprocess(load_images(source, n, offset, skipped), img_size, mean, std)


def decode_detections(
    raw: Sequence[torch.Tensor], anchors: torch.Tensor, image_size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """FCOS raw outputs -> boxes (B, A, 4) xyxy clipped to the image, scores (B, A, K) = sqrt(sigmoid(cls) *
    sigmoid(ctrness)): torchvision FCOS's decoding, vectorised over levels (the in-graph part of detection)."""
    from torchvision.models.detection import _utils as det_utils

    cls_logits, bbox_reg, ctr = raw
    coder = det_utils.BoxLinearCoder(normalize_by_size=True)
    b, a, _ = bbox_reg.shape
    boxes = coder.decode(bbox_reg.reshape(b * a, 4), anchors.repeat(b, 1).to(bbox_reg.dtype)).reshape(b, a, 4)
    h, w = image_size
    x = boxes[..., 0::2].clamp(min=0, max=w)
    y = boxes[..., 1::2].clamp(min=0, max=h)
    boxes = torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=-1)
    scores = torch.sqrt(torch.sigmoid(cls_logits) * torch.sigmoid(ctr))
    return boxes, scores


def detection_postprocess(
    boxes: np.ndarray,
    scores: np.ndarray,
    level_counts: Sequence[int],
    score_thresh: float,
    nms_thresh: float,
    topk_candidates: int,
    detections_per_img: int,
) -> list[dict[str, np.ndarray]]:
    """Host-side NMS on decoded outputs (one image per row), torchvision FCOS's rules, with torchvision ops."""
    from torchvision.ops import batched_nms

    results = []
    for bi in range(boxes.shape[0]):
        all_boxes, all_scores, all_labels = [], [], []
        start = 0
        for n in level_counts:
            bx = torch.from_numpy(boxes[bi, start : start + n])
            sc = torch.from_numpy(scores[bi, start : start + n]).flatten()
            start += n
            keep = sc > score_thresh
            sc = sc[keep]
            idx = torch.nonzero(keep).flatten()
            k = min(topk_candidates, idx.numel())
            sc, order = sc.topk(k)
            idx = idx[order]
            num_classes = scores.shape[-1]
            all_boxes.append(bx[idx // num_classes])
            all_scores.append(sc)
            all_labels.append(idx % num_classes)
        bx, sc, lb = torch.cat(all_boxes), torch.cat(all_scores), torch.cat(all_labels)
        keep = batched_nms(bx, sc, lb, nms_thresh)[:detections_per_img]
        results.append(dict(boxes=bx[keep].numpy(), scores=sc[keep].numpy(), labels=lb[keep].numpy()))
    return results


def pad_reflect(images: np.ndarray, multiple: int) -> tuple[np.ndarray, tuple[int, int]]:
    """The runtime side of a restoration graph's contract: (B, 3, H, W) padded at the bottom and right by
    reflection to multiples of ``multiple`` (as the networks pad themselves in PyTorch); the original (H, W)."""
    h, w = images.shape[-2:]
    if h < multiple or w < multiple:
        raise ValueError(f"image of {h}x{w} pixels is smaller than the model's multiple {multiple}")
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        images = np.pad(images, ((0, 0), (0, 0), (0, ph), (0, pw)), mode="reflect")
    return np.ascontiguousarray(images), (h, w)
