"""Experts as stacked weight tensors, computed batched.

Every expert family offers three ways to run, so any dispatcher can use it:
``forward_grouped`` on a padded (E, C, in) buffer (one bmm per layer), ``forward_split`` on tokens
already sorted by expert (one GEMM per expert, no padding; a list of per-expert outputs), and
``forward_expert`` for one expert. MLP experts also offer ``forward_dense_gated`` (every expert on every token,
the gates folded into the second GEMM) for the static-shape export path.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["LinearExperts", "MlpExperts"]


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


def expert_flops(experts: nn.Module, tokens: int) -> int:
    """Multiply-accumulate FLOPs (2 per MAC) of ``tokens`` assignments through one expert."""
    if isinstance(experts, MlpExperts):
        return 2 * tokens * (experts.dim * experts.hidden + experts.hidden * experts.fc2.out_features)
    if isinstance(experts, LinearExperts):
        return 2 * tokens * experts.in_features * experts.out_features
    raise TypeError(f"unknown experts type {type(experts).__name__}")
