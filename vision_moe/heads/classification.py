"""Classification head: pooled backbone tokens -> linear."""

from __future__ import annotations

import torch
import torch.nn as nn


class ClassificationHead(nn.Module):
    """Pool the tokens (class token or mean of patch tokens) and project to ``num_classes`` logits."""

    def __init__(
        self, embed_dim: int, num_classes: int, pool: str = "token", num_prefix_tokens: int = 1, drop: float = 0.0
    ) -> None:
        super().__init__()
        if pool not in ("token", "avg"):
            raise ValueError(f"pool must be 'token' or 'avg', got {pool!r}")
        if pool == "token" and num_prefix_tokens < 1:
            raise ValueError("pool='token' needs a class token (num_prefix_tokens >= 1)")
        self.pool, self.num_prefix_tokens = pool, num_prefix_tokens
        self.norm = nn.LayerNorm(embed_dim) if pool == "avg" else nn.Identity()
        self.drop = nn.Dropout(drop)
        self.fc = nn.Linear(embed_dim, num_classes)
        nn.init.trunc_normal_(self.fc.weight, std=0.02)
        nn.init.zeros_(self.fc.bias)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int], image_size: tuple[int, int]) -> torch.Tensor:
        """tokens (B, prefix + N, C) -> logits (B, K)."""
        x = tokens[:, 0] if self.pool == "token" else tokens[:, self.num_prefix_tokens :].mean(1)  # (B, C)
        return self.fc(self.drop(self.norm(x)))
