"""Where an export starts: a training checkpoint, or a registered model name with overrides (shared by the tools)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch.nn as nn

__all__ = ["parse_overrides", "load_checkpoint_source"]


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["depth=2", "img_size=[32,48]"]`` -> ``{"depth": 2, "img_size": [32, 48]}`` (values parsed as JSON)."""
    out: dict[str, Any] = {}
    for kv in items:
        if "=" not in kv:
            raise ValueError(f"--set {kv!r}: expected KEY=VALUE")
        k, v = kv.split("=", 1)
        out[k] = _value(v)
    return out


def load_checkpoint_source(
    path: str | Path, overrides: dict[str, Any] | None = None
) -> tuple[nn.Module, dict[str, Any], tuple[float, ...], tuple[float, ...]]:
    """(model, config, mean, std) of a training checkpoint; its config.json defines the architecture."""
    if overrides:
        raise ValueError("--set cannot change a checkpoint's architecture; its config.json defines the model")
    from ..engine.checkpoint import load_model

    model, cfg = load_model(path)
    # the trainer stores the normalisation it trained with next to the architecture (config.json "model"); the
    # experiment's data section holds the same values and is the fallback for checkpoints written without them
    m = cfg.get("model") or {}
    data = (cfg.get("experiment") or {}).get("data") or {}
    mean = m.get("mean") or data.get("mean") or (0.5,) * 3
    std = m.get("std") or data.get("std") or (0.5,) * 3
    return model, cfg, tuple(float(v) for v in mean), tuple(float(v) for v in std)
