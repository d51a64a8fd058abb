"""Heterogeneous multi-task sampling: each step draws one source (dataset) by weight or round-robin.

Every rank draws the same source at the same step (so DDP ranks run the same task graph) and a disjoint
shard of that source's samples. The whole state is a few integers, so a resumed run continues exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .common import collate_multitask


class TaskScheduler:
    """Source name for each step: ``weighted`` (a draw from a seeded generator) or ``round_robin``.

    The choice at step s is a pure function of (seed, s), so the state is just the step counter.
    """

    def __init__(
        self,
        names: Sequence[str],
        weights: Sequence[float] | Mapping[str, float] | None = None,
        mode: str = "weighted",
        seed: int = 0,
    ):
        if mode not in ("weighted", "round_robin"):
            raise ValueError(f"TaskScheduler: unknown mode {mode!r}; expected 'weighted' or 'round_robin'")
        self.names = list(names)
        if not self.names:
            raise ValueError("TaskScheduler: no sources given")
        if isinstance(weights, Mapping):
            unknown = set(weights) - set(self.names)
            if unknown:
                raise ValueError(f"TaskScheduler: weights for unknown sources {sorted(unknown)}; expected {self.names}")
            weights = [float(weights.get(n, 0.0)) for n in self.names]
        w = np.ones(len(self.names)) if weights is None else np.asarray(weights, np.float64)
        if w.shape != (len(self.names),) or (w < 0).any() or w.sum() <= 0:
            raise ValueError(
                f"TaskScheduler: weights {list(w)} must be {len(self.names)} non-negative numbers, not all 0"
            )
        self.probs = w / w.sum()
        self.mode = mode
        self.seed = int(seed)
        self.step = 0

    def task_at(self, step: int) -> str:
        if self.mode == "round_robin":
            return self.names[step % len(self.names)]
        u = np.random.default_rng([self.seed, step]).random()
        return self.names[min(int(np.searchsorted(np.cumsum(self.probs), u, side="right")), len(self.names) - 1)]

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        name = self.task_at(self.step)
        self.step += 1
        return name

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.step = int(state["step"])


class ShardedInfiniteSampler(torch.utils.data.Sampler[int]):
    """Endless indices into one dataset: a fresh seeded permutation per epoch, this rank's shard of it.

    Each epoch's permutation is padded (wrapping around) to a multiple of world_size, so all ranks take the
    same number of samples per epoch and no two ranks see the same index in an epoch.
    """

    def __init__(self, size: int, shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1):
        if size <= 0:
            raise ValueError(f"ShardedInfiniteSampler: dataset size {size}; expected > 0")
        if not 0 <= rank < world_size:
            raise ValueError(f"ShardedInfiniteSampler: rank {rank} outside 0..{world_size - 1}")
        self.size, self.shuffle, self.seed = size, shuffle, int(seed)
        self.rank, self.world_size = rank, world_size
        self.epoch, self.pos = 0, 0
        self._order: list[int] | None = None

    def _epoch_order(self, epoch: int) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(self.size, generator=g).tolist()
        else:
            perm = list(range(self.size))
        total = -(-self.size // self.world_size) * self.world_size
        perm = (perm * (total // self.size + 1))[:total]
        return perm[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        while True:
            yield self.next_index()

    def next_index(self) -> int:
        if self._order is None:
            self._order = self._epoch_order(self.epoch)
        if self.pos >= len(self._order):
            self.epoch, self.pos = self.epoch + 1, 0
            self._order = self._epoch_order(self.epoch)
        idx = self._order[self.pos]
        self.pos += 1
        return idx

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = None


@dataclass
class MultiTaskBatch:
    """One step's batch: the source it came from, the tasks that source labels, images and targets."""

    source: str
    tasks: tuple[str, ...]
    images: torch.Tensor  # (B, 3, H, W)
    targets: list[dict]
    step: int


class MultiTaskLoader:
    """Endless iterator of MultiTaskBatch over several sources, one source per step.

    ``sources`` maps a name to a dataset (with ``.tasks``); a source labelling several tasks (PASCAL-Context,
    NYUD-v2, the built-in data) yields one batch for all of them and the trainer runs the backbone once per
    task. Loading happens in this process so that ``state_dict()`` describes exactly what was consumed.
    """

    def __init__(
        self,
        sources: Mapping[str, torch.utils.data.Dataset],
        batch_size: int | Mapping[str, int],
        weights: Sequence[float] | Mapping[str, float] | None = None,
        mode: str = "weighted",
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        collate_fn: Callable[[list], tuple[torch.Tensor, list[dict]]] = collate_multitask,
    ):
        self.sources = dict(sources)
        names = list(self.sources)
        if isinstance(batch_size, Mapping):
            missing = set(names) - set(batch_size)
            if missing:
                raise ValueError(f"MultiTaskLoader: no batch size for sources {sorted(missing)}")
            self.batch_size = {n: int(batch_size[n]) for n in names}
        else:
            self.batch_size = {n: int(batch_size) for n in names}
        self.scheduler = TaskScheduler(names, weights, mode, seed)
        self.samplers = {
            n: ShardedInfiniteSampler(len(ds), shuffle, seed + 7919 * (k + 1), rank, world_size)
            for k, (n, ds) in enumerate(self.sources.items())
        }
        self.collate_fn = collate_fn

    def __iter__(self) -> MultiTaskLoader:
        return self

    def __next__(self) -> MultiTaskBatch:
        step = self.scheduler.step
        name = next(self.scheduler)
        ds, sampler = self.sources[name], self.samplers[name]
        items = [ds[sampler.next_index()] for _ in range(self.batch_size[name])]
        images, targets = self.collate_fn(items)
        return MultiTaskBatch(name, tuple(getattr(ds, "tasks", ())), images, targets, step)

    def state_dict(self) -> dict[str, Any]:
        return {
            "scheduler": self.scheduler.state_dict(),
            "samplers": {n: s.state_dict() for n, s in self.samplers.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if set(state["samplers"]) != set(self.samplers):
            raise ValueError(
                f"MultiTaskLoader: state has sources {sorted(state['samplers'])}, "
                f"this loader has {sorted(self.samplers)}"
            )
        self.scheduler.load_state_dict(state["scheduler"])
        for n, s in state["samplers"].items():
            self.samplers[n].load_state_dict(s)
