"""Dispatchers: how routed tokens reach the experts and come back.

One interface, several implementations, all equal where no token is dropped:

- ``naive``:  loop over experts, boolean-mask indexing. The readable reference used by tests.
- ``sort``:   dropless sort/index dispatcher for training and eager inference: assignments are sorted
              by expert, each expert runs one GEMM on its contiguous slice, and each expert's output,
              times its combine weights, is scatter-added back to its tokens.
- ``dense``:  static shapes, no data-dependent ops: every expert runs on every token and the chosen
              outputs are gathered. Exact, exports cleanly to ONNX; costs E/k times the expert FLOPs.
- ``einsum``: static shapes with a fixed capacity per expert (V-MoE's one-hot dispatch/combine
              einsums); with ``capacity=None`` the capacity is every token, so nothing is dropped.
- ``gather``: static shapes with a capacity buffer per image and expert, filled by index (a slot table
              written with ScatterElements, Gather, the experts as one grouped 1x1 convolution per expert
              layer, Gather back). With a capacity factor it costs about ``factor`` times the active expert
              FLOPs instead of the ``dense`` path's E/k times: the export path for capacity-bounded
              inference (V-MoE's).

Capacity is decided once, by :func:`capacity_keep_mask`, so every dispatcher drops the same
assignments: per group of tokens (the layer uses one image's tokens, so an image's output does not depend
on the rest of its batch), slot-major priority (all first choices before any second choice), then token
order. Dispatchers take the capacity and group size as keywords; only the static-buffer ones use them.
Einsum letters: s tokens, k slots, e experts, c capacity, m model dim, o output dim.
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod

import torch
import torch.nn as nn

__all__ = [
    "capacity_keep_mask",
    "resolve_capacity",
    "Dispatcher",
    "NaiveDispatcher",
    "SortDispatcher",
    "DenseDispatcher",
    "EinsumDispatcher",
    "GatherDispatcher",
    "DISPATCHERS",
    "create_dispatcher",
]


def _shown(v: object) -> str:
    return str(v) if isinstance(v, numbers.Real) else repr(v)  # nan, inf, 2.5; 'text' quoted


def resolve_capacity(
    num_tokens: int, top_k: int, num_experts: int, capacity: int | None = None, capacity_factor: float | None = None
) -> int | None:
    """Per-expert capacity from a number or a factor (never both). ``None`` means dropless."""
    if capacity is not None and capacity_factor is not None:
        raise ValueError("give capacity or capacity_factor, not both")
    if capacity_factor is not None:
        # NaN fails every comparison and inf overflows ceil(): both would surface as a library error later
        ok = isinstance(capacity_factor, numbers.Real) and not isinstance(capacity_factor, bool)
        if not (ok and math.isfinite(capacity_factor) and capacity_factor > 0):
            raise ValueError(f"capacity_factor must be a finite number > 0, got {_shown(capacity_factor)}")
        cap = capacity_factor * num_tokens * top_k / num_experts
        if not math.isfinite(cap):
            raise ValueError(f"capacity_factor must be a finite number > 0, got {_shown(capacity_factor)} (too large)")
        return max(1, math.ceil(cap))
    if capacity is not None:
        ok = isinstance(capacity, numbers.Integral) and not isinstance(capacity, bool)
        if not (ok and capacity >= 1):
            raise ValueError(f"capacity must be an integer >= 1, got {_shown(capacity)}")
    return capacity


def _one_hot(index: torch.Tensor, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    # Equal against an arange instead of F.one_hot: lowers to Equal+Cast in ONNX, which every runtime supports.
    return (index.unsqueeze(-1) == torch.arange(num_classes, device=index.device)).to(dtype)


def _positions(expert_index: torch.Tensor, num_experts: int, group_size: int | None = None) -> torch.Tensor:
    """Position of each assignment in its expert's queue within its group of ``group_size`` consecutive tokens
    (all S tokens when None), slot-major then token order. (S, k) int64."""
    s, k = expert_index.shape
    n = s if group_size is None else group_size
    slot_major = expert_index.reshape(-1, n, k).transpose(1, 2).reshape(-1, k * n)  # (G, k*n)
    onehot = _one_hot(slot_major, num_experts, torch.int64)  # (G, k*n, E)
    pos = ((onehot.cumsum(1) - 1) * onehot).sum(-1)  # (G, k*n)
    return pos.reshape(-1, k, n).transpose(1, 2).reshape(s, k)


def capacity_keep_mask(
    expert_index: torch.Tensor, num_experts: int, capacity: int | None, group_size: int | None = None
) -> torch.Tensor | None:
    """Bool (S, k): which assignments fit in their expert's capacity within their group of ``group_size``
    consecutive tokens (None: one group); ``None`` when dropless."""
    if capacity is None:
        return None
    return _positions(expert_index, num_experts, group_size) < capacity


class Dispatcher(nn.Module, ABC):
    """Base: ``compute`` gives per-assignment expert outputs, ``forward`` combines them with the weights."""

    static_shapes: bool = False
    # True: given ``capacity`` and ``group_size`` but no ``keep``, it drops exactly what capacity_keep_mask would,
    # so a layer may leave ``keep`` out (in an exported graph the layer's own mask is then dead code, pruned)
    applies_capacity: bool = False

    @abstractmethod
    def compute(
        self,
        x: torch.Tensor,
        expert_index: torch.Tensor,
        experts: nn.Module,
        keep: torch.Tensor | None = None,
        capacity: int | None = None,
        group_size: int | None = None,
    ) -> torch.Tensor:
        """x (S, M), expert_index (S, k) -> (S, k, O); dropped assignments give zeros.

        ``capacity`` / ``group_size``: the capacity per expert and group of consecutive tokens that ``keep`` was
        computed with (sizes the static-buffer dispatchers; the others need only ``keep``)."""

    def forward(
        self,
        x: torch.Tensor,
        expert_index: torch.Tensor,
        combine_weights: torch.Tensor,
        experts: nn.Module,
        keep: torch.Tensor | None = None,
        capacity: int | None = None,
        group_size: int | None = None,
    ) -> torch.Tensor:
        """(S, M) -> (S, O): sum over slots of combine weight * expert output."""
        y = self.compute(x, expert_index, experts, keep, capacity, group_size)  # (S, k, O)
        w = combine_weights.to(y.dtype)
        if keep is not None:
            w = w * keep.to(w.dtype)
        return torch.einsum("sko,sk->so", y, w)


class NaiveDispatcher(Dispatcher):
    """Reference: for each expert, pick its tokens with a boolean mask and run it on them."""

    def compute(self, x, expert_index, experts, keep=None, capacity=None, group_size=None):
        s, k = expert_index.shape
        out = None
        for e in range(experts.num_experts):
            mask = expert_index == e
            if keep is not None:
                mask = mask & keep
            if not bool(mask.any()):
                continue
            ye = experts.forward_expert(e, x[mask.any(-1)])  # a token picks an expert at most once
            if out is None:
                out = x.new_zeros(s, k, ye.shape[-1])
            out[mask] = ye.to(out.dtype)
        if out is None:
            out = x.new_zeros(s, k, experts.forward_expert(0, x[:0]).shape[-1])
        return out


class SortDispatcher(Dispatcher):
    """Dropless sort/index dispatcher: one GEMM per expert over a contiguous, unpadded slice."""

    def _plan(self, expert_index: torch.Tensor, num_experts: int, keep: torch.Tensor | None):
        flat = expert_index.reshape(-1)  # (S*k,) assignment a = s*k + j
        if keep is not None:
            flat = flat.masked_fill(~keep.reshape(-1), num_experts)  # dropped -> a virtual expert E, sorted last
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=num_experts + 1)[:num_experts]
        n_kept = int(counts.sum())
        return order[:n_kept], counts.tolist()

    def compute(self, x, expert_index, experts, keep=None, capacity=None, group_size=None):
        s, k = expert_index.shape
        order, counts = self._plan(expert_index, experts.num_experts, keep)
        ys = torch.cat(experts.forward_split(x.index_select(0, order // k), counts))  # (n_kept, O)
        out = ys.new_zeros(s * k, ys.shape[-1]).index_copy(0, order, ys)
        return out.view(s, k, -1)

    def forward(self, x, expert_index, combine_weights, experts, keep=None, capacity=None, group_size=None):
        s, k = expert_index.shape
        order, counts = self._plan(expert_index, experts.num_experts, keep)
        tokens = order // k
        ys = experts.forward_split(x.index_select(0, tokens), counts)  # per expert (counts[e], O)
        w = combine_weights.reshape(-1).index_select(0, order).to(x.dtype).unsqueeze(-1)
        # Scatter-add each expert's weighted output as it comes (no concatenation of all outputs first).
        y = x.new_zeros(s, ys[0].shape[-1] if ys else x.shape[-1])
        for ye, te, we in zip(ys, torch.split(tokens, counts), torch.split(w, counts)):
            y.index_add_(0, te, ye * we)
        return y


class DenseDispatcher(Dispatcher):
    """Static shapes: run every expert on every token, gather the chosen outputs.

    For MLP experts the combine is folded into the second layer (it is linear):
    y = sum_e g[s, e] (act(x W1_e + b1_e) W2_e + b2_e) = [g * act(x W1_cat + b1_cat)] W2_cat + g b2, with
    W1_cat (M, E*H) and W2_cat (E*H, O): two plain 2-D GEMMs and no gather. Runtimes run them at full
    GEMM speed and ONNX Runtime's quantiser treats them as ordinary per-channel MatMul weights.
    """

    static_shapes = True

    def forward(self, x, expert_index, combine_weights, experts, keep=None, capacity=None, group_size=None):
        if not hasattr(experts, "forward_dense_gated"):
            return super().forward(x, expert_index, combine_weights, experts, keep)
        w = combine_weights.to(x.dtype)
        if keep is not None:
            w = w * keep.to(w.dtype)
        gates = (_one_hot(expert_index, experts.num_experts, x.dtype) * w.unsqueeze(-1)).sum(1)  # (S, E)
        return experts.forward_dense_gated(x, gates)

    def compute(self, x, expert_index, experts, keep=None, capacity=None, group_size=None):
        e = experts.num_experts
        y = experts.forward_grouped(x.unsqueeze(0).expand(e, -1, -1))  # (E, S, O)
        y = y.permute(1, 0, 2)  # (S, E, O)
        idx = expert_index.unsqueeze(-1).expand(-1, -1, y.shape[-1])  # (S, k, O)
        out = torch.gather(y, 1, idx)
        if keep is not None:
            out = out * keep.unsqueeze(-1).to(out.dtype)
        return out


class EinsumDispatcher(Dispatcher):
    """Static shapes: one-hot dispatch and combine einsums into an (E, C, M) buffer (V-MoE).

    ``buffer_size`` is C; ``None`` sizes it to the token count, so nothing is lost whatever the routing.
    With a smaller C, assignments past it are dropped (on top of any ``keep`` mask from the layer).
    """

    static_shapes = True

    def __init__(self, buffer_size: int | None = None) -> None:
        super().__init__()
        self.buffer_size = buffer_size

    def compute(self, x, expert_index, experts, keep=None, capacity=None, group_size=None):
        s, k = expert_index.shape
        e = experts.num_experts
        cap = s if self.buffer_size is None else self.buffer_size
        pos = _positions(expert_index, e)  # (S, k)
        fits = pos < cap
        keep = fits if keep is None else keep & fits
        disp = _one_hot(expert_index, e, x.dtype).unsqueeze(-1) * _one_hot(
            pos.clamp(max=cap - 1), cap, x.dtype
        ).unsqueeze(-2)
        disp = disp * keep.to(x.dtype)[..., None, None]  # (S, k, E, C)
        buf = torch.einsum("skec,sm->ecm", disp, x)
        y = experts.forward_grouped(buf)  # (E, C, O)
        return torch.einsum("skec,eco->sko", disp, y)


class GatherDispatcher(Dispatcher):
    """Static shapes: per group (one image's tokens) and expert, a buffer of ``capacity`` rows filled by index.

    Each kept assignment gets a slot (its expert, its position among the group's kept assignments of that
    expert); a slot table of token ids is written with one scatter (ScatterElements in ONNX, every index distinct:
    dropped assignments write to a discarded tail of the table), the (E, G*C) buffer is gathered, the experts run
    on it, and each kept assignment gathers its output row back. Unused slots compute on a stand-in
    token and are never read. With ``capacity=None`` C is the group size (nothing can be dropped, at the ``dense``
    path's cost); a capacity factor f makes the expert FLOPs about f times the active ones. Assignments past C
    (when ``keep`` was not computed with this capacity) are dropped like the einsum dispatcher's small buffer does.

    The experts run as grouped 1x1 convolutions (channels-first, one Conv per expert layer) rather than one batched
    GEMM: in the exported graph the weights are then a constant Conv operand, which ONNX Runtime pre-packs (it does
    not pre-pack the 3-D operand of a batched MatMul), and TensorRT maps grouped convolutions natively. One MoE MLP
    layer at M³ViT-S's shapes, ORT CPU, capacity factor 1 (equal FLOPs): grouped Conv 1.33x the dense MLP's
    latency (``benchmarks/bench_moe_layer_ort.py``); a batched MatMul ran ~1.8x and a loop of 2-D GEMMs 1.55x.
    """

    static_shapes = True
    applies_capacity = True  # with keep=None: positions slot-major then token order, pos < C, as capacity_keep_mask

    def _plan(self, x, expert_index, e, keep, capacity, group_size):
        """Per expert, the (G*C,) token rows of x it runs on; per assignment (S, k) the row of the stacked
        expert outputs (E*G*C, O) holding its result, and the effective keep mask."""
        s, k = expert_index.shape
        n = s if group_size is None else group_size
        c = n if capacity is None else min(capacity, n)  # an expert holds at most n assignments of a group
        # positions among the kept assignments only (dropped ones are queued on a virtual expert e)
        queued = expert_index if keep is None else expert_index.masked_fill(~keep, e)
        pos = _positions(queued, e + 1, n).view(-1, n, k)
        idx = expert_index.view(-1, n, k)
        keep = pos < c if keep is None else keep.view(-1, n, k) & (pos < c)
        g = idx.shape[0]
        local = torch.arange(n * k, device=x.device).view(1, n, k)  # assignment id within the group
        slot = torch.where(keep, idx * c + pos, e * c + local).reshape(g, n * k)
        token = (local // k).expand(g, -1, -1).reshape(g, n * k)
        table = torch.zeros(g, e * c + n * k, dtype=torch.int64, device=x.device)
        table = table.scatter(1, slot, token)[:, : e * c]  # (G, E*C): token id (within its group) per slot
        first = torch.arange(g, device=x.device).view(g, 1, 1)
        rows_in = (table.view(g, e, c) + first * n).transpose(0, 1).reshape(e, g * c)  # (E, G*C) rows of x
        rows_out = torch.where(keep, idx * (g * c) + first * c + pos, 0).reshape(s, k)  # into (E*G*C, O)
        return rows_in, rows_out, keep.reshape(s, k)

    def _gathered(self, x, expert_index, experts, keep, capacity, group_size):
        """(S, k, O) expert output per assignment (stand-in rows where dropped) and the effective keep mask."""
        rows_in, rows_out, keep = self._plan(x, expert_index, experts.num_experts, keep, capacity, group_size)
        e, t = rows_in.shape
        buf = x.index_select(0, rows_in.reshape(-1))  # (E*T, M), T = G*C
        xcf = buf.view(e, t, -1).transpose(1, 2).reshape(1, -1, t, 1)  # (1, E*M, T, 1)
        y = experts.forward_channels_first(xcf)  # (1, E*O, T, 1)
        y = y.view(e, -1, t).transpose(1, 2).reshape(e * t, -1)  # (E*T, O)
        return y.index_select(0, rows_out.reshape(-1)).view(*expert_index.shape, -1), keep

    def compute(self, x, expert_index, experts, keep=None, capacity=None, group_size=None):
        y, keep = self._gathered(x, expert_index, experts, keep, capacity, group_size)
        return y * keep.unsqueeze(-1).to(y.dtype)

    def forward(self, x, expert_index, combine_weights, experts, keep=None, capacity=None, group_size=None):
        y, keep = self._gathered(x, expert_index, experts, keep, capacity, group_size)
        w = (combine_weights.to(y.dtype) * keep.to(y.dtype)).unsqueeze(-1)  # (S, k, 1); 0 where dropped
        return (y * w).sum(1)


DISPATCHERS: dict[str, type[Dispatcher]] = {
    "naive": NaiveDispatcher,
    "sort": SortDispatcher,
    "dense": DenseDispatcher,
    "einsum": EinsumDispatcher,
    "gather": GatherDispatcher,
}


def create_dispatcher(name: str) -> Dispatcher:
    """Dispatcher by name: one of ``naive``, ``sort``, ``dense``, ``einsum``, ``gather``."""
    if name not in DISPATCHERS:
        raise ValueError(f"unknown dispatcher {name!r}; expected one of {sorted(DISPATCHERS)}")
    return DISPATCHERS[name]()
