"""Task metrics of the fixed-point model of a checkpoint's backbone, with the checkpoint's own heads on the host.

The generated accelerator computes the backbone (up to the final LayerNorm); the task heads (classifier, FCOS,
SETR-PUP decoder) run in PyTorch on its output, as they would on the board's processor. :class:`FixedPointBackbone`
puts the NumPy fixed-point reference (bit-exact with the C-simulation at every layer) behind a backbone's
``forward_features``, so the project's evaluator scores it on the checkpoint's held-out split exactly as it scores
the float model, and reports its agreement with the float model (top-1 agreement, mIoU between the two masks).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .fixed import to_float
from .reference import QuantModel, run_reference

__all__ = ["FixedPointBackbone", "evaluate_fixed_point"]


class FixedPointBackbone(nn.Module):
    """``backbone.forward_features`` computed by the fixed-point reference of ``qm`` (one image at a time).

    The evaluator's images arrive normalised; they are turned back into the bytes the accelerator's pixel port
    takes (exact for images that were not resized; otherwise rounded to the nearest byte, as a camera delivers)."""

    def __init__(self, backbone: nn.Module, qm: QuantModel) -> None:
        super().__init__()
        self.qm = qm
        self.patch_embed = backbone.patch_embed  # the heads' grid arithmetic reads it (no computation here)
        self.tasks = tuple(qm.spec.tasks)
        self.embed_dim = backbone.embed_dim
        self.num_prefix_tokens = backbone.num_prefix_tokens
        self.register_buffer("mean", torch.tensor(qm.spec.mean, dtype=torch.float64).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(qm.spec.std, dtype=torch.float64).view(1, 3, 1, 1))

    def forward_features(self, x: torch.Tensor, task: str | None = None, *, return_aux: bool = False, shared=None):
        if shared is not None:
            raise ValueError("FixedPointBackbone runs whole images (shared= is not supported)")
        task = task if task is not None else self.tasks[0]
        pixels = ((x.double() * self.std + self.mean) * 255.0).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
        fa = self.qm.cfg.act.frac
        tokens = [to_float(run_reference(self.qm, p.astype(np.int64), task).layers["norm"], fa) for p in pixels]
        out = torch.from_numpy(np.stack(tokens)).to(device=x.device, dtype=torch.float32)
        return (out, []) if return_aux else out


def evaluate_fixed_point(
    checkpoint: str | Path, qms: dict[str, QuantModel], tasks: list[str], images: int
) -> dict[str, dict[str, dict[str, float]]]:
    """For each task (with a head in the checkpoint): the float model's held-out metrics and, for each fixed-point
    model in ``qms`` (name -> quantised model), its metrics and its agreement with the float model, on the first
    ``images`` held-out images (whole evaluation batches)."""
    from ...engine.checkpoint import read_config
    from ...engine.trainer import evaluate_checkpoint

    cfg = read_config(checkpoint, require=("experiment",), why="the held-out images come from its data section")
    bs = int(((cfg["experiment"].get("data") or {}).get("eval_batch_size")) or 1)
    batches = max(1, math.ceil(images / bs))
    out: dict[str, dict[str, dict[str, float]]] = {}
    for t in tasks:
        res = {"float": evaluate_checkpoint(checkpoint, t, max_batches=batches, device="cpu")}
        for name, qm in qms.items():
            res[name] = evaluate_checkpoint(
                checkpoint,
                t,
                max_batches=batches,
                device="cpu",
                backbone_fn=lambda bb, qm=qm: FixedPointBackbone(bb, qm),
            )
        out[t] = res
    return out
