"""The MoE layers: a router, a dispatcher and stacked experts composed; aux is returned, not stored."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp

from .dispatch import Dispatcher, capacity_keep_mask, create_dispatcher, resolve_capacity
from .experts import FiLMExperts, LinearExperts, MlpExperts
from .router import RouterOutput, create_router

__all__ = ["MoEAux", "MoELayer", "MoEMlp", "MoEAttention", "MoEFiLM"]


@dataclass
class MoEAux:
    """Routing record of one MoE layer for one forward pass (S tokens, E experts, k slots)."""

    task: str | None  # None: a task-independent router run without a task
    logits: torch.Tensor  # (S, E)
    probs: torch.Tensor  # (S, E)
    expert_index: torch.Tensor  # (S, k)
    combine_weights: torch.Tensor  # (S, k)
    load_prob: torch.Tensor | None  # (S, E) smooth load estimate (training with noise)
    keep: torch.Tensor | None  # (S, k) bool, None when dropless
    expert_load: torch.Tensor  # (E,) assignments per expert after capacity
    dropped_fraction: torch.Tensor  # () fraction of assignments dropped by capacity

    @property
    def num_experts(self) -> int:
        return self.probs.shape[-1]


def _make_aux(task: str | None, r: RouterOutput, keep: torch.Tensor | None) -> MoEAux:
    e = r.probs.shape[-1]
    idx = r.expert_index if keep is None else r.expert_index.masked_fill(~keep, e)
    load = torch.bincount(idx.reshape(-1), minlength=e + 1)[:e]
    dropped = (1.0 - keep.float().mean()) if keep is not None else r.probs.new_zeros(())
    return MoEAux(task, r.logits, r.probs, r.expert_index, r.combine_weights, r.load_prob, keep, load, dropped)


class MoELayer(nn.Module):
    """Base of the MoE layers: a router, a dispatcher, stacked experts; ``forward(x, task)`` -> (y, MoEAux)."""

    def _init_routing(
        self, dim, num_experts, top_k, tasks, router, router_kwargs, dispatcher, capacity, capacity_factor
    ) -> None:
        self.num_experts, self.top_k = num_experts, top_k
        self.router = create_router(router, dim, num_experts, top_k, tasks, **(router_kwargs or {}))
        self.dispatcher: Dispatcher = create_dispatcher(dispatcher) if isinstance(dispatcher, str) else dispatcher
        resolve_capacity(1, top_k, num_experts, capacity, capacity_factor)  # raises if both are given
        self.capacity, self.capacity_factor = capacity, capacity_factor
        # the even share a capacity factor scales is counted over the full layer's experts, also after
        # specialize() keeps fewer, so a specialised layer drops exactly what the full one drops
        self.capacity_experts = num_experts

    def keep_mask(self, expert_index: torch.Tensor, group_size: int) -> tuple[torch.Tensor | None, int | None]:
        """Capacity per expert and image (``group_size`` tokens) and the kept assignments (None: dropless).

        Capacity is counted per image, so an image's output never depends on the other images in its batch."""
        cap = self.capacity_for(group_size, expert_index.shape[-1])
        return capacity_keep_mask(expert_index, self.num_experts, cap, group_size), cap

    def capacity_for(self, group_size: int, top_k: int | None = None) -> int | None:
        """Assignments each expert takes per image of ``group_size`` tokens; None when dropless."""
        k = self.top_k if top_k is None else top_k
        return resolve_capacity(group_size, k, self.capacity_experts, self.capacity, self.capacity_factor)

    def set_capacity(self, capacity: int | None = None, capacity_factor: float | None = None) -> None:
        """Per-image expert capacity (a number or a factor of the even share); both None = dropless."""
        resolve_capacity(1, self.top_k, self.capacity_experts, capacity, capacity_factor)  # validates
        self.capacity, self.capacity_factor = capacity, capacity_factor

    def _specialized_copy(self, task: str) -> tuple[MoELayer, torch.Tensor]:
        """A shallow copy routed by ``task``'s router alone over the experts it can reach; the caller swaps in
        its experts cut to ``keep``."""
        keep = self.router.reachable_experts(task)
        new = copy.copy(self)
        new._modules = dict(self._modules)  # so the assignments below leave this layer untouched
        new.num_experts, new.top_k = len(keep), min(self.top_k, len(keep))
        new.router = self.router.specialize(task, keep)
        return new, keep

    def _dispatch_keep(self, keep: torch.Tensor | None) -> torch.Tensor | None:
        """The keep mask to hand the dispatcher for assignments in (token, slot) order: None when it applies the
        same capacity rule itself (one position computation in an exported graph instead of two)."""
        return None if self.dispatcher.applies_capacity else keep

    def set_dispatcher(self, dispatcher: str | Dispatcher) -> None:
        self.dispatcher = create_dispatcher(dispatcher) if isinstance(dispatcher, str) else dispatcher

    def forward(self, x: torch.Tensor, task: str | Sequence[str] | None = None) -> tuple[torch.Tensor, MoEAux]:
        """x (B, N, M) routed for ``task`` (one task, or one per image where the router takes that) ->
        (y (B, N, M), MoEAux; its ``task`` None for per-image tasks)."""
        r = self.router(x.reshape(-1, x.shape[-1]), task)
        y, keep = self.apply_experts(x, r.expert_index, r.combine_weights)
        return y, _make_aux(task if task is None or isinstance(task, str) else None, r, keep)

    def _experts_on_tokens(
        self, x: torch.Tensor, expert_index: torch.Tensor, combine_weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``self.experts`` on x (..., N, M) with its (S, k) routing, combined -> (output shaped like x, kept
        assignments or None); capacity counted per image (N tokens)."""
        shape = x.shape
        x_flat = x.reshape(-1, shape[-1])  # (S, M)
        n = shape[-2] if x.dim() > 2 else x_flat.shape[0]  # capacity group: one image's tokens
        keep, cap = self.keep_mask(expert_index, n)
        y = self.dispatcher(x_flat, expert_index, combine_weights, self.experts, self._dispatch_keep(keep), cap, n)
        return y.to(x.dtype).reshape(shape), keep


_MoEBase = MoELayer  # the name before the base was public


class MoEMlp(MoELayer):
    """Task-routed mixture of MLP experts, a drop-in for timm's ``Mlp`` in a task-aware block.

    ``forward(x, task)`` with x (B, N, M) returns (y (B, N, M), MoEAux).
    """

    def __init__(
        self,
        dim: int,
        hidden: int,
        num_experts: int,
        top_k: int,
        tasks,
        router: str = "multi_gate",
        router_kwargs: dict | None = None,
        dispatcher: str | Dispatcher = "sort",
        capacity: int | None = None,
        capacity_factor: float | None = None,
        act_layer: type[nn.Module] = nn.GELU,
        bias: bool = True,
        drop: float = 0.0,
    ) -> None:
        super().__init__()
        self._init_routing(dim, num_experts, top_k, tasks, router, router_kwargs, dispatcher, capacity, capacity_factor)
        self.experts = MlpExperts(num_experts, dim, hidden, act_layer=act_layer, bias=bias, drop=drop)

    def apply_experts(
        self, x: torch.Tensor, expert_index: torch.Tensor, combine_weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The layer after routing: x (..., N, M) and its (S, k) routing -> (output shaped like x, kept
        assignments or None). Shared with the task-indexed export graph, which routes differently."""
        return self._experts_on_tokens(x, expert_index, combine_weights)

    def specialize(self, task: str) -> MoEMlp:
        """This layer for ``task`` alone: its router, and only the experts that router can reach."""
        new, keep = self._specialized_copy(task)
        new.experts = self.experts.select(keep)
        return new


class MoEAttention(MoELayer):
    """Mod-Squad / MoA attention: per-expert query and output projections, shared key/value projection.

    Each expert owns ``expert_heads`` heads of ``head_dim`` channels (default ``dim // num_heads``). A token's
    query is computed by each of its k experts, attends over the shared keys/values of its sequence, and the k
    outputs are projected by the same experts and combined with the gate weights. With expert_heads * k =
    num_heads the active cost equals a dense attention layer's.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_experts: int,
        top_k: int,
        tasks,
        expert_heads: int | None = None,
        qkv_bias: bool = True,
        head_dim: int | None = None,
        router: str = "multi_gate",
        router_kwargs: dict | None = None,
        dispatcher: str | Dispatcher = "sort",
        capacity: int | None = None,
        capacity_factor: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if head_dim is None and dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self._init_routing(dim, num_experts, top_k, tasks, router, router_kwargs, dispatcher, capacity, capacity_factor)
        self.head_dim = head_dim or dim // num_heads
        self.expert_heads = expert_heads or max(1, num_heads // top_k)
        inner = self.expert_heads * self.head_dim
        self.kv = nn.Linear(dim, 2 * inner, bias=qkv_bias)
        self.q_experts = LinearExperts(num_experts, dim, inner, bias=qkv_bias)
        self.o_experts = LinearExperts(num_experts, inner, dim, bias=True)
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop)

    def apply_experts(
        self, x: torch.Tensor, expert_index: torch.Tensor, combine_weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The layer after routing: x (B, N, M) and its (B*N, k) routing -> (output (B, N, M), kept assignments
        or None). Shared with the task-indexed export graph, which routes differently."""
        b, n, m = x.shape
        h, d = self.expert_heads, self.head_dim
        x_flat = x.reshape(-1, m)
        keep, cap = self.keep_mask(expert_index, n)
        k = expert_index.shape[-1]
        q = self.dispatcher.compute(x_flat, expert_index, self.q_experts, self._dispatch_keep(keep), cap, n)
        q = q.reshape(b, n * k, h, d).transpose(1, 2)  # (B, h, N*k, d)
        kv = self.kv(x).reshape(b, n, 2, h, d).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, kv[0], kv[1], dropout_p=self.attn_drop if self.training else 0.0)
        att = att.transpose(1, 2).reshape(b * n * k, h * d)  # (S*k, h*d), assignment order
        o_idx = expert_index.reshape(-1, 1)
        o_keep = None if keep is None else keep.reshape(-1, 1)
        # rows in (image, token, slot) order: an image's n*k rows form its capacity group
        o = self.dispatcher.compute(att, o_idx, self.o_experts, o_keep, cap, n * k).reshape(b * n, k, m)
        w = combine_weights.to(o.dtype)
        if keep is not None:
            w = w * keep.to(w.dtype)
        y = torch.einsum("skm,sk->sm", o, w)
        return self.proj_drop(y.to(x.dtype).reshape(b, n, m)), keep

    def specialize(self, task: str) -> MoEAttention:
        """This layer for ``task`` alone: its router, and the query/output projections of the experts it can reach."""
        new, keep = self._specialized_copy(task)
        new.q_experts, new.o_experts = self.q_experts.select(keep), self.o_experts.select(keep)
        return new


class MoEFiLM(MoELayer):
    """MoFME's layer (Mixture of Feature-Modulation Experts), a drop-in for timm's ``Mlp`` in a task-aware block.

    On tokens y (B, N, d): a shared gated block h = act(W1 y) * (W2 y) (W1, W2: d -> d); E feature-modulation
    experts e(h) = gamma_e(h) * h + beta_e(h) (:class:`~vision_moe.moe.FiLMExperts`), of which each token's
    top-k, chosen by the router from y, are combined with its weights; then one shared adaptor MLP
    d -> ``hidden`` -> d (MoFME: 4d). Routing goes through the dispatchers like every MoE layer here, so only the
    chosen experts' modulations are computed (``sort``); the ``dense`` dispatcher computes every expert on every
    token as MoFME's reference code does (static shapes, for export). ``forward(x, task)`` -> (y, MoEAux).
    """

    def __init__(
        self,
        dim: int,
        hidden: int,
        num_experts: int,
        top_k: int,
        tasks,
        router: str = "shared",
        router_kwargs: dict | None = None,
        dispatcher: str | Dispatcher = "sort",
        capacity: int | None = None,
        capacity_factor: float | None = None,
        act_layer: type[nn.Module] = nn.GELU,
        bias: bool = True,
        drop: float = 0.0,
    ) -> None:
        super().__init__()
        self._init_routing(dim, num_experts, top_k, tasks, router, router_kwargs, dispatcher, capacity, capacity_factor)
        self.w1 = nn.Linear(dim, dim, bias=bias)
        self.w2 = nn.Linear(dim, dim, bias=bias)
        self.act = act_layer()
        self.experts = FiLMExperts(num_experts, dim, bias=bias)
        self.adaptor = Mlp(dim, hidden, act_layer=act_layer, bias=bias, drop=drop)

    def shared_block(self, x: torch.Tensor) -> torch.Tensor:
        """h = act(W1 x) * (W2 x), what the experts modulate."""
        return self.act(self.w1(x)) * self.w2(x)

    def apply_experts(
        self, x: torch.Tensor, expert_index: torch.Tensor, combine_weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The layer after routing: x (..., N, d) and its (S, k) routing -> (output shaped like x, kept
        assignments or None)."""
        y, keep = self._experts_on_tokens(self.shared_block(x), expert_index, combine_weights)
        return self.adaptor(y), keep

    def specialize(self, task: str | None) -> MoEFiLM:
        """This layer for ``task`` alone: its router, and only the experts that router can reach."""
        new, keep = self._specialized_copy(task)
        new.experts = self.experts.select(keep)
        return new
