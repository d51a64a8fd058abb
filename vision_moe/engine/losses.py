"""Combining task losses: per-task weights, optional learned uncertainty weighting, MoE aux losses from aux records."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from ..config import MoELossConfig
from ..moe import MoEAux
from ..moe.losses import (
    importance_load_loss,
    mutual_information_loss,
    router_z_loss,
    switch_load_balance_loss,
    task_expert_probs,
)

__all__ = ["TaskRoutingMemory", "UncertaintyWeighting", "moe_aux_loss", "mutual_information_across_tasks"]


class UncertaintyWeighting(nn.Module):
    """Kendall et al. learned weighting (used by Mod-Squad): L = sum_t exp(-s_t) L_t + s_t, s_t = log sigma_t^2."""

    def __init__(self, tasks: Sequence[str]) -> None:
        super().__init__()
        self.tasks = tuple(tasks)
        self.log_vars = nn.Parameter(torch.zeros(len(self.tasks)))

    def forward(self, task: str, loss: torch.Tensor) -> torch.Tensor:
        s = self.log_vars[self.tasks.index(task)]
        return torch.exp(-s) * loss + s


def moe_aux_loss(aux: Sequence[MoEAux], cfg: MoELossConfig) -> torch.Tensor | None:
    """Weighted load-balancing (+ z) loss summed over the MoE layers of one forward; None when there is none."""
    if not aux or (cfg.aux_loss == "none" and cfg.z_weight == 0):
        return None
    total = aux[0].probs.new_zeros(())
    for a in aux:
        if cfg.aux_loss == "importance_load":
            total = total + cfg.aux_weight * importance_load_loss(
                a.probs, a.expert_index, a.combine_weights, a.load_prob, a.keep
            )
        elif cfg.aux_loss == "switch":
            total = total + cfg.aux_weight * switch_load_balance_loss(a.probs, a.expert_index)
        if cfg.z_weight:
            total = total + cfg.z_weight * router_z_loss(a.logits)
    return total


class TaskRoutingMemory(nn.Module):
    """Each task's mean routing probability per MoE layer, as a moving average over the steps that ran it.

    Mod-Squad computes its task-expert mutual information on batches that mix tasks. With heterogeneous data a
    step holds one dataset, often one task, and the MI over that step alone is zero. The memory supplies the
    other tasks' rows (detached, so only the live task's router gets the gradient), which is the same joint
    M[t, e] the paper estimates over a mixed batch, with the absent tasks' rows from recent steps. Buffers, so
    DDP broadcasts rank 0's copy each step and checkpoints carry it (exact resume).
    """

    def __init__(self, tasks: Sequence[str], experts_per_layer: Sequence[int], momentum: float = 0.9) -> None:
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"moe.mi_momentum={momentum}: expected 0 <= momentum < 1")
        self.tasks = tuple(tasks)
        self.momentum = momentum
        for i, e in enumerate(experts_per_layer):
            self.register_buffer(f"mean_{i}", torch.zeros(len(self.tasks), int(e)))
        # uint8, not bool: DDP broadcasts buffers and gloo has no bool type
        self.register_buffer("seen", torch.zeros(len(self.tasks), dtype=torch.uint8))

    def layer(self, i: int) -> torch.Tensor:
        return getattr(self, f"mean_{i}")

    def has_seen(self, task: str) -> bool:
        return bool(self.seen[self.tasks.index(task)])

    @torch.no_grad()
    def update(self, task: str, layer_means: Sequence[torch.Tensor]) -> None:
        t = self.tasks.index(task)
        first = not self.has_seen(task)
        for i, m in enumerate(layer_means):
            buf = self.layer(i)
            buf[t] = m.float() if first else self.momentum * buf[t] + (1 - self.momentum) * m.float()
        self.seen[t] = 1


def mutual_information_across_tasks(
    aux_by_task: dict[str, Sequence[MoEAux]], weight: float, memory: TaskRoutingMemory | None = None
) -> torch.Tensor | None:
    """Mod-Squad: minus the task-expert mutual information, per MoE layer, over the tasks run in this step and,
    with ``memory``, the other tasks it has seen (their rows detached). Updates ``memory`` with this step's rows.
    None when fewer than two tasks take part."""
    if weight == 0:
        return None
    tasks = list(aux_by_task)
    n_layers = min(len(a) for a in aux_by_task.values()) if tasks else 0
    live = [task_expert_probs([aux_by_task[t][i].probs for t in tasks]) for i in range(n_layers)]  # (T, E) each
    absent = [] if memory is None else [t for t in memory.tasks if memory.has_seen(t) and t not in aux_by_task]
    total = None
    if len(tasks) + len(absent) >= 2:
        for i, rows in enumerate(live):
            if absent:
                rows = torch.cat([rows, torch.stack([memory.layer(i)[memory.tasks.index(t)] for t in absent])])
            term = mutual_information_loss(rows)
            total = term if total is None else total + term
    if memory is not None:
        for j, t in enumerate(tasks):
            memory.update(t, [rows[j] for rows in live])
    return None if total is None else weight * total
