"""Experts as stacked weight tensors, computed batched.

Every expert family offers three ways to run, so any dispatcher can use it:
``forward_grouped`` on a padded (E, C, in) buffer (one bmm per layer), ``forward_split`` on tokens
already sorted by expert (one GEMM per expert, no padding; a list of per-expert outputs), and
``forward_expert`` for one expert. MLP and FiLM experts also offer ``forward_dense_gated`` (every expert on every
token, the gates folded into the combine) for the static-shape export path.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["FiLMExperts", "LinearExperts", "MlpExperts"]


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """x (S, in) @ w (in, out) + b, as one addmm on the stored (in, out) weight (no transposed view in autograd)."""
    return torch.mm(x, w) if b is None else torch.addmm(b, x, w)


def _init_stacked(w: torch.Tensor, b: torch.Tensor | None) -> None:
    # Same as timm's ViT init for its Linear layers (trunc normal std .02, zero bias), per expert.
    nn.init.trunc_normal_(w, std=0.02)
    if b is not None:
        nn.init.zeros_(b)


class LinearExperts(nn.Module):
    """E independent linear maps ``in_features -> out_features``; weight (E, in, out)."""

    def __init__(self, num_experts: int, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.num_experts, self.in_features, self.out_features = num_experts, in_features, out_features
        self.weight = nn.Parameter(torch.empty(num_experts, in_features, out_features))
        self.bias = nn.Parameter(torch.empty(num_experts, out_features)) if bias else None
        _init_stacked(self.weight, self.bias)

    def forward_grouped(self, x: torch.Tensor) -> torch.Tensor:  # (E, C, in) -> (E, C, out)
        if self.bias is None:
            return torch.bmm(x, self.weight)
        return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight)

    def forward_channels_first(self, x: torch.Tensor) -> torch.Tensor:
        """(1, E*in, T, 1) -> (1, E*out, T, 1): every expert on its own T rows, as one grouped 1x1 convolution.

        The export form of :meth:`forward_grouped`: ONNX Runtime runs a grouped Conv with pre-packed weights in
        one kernel (a batched MatMul's 3-D weight is not pre-packed), and TensorRT maps it natively."""
        e, i, o = self.weight.shape
        w = self.weight.transpose(1, 2).reshape(e * o, i, 1, 1)
        return F.conv2d(x, w, None if self.bias is None else self.bias.reshape(-1), groups=e)

    def forward_split(self, x: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
        """x (sum counts, in), rows sorted by expert -> one (counts[e], out) output per expert."""
        # unbind() once: indexing weight[e] per expert would materialise a full-size gradient per expert.
        ws = self.weight.unbind(0)
        bs = self.bias.unbind(0) if self.bias is not None else [None] * self.num_experts
        return [_linear(xe, w, b) for xe, w, b in zip(torch.split(x, counts), ws, bs)]

    def forward_expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return _linear(x, self.weight[e], None if self.bias is None else self.bias[e])

    def select(self, keep: torch.Tensor) -> LinearExperts:
        """A copy holding only the experts in ``keep`` (in that order)."""
        new = LinearExperts(len(keep), self.in_features, self.out_features, bias=self.bias is not None)
        new = new.to(self.weight.device, self.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(self.weight[keep])
            if self.bias is not None:
                new.bias.copy_(self.bias[keep])
        return new

    def extra_repr(self) -> str:
        return (
            f"experts={self.num_experts}, in={self.in_features}, out={self.out_features}, bias={self.bias is not None}"
        )


class MlpExperts(nn.Module):
    """E two-layer MLP experts (fc1 -> act -> fc2), the MoE replacement of timm's ``Mlp``."""

    def __init__(
        self,
        num_experts: int,
        dim: int,
        hidden: int,
        out_dim: int | None = None,
        act_layer: type[nn.Module] = nn.GELU,
        bias: bool = True,
        drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_experts, self.dim, self.hidden = num_experts, dim, hidden
        self.fc1 = LinearExperts(num_experts, dim, hidden, bias)
        self.act = act_layer()
        self.drop = nn.Dropout(drop)
        self.fc2 = LinearExperts(num_experts, hidden, out_dim or dim, bias)

    def forward_grouped(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2.forward_grouped(self.drop(self.act(self.fc1.forward_grouped(x)))))

    def forward_channels_first(self, x: torch.Tensor) -> torch.Tensor:
        """(1, E*dim, T, 1) -> (1, E*out, T, 1): see :meth:`LinearExperts.forward_channels_first`."""
        return self.drop(self.fc2.forward_channels_first(self.drop(self.act(self.fc1.forward_channels_first(x)))))

    def forward_split(self, x: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
        """x (sum counts, dim), rows sorted by expert -> one (counts[e], out) output per expert."""
        ws1, ws2 = self.fc1.weight.unbind(0), self.fc2.weight.unbind(0)
        bs1 = self.fc1.bias.unbind(0) if self.fc1.bias is not None else [None] * self.num_experts
        bs2 = self.fc2.bias.unbind(0) if self.fc2.bias is not None else [None] * self.num_experts
        return [
            self.drop(_linear(self.drop(self.act(_linear(xe, w1, b1))), w2, b2))
            for xe, w1, b1, w2, b2 in zip(torch.split(x, counts), ws1, bs1, ws2, bs2)
        ]

    def forward_expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2.forward_expert(e, self.drop(self.act(self.fc1.forward_expert(e, x)))))

    def forward_dense_gated(self, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """sum_e gates[:, e] * expert_e(x) with every expert on every token, as two 2-D GEMMs.

        x (S, M), gates (S, E) -> (S, O). Experts with a zero gate contribute nothing (exactly).
        """
        e, m, h = self.fc1.weight.shape
        s = x.shape[0]
        w1 = self.fc1.weight.permute(1, 0, 2).reshape(m, e * h)  # (M, E*H)
        b1 = None if self.fc1.bias is None else self.fc1.bias.reshape(e * h)
        hid = self.drop(self.act(_linear(x, w1, b1)))  # (S, E*H)
        hid = (hid.view(s, e, h) * gates.unsqueeze(-1)).reshape(s, e * h)
        y = hid @ self.fc2.weight.reshape(e * h, -1)  # (S, O)
        if self.fc2.bias is not None:
            y = y + gates @ self.fc2.bias
        return self.drop(y)

    def select(self, keep: torch.Tensor) -> MlpExperts:
        new = MlpExperts.__new__(MlpExperts)
        nn.Module.__init__(new)
        new.num_experts, new.dim, new.hidden = len(keep), self.dim, self.hidden
        new.fc1, new.act, new.drop, new.fc2 = self.fc1.select(keep), self.act, self.drop, self.fc2.select(keep)
        return new

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, dim={self.dim}, hidden={self.hidden}"


class FiLMExperts(nn.Module):
    """E feature-modulation experts (MoFME's FME): expert e maps h to ``gamma_e(h) * h + beta_e(h)``.

    ``gamma`` and ``beta`` are stacked linear maps d -> d (weights (E, d, d)). The experts act on the output h of
    a shared block (see :class:`~vision_moe.moe.MoEFiLM`), so an expert holds 2 d^2 parameters where an FFN expert
    (d -> 4d -> d) holds 8 d^2. ``gamma``'s bias starts at 1 and every weight near 0, so each expert starts as
    (about) the identity modulation: the layer then starts as its shared gated block and adaptor.
    """

    def __init__(self, num_experts: int, dim: int, bias: bool = True) -> None:
        super().__init__()
        self.num_experts, self.dim = num_experts, dim
        self.gamma = LinearExperts(num_experts, dim, dim, bias)
        self.beta = LinearExperts(num_experts, dim, dim, bias)
        if bias:
            with torch.no_grad():
                self.gamma.bias.fill_(1.0)

    def forward_grouped(self, x: torch.Tensor) -> torch.Tensor:  # (E, C, d) -> (E, C, d)
        return self.gamma.forward_grouped(x) * x + self.beta.forward_grouped(x)

    def forward_channels_first(self, x: torch.Tensor) -> torch.Tensor:
        """(1, E*d, T, 1) -> (1, E*d, T, 1): see :meth:`LinearExperts.forward_channels_first`."""
        return self.gamma.forward_channels_first(x) * x + self.beta.forward_channels_first(x)

    def forward_split(self, x: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
        """x (sum counts, d), rows sorted by expert -> one (counts[e], d) output per expert."""
        gs, bs = self.gamma.forward_split(x, counts), self.beta.forward_split(x, counts)
        return [g * xe + b for g, b, xe in zip(gs, bs, torch.split(x, counts))]

    def forward_expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return self.gamma.forward_expert(e, x) * x + self.beta.forward_expert(e, x)

    def forward_dense_gated(self, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """sum_e gates[:, e] * expert_e(x) with every expert on every token (MoFME's reference computes it so).

        x (S, d), gates (S, E) -> (S, d): one 2-D GEMM against [gamma | beta] of all experts (d, E*2d), then the
        gates combine: x * sum_e g_e gamma_e(x) + sum_e g_e beta_e(x). Static shapes, no data-dependent ops.
        """
        e, d, _ = self.gamma.weight.shape
        s = x.shape[0]
        w = torch.cat([self.gamma.weight, self.beta.weight], dim=2).permute(1, 0, 2).reshape(d, e * 2 * d)
        b = None
        if self.gamma.bias is not None:
            b = torch.cat([self.gamma.bias, self.beta.bias], dim=1).reshape(e * 2 * d)
        gb = _linear(x, w, b).view(s, e, 2 * d)  # (S, E, 2d)
        mixed = torch.einsum("sen,se->sn", gb, gates.to(gb.dtype))  # (S, 2d): gated gamma | beta
        return mixed[:, :d] * x + mixed[:, d:]

    def select(self, keep: torch.Tensor) -> FiLMExperts:
        new = FiLMExperts.__new__(FiLMExperts)
        nn.Module.__init__(new)
        new.num_experts, new.dim = len(keep), self.dim
        new.gamma, new.beta = self.gamma.select(keep), self.beta.select(keep)
        return new

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, dim={self.dim}"


def expert_flops(experts: nn.Module, tokens: int) -> int:
    """Multiply-accumulate FLOPs (2 per MAC) of ``tokens`` assignments through one expert."""
    if isinstance(experts, FiLMExperts):
        return 2 * tokens * 2 * experts.dim * experts.dim
    if isinstance(experts, MlpExperts):
        return 2 * tokens * (experts.dim * experts.hidden + experts.hidden * experts.fc2.out_features)
    if isinstance(experts, LinearExperts):
        return 2 * tokens * experts.in_features * experts.out_features
    raise TypeError(f"unknown experts type {type(experts).__name__}")
