"""From a :class:`~vision_moe.models.moe_vit.MoEVisionTransformer` to the flat, float description the HLS kernels run.

Everything that can be folded offline is folded here, in float64, before quantisation:
input normalisation into the patch embedding, the attention scale into the query projection, LayerScale into the
projections, a task-embedding router's task vector into its gate bias. What the kernels cannot run raises a
one-line :class:`UnsupportedModelError` naming it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
from timm.layers import PatchEmbed

from .config import HLSConfig

__all__ = ["UnsupportedModelError", "LinearSpec", "GateSpec", "BlockSpec", "ModelSpec", "extract", "choose_tile"]

_logger = logging.getLogger(__name__)


class UnsupportedModelError(ValueError):
    """The model uses something the HLS kernels do not implement."""


@dataclass
class LinearSpec:
    w: np.ndarray  # (in, out) float64
    b: np.ndarray  # (out,) float64

    @property
    def shape(self) -> tuple[int, int]:
        return self.w.shape


@dataclass
class GateSpec:
    task: str
    lin: LinearSpec  # (C, E_kept)
    mask: np.ndarray  # (E_kept,) bool: experts this task may use


@dataclass
class BlockSpec:
    index: int
    ln1: tuple[np.ndarray, np.ndarray]
    qkv: LinearSpec
    proj: LinearSpec
    ln2: tuple[np.ndarray, np.ndarray]
    fc1: LinearSpec | None = None  # dense MLP
    fc2: LinearSpec | None = None
    gates: list[GateSpec] = field(default_factory=list)  # MoE: one per task, in task order
    experts: list[tuple[LinearSpec, LinearSpec]] = field(default_factory=list)  # kept experts (fc1, fc2)
    expert_ids: list[int] = field(default_factory=list)  # their indices in the full model

    @property
    def is_moe(self) -> bool:
        return bool(self.experts)


@dataclass
class ModelSpec:
    name: str
    tasks: tuple[str, ...]
    img_size: tuple[int, int]
    patch: int
    dim: int
    heads: int
    hidden: int  # dense MLP hidden (0 if none)
    expert_hidden: int
    num_experts_full: int
    top_k: int
    renormalize: bool
    gelu_approx: str
    ln_eps: float
    patch_embed: LinearSpec  # (3 p p, C) with normalisation folded; input = raw byte / 256
    cls_pos: np.ndarray  # (C,) class token + its position embedding
    pos: np.ndarray  # (N, C) patch position embeddings
    blocks: list[BlockSpec]
    norm: tuple[np.ndarray, np.ndarray]
    head: LinearSpec | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    tile: int

    @property
    def grid(self) -> tuple[int, int]:
        return self.img_size[0] // self.patch, self.img_size[1] // self.patch

    @property
    def num_tokens(self) -> int:
        return 1 + self.grid[0] * self.grid[1]

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def num_experts(self) -> int:  # experts held per MoE layer (max over layers)
        return max((len(b.experts) for b in self.blocks if b.is_moe), default=0)


def _np(t: torch.Tensor | None, n: int | None = None) -> np.ndarray:
    if t is None:
        return np.zeros(n, dtype=np.float64)
    return t.detach().to(torch.float64).cpu().numpy()


def _linear(m: nn.Linear) -> LinearSpec:
    return LinearSpec(_np(m.weight).T.copy(), _np(m.bias, m.out_features))


def _ln(m: nn.Module, what: str) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(m, nn.LayerNorm) or m.weight is None or len(m.normalized_shape) != 1:
        raise UnsupportedModelError(f"unsupported layer: {what} is {type(m).__name__}, expected an affine nn.LayerNorm")
    return _np(m.weight), _np(m.bias, m.normalized_shape[0])


def _ls(m: nn.Module) -> np.ndarray | None:
    if isinstance(m, nn.Identity):
        return None
    if hasattr(m, "gamma"):
        return _np(m.gamma)
    raise UnsupportedModelError(f"unsupported layer: layer scale {type(m).__name__}")


def choose_tile(dim: int, heads: int, requested: int | None) -> int:
    """Output columns per weight tile. It must divide the embedding dim, and the head count must divide it (each
    tile carries an equal slice of every head, so all heads' Q/K/V arrive in the same bursts)."""
    if requested is not None:
        if requested < 1 or dim % requested:
            raise UnsupportedModelError(f"tile size {requested} does not divide the embedding dim {dim}")
        if requested % heads:
            raise UnsupportedModelError(f"head count {heads} does not divide the tile size {requested}")
        return requested
    for t in range(min(dim, 64), 0, -1):
        if dim % t == 0 and t % heads == 0:
            return t
    raise UnsupportedModelError(f"no tile size for embedding dim {dim} with {heads} heads")


def extract(
    model: nn.Module,
    tasks: tuple[str, ...],
    cfg: HLSConfig,
    img_size: tuple[int, int] | None = None,
    name: str = "model",
    all_experts: bool = False,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
) -> ModelSpec:
    """Describe ``model`` (an M³ViT; already specialised when one task) for ``tasks``.

    ``all_experts`` keeps every expert (used to measure the full model's footprint); ``mean``/``std`` override the
    model's input normalisation (folded into the patch embedding)."""
    from ...models.moe_vit import MoEVisionTransformer
    from ...moe import MoEMlp
    from ...moe.router import MultiGateRouter, TaskEmbeddingRouter

    if not isinstance(model, MoEVisionTransformer):
        raise UnsupportedModelError(
            f"unsupported model {type(model).__name__}; the HLS kernels run MoEVisionTransformer"
        )
    if model.moe_attn_block_idx:
        raise UnsupportedModelError(
            f"unsupported layer: MoE attention (Mod-Squad) in blocks {list(model.moe_attn_block_idx)}"
        )
    if model.task_embed is not None:
        raise UnsupportedModelError("unsupported layer: per-block task embedding (task_embed_blocks=True)")
    if not model.has_class_token:
        raise UnsupportedModelError("unsupported model: no class token")
    if model.num_classes > 0 and model.global_pool != "token":
        raise UnsupportedModelError(f"unsupported head: global_pool={model.global_pool!r} (supported: 'token')")
    if not isinstance(model.fc_norm, nn.Identity):
        raise UnsupportedModelError("unsupported layer: fc_norm")
    pe = model.patch_embed
    if not isinstance(pe, PatchEmbed):
        raise UnsupportedModelError(f"unsupported layer: {type(pe).__name__} patch embedding (only timm's PatchEmbed)")
    p = pe.patch_size[0]
    if pe.patch_size[0] != pe.patch_size[1]:
        raise UnsupportedModelError(f"unsupported patch size {tuple(pe.patch_size)}: patches must be square")
    if not isinstance(pe.norm, nn.Identity):
        raise UnsupportedModelError("unsupported layer: patch-embedding norm")
    h, w = img_size or tuple(pe.img_size)
    if h % p or w % p:
        raise UnsupportedModelError(f"image size {h}x{w} is not a multiple of the patch size {p}")
    if pe.proj.in_channels != 3:
        raise UnsupportedModelError(f"unsupported input: {pe.proj.in_channels} channels (pixels are RGB bytes)")
    dim = model.embed_dim
    blk0 = model.blocks[0]
    heads = blk0.attn.num_heads
    if dim % heads:
        raise UnsupportedModelError(f"head count {heads} does not divide the embedding dim {dim}")
    tile = choose_tile(dim, heads, cfg.tile)

    cfg_d = getattr(model, "pretrained_cfg", None) or {}
    mean = tuple(float(v) for v in (mean or cfg_d.get("mean", (0.5, 0.5, 0.5))))
    std = tuple(float(v) for v in (std or cfg_d.get("std", (0.5, 0.5, 0.5))))
    if len(mean) != 3 or len(std) != 3:
        raise UnsupportedModelError(f"input normalisation needs 3 channels, got mean {mean} std {std}")
    # x_norm = (byte/255 - mean) / std and the pixel port holds v = byte/256, so x_norm = v * 256/(255 std) - mean/std.
    wconv = _np(pe.proj.weight)  # (C, 3, p, p)
    scale = np.array([256.0 / (255.0 * s) for s in std])
    shift = np.array([m / s for m, s in zip(mean, std)])
    w_pe = (wconv * scale[None, :, None, None]).reshape(dim, -1).T.copy()  # (3 p p, C), rows ordered (c, ky, kx)
    b_pe = _np(pe.proj.bias, dim) - np.einsum("ocyx,c->o", wconv, shift)
    gh, gw = h // p, w // p
    pos = model.pos_embed
    if (gh, gw) != tuple(pe.grid_size):
        from timm.layers import resample_abs_pos_embed

        pos = resample_abs_pos_embed(pos, (gh, gw), num_prefix_tokens=model.num_prefix_tokens)
    pos = _np(pos)[0]
    cls_pos = _np(model.cls_token)[0, 0] + pos[0]

    gelu_approx = None
    moe_cfg = dict(top_k=0, renorm=False, hidden=0, experts_full=0)
    blocks: list[BlockSpec] = []
    hidden = 0
    for i, blk in enumerate(model.blocks):
        at = blk.attn
        if not hasattr(at, "qkv") or at.num_heads != heads:
            raise UnsupportedModelError(f"unsupported layer: attention of block {i} ({type(at).__name__})")
        if at.head_dim * heads != dim:
            raise UnsupportedModelError(f"unsupported layer: attention of block {i} has heads x head_dim != {dim}")
        if not isinstance(at.q_norm, nn.Identity) or not isinstance(at.k_norm, nn.Identity):
            raise UnsupportedModelError(f"unsupported layer: qk_norm in block {i}")
        if not isinstance(getattr(at, "norm", nn.Identity()), nn.Identity):
            raise UnsupportedModelError(f"unsupported layer: attention output norm in block {i}")
        qkv = _linear(at.qkv)
        sc = (dim // heads) ** -0.5
        qkv.w[:, :dim] *= sc
        qkv.b[:dim] *= sc
        proj = _linear(at.proj)
        g1 = _ls(blk.ls1)
        if g1 is not None:
            proj.w *= g1[None, :]
            proj.b *= g1
        g2 = _ls(blk.ls2)
        spec = BlockSpec(i, _ln(blk.norm1, f"blocks.{i}.norm1"), qkv, proj, _ln(blk.norm2, f"blocks.{i}.norm2"))
        mlp = blk.mlp
        if isinstance(mlp, MoEMlp):
            if mlp.capacity is not None or mlp.capacity_factor is not None:
                raise UnsupportedModelError(
                    f"unsupported routing in block {i}: expert capacity limit (the HLS MoE is dropless)"
                )
            ex = mlp.experts
            act = ex.act
            r = mlp.router
            keep_sets = []
            for t in tasks:
                keep_sets.append(set(range(r.num_experts)) if all_experts else set(r.reachable_experts(t).tolist()))
            kept = sorted(set().union(*keep_sets))
            for t, ks in zip(tasks, keep_sets):
                if isinstance(r, MultiGateRouter):
                    lin = _linear(r.gates[t].proj)
                    renorm = r.gates[t].renormalize
                elif isinstance(r, TaskEmbeddingRouter):
                    full = _np(r.gate.proj.weight)  # (E, C + task_dim)
                    emb = _np(r.task_embed.weight)[r.tasks.index(t)]
                    lin = LinearSpec(full[:, :dim].T.copy(), _np(r.gate.proj.bias, r.num_experts) + full[:, dim:] @ emb)
                    renorm = r.gate.renormalize
                else:
                    raise UnsupportedModelError(f"unsupported router {type(r).__name__} in block {i}")
                lin = LinearSpec(lin.w[:, kept].copy(), lin.b[kept].copy())
                spec.gates.append(GateSpec(t, lin, np.array([e in ks for e in kept])))
            w1, b1 = _np(ex.fc1.weight), _np(ex.fc1.bias, None) if ex.fc1.bias is not None else None
            w2, b2 = _np(ex.fc2.weight), _np(ex.fc2.bias) if ex.fc2.bias is not None else None
            for e in kept:
                f1 = LinearSpec(w1[e].copy(), b1[e].copy() if b1 is not None else np.zeros(ex.hidden))
                f2 = LinearSpec(w2[e].copy(), b2[e].copy() if b2 is not None else np.zeros(dim))
                if g2 is not None:
                    f2.w *= g2[None, :]
                    f2.b *= g2
                spec.experts.append((f1, f2))
            spec.expert_ids = list(kept)
            if moe_cfg["top_k"] and (moe_cfg["top_k"] != mlp.top_k or moe_cfg["hidden"] != ex.hidden):
                raise UnsupportedModelError(
                    f"unsupported model: MoE blocks differ in top_k or expert hidden (block {i})"
                )
            moe_cfg.update(top_k=mlp.top_k, renorm=renorm, hidden=ex.hidden, experts_full=r.num_experts)
        else:
            if not (hasattr(mlp, "fc1") and hasattr(mlp, "fc2")) or not isinstance(mlp.norm, nn.Identity):
                raise UnsupportedModelError(f"unsupported layer: MLP of block {i} ({type(mlp).__name__})")
            act = mlp.act
            spec.fc1, spec.fc2 = _linear(mlp.fc1), _linear(mlp.fc2)
            if g2 is not None:
                spec.fc2.w *= g2[None, :]
                spec.fc2.b *= g2
            if hidden and hidden != spec.fc1.w.shape[1]:
                raise UnsupportedModelError(f"unsupported model: dense MLP widths differ (block {i})")
            hidden = spec.fc1.w.shape[1]
        if not isinstance(act, nn.GELU):
            raise UnsupportedModelError(f"unsupported activation {type(act).__name__} in block {i} (GELU only)")
        if gelu_approx not in (None, act.approximate):
            raise UnsupportedModelError("unsupported model: mixed GELU approximations")
        gelu_approx = act.approximate
        blocks.append(spec)
    eps = {m.eps for m in model.modules() if isinstance(m, nn.LayerNorm)}
    if len(eps) > 1:
        raise UnsupportedModelError(f"unsupported model: LayerNorms with different eps {sorted(eps)}")
    head = _linear(model.head) if model.num_classes > 0 else None
    return ModelSpec(
        name=name,
        tasks=tuple(tasks),
        img_size=(h, w),
        patch=p,
        dim=dim,
        heads=heads,
        hidden=hidden,
        expert_hidden=moe_cfg["hidden"],
        num_experts_full=moe_cfg["experts_full"],
        top_k=moe_cfg["top_k"],
        renormalize=moe_cfg["renorm"],
        gelu_approx=gelu_approx or "none",
        ln_eps=float(eps.pop() if eps else 1e-6),
        patch_embed=LinearSpec(w_pe, b_pe),
        cls_pos=cls_pos,
        pos=pos[1:],
        blocks=blocks,
        norm=_ln(model.norm, "norm"),
        head=head,
        mean=mean,
        std=std,
        tile=tile,
    )
