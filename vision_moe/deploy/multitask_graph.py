"""One exportable graph for all tasks: the task is an int64 input, every expert is stored once.

:class:`TaskIndexedModel` runs a :class:`~vision_moe.MoEVisionTransformer` (alone, with its classifier, or as the
backbone of a :class:`~vision_moe.models.multitask.MultiTaskModel`) with the task given as a tensor: each router's
per-task gate weights / task embeddings / expert masks are stacked into (T, ...) tensors and picked with ``Gather``
(``index_select``); the heads all run and ``Where`` picks the task's output (outputs of different channel counts
are zero-padded to the largest; the report records each task's real channel count). Detection heads are decoded
in the graph as in the per-task graphs and come out on ``boxes`` / ``scores``. Routing and dispatch reuse
the model's own modules (each MoE layer's ``apply_experts``); only the task lookup is rewritten,
because the model's ``forward`` takes the task as a Python string, which cannot be a graph input.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..heads.detection import FCOSDetectionHead
from ..models.moe_vit import token_stride
from ..moe import MoEAttention, MoEMlp
from ..moe.router import MultiGateRouter, TaskEmbeddingRouter
from .prepost import decode_detections

__all__ = ["TaskIndexedModel"]


class _TaskIndexedRouter(nn.Module):
    """A task-conditioned router whose task is an index tensor (1,) int64."""

    def __init__(self, router: nn.Module, tasks: tuple[str, ...]) -> None:
        super().__init__()
        if isinstance(router, MultiGateRouter):
            gates = [router.gates[t] for t in tasks]
            self.kind = "multi_gate"
            self.register_buffer("weight", torch.stack([g.proj.weight.detach() for g in gates]))  # (T, E, M)
            has_bias = gates[0].proj.bias is not None
            self.register_buffer("bias", torch.stack([g.proj.bias.detach() for g in gates]) if has_bias else None)
            self.register_buffer("mask", torch.stack([g.expert_mask for g in gates]))  # (T, E)
            flags = {(g.top_k, g.renormalize) for g in gates}
        elif isinstance(router, TaskEmbeddingRouter):
            g = router.gate
            idx = [router.tasks.index(t) for t in tasks]
            self.kind = "task_embed"
            self.register_buffer("weight", g.proj.weight.detach().clone())  # (E, M + D)
            self.register_buffer("bias", None if g.proj.bias is None else g.proj.bias.detach().clone())
            self.register_buffer("task_embed", router.task_embed.weight.detach()[idx].clone())  # (T, D)
            self.register_buffer("mask", router.task_expert_mask[idx] & g.expert_mask)  # (T, E)
            flags = {(g.top_k, g.renormalize)}
        else:
            raise TypeError(
                f"cannot index router {type(router).__name__} by task; expected MultiGateRouter or TaskEmbeddingRouter"
            )
        if len(flags) != 1:
            raise ValueError("the tasks' gates differ in top_k or renormalize; one graph needs them equal")
        self.top_k, self.renormalize = flags.pop()

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (S, M), t (1,) -> expert_index (S, k), combine_weights (S, k); the eval-mode TopKGate routing."""
        x = x.float()
        if self.kind == "multi_gate":
            w = self.weight.index_select(0, t)[0]  # (E, M)
            b = None if self.bias is None else self.bias.index_select(0, t)[0]
            logits = F.linear(x, w, b)
        else:
            emb = self.task_embed.index_select(0, t).expand(x.shape[0], -1)  # (S, D)
            logits = F.linear(torch.cat([x, emb], dim=-1), self.weight, self.bias)
        mask = self.mask.index_select(0, t)  # (1, E)
        logits = logits.masked_fill(~mask, float("-inf"))
        probs = logits.softmax(dim=-1)
        _, expert_index = logits.topk(self.top_k, dim=-1)
        combine = probs.gather(-1, expert_index)
        if self.renormalize:
            combine = combine / combine.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(combine.dtype).tiny)
        return expert_index, combine


class _TaskIndexedLayer(nn.Module):
    """An :class:`MoEMlp` or :class:`MoEAttention` with task-indexed routing; after routing, the layer's own
    ``apply_experts`` (capacity, dispatch, attention) runs, so the graph computes exactly what the layer does."""

    def __init__(self, layer: MoEMlp | MoEAttention, tasks: tuple[str, ...]) -> None:
        super().__init__()
        self.layer = layer
        self.router = _TaskIndexedRouter(layer.router, tasks)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        idx, comb = self.router(x.reshape(-1, x.shape[-1]), t)
        return self.layer.apply_experts(x, idx, comb)[0]


class TaskIndexedModel(nn.Module):
    """``forward(images (B, 3, H, W) float, task (1,) int64)`` -> the output of task ``tasks[task]``: one tensor, or
    (logits, out) when classification and dense tasks are mixed (see :meth:`output_groups`).

    ``model``: a MoEVisionTransformer (its classifier head serves every task) or a MultiTaskModel (one head per
    task). ``out_channels[i]`` is task i's real channel count in the (padded) output.
    """

    def __init__(
        self, model: nn.Module, tasks: tuple[str, ...] | None = None, image_size: tuple[int, int] | None = None
    ) -> None:
        super().__init__()
        if hasattr(model, "heads") and hasattr(model, "backbone"):
            backbone, heads = model.backbone, dict(model.heads.items())
        else:
            backbone, heads = model, None
        self.tasks = tuple(tasks or (model.tasks if heads is None else tuple(heads)))
        unknown = [t for t in self.tasks if t not in backbone.tasks]
        if unknown:
            raise ValueError(f"unknown tasks {unknown}; the model routes {list(backbone.tasks)}")
        self.backbone = backbone
        self.heads = None if heads is None else nn.ModuleList([heads[t] for t in self.tasks])
        # detection heads: decoded in the graph (boxes, scores) with their points as constants for the export size
        self.det_idx = [i for i, h in enumerate(self.heads or []) if isinstance(h, FCOSDetectionHead)]
        if self.det_idx:
            if image_size is None:
                raise ValueError("a multi-task graph with detection needs image_size (the FCOS points are constants)")
            self.image_size = (int(image_size[0]), int(image_size[1]))
            for i in self.det_idx:
                self.register_buffer(f"points{i}", self.heads[i].anchors(self.image_size).float(), persistent=False)
            counts = {getattr(self, f"points{i}").shape[0] for i in self.det_idx}
            if len(counts) > 1:
                raise ValueError(f"detection tasks with different point counts {sorted(counts)} cannot share outputs")
        self.attn = nn.ModuleList()
        self.mlp = nn.ModuleList()
        for blk in backbone.blocks:
            self.attn.append(
                _TaskIndexedLayer(blk.attn, self.tasks) if isinstance(blk.attn, MoEAttention) else nn.Identity()
            )
            self.mlp.append(_TaskIndexedLayer(blk.mlp, self.tasks) if isinstance(blk.mlp, MoEMlp) else nn.Identity())
        if backbone.task_embed is not None:
            idx = [backbone.tasks.index(t) for t in self.tasks]
            self.register_buffer("task_embed", backbone.task_embed.detach()[:, idx].clone())  # (depth, T, C)
        else:
            self.task_embed = None

    def forward_features(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        bb = self.backbone
        x = bb._pos_embed(bb.patch_embed(x))  # (B, prefix + N, C)
        for i, blk in enumerate(bb.blocks):
            if self.task_embed is not None:
                x = x + self.task_embed[i].index_select(0, t).to(x.dtype)  # (1, C) broadcast
            h = blk.norm1(x)
            h = self.attn[i](h, t) if isinstance(blk.attn, MoEAttention) else blk.attn(h)
            x = x + blk.drop_path1(blk.ls1(h))
            h = blk.norm2(x)
            h = self.mlp[i](h, t) if isinstance(blk.mlp, MoEMlp) else blk.mlp(h)
            x = x + blk.drop_path2(blk.ls2(h))
        return bb.norm(x)

    def output_groups(self, images: torch.Tensor) -> dict[str, list[int]]:
        """Output name -> indices of the tasks it serves, in the order :meth:`forward` returns them: ``logits``
        (rank-2 outputs, classification), ``out`` (rank-4, dense), ``boxes`` and ``scores`` (detection, decoded).
        A task's result is read from its group's output(s); the others hold other tasks' results."""
        if self.heads is None:
            return {"logits": list(range(len(self.tasks)))}
        with torch.no_grad():
            outs = self._head_outputs(images, torch.zeros(1, dtype=torch.long))
        groups: dict[str, list[int]] = {}
        for i, o in enumerate(outs):
            if isinstance(o, tuple):
                groups.setdefault("boxes", []).append(i)
                groups.setdefault("scores", []).append(i)
            else:
                groups.setdefault("logits" if o.dim() == 2 else "out", []).append(i)
        order = ("logits", "out", "boxes", "scores")
        return {k: groups[k] for k in order if k in groups}

    def _head_outputs(self, images: torch.Tensor, t: torch.Tensor) -> list[torch.Tensor]:
        tokens = self.forward_features(images, t)
        if self.heads is None:
            return [self.backbone.forward_head(tokens)]
        p = token_stride(self.backbone.patch_embed)
        size = (images.shape[-2], images.shape[-1])
        grid = (size[0] // p[0], size[1] // p[1])
        outs: list = []
        for i, head in enumerate(self.heads):
            o = head(tokens, grid, size)
            if i in self.det_idx:
                if size != self.image_size:
                    raise ValueError(f"input size {size} differs from the export size {self.image_size}")
                o = decode_detections(o, getattr(self, f"points{i}"), size)  # (boxes (B, A, 4), scores (B, A, K))
            outs.append(o)
        return outs

    @staticmethod
    def _select(t: torch.Tensor, idx: list[int], group: list[torch.Tensor], dim: int) -> torch.Tensor:
        """Task ``t``'s tensor among ``group`` (tasks ``idx``), channel dim ``dim`` zero-padded to the widest."""
        c = max(o.shape[dim] for o in group)
        rank = group[0].dim()
        pad = [0, 0] * (rank - 1 - dim)
        group = [F.pad(o, pad + [0, c - o.shape[dim]]) if o.shape[dim] < c else o for o in group]
        out = group[0]
        for i, o in zip(idx[1:], group[1:]):
            out = torch.where((t == i).reshape([1] * rank), o, out)
        return out

    def forward(self, images: torch.Tensor, task: torch.Tensor):
        t = task.reshape(1).long()
        outs = self._head_outputs(images, t)
        if len(outs) == 1:
            return outs[0]
        results = []
        plain = [i for i, o in enumerate(outs) if not isinstance(o, tuple)]
        for rank in sorted({outs[i].dim() for i in plain}):
            idx = [i for i in plain if outs[i].dim() == rank]
            results.append(self._select(t, idx, [outs[i] for i in idx], 1))
        if self.det_idx:
            results.append(self._select(t, self.det_idx, [outs[i][0] for i in self.det_idx], 2))  # boxes
            results.append(self._select(t, self.det_idx, [outs[i][1] for i in self.det_idx], 2))  # scores
        return tuple(results) if len(results) > 1 else results[0]

    def out_channels(self, images: torch.Tensor) -> list[int]:
        """Each task's real channel count for ``images``: dim 1 of its output, classes for detection (scores' K)."""
        with torch.no_grad():
            outs = self._head_outputs(images, torch.zeros(1, dtype=torch.long))
        if self.heads is None:
            return [outs[0].shape[1]] * len(self.tasks)
        return [o[1].shape[-1] if isinstance(o, tuple) else o.shape[1] for o in outs]
