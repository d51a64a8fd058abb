"""Paired restoration data (degraded input, ground truth) in the layouts the field distributes it in.

Four on-disk formats, each read into the same :class:`RestorationPairs` dataset (one degradation per sample):

- ``paired`` (BasicSR's ``PairedImageDataset``: ``dataroot_lq`` / ``dataroot_gt``): ``ROOT/<split>/lq/*`` and
  ``ROOT/<split>/gt/*``, paired by file stem (the extension may differ). One degradation for the whole set.
- ``allweather`` (TransWeather's Allweather lists): a text file ``ROOT/<split>.txt`` with one input path a line,
  relative to ROOT (e.g. ``input/im_0001.png``); the ground truth is the same path with its ``input`` folder
  replaced by ``gt`` (``gt/im_0001.png``). A line may name the sample's degradation after the path
  (``input/im_0001.png desnow``); otherwise the set's one degradation applies.
- ``gopro`` (GOPRO_Large): ``ROOT/<split>/<SEQ>/blur/*.png`` with ``ROOT/<split>/<SEQ>/sharp/*.png`` of the same
  name; degradation ``deblur`` unless the set names another.
- ``all_in_one``: ``ROOT/<split>/<degradation>/lq/*`` and ``.../gt/*``: each subfolder is a ``paired`` set named
  after its degradation (a registered restoration task, e.g. ``derain``). The built-in data is written so.

Bad input never stops reading: an input without its ground truth is left out when the set is indexed (counted in
``skipped`` and logged once); a grey or RGBA image is converted to RGB; an unreadable file or an input whose size
differs from its ground truth raises :class:`~vision_moe.data.BadSampleError` when loaded (the trainer skips and
counts it, as for every dataset).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch

from .common import BadSampleError, read_image

__all__ = [
    "IMAGE_EXTENSIONS",
    "RestorationSample",
    "RestorationPairs",
    "RestorationTransform",
    "paired_samples",
    "allweather_samples",
    "gopro_samples",
    "all_in_one_samples",
    "restoration_dataset",
]

_logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
READERS = ("paired", "allweather", "gopro", "all_in_one")


@dataclass(frozen=True)
class RestorationSample:
    lq: Path
    gt: Path
    task: str  # the degradation
    name: str  # the file name results are written under


Skipped = list[tuple[str, str]]  # (path, reason)


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _check_task(task: str, where: str) -> str:
    from ..tasks import TASKS, is_restoration

    if not is_restoration(task):
        known = sorted(t for t in TASKS if is_restoration(t))
        raise ValueError(f"{where}: {task!r} is not a degradation; expected one of {known}")
    return task


def _pair_folder(lq_dir: Path, gt_dir: Path, task: str, skipped: Skipped, prefix: str = "") -> list[RestorationSample]:
    """Pairs of ``lq_dir`` and ``gt_dir`` by file stem; inputs without a ground truth go to ``skipped``."""
    for d in (lq_dir, gt_dir):
        if not d.is_dir():
            raise ValueError(f"{d}: folder not found; expected paired folders {lq_dir.name}/ and {gt_dir.name}/")
    gts = {p.stem: p for p in _images(gt_dir)}
    out = []
    for p in _images(lq_dir):
        if p.stem in gts:
            out.append(RestorationSample(p, gts[p.stem], task, prefix + p.name))
        else:
            skipped.append((str(p), f"no ground truth {p.stem}.* in {gt_dir}"))
    return out


def paired_samples(
    root: str | Path, split: str, task: str, lq_dir: str = "lq", gt_dir: str = "gt"
) -> tuple[list[RestorationSample], Skipped]:
    """BasicSR paired folders ``ROOT/<split>/{lq,gt}``, one degradation ``task``."""
    base = Path(root) / split
    _check_task(task, f"{base}")
    skipped: Skipped = []
    return _pair_folder(base / lq_dir, base / gt_dir, task, skipped), skipped


def allweather_samples(root: str | Path, split: str, task: str | None) -> tuple[list[RestorationSample], Skipped]:
    """TransWeather's list file ``ROOT/<split>.txt``: ``input/NAME [degradation]`` a line, ground truth
    ``gt/NAME`` (the path's ``input`` folder replaced by ``gt``)."""
    root = Path(root)
    lst = root / f"{split}.txt"
    if not lst.is_file():
        raise ValueError(f"{lst}: list file not found; expected one input path (relative to {root}) a line")
    try:
        lines = lst.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"{lst}: not a UTF-8 text file; expected one input path a line") from None
    samples, skipped = [], []
    for ln, line in enumerate(lines, 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) > 2:
            raise ValueError(f"{lst}:{ln}: {line!r}; expected '<input path> [degradation]'")
        rel = Path(parts[0])
        t = parts[1] if len(parts) == 2 else task
        if t is None:
            raise ValueError(f"{lst}:{ln}: no degradation on the line and the set names none; expected one")
        _check_task(t, f"{lst}:{ln}")
        if "input" not in rel.parts:
            raise ValueError(f"{lst}:{ln}: {parts[0]!r} has no 'input' folder; expected e.g. input/NAME.png")
        i = rel.parts.index("input")
        gt = root.joinpath(*rel.parts[:i], "gt", *rel.parts[i + 1 :])
        lq = root / rel
        if not lq.is_file():
            skipped.append((str(lq), "input listed but not found"))
        elif not gt.is_file():
            skipped.append((str(lq), f"no ground truth {gt}"))
        else:
            samples.append(RestorationSample(lq, gt, t, rel.name))
    return samples, skipped


def gopro_samples(root: str | Path, split: str, task: str = "deblur") -> tuple[list[RestorationSample], Skipped]:
    """GOPRO_Large ``ROOT/<split>/<SEQ>/{blur,sharp}/*.png``; results are named ``SEQ_NAME``."""
    base = Path(root) / split
    _check_task(task, f"{base}")
    if not base.is_dir():
        raise ValueError(f"{base}: folder not found; expected {base}/<sequence>/blur and .../sharp")
    seqs = sorted(p for p in base.iterdir() if p.is_dir())
    if not seqs:
        raise ValueError(f"{base}: no sequence folders; expected {base}/<sequence>/blur and .../sharp")
    samples, skipped = [], []
    for seq in seqs:
        if not (seq / "blur").is_dir():
            skipped.append((str(seq), "no blur/ folder"))
            continue
        samples += _pair_folder(seq / "blur", seq / "sharp", task, skipped, prefix=f"{seq.name}_")
    return samples, skipped


def all_in_one_samples(
    root: str | Path, split: str, tasks: Sequence[str] | None = None
) -> tuple[list[RestorationSample], Skipped]:
    """``ROOT/<split>/<degradation>/{lq,gt}``; only the degradations in ``tasks`` (all when None) are read."""
    base = Path(root) / split
    if not base.is_dir():
        raise ValueError(f"{base}: folder not found; expected {base}/<degradation>/lq and .../gt")
    subs = sorted(p for p in base.iterdir() if p.is_dir())
    if not subs:
        raise ValueError(f"{base}: no degradation folders; expected {base}/<degradation>/lq and .../gt")
    samples, skipped = [], []
    for sub in subs:
        _check_task(sub.name, f"{sub}: folder name")
        if tasks is None or sub.name in tasks:
            samples += _pair_folder(sub / "lq", sub / "gt", sub.name, skipped, prefix=f"{sub.name}/")
    return samples, skipped


class RestorationTransform:
    """Paired (input, ground truth) uint8 images -> (input normalised with mean/std, target dict).

    Training: the same random ``img_size`` crop of both (reflect-padded first when smaller) and, with ``flips``,
    one of the eight flips / 90-degree rotations (albumentations' D4). Evaluation: the full image, untouched
    (ground truth is never resized). The target holds ``gt`` in [0, 1] (3, H, W), and in evaluation ``lq`` in
    [0, 1] (the input baseline)."""

    def __init__(
        self,
        train: bool,
        img_size: int | None,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
        flips: bool = True,
        seed: int | None = None,
    ) -> None:
        self.train = train
        self.mean = np.asarray(mean, np.float32).reshape(1, 1, 3)
        self.std = np.asarray(std, np.float32).reshape(1, 1, 3)
        ops: list[A.BasicTransform] = []
        if train:
            if not img_size:
                raise ValueError("RestorationTransform: train=True needs an img_size")
            ops = [
                A.PadIfNeeded(min_height=img_size, min_width=img_size, border_mode=cv2.BORDER_REFLECT_101),
                A.RandomCrop(img_size, img_size),
                *([A.D4()] if flips else []),
            ]
        self.compose = A.Compose(ops, additional_targets={"gt": "image"}, seed=seed, strict=True)

    def __call__(self, lq: np.ndarray, gt: np.ndarray) -> tuple[torch.Tensor, dict[str, Any]]:
        out = self.compose(image=lq, gt=gt)
        lq01 = out["image"].astype(np.float32) / 255.0
        gt01 = out["gt"].astype(np.float32) / 255.0
        image = torch.from_numpy(((lq01 - self.mean) / self.std).transpose(2, 0, 1).copy())  # (3, H, W)
        target: dict[str, Any] = {"gt": torch.from_numpy(gt01.transpose(2, 0, 1).copy())}
        if not self.train:
            target["lq"] = torch.from_numpy(lq01.transpose(2, 0, 1).copy())
        return image, target


class RestorationPairs(torch.utils.data.Dataset):
    """(degraded image, target) pairs: ``target`` = {"gt", ["lq"], "degradation", "name", "image_id"}.

    ``sample_tasks`` lists each sample's degradation (the trainer runs one degradation per step);
    ``uniform_size`` says whether every image has the same size (then evaluation may batch them);
    ``skipped`` lists the inputs left out when indexing (path, reason)."""

    def __init__(
        self,
        samples: Sequence[RestorationSample],
        transform: RestorationTransform | None = None,
        skipped: Skipped | None = None,
        uniform_size: bool = False,
        source: str = "",
    ) -> None:
        self.samples = list(samples)
        self.transform = transform or RestorationTransform(train=False, img_size=None)
        self.skipped = list(skipped or [])
        self.uniform_size = uniform_size
        self.sample_tasks = [s.task for s in self.samples]
        self.tasks = tuple(dict.fromkeys(self.sample_tasks))
        if self.skipped:
            _logger.warning("%s: %d input(s) left out (first: %s: %s)", source, len(self.skipped), *self.skipped[0])

    def __len__(self) -> int:
        return len(self.samples)

    def load_raw(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        s = self.samples[index]
        lq, gt = read_image(s.lq), read_image(s.gt)  # RGB uint8 (grey and RGBA converted)
        if lq.shape != gt.shape:
            raise BadSampleError(
                s.lq,
                f"size {lq.shape[1]}x{lq.shape[0]} differs from its ground truth {s.gt} ({gt.shape[1]}x"
                f"{gt.shape[0]}); expected the same size",
            )
        return lq, gt

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        s = self.samples[index]
        image, target = self.transform(*self.load_raw(index))
        target.update(degradation=s.task, name=s.name, image_id=index)
        return image, target


def restoration_dataset(
    fmt: str,
    root: str | Path,
    split: str,
    tasks: Sequence[str],
    transform: RestorationTransform | None = None,
    lq_dir: str = "lq",
    gt_dir: str = "gt",
) -> RestorationPairs:
    """The ``fmt`` set (``paired``, ``allweather``, ``gopro``, ``all_in_one``) of ``split``, for ``tasks``.

    ``paired`` and ``gopro`` hold one degradation: ``tasks`` must name exactly one (``gopro``: ``deblur`` by
    default). ``allweather`` takes its lines' degradations, or ``tasks``' only one for lines without."""
    tasks = list(tasks)
    where = f"{Path(root)} ({fmt})"
    if fmt in ("paired", "gopro") and len(tasks) != 1:
        raise ValueError(f"{where}: a {fmt} set holds one degradation; expected one task, got {tasks}")
    if fmt == "paired":
        samples, skipped = paired_samples(root, split, tasks[0], lq_dir, gt_dir)
    elif fmt == "gopro":
        samples, skipped = gopro_samples(root, split, tasks[0])
    elif fmt == "allweather":
        samples, skipped = allweather_samples(root, split, tasks[0] if len(tasks) == 1 else None)
        samples = [s for s in samples if s.task in tasks]
    elif fmt == "all_in_one":
        samples, skipped = all_in_one_samples(root, split, tasks)
    else:
        raise ValueError(f"unknown restoration format {fmt!r}; expected one of {list(READERS)}")
    if not samples:
        first = f" (first left out: {skipped[0][0]}: {skipped[0][1]})" if skipped else ""
        raise ValueError(f"{where}: no input/ground-truth pairs for {tasks} in split {split!r}{first}")
    return RestorationPairs(samples, transform, skipped, source=where)
