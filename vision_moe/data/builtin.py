"""Built-in multi-task data: coloured, textured shapes generated from a seed and written in real formats.

Each image shows 1-6 shapes (circle, square, triangle, star, cross) of random colour and texture on a
textured background, 8 px to half the image wide (uniformly), drawn far to near so they may overlap (every
object keeps at least half of its pixels visible). Labels, all read back through the real-format loaders:

- classification: the shape class covering the most *visible* pixels, all its objects together (the image's
  dominant class; ``<split>/classification.txt``, one ``file_name class_index`` line per image, as ImageNet's
  validation ground truth lists). Every scene has a clear dominant class: it covers at least twice the
  pixels of any other class (``MIN_DOMINANCE``; a scene that misses it is drawn again from the same
  generator). Version 1 used the class of the single largest object, which 12 % of the time differs from the
  dominant class, a label no pooled image feature can tell apart; version 2 had no dominance rule, and in a
  third of its scenes the runner-up class covered 70-100 % of the winner's pixels: a near coin flip that
  even the trained model's own segmentation, counted pixel by pixel, called right only 60-71 % of the time;
- detection: ``annotations/instances_<split>.json`` (COCO: xywh boxes of the visible extent, RLE masks);
- semseg: ``<split>/semseg/*.png`` (0 = background, 1..5 = shape class);
- saliency: ``<split>/saliency/*.png`` (255 = any object); edges: ``<split>/edges/*.png`` (255 on the inner
  contour of every visible object piece);
- depth: ``<split>/depth/*.png`` 16-bit millimetres: a sloped background plane at 5-11 m, each object a
  slightly tilted plane at 1-4.5 m;
- normals: ``<split>/normals/*.png`` RGB ((n + 1) / 2 * 255) of the depth map's planar pieces,
  n = normalise(dd/dx, dd/dy, 1) with x right, y down, z toward the camera, the image 4 m wide.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from .coco import CocoDetection
from .common import (
    cached_folder,
    check_tasks,
    encode_normals_png,
    finalize_sample,
    read_binary_png,
    read_depth_png,
    read_label_png,
    read_normals_png,
)

_logger = logging.getLogger(__name__)

SHAPE_CLASSES = ("circle", "square", "triangle", "star", "cross")
BUILTIN_TASKS = ("classification", "detection", "semseg", "saliency", "edges", "depth", "normals")
_VERSION = 3
# the image class must cover at least this many times the pixels of any other class (see the module docstring)
MIN_DOMINANCE = 2.0
_SCENE_WIDTH_M = 4.0
# Per-channel spread of a texture's second colour around its first. Version 1 used 70 (and log-uniform sizes and
# a sixth class, the hexagon): no model we tried learnt shape identity from that within the quickstart's
# 15-minute CPU budget, because stripes and checks inside an object drew edges as strong as its outline and a
# hexagon of 8-16 px is a circle. Version 2 keeps every texture kind at half the contrast, draws sizes uniformly
# (more objects large enough to have a recognisable shape) and has five classes.
_TEXTURE_CONTRAST = 35.0
_SPLIT_CODE = {"train": 0, "val": 1}
# circumradius factor per class so that every shape of a given size has the area of the square of that size
# (otherwise circles would usually be the largest object and dominate the image-level label)
_AREA_SCALE = (0.80, 1.0, 1.24, 1.26, 0.95)


# ----------------------------------------------------------------------------------------------- rendering
def _shape_mask(cls: int, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Boolean mask of shape ``cls`` with circumradius r in rotated local coordinates (u, v)."""
    rho = np.hypot(u, v)
    phi = np.arctan2(v, u)
    if cls == 0:  # circle
        return rho <= r
    if cls in (1, 2):  # regular polygon: square, triangle
        n = {1: 4, 2: 3}[cls]
        sector = 2 * np.pi / n
        local = np.mod(phi, sector) - sector / 2
        return rho * np.cos(local) <= r * np.cos(np.pi / n)
    if cls == 3:  # five-pointed star
        return rho <= r * (0.55 + 0.45 * np.cos(5 * phi))
    if cls == 4:  # cross
        arm = 0.33 * r
        return ((np.abs(u) <= arm) & (np.abs(v) <= r)) | ((np.abs(v) <= arm) & (np.abs(u) <= r))
    raise ValueError(f"unknown shape class {cls}")


def _random_colour(rng: np.random.Generator, avoid: np.ndarray | None = None) -> np.ndarray:
    for _ in range(20):
        c = rng.uniform(0, 255, 3)
        if avoid is None or np.linalg.norm(c - avoid) > 90:
            return c
    return c


def _texture(rng: np.random.Generator, s: int, c1: np.ndarray, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """(S, S, 3) float texture around colour c1: solid, stripes, checker, blotches or gradient."""
    c2 = np.clip(c1 + rng.uniform(-_TEXTURE_CONTRAST, _TEXTURE_CONTRAST, 3), 0, 255)
    kind = rng.integers(5)
    if kind == 0:
        w = np.zeros((s, s), np.float32)
    elif kind == 1:
        a, f = rng.uniform(0, np.pi), rng.uniform(0.15, 0.5)
        w = (np.sin(f * (xx * np.cos(a) + yy * np.sin(a)) + rng.uniform(0, 6.3)) > 0).astype(np.float32)
    elif kind == 2:
        p = int(rng.integers(3, 9))
        w = (((xx // p) + (yy // p)) % 2).astype(np.float32)
    elif kind == 3:
        g = rng.uniform(0, 1, (5, 5)).astype(np.float32)
        w = cv2.resize(g, (s, s), interpolation=cv2.INTER_CUBIC)
    else:
        a = rng.uniform(0, 2 * np.pi)
        w = (xx * np.cos(a) + yy * np.sin(a)) / s + 0.5
    return c1 + np.clip(w, 0, 1)[..., None] * (c2 - c1)


def render_scene(
    rng: np.random.Generator, s: int, max_objects: int = 6, min_size: int = 8, min_dominance: float = MIN_DOMINANCE
) -> dict[str, Any]:
    """One scene: image (S, S, 3) uint8 and every label (numpy), plus the object list. Scenes are drawn from
    ``rng`` until the dominant class covers at least ``min_dominance`` times the pixels of any other class
    (about half of the draws pass at 2.0; a one-class scene always does). The object count is drawn first and
    kept over the redraws, so it stays uniform in 1..max_objects."""
    n = int(rng.integers(1, max_objects + 1))
    for _ in range(1000):
        sc = _draw_scene(rng, s, n, min_size)
        counts = np.sort(np.bincount(sc["semseg"][sc["semseg"] > 0] - 1, minlength=len(SHAPE_CLASSES)))
        if counts[-1] >= min_dominance * counts[-2]:
            return sc
    raise RuntimeError(f"no scene with a {min_dominance}x dominant class in 1000 draws (size {s}px)")


def _draw_scene(rng: np.random.Generator, s: int, n: int, min_size: int) -> dict[str, Any]:
    """One scene of ``n`` objects (fewer where one found no place that keeps the others half visible)."""
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) + 0.5
    bg_colour = _random_colour(rng)
    image = _texture(rng, s, bg_colour, xx, yy)
    px = _SCENE_WIDTH_M / s  # metres per pixel
    d0, gx, gy = rng.uniform(7.0, 9.0), rng.uniform(-0.5, 0.5), rng.uniform(-0.5, 0.5)  # metres per metre
    depth = d0 + gx * (xx - s / 2) * px + gy * (yy - s / 2) * px
    slope = np.empty((s, s, 2), np.float32)
    slope[..., 0], slope[..., 1] = gx, gy
    inst = np.zeros((s, s), np.int32)

    max_size = s / 2
    objs = []
    for _ in range(n):
        size = float(rng.uniform(min_size, max_size))
        objs.append(
            dict(
                cls=int(rng.integers(len(SHAPE_CLASSES))),
                size=size,
                theta=float(rng.uniform(0, 2 * np.pi)),
                depth=float(rng.uniform(1.0, 4.0)),
                slope=rng.uniform(-0.6, 0.6, 2),
            )
        )
    objs.sort(key=lambda o: -o["depth"])  # far to near: later ones occlude earlier ones
    placed: list[dict[str, Any]] = []
    for o in objs:
        r = min(o["size"] / 2 * _AREA_SCALE[o["cls"]], s / 2 - 1)
        for _ in range(15):
            cx, cy = rng.uniform(r, s - r), rng.uniform(r, s - r)
            u, v = xx - cx, yy - cy
            ct, st = np.cos(o["theta"]), np.sin(o["theta"])
            m = _shape_mask(o["cls"], u * ct + v * st, -u * st + v * ct, r)
            if m.sum() < 12:
                continue
            # every object already placed must keep at least half of its full area visible
            if all(((inst == p["id"]) & ~m).sum() >= 0.5 * p["full_area"] for p in placed):
                break
        else:
            continue
        o.update(id=len(placed) + 1, cx=cx, cy=cy, full_area=int(m.sum()))
        colour = _random_colour(rng, avoid=bg_colour)
        tex = _texture(rng, s, colour, xx, yy)
        image[m] = tex[m]
        inst[m] = o["id"]
        sx, sy = o["slope"]
        depth[m] = (o["depth"] + sx * (xx - cx) * px + sy * (yy - cy) * px)[m]
        slope[m] = o["slope"]
        placed.append(o)

    image = np.clip(image + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8)
    cls_of = np.zeros(len(placed) + 1, np.int64)
    for p in placed:
        cls_of[p["id"]] = p["cls"] + 1
    semseg = cls_of[inst]
    diff = np.zeros((s, s), bool)
    diff[:, :-1] |= inst[:, :-1] != inst[:, 1:]
    diff[:, 1:] |= inst[:, 1:] != inst[:, :-1]
    diff[:-1] |= inst[:-1] != inst[1:]
    diff[1:] |= inst[1:] != inst[:-1]
    edges = diff & (inst > 0)
    normals = np.concatenate([slope, np.ones((s, s, 1), np.float32)], axis=-1)
    normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
    objects = []
    for p in placed:
        vis = inst == p["id"]
        ys, xs = np.nonzero(vis)
        objects.append(
            dict(
                cls=p["cls"],
                mask=vis,
                area=int(vis.sum()),
                bbox=[float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)],
            )
        )
    # the class covering the most visible pixels (ties: the lower class index)
    class_label = int(np.bincount(semseg[semseg > 0] - 1, minlength=len(SHAPE_CLASSES)).argmax())
    return dict(
        image=image,
        semseg=semseg,
        saliency=inst > 0,
        edges=edges,
        depth=depth.astype(np.float32),
        normals=normals.astype(np.float32),
        objects=objects,
        class_label=class_label,
    )


# ----------------------------------------------------------------------------------------------- writing
def _save_png(arr: np.ndarray, path: Path) -> None:
    Image.fromarray(arr).save(path, compress_level=1)


def _render_range(out: Path, split: str, seed: int, start: int, stop: int, img_size: int) -> tuple[list, list, list]:
    """Render and write images start..stop-1 of a split; return their COCO images, annotations (no ids yet)
    and classification lines. Each image has its own generator, so any chunking gives the same bytes."""
    d = out / split
    images, annotations, cls_lines = [], [], []
    for i in range(start, stop):
        rng = np.random.default_rng([seed, _SPLIT_CODE[split], i])
        sc = render_scene(rng, img_size)
        name = f"{i:06d}.png"
        _save_png(sc["image"], d / "images" / name)
        _save_png(sc["semseg"].astype(np.uint8), d / "semseg" / name)
        _save_png(sc["saliency"].astype(np.uint8) * 255, d / "saliency" / name)
        _save_png(sc["edges"].astype(np.uint8) * 255, d / "edges" / name)
        _save_png(np.round(sc["depth"] * 1000).astype(np.uint16), d / "depth" / name)
        _save_png(encode_normals_png(sc["normals"]), d / "normals" / name)
        image_id = i + 1
        images.append(dict(id=image_id, file_name=name, width=img_size, height=img_size))
        for o in sc["objects"]:
            rle = mask_utils.encode(np.asfortranarray(o["mask"].astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            annotations.append(
                dict(
                    image_id=image_id,
                    category_id=o["cls"] + 1,
                    bbox=o["bbox"],
                    area=o["area"],
                    iscrowd=0,
                    segmentation=rle,
                )
            )
        cls_lines.append(f"{name} {sc['class_label']}\n")
    return images, annotations, cls_lines


_CHUNK = 100  # images per rendering job: the unit of progress and of parallel work


class _Progress:
    """Images written so far: a tqdm bar, or (``bar=False``) a log line at most every ``every`` seconds."""

    def __init__(self, total: int, desc: str, bar: bool, every: float = 10.0) -> None:
        self.total, self.done, self.every = total, 0, every
        self.t0 = self.last = time.perf_counter()
        self.bar = None
        if bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True)

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif time.perf_counter() - self.last >= self.every and self.done < self.total:
            self.last = time.perf_counter()
            _logger.info("built-in data: %d of %d images (%.0f s)", self.done, self.total, self.last - self.t0)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _write_split(
    out: Path, split: str, seed: int, num: int, img_size: int, workers: int = 1, progress: _Progress | None = None
) -> None:
    d = out / split
    for sub in ("images", "semseg", "saliency", "edges", "depth", "normals"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    workers = max(1, min(workers, num // 25))  # tiny splits: not worth a process
    bounds = list(range(0, num, _CHUNK)) + [num]
    jobs = [(out, split, seed, a, b, img_size) for a, b in zip(bounds[:-1], bounds[1:])]
    with contextlib.ExitStack() as stack:
        if workers > 1 and "fork" in multiprocessing.get_all_start_methods():
            ex = stack.enter_context(ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")))
            results = ex.map(_render_range, *zip(*jobs))
        else:
            results = (_render_range(*j) for j in jobs)
        parts = []
        for job, part in zip(jobs, results):  # in order, as each chunk is written
            parts.append(part)
            if progress is not None:
                progress.update(job[4] - job[3])
    images = [x for p in parts for x in p[0]]
    annotations = [dict(id=k + 1, **a) for k, a in enumerate(a for p in parts for a in p[1])]
    cls_lines = [x for p in parts for x in p[2]]
    cats = [dict(id=k + 1, name=n, supercategory="shape") for k, n in enumerate(SHAPE_CLASSES)]
    (out / "annotations").mkdir(exist_ok=True)
    with open(out / "annotations" / f"instances_{split}.json", "w") as f:
        info = dict(description="vision-moe built-in shapes", version=_VERSION)
        json.dump(dict(info=info, images=images, annotations=annotations, categories=cats), f)
    with open(d / "classification.txt", "w") as f:
        f.writelines(cls_lines)


def builtin_dir(root: str | Path, seed: int = 0, num_train: int = 2000, num_val: int = 300, img_size: int = 64) -> Path:
    """The folder :func:`prepare_builtin` uses for these arguments: ``root/<name from the arguments>``, or
    ``root`` itself when it is that folder (a dataset root may name the parent or the data folder)."""
    root = Path(root)
    name = f"builtin_v{_VERSION}_s{seed}_n{num_train}-{num_val}_{img_size}px"
    if root.name == name:
        return root
    if (root / "manifest.json").is_file():
        raise ValueError(
            f"{root}: built-in data made with other arguments; expected its parent folder or the folder {name} "
            f"(seed {seed}, {num_train} + {num_val} images, {img_size} px)"
        )
    return root / name


def prepare_builtin(
    root: str | Path,
    seed: int = 0,
    num_train: int = 2000,
    num_val: int = 300,
    img_size: int = 64,
    verify: bool = True,
    workers: int = 1,
    progress: bool = False,
) -> Path:
    """Generate the built-in data under ``root/<name-from-arguments>`` (or reuse it) and return that folder
    (:func:`builtin_dir`).

    Deterministic in the arguments. A folder is reused when its ``manifest.json`` holds the same arguments and,
    with ``verify``, the same content hash (so a damaged copy is regenerated). Written to a temporary folder
    and renamed into place, so concurrent callers (DDP ranks) never see a half-written copy. ``workers``
    processes render in parallel (forked; default 1, the safe choice inside a training process); the bytes do
    not depend on it. Generating is logged (INFO) when it starts and ends; ``progress`` shows a tqdm bar,
    otherwise a log line reports the count every 10 s.
    """
    if img_size < 32:
        raise ValueError(f"prepare_builtin: img_size={img_size}; expected >= 32 (objects are 8 px to img_size/2)")
    params = dict(version=_VERSION, seed=seed, num_train=num_train, num_val=num_val, img_size=img_size)
    out = builtin_dir(root, seed, num_train, num_val, img_size)

    def write(tmp: Path) -> dict:
        bar = _Progress(num_train + num_val, "built-in data", progress)
        try:
            _write_split(tmp, "train", seed, num_train, img_size, workers, bar)
            _write_split(tmp, "val", seed, num_val, img_size, workers, bar)
        finally:
            bar.close()
        (tmp / "classes.txt").write_text("".join(f"{n}\n" for n in SHAPE_CLASSES))
        return dict(classes=list(SHAPE_CLASSES))

    what = f"the built-in data ({num_train} + {num_val} images, {img_size} px)"
    return cached_folder(out, params, write, verify, what=what)


# ----------------------------------------------------------------------------------------------- reading
class BuiltinDataset(torch.utils.data.Dataset):
    """The built-in data read back through the real-format readers (COCO JSON via pycocotools, PNG maps)."""

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        tasks: Sequence[str] | None = None,
        transform: Any = None,
    ):
        if split not in _SPLIT_CODE:
            raise ValueError(f"BuiltinDataset: unknown split {split!r}; expected one of {list(_SPLIT_CODE)}")
        self.root = Path(root)
        if not (self.root / "manifest.json").exists():
            raise ValueError(f"{self.root}: no manifest.json; expected a folder returned by prepare_builtin()")
        self.split = split
        self.tasks = check_tasks(tasks, BUILTIN_TASKS, type(self).__name__)
        self.transform = transform
        self.dir = self.root / split
        self.det = CocoDetection(self.root, split, img_dir=self.dir / "images")
        self.coco = self.det.coco
        self.contiguous_to_cat_id = self.det.contiguous_to_cat_id
        self.class_names = list(SHAPE_CLASSES)
        labels = {}
        cls_file = self.dir / "classification.txt"
        for ln, line in enumerate(cls_file.read_text().splitlines(), 1):
            parts = line.split()
            if len(parts) != 2 or not parts[1].isdigit():
                raise ValueError(f"{cls_file}:{ln}: {line!r}; expected '<file_name> <class_index>'")
            labels[parts[0]] = int(parts[1])
        self.class_labels = labels
        self.ids = self.det.ids
        k = len(SHAPE_CLASSES)
        all_classes = {"classification": k, "detection": k, "semseg": k + 1}
        self.num_classes = {t: c for t, c in all_classes.items() if t in self.tasks}

    def __len__(self) -> int:
        return len(self.ids)

    def load_raw(self, index: int) -> dict[str, Any]:
        raw = self.det.load_raw(index)
        name = self.coco.imgs[raw["image_id"]]["file_name"]
        hw = raw["image"].shape[:2]
        d = self.dir
        if "classification" in self.tasks or "semseg" in self.tasks:
            semseg = read_label_png(d / "semseg" / name, hw)
        if "classification" in self.tasks:
            raw["class_label"] = self.class_labels[name]
            # the class is the one covering the most visible pixels: the transform re-derives it after a crop
            raw["class_mask"] = semseg
        if "semseg" in self.tasks:
            raw["semseg"] = semseg
        if "saliency" in self.tasks:
            raw["saliency"] = read_binary_png(d / "saliency" / name, hw)
        if "edges" in self.tasks:
            raw["edges"] = read_binary_png(d / "edges" / name, hw)
        if "depth" in self.tasks:
            raw["depth"] = read_depth_png(d / "depth" / name, hw)
        if "normals" in self.tasks:
            raw["normals"] = read_normals_png(d / "normals" / name, hw)
        return raw

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        return finalize_sample(self.load_raw(index), self.transform, self.tasks)


# ----------------------------------------------------------------------------------------------- baseline
def linear_probe_baseline(root: str | Path, ridge: Sequence[float] = (1e1, 1e2, 1e3, 1e4)) -> dict[str, float]:
    """Linear classifier on raw pixels (ridge regression to one-hot, closed form; sklearn is not a dependency).

    The ridge strength is picked on the last 20 % of the train split; the result is top-1 on the val split.
    """
    root = Path(root)

    def load(split: str) -> tuple[np.ndarray, np.ndarray]:
        ds = BuiltinDataset(root, split, tasks=("classification",))
        xs, ys = [], []
        for i in range(len(ds)):
            raw = ds.load_raw(i)
            xs.append(raw["image"].reshape(-1).astype(np.float64) / 255.0)
            ys.append(raw["class_label"])
        return np.stack(xs), np.array(ys)

    xtr, ytr = load("train")
    xva, yva = load("val")
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xva = (xtr - mu) / sd, (xva - mu) / sd
    k = len(SHAPE_CLASSES)

    def fit(x: np.ndarray, y: np.ndarray, lam: float) -> np.ndarray:
        xb = np.hstack([x, np.ones((len(x), 1))])
        t = np.eye(k)[y] - 1.0 / k
        # dual form: W = X^T (X X^T + lam I)^-1 T, cheap because samples << pixels
        alpha = np.linalg.solve(xb @ xb.T + lam * np.eye(len(xb)), t)
        return xb.T @ alpha

    def top1(w: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
        return float((np.hstack([x, np.ones((len(x), 1))]) @ w).argmax(1).__eq__(y).mean())

    n_fit = int(0.8 * len(xtr))
    scores = {lam: top1(fit(xtr[:n_fit], ytr[:n_fit], lam), xtr[n_fit:], ytr[n_fit:]) for lam in ridge}
    best = max(scores, key=scores.get)
    acc = top1(fit(xtr, ytr, best), xva, yva)
    majority = float(np.bincount(yva, minlength=k).max() / len(yva))
    return {"top1": acc, "ridge": float(best), "majority_top1": majority, "chance_top1": 1.0 / k}
