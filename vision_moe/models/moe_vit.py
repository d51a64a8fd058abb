"""Task-conditioned MoE Vision Transformer (M³ViT, Mod-Squad) and its dense multi-task twin, on timm.

Everything that is not MoE keeps timm's ViT parameter names (patch_embed, cls_token, pos_embed,
blocks.N.{norm1,attn.qkv,attn.proj,ls1,norm2,mlp.fc1,mlp.fc2,ls2}, norm, fc_norm, head), so a timm ViT
checkpoint loads into it and, through :func:`checkpoint_filter_fn`, upcycles into its MoE blocks.

The task is an explicit forward argument. Routing records (:class:`~vision_moe.moe.MoEAux`) come
back from ``forward*(..., return_aux=True)``; nothing is kept on the modules.
"""

from __future__ import annotations

import copy
import logging
import math
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from safetensors import safe_open
from timm.layers import (
    Attention,
    DropPath,
    HybridEmbed,
    LayerScale,
    Mlp,
    PatchEmbed,
    resample_abs_pos_embed,
    trunc_normal_,
)
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import init_weights_vit_timm
from timm.models.vision_transformer_hybrid import ConvStem

from ..moe import MoEAttention, MoEAux, MoELayer, MoEMlp
from ..moe.dispatch import Dispatcher
from ..moe.upcycle import upcycle_attention, upcycle_mlp

__all__ = [
    "MoEVisionTransformer",
    "TaskBlock",
    "token_stride",
    "checkpoint_filter_fn",
    "resolve_block_indices",
    "DEFAULT_TASKS",
    "ZOO",
    "ZooTag",
    "unknown_tag_error",
]

_logger = logging.getLogger(__name__)

# PASCAL-Context's five tasks, as in M³ViT; any task names can be given at creation.
DEFAULT_TASKS = ("semseg", "human_parts", "saliency", "normals", "edges")


def resolve_block_indices(spec: str | Sequence[int] | None, depth: int) -> tuple[int, ...]:
    """Which blocks are MoE: ``'every2'`` (1, 3, 5, ... as in M³ViT), ``'everyN'``, ``'lastN'``, ``'all'``,
    ``'none'`` or explicit indices."""
    if spec is None or spec == "none":
        return ()
    if isinstance(spec, str):
        if spec == "all":
            return tuple(range(depth))
        if spec.startswith("every") and spec[5:].isdigit() and int(spec[5:]) > 0:
            n = int(spec[5:])
            return tuple(i for i in range(depth) if i % n == n - 1)
        if spec.startswith("last") and spec[4:].isdigit():
            n = int(spec[4:])
            return tuple(range(max(0, depth - n), depth))
        raise ValueError(f"unknown block spec {spec!r}; expected 'everyN', 'lastN', 'all', 'none' or a list of indices")
    idx = tuple(int(i) for i in spec)
    bad = [i for i in idx if not 0 <= i < depth]
    if bad:
        raise ValueError(f"block indices {bad} out of range for depth {depth}")
    return tuple(sorted(set(idx)))


def _conv_stem_embed(
    img_size: int | tuple[int, int],
    patch_size: int,
    in_chans: int,
    embed_dim: int,
    channels: Sequence[int],
    strides: Sequence[int] | None,
) -> HybridEmbed:
    """A convolutional stem ("early convolutions", Xiao et al. 2021) in place of the patchify layer: timm's
    ConvStem (3x3 conv + BN + ReLU per stage, the last conv projects to ``embed_dim``) inside timm's HybridEmbed.
    ``channels`` are the stages before the projection; ``strides`` one per stage plus the projection (default:
    2 for the last log2(patch_size) convs, 1 before), their product must equal ``patch_size``, so the token grid
    and every ``patch_size``-based contract stay as with the patch embedding."""
    channels = tuple(int(c) for c in channels) + (embed_dim,)
    if strides is None:
        n2 = int(patch_size).bit_length() - 1
        if 2**n2 != patch_size or n2 > len(channels):
            raise ValueError(
                f"stem_strides: cannot default for patch_size={patch_size} with {len(channels)} convs; give them"
            )
        strides = (1,) * (len(channels) - n2) + (2,) * n2
    strides = tuple(int(v) for v in strides)
    if len(strides) != len(channels):
        raise ValueError(
            f"stem_strides={list(strides)}: expected {len(channels)} values (one per stem_channels entry, one for the "
            "projection)"
        )
    if math.prod(strides) != patch_size:
        raise ValueError(f"stem_strides={list(strides)}: their product must equal patch_size={patch_size}")
    stem = ConvStem(in_chans, depth=len(channels), channels=channels, stride=strides)
    return HybridEmbed(
        stem,
        img_size=img_size,
        in_chans=in_chans,
        embed_dim=embed_dim,
        proj=False,
        output_fmt="NHWC",
        strict_img_size=False,
    )


def _draws_noise(module: nn.Module) -> bool:
    """Whether ``module`` (in training mode) contains a dropout or drop-path layer with a non-zero rate."""
    for m in module.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            return True
        if isinstance(m, DropPath) and m.drop_prob > 0:
            return True
    return False


def token_stride(patch_embed: nn.Module) -> tuple[int, int]:
    """Pixels per token along (H, W) for timm's PatchEmbed and HybridEmbed alike."""
    return tuple(int(v) for v in patch_embed.feat_ratio(as_scalar=False))


class TaskBlock(nn.Module):
    """timm's pre-norm ViT block whose attention and/or MLP may be task-routed MoE layers.

    ``moe_mlp``: the MoE MLP's arguments; its ``layer`` entry picks the layer class (default :class:`MoEMlp`; any
    :class:`~vision_moe.moe.MoELayer` taking ``(dim, hidden, ..., act_layer=, drop=)``, e.g. ``MoEFiLM``).
    ``attn_head_dim``: width of each attention head when it is not ``dim // num_heads`` (timm's Attention).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        init_values: float | None = None,
        drop_path: float = 0.0,
        act_layer: type[nn.Module] = nn.GELU,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        moe_mlp: dict | None = None,
        moe_attn: dict | None = None,
        attn_head_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        if moe_attn is not None:
            self.attn = MoEAttention(
                dim,
                num_heads,
                qkv_bias=qkv_bias,
                head_dim=attn_head_dim,
                attn_drop=attn_drop,
                proj_drop=proj_drop,
                **moe_attn,
            )
        else:
            self.attn = Attention(
                dim,
                num_heads=num_heads,
                attn_head_dim=attn_head_dim,
                qkv_bias=qkv_bias,
                qk_norm=qk_norm,
                attn_drop=attn_drop,
                proj_drop=proj_drop,
                norm_layer=norm_layer,
            )
        self.ls1 = LayerScale(dim, init_values=init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        hidden = int(dim * mlp_ratio)
        if moe_mlp is not None:
            moe_mlp = dict(moe_mlp)
            layer = moe_mlp.pop("layer", MoEMlp)
            self.mlp = layer(dim, moe_mlp.pop("hidden", None) or hidden, act_layer=act_layer, drop=proj_drop, **moe_mlp)
        else:
            self.mlp = Mlp(in_features=dim, hidden_features=hidden, act_layer=act_layer, drop=proj_drop)
        self.ls2 = LayerScale(dim, init_values=init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    @property
    def is_moe(self) -> bool:
        return isinstance(self.mlp, MoELayer) or isinstance(self.attn, MoEAttention)

    def attention_is_task_independent(self) -> bool:
        """Whether the attention half (``norm1 -> attn -> ls1 -> drop_path1`` and its residual) gives the same
        output for every task: a dense attention that, in training, draws no random mask."""
        if isinstance(self.attn, MoEAttention):
            return False
        return not (self.training and any(_draws_noise(m) for m in (self.attn, self.ls1, self.drop_path1)))

    def forward_attention(self, x: torch.Tensor, task: str | None) -> tuple[torch.Tensor, list[MoEAux]]:
        """The block's first half: ``x + drop_path1(ls1(attn(norm1(x))))``."""
        h = self.norm1(x)
        if isinstance(self.attn, MoEAttention):
            h, a = self.attn(h, task)
            return x + self.drop_path1(self.ls1(h)), [a]
        return x + self.drop_path1(self.ls1(self.attn(h))), []

    def forward_mlp(self, x: torch.Tensor, task: str | None) -> tuple[torch.Tensor, list[MoEAux]]:
        """The block's second half: ``x + drop_path2(ls2(mlp(norm2(x))))``."""
        h = self.norm2(x)
        if isinstance(self.mlp, MoELayer):
            h, a = self.mlp(h, task)
            return x + self.drop_path2(self.ls2(h)), [a]
        return x + self.drop_path2(self.ls2(self.mlp(h))), []

    def forward(self, x: torch.Tensor, task: str | None) -> tuple[torch.Tensor, list[MoEAux]]:
        x, aux = self.forward_attention(x, task)
        x, aux_mlp = self.forward_mlp(x, task)
        return x, aux + aux_mlp

    def specialize(self, task: str) -> TaskBlock:
        new = copy.copy(self)
        new._modules = dict(self._modules)
        if isinstance(self.attn, MoEAttention):
            new.attn = self.attn.specialize(task)
        if isinstance(self.mlp, MoELayer):
            new.mlp = self.mlp.specialize(task)
        return new


class MoEVisionTransformer(nn.Module):
    """ViT with task-conditioned sparse MoE blocks. One class for M³ViT, Mod-Squad and the dense twins.

    Args (beyond timm's VisionTransformer ones):
        tasks: task names; routers and task embeddings are made per task.
        moe_blocks: blocks whose MLP is MoE (see :func:`resolve_block_indices`); M³ViT: ``'every2'``.
        moe_attn_blocks: blocks whose attention is MoE (Mod-Squad); default none.
        num_experts, top_k, expert_hidden: MLP experts (expert_hidden defaults to mlp_ratio * dim).
        attn_num_experts, attn_top_k, expert_heads: attention experts (Mod-Squad).
        router: ``'multi_gate'`` (one gate per task) or ``'task_embed'`` (shared gate fed a task embedding).
        router_kwargs: passed to the gates: ``noise_std``, ``renormalize``, ``task_dim`` (task_embed only).
        dispatcher: ``'sort'`` (default, dropless), ``'dense'``, ``'einsum'``, ``'naive'``.
        capacity_factor: per-expert capacity as a factor of the even share; ``None`` = dropless.
        task_embed_blocks: add a learned per-task embedding to the tokens before each block (Mod-Squad).
        attn_head_dim: channels per attention head (default ``embed_dim // num_heads``; Mod-Squad's released models
            use wider heads, so heads x head_dim may differ from embed_dim).
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        init_values: float | None = None,
        class_token: bool = True,
        fc_norm: bool | None = None,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        tasks: Sequence[str] = DEFAULT_TASKS,
        moe_blocks: str | Sequence[int] | None = "every2",
        moe_attn_blocks: str | Sequence[int] | None = None,
        num_experts: int = 16,
        top_k: int = 4,
        expert_hidden: int | None = None,
        attn_num_experts: int | None = None,
        attn_top_k: int | None = None,
        expert_heads: int | None = None,
        router: str = "multi_gate",
        router_kwargs: dict | None = None,
        dispatcher: str = "sort",
        capacity_factor: float | None = None,
        task_embed_blocks: bool = False,
        weight_init: str = "",
        stem_channels: Sequence[int] | None = None,
        stem_strides: Sequence[int] | None = None,
        attn_head_dim: int | None = None,
    ) -> None:
        super().__init__()
        if global_pool not in ("", "avg", "token"):
            raise ValueError(f"global_pool must be '', 'avg' or 'token', got {global_pool!r}")
        if not tasks:
            raise ValueError("tasks must name at least one task")
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"duplicate task names in {list(tasks)}")
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.tasks = tuple(tasks)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1 if class_token else 0
        self.has_class_token = class_token
        self.grad_checkpointing = False
        # NHWC output and no strict size: any input whose sides are multiples of the patch size runs, with the
        # position embedding resampled (timm's resample_abs_pos_embed).
        if stem_channels is None:
            if stem_strides is not None:
                raise ValueError("stem_strides given without stem_channels")
            self.patch_embed = PatchEmbed(
                img_size=img_size,
                patch_size=patch_size,
                in_chans=in_chans,
                embed_dim=embed_dim,
                strict_img_size=False,
                output_fmt="NHWC",
            )
        else:
            self.patch_embed = _conv_stem_embed(img_size, patch_size, in_chans, embed_dim, stem_channels, stem_strides)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.pos_embed = nn.Parameter(torch.randn(1, num_patches + self.num_prefix_tokens, embed_dim) * 0.02)
        self.pos_drop = nn.Dropout(p=pos_drop_rate)
        self.moe_block_idx = resolve_block_indices(moe_blocks, depth)
        self.moe_attn_block_idx = resolve_block_indices(moe_attn_blocks, depth)
        routing = dict(
            tasks=self.tasks,
            router=router,
            router_kwargs=dict(router_kwargs or {}),
            dispatcher=dispatcher,
            capacity_factor=capacity_factor,
        )
        self.task_embed = nn.Parameter(torch.zeros(depth, len(self.tasks), embed_dim)) if task_embed_blocks else None
        dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()  # stochastic depth decay rule
        blocks = []
        for i in range(depth):
            moe_mlp = (
                dict(routing, num_experts=num_experts, top_k=top_k, hidden=expert_hidden)
                if i in self.moe_block_idx
                else None
            )
            moe_attn = (
                dict(
                    routing,
                    num_experts=attn_num_experts or num_experts,
                    top_k=attn_top_k or top_k,
                    expert_heads=expert_heads,
                )
                if i in self.moe_attn_block_idx
                else None
            )
            blocks.append(
                TaskBlock(
                    embed_dim,
                    num_heads,
                    mlp_ratio,
                    qkv_bias,
                    qk_norm,
                    proj_drop_rate,
                    attn_drop_rate,
                    init_values,
                    dpr[i],
                    norm_layer=norm_layer,
                    moe_mlp=moe_mlp,
                    moe_attn=moe_attn,
                    attn_head_dim=attn_head_dim,
                )
            )
        self.blocks = nn.ModuleList(blocks)
        use_fc_norm = global_pool == "avg" if fc_norm is None else fc_norm
        self.norm = norm_layer(embed_dim) if not use_fc_norm else nn.Identity()
        self.fc_norm = norm_layer(embed_dim) if use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = [dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=patch_size) for i in range(depth)]
        if weight_init != "skip":
            self.init_weights()

    # ------------------------------------------------------------------ timm model API
    def init_weights(self) -> None:
        trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        if self.task_embed is not None:
            trunc_normal_(self.task_embed, std=0.02)
        # timm's per-Linear init (trunc normal .02, zero bias); stacked experts and gates init themselves.
        for name, m in self.named_modules():
            if m is not self:
                init_weights_vit_timm(m, name)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token", "task_embed"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(
            stem=r"^cls_token|pos_embed|patch_embed|task_embed",
            blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ("", "avg", "token"):
                raise ValueError(f"global_pool must be '', 'avg' or 'token', got {global_pool!r}")
            self.global_pool = global_pool
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    # ------------------------------------------------------------------ task handling
    def resolve_task(self, task: str | None) -> str:
        """The task to run: ``task`` if known, the only task when ``None`` and there is one, else ValueError."""
        if task is None:
            if len(self.tasks) == 1:
                return self.tasks[0]
            raise ValueError(f"this model has several tasks {list(self.tasks)}: pass task=...")
        if task not in self.tasks:
            raise ValueError(f"unknown task {task!r}; this model knows {list(self.tasks)}")
        return task

    def set_dispatcher(self, dispatcher: str | Dispatcher) -> MoEVisionTransformer:
        """Switch every MoE layer to another dispatcher (e.g. ``'dense'`` for export). Returns self."""
        for m in self.modules():
            if isinstance(m, (MoEMlp, MoEAttention)):
                m.set_dispatcher(dispatcher)
        return self

    def set_capacity(self, capacity: int | None = None, capacity_factor: float | None = None) -> MoEVisionTransformer:
        """Per-image expert capacity of every MoE layer (V-MoE's inference capacity: a number of assignments, or a
        factor of the even share ``tokens * top_k / experts``); both None = dropless. Returns self. A capacity for
        a model without MoE layers raises (it would change nothing)."""
        if not self.moe_layers() and (capacity is not None or capacity_factor is not None):
            given = f"capacity={capacity}" if capacity is not None else f"capacity_factor={capacity_factor}"
            raise ValueError(f"{given}: this model has no MoE layers, so there is no expert capacity to set")
        for _, m in self.moe_layers():
            m.set_capacity(capacity, capacity_factor)
        return self

    def moe_layers(self) -> list[tuple[str, nn.Module]]:
        return [(n, m) for n, m in self.named_modules() if isinstance(m, (MoEMlp, MoEAttention))]

    # ------------------------------------------------------------------ forward
    # True: the position embedding is resampled to every grid, also the model's own, by bilinear interpolation,
    # so that an ONNX graph traced at one size keeps the resampling for any other (timm's resample_abs_pos_embed
    # returns early at the model's grid, which a trace would bake in; its antialiased bicubic has no ONNX export,
    # and TensorRT's Resize takes nearest or linear). At the model's grid this is the identity; other grids differ
    # from timm's bicubic.
    traceable_pos_embed = False

    def _resample_pos_embed_traceable(self, h: int, w: int) -> torch.Tensor:
        n = self.num_prefix_tokens
        gh, gw = self.patch_embed.grid_size
        grid = self.pos_embed[:, n:].reshape(1, gh, gw, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)
        return torch.cat([self.pos_embed[:, :n], grid.flatten(2).transpose(1, 2)], dim=1)

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:  # (B, gh, gw, C) -> (B, prefix + gh*gw, C)
        b, h, w, c = x.shape
        x = x.reshape(b, h * w, c)
        pos_embed = self.pos_embed
        if self.traceable_pos_embed:
            pos_embed = self._resample_pos_embed_traceable(h, w)
        elif (h, w) != tuple(self.patch_embed.grid_size):
            pos_embed = resample_abs_pos_embed(
                pos_embed, (h, w), old_size=tuple(self.patch_embed.grid_size), num_prefix_tokens=self.num_prefix_tokens
            )
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)
        return self.pos_drop(x + pos_embed)

    def _run_block(self, i: int, x: torch.Tensor, task: str | None) -> tuple[torch.Tensor, list[MoEAux]]:
        if self.task_embed is not None:
            x = x + self.task_embed[i, self.tasks.index(task)].to(x.dtype)
        if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
            return torch.utils.checkpoint.checkpoint(self.blocks[i], x, task, use_reentrant=False)
        return self.blocks[i](x, task)

    def num_shared_stages(self) -> int:
        """How much of ``forward_features`` is the same for every task, counted in stages: 1 = the patch
        embedding, 2 = also the position embedding, 2 + k = also blocks 0..k-1.

        A stage is shared while nothing in it depends on the task (no MoE layer, no Mod-Squad task embedding)
        and, in training, while it draws no random mask (dropout, drop path): separate per-task forwards would
        draw a different mask for each task, so those stages stay per task. A BatchNorm in a convolutional stem
        sees the same batch either way (only its running statistics are updated once instead of once per task).
        """
        n = 1
        if self.training and _draws_noise(self.pos_drop):
            return n
        n += 1
        if self.task_embed is not None:
            return n
        for blk in self.blocks:
            if blk.is_moe or (self.training and _draws_noise(blk)):
                break
            n += 1
        return n

    def _shares_attention_of(self, n: int) -> bool:
        """After ``n`` shared stages, whether the next block's attention half is task-independent too (a block
        whose only task-routed layer is its MLP, as in M³ViT): it then runs once for all tasks as well."""
        i = n - 2
        if i < 0 or i >= len(self.blocks) or self.task_embed is not None:
            return False
        if self.grad_checkpointing and self.training:  # the block is checkpointed as a whole
            return False
        return self.blocks[i].attention_is_task_independent()

    def forward_shared(self, x: torch.Tensor) -> tuple[torch.Tensor, int, bool]:
        """Run the task-independent stages once (see :meth:`num_shared_stages`) for several tasks on the same
        images: returns ``(x, stages, attention)`` to pass as ``forward_features(images, task, shared=...)``;
        ``attention`` says that the attention half of the first task-dependent block ran too (its MLP is the
        first task-routed layer). The results equal separate forwards; in training the gradients of all tasks
        meet in one backward through the shared part."""
        n = self.num_shared_stages()
        x = self.patch_embed(x)
        if n >= 2:
            x = self._pos_embed(x)
        for i in range(n - 2):  # task-independent blocks: no task embedding, no routing
            x, _ = self._run_block(i, x, None)
        attention = self._shares_attention_of(n)
        if attention:
            x, _ = self.blocks[n - 2].forward_attention(x, None)
        return x, n, attention

    def forward_features(
        self,
        x: torch.Tensor,
        task: str | None = None,
        *,
        return_aux: bool = False,
        shared: tuple[torch.Tensor, int, bool] | None = None,
    ):
        """(B, 3, H, W) -> normalised tokens (B, prefix + N, C); with ``return_aux`` also the MoE records.
        ``shared``: the output of :meth:`forward_shared` on these images (``x`` is then not used)."""
        task = self.resolve_task(task)
        start, attention = 0, False
        if shared is not None:
            x, start, *rest = shared
            attention = bool(rest and rest[0])
        if start < 1:
            x = self.patch_embed(x)
        if start < 2:
            x = self._pos_embed(x)
        aux: list[MoEAux] = []
        first = max(0, start - 2)
        if attention:  # the shared part ended inside this block: only its MLP half is per task
            x, aux = self.blocks[first].forward_mlp(x, task)
            first += 1
        for i in range(first, len(self.blocks)):
            x, a = self._run_block(i, x, task)
            aux.extend(a)
        x = self.norm(x)
        return (x, aux) if return_aux else x

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        if self.global_pool == "avg":
            return x[:, self.num_prefix_tokens :].mean(dim=1)
        if self.global_pool == "token":
            return x[:, 0]
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.fc_norm(self.pool(x)))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor, task: str | None = None, *, return_aux: bool = False):
        x, aux = self.forward_features(x, task, return_aux=True)
        out = self.forward_head(x)
        return (out, aux) if return_aux else out

    def forward_intermediates(
        self,
        x: torch.Tensor,
        task: str | None = None,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        return_aux: bool = False,
        return_prefix_tokens: bool = False,
    ):
        """Outputs of the chosen blocks as (B, C, H/p, W/p) maps (or NLC), timm's convention.

        ``indices``: an int n takes the last n blocks; a sequence takes those block indices (negative allowed).
        Returns ``intermediates`` if ``intermediates_only`` else ``(final_tokens, intermediates)``; with
        ``return_aux`` the MoE records are appended to the returned tuple. ``return_prefix_tokens`` (as timm's
        ViT): each intermediate is ``(spatial, prefix tokens (B, prefix, C))``.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        task = self.resolve_task(task)
        depth = len(self.blocks)
        if indices is None:
            take = [depth - 1]
        elif isinstance(indices, int):
            take = list(range(depth - indices, depth))
        else:
            take = [i if i >= 0 else depth + i for i in indices]
        if any(not 0 <= i < depth for i in take):
            raise ValueError(f"block indices {indices} out of range for depth {depth}")
        x = self.patch_embed(x)  # (B, gh, gw, C)
        b, gh, gw, _ = x.shape
        x = self._pos_embed(x)
        aux: list[MoEAux] = []
        feats = []
        last = max(take) if intermediates_only else depth - 1
        for i in range(last + 1):
            x, a = self._run_block(i, x, task)
            aux.extend(a)
            if i in take:
                y = self.norm(x) if norm else x
                prefix, y = y[:, : self.num_prefix_tokens], y[:, self.num_prefix_tokens :]
                if output_fmt == "NCHW":
                    y = y.reshape(b, gh, gw, -1).permute(0, 3, 1, 2).contiguous()
                feats.append((y, prefix) if return_prefix_tokens else y)
        if intermediates_only:
            return (feats, aux) if return_aux else feats
        x = self.norm(x)
        return (x, feats, aux) if return_aux else (x, feats)

    # ------------------------------------------------------------------ specialisation
    def specialize(self, task: str) -> MoEVisionTransformer:
        """A single-task model: ``task``'s routers only, only the experts they can reach, no other task's
        parameters. ``specialized(x)`` equals ``self(x, task=task)``; parameters are copied, not shared."""
        task = self.resolve_task(task)
        new = copy.copy(self)
        new._modules = dict(self._modules)
        new._parameters = dict(self._parameters)
        new.blocks = nn.ModuleList([blk.specialize(task) for blk in self.blocks])
        if self.task_embed is not None:
            t = self.tasks.index(task)
            new.task_embed = nn.Parameter(self.task_embed.detach()[:, t : t + 1].clone())
        new.tasks = (task,)
        return copy.deepcopy(new).train(self.training)

    @torch.no_grad()
    def expert_usage(self, images: torch.Tensor, task: str) -> list[torch.Tensor]:
        """Assignments per expert (E,) in each MoE layer when ``task`` runs on ``images`` (eval mode)."""
        was_training = self.training
        self.eval()
        try:
            _, aux = self.forward_features(images, task, return_aux=True)
        finally:
            self.train(was_training)
        return [a.expert_load for a in aux]

    @torch.no_grad()
    def restrict_experts(self, task: str, masks: Sequence[torch.Tensor]) -> MoEVisionTransformer:
        """Make only ``masks[l]`` (bool, E) reachable for ``task`` in MoE layer l (forward order).

        Mod-Squad's pruning: measure :meth:`expert_usage` on held-out images, keep the experts a task uses,
        restrict, then :meth:`specialize` cuts the rest out. The restricted model's output for ``task`` may
        change (the pruned experts no longer receive tokens); the specialised model equals the restricted one.
        """
        task = self.resolve_task(task)
        layers = [m for _, m in self.moe_layers()]
        if len(masks) != len(layers):
            raise ValueError(f"got {len(masks)} expert masks for {len(layers)} MoE layers")
        for layer, mask in zip(layers, masks):
            layer.router.set_expert_mask(task, mask)
        return self

    @torch.no_grad()
    def prune_experts(self, task: str, images: torch.Tensor, keep: int | None = None) -> list[torch.Tensor]:
        """Mod-Squad pruning in one call: route ``images`` for ``task`` and keep, in each MoE layer, the experts
        it used (``keep=None``; topped up to top_k by usage) or its ``keep`` most used ones. Returns the masks.

        Changes the model's output for ``task`` where pruned experts were chosen; measure the task metric after.
        """
        masks = []
        for (_, layer), used in zip(self.moe_layers(), self.expert_usage(images, task)):
            n = max(layer.top_k, int((used > 0).sum()) if keep is None else keep)
            order = torch.sort(used, descending=True, stable=True).indices  # ties: lower expert index first
            masks.append(torch.zeros_like(used, dtype=torch.bool).scatter_(0, order[:n], True))
        self.restrict_experts(task, masks)
        return masks

    def routing_summary(self, aux: list[MoEAux]) -> torch.Tensor:
        """(num MoE layers, E) fraction of assignments per expert, from a forward's aux records."""
        return torch.stack([a.expert_load.float() / a.expert_load.sum().clamp_min(1) for a in aux])


# ---------------------------------------------------------------------- checkpoints
def _unwrap(state_dict: dict) -> dict:
    for key in ("model", "state_dict", "model_state"):
        if key in state_dict and isinstance(state_dict[key], dict):
            return state_dict[key]
    return state_dict


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: MoEVisionTransformer) -> dict[str, torch.Tensor]:
    """Map a timm ViT (or vision-moe) state dict onto ``model``: the one place keys are remapped.

    - dense ``blocks.N.mlp.fc{1,2}`` into a MoE block: sparse upcycling (:func:`vision_moe.moe.upcycle_mlp`):
      the dense hidden units split into ``dense hidden / expert_hidden`` groups, one group per expert, with the
      router and combine scale initialised so the MoE block computes the dense one exactly;
    - dense ``blocks.N.attn.qkv/proj`` into a MoE attention block: every expert a copy
      (:func:`vision_moe.moe.upcycle_attention`; needs ``expert_heads == num_heads``);
    - routers absent from the checkpoint keep the model's initialisation unless upcycling sets them; a Mod-Squad
      task embedding absent from the checkpoint starts at zero (so it adds nothing at initialisation);
    - ``heads.*`` (the task heads of a Hub-format vision-moe model) are left to the multi-task model;
    - ``pos_embed`` is resampled to the model's grid.

    Where the upcycled model cannot equal the dense one, a ValueError names the layer and the argument to change.
    """
    sd = {k: v for k, v in _unwrap(state_dict).items() if not k.startswith("heads.")}
    target = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for i, blk in enumerate(model.blocks):
        for part, layer, dense, fn in (
            ("mlp", blk.mlp, ("mlp.fc1", "mlp.fc2"), upcycle_mlp),
            ("attn", blk.attn, ("attn.qkv", "attn.proj"), upcycle_attention),
        ):
            p = f"blocks.{i}."
            if not isinstance(layer, (MoEMlp, MoEAttention)) or p + dense[0] + ".weight" not in sd:
                continue
            w = [sd.pop(f"{p}{n}.{t}", None) for n in dense for t in ("weight", "bias")]
            try:
                new = fn(layer, *w)
            except ValueError as e:
                raise ValueError(f"{p}{part}: {e}") from None
            out.update({f"{p}{part}.{k}": v for k, v in new.items()})
    for k, v in sd.items():
        if k == "pos_embed" and v.shape != model.pos_embed.shape:
            v = resample_abs_pos_embed(v, tuple(model.patch_embed.grid_size), num_prefix_tokens=model.num_prefix_tokens)
        out[k] = v
    if model.task_embed is not None and "task_embed" not in out:
        out["task_embed"] = torch.zeros_like(model.task_embed)
    for k, v in target.items():
        if k not in out and (".router." in k or k.endswith("expert_mask")):
            out[k] = v  # not in a dense checkpoint: keep the model's own initialisation
    return out


def _check_pretrained_file(path: str | Path, cached: bool = False) -> None:
    """Fail early, in one line naming ``path``, where timm's loader would fail without naming it. ``cached``: the
    file came from the Hugging Face cache (a broken one there is deleted to be downloaded again)."""
    p = Path(path)
    if not p.is_file():
        exc = IsADirectoryError if p.is_dir() else FileNotFoundError
        what = "is a directory" if p.is_dir() else "does not exist"
        raise exc(f"{p}: pretrained weights file {what}; expected a .safetensors or torch state-dict file")
    try:
        if p.name.endswith(".safetensors"):  # as timm decides; reads the header, which covers the whole file
            with safe_open(str(p), framework="pt") as f:
                f.keys()
        else:  # zip checkpoints are memory-mapped: only their index is read here
            torch.load(p, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(p))
    except Exception as e:  # safetensors / pickle errors come in many types, torch's over several lines
        msg = " ".join(str(e).split())
        if "WeightsUnpickler error:" in msg:  # skip torch's advice to load untrusted pickles
            msg = "WeightsUnpickler error:" + msg.split("WeightsUnpickler error:")[1].split(" Check the doc")[0]
        reason = msg.split(". ")[0] or type(e).__name__
        kind = "safetensors" if p.name.endswith(".safetensors") else "torch"
        hint = f"; delete {p.resolve()} (its blob in the Hugging Face cache) to download it again" if cached else ""
        raise ValueError(
            f"{p}: cannot read pretrained weights ({reason}); expected a complete {kind} file{hint}"
        ) from None


def _check_shapes(source: str | Path, state_dict: dict, model: MoEVisionTransformer, skip: tuple[str, ...]) -> None:
    """Name the first key whose shape differs from the model's (timm would list every one of them)."""
    for k, want in model.state_dict().items():
        v = state_dict.get(k)
        if k in skip or k.startswith("head.") or not isinstance(v, torch.Tensor) or v.shape == want.shape:
            continue  # the classifier: timm drops it when num_classes differs
        if k == "patch_embed.proj.weight" and v.shape[:1] + v.shape[2:] == want.shape[:1] + want.shape[2:]:
            continue  # input channels: timm adapts them
        raise ValueError(
            f"{source}: {k} has shape {tuple(v.shape)} in the checkpoint, {tuple(want.shape)} in the model: the "
            "checkpoint is for a different model size; expected one with this model's embed_dim, patch_size, MLP width"
        )


def _filter_pretrained(source: str | Path, state_dict: dict, model: MoEVisionTransformer) -> dict:
    """:func:`checkpoint_filter_fn` with errors that name ``source`` and the first mismatching key."""
    sd = _unwrap(state_dict)
    if not any(k in sd for k in ("patch_embed.proj.weight", "patch_embed.backbone.0.conv.weight", "pos_embed")):
        # timm loads with strict=False: a file of some other model would load nothing and keep the random init
        if any(str(k).startswith("backbone.") for k in sd):
            raise ValueError(
                f"{source}: a vision-moe training checkpoint (a multi-task model: keys 'backbone.*' and "
                "'heads.*'); expected a backbone state dict; load training checkpoints with "
                "vision_moe.engine.load_model(<checkpoint folder>)"
            )
        first = next(iter(sd), None)
        raise ValueError(
            f"{source}: holds none of this model's weights (first key: {first!r}); expected a timm ViT or "
            "vision-moe backbone state dict (keys 'patch_embed.*', 'pos_embed', 'blocks.*')"
        )
    _check_shapes(source, sd, model, skip=("pos_embed",))  # before upcycling: its errors mislead
    try:
        out = checkpoint_filter_fn(state_dict, model)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    _check_shapes(source, out, model, skip=())
    return out


def _cfg(**kwargs) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.9,
        "interpolation": "bicubic",
        "fixed_input_size": False,
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "apache-2.0",
        **kwargs,
    }


# ---------------------------------------------------------------------- the zoo: weight tags
@dataclass(frozen=True)
class ZooTag:
    """A weight tag ``arch.tag``: the dense timm weights it upcycles on load, and the architecture they need."""

    source: str  # timm weight tag of the dense ViT (its pretrained_cfg says where the file lives)
    model_args: dict  # constructor arguments the exact upcycling needs; the caller's own arguments win
    exact: bool = True  # the model computes the dense one exactly at initialisation (tested per family and size)


# per size: the head count of timm's dense ViT and its weights (tag here -> timm weight tag). timm's ViT-S has 6
# heads; M³ViT's reference ViT-S, and so this project's default, 12: the same weights computed with 12 heads are
# another function, so a tag fixes the source's head count.
_SOURCES = {
    "tiny": (3, {"augreg_in21k_ft_in1k": "vit_tiny_patch16_224.augreg_in21k_ft_in1k",
                 "augreg_in21k": "vit_tiny_patch16_224.augreg_in21k",
                 "deit_in1k": "deit_tiny_patch16_224.fb_in1k"}),
    "small": (6, {"augreg_in21k_ft_in1k": "vit_small_patch16_224.augreg_in21k_ft_in1k",
                  "augreg_in21k": "vit_small_patch16_224.augreg_in21k",
                  "augreg_in1k": "vit_small_patch16_224.augreg_in1k",
                  "deit_in1k": "deit_small_patch16_224.fb_in1k"}),
    "base": (12, {"augreg_in21k_ft_in1k": "vit_base_patch16_224.augreg_in21k_ft_in1k",
                  "augreg_in21k": "vit_base_patch16_224.augreg_in21k",
                  "augreg_in1k": "vit_base_patch16_224.augreg_in1k",
                  "deit_in1k": "deit_base_patch16_224.fb_in1k"}),
}  # fmt: skip


def _family_args(family: str, heads: int) -> dict:
    """What exact upcycling needs beyond the source's head count (see vision_moe.moe.upcycle): a gate bias, the
    constant input that lets every token pick one expert of each group; for Mod-Squad's attention, experts that own
    every head (their shared keys/values equal the dense ones only then), one per token so the cost stays dense."""
    if family == "m3vit":
        return dict(num_heads=heads, router_kwargs=dict(bias=True))
    if family == "modsquad":
        return dict(num_heads=heads, router_kwargs=dict(bias=True), expert_heads=heads, attn_top_k=1)
    return dict(num_heads=heads)


ZOO: dict[str, ZooTag] = {
    f"{family}_{size}_patch16_224.{tag}": ZooTag(source, _family_args(family, _SOURCES[size][0]))
    for family, sizes in (
        ("m3vit", ("tiny", "small", "base")),
        ("modsquad", ("small", "base")),
        ("vit_mtl", ("tiny", "small", "base")),
    )
    for size in sizes
    for tag, source in _SOURCES[size][1].items()
}


def _tag_cfg(tag: str) -> dict[str, Any]:
    """The tag's pretrained_cfg: where the dense weights live and how they were trained (from timm's own cfg)."""
    import timm

    src = timm.models.get_pretrained_cfg(ZOO[tag].source, allow_unregistered=False)
    if src is None or not src.hf_hub_id:
        raise RuntimeError(f"timm {timm.__version__} has no weights {ZOO[tag].source!r} (needed by {tag})")
    same = ("hf_hub_id", "hf_hub_filename", "num_classes", "input_size", "crop_pct", "interpolation", "mean", "std")
    return _cfg(
        **{k: getattr(src, k) for k in (*same, "license")},
        origin_url=f"https://huggingface.co/{src.hf_hub_id}",
        notes=(f"dense {ZOO[tag].source}, upcycled on load (exact at initialisation)",),
    )


def unknown_tag_error(name: str) -> ValueError:
    """One line for a weight tag that does not exist, naming the close ones (difflib)."""
    import difflib

    near = difflib.get_close_matches(name, list(ZOO), n=5, cutoff=0.6)
    near = near or sorted(t for t in ZOO if t.split(".")[0] == name.split(".")[0])[:5]
    return ValueError(f"unknown weight tag {name!r}; close matches: {near}; all tags: python tools/download.py --list")


def _merge_args(kwargs: dict, args: dict) -> None:
    """``args`` as defaults under ``kwargs``: the caller's values win, ``router_kwargs`` merged key by key."""
    for k, v in args.items():
        if isinstance(v, dict) and isinstance(kwargs.get(k), dict):
            kwargs[k] = {**v, **kwargs[k]}
        else:
            kwargs.setdefault(k, v)


_SOURCE_KEYS = ("file", "state_dict", "url")


def _resolve_weights_file(cfg, cache_dir: str | Path | None) -> Path | None:
    """The local file of a pretrained_cfg's weights: a Hub file through huggingface_hub's cache (offline mode and
    one-line errors naming the repo, file and cache: vision_moe.hub.fetch_weights), or a local-dir folder's weights;
    None where timm's own loader takes over (a URL)."""
    if cfg.source == "local-dir":
        folder = Path(cfg.file)
        found = [folder / n for n in ("model.safetensors", "pytorch_model.bin") if (folder / n).is_file()]
        if not found:
            raise FileNotFoundError(f"{folder}: no model.safetensors; expected a folder written by save_pretrained")
        return found[0]
    if cfg.hf_hub_id:
        from ..hub import WeightsEntry, fetch_weights

        entry = WeightsEntry(hf_hub_id=cfg.hf_hub_id, filename=cfg.hf_hub_filename or "model.safetensors")
        name = f"{cfg.architecture}.{cfg.tag}" if cfg.tag else f"hf-hub:{cfg.hf_hub_id}"
        return fetch_weights(entry, cache_dir=cache_dir, name=name)
    return None


def _create(variant: str, pretrained: bool, model_args: dict, **kwargs) -> MoEVisionTransformer:
    """Build ``variant`` from its entry point's ``model_args``, the weight tag's arguments over them, and the
    caller's ``kwargs`` over both."""
    from timm.models import get_pretrained_cfg, resolve_pretrained_cfg

    pcfg, overlay = kwargs.get("pretrained_cfg"), dict(kwargs.get("pretrained_cfg_overlay") or {})
    own_source = not any(overlay.get(k) for k in _SOURCE_KEYS)
    # A weight tag fixes the architecture its weights need: when it is named (arch.tag), or when pretrained=True
    # loads the default tag's weights. A plain name without weights (or with the caller's own file) keeps the
    # family's defaults.
    tag = None
    if isinstance(pcfg, str):
        tag = f"{variant}.{pcfg}"
        if tag not in ZOO:
            raise unknown_tag_error(tag)
    elif pcfg is None and pretrained and own_source:
        default = get_pretrained_cfg(variant)
        tag = f"{variant}.{default.tag}" if default is not None and default.tag else None
    added = dict(ZOO[tag].model_args) if tag in ZOO else {}
    _merge_args(kwargs, {**model_args, **added})
    file, cfg = (overlay.get("file") if pretrained else None), None
    if pretrained and own_source:
        cfg = resolve_pretrained_cfg(variant, pretrained_cfg=pcfg, pretrained_cfg_overlay=overlay)
        file = _resolve_weights_file(cfg, kwargs.get("cache_dir"))
        if file is not None:  # timm loads it as a file (its loader and adaptation: classifier, input channels)
            kwargs["pretrained_cfg_overlay"] = {**overlay, "file": str(file), "source": ""}
    if file:
        _check_pretrained_file(file, cached=cfg is not None and cfg.source != "local-dir")
    filter_fn = partial(_filter_pretrained, file or f"pretrained weights of {variant}")
    model = build_model_with_cfg(MoEVisionTransformer, variant, pretrained, pretrained_filter_fn=filter_fn, **kwargs)
    if cfg is not None:  # the weights' own source, not the local path they were read from
        model.pretrained_cfg = model.default_cfg = cfg.to_dict()
    if added:  # save_pretrained records the architecture the tag chose (timm's factory adds the caller's arguments)
        model._model_args = dict(added)
    return model


# an architecture's first tag is its default: what pretrained=True loads when no tag is named
default_cfgs = generate_default_cfgs({tag: _tag_cfg(tag) for tag in ZOO})

# M³ViT: MoE MLP in blocks 1, 3, 5, ...; 16 experts, top-4, expert hidden = embed dim (4 active ≈ one dense MLP).
_M3VIT = dict(moe_blocks="every2", num_experts=16, top_k=4)
# Mod-Squad: MoE attention and MoE MLP in alternating blocks, per-task routers, task embedding before each block.
_MODSQUAD = dict(
    moe_blocks="every2",
    moe_attn_blocks="every2",
    num_experts=16,
    top_k=4,
    attn_num_experts=16,
    attn_top_k=4,
    task_embed_blocks=True,
)


@register_model
def m3vit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> MoEVisionTransformer:
    """M³ViT on ViT-Ti/16 (192-d, 3 heads)."""
    model_args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3, expert_hidden=192, **_M3VIT)
    return _create("m3vit_tiny_patch16_224", pretrained, model_args, **kwargs)


@register_model
def m3vit_small_patch16_224(pretrained: bool = False, **kwargs) -> MoEVisionTransformer:
    """M³ViT on ViT-S/16 as in the reference (384-d, 12 heads)."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=12, expert_hidden=384, **_M3VIT)
    return _create("m3vit_small_patch16_224", pretrained, model_args, **kwargs)


@register_model
def m3vit_base_patch16_224(pretrained: bool = False, **kwargs) -> MoEVisionTransformer:
    """M³ViT on ViT-B/16 (768-d, 12 heads)."""
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, expert_hidden=768, **_M3VIT)
    return _create("m3vit_base_patch16_224", pretrained, model_args, **kwargs)


@register_model
def modsquad_small_patch16_224(pretrained: bool = False, **kwargs) -> MoEVisionTransformer:
    """Mod-Squad on ViT-S/16 (384-d, 12 heads); each attention expert owns 3 heads (3 x top-4 = 12)."""
    model_args = dict(
        patch_size=16, embed_dim=384, depth=12, num_heads=12, expert_hidden=384, expert_heads=3, **_MODSQUAD
    )
    return _create("modsquad_small_patch16_224", pretrained, model_args, **kwargs)


@register_model
def modsquad_base_patch16_224(pretrained: bool = False, **kwargs) -> MoEVisionTransformer:
    """Mod-Squad on ViT-B/16 (768-d, 12 heads); each attention expert owns 3 heads (3 x top-4 = 12)."""
    model_args = dict(
        patch_size=16, embed_dim=768, depth=12, num_heads=12, expert_hidden=768, expert_heads=3, **_MODSQUAD
    )
    return _create("modsquad_base_patch16_224", pretrained, model_args, **kwargs)


@register_model
def vit_mtl_tiny_patch16_224(pretrained: bool = False, **kwargs) -> MoEVisionTransformer:
    """Dense multi-task twin of M³ViT-Ti: the same class with no MoE blocks."""
    model_args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3, moe_blocks=None)
    return _create("vit_mtl_tiny_patch16_224", pretrained, model_args, **kwargs)


@register_model
def vit_mtl_small_patch16_224(pretrained: bool = False, **kwargs) -> MoEVisionTransformer:
    """Dense multi-task twin of M³ViT-S (384-d, 12 heads)."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=12, moe_blocks=None)
    return _create("vit_mtl_small_patch16_224", pretrained, model_args, **kwargs)


@register_model
def vit_mtl_base_patch16_224(pretrained: bool = False, **kwargs) -> MoEVisionTransformer:
    """Dense multi-task twin of M³ViT-B."""
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, moe_blocks=None)
    return _create("vit_mtl_base_patch16_224", pretrained, model_args, **kwargs)
