"""Optimizers (AdamW / SGD, no weight decay on norms, biases, embeddings) and warm-up + cosine / poly schedules."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..config import OptimConfig, SchedConfig

__all__ = ["build_optimizer", "build_scheduler", "lr_factor"]


def build_optimizer(
    model: nn.Module, cfg: OptimConfig, extra_params: list[nn.Parameter] | None = None
) -> torch.optim.Optimizer:
    """Param groups: decay / no-decay (1-d tensors and ``backbone.no_weight_decay()``), heads at ``head_lr_mult``."""
    skip = set()
    backbone = getattr(model, "backbone", None)
    if backbone is not None and hasattr(backbone, "no_weight_decay"):
        skip = {f"backbone.{n}" for n in backbone.no_weight_decay()}
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name in skip
        is_head = name.startswith("heads.")
        groups.setdefault((no_decay, is_head), []).append(p)
    param_groups = [
        {"params": ps, "weight_decay": 0.0 if nd else cfg.weight_decay, "lr": cfg.lr * (cfg.head_lr_mult if h else 1.0)}
        for (nd, h), ps in sorted(groups.items())
    ]
    if extra_params:
        param_groups.append({"params": list(extra_params), "weight_decay": 0.0, "lr": cfg.lr})
    if cfg.name == "adamw":
        return torch.optim.AdamW(
            param_groups, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, fused=cfg.fused or None
        )
    if cfg.name == "sgd":
        return torch.optim.SGD(param_groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.name!r}; expected 'adamw' or 'sgd'")


def lr_factor(step: int, total: int, cfg: SchedConfig) -> float:
    """Multiplier of the base lr at ``step``: linear warm-up, then cosine / poly decay to ``min_lr_factor``."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        a = step / cfg.warmup_steps
        return cfg.warmup_start_factor + (1.0 - cfg.warmup_start_factor) * a
    if cfg.name == "constant":
        return 1.0
    t = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    if cfg.name == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * t))
    elif cfg.name == "poly":
        decay = (1.0 - t) ** cfg.power
    else:
        raise ValueError(f"unknown schedule {cfg.name!r}; expected 'cosine', 'poly' or 'constant'")
    return cfg.min_lr_factor + (1.0 - cfg.min_lr_factor) * decay


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: SchedConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, cfg))
