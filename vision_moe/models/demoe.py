"""DeMoE: all-in-one deblurring with a mixture-of-experts decoder, and its dense NAFNet twin, on timm.

"Towards Unified Image Deblurring using a Mixture-of-Experts Decoder" (reference code cidautai/DeMoE, read for
this implementation; no code copied). A NAFNet U-Net (Chen et al., "Simple Baselines for Image Restoration"):

- :class:`NAFBlock`: LayerNorm2d -> 1x1 conv (c -> 2c) -> depthwise 3x3 -> SimpleGate -> simplified channel
  attention -> 1x1 conv, plus the input scaled by a learned ``beta``; then LayerNorm2d -> 1x1 conv -> SimpleGate ->
  1x1 conv, plus its input scaled by ``gamma``. ``beta`` and ``gamma`` start at zero (a new block is the identity).
  Standard ops only (timm's ``LayerNorm2d`` is a permute and ``F.layer_norm``; NAFNet's own LayerNorm2d is a
  custom autograd function, which ONNX export cannot trace), so every graph exports.
- encoder levels (blocks, then a 2x2 stride-2 conv doubling the channels), middle blocks, decoder levels
  (1x1 conv + pixel shuffle halving the channels, the encoder's skip added, blocks), a 3x3 conv to RGB, and the
  input image added (global residual). The input is padded by reflection to a multiple of 2^levels and the output
  cropped back.
- a **degradation classifier** on the bottleneck (after the middle blocks): 1x1 conv + BatchNorm + ReLU, a sigmoid
  spatial mask, the masked global mean, an MLP to one logit per degradation: one routing vector per image
  (``classifier_inputs='encoder'``: every encoder level's output is pooled the same way too);
- **MoE blocks** (:class:`ExpertBlocks`) after the middle blocks and after each decoder level, one NAFBlock expert
  per degradation, all fed by that one routing vector: the image's top-k probabilities renormalised to sum to 1
  (k = 1 in the reference's example, 3 its default), or the one-hot of a given degradation (the reference's manual
  override). In eager mode only the experts an image chose run on it (``dispatcher='sparse'``);
  ``dispatcher='dense'`` runs every expert on every image and masks the weights (static shapes: the "auto" ONNX
  graph).

``forward(images, task="auto" | degradation | [one per image], return_aux=False)`` -> the restored image, and with
``return_aux`` one :class:`~vision_moe.moe.MoEAux` per MoE block whose ``logits`` / ``probs`` (B, E) are the
classifier's (the same record for every block: the routing is per image). ``specialize(d)`` returns the plain
U-Net of degradation ``d``'s experts (no classifier), equal to the model forced to ``d``. With ``moe=False`` the
same class is the dense NAFNet twin (one NAFBlock where the experts were, no classifier).

Input: RGB normalised to [-1, 1] (mean = std = 0.5), as every restoration model here; output in [0, 1] (the
residual added to the input in [0, 1]; clamped in eval mode; the last conv starts at zero, so the untrained model
is the identity). Where the reference differs: its input is in [0, 1]
and its classifier uses BatchNorm1d and dropout in the MLP (a plain MLP here; the reference's classifier, built
for 5 blur types, is kept in outline).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from timm.models import generate_default_cfgs, register_model

from ..moe import MoEAux
from ..tasks import DEGRADATIONS
from .mofme import create_restoration, pad_to_multiple, restoration_cfg

__all__ = ["DeMoE", "NAFBlock", "ExpertBlocks", "DegradationClassifier", "BLUR_TYPES", "WEATHER_TYPES"]

# the blur types of the built-in degraded photographs (motion, defocus, low light: the reference's
# global/local motion, defocus and low-light blur, as far as the built-in data makes them)
BLUR_TYPES = ("deblur", "defocus", "lowlight")
# the deweather configuration: rain, haze, snow, raindrops (the built-in data makes all but raindrops)
WEATHER_TYPES = ("derain", "dehaze", "desnow", "deraindrop")
DISPATCHERS = ("sparse", "dense")


class SimpleGate(nn.Module):
    """NAFNet's activation: the channels split in two halves, multiplied."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=1)
        return a * b


class NAFBlock(nn.Module):
    """NAFNet's block (see the module docstring); (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, channels: int, dw_expand: int = 2, ffn_expand: int = 2, drop_rate: float = 0.0) -> None:
        super().__init__()
        dw = channels * dw_expand
        ffn = channels * ffn_expand
        self.norm1 = LayerNorm2d(channels)
        self.conv1 = nn.Conv2d(channels, dw, 1)
        self.conv2 = nn.Conv2d(dw, dw, 3, padding=1, groups=dw)  # depthwise
        self.gate = SimpleGate()
        # simplified channel attention: global mean -> 1x1 conv -> a scale per channel
        self.sca = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(dw // 2, dw // 2, 1))
        self.conv3 = nn.Conv2d(dw // 2, channels, 1)
        self.norm2 = LayerNorm2d(channels)
        self.conv4 = nn.Conv2d(channels, ffn, 1)
        self.conv5 = nn.Conv2d(ffn // 2, channels, 1)
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.beta = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.gamma = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.gate(self.conv2(self.conv1(self.norm1(x))))
        y = self.drop(self.conv3(y * self.sca(y)))
        x = x + y * self.beta
        y = self.drop(self.conv5(self.gate(self.conv4(self.norm2(x)))))
        return x + y * self.gamma


class ExpertBlocks(nn.Module):
    """An MoE block: one NAFBlock per expert, combined with per-image weights (B, E) (zero: not run).

    ``dispatcher='sparse'``: each expert runs on the images that chose it; ``'dense'``: every expert on every image,
    weighted (static shapes; the same result)."""

    def __init__(self, channels: int, num_experts: int, dispatcher: str = "sparse", **block_kwargs) -> None:
        super().__init__()
        if dispatcher not in DISPATCHERS:
            raise ValueError(f"dispatcher={dispatcher!r}: expected one of {list(DISPATCHERS)}")
        self.num_experts = num_experts
        self.dispatcher = dispatcher
        self.experts = nn.ModuleList(NAFBlock(channels, **block_kwargs) for _ in range(num_experts))

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        w = weights.to(x.dtype)  # (B, E)
        if self.dispatcher == "dense":
            out = 0
            for e, expert in enumerate(self.experts):
                out = out + expert(x) * w[:, e].view(-1, 1, 1, 1)
            return out
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            idx = torch.nonzero(w[:, e] > 0).flatten()
            if idx.numel() == 0:
                continue
            y = expert(x.index_select(0, idx)) * w.index_select(0, idx)[:, e].view(-1, 1, 1, 1)
            out = out.index_add(0, idx, y)
        return out


class DegradationClassifier(nn.Module):
    """Features (B, C_i, h_i, w_i) of one or more levels -> one logit per degradation (B, E). Per level: 1x1 conv +
    BatchNorm + ReLU, a sigmoid spatial mask, the masked global mean; the levels' vectors concatenated -> MLP (the
    reference's head on the bottleneck alone, without its BatchNorm1d in the MLP)."""

    def __init__(self, channels: Sequence[int], num_classes: int, hidden: int = 64, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, hidden, 1), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True)) for c in channels
        )
        self.mask = nn.ModuleList(nn.Conv2d(hidden, 1, 1) for _ in channels)
        n = hidden * len(channels)
        self.mlp = nn.Sequential(
            nn.Linear(n, hidden // 2), nn.ReLU(inplace=True), nn.Dropout(drop_rate), nn.Linear(hidden // 2, num_classes)
        )

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        pooled = []
        for x, proj, mask in zip(feats, self.proj, self.mask):
            f = proj(x)  # (B, hidden, H, W)
            m = torch.sigmoid(mask(f))  # (B, 1, H, W)
            pooled.append((f * m).sum((2, 3)) / m.sum((2, 3)).clamp_min(1e-6))  # (B, hidden)
        return self.mlp(torch.cat(pooled, 1))


def route_weights(probs: torch.Tensor, top_k: int) -> torch.Tensor:
    """(B, E) probabilities -> (B, E) weights: the top-k kept (ties at the k-th value kept too), renormalised to sum
    to 1. Static shapes (a TopK and a comparison; no scatter), the same in eager mode and in the exported graph."""
    kth = probs.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
    kept = probs * (probs >= kth).to(probs.dtype)
    return kept / kept.sum(-1, keepdim=True)


class DeMoE(nn.Module):
    """The DeMoE U-Net (``moe=True``) or its dense NAFNet twin (``moe=False``); see the module docstring.

    Args:
        width: channels of the first level (32 in the reference); each encoder level doubles them.
        enc_blocks, dec_blocks: NAFBlocks per encoder / decoder level (as many levels in both).
        middle_blocks: NAFBlocks at the bottleneck.
        tasks: the degradations; one expert per degradation in each MoE block, one classifier logit each.
        top_k: experts per image in "auto" routing (renormalised top-k of the classifier's probabilities).
        moe: False: the dense twin (no classifier; a plain NAFBlock where each MoE block is).
        classifier_hidden: the classifier's width.
        classifier_inputs: ``'bottleneck'`` (the reference: the features after the middle blocks) or ``'encoder'``
            (also every encoder level's output, whose full-resolution features keep the blur kernel's shape; in the
            quickstart it did not tell motion blur from defocus better than the bottleneck alone: docs/restoration.md).
        dispatcher: ``'sparse'`` (eager: only chosen experts run) or ``'dense'`` (every expert, masked; export).
        train_routing: how training batches route (``RestorationModel`` reads it): ``'forced'`` (each image to its
            own degradation's experts while the classifier learns beside them) or ``'auto'`` (by the classifier).
        drop_rate: dropout inside the blocks and the classifier.
    """

    classifier_routed = True  # RestorationModel adds the classifier's loss and metric

    def __init__(
        self,
        img_size: int | tuple[int, int] = 64,
        in_chans: int = 3,
        width: int = 32,
        enc_blocks: Sequence[int] = (2, 2, 2, 2),
        middle_blocks: int = 2,
        dec_blocks: Sequence[int] = (2, 2, 2, 2),
        tasks: Sequence[str] = BLUR_TYPES,
        top_k: int = 1,
        moe: bool = True,
        classifier_hidden: int = 256,
        classifier_inputs: str = "bottleneck",
        dispatcher: str = "sparse",
        train_routing: str = "forced",
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if not tasks or isinstance(tasks, str):
            raise ValueError(f"tasks={tasks!r}: expected a list of degradation names")
        bad = [t for t in tasks if t not in DEGRADATIONS]
        if bad:
            raise ValueError(f"unknown degradation {bad[0]!r}; expected some of {list(DEGRADATIONS)}")
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"duplicate task names in {list(tasks)}")
        if len(enc_blocks) != len(dec_blocks) or not enc_blocks:
            raise ValueError(
                f"enc_blocks {list(enc_blocks)} and dec_blocks {list(dec_blocks)}: expected as many levels in both"
            )
        if not 1 <= top_k <= len(tasks):
            raise ValueError(f"top_k={top_k}: expected 1 .. {len(tasks)} (one expert per degradation)")
        if train_routing not in ("forced", "auto"):
            raise ValueError(f"train_routing={train_routing!r}: expected 'forced' or 'auto'")
        if dispatcher not in DISPATCHERS:
            raise ValueError(f"dispatcher={dispatcher!r}: expected one of {list(DISPATCHERS)}")
        if classifier_inputs not in ("bottleneck", "encoder"):
            raise ValueError(f"classifier_inputs={classifier_inputs!r}: expected 'bottleneck' or 'encoder'")
        self.classifier_inputs = classifier_inputs
        self.tasks = tuple(tasks)
        self.top_k, self.moe, self.train_routing = int(top_k), bool(moe), train_routing
        self.classifier_routed = self.moe
        self.multiple = 2 ** len(enc_blocks)
        self.num_features = width * 2 ** len(enc_blocks)
        e = len(self.tasks)

        def slot(c: int) -> nn.Module:  # where the reference puts an MoE block
            if self.moe:
                return ExpertBlocks(c, e, dispatcher, drop_rate=drop_rate)
            return NAFBlock(c, drop_rate=drop_rate)

        self.intro = nn.Conv2d(in_chans, width, 3, padding=1)
        self.encoders, self.downs = nn.ModuleList(), nn.ModuleList()
        c = width
        for n in enc_blocks:
            self.encoders.append(nn.Sequential(*[NAFBlock(c, drop_rate=drop_rate) for _ in range(n)]))
            self.downs.append(nn.Conv2d(c, 2 * c, 2, stride=2))
            c *= 2
        self.middle = nn.Sequential(*[NAFBlock(c, drop_rate=drop_rate) for _ in range(middle_blocks)])
        levels = [width * 2**i for i in range(len(enc_blocks))] if classifier_inputs == "encoder" else []
        self.classifier = DegradationClassifier([*levels, c], e, classifier_hidden, drop_rate) if self.moe else None
        self.middle_moe = slot(c)
        self.ups, self.decoders, self.decoder_moe = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for n in dec_blocks:
            self.ups.append(nn.Sequential(nn.Conv2d(c, 2 * c, 1, bias=False), nn.PixelShuffle(2)))
            c //= 2
            self.decoders.append(nn.Sequential(*[NAFBlock(c, drop_rate=drop_rate) for _ in range(n)]))
            self.decoder_moe.append(slot(c))
        self.ending = nn.Conv2d(width, in_chans, 3, padding=1)
        # not in NAFNet: the last conv starts at zero, so the untrained model is the identity (as MoFME's tiny
        # residual sizes here): a short CPU run starts from the input's PSNR instead of below it
        nn.init.zeros_(self.ending.weight)
        nn.init.zeros_(self.ending.bias)

    # ------------------------------------------------------------------ tasks and MoE
    def moe_layers(self) -> list[tuple[str, nn.Module]]:
        return [(n, m) for n, m in self.named_modules() if isinstance(m, ExpertBlocks)]

    def set_dispatcher(self, dispatcher: str) -> DeMoE:
        """``'sparse'`` (only the chosen experts run) or ``'dense'`` (every expert, masked). Returns self."""
        if dispatcher not in DISPATCHERS:
            raise ValueError(f"dispatcher={dispatcher!r}: expected one of {list(DISPATCHERS)}")
        for _, m in self.moe_layers():
            m.dispatcher = dispatcher
        return self

    def set_capacity(self, capacity: int | None = None, capacity_factor: float | None = None) -> DeMoE:
        if capacity is not None or capacity_factor is not None:
            raise ValueError("DeMoE routes whole images (one expert set per image): it has no expert capacity")
        return self

    def _forced(self, task: str | Sequence[str], batch: int, ref: torch.Tensor) -> torch.Tensor:
        names = [task] * batch if isinstance(task, str) else list(task)
        if len(names) != batch:
            raise ValueError(f"{len(names)} per-image tasks for a batch of {batch} images")
        for t in names:
            if t not in self.tasks:
                raise ValueError(f"unknown task {t!r}; this model knows {list(self.tasks)} (or 'auto')")
        idx = torch.tensor([self.tasks.index(t) for t in names], device=ref.device)
        return F.one_hot(idx, len(self.tasks)).to(ref.dtype)

    # ------------------------------------------------------------------ forward
    def forward(
        self, images: torch.Tensor, task: str | Sequence[str] | None = "auto", *, return_aux: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[MoEAux]]:
        """images (B, 3, H, W) in [-1, 1], any H, W >= the model's multiple -> restored (B, 3, H, W) in [0, 1].
        ``task``: ``'auto'`` (None too) routes by the classifier; a degradation (or one per image) forces its
        experts. ``return_aux``: also one routing record per MoE block (the classifier's logits and the weights)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"images of shape {tuple(images.shape)}: expected (B, 3, H, W) RGB (convert grey or RGBA images "
                "to RGB first)"
            )
        if task is None:
            task = "auto"
        if not self.moe:
            if not (isinstance(task, str) and task == "auto"):
                self._forced(task, images.shape[0], images)  # a name it does not serve is still refused
            task = None
        x, (h, w) = pad_to_multiple(images, self.multiple)
        inp = x * 0.5 + 0.5  # the image in [0, 1]
        f = self.intro(x)
        skips = []
        for enc, down in zip(self.encoders, self.downs):
            f = enc(f)
            skips.append(f)
            f = down(f)
        f = self.middle(f)
        aux: list[MoEAux] = []
        weights = None
        if self.moe:
            logits = self._classify(skips, f)  # (B, E)
            probs = logits.softmax(-1)
            if isinstance(task, str) and task == "auto":
                weights = route_weights(probs, self.top_k)
            else:
                weights = self._forced(task, images.shape[0], probs)
            record = _aux(task, logits, probs, weights, min(self.top_k, len(self.tasks)))
            aux = [record] * len(self.moe_layers())
        f = self._slot(self.middle_moe, f, weights)
        for up, dec, moe, skip in zip(self.ups, self.decoders, self.decoder_moe, reversed(skips)):
            f = dec(up(f) + skip)
            f = self._slot(moe, f, weights)
        out = self.ending(f) + inp
        if not self.training:
            out = out.clamp(0.0, 1.0)
        out = out[..., :h, :w]
        return (out, aux) if return_aux else out

    @staticmethod
    def _slot(m: nn.Module, x: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        return m(x, weights) if isinstance(m, ExpertBlocks) else m(x)

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """The classifier's logits (B, E) over ``self.tasks`` (the encoder and middle blocks only)."""
        if not self.moe:
            raise ValueError("this model has no degradation classifier (moe=False)")
        x, _ = pad_to_multiple(images, self.multiple)
        f = self.intro(x)
        skips = []
        for enc, down in zip(self.encoders, self.downs):
            f = enc(f)
            skips.append(f)
            f = down(f)
        return self._classify(skips, self.middle(f))

    def _classify(self, skips: list[torch.Tensor], bottleneck: torch.Tensor) -> torch.Tensor:
        feats = [*skips, bottleneck] if self.classifier_inputs == "encoder" else [bottleneck]
        return self.classifier(feats).float()

    # ------------------------------------------------------------------ specialisation
    def specialize(self, task: str) -> DeMoE:
        """The plain U-Net of one degradation: each MoE block replaced by that degradation's expert, no classifier.
        ``specialized(x)`` equals ``self(x, task)``."""
        if task not in self.tasks:
            raise ValueError(f"unknown task {task!r}; this model knows {list(self.tasks)}")
        if not self.moe:
            new = copy.deepcopy(self)
            new.tasks = (task,)
            return new.train(self.training)
        e = self.tasks.index(task)
        new = copy.copy(self)
        new._modules = dict(self._modules)
        new.classifier = None
        new.middle_moe = self.middle_moe.experts[e]
        new.decoder_moe = nn.ModuleList(m.experts[e] for m in self.decoder_moe)
        new = copy.deepcopy(new)
        new.moe = new.classifier_routed = False
        new.tasks = (task,)
        return new.train(self.training)


def _aux(task: Any, logits: torch.Tensor, probs: torch.Tensor, weights: torch.Tensor, k: int) -> MoEAux:
    """The routing record of one forward: per image (S = B), the classifier's logits and probabilities, the chosen
    experts and their weights."""
    vals, idx = weights.topk(k, dim=-1)  # (B, k)
    load = (weights > 0).sum(0).long()  # (E,) images per expert
    name = task if isinstance(task, str) else None
    return MoEAux(name, logits, probs, idx, vals, None, None, load, probs.new_zeros(()))


default_cfgs = generate_default_cfgs(
    {
        f"{name}_{size}": restoration_cfg(
            input_size=(3, 64, 64) if size == "tiny" else (3, 256, 256), first_conv="intro"
        )
        for name in ("demoe", "demoe_deweather", "nafnet")
        for size in ("tiny", "base")
    }
)

# the reference size: width 32, [2, 2, 2, 2] encoder / decoder blocks, 2 middle blocks, k = 1
_BASE = dict(width=32, enc_blocks=(2, 2, 2, 2), middle_blocks=2, dec_blocks=(2, 2, 2, 2), classifier_hidden=256)
# the CPU quickstart size: width 16, three levels of one block, one middle block
_TINY = dict(width=16, enc_blocks=(1, 1, 1), middle_blocks=1, dec_blocks=(1, 1, 1), classifier_hidden=64)


def _model(variant: str, pretrained: bool, base: dict, **kwargs) -> DeMoE:
    return create_restoration(DeMoE, variant, pretrained, **dict(base, **kwargs))


@register_model
def demoe_tiny(pretrained: bool = False, **kwargs) -> DeMoE:
    """DeMoE, CPU quickstart size (width 16, 3 levels), the built-in blur types, top-1."""
    return _model("demoe_tiny", pretrained, dict(_TINY, tasks=BLUR_TYPES), **kwargs)


@register_model
def demoe_base(pretrained: bool = False, **kwargs) -> DeMoE:
    """DeMoE at the reference size (width 32, [2, 2, 2, 2] blocks, 2 middle), the built-in blur types, top-1."""
    return _model("demoe_base", pretrained, dict(_BASE, tasks=BLUR_TYPES), **kwargs)


@register_model
def demoe_deweather_tiny(pretrained: bool = False, **kwargs) -> DeMoE:
    """DeMoE over weather types (rain, haze, snow, raindrops), CPU size."""
    return _model("demoe_deweather_tiny", pretrained, dict(_TINY, tasks=WEATHER_TYPES), **kwargs)


@register_model
def demoe_deweather_base(pretrained: bool = False, **kwargs) -> DeMoE:
    """DeMoE over weather types (rain, haze, snow, raindrops), reference size."""
    return _model("demoe_deweather_base", pretrained, dict(_BASE, tasks=WEATHER_TYPES), **kwargs)


@register_model
def nafnet_tiny(pretrained: bool = False, **kwargs) -> DeMoE:
    """Dense NAFNet twin of ``demoe_tiny``: the same U-Net, one NAFBlock where each MoE block is, no classifier
    (the active width of DeMoE at k = 1)."""
    return _model("nafnet_tiny", pretrained, dict(_TINY, tasks=BLUR_TYPES, moe=False), **kwargs)


@register_model
def nafnet_base(pretrained: bool = False, **kwargs) -> DeMoE:
    """Dense NAFNet twin of ``demoe_base`` (width 32)."""
    return _model("nafnet_base", pretrained, dict(_BASE, tasks=BLUR_TYPES, moe=False), **kwargs)
