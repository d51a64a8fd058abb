"""Built-in restoration data: scikit-image's bundled photographs, cut into crops and degraded from a seed.

Nothing is downloaded: the photographs ship inside scikit-image. They are split **by photograph** (no held-out
photograph is ever cropped for training; the two motorcycle stereo views are one photograph, so only the left
one is used, and ``cat`` is ``chelsea``):

- train: astronaut, rocket, immunohistochemistry, motorcycle (left view), hubble_deep_field, retina, and the
  grey photographs coins, grass, gravel, brick, moon (as RGB);
- held out: coffee, chelsea, camera (grey, as RGB).

Each crop comes from a photograph rescaled by a factor in [0.5, 1] (area interpolation) at a random place;
crops whose ground truth is nearly flat (grey-level std < 0.04) are redrawn. Each degradation gets
``num_train`` / ``num_val`` crops of its own, degraded deterministically (one generator per crop, from the seed,
the split, the degradation and the crop's index):

- ``derain``: rain streaks, sparse bright drops smeared along one direction (length 6-14 px, within 25 degrees
  of vertical), added to the image;
- ``dehaze``: atmospheric scattering I = J t + A (1 - t), t = exp(-beta d), d a smooth depth proxy (a vertical
  ramp plus low-frequency noise), beta 0.8-2.0, airlight A 0.75-0.95 (slightly tinted);
- ``desnow``: snowflakes of 0.5-2.5 px, partly smeared by wind, screen-blended;
- ``deblur``: motion blur by a random trajectory kernel (a random walk with momentum, 9-17 px support), or with
  ``motion_kernel="linear"`` by a straight line of 9-17 px at a uniform angle (linear camera motion: a direction the
  blur keeps, where the random walk curls into a blob that looks like defocus);
- ``defocus``: a disk kernel of radius 1.5-3.5 px;
- ``lowlight``: J' = s J^gamma (gamma 1.8-3, s 0.4-0.8) plus Gaussian read noise (sigma 0.005-0.02);
- ``denoise``: additive Gaussian noise of sigma 15, 25 or 50 (of 255), the BSD68 levels;
- ``deraindrop`` (only with ``raindrops=True``, in a folder of its own): 2-6 adherent drops on the lens, ellipses
  of 3-9 px radius through which the scene around each drop is seen upside down, squeezed (a lens of short focal
  length), defocused and slightly brightened, with soft edges and a darker rim at the bottom (the look of the
  Raindrop dataset's drops; the rest of the image stays sharp).

Written in the ``all_in_one`` layout (``<split>/<degradation>/{lq,gt}/NNNNNN.png``; ``<split>/crops.jsonl`` records
each crop's photograph, scale, position and degradation parameters) and read back through the same reader as
any all-in-one set. ``manifest.json`` holds the arguments, a content hash, and the held-out input baseline: the
PSNR / SSIM of the degraded crops themselves, per degradation, which every model must beat.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from .common import cached_folder
from .restoration import RestorationPairs, RestorationTransform, all_in_one_samples

__all__ = [
    "BUILTIN_DEGRADATIONS",
    "TRAIN_PHOTOS",
    "HELD_OUT_PHOTOS",
    "DEGRADE",
    "MOTION_KERNELS",
    "RAINDROP",
    "load_photo",
    "prepare_builtin_restore",
    "BuiltinRestoration",
]

_logger = logging.getLogger(__name__)

_VERSION = 1
BUILTIN_DEGRADATIONS = ("derain", "dehaze", "desnow", "deblur", "defocus", "lowlight", "denoise")
TRAIN_PHOTOS = (
    "astronaut",
    "rocket",
    "immunohistochemistry",
    "motorcycle",
    "hubble_deep_field",
    "retina",
    "coins",
    "grass",
    "gravel",
    "brick",
    "moon",
)
HELD_OUT_PHOTOS = ("coffee", "chelsea", "camera")
_SPLIT_CODE = {"train": 0, "val": 1}
_MIN_STD = 0.04
_SCALES = (0.5, 0.625, 0.75, 0.875, 1.0)


def load_photo(name: str) -> np.ndarray:
    """A bundled scikit-image photograph as (H, W, 3) uint8 RGB."""
    from skimage import data

    img = data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return np.ascontiguousarray(img[..., :3].astype(np.uint8))


# ----------------------------------------------------------------------------------------------- degradations
# Each takes the clean crop (H, W, 3) float32 in [0, 1] and a generator; returns the degraded crop (unclipped)
# and the parameters drawn.
def _motion_line(length: int, angle_deg: float) -> np.ndarray:
    k = np.zeros((length, length), np.float32)
    c = (length - 1) / 2
    dx, dy = np.cos(np.deg2rad(angle_deg)), np.sin(np.deg2rad(angle_deg))
    cv2.line(k, (round(c - dx * c), round(c - dy * c)), (round(c + dx * c), round(c + dy * c)), 1.0, 1, cv2.LINE_AA)
    return k / k.sum()


def _rain(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    h, w = img.shape[:2]
    density = float(rng.uniform(0.01, 0.03))
    length = int(rng.integers(6, 15))
    angle = float(90 + rng.uniform(-25, 25))  # degrees from the x axis: near vertical
    drops = (rng.random((h, w)) < density).astype(np.float32) * rng.uniform(0.6, 1.0, (h, w)).astype(np.float32)
    streaks = cv2.filter2D(drops, -1, _motion_line(length, angle), borderType=cv2.BORDER_REFLECT)
    streaks = cv2.GaussianBlur(streaks, (3, 3), 0.5)
    strength = float(rng.uniform(1.5, 2.5))
    return img + strength * streaks[..., None], dict(density=density, length=length, angle=angle, strength=strength)


def _smooth_field(rng: np.random.Generator, h: int, w: int, cells: int = 4) -> np.ndarray:
    g = rng.uniform(0, 1, (cells, cells)).astype(np.float32)
    return cv2.resize(g, (w, h), interpolation=cv2.INTER_CUBIC)


def _haze(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    h, w = img.shape[:2]
    ramp = np.linspace(1.0, 0.0, h, dtype=np.float32)[:, None] * np.ones((1, w), np.float32)  # top far
    depth = np.clip(0.6 * ramp + 0.4 * _smooth_field(rng, h, w), 0, 1)
    beta = float(rng.uniform(0.8, 2.0))
    a = float(rng.uniform(0.75, 0.95))
    airlight = np.clip(a + rng.uniform(-0.03, 0.03, 3), 0, 1).astype(np.float32)
    t = np.exp(-beta * depth)[..., None]
    return img * t + airlight * (1 - t), dict(beta=beta, airlight=airlight.round(3).tolist())


def _snow(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    h, w = img.shape[:2]
    up = 4  # flakes are drawn on a 4x canvas and area-downsampled: round, anti-aliased, sub-pixel sized
    layer = np.zeros((h * up, w * up), np.float32)
    n = int(rng.uniform(0.004, 0.012) * h * w)
    for _ in range(n):
        r = float(rng.uniform(0.5, 2.5))
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        cv2.circle(layer, (int(x * up), int(y * up)), max(1, round(r * up)), float(rng.uniform(0.7, 1.0)), -1)
    layer = cv2.resize(layer, (w, h), interpolation=cv2.INTER_AREA)
    wind = float(rng.uniform(-40, 40))
    if abs(wind) > 15:
        layer = cv2.filter2D(layer, -1, _motion_line(5, 90 + wind), borderType=cv2.BORDER_REFLECT)
    layer = np.clip(cv2.GaussianBlur(layer, (0, 0), 0.5), 0, 1)[..., None]
    veil = float(rng.uniform(0.0, 0.1))
    out = img * (1 - veil) + veil
    return 1 - (1 - out) * (1 - layer), dict(flakes=n, wind=wind, veil=veil)


def _trajectory_kernel(rng: np.random.Generator, size: int) -> np.ndarray:
    """A camera-shake kernel: a random walk with momentum, drawn with anti-aliasing and normalised."""
    steps = 64
    v = rng.normal(0, 1, 2)
    v /= np.linalg.norm(v) + 1e-9
    pos = np.zeros(2)
    pts = [pos.copy()]
    for _ in range(steps):
        v = 0.9 * v + 0.35 * rng.normal(0, 1, 2)
        v /= np.linalg.norm(v) + 1e-9
        pos = pos + v
        pts.append(pos.copy())
    pts = np.array(pts)
    pts -= pts.mean(0)
    extent = np.abs(pts).max() + 1e-9
    pts = pts / extent * (size - 1) / 2 + (size - 1) / 2
    k = np.zeros((size * 4, size * 4), np.float32)
    p4 = np.round(pts * 4 + 2).astype(np.int32).reshape(-1, 1, 2)
    cv2.polylines(k, [p4], False, 1.0, 2, cv2.LINE_AA)
    k = cv2.resize(k, (size, size), interpolation=cv2.INTER_AREA)
    return k / k.sum()


def _motion_blur(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    size = int(rng.choice([9, 11, 13, 15, 17]))
    k = _trajectory_kernel(rng, size)
    return cv2.filter2D(img, -1, k, borderType=cv2.BORDER_REFLECT), dict(kernel=size)


def _linear_motion_blur(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    size = int(rng.choice([9, 11, 13, 15, 17]))
    angle = float(rng.uniform(0, 180))
    k = _motion_line(size, angle)
    return cv2.filter2D(img, -1, k, borderType=cv2.BORDER_REFLECT), dict(kernel=size, angle=angle)


def _defocus(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    r = float(rng.uniform(1.5, 3.5))
    n = int(np.ceil(r)) * 2 + 1
    k = np.zeros((n * 8, n * 8), np.float32)
    cv2.circle(k, (n * 4, n * 4), int(r * 8), 1.0, -1, cv2.LINE_AA)
    k = cv2.resize(k, (n, n), interpolation=cv2.INTER_AREA)
    return cv2.filter2D(img, -1, k / k.sum(), borderType=cv2.BORDER_REFLECT), dict(radius=r)


def _lowlight(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    gamma, scale, sigma = float(rng.uniform(1.8, 3.0)), float(rng.uniform(0.4, 0.8)), float(rng.uniform(0.005, 0.02))
    dark = scale * np.power(img, gamma)
    return dark + rng.normal(0, sigma, img.shape).astype(np.float32), dict(gamma=gamma, scale=scale, sigma=sigma)


def _noise(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    sigma = int(rng.choice([15, 25, 50]))
    return img + rng.normal(0, sigma / 255.0, img.shape).astype(np.float32), dict(sigma=sigma)


DEGRADE: dict[str, Callable[[np.ndarray, np.random.Generator], tuple[np.ndarray, dict]]] = {
    "derain": _rain,
    "dehaze": _haze,
    "desnow": _snow,
    "deblur": _motion_blur,
    "defocus": _defocus,
    "lowlight": _lowlight,
    "denoise": _noise,
}


def _raindrops(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    h, w = img.shape[:2]
    out = img.copy()
    n = int(rng.integers(2, 7))
    drops = []
    for _ in range(n):
        rx = float(rng.uniform(3, 9))
        ry = rx * float(rng.uniform(0.8, 1.3))
        cx, cy = float(rng.uniform(0, w)), float(rng.uniform(0, h))
        drops.append((round(cx, 1), round(cy, 1), round(rx, 1), round(ry, 1)))
        # what the drop shows: the scene around it (2.5x its size), upside down and squeezed into it, defocused
        x0, x1 = int(max(cx - 2.5 * rx, 0)), int(min(cx + 2.5 * rx, w))
        y0, y1 = int(max(cy - 2.5 * ry, 0)), int(min(cy + 2.5 * ry, h))
        bx0, bx1 = int(max(np.floor(cx - rx - 2), 0)), int(min(np.ceil(cx + rx + 2), w))
        by0, by1 = int(max(np.floor(cy - ry - 2), 0)), int(min(np.ceil(cy + ry + 2), h))
        if x1 - x0 < 2 or y1 - y0 < 2 or bx1 - bx0 < 2 or by1 - by0 < 2:
            continue
        seen = cv2.resize(img[y0:y1, x0:x1][::-1], (bx1 - bx0, by1 - by0), interpolation=cv2.INTER_AREA)
        seen = cv2.GaussianBlur(seen, (0, 0), float(rng.uniform(0.8, 1.6))) * 1.05 + 0.04
        mask = np.zeros((h, w), np.float32)
        cv2.ellipse(mask, ((cx, cy), (2 * rx, 2 * ry), 0.0), 1.0, -1, cv2.LINE_AA)
        mask = cv2.GaussianBlur(mask, (0, 0), 0.8)[by0:by1, bx0:bx1, None]
        rim = np.clip(np.linspace(-1.0, 1.0, by1 - by0), 0, 1)[:, None, None] * mask * (1 - mask) * 1.2
        region = out[by0:by1, bx0:bx1]
        out[by0:by1, bx0:bx1] = (region * (1 - mask) + seen * mask) * (1 - rim)
    return out, dict(drops=drops)


# built with raindrops=True only (a folder of its own): the default data and its folder stay as they were
RAINDROP = "deraindrop"
# the motion-blur kernels prepare_builtin_restore offers (``motion_kernel``): what ``deblur`` is degraded with
MOTION_KERNELS: dict[str, Callable[[np.ndarray, np.random.Generator], tuple[np.ndarray, dict]]] = {
    "trajectory": _motion_blur,
    "linear": _linear_motion_blur,
}


# ----------------------------------------------------------------------------------------------- writing
def _pyramids(names: tuple[str, ...]) -> dict[str, list[np.ndarray]]:
    out = {}
    for n in names:
        img = load_photo(n)
        h, w = img.shape[:2]
        out[n] = [cv2.resize(img, (round(w * s), round(h * s)), interpolation=cv2.INTER_AREA) for s in _SCALES]
    return out


def _draw_crop(rng: np.random.Generator, photos: dict[str, list[np.ndarray]], size: int) -> tuple[np.ndarray, dict]:
    names = sorted(photos)
    for _ in range(200):
        name = names[int(rng.integers(len(names)))]
        si = int(rng.integers(len(_SCALES)))
        src = photos[name][si]
        h, w = src.shape[:2]
        if h < size or w < size:
            continue
        y, x = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
        crop = src[y : y + size, x : x + size]
        if crop.astype(np.float32).std() / 255.0 >= _MIN_STD:
            return crop, dict(photo=name, scale=_SCALES[si], x=x, y=y)
    raise RuntimeError(f"no textured {size}px crop found in 200 draws from {names}")


def _write_split(
    out: Path,
    split: str,
    seed: int,
    num: int,
    size: int,
    photos: dict,
    baseline: bool = False,
    motion_kernel: str = "trajectory",
    degradations: tuple[str, ...] = BUILTIN_DEGRADATIONS,
) -> dict[str, dict[str, float]]:
    """Write ``num`` crops per degradation; with ``baseline``, return the mean PSNR / SSIM of lq vs gt per
    degradation."""
    from ..metrics.restoration import psnr, ssim

    degrade = dict(DEGRADE, deblur=MOTION_KERNELS[motion_kernel], **{RAINDROP: _raindrops})

    meta = []
    scores: dict[str, dict[str, float]] = {}
    for di, deg in enumerate(degradations):  # an added degradation comes last: the others' generators are unchanged
        for sub in ("lq", "gt"):
            (out / split / deg / sub).mkdir(parents=True, exist_ok=True)
        ps, ss = [], []
        for i in range(num):
            rng = np.random.default_rng([seed, _SPLIT_CODE[split], di, i])
            gt, where = _draw_crop(rng, photos, size)
            lq, params = degrade[deg](gt.astype(np.float32) / 255.0, rng)
            lq = np.clip(np.round(lq * 255.0), 0, 255).astype(np.uint8)
            name = f"{i:06d}.png"
            Image.fromarray(lq).save(out / split / deg / "lq" / name, compress_level=1)
            Image.fromarray(gt).save(out / split / deg / "gt" / name, compress_level=1)
            meta.append(dict(file=f"{deg}/{name}", degradation=deg, crop=where, params=params))
            if baseline:
                ps.append(psnr(lq / 255.0, gt / 255.0))
                ss.append(ssim(lq / 255.0, gt / 255.0))
        if baseline:
            scores[deg] = {"input_psnr": float(np.mean(ps)), "input_ssim": float(np.mean(ss))}
    with open(out / split / "crops.jsonl", "w") as f:
        f.writelines(json.dumps(m) + "\n" for m in meta)
    return scores


def prepare_builtin_restore(
    root: str | Path,
    seed: int = 0,
    num_train: int = 600,
    num_val: int = 40,
    img_size: int = 64,
    verify: bool = True,
    motion_kernel: str = "trajectory",
    raindrops: bool = False,
) -> Path:
    """Generate the built-in restoration data under ``root/<name-from-arguments>`` (or reuse it); return it.

    ``num_train`` / ``num_val`` crops of ``img_size`` pixels per degradation. Deterministic in the arguments;
    reused when ``manifest.json`` holds the same arguments and (with ``verify``) the same content hash, else
    regenerated. Written to a temporary folder and renamed into place (concurrent callers never see half of it).
    ``motion_kernel``: how ``deblur`` crops are blurred (``MOTION_KERNELS``: ``'trajectory'``, the default, or
    ``'linear'``); a non-default kernel gets a folder of its own, and only ``deblur`` crops differ. ``raindrops``:
    also ``deraindrop`` crops (:data:`RAINDROP`), in a folder of its own where every other crop is the default's.
    """
    if img_size < 16:
        raise ValueError(f"prepare_builtin_restore: img_size={img_size}; expected >= 16")
    if motion_kernel not in MOTION_KERNELS:
        raise ValueError(
            f"prepare_builtin_restore: motion_kernel={motion_kernel!r}; expected one of {list(MOTION_KERNELS)}"
        )
    params = dict(version=_VERSION, seed=seed, num_train=num_train, num_val=num_val, img_size=img_size)
    out = Path(root) / f"builtin_restore_v{_VERSION}_s{seed}_n{num_train}-{num_val}_{img_size}px"
    if motion_kernel != "trajectory":  # the default's folder and manifest stay as they were
        params["motion_kernel"] = motion_kernel
        out = out.with_name(f"{out.name}_motion-{motion_kernel}")
    degradations = BUILTIN_DEGRADATIONS
    if raindrops:
        params["raindrops"] = True
        out = out.with_name(f"{out.name}_raindrops")
        degradations = (*BUILTIN_DEGRADATIONS, RAINDROP)

    def write(tmp: Path) -> dict:
        kw = dict(motion_kernel=motion_kernel, degradations=degradations)
        _write_split(tmp, "train", seed, num_train, img_size, _pyramids(TRAIN_PHOTOS), **kw)
        baseline = _write_split(tmp, "val", seed, num_val, img_size, _pyramids(HELD_OUT_PHOTOS), True, **kw)
        return dict(
            degradations=list(degradations),
            photos={"train": list(TRAIN_PHOTOS), "val": list(HELD_OUT_PHOTOS)},
            val_input_baseline=baseline,
        )

    what = f"the built-in restoration data ({num_train} + {num_val} crops per degradation, {img_size} px)"
    return cached_folder(out, params, write, verify, what=what)


class BuiltinRestoration(RestorationPairs):
    """The built-in restoration data of a folder returned by :func:`prepare_builtin_restore`, read through the
    ``all_in_one`` reader (every crop has the same size)."""

    def __init__(self, root: str | Path, split: str, tasks=None, transform: RestorationTransform | None = None):
        root = Path(root)
        if split not in _SPLIT_CODE:
            raise ValueError(f"BuiltinRestoration: unknown split {split!r}; expected one of {list(_SPLIT_CODE)}")
        if not (root / "manifest.json").is_file():
            raise ValueError(f"{root}: no manifest.json; expected a folder returned by prepare_builtin_restore()")
        have = json.loads((root / "manifest.json").read_text()).get("degradations", list(BUILTIN_DEGRADATIONS))
        tasks = list(tasks) if tasks is not None else list(have)
        missing = [t for t in tasks if t not in have]
        if missing:
            hint = " (raindrops: true in the dataset's config makes deraindrop crops)" if RAINDROP in missing else ""
            raise ValueError(f"{root}: the built-in data has no {missing} crops; it has {list(have)}{hint}")
        samples, skipped = all_in_one_samples(root, split, tasks)
        super().__init__(samples, transform, skipped, uniform_size=True, source=str(root))
