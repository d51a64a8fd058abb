"""MoFME (Mixture of Feature-Modulation Experts) for all-in-one image restoration, and its twins, on timm.

Zhang et al., "Efficient Deweather Mixture-of-Experts with Uncertainty-aware Feature-wise Linear Modulation"
(AAAI 2024). One class, three kinds of MLP in the transformer blocks (``experts=``):

- ``'film'``: MoFME's layer (:class:`~vision_moe.moe.MoEFiLM`): a shared gated block, E feature-modulation
  experts (2 d^2 parameters each), a shared adaptor MLP d -> 4d -> d;
- ``'ffn'``: the conventional MoE twin, E FFN experts d -> 4d -> d (8 d^2 each) at the same E and k;
- ``'none'``: the dense twin, one FFN d -> 4d -> d.

Layout as in the reference (``models/mowe.py``): conv head 3 -> C and two residual blocks at full resolution,
a patch-8 embedding (conv + LayerNorm, timm's PatchEmbed) to ``embed_dim``, ``depth`` pre-norm transformer
blocks (timm's Attention with ``num_heads`` heads of ``attn_head_dim``), a linear map of each token back to
its 8 x 8 pixels of ``tail_channels`` features, a conv tail (residual block, conv to half, residual block,
conv to 3), sigmoid. Two differences, on purpose: any image size runs (the input is padded by reflection to a
multiple of the patch size and the output cropped back; the reference hard-codes a 240 x 240 token grid), and
there is no position embedding (the reference creates a 1 x 900 x 384 one and never adds it). The router sees
the block's normalised tokens (the reference routes on the un-normalised residual stream).

Input: an RGB image normalised to [-1, 1] (mean = std = 0.5). Output: the restored image in [0, 1]. With
``residual=True`` (the tiny sizes; the reference's ``residual_learning`` flag, off in its released recipe) the
tail's output is added to the input image (in [0, 1]) instead of passing through the sigmoid; its last conv
starts at zero, so the untrained model is the identity, and the output is clamped to [0, 1] in eval mode.
``skip=True`` (the tiny sizes; not in the reference) adds the conv head's full-resolution features to the tail's
input, as EDSR's long skip does: the tokens then carry the non-local part of the correction and the pixels'
own detail does not have to pass through them.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import PatchEmbed
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import init_weights_vit_timm

from ..moe import MoEAux, MoEFiLM, MoELayer, MoEMlp
from ..moe.dispatch import Dispatcher
from ..tasks import DEGRADATIONS
from .moe_vit import TaskBlock, resolve_block_indices

__all__ = ["MoFME", "ResBlock", "pad_to_multiple", "create_restoration", "restoration_cfg"]

EXPERT_KINDS = ("film", "ffn", "none")
# the routers a restoration model may use: token-level, task-independent (MoFME's plain router and its
# Uncertainty-aware Router), or conditioned on the degradation through a task embedding (M³ViT's task_embed)
ROUTERS = ("shared", "uncertainty", "task_embed")


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad (B, C, H, W) at the bottom and right by reflection to multiples of ``multiple``; returns the padded
    tensor and the original (H, W) to crop back to."""
    h, w = x.shape[-2:]
    if h < multiple or w < multiple:
        raise ValueError(
            f"image of {h}x{w} pixels is smaller than the model's multiple {multiple}; expected at least "
            f"{multiple}x{multiple}"
        )
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="reflect")
    return x, (h, w)


class ResBlock(nn.Module):
    """EDSR's residual block (the reference's): conv 3x3 -> ReLU -> conv 3x3, plus the input."""

    def __init__(self, channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2)
        self.act = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.act(self.conv1(x)))


class MoFME(nn.Module):
    """MoFME and its conventional-MoE and dense twins: ``forward(images, task=None)`` -> restored image.

    Args:
        img_size: nominal input size (any size runs; see the module docstring).
        patch_size: token size in pixels (8); also the multiple the input is padded to.
        head_channels: conv head width (32 in the reference).
        embed_dim, depth, num_heads, attn_head_dim: the transformer (384, 2, 8, 64 in the reference).
        mlp_ratio: FFN / adaptor hidden width over ``embed_dim`` (4).
        tail_channels: features per pixel after the token-to-pixel map (128 in the reference).
        experts: ``'film'`` (MoFME), ``'ffn'`` (conventional MoE) or ``'none'`` (dense).
        moe_blocks: which blocks get the MoE MLP (``'all'`` as in the reference; see ``resolve_block_indices``).
        num_experts, top_k: E and k.
        tasks: the degradations this model serves (default: every registered one).
        router: ``'shared'`` (MoFME's router: top-k logits, softmax; the default), ``'uncertainty'`` (the
            Uncertainty-aware Router, MC-dropout samples in training) or ``'task_embed'`` (routing conditioned on
            the degradation through a learned task embedding; ``forward`` then needs ``task``).
        router_kwargs: passed to the router (defaults: ``renormalize=True``, ``noise_std=0``, ``bias=True``;
            ``samples``/``dropout`` for ``'uncertainty'``, ``task_dim`` for ``'task_embed'``).
        dispatcher: ``'sort'`` (only the chosen experts run; default) or ``'dense'`` (every expert on every token,
            static shapes: the reference's computation and the export path), or any other dispatcher.
        capacity_factor: per-image expert capacity (None: dropless).
        drop_rate: dropout in attention output and MLPs (0.1 in the reference).
        residual: add the tail's output to the input image instead of a sigmoid (see the module docstring).
        skip: add the conv head's features to the tail's input (EDSR's long skip; needs head_channels ==
            tail_channels). Not in the reference: there every pixel's correction has to pass through its token.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 240,
        patch_size: int = 8,
        in_chans: int = 3,
        head_channels: int = 32,
        embed_dim: int = 384,
        depth: int = 2,
        num_heads: int = 8,
        attn_head_dim: int | None = 64,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        tail_channels: int = 128,
        experts: str = "film",
        moe_blocks: str | Sequence[int] | None = "all",
        num_experts: int = 16,
        top_k: int = 4,
        tasks: Sequence[str] = DEGRADATIONS,
        router: str = "shared",
        router_kwargs: dict | None = None,
        dispatcher: str | Dispatcher = "sort",
        capacity_factor: float | None = None,
        drop_rate: float = 0.0,
        residual: bool = False,
        skip: bool = False,
        weight_init: str = "",
    ) -> None:
        super().__init__()
        if experts not in EXPERT_KINDS:
            raise ValueError(f"experts={experts!r}: expected one of {list(EXPERT_KINDS)}")
        if router not in ROUTERS:
            raise ValueError(f"router={router!r}: expected one of {list(ROUTERS)} for a restoration model")
        if not tasks or isinstance(tasks, str):
            raise ValueError(f"tasks={tasks!r}: expected a list of degradation names")
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"duplicate task names in {list(tasks)}")
        if tail_channels % 2:
            raise ValueError(f"tail_channels must be even (the tail halves it), got {tail_channels}")
        if skip and head_channels != tail_channels:
            raise ValueError(
                f"skip=True adds the head's features to the tail's input: head_channels ({head_channels}) "
                f"must equal tail_channels ({tail_channels})"
            )
        self.tasks = tuple(tasks)
        self.patch_size = int(patch_size)
        self.embed_dim = self.num_features = embed_dim
        self.tail_channels = tail_channels
        self.residual, self.skip = residual, skip
        self.experts_kind = experts
        self.task_conditioned = router == "task_embed" and experts != "none"
        self.head = nn.Sequential(
            nn.Conv2d(in_chans, head_channels, 3, padding=1), ResBlock(head_channels), ResBlock(head_channels)
        )
        self.patch_embed = PatchEmbed(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=head_channels,
            embed_dim=embed_dim,
            norm_layer=nn.LayerNorm,
            strict_img_size=False,
        )
        self.moe_block_idx = resolve_block_indices(moe_blocks, depth) if experts != "none" else ()
        rk = dict(renormalize=True, noise_std=0.0, bias=True)
        rk.update(router_kwargs or {})
        hidden = int(embed_dim * mlp_ratio)
        moe = dict(
            layer=MoEFiLM if experts == "film" else MoEMlp,
            hidden=hidden,
            num_experts=num_experts,
            top_k=top_k,
            tasks=self.tasks,
            router=router,
            router_kwargs=rk,
            dispatcher=dispatcher,
            capacity_factor=capacity_factor,
        )
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.ModuleList(
            TaskBlock(
                embed_dim,
                num_heads,
                mlp_ratio,
                qkv_bias=qkv_bias,
                proj_drop=drop_rate,
                norm_layer=norm_layer,
                moe_mlp=moe if i in self.moe_block_idx else None,
                attn_head_dim=attn_head_dim,
            )
            for i in range(depth)
        )
        self.to_pixels = nn.Linear(embed_dim, patch_size * patch_size * tail_channels)
        half = tail_channels // 2
        self.tail = nn.Sequential(
            ResBlock(tail_channels),
            nn.Conv2d(tail_channels, half, 3, padding=1),
            ResBlock(half),
            nn.Conv2d(half, in_chans, 3, padding=1),
        )
        if weight_init != "skip":
            self.init_weights()

    def init_weights(self) -> None:
        # timm's per-Linear init (trunc normal .02, zero bias); stacked experts init themselves, convs keep torch's
        for name, m in self.named_modules():
            if m is not self:
                init_weights_vit_timm(m, name)
        if self.residual:  # the untrained model is the identity: the tail's last conv starts at zero
            nn.init.zeros_(self.tail[-1].weight)
            nn.init.zeros_(self.tail[-1].bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return set()

    # ------------------------------------------------------------------ tasks and MoE
    def resolve_task(self, task: str | Sequence[str] | None) -> str | list[str] | None:
        """The task to route by: None stays None when routing does not depend on it; a degradation-conditioned
        model needs one (or has only one); a list gives each image its own."""
        if task is None:
            if not self.task_conditioned:
                return None
            if len(self.tasks) == 1:
                return self.tasks[0]
            raise ValueError(f"this model routes by degradation {list(self.tasks)}: pass task=...")
        for t in [task] if isinstance(task, str) else task:
            if t not in self.tasks:
                raise ValueError(f"unknown task {t!r}; this model knows {list(self.tasks)}")
        return task if isinstance(task, str) else list(task)

    def moe_layers(self) -> list[tuple[str, nn.Module]]:
        return [(n, m) for n, m in self.named_modules() if isinstance(m, MoELayer)]

    def set_dispatcher(self, dispatcher: str | Dispatcher) -> MoFME:
        """Switch every MoE layer to another dispatcher (``'dense'``: every expert on every token). Returns self."""
        for _, m in self.moe_layers():
            m.set_dispatcher(dispatcher)
        return self

    def set_capacity(self, capacity: int | None = None, capacity_factor: float | None = None) -> MoFME:
        for _, m in self.moe_layers():
            m.set_capacity(capacity, capacity_factor)
        return self

    # ------------------------------------------------------------------ forward
    def forward(self, images: torch.Tensor, task: str | Sequence[str] | None = None, *, return_aux: bool = False):
        """images (B, 3, H, W) in [-1, 1], any H, W >= the patch size -> restored (B, 3, H, W) in [0, 1]; with
        ``return_aux`` also the MoE routing records (one per MoE layer). ``task``: None, a degradation, or one
        degradation per image (a batch mixing them)."""
        if not (task is None or isinstance(task, str)) and len(task) != images.shape[0]:
            raise ValueError(f"{len(task)} per-image tasks for a batch of {images.shape[0]} images")
        x, (h, w) = pad_to_multiple(images, self.patch_size)
        task = self.resolve_task(task)
        feat = self.head(x)  # (B, C, Hp, Wp)
        tokens = self.patch_embed(feat)  # (B, N, D)
        aux: list[MoEAux] = []
        for blk in self.blocks:
            tokens, a = blk(tokens, task)
            aux.extend(a)
        b, _, hp, wp = x.shape
        p = self.patch_size
        pix = self.to_pixels(tokens)  # (B, N, p*p*C)
        pix = F.pixel_shuffle(pix.transpose(1, 2).reshape(b, -1, hp // p, wp // p), p)  # (B, C, Hp, Wp)
        if self.skip:
            pix = pix + feat
        out = self.tail(pix)  # (B, 3, Hp, Wp)
        if self.residual:
            out = out + (x * 0.5 + 0.5)
            if not self.training:
                out = out.clamp(0.0, 1.0)
        else:
            out = torch.sigmoid(out)
        out = out[..., :h, :w]
        return (out, aux) if return_aux else out

    # ------------------------------------------------------------------ specialisation
    def specialize(self, task: str) -> MoFME:
        """This model for one degradation: its routers only (with degradation-conditioned routing, that task's
        embedding row), the experts they can reach. ``specialized(x)`` equals ``self(x, task)``."""
        task = self.resolve_task(task) or task
        if task not in self.tasks:
            raise ValueError(f"unknown task {task!r}; this model knows {list(self.tasks)}")
        new = copy.copy(self)
        new._modules = dict(self._modules)
        new.blocks = nn.ModuleList([blk.specialize(task) for blk in self.blocks])
        new.tasks = (task,)
        return copy.deepcopy(new).train(self.training)


def create_restoration(cls: type[nn.Module], variant: str, pretrained: bool = False, **kwargs) -> nn.Module:
    """timm's builder for a restoration network class (the restoration families share it): no classifier."""
    if kwargs.get("num_classes"):
        raise ValueError(f"{variant}: a restoration model has no classifier; got num_classes={kwargs['num_classes']}")
    kwargs.pop("num_classes", None)
    # timm's builder adds num_classes from the default config: filtered out (no classifier)
    return build_model_with_cfg(cls, variant, pretrained, kwargs_filter=("num_classes",), **kwargs)


def restoration_cfg(**kwargs) -> dict[str, Any]:
    """A restoration network's timm default config (input in [-1, 1], any size, no classifier)."""
    return {
        "url": "",
        "num_classes": 0,
        "input_size": (3, 240, 240),
        "fixed_input_size": False,
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
        "first_conv": "head.0",
        "classifier": "",
        "license": "apache-2.0",
        **kwargs,
    }


def _create(variant: str, pretrained: bool = False, **kwargs) -> MoFME:
    return create_restoration(MoFME, variant, pretrained, **kwargs)


default_cfgs = generate_default_cfgs(
    {
        f"mofme{kind}_{size}_patch8": restoration_cfg(input_size=(3, 64, 64) if size == "tiny" else (3, 240, 240))
        for kind in ("", "_ffnmoe", "_dense")
        for size in ("tiny", "base")
    }
)

# the reference network (models/mowe.py, scripts_allweather_mofme_ours.sh): 384-d, 2 blocks, 8 heads of 64,
# head 32 and tail 128 channels, dropout 0.1, sigmoid output; E = 16, k = 4 (the largest of its sweep)
_BASE = dict(
    patch_size=8,
    head_channels=32,
    embed_dim=384,
    depth=2,
    num_heads=8,
    attn_head_dim=64,
    tail_channels=128,
    num_experts=16,
    top_k=4,
    drop_rate=0.1,
)
# the CPU quickstart size: the same layout, narrower (16 conv channels, 128-d tokens), 8 experts top-2, residual
# output and the head-to-tail skip (trains in minutes)
_TINY = dict(
    patch_size=8,
    head_channels=16,
    embed_dim=128,
    depth=2,
    num_heads=4,
    attn_head_dim=32,
    tail_channels=16,
    num_experts=8,
    top_k=2,
    residual=True,
    skip=True,
)


@register_model
def mofme_tiny_patch8(pretrained: bool = False, **kwargs) -> MoFME:
    """MoFME, CPU quickstart size (128-d tokens, 16 conv channels, FiLM experts, 8 experts top-2)."""
    return _create("mofme_tiny_patch8", pretrained, **dict(dict(_TINY, experts="film"), **kwargs))


@register_model
def mofme_base_patch8(pretrained: bool = False, **kwargs) -> MoFME:
    """MoFME at the reference size (384-d, 8 heads x 64, FiLM experts, 16 experts top-4)."""
    return _create("mofme_base_patch8", pretrained, **dict(dict(_BASE, experts="film"), **kwargs))


@register_model
def mofme_ffnmoe_tiny_patch8(pretrained: bool = False, **kwargs) -> MoFME:
    """Conventional-MoE twin of ``mofme_tiny_patch8``: FFN experts (d -> 4d -> d) at the same E and k."""
    return _create("mofme_ffnmoe_tiny_patch8", pretrained, **dict(dict(_TINY, experts="ffn"), **kwargs))


@register_model
def mofme_ffnmoe_base_patch8(pretrained: bool = False, **kwargs) -> MoFME:
    """Conventional-MoE twin of ``mofme_base_patch8``: FFN experts (d -> 4d -> d) at the same E and k."""
    return _create("mofme_ffnmoe_base_patch8", pretrained, **dict(dict(_BASE, experts="ffn"), **kwargs))


@register_model
def mofme_dense_tiny_patch8(pretrained: bool = False, **kwargs) -> MoFME:
    """Dense twin of ``mofme_tiny_patch8``: one FFN (d -> 4d -> d) per block."""
    return _create("mofme_dense_tiny_patch8", pretrained, **dict(dict(_TINY, experts="none"), **kwargs))


@register_model
def mofme_dense_base_patch8(pretrained: bool = False, **kwargs) -> MoFME:
    """Dense twin of ``mofme_base_patch8``: one FFN (d -> 4d -> d) per block (the reference's baseline)."""
    return _create("mofme_dense_base_patch8", pretrained, **dict(dict(_BASE, experts="none"), **kwargs))
