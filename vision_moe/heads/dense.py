"""Dense pixel heads on ViT patch tokens: M³ViT's SETR-PUP decoder and a light linear-upsample head."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def tokens_to_map(tokens: torch.Tensor, grid: tuple[int, int], num_prefix_tokens: int) -> torch.Tensor:
    """(B, prefix + gh*gw, C) tokens -> (B, C, gh, gw) map of the patch tokens."""
    b, _, c = tokens.shape
    x = tokens[:, num_prefix_tokens:]
    return x.transpose(1, 2).reshape(b, c, grid[0], grid[1])


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "gn":
        return nn.GroupNorm(min(32, channels), channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}; expected 'bn', 'gn' or 'none'")


class SetrPupHead(nn.Module):
    """SETR progressive upsampling (as in M³ViT): LayerNorm on patch tokens, then ``num_ups`` x
    [3x3 conv + norm + ReLU + 2x bilinear upsample] and a 1x1 conv. ``num_ups`` defaults to log2(patch size),
    i.e. 4 stages for /16, so the output is at input resolution (resized exactly when sizes do not divide)."""

    def __init__(
        self,
        embed_dim: int,
        out_channels: int,
        patch_size: int = 16,
        channels: int = 256,
        num_ups: int | None = None,
        norm: str = "bn",
        num_prefix_tokens: int = 1,
    ) -> None:
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens
        self.ln = nn.LayerNorm(embed_dim, eps=1e-6)
        n = num_ups if num_ups is not None else max(1, int(round(math.log2(patch_size))))
        layers: list[nn.Module] = []
        c_in = embed_dim
        for _ in range(n):
            layers += [
                nn.Conv2d(c_in, channels, 3, padding=1, bias=norm == "none"),
                _norm(norm, channels),
                nn.ReLU(inplace=True),
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            ]
            c_in = channels
        self.decoder = nn.Sequential(*layers)
        self.cls = nn.Conv2d(channels, out_channels, 1)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int], image_size: tuple[int, int]) -> torch.Tensor:
        """tokens (B, prefix + N, C) -> (B, out_channels, H, W) at ``image_size``."""
        x = tokens_to_map(self.ln(tokens), grid, self.num_prefix_tokens)  # (B, C, gh, gw)
        # The 1x1 classifier runs before the last 2x upsampling: both are linear and act on different axes (the
        # bilinear weights sum to 1, so the bias commutes too), so the output is the same (to float rounding) at a
        # quarter of the classifier's pixels, and only out_channels maps are upsampled instead of ``channels``:
        # 0.99x the quickstart's training step on an AVX2 CPU (benchmarks/bench_step_parts.py).
        x = self.decoder[-1](self.cls(self.decoder[:-1](x)))
        if tuple(x.shape[-2:]) != tuple(image_size):
            x = F.interpolate(x, size=image_size, mode="bilinear", align_corners=False)
        return x


class LinearUpsampleHead(nn.Module):
    """Light head: LayerNorm, a 1x1 conv on the patch grid, bilinear upsampling to the input size."""

    def __init__(self, embed_dim: int, out_channels: int, num_prefix_tokens: int = 1) -> None:
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens
        self.ln = nn.LayerNorm(embed_dim, eps=1e-6)
        self.cls = nn.Conv2d(embed_dim, out_channels, 1)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int], image_size: tuple[int, int]) -> torch.Tensor:
        x = self.cls(tokens_to_map(self.ln(tokens), grid, self.num_prefix_tokens))  # (B, K, gh, gw)
        return F.interpolate(x, size=image_size, mode="bilinear", align_corners=False)
