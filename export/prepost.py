"""Pre/post-processing for the Jetson runtime, NumPy only (OpenCV used for the resize when installed).

Mirrors ``vision_moe.deploy.prepost`` (tests check they agree): fit the image inside (H, W) keeping its aspect
ratio (bilinear), pad bottom/right with 0, (x / 255 - mean) / std, NCHW float32. Detection: the graph outputs
decoded boxes (B, A, 4) and scores (B, A, K); :func:`detection_postprocess` is torchvision FCOS's selection
(per-level score threshold and top-k, class-wise NMS, top detections) written in NumPy.
"""

from __future__ import annotations

import numpy as np

try:  # JetPack ships OpenCV; the same cv2.resize the training pipeline (albumentations) uses
    import cv2
except ImportError:  # pragma: no cover - exercised by tests through use_cv2=False
    cv2 = None


def _resize_bilinear(img: np.ndarray, nh: int, nw: int) -> np.ndarray:
    """Half-pixel-centre bilinear resize (cv2.INTER_LINEAR's geometry, float arithmetic)."""
    h, w = img.shape[:2]
    ys = np.clip((np.arange(nh) + 0.5) * (h / nh) - 0.5, 0, h - 1)
    xs = np.clip((np.arange(nw) + 0.5) * (w / nw) - 0.5, 0, w - 1)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    wy, wx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    f = img.astype(np.float32)
    top = f[y0][:, x0] * (1 - wx) + f[y0][:, x1] * wx
    bot = f[y1][:, x0] * (1 - wx) + f[y1][:, x1] * wx
    return np.clip(np.rint(top * (1 - wy) + bot * wy), 0, 255).astype(np.uint8)


def preprocess(images, img_size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), use_cv2: bool = True) -> np.ndarray:
    """uint8 RGB (h, w, 3) images -> float32 (B, 3, H, W)."""
    hh, ww = int(img_size[0]), int(img_size[1])
    mean = np.asarray(mean, np.float32) * 255.0
    std = np.asarray(std, np.float32) * 255.0
    out = np.zeros((len(images), 3, hh, ww), np.float32)
    for i, im in enumerate(images):
        im = np.ascontiguousarray(im[..., :3])
        h, w = im.shape[:2]
        s = min(hh / h, ww / w)
        nh, nw = max(1, round(h * s)), max(1, round(w * s))  # albumentations LongestMaxSize's rounding
        if (nh, nw) != (h, w):
            im = (
                cv2.resize(im, (nw, nh), interpolation=cv2.INTER_LINEAR)
                if (use_cv2 and cv2 is not None)
                else _resize_bilinear(im, nh, nw)
            )
        canvas = np.zeros((hh, ww, 3), np.float32)
        canvas[:nh, :nw] = im
        out[i] = ((canvas - mean) / std).transpose(2, 0, 1)
    return out


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def classify(logits: np.ndarray, k: int = 5) -> list[list[tuple[int, float]]]:
    """Top-k (class, probability) per image."""
    p = softmax(logits.astype(np.float32))
    idx = np.argsort(-p, axis=-1)[:, :k]
    return [[(int(c), float(p[i, c])) for c in row] for i, row in enumerate(idx)]


def segment(out: np.ndarray) -> np.ndarray:
    """(B, C, H, W) -> label map (B, H, W) (C > 1) or sigmoid probability map (C == 1)."""
    return out.argmax(1) if out.shape[1] > 1 else 1.0 / (1.0 + np.exp(-out[:, 0]))


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    lt = np.maximum(box[:2], boxes[:, :2])
    rb = np.minimum(box[2:], boxes[:, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    with np.errstate(invalid="ignore", divide="ignore"):
        return inter / (area(box) + area(boxes) - inter)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_thresh: float) -> np.ndarray:
    """Greedy NMS (torchvision.ops.nms's rule: drop boxes with IoU > thresh), indices by decreasing score."""
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        if order.size == 1:
            break
        ious = _iou(boxes[i], boxes[order[1:]])
        order = order[1:][~(ious > iou_thresh)]  # NaN IoU (empty boxes) keeps, as in torchvision
    return np.asarray(keep, np.int64)


def batched_nms(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, iou_thresh: float) -> np.ndarray:
    """Class-wise NMS by coordinate offsets (torchvision's trick)."""
    if boxes.size == 0:
        return np.zeros((0,), np.int64)
    offs = labels.astype(np.float32)[:, None] * (boxes.max() + 1)
    return nms(boxes + offs, scores, iou_thresh)


def detection_postprocess(
    boxes: np.ndarray,
    scores: np.ndarray,
    level_counts,
    score_thresh: float,
    nms_thresh: float,
    topk_candidates: int,
    detections_per_img: int,
) -> list[dict]:
    """Decoded boxes (B, A, 4) and scores (B, A, K) -> per image dict boxes/scores/labels (FCOS's selection)."""
    results = []
    k = scores.shape[-1]
    for bi in range(boxes.shape[0]):
        bs, ss, ls = [], [], []
        start = 0
        for n in level_counts:
            sc = scores[bi, start : start + n].reshape(-1)
            bx = boxes[bi, start : start + n]
            start += n
            idx = np.nonzero(sc > score_thresh)[0]
            top = np.argsort(-sc[idx], kind="stable")[: min(topk_candidates, idx.size)]
            idx = idx[top]
            bs.append(bx[idx // k])
            ss.append(sc[idx])
            ls.append(idx % k)
        bx, sc, lb = np.concatenate(bs), np.concatenate(ss), np.concatenate(ls)
        keep = batched_nms(bx, sc, lb, nms_thresh)[:detections_per_img]
        results.append(dict(boxes=bx[keep], scores=sc[keep], labels=lb[keep]))
    return results


# ------------------------------------------------------------------------------------------------- restoration
def pad_reflect(images: np.ndarray, multiple: int) -> tuple[np.ndarray, tuple[int, int]]:
    """A restoration graph's input contract: (B, 3, H, W) padded at the bottom and right by reflection to multiples
    of ``multiple``; returns the padded batch and the (H, W) to crop the output back to."""
    h, w = images.shape[-2:]
    if h < multiple or w < multiple:
        raise ValueError(f"image of {h}x{w} pixels is smaller than the model's multiple {multiple}")
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        images = np.pad(images, ((0, 0), (0, 0), (0, ph), (0, pw)), mode="reflect")
    return np.ascontiguousarray(images), (h, w)


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of the tiles covering ``size`` pixels: every ``tile - overlap``, the last flush with the end
    (the rule of ``tools/restore.py``; tests check they agree)."""
    if tile <= overlap:
        raise ValueError(f"tile {tile} must be larger than the overlap {overlap}")
    if size <= tile:
        return [0]
    return list(range(0, size - tile, tile - overlap)) + [size - tile]


def _ramp(length: int, lo_edge: bool, hi_edge: bool, overlap: int) -> np.ndarray:
    """1-D blending weights of a tile: 0 over the outer quarter of an overlap, rising linearly to 1 at three
    quarters of it, on the edges that face another tile."""
    w = np.ones(length)
    if overlap <= 0:
        return w
    d = np.arange(length) + 0.5
    if lo_edge:
        w = w * np.clip((d - overlap / 4) / (overlap / 2), 0, 1)
    if hi_edge:
        w = w * np.clip((length - d - overlap / 4) / (overlap / 2), 0, 1)
    return w


def restore_image(run, image: np.ndarray, multiple: int, tile: int | None = None, overlap: int = 32) -> np.ndarray:
    """(1, 3, H, W) preprocessed image -> (1, 3, H, W) restored in [0, 1]: whole or in overlapping tiles with
    blended seams, each piece padded to the graph's multiple and cropped back. ``run``: padded batch -> output."""

    def whole(x: np.ndarray) -> np.ndarray:
        padded, (h, w) = pad_reflect(x, multiple)
        return run(padded)[..., :h, :w]

    h, w = image.shape[-2:]
    if not tile or (h <= tile and w <= tile):
        return whole(image)
    th, tw = min(tile, h), min(tile, w)
    ys, xs = tile_starts(h, th, overlap), tile_starts(w, tw, overlap)
    out = np.zeros(image.shape[:2] + (h, w))
    acc = np.zeros((1, 1, h, w))
    for i, y in enumerate(ys):
        wy = _ramp(th, i > 0, i < len(ys) - 1, overlap)
        for j, x in enumerate(xs):
            wt = wy[:, None] * _ramp(tw, j > 0, j < len(xs) - 1, overlap)[None, :]
            out[..., y : y + th, x : x + tw] += whole(image[..., y : y + th, x : x + tw]) * wt
            acc[..., y : y + th, x : x + tw] += wt
    return (out / acc).astype(np.float32)


def to_image(out: np.ndarray) -> np.ndarray:
    """(3, H, W) float in [0, 1] -> uint8 (H, W, 3)."""
    return np.clip(np.rint(np.transpose(out, (1, 2, 0)) * 255.0), 0, 255).astype(np.uint8)
