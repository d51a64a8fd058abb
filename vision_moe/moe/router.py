"""Routers: turn tokens into expert scores. Scores only; dispatch is planned elsewhere.

All routers compute in fp32 with autocast off (router precision matters for stable top-k).
Task conditioning lives only here: a router is called as ``router(x, task)``. The task-independent routers
(``shared``, ``uncertainty``) accept ``task=None`` and only check a given task against the ones they know.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "RouterOutput",
    "TopKGate",
    "MultiGateRouter",
    "TaskEmbeddingRouter",
    "SharedRouter",
    "UncertaintyRouter",
    "create_router",
]


@dataclass
class RouterOutput:
    """What a router returns for S tokens and E experts."""

    logits: torch.Tensor  # (S, E) clean logits, fp32, -inf for experts the task may not use
    probs: torch.Tensor  # (S, E) softmax over all (allowed) experts, fp32
    expert_index: torch.Tensor  # (S, k) int64, chosen experts, best first
    combine_weights: torch.Tensor  # (S, k) fp32, probs of the chosen experts (renormalised if asked)
    load_prob: torch.Tensor | None = None  # (S, E) smooth P(expert in top-k) under the noise, training only


def _normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


class TopKGate(nn.Module):
    """V-MoE / M³ViT noisy top-k gate over a (S, in_dim) token matrix.

    softmax over all experts, keep the top-k probabilities (un-normalised unless ``renormalize``).
    During training Gaussian noise of std ``noise_std / num_experts`` is added to the logits before
    the top-k choice (V-MoE). ``expert_mask`` (bool, E) marks the experts this gate may choose; the
    rest get -inf logits, so they are unreachable and can be cut out by specialisation.
    """

    def __init__(
        self,
        in_dim: int,
        num_experts: int,
        top_k: int,
        noise_std: float = 1.0,
        renormalize: bool = False,
        bias: bool = False,
    ) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        self.num_experts = num_experts
        self.top_k = top_k
        self.noise_std = float(noise_std)
        self.renormalize = renormalize
        self.proj = nn.Linear(in_dim, num_experts, bias=bias)
        self.register_buffer("expert_mask", torch.ones(num_experts, dtype=torch.bool))
        nn.init.normal_(self.proj.weight, std=0.02)  # V-MoE initialises the router with small normal weights

    @property
    def weight(self) -> torch.Tensor:
        return self.proj.weight

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 gate logits (S, E) of a (S, in_dim) input; call under autocast disabled."""
        bias = None if self.proj.bias is None else self.proj.bias.float()
        return F.linear(x.float(), self.proj.weight.float(), bias)

    def forward(self, x: torch.Tensor) -> RouterOutput:  # x: (S, in_dim)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self.route(self.logits(x))

    def route(self, logits: torch.Tensor) -> RouterOutput:
        """Top-k routing from clean fp32 logits (S, E)."""
        k = self.top_k
        # Unconditional (no data-dependent Python branch): keeps the graph static for torch.export / ONNX.
        logits = logits.masked_fill(~self.expert_mask, float("-inf"))
        probs = logits.softmax(dim=-1)
        sigma = self.noise_std / self.num_experts
        load_prob = None
        if self.training and sigma > 0:
            noisy = logits + torch.randn_like(logits) * sigma
            _, expert_index = noisy.topk(k, dim=-1)
            load_prob = self._prob_in_top_k(logits, noisy, sigma)
        else:
            _, expert_index = logits.topk(k, dim=-1)
        combine = probs.gather(-1, expert_index)
        if self.renormalize:
            combine = combine / combine.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(combine.dtype).tiny)
        return RouterOutput(
            logits=logits, probs=probs, expert_index=expert_index, combine_weights=combine, load_prob=load_prob
        )

    def _prob_in_top_k(self, clean: torch.Tensor, noisy: torch.Tensor, sigma: float) -> torch.Tensor:
        """Shazeer et al. smooth load estimate: P(expert e stays in the top-k when only its noise is redrawn)."""
        k = self.top_k
        if k >= self.num_experts:
            return torch.ones_like(clean)
        top_vals, _ = noisy.topk(k + 1, dim=-1)  # (S, k+1)
        thr_in = top_vals[:, k : k + 1]  # threshold for an expert currently in the top-k
        thr_out = top_vals[:, k - 1 : k]  # threshold for an expert currently outside
        is_in = noisy > thr_in
        finite = torch.isfinite(clean)
        clean_f = torch.where(finite, clean, torch.zeros_like(clean))
        p_in = _normal_cdf((clean_f - thr_in) / sigma)
        p_out = _normal_cdf((clean_f - thr_out) / sigma)
        return torch.where(finite, torch.where(is_in, p_in, p_out), torch.zeros_like(clean))

    def extra_repr(self) -> str:
        return (
            f"experts={self.num_experts}, top_k={self.top_k}, noise_std={self.noise_std}, "
            f"renormalize={self.renormalize}"
        )


class _TaskRouter(nn.Module):
    """Common parts of the task-conditioned routers (one ``gate`` unless a subclass says otherwise)."""

    tasks: tuple[str, ...]

    @property
    def num_experts(self) -> int:
        return self.gate.num_experts

    @property
    def top_k(self) -> int:
        return self.gate.top_k

    def _check_task(self, task: str | None) -> None:
        if task not in self.tasks:
            raise ValueError(f"unknown task {task!r}; this router knows {list(self.tasks)}")

    @torch.no_grad()
    def set_expert_mask(self, task: str, mask: torch.Tensor) -> None:
        """Restrict ``task`` to the experts where ``mask`` (bool, E) is True; the others become unreachable."""
        self._check_task(task)
        mask = torch.as_tensor(mask, dtype=torch.bool).flatten()
        if mask.numel() != self.num_experts:
            raise ValueError(f"expert mask for task {task!r} has {mask.numel()} entries, expected {self.num_experts}")
        if int(mask.sum()) < self.top_k:
            raise ValueError(
                f"expert mask for task {task!r} keeps {int(mask.sum())} experts, fewer than top_k={self.top_k}"
            )
        self._store_mask(task, mask)

    def reachable_experts(self, task: str) -> torch.Tensor:
        """Indices (int64) of the experts ``task`` can be routed to."""
        self._check_task(task)
        return torch.nonzero(self.expert_mask_for(task), as_tuple=False).flatten()


class MultiGateRouter(_TaskRouter):
    """M³ViT "multi-gate": one gate per task over a shared set of experts (tutel's gate_index precedent)."""

    def __init__(
        self, dim: int, num_experts: int, top_k: int, tasks: tuple[str, ...] | list[str], **gate_kwargs
    ) -> None:
        super().__init__()
        if not tasks:
            raise ValueError("MultiGateRouter needs at least one task")
        self.tasks = tuple(tasks)
        self.gates = nn.ModuleDict({t: TopKGate(dim, num_experts, top_k, **gate_kwargs) for t in self.tasks})

    @property
    def num_experts(self) -> int:
        return next(iter(self.gates.values())).num_experts

    @property
    def top_k(self) -> int:
        return next(iter(self.gates.values())).top_k

    def expert_mask_for(self, task: str) -> torch.Tensor:
        return self.gates[task].expert_mask

    def _store_mask(self, task: str, mask: torch.Tensor) -> None:
        self.gates[task].expert_mask.copy_(mask)

    def forward(self, x: torch.Tensor, task: str) -> RouterOutput:
        if not isinstance(task, str):
            raise ValueError("the multi-gate router routes one task per call; give one task (or use 'task_embed')")
        self._check_task(task)
        return self.gates[task](x)

    def specialize(self, task: str, keep: torch.Tensor) -> MultiGateRouter:
        """A one-task router whose gate scores only the experts in ``keep`` (same order)."""
        self._check_task(task)
        src = self.gates[task]
        new = MultiGateRouter(
            src.proj.in_features,
            len(keep),
            min(src.top_k, len(keep)),
            (task,),
            noise_std=src.noise_std * len(keep) / src.num_experts,
            renormalize=src.renormalize,
            bias=src.proj.bias is not None,
        ).to(src.proj.weight.device, src.proj.weight.dtype)
        g = new.gates[task]
        with torch.no_grad():
            g.proj.weight.copy_(src.proj.weight[keep])
            if src.proj.bias is not None:
                g.proj.bias.copy_(src.proj.bias[keep])
            g.expert_mask.copy_(src.expert_mask[keep])
        return new


class TaskEmbeddingRouter(_TaskRouter):
    """M³ViT's single gate fed with the token concatenated with a learned task embedding."""

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int,
        tasks: tuple[str, ...] | list[str],
        task_dim: int = 64,
        **gate_kwargs,
    ) -> None:
        super().__init__()
        if not tasks:
            raise ValueError("TaskEmbeddingRouter needs at least one task")
        self.tasks = tuple(tasks)
        self.task_embed = nn.Embedding(len(self.tasks), task_dim)
        nn.init.normal_(self.task_embed.weight, std=0.02)
        self.gate = TopKGate(dim + task_dim, num_experts, top_k, **gate_kwargs)
        self.register_buffer("task_expert_mask", torch.ones(len(self.tasks), num_experts, dtype=torch.bool))

    def expert_mask_for(self, task: str) -> torch.Tensor:
        return self.task_expert_mask[self.tasks.index(task)] & self.gate.expert_mask

    def _store_mask(self, task: str, mask: torch.Tensor) -> None:
        self.task_expert_mask[self.tasks.index(task)].copy_(mask)

    def forward(self, x: torch.Tensor, task: str | Sequence[str]) -> RouterOutput:
        """``task``: one task for all S tokens, or one per image (the S tokens are that many images' equal runs of
        tokens, image-major): each token is routed with its image's task embedding and expert mask."""
        if isinstance(task, str):
            self._check_task(task)
            t = self.tasks.index(task)
            emb = self.task_embed.weight[t].to(x.dtype).expand(x.shape[0], -1)  # (S, task_dim)
            mask = self.task_expert_mask[t]  # (E,)
        else:
            rows = self.token_tasks(task, x.shape[0]).to(x.device)  # (S,)
            emb, mask = self.task_embed.weight[rows].to(x.dtype), self.task_expert_mask[rows]  # (S, .), (S, E)
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = self.gate.logits(torch.cat([x.float(), emb.float()], dim=-1))
            logits = logits.masked_fill(~mask, float("-inf"))
            return self.gate.route(logits)

    def token_tasks(self, tasks: Sequence[str], num_tokens: int) -> torch.Tensor:
        """(S,) task index of each token, from one task per image (images of ``num_tokens / len(tasks)`` tokens)."""
        for t in tasks:
            self._check_task(t)
        if not len(tasks) or num_tokens % len(tasks):
            raise ValueError(f"{len(tasks)} per-image tasks for {num_tokens} tokens: expected a divisor of it")
        ids = torch.tensor([self.tasks.index(t) for t in tasks])
        return ids.repeat_interleave(num_tokens // len(tasks))

    def specialize(self, task: str, keep: torch.Tensor) -> TaskEmbeddingRouter:
        """A one-task router: that task's embedding row only, gate rows for ``keep`` only."""
        self._check_task(task)
        t = self.tasks.index(task)
        src = self.gate
        new = TaskEmbeddingRouter(
            src.proj.in_features - self.task_embed.embedding_dim,
            len(keep),
            min(src.top_k, len(keep)),
            (task,),
            task_dim=self.task_embed.embedding_dim,
            noise_std=src.noise_std * len(keep) / src.num_experts,
            renormalize=src.renormalize,
            bias=src.proj.bias is not None,
        ).to(src.proj.weight.device, src.proj.weight.dtype)
        with torch.no_grad():
            new.task_embed.weight.copy_(self.task_embed.weight[t : t + 1])
            new.gate.proj.weight.copy_(src.proj.weight[keep])
            if src.proj.bias is not None:
                new.gate.proj.bias.copy_(src.proj.bias[keep])
            new.gate.expert_mask.copy_(src.expert_mask[keep])
            new.task_expert_mask.copy_(self.task_expert_mask[t : t + 1, keep])
        return new


class SharedRouter(_TaskRouter):
    """One gate for every task: token-level routing that does not depend on the task (MoFME's router).

    ``task`` may be None; a given task is only checked against ``tasks``. With ``renormalize=True`` and
    ``noise_std=0`` it is MoFME's router: linear, the non-top-k logits set to -inf, softmax, which is the
    softmax over all experts renormalised over the top k. An expert mask applies to every task alike.
    """

    def __init__(
        self, dim: int, num_experts: int, top_k: int, tasks: tuple[str, ...] | list[str] = (), **gate_kwargs
    ) -> None:
        super().__init__()
        self.tasks = tuple(tasks)
        self.gate = TopKGate(dim, num_experts, top_k, **gate_kwargs)

    def _check_task(self, task: str | Sequence[str] | None) -> None:
        if task is None:
            return
        for t in [task] if isinstance(task, str) else task:
            super()._check_task(t)

    def expert_mask_for(self, task: str | None) -> torch.Tensor:
        return self.gate.expert_mask

    def _store_mask(self, task: str | None, mask: torch.Tensor) -> None:
        self.gate.expert_mask.copy_(mask)

    def forward(self, x: torch.Tensor, task: str | None = None) -> RouterOutput:
        self._check_task(task)
        return self.gate(x)

    def _options(self) -> dict:
        """Constructor options beyond the gate's (subclasses add theirs)."""
        return {}

    def _new(self, num_experts: int, top_k: int, tasks: tuple[str, ...]) -> SharedRouter:
        src = self.gate
        return type(self)(
            src.proj.in_features,
            num_experts,
            top_k,
            tasks,
            noise_std=src.noise_std * num_experts / src.num_experts,
            renormalize=src.renormalize,
            bias=src.proj.bias is not None,
            **self._options(),
        )

    def specialize(self, task: str | None, keep: torch.Tensor) -> SharedRouter:
        """The same gate over the experts in ``keep`` only (same order)."""
        self._check_task(task)
        src = self.gate
        new = self._new(len(keep), min(src.top_k, len(keep)), self.tasks if task is None else (task,))
        new = new.to(src.proj.weight.device, src.proj.weight.dtype)
        with torch.no_grad():
            new.gate.proj.weight.copy_(src.proj.weight[keep])
            if src.proj.bias is not None:
                new.gate.proj.bias.copy_(src.proj.bias[keep])
            new.gate.expert_mask.copy_(src.expert_mask[keep])
        return new


class UncertaintyRouter(SharedRouter):
    """MoFME's Uncertainty-aware Router (UaR): Monte-Carlo dropout samples of the router in training.

    In training, T = ``samples`` passes of the gate on dropped-out inputs (rate ``dropout``) give per token
    the expert distributions p_t = softmax(W drop_t(x) + b), t = 1..T, and from them

        mean   m_e  = (1/T) sum_t p_t,e
        spread s_e  = sqrt((1/T) sum_t (p_t,e - m_e)^2)
        score  c_e  = m_e * exp(-s_e / m_e)        (s_e / m_e: the coefficient of variation of expert e)

    The k experts of largest score are chosen and their combine weights are the scores renormalised over
    them, w_e = c_e / sum_{j in top-k} c_j: an expert the samples disagree on loses weight to the ones they
    agree on. The load-balancing probabilities are m. In eval mode the gate runs once without dropout, so
    s = 0, c = m = softmax(W x + b) and the router equals :class:`SharedRouter` (exports are unaffected).
    MoFME's released code has no dropout in its router (zero spread) and an einsum that needs batch = tokens
    = experts; this is a formula of our own that follows the paper's description (weights calibrated by the
    spread of MC-dropout samples), not that code.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int,
        tasks: tuple[str, ...] | list[str] = (),
        samples: int = 5,
        dropout: float = 0.1,
        **gate_kwargs,
    ) -> None:
        if samples < 2:
            raise ValueError(f"UncertaintyRouter: samples must be >= 2 (a spread needs two draws), got {samples}")
        if not 0.0 < dropout < 1.0:
            raise ValueError(f"UncertaintyRouter: dropout must be in (0, 1), got {dropout}")
        super().__init__(dim, num_experts, top_k, tasks, **gate_kwargs)
        self.samples, self.dropout = int(samples), float(dropout)

    def forward(self, x: torch.Tensor, task: str | None = None) -> RouterOutput:
        self._check_task(task)
        if not self.training:
            return self.gate(x)
        g = self.gate
        with torch.autocast(device_type=x.device.type, enabled=False):
            xf = x.float()
            clean = g.logits(xf).masked_fill(~g.expert_mask, float("-inf"))
            drawn = torch.stack([g.logits(F.dropout(xf, self.dropout, training=True)) for _ in range(self.samples)])
            p = drawn.masked_fill(~g.expert_mask, float("-inf")).softmax(-1)  # (T, S, E)
            mean = p.mean(0)
            spread = (p - mean).square().mean(0).clamp_min(0).sqrt()
            tiny = torch.finfo(mean.dtype).tiny
            score = mean * torch.exp(-spread / mean.clamp_min(tiny))  # masked experts: 0
            combine, expert_index = score.topk(g.top_k, dim=-1)
            combine = combine / combine.sum(-1, keepdim=True).clamp_min(tiny)
            return RouterOutput(logits=clean, probs=mean, expert_index=expert_index, combine_weights=combine)

    def _options(self) -> dict:
        return dict(samples=self.samples, dropout=self.dropout)

    def extra_repr(self) -> str:
        return f"samples={self.samples}, dropout={self.dropout}"


ROUTERS = {
    "multi_gate": MultiGateRouter,
    "task_embed": TaskEmbeddingRouter,
    "shared": SharedRouter,
    "uncertainty": UncertaintyRouter,
}


def create_router(kind: str, dim: int, num_experts: int, top_k: int, tasks, **kwargs) -> _TaskRouter:
    """Build a router by name: ``multi_gate``, ``task_embed`` (task-conditioned), ``shared`` or ``uncertainty``
    (task-independent)."""
    if kind not in ROUTERS:
        raise ValueError(f"unknown router {kind!r}; expected one of {sorted(ROUTERS)}")
    return ROUTERS[kind](dim, num_experts, top_k, tasks, **kwargs)
