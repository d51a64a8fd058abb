"""From a :class:`~vision_moe.models.moe_vit.MoEVisionTransformer` to the flat, float description the HLS kernels run.

Everything that can be folded offline is folded here, in float64, before quantisation:
input normalisation into the patch embedding, the attention scale into the query projection, LayerScale into the
projections, a task-embedding router's task vector into its gate bias. What the kernels cannot run raises a
one-line :class:`UnsupportedModelError` naming it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from timm.layers import PatchEmbed

from .config import HLSConfig

__all__ = [
    "UnsupportedModelError",
    "LinearSpec",
    "GateSpec",
    "MoESpec",
    "ConvSpec",
    "BlockSpec",
    "ModelSpec",
    "extract",
    "choose_tile",
]

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
class MoESpec:
    """One MoE layer: per-task gates over the kept experts, each expert two linear maps.

    MLP experts: (fc1, fc2), GELU between. Attention experts (Mod-Squad): (query, output) projections with the
    shared-key/value attention between; ``hidden`` is then the expert's inner width (expert_heads x head_dim)."""

    kind: str  # 'mlp' or 'attn'
    gates: list[GateSpec]
    experts: list[tuple[LinearSpec, LinearSpec]]
    expert_ids: list[int]  # indices of the kept experts in the full model
    top_k: int
    renormalize: bool
    hidden: int
    num_experts_full: int

    @property
    def num_experts(self) -> int:
        return len(self.experts)


@dataclass
class ConvSpec:
    """One 3x3 stem convolution (padding 1) with its BatchNorm folded in; weights in (ky, kx, c_in) row order."""

    name: str  # module path, e.g. patch_embed.backbone.2
    lin: LinearSpec  # (9 c_in, c_out)
    stride: int
    relu: bool
    c_in: int
    c_out: int
    in_size: tuple[int, int]
    out_size: tuple[int, int]


@dataclass
class BlockSpec:
    index: int
    ln1: tuple[np.ndarray, np.ndarray]
    ln2: tuple[np.ndarray, np.ndarray]
    qkv: LinearSpec | None = None  # dense attention
    proj: LinearSpec | None = None
    kv: LinearSpec | None = None  # MoE attention: shared key/value projection
    attn_moe: MoESpec | None = None
    expert_heads: int = 0  # MoE attention: heads each expert owns
    fc1: LinearSpec | None = None  # dense MLP
    fc2: LinearSpec | None = None
    mlp_moe: MoESpec | None = None
    task_embed: np.ndarray | None = None  # (tasks, C): Mod-Squad's per-block task embedding, added before the block

    @property
    def is_moe(self) -> bool:  # MoE MLP
        return self.mlp_moe is not None

    @property
    def attn_is_moe(self) -> bool:
        return self.attn_moe is not None

    @property
    def moes(self) -> list[MoESpec]:
        return [m for m in (self.attn_moe, self.mlp_moe) if m is not None]


@dataclass
class ModelSpec:
    name: str
    tasks: tuple[str, ...]
    img_size: tuple[int, int]
    patch: int  # pixels per token (the patch size, or the product of the stem strides)
    dim: int
    heads: int
    hidden: int  # dense MLP hidden (0 if none)
    gelu_approx: str
    ln_eps: float
    patch_embed: LinearSpec | None  # (3 p p, C) with normalisation folded; input = raw byte / 256; None with a stem
    stem: list[ConvSpec]  # convolutional stem (empty with a patch embedding)
    stem_norm: tuple[np.ndarray, np.ndarray] | None  # stem input: x = v * a + b per channel (v = raw byte / 256)
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
    def moe_layers(self) -> list[MoESpec]:
        """Every MoE layer in execution order (a block's attention before its MLP)."""
        return [m for b in self.blocks for m in b.moes]

    @property
    def num_experts(self) -> int:  # experts held per MoE layer (max over layers)
        return max((m.num_experts for m in self.moe_layers), default=0)

    @property
    def expert_hidden(self) -> int:  # widest expert hidden / inner width
        return max((m.hidden for m in self.moe_layers), default=0)

    @property
    def top_k(self) -> int:
        return max((m.top_k for m in self.moe_layers), default=0)

    @property
    def num_experts_full(self) -> int:
        return max((m.num_experts_full for m in self.moe_layers), default=0)

    @property
    def has_task_embed(self) -> bool:
        return any(b.task_embed is not None for b in self.blocks)


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


def _conv_stem(pe: nn.Module, h: int, w: int) -> tuple[list[ConvSpec], int]:
    """timm's ConvStem inside HybridEmbed -> 3x3 convolutions with BatchNorm folded (float64); returns the stages and
    the pixels per token. The refusals name the config keys (stem_channels / stem_strides) that built the stem."""
    from timm.layers import ConvNormAct

    if not isinstance(pe.proj, nn.Identity):
        raise UnsupportedModelError(
            f"unsupported layer: patch_embed.proj ({type(pe.proj).__name__}) after the convolutional stem; the HLS "
            "generator runs the stem that stem_channels / stem_strides build (its last conv projects to embed_dim)"
        )
    stages = list(pe.backbone.children()) if isinstance(pe.backbone, nn.Sequential) else []
    if not stages or not all(isinstance(m, ConvNormAct) for m in stages):
        raise UnsupportedModelError(
            "unsupported layer: patch_embed.backbone is not the convolutional stem that stem_channels / stem_strides "
            "build (3x3 conv + BatchNorm + ReLU stages)"
        )
    convs: list[ConvSpec] = []
    c_prev, size, stride_total = 3, (h, w), 1
    for i, m in enumerate(stages):
        name = f"patch_embed.backbone.{i}"
        conv = m.conv
        k, st, pad = tuple(conv.kernel_size), tuple(conv.stride), tuple(conv.padding)
        if k != (3, 3):
            raise UnsupportedModelError(f"{name}.conv: kernel {k[0]}x{k[1]}; the HLS conv kernel runs 3x3 kernels")
        if st[0] != st[1] or st[0] not in (1, 2):
            raise UnsupportedModelError(
                f"{name}.conv: stride {st[0] if st[0] == st[1] else st}; the HLS conv kernel runs strides 1 and 2 "
                "(stem_strides must hold only 1s and 2s)"
            )
        if pad != (1, 1) or tuple(conv.dilation) != (1, 1) or conv.groups != 1 or conv.padding_mode != "zeros":
            raise UnsupportedModelError(
                f"{name}.conv: padding {pad}, dilation {tuple(conv.dilation)}, groups {conv.groups}; the HLS conv "
                "kernel runs zero padding 1, dilation 1, groups 1"
            )
        wt = _np(conv.weight)  # (O, I, 3, 3)
        b = _np(conv.bias, conv.out_channels)
        bn = m.bn
        relu = False
        if isinstance(bn, nn.BatchNorm2d):
            g = _np(bn.weight) if bn.weight is not None else np.ones(bn.num_features)
            beta = _np(bn.bias) if bn.bias is not None else np.zeros(bn.num_features)
            inv = g / np.sqrt(_np(bn.running_var) + bn.eps)
            wt = wt * inv[:, None, None, None]
            b = (b - _np(bn.running_mean)) * inv + beta
            act = getattr(bn, "act", nn.Identity())
            if not isinstance(getattr(bn, "drop", nn.Identity()), nn.Identity):
                raise UnsupportedModelError(f"{name}.bn: dropout in the stem")
        elif isinstance(bn, (nn.Identity, nn.Sequential)) and not list(bn.children()):
            act = nn.Identity()
        else:
            raise UnsupportedModelError(f"{name}.bn: {type(bn).__name__}; the stem kernel folds a BatchNorm2d")
        if isinstance(act, nn.ReLU):
            relu = True
        elif not isinstance(act, nn.Identity):
            raise UnsupportedModelError(f"{name}: activation {type(act).__name__}; the HLS stem runs ReLU")
        if conv.in_channels != c_prev:
            raise UnsupportedModelError(f"{name}.conv: {conv.in_channels} input channels, expected {c_prev}")
        s = st[0]
        out = ((size[0] - 1) // s + 1, (size[1] - 1) // s + 1)
        lin = LinearSpec(wt.transpose(2, 3, 1, 0).reshape(9 * conv.in_channels, conv.out_channels).copy(), b)
        convs.append(ConvSpec(name, lin, s, relu, conv.in_channels, conv.out_channels, size, out))
        c_prev, size, stride_total = conv.out_channels, out, stride_total * s
    if convs[-1].relu:
        raise UnsupportedModelError(f"{convs[-1].name}: the last stem conv must project without BatchNorm/ReLU")
    return convs, stride_total


def _rescale_stem(convs: list[ConvSpec], limit: float) -> None:
    """Keep the BatchNorm-folded stem weights inside the weight type: an output channel of a conv followed by ReLU
    whose weights exceed ``limit`` is divided by a power of two and the next conv's weights of that input channel
    are multiplied by it (ReLU(y / a) = ReLU(y) / a for a > 0: the stem computes the same function). This is the
    cross-layer rescaling of data-free quantisation (Nagel et al., ICCV 2019), restricted to powers of two."""
    for cur, nxt in zip(convs[:-1], convs[1:]):
        if not cur.relu:
            continue
        amax = np.abs(cur.lin.w).max(axis=0)  # (c_out,)
        a = np.where(amax > limit, 2.0 ** np.ceil(np.log2(np.maximum(amax, 1e-300) / limit)), 1.0)
        cur.lin.w /= a[None, :]
        cur.lin.b /= a
        nxt.lin.w *= np.tile(a, 9)[:, None]  # rows in (ky, kx, c) order


def _moe_spec(layer: nn.Module, kind: str, tasks, all_experts: bool, dim: int, where: str) -> MoESpec:
    """Gates and kept experts of a MoEMlp / MoEAttention (experts filled in by the caller)."""
    from ...moe.router import MultiGateRouter, TaskEmbeddingRouter

    if layer.capacity is not None or layer.capacity_factor is not None:
        raise UnsupportedModelError(
            f"unsupported routing in {where}: expert capacity limit (the HLS MoE is dropless; export without "
            "capacity_factor)"
        )
    r = layer.router
    keep_sets = [set(range(r.num_experts)) if all_experts else set(r.reachable_experts(t).tolist()) for t in tasks]
    kept = sorted(set().union(*keep_sets))
    gates = []
    renorm = False
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
            raise UnsupportedModelError(f"unsupported router {type(r).__name__} in {where}")
        lin = LinearSpec(lin.w[:, kept].copy(), lin.b[kept].copy())
        gates.append(GateSpec(t, lin, np.array([e in ks for e in kept])))
    return MoESpec(kind, gates, [], list(kept), layer.top_k, bool(renorm), 0, r.num_experts)


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
    """Describe ``model`` (an M³ViT or Mod-Squad backbone; already specialised when one task) for ``tasks``.

    ``all_experts`` keeps every expert (used to measure the full model's footprint); ``mean``/``std`` override the
    model's input normalisation (folded into the patch embedding, or the stem's input affine)."""
    from timm.layers import HybridEmbed

    from ...models.moe_vit import MoEVisionTransformer
    from ...moe import MoEAttention, MoEMlp

    if not isinstance(model, MoEVisionTransformer):
        raise UnsupportedModelError(
            f"unsupported model {type(model).__name__}; the HLS kernels run MoEVisionTransformer"
        )
    if not model.has_class_token:
        raise UnsupportedModelError("unsupported model: no class token (class_token=False)")
    if model.num_classes > 0 and model.global_pool != "token":
        raise UnsupportedModelError(f"unsupported head: global_pool={model.global_pool!r} (supported: 'token')")
    if not isinstance(model.fc_norm, nn.Identity):
        raise UnsupportedModelError("unsupported layer: fc_norm")
    pe = model.patch_embed
    cfg_d = getattr(model, "pretrained_cfg", None) or {}
    mean = tuple(float(v) for v in (mean or cfg_d.get("mean", (0.5, 0.5, 0.5))))
    std = tuple(float(v) for v in (std or cfg_d.get("std", (0.5, 0.5, 0.5))))
    if len(mean) != 3 or len(std) != 3:
        raise UnsupportedModelError(f"input normalisation needs 3 channels, got mean {mean} std {std}")
    # x_norm = (byte/255 - mean) / std and the pixel port holds v = byte/256, so x_norm = v * 256/(255 std) - mean/std.
    scale = np.array([256.0 / (255.0 * s) for s in std])
    shift = np.array([m / s for m, s in zip(mean, std)])
    dim = model.embed_dim
    h, w = img_size or tuple(pe.img_size)
    stem: list[ConvSpec] = []
    stem_norm = None
    patch_embed = None
    if isinstance(pe, HybridEmbed):
        stem, p = _conv_stem(pe, h, w)
        _rescale_stem(stem, cfg.weight.hi / 2.0**cfg.weight.frac)
        if h % p or w % p:
            raise UnsupportedModelError(f"image size {h}x{w} is not a multiple of the stem's stride {p}")
        # not folded into the first conv: its zero padding is in normalised units (0 there is no pixel value)
        stem_norm = (scale, -shift)
        if stem[-1].c_out != dim or stem[-1].out_size != (h // p, w // p):
            raise UnsupportedModelError(f"{stem[-1].name}: output {stem[-1].out_size} x {stem[-1].c_out} != tokens")
    elif isinstance(pe, PatchEmbed):
        p = pe.patch_size[0]
        if pe.patch_size[0] != pe.patch_size[1]:
            raise UnsupportedModelError(f"unsupported patch size {tuple(pe.patch_size)}: patches must be square")
        if not isinstance(pe.norm, nn.Identity):
            raise UnsupportedModelError("unsupported layer: patch-embedding norm")
        if h % p or w % p:
            raise UnsupportedModelError(f"image size {h}x{w} is not a multiple of the patch size {p}")
        if pe.proj.in_channels != 3:
            raise UnsupportedModelError(f"unsupported input: {pe.proj.in_channels} channels (pixels are RGB bytes)")
        wconv = _np(pe.proj.weight)  # (C, 3, p, p)
        w_pe = (wconv * scale[None, :, None, None]).reshape(dim, -1).T.copy()  # (3 p p, C), rows ordered (c, ky, kx)
        b_pe = _np(pe.proj.bias, dim) - np.einsum("ocyx,c->o", wconv, shift)
        patch_embed = LinearSpec(w_pe, b_pe)
    else:
        raise UnsupportedModelError(f"unsupported layer: {type(pe).__name__} patch embedding")
    blk0 = model.blocks[0]
    heads = blk0.attn.num_heads if hasattr(blk0.attn, "num_heads") else dim // blk0.attn.head_dim
    if dim % heads:
        raise UnsupportedModelError(f"head count {heads} does not divide the embedding dim {dim}")
    tile = choose_tile(dim, heads, cfg.tile)
    gh, gw = h // p, w // p
    pos = model.pos_embed
    if (gh, gw) != tuple(pe.grid_size):
        from timm.layers import resample_abs_pos_embed

        pos = resample_abs_pos_embed(pos, (gh, gw), num_prefix_tokens=model.num_prefix_tokens)
    pos = _np(pos)[0]
    cls_pos = _np(model.cls_token)[0, 0] + pos[0]
    temb = None
    if model.task_embed is not None:  # (depth, tasks, C); a specialised model holds its one task
        temb = _np(model.task_embed)
        if temb.shape[1] != len(tasks):
            temb = temb[:, [model.tasks.index(t) for t in tasks]]

    gelu_approx = None
    blocks: list[BlockSpec] = []
    hidden = 0
    for i, blk in enumerate(model.blocks):
        at = blk.attn
        g1 = _ls(blk.ls1)
        g2 = _ls(blk.ls2)
        spec = BlockSpec(i, _ln(blk.norm1, f"blocks.{i}.norm1"), _ln(blk.norm2, f"blocks.{i}.norm2"))
        if temb is not None:
            spec.task_embed = temb[i].copy()
        if isinstance(at, MoEAttention):
            where = f"blocks.{i}.attn"
            hd = at.head_dim
            if hd != dim // heads:
                raise UnsupportedModelError(f"{where}: head dim {hd} != embed_dim / num_heads = {dim // heads}")
            if at.top_k * at.expert_heads != heads:
                raise UnsupportedModelError(
                    f"{where}: MoE attention with top_k {at.top_k} x expert_heads {at.expert_heads} = "
                    f"{at.top_k * at.expert_heads} query heads per token; the HLS attention unit runs num_heads="
                    f"{heads} (set expert_heads = num_heads / attn_top_k)"
                )
            m = _moe_spec(at, "attn", tasks, all_experts, dim, where)
            sc = hd**-0.5
            wq, bq = _np(at.q_experts.weight), _np(at.q_experts.bias) if at.q_experts.bias is not None else None
            wo, bo = _np(at.o_experts.weight), _np(at.o_experts.bias) if at.o_experts.bias is not None else None
            inner = at.expert_heads * hd
            for e in m.expert_ids:
                fq = LinearSpec(wq[e] * sc, (bq[e] if bq is not None else np.zeros(inner)) * sc)
                fo = LinearSpec(wo[e].copy(), bo[e].copy() if bo is not None else np.zeros(dim))
                if g1 is not None:
                    fo.w *= g1[None, :]
                    fo.b *= g1
                m.experts.append((fq, fo))
            m.hidden = inner
            spec.attn_moe, spec.kv, spec.expert_heads = m, _linear(at.kv), at.expert_heads
        else:
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
            if g1 is not None:
                proj.w *= g1[None, :]
                proj.b *= g1
            spec.qkv, spec.proj = qkv, proj
        mlp = blk.mlp
        if isinstance(mlp, MoEMlp):
            ex = mlp.experts
            act = ex.act
            m = _moe_spec(mlp, "mlp", tasks, all_experts, dim, f"blocks.{i}.mlp")
            w1, b1 = _np(ex.fc1.weight), _np(ex.fc1.bias) if ex.fc1.bias is not None else None
            w2, b2 = _np(ex.fc2.weight), _np(ex.fc2.bias) if ex.fc2.bias is not None else None
            for e in m.expert_ids:
                f1 = LinearSpec(w1[e].copy(), b1[e].copy() if b1 is not None else np.zeros(ex.hidden))
                f2 = LinearSpec(w2[e].copy(), b2[e].copy() if b2 is not None else np.zeros(dim))
                if g2 is not None:
                    f2.w *= g2[None, :]
                    f2.b *= g2
                m.experts.append((f1, f2))
            m.hidden = ex.hidden
            spec.mlp_moe = m
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
        gelu_approx=gelu_approx or "none",
        ln_eps=float(eps.pop() if eps else 1e-6),
        patch_embed=patch_embed,
        stem=stem,
        stem_norm=stem_norm,
        cls_pos=cls_pos,
        pos=pos[1:],
        blocks=blocks,
        norm=_ln(model.norm, "norm"),
        head=head,
        mean=mean,
        std=std,
        tile=tile,
    )
