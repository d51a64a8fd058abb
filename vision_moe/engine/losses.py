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

__all__ = ["UncertaintyWeighting", "moe_aux_loss", "mutual_information_across_tasks"]


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


def mutual_information_across_tasks(aux_by_task: dict[str, Sequence[MoEAux]], weight: float) -> torch.Tensor | None:
    """Mod-Squad: minus the task-expert mutual information, per MoE layer, over the tasks run in this step."""
    if weight == 0 or len(aux_by_task) < 2:
        return None
    per_task = list(aux_by_task.values())
    n_layers = min(len(a) for a in per_task)
    total = None
    for i in range(n_layers):
        tp = task_expert_probs([a[i].probs for a in per_task])  # (T, E)
        term = mutual_information_loss(tp)
        total = term if total is None else total + term
    return None if total is None else weight * total
