"""MoE auxiliary losses as pure functions of router outputs (nothing is stored on modules)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "cv_squared",
    "importance_load_loss",
    "switch_load_balance_loss",
    "router_z_loss",
    "task_expert_probs",
    "mutual_information_loss",
]


def cv_squared(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Squared coefficient of variation var(x) / mean(x)^2 (0 for a single value)."""
    x = x.float()
    if x.numel() <= 1:
        return x.new_zeros(())
    return x.var() / (x.mean() ** 2 + eps)


def _dense_gates(
    probs: torch.Tensor, expert_index: torch.Tensor, combine_weights: torch.Tensor, keep: torch.Tensor | None = None
) -> torch.Tensor:
    w = combine_weights if keep is None else combine_weights * keep.to(combine_weights.dtype)
    return torch.zeros_like(probs).scatter(-1, expert_index, w)  # (S, E)


def importance_load_loss(
    probs: torch.Tensor,
    expert_index: torch.Tensor,
    combine_weights: torch.Tensor,
    load_prob: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """M³ViT / Shazeer et al.: cv²(importance) + cv²(load).

    importance[e] = sum over tokens of the gate value given to e (zero where e was not chosen);
    load[e] = the smooth P(e in top-k) under the router noise when available (training), else the
    number of tokens sent to e.
    """
    gates = _dense_gates(probs, expert_index, combine_weights, keep)
    importance = gates.sum(0)
    load = load_prob.sum(0) if load_prob is not None else (gates > 0).float().sum(0)
    return cv_squared(importance) + cv_squared(load)


def switch_load_balance_loss(probs: torch.Tensor, expert_index: torch.Tensor) -> torch.Tensor:
    """Switch Transformer balance loss E * sum_e f_e * P_e, with f_e the fraction of the S*k assignments to e."""
    num_experts = probs.shape[-1]
    counts = torch.zeros(num_experts, device=probs.device, dtype=probs.dtype)
    counts = counts.index_add(0, expert_index.reshape(-1), torch.ones_like(expert_index.reshape(-1), dtype=probs.dtype))
    f = counts / expert_index.numel()
    p = probs.mean(0)
    return num_experts * (f * p).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2 (masked -inf experts ignored)."""
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


def task_expert_probs(probs_per_task: Sequence[torch.Tensor]) -> torch.Tensor:
    """(T, E): each task's mean routing probability over its tokens."""
    return torch.stack([p.float().mean(0) for p in probs_per_task])


def mutual_information_loss(
    task_probs: torch.Tensor, task_prior: torch.Tensor | None = None, eps: float = 1e-12
) -> torch.Tensor:
    """Mod-Squad's task-expert loss: minus the mutual information of the joint M[t, e].

    ``task_probs`` (T, E) is each task's mean routing probability; ``task_prior`` P(t) defaults to
    uniform. M[t, e] = P(t) * task_probs[t, e] (a joint distribution), and the loss is
    -sum M log(M / (P(t) P(e))). Minimising it makes tasks use distinct experts while each expert stays used.
    """
    t = task_probs.shape[0]
    pt = torch.full((t,), 1.0 / t, device=task_probs.device) if task_prior is None else task_prior.float()
    pt = pt / pt.sum()
    joint = task_probs.float() / task_probs.float().sum(-1, keepdim=True).clamp_min(eps) * pt[:, None]
    pe = joint.sum(0)
    ratio = joint / (pt[:, None] * pe[None, :]).clamp_min(eps)
    mi = torch.where(joint > 0, joint * torch.log(ratio.clamp_min(eps)), torch.zeros_like(joint)).sum()
    return -mi
