"""Datasets from a config and the deterministic step plan (which dataset, which samples, which augmentation
seed at every step), so a resumed run sees exactly the batches an uninterrupted one would."""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import Config, DatasetConfig, dataset_tasks

__all__ = [
    "build_dataset",
    "split_by_task",
    "StepPlan",
    "PlanDataset",
    "collate_plan",
    "PackedTargets",
    "BadSampleTracker",
    "TooManyBadSamples",
    "reseed_sample",
    "train_size_at",
]

_logger = logging.getLogger(__name__)


def train_size_at(schedule: Sequence[Sequence[int]], step: int, default: int) -> int:
    """The training crop size at ``step`` under ``data.size_schedule`` (``[[from_step, size], ...]``, steps
    increasing); ``default`` (``model.img_size``) before its first step or when it is empty."""
    size = default
    for start, s in schedule:
        if step < start:
            break
        size = s
    return size


def _restoration_dataset(
    ds: DatasetConfig, cfg: Config, split: str, train: bool, tasks: list[str], img_size: int | None = None
):
    from ..data.restoration import RestorationTransform, restoration_dataset

    tf = RestorationTransform(train, (img_size or cfg.model.img_size) if train else None, flips=cfg.data.augment)
    root = Path(ds.root).expanduser()
    if ds.format == "builtin_restore":
        from ..data.builtin_restore import BuiltinRestoration, prepare_builtin_restore

        root = prepare_builtin_restore(
            root,
            seed=ds.seed,
            num_train=ds.num_train,
            num_val=ds.num_val,
            img_size=cfg.model.img_size,
            motion_kernel=ds.motion_kernel,
            raindrops=ds.raindrops,
        )
        return BuiltinRestoration(root, split, tasks=tasks, transform=tf)
    return restoration_dataset(ds.format, root, split, tasks, tf, lq_dir=ds.lq_dir, gt_dir=ds.gt_dir)


def build_dataset(
    ds: DatasetConfig,
    cfg: Config,
    split: str,
    train: bool,
    tasks: Sequence[str] | None = None,
    progress: bool = False,
    img_size: int | None = None,
):
    """A dataset of ``ds.format`` for ``split`` with the data layer's albumentations pipeline. The built-in data is
    generated on first use (``progress``: with a tqdm bar, see :func:`~vision_moe.data.builtin.prepare_builtin`).
    ``img_size``: the training crop size when it is not ``model.img_size`` (``data.size_schedule``); the built-in
    data is generated at ``model.img_size`` whatever the crop."""
    from ..config import RESTORATION_FORMATS
    from ..data.transforms import build_transforms

    tasks = list(tasks) if tasks is not None else dataset_tasks(ds, cfg.tasks)
    if ds.format in RESTORATION_FORMATS:
        return _restoration_dataset(ds, cfg, split, train, tasks, img_size)
    augment = train and cfg.data.augment
    tf = build_transforms(
        train=augment,
        img_size=(img_size or cfg.model.img_size) if train else cfg.model.img_size,
        mean=cfg.data.mean,
        std=cfg.data.std,
        tasks=tasks,
        **({"scale": tuple(cfg.data.crop_scale)} if augment else {}),
    )
    root = Path(ds.root).expanduser()
    if ds.format == "builtin":
        from ..data.builtin import BuiltinDataset, prepare_builtin

        root = prepare_builtin(
            root,
            seed=ds.seed,
            num_train=ds.num_train,
            num_val=ds.num_val,
            img_size=cfg.model.img_size,
            progress=progress,
        )
        return BuiltinDataset(root, split, tasks=tasks, transform=tf)
    from .. import data as D

    cls = {
        "coco": D.CocoDetection,
        "ade20k": D.SegmentationFolder,
        "imagenet_folder": D.ImageFolderClassification,
        "pascal_context": D.PascalContextMT,
        "nyud": D.NYUDv2MT,
    }[ds.format]
    kwargs: dict[str, Any] = {"tasks": tasks, "transform": tf}
    if ds.format == "coco":
        ann = ds.ann_file if split == ds.train_split else (ds.val_ann_file or ds.ann_file)
        if ann:
            kwargs["ann_file"] = root / ann
    return cls(root, split, **kwargs)


def split_by_task(dataset: Any, tasks: Sequence[str], mixed: bool = False) -> list[tuple[Any, list[str]]]:
    """(dataset, tasks) pairs a step or an evaluation runs on. A multi-task dataset labels every task on every
    image: one pair. A dataset with one task per sample (``sample_tasks``: restoration pairs, one degradation
    each) becomes one subset per task, so that an evaluation (or, with ``mixed=False``, a training step) runs one
    degradation; with ``mixed`` it stays one pair whose batches mix its tasks (all-in-one training)."""
    per_sample = getattr(dataset, "sample_tasks", None)
    if per_sample is None:
        return [(dataset, list(tasks))]
    if mixed:
        present = set(per_sample)
        return [(dataset, [t for t in tasks if t in present])]
    out = []
    for t in tasks:
        idx = [i for i, s in enumerate(per_sample) if s == t]
        if idx:
            out.append((torch.utils.data.Subset(dataset, idx), [t]))
    return out


def reseed_sample(dataset: Any, seed: int) -> None:
    """Seed every RNG a sample's loading and augmentation may use (python, numpy, torch, albumentations)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    # the CPU generator only: torch.manual_seed also seeds every accelerator backend, and its CUDA part records a
    # stack trace per call (lazy init) -- 1.3 ms per sample, a third of the loader's time on the quickstart
    torch.default_generator.manual_seed(seed)
    ds = dataset
    while ds is not None:
        tf = getattr(ds, "transform", None)
        comp = getattr(tf, "compose", tf)
        if hasattr(comp, "set_random_seed"):
            comp.set_random_seed(seed)
            return
        ds = getattr(ds, "dataset", None)


class StepPlan:
    """Step s -> (dataset index, this rank's sample indices, per-sample seeds); a pure function of the seed.

    Datasets are drawn round-robin or by weight (one per step, the same on every rank); inside a dataset,
    each epoch is a seeded permutation cut into global batches of ``batch_size * world``, rank r taking every
    world-th sample. Incomplete last batches are dropped.
    """

    def __init__(
        self,
        sizes: Sequence[int],
        batch_size: int,
        seed: int,
        mode: str = "round_robin",
        weights: Sequence[float] | None = None,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        if any(n <= 0 for n in sizes):
            raise ValueError(f"empty dataset in {list(sizes)}")
        self.sizes, self.batch_size, self.seed, self.mode = list(sizes), batch_size, seed, mode
        self.weights = torch.tensor(list(weights) if weights else [1.0] * len(sizes), dtype=torch.float64)
        self.rank, self.world = rank, world
        self._perm_cache: dict[tuple[int, int], torch.Tensor] = {}

    def _dataset_at(self, step: int) -> int:
        if self.mode == "round_robin" or len(self.sizes) == 1:
            return step % len(self.sizes)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        return int(torch.multinomial(self.weights, 1, generator=g))

    def _perm(self, d: int, epoch: int) -> torch.Tensor:
        key = (d, epoch)
        if key not in self._perm_cache:
            g = torch.Generator().manual_seed(self.seed * 7_919 + d * 104_729 + epoch)
            self._perm_cache = {k: v for k, v in self._perm_cache.items() if k[0] != d}
            self._perm_cache[key] = torch.randperm(self.sizes[d], generator=g)
        return self._perm_cache[key]

    def plan(self, start: int, stop: int) -> list[tuple[int, list[int], list[int]]]:
        """The entries of steps ``start .. stop-1``."""
        counts = [0] * len(self.sizes)
        for s in range(start):
            counts[self._dataset_at(s)] += 1
        out = []
        gb = self.batch_size * self.world
        for s in range(start, stop):
            d = self._dataset_at(s)
            n = self.sizes[d]
            per_epoch = max(1, n // gb)
            epoch, j = divmod(counts[d], per_epoch)
            counts[d] += 1
            perm = self._perm(d, epoch)
            idx = [int(perm[(j * gb + k) % n]) for k in range(gb)][self.rank :: self.world]
            seeds = [(self.seed * 1_000_003 + d * 7_919 + epoch * 104_729 + i) % 2**31 for i in idx]
            out.append((d, idx, seeds))
        return out


@dataclass
class _Bad:
    reason: str


class PlanDataset(torch.utils.data.Dataset):
    """Items are (dataset index, sample index, seed); each sample is loaded after reseeding its RNGs. A sample
    raising ``BadSampleError`` comes back as a :class:`_Bad` record (counted by the trainer, not fatal)."""

    def __init__(self, datasets: Sequence[Any]) -> None:
        self.datasets = list(datasets)

    def __len__(self) -> int:
        return sum(len(d) for d in self.datasets)

    def __getitem__(self, item: tuple[int, int, int]):
        from ..data import BadSampleError

        d, i, seed = item
        ds = self.datasets[d]
        in_main = torch.utils.data.get_worker_info() is None
        if in_main:  # loading in the training process: leave its RNG streams (router noise, dropout) untouched
            saved = torch.get_rng_state(), np.random.get_state(), random.getstate()
        reseed_sample(ds, seed)
        try:
            return ds[i]
        except BadSampleError as e:
            return _Bad(str(e))
        finally:
            if in_main:
                torch.set_rng_state(saved[0])
                np.random.set_state(saved[1])
                random.setstate(saved[2])


class PackedTargets:
    """A batch's target dicts packed into one flat buffer per dtype for the trip from a loader worker to the
    training process; :meth:`unpack` gives the list of dicts back (its tensors are views of the buffers).

    Why: every tensor that leaves a worker travels through its own shared-memory segment, and opening one costs
    the receiving process about a millisecond — 16 samples x 5 target tensors made the quickstart's training
    process wait ~60 ms per step for data that took 27 ms to make.
    """

    def __init__(self, targets: Sequence[dict]) -> None:
        chunks: dict[torch.dtype, list[torch.Tensor]] = {}
        offsets: dict[torch.dtype, int] = {}
        self.layout: list[list[tuple[str, bool, Any]]] = []  # per sample: (key, is a tensor, where / value)
        for t in targets:
            entry = []
            for k, v in t.items():
                if isinstance(v, torch.Tensor):
                    off = offsets.get(v.dtype, 0)
                    chunks.setdefault(v.dtype, []).append(v.reshape(-1))
                    offsets[v.dtype] = off + v.numel()
                    entry.append((k, True, (v.dtype, off, tuple(v.shape))))
                else:
                    entry.append((k, False, v))
            self.layout.append(entry)
        self.buffers = {dt: torch.cat(c) for dt, c in chunks.items()}

    def __len__(self) -> int:
        return len(self.layout)

    def unpack(self) -> list[dict]:
        out = []
        for entry in self.layout:
            t = {}
            for k, is_tensor, v in entry:
                if is_tensor:
                    dt, off, shape = v
                    t[k] = self.buffers[dt][off : off + math.prod(shape)].view(shape)
                else:
                    t[k] = v
            out.append(t)
        return out


def collate_plan(batch: list) -> tuple[torch.Tensor, PackedTargets, list[str]]:
    """(images (B, 3, H, W), packed targets (``.unpack()`` -> list of dicts), reasons of the bad samples
    dropped from this batch)."""
    from ..data import collate_multitask

    bad = [b.reason for b in batch if isinstance(b, _Bad)]
    images, targets = collate_multitask([b for b in batch if not isinstance(b, _Bad)])
    return images, PackedTargets(targets), bad


class TooManyBadSamples(RuntimeError):
    """More samples than ``data.max_bad_fraction`` could not be read."""


class BadSampleTracker:
    """Counts unreadable samples; raises :class:`TooManyBadSamples` once their fraction exceeds the limit
    (checked after ``min_seen`` samples so one early bad file does not stop a run). ``count`` is exact; the
    reasons kept for the report (``bad``) are the first ``MAX_REASONS``."""

    MAX_REASONS = 1000

    def __init__(self, max_fraction: float, min_seen: int = 50) -> None:
        self.max_fraction, self.min_seen = max_fraction, min_seen
        self.seen = 0
        self.count = 0
        self.bad: list[str] = []

    def update(self, n_seen: int, reasons: Sequence[str]) -> None:
        self.seen += n_seen
        self.count += len(reasons)
        for r in reasons:
            if len(self.bad) < self.MAX_REASONS:
                self.bad.append(r)
            _logger.warning("skipped bad sample: %s", r)
        self.check(final=False)

    @property
    def fraction(self) -> float:
        return self.count / max(1, self.seen)

    def check(self, final: bool = True) -> None:
        if (final or self.seen >= self.min_seen) and self.count and self.fraction > self.max_fraction:
            raise TooManyBadSamples(
                f"{self.count} of {self.seen} samples were unreadable ({self.fraction:.1%} > data.max_bad_fraction="
                f"{self.max_fraction:.1%}); first: {self.bad[0]}"
            )

    def state_dict(self) -> dict:
        return {"seen": self.seen, "count": self.count, "bad": list(self.bad)}

    def load_state_dict(self, s: dict) -> None:
        self.seen, self.bad = int(s["seen"]), list(s["bad"])
        self.count = int(s.get("count", len(self.bad)))  # checkpoints before the exact count: the list was it
