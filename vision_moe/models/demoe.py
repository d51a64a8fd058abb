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

__all__ = [
    "DeMoE",
    "DeMoEViT",
    "MoEDecoderHead",
    "NAFBlock",
    "ExpertBlocks",
    "BlurStatistics",
    "DegradationClassifier",
    "BLUR_TYPES",
    "WEATHER_TYPES",
]

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


class BlurStatistics(nn.Module):
    """Blur statistics of an image (B, 3, H, W) in [-1, 1] -> (B, 4 + 3 * scales + rings - 1): its mean colour, the
    log of its grey contrast, and at each of ``scales`` scales (halved by 2x2 averaging) the log mean energy of three
    fixed filters on the grey image: horizontal and vertical Sobel derivatives and the Laplacian. ``rings`` > 0: also
    the log mean energy in each ring of spatial frequency but the lowest, 0-0.5 cycles/px cut into ``rings`` equal
    rings, measured by fixed ring filters of 21 x 21 taps (each ring's inverse DFT on a 64 x 64 grid, centred,
    Hann-windowed): the image's radial power spectrum, where a disk kernel's first zero (0.17-0.41 cycles/px for
    the built-in defocus radii) and a motion kernel's smoother fall-off differ.

    Not in the reference. How fast an image's energy falls from one scale to the next, and from first to second
    derivatives, is what tells motion blur, defocus and low light apart here (docs/restoration.md: logistic
    regression on such features separates the built-in blur types at 0.88-0.93, where the classifier on the
    bottleneck alone reaches 0.58-0.66; the rings raise it to 0.93-0.94); log energies make those ratios
    differences, which a linear layer reads. Fixed filters (buffers, not parameters): 700 quickstart steps do not
    learn them from scratch. Convolutions rather than an FFT: the exported graph stays shape-agnostic and free of
    DFT, which TensorRT's ONNX parser does not take."""

    RING_TAPS = 21

    def __init__(self, scales: int = 3, rings: int = 0) -> None:
        super().__init__()
        if scales < 1:
            raise ValueError(f"BlurStatistics: scales={scales}; expected >= 1")
        if rings < 0 or rings == 1:
            raise ValueError(f"BlurStatistics: rings={rings}; expected 0 (off) or >= 2 (the lowest ring is dropped)")
        self.scales, self.rings = int(scales), int(rings)
        sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
        lap = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])
        self.register_buffer("kernels", (torch.stack([sobel, sobel.t(), lap])[:, None] / 4).contiguous(), False)
        if self.rings:
            self.register_buffer("ring_kernels", _ring_filters(self.rings, self.RING_TAPS), False)
        self.num_features = 4 + 3 * self.scales + max(self.rings - 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):  # log energies of small values: float32, whatever the AMP
            with torch.autocast(x.device.type, enabled=False):
                return self.forward(x.float())
        g = x.mean(1, keepdim=True)  # grey
        feats = [x.mean((2, 3)), torch.log(g.flatten(1).std(1, keepdim=True) + 1e-3)]
        if self.rings:
            p = self.RING_TAPS // 2
            e = F.conv2d(F.pad(g, (p, p, p, p), mode="replicate"), self.ring_kernels).pow(2).mean((2, 3))
            feats.append(torch.log(e + 1e-8))
        for i in range(self.scales):
            if i:
                g = F.avg_pool2d(g, 2)
            e = F.conv2d(F.pad(g, (1, 1, 1, 1), mode="replicate"), self.kernels).pow(2).mean((2, 3))
            feats.append(torch.log(e + 1e-6))
        return torch.cat(feats, 1)


def _ring_filters(rings: int, taps: int, grid: int = 64) -> torch.Tensor:
    """(rings - 1, 1, taps, taps): band-pass filters for the rings 1.. of 0-0.5 cycles/px cut into ``rings`` equal
    radial rings (ring 0, around DC, left out): each ring's indicator on a ``grid`` x ``grid`` frequency grid,
    inverse-DFT'd, centred, cut to ``taps`` x ``taps`` and Hann-windowed, its mean removed (no DC response)."""
    f = torch.fft.fftfreq(grid, dtype=torch.float64)
    r = torch.hypot(f[:, None], f[None, :])
    edges = torch.linspace(0, 0.5, rings + 1, dtype=torch.float64)
    win = torch.hann_window(taps + 2, periodic=False, dtype=torch.float64)[1:-1]
    c, h = grid // 2, taps // 2
    out = []
    for b in range(1, rings):
        ring = ((r >= edges[b]) & (r < edges[b + 1])).to(torch.float64)
        k = torch.fft.fftshift(torch.fft.ifft2(ring).real)[c - h : c + h + 1, c - h : c + h + 1] * win[:, None] * win
        out.append(k - k.mean())
    return torch.stack(out)[:, None].float().contiguous()


class DegradationClassifier(nn.Module):
    """Features (B, C_i, h_i, w_i) of one or more levels -> one logit per degradation (B, E). Per level: 1x1 conv +
    BatchNorm + ReLU, a sigmoid spatial mask, the masked global mean; the levels' vectors concatenated -> MLP (the
    reference's head on the bottleneck alone, without its BatchNorm1d in the MLP). ``stats_scales`` > 0 (a model's
    ``classifier_stats``): also the input image's :class:`BlurStatistics` at that many scales (and ``stats_rings``
    frequency rings, a model's ``classifier_spectrum``), batch-normalised and concatenated before the MLP;
    ``forward`` then needs the image."""

    def __init__(
        self,
        channels: Sequence[int],
        num_classes: int,
        hidden: int = 64,
        drop_rate: float = 0.0,
        stats_scales: int = 0,
        stats_rings: int = 0,
    ) -> None:
        super().__init__()
        if stats_scales < 0:
            raise ValueError(f"classifier_stats={stats_scales}: expected 0 (off) or the number of scales (>= 1)")
        if stats_rings < 0 or stats_rings == 1 or (stats_rings and not stats_scales):
            raise ValueError(
                f"classifier_spectrum={stats_rings}: expected 0 (off) or the number of frequency rings (>= 2), "
                "with classifier_stats >= 1"
            )
        self.proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, hidden, 1), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True)) for c in channels
        )
        self.mask = nn.ModuleList(nn.Conv2d(hidden, 1, 1) for _ in channels)
        self.stats = BlurStatistics(stats_scales, stats_rings) if stats_scales else None
        n_stats = self.stats.num_features if self.stats is not None else 0
        self.stats_norm = nn.BatchNorm1d(n_stats) if n_stats else None
        n = hidden * len(channels) + n_stats
        self.mlp = nn.Sequential(
            nn.Linear(n, hidden // 2), nn.ReLU(inplace=True), nn.Dropout(drop_rate), nn.Linear(hidden // 2, num_classes)
        )

    def forward(self, feats: Sequence[torch.Tensor], images: torch.Tensor | None = None) -> torch.Tensor:
        """``feats``: one map per level; ``images``: the (padded) input in [-1, 1], read when the statistics are on."""
        if self.stats is not None and images is None:
            raise ValueError("this classifier reads the image's blur statistics: pass images")
        pooled = []
        for x, proj, mask in zip(feats, self.proj, self.mask):
            f = proj(x)  # (B, hidden, H, W)
            m = torch.sigmoid(mask(f))  # (B, 1, H, W)
            pooled.append((f * m).sum((2, 3)) / m.sum((2, 3)).clamp_min(1e-6))  # (B, hidden)
        if self.stats is not None:
            stats, bn = self.stats(images), self.stats_norm
            if self.training and stats.shape[0] == 1:  # one image has no batch statistics: the running ones
                pooled.append(
                    F.batch_norm(stats, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
                )
            else:
                pooled.append(bn(stats))
        return self.mlp(torch.cat(pooled, 1))


def forced_weights(tasks: Sequence[str], task: str | Sequence[str], batch: int, ref: torch.Tensor) -> torch.Tensor:
    """The one-hot routing (B, E) of a given degradation (or one per image) over ``tasks``; an unknown name raises."""
    names = [task] * batch if isinstance(task, str) else list(task)
    if len(names) != batch:
        raise ValueError(f"{len(names)} per-image tasks for a batch of {batch} images")
    for t in names:
        if t not in tasks:
            raise ValueError(f"unknown task {t!r}; this model knows {list(tasks)} (or 'auto')")
    idx = torch.tensor([tasks.index(t) for t in names], device=ref.device)
    return F.one_hot(idx, len(tasks)).to(ref.dtype)


def image_routing(
    tasks: Sequence[str], top_k: int, logits: torch.Tensor, task: str | Sequence[str]
) -> tuple[torch.Tensor, MoEAux]:
    """One routing vector per image from the classifier's ``logits`` (B, E): ``task='auto'`` keeps the top-k
    probabilities renormalised, a degradation (or one per image) forces its expert. Returns the weights (B, E) and
    the routing record every MoE block of the image reports."""
    probs = logits.softmax(-1)
    if isinstance(task, str) and task == "auto":
        weights = route_weights(probs, top_k)
    else:
        weights = forced_weights(tasks, task, logits.shape[0], probs)
    return weights, _aux(task, logits, probs, weights, min(top_k, len(tasks)))


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
        classifier_stats: also feed the classifier the input image's :class:`BlurStatistics` at this many scales
            (0: off, the reference). Not in the reference; see :class:`BlurStatistics`.
        classifier_spectrum: with ``classifier_stats``, also the image's radial power spectrum in this many
            frequency rings (0: off); see :class:`BlurStatistics`.
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
        classifier_stats: int = 0,
        classifier_spectrum: int = 0,
        dispatcher: str = "sparse",
        train_routing: str = "forced",
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        _check_tasks(tasks, top_k, train_routing, dispatcher)
        if classifier_stats < 0 or (classifier_stats and not moe):
            raise ValueError(
                f"classifier_stats={classifier_stats}: expected 0 (off) or the number of scales (>= 1) of a model "
                "with a classifier (moe=True)"
            )
        if classifier_spectrum and not moe:
            raise ValueError(
                f"classifier_spectrum={classifier_spectrum}: expected 0 (off) for a model without a classifier "
                "(moe=False)"
            )
        if len(enc_blocks) != len(dec_blocks) or not enc_blocks:
            raise ValueError(
                f"enc_blocks {list(enc_blocks)} and dec_blocks {list(dec_blocks)}: expected as many levels in both"
            )
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
        self.classifier = (
            DegradationClassifier([*levels, c], e, classifier_hidden, drop_rate, classifier_stats, classifier_spectrum)
            if self.moe
            else None
        )
        self.middle_moe = slot(c)
        self.ups, self.decoders, self.decoder_moe = _decoder_levels(c, dec_blocks, slot, drop_rate)
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

    # ------------------------------------------------------------------ forward
    def forward(
        self, images: torch.Tensor, task: str | Sequence[str] | None = "auto", *, return_aux: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[MoEAux]]:
        """images (B, 3, H, W) in [-1, 1], any H, W >= the model's multiple -> restored (B, 3, H, W) in [0, 1].
        ``task``: ``'auto'`` (None too) routes by the classifier; a degradation (or one per image) forces its
        experts. ``return_aux``: also one routing record per MoE block (the classifier's logits and the weights)."""
        _check_rgb(images)
        if task is None:
            task = "auto"
        if not self.moe:
            if not (isinstance(task, str) and task == "auto"):
                forced_weights(self.tasks, task, images.shape[0], images)  # a name it does not serve is still refused
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
            weights, record = image_routing(self.tasks, self.top_k, self._classify(x, skips, f), task)
            aux = [record] * len(self.moe_layers())
        f = _decode(self, _slot(self.middle_moe, f, weights), skips, weights)
        out = self.ending(f) + inp
        if not self.training:
            out = out.clamp(0.0, 1.0)
        out = out[..., :h, :w]
        return (out, aux) if return_aux else out

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
        return self._classify(x, skips, self.middle(f))

    def _classify(self, x: torch.Tensor, skips: list[torch.Tensor], bottleneck: torch.Tensor) -> torch.Tensor:
        feats = [*skips, bottleneck] if self.classifier_inputs == "encoder" else [bottleneck]
        return self.classifier(feats, x).float()

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


class MoEDecoderHead(nn.Module):
    """DeMoE's classifier-routed MoE decoder as a dense head on ViT patch tokens (the ViT variant of the family).

    ``forward(tokens, grid, images, task)``: the patch tokens (B, prefix + gh*gw, C) of a backbone whose token
    stride is ``patch_size`` (a power of two) become the bottleneck map (LayerNorm, 1x1 conv to
    ``width * patch_size`` channels); the degradation classifier reads it; an MoE block of NAFBlock experts follows,
    then log2(patch_size) decoder levels (1x1 conv + pixel shuffle, a skip added, ``dec_blocks`` NAFBlocks, an MoE
    block), a 3x3 conv to RGB and the input image added. The skips come from the image itself (a 3x3 conv at full
    resolution, then a 2x2 stride-2 conv per level), since a ViT keeps no multi-scale features: without them every
    pixel's correction would pass through its token (as in MoFME's reference). ``images`` is the (padded) input in
    [-1, 1]; returns the restored image in [0, 1] (unclamped) and one routing record per MoE block (the image's).
    ``classifier_stats`` > 0: the classifier also reads the image's :class:`BlurStatistics` (as DeMoE's, with
    ``classifier_spectrum`` frequency rings).
    ``specialize(d)`` keeps degradation ``d``'s experts and drops the classifier."""

    def __init__(
        self,
        embed_dim: int,
        tasks: Sequence[str],
        patch_size: int,
        width: int = 16,
        dec_blocks: int = 1,
        top_k: int = 1,
        classifier_hidden: int = 64,
        num_prefix_tokens: int = 1,
        dispatcher: str = "sparse",
        drop_rate: float = 0.0,
        in_chans: int = 3,
        classifier_stats: int = 0,
        classifier_spectrum: int = 0,
    ) -> None:
        super().__init__()
        levels = int(patch_size).bit_length() - 1
        if patch_size < 2 or 2**levels != patch_size:
            raise ValueError(f"patch_size={patch_size}: the decoder upsamples by 2 per level, expected a power of two")
        self.tasks, self.top_k, self.num_prefix_tokens = tuple(tasks), int(top_k), num_prefix_tokens
        e, c = len(self.tasks), width * 2**levels
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.proj = nn.Conv2d(embed_dim, c, 1)
        self.classifier: nn.Module | None = DegradationClassifier(
            [c], e, classifier_hidden, drop_rate, classifier_stats, classifier_spectrum
        )
        self.intro = nn.Conv2d(in_chans, width, 3, padding=1)
        self.downs = nn.ModuleList(
            nn.Conv2d(width * 2**i, width * 2 ** (i + 1), 2, stride=2) for i in range(levels - 1)
        )
        self.middle_moe: nn.Module = ExpertBlocks(c, e, dispatcher, drop_rate=drop_rate)
        self.ups, self.decoders, self.decoder_moe = _decoder_levels(
            c, [dec_blocks] * levels, lambda ch: ExpertBlocks(ch, e, dispatcher, drop_rate=drop_rate), drop_rate
        )
        self.ending = nn.Conv2d(width, in_chans, 3, padding=1)
        nn.init.zeros_(self.ending.weight)  # the untrained head returns the input image (as DeMoE's ending)
        nn.init.zeros_(self.ending.bias)

    def bottleneck(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = self.norm(tokens[:, self.num_prefix_tokens :])  # (B, gh*gw, C)
        return self.proj(x.transpose(1, 2).reshape(x.shape[0], -1, grid[0], grid[1]))

    def classify(self, tokens: torch.Tensor, grid: tuple[int, int], images: torch.Tensor | None = None) -> torch.Tensor:
        """The classifier's logits (B, E) over ``self.tasks`` (``images``: the padded input, for the statistics)."""
        if self.classifier is None:
            raise ValueError("this head was specialised to one degradation: it has no classifier")
        return self.classifier([self.bottleneck(tokens, grid)], images).float()

    def forward(
        self, tokens: torch.Tensor, grid: tuple[int, int], images: torch.Tensor, task: str | Sequence[str] = "auto"
    ) -> tuple[torch.Tensor, list[MoEAux]]:
        f = self.bottleneck(tokens, grid)
        weights, aux = None, []
        if self.classifier is not None:
            weights, record = image_routing(self.tasks, self.top_k, self.classifier([f], images).float(), task)
            aux = [record] * (1 + len(self.decoder_moe))
        skips = [self.intro(images)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        f = _decode(self, _slot(self.middle_moe, f, weights), skips, weights)
        return self.ending(f) + (images * 0.5 + 0.5), aux

    def specialize(self, task: str) -> MoEDecoderHead:
        """This head for one degradation: each MoE block replaced by its expert, no classifier (a copy)."""
        if task not in self.tasks:
            raise ValueError(f"unknown task {task!r}; this head knows {list(self.tasks)}")
        e = self.tasks.index(task)
        new = copy.copy(self)
        new._modules = dict(self._modules)
        new.classifier = None
        if isinstance(self.middle_moe, ExpertBlocks):
            new.middle_moe = self.middle_moe.experts[e]
            new.decoder_moe = nn.ModuleList(m.experts[e] for m in self.decoder_moe)
        new = copy.deepcopy(new)
        new.tasks = (task,)
        return new


class DeMoEViT(nn.Module):
    """The ViT variant of DeMoE: an MoE ViT backbone of this project (``MoEVisionTransformer``, e.g. the multi-task
    quickstart's M³ViT) with :class:`MoEDecoderHead` as its dense head. The same contract as :class:`DeMoE`:
    ``forward(images, task="auto" | degradation | [one per image], return_aux=False)``, ``classify``,
    ``specialize(d)`` (the backbone and ``d``'s experts, no classifier).

    The backbone does not know the degradation ("auto" cannot tell it): it serves one task, :attr:`BACKBONE_TASK`,
    so its MoE layers route tokens blindly (V-MoE style) and the head's classifier routes the image. In a multi-task
    model this is one more task of the shared backbone (its own router, the task embedding of M³ViT's
    ``task_embed``). The routing records are the head's (one per MoE block, the classifier's first) followed by the
    backbone's (per token, task :attr:`BACKBONE_TASK`).

    Args:
        backbone: a registered ``vit``-family model; ``backbone_kwargs`` its constructor arguments (patch size,
            width, depth, experts, a conv stem...). Its token stride is the multiple the input is padded to.
        tasks, top_k, classifier_hidden, classifier_stats, classifier_spectrum, dispatcher, train_routing,
            drop_rate: as :class:`DeMoE`.
        width, dec_blocks: the head's narrowest width (at full resolution) and NAFBlocks per decoder level.
    """

    BACKBONE_TASK = "restoration"

    def __init__(
        self,
        img_size: int | tuple[int, int] = 64,
        in_chans: int = 3,
        backbone: str = "m3vit_tiny_patch16_224",
        backbone_kwargs: dict | None = None,
        tasks: Sequence[str] = BLUR_TYPES,
        width: int = 16,
        dec_blocks: int = 1,
        top_k: int = 1,
        classifier_hidden: int = 64,
        dispatcher: str = "sparse",
        train_routing: str = "forced",
        drop_rate: float = 0.0,
        classifier_stats: int = 0,
        classifier_spectrum: int = 0,
    ) -> None:
        super().__init__()
        import timm  # the backbone is built by name (vision_moe's ViTs are registered by then)

        if backbone not in timm.list_models(module="moe_vit"):  # every one a MoEVisionTransformer
            raise ValueError(f"backbone={backbone!r}: expected a vision-moe ViT (a model of the 'vit' family)")
        _check_tasks(tasks, top_k, train_routing, dispatcher)
        bb_kwargs = dict(backbone_kwargs or {})
        bad = sorted({"tasks", "num_classes", "img_size", "in_chans"} & set(bb_kwargs))
        if bad:
            raise ValueError(f"backbone_kwargs {bad}: set by DeMoEViT itself (its tasks, no classifier, sizes)")
        bb = timm.create_model(
            backbone, tasks=(self.BACKBONE_TASK,), num_classes=0, img_size=img_size, in_chans=in_chans, **bb_kwargs
        )
        head = MoEDecoderHead(
            bb.embed_dim,
            tasks,
            _square_stride(bb),
            width=width,
            dec_blocks=dec_blocks,
            top_k=top_k,
            classifier_hidden=classifier_hidden,
            num_prefix_tokens=bb.num_prefix_tokens,
            dispatcher=dispatcher,
            drop_rate=drop_rate,
            in_chans=in_chans,
            classifier_stats=classifier_stats,
            classifier_spectrum=classifier_spectrum,
        )
        self._attach(bb, head, train_routing)

    def _attach(self, backbone: nn.Module, head: MoEDecoderHead, train_routing: str) -> None:
        """Set the backbone and head and what follows from them (tasks, top-k, the padding multiple); the backbone's
        position embedding is made traceable (one exported graph for every image size)."""
        self.multiple = self.patch_size = _square_stride(backbone)
        backbone.traceable_pos_embed = True
        self.backbone, self.head = backbone, head
        self.tasks, self.top_k, self.train_routing = tuple(head.tasks), int(head.top_k), train_routing
        self.classifier_routed = head.classifier is not None
        self.num_features = backbone.embed_dim

    @classmethod
    def from_parts(cls, backbone: nn.Module, head: MoEDecoderHead, train_routing: str = "forced") -> DeMoEViT:
        """A DeMoEViT around an existing backbone (one that routes :attr:`BACKBONE_TASK`, e.g. a multi-task model's
        backbone specialised to it) and :class:`MoEDecoderHead` (used as they are, not copied): how a multi-task
        model's degradation tasks become one restoration network, for export. Its default config's input size is
        the backbone's."""
        if cls.BACKBONE_TASK not in backbone.tasks:
            raise ValueError(f"the backbone routes {list(backbone.tasks)}: expected task {cls.BACKBONE_TASK!r}")
        _check_tasks(head.tasks, head.top_k, train_routing, "sparse")
        net = cls.__new__(cls)
        nn.Module.__init__(net)
        net._attach(backbone, head, train_routing)
        net.pretrained_cfg = restoration_cfg(
            input_size=(3, *backbone.patch_embed.img_size), first_conv="backbone.patch_embed"
        )
        return net

    def moe_layers(self) -> list[tuple[str, nn.Module]]:
        head = [(f"head.{n}", m) for n, m in self.head.named_modules() if isinstance(m, ExpertBlocks)]
        return head + [(f"backbone.{n}", m) for n, m in self.backbone.moe_layers()]

    def set_dispatcher(self, dispatcher: str) -> DeMoEViT:
        """``'dense'``: every expert on every token and image (static shapes, export); ``'sparse'``: only the chosen
        experts run (the head's sparse path, the backbone's ``'sort'``); any other name is the backbone's
        dispatcher, with the head sparse. Returns self."""
        for _, m in self.head.named_modules():
            if isinstance(m, ExpertBlocks):
                m.dispatcher = "dense" if dispatcher == "dense" else "sparse"
        self.backbone.set_dispatcher("sort" if dispatcher == "sparse" else dispatcher)
        return self

    def set_capacity(self, capacity: int | None = None, capacity_factor: float | None = None) -> DeMoEViT:
        """The backbone's token capacity (the head routes whole images and has none)."""
        self.backbone.set_capacity(capacity, capacity_factor)
        return self

    def _tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int], torch.Tensor, list[MoEAux]]:
        _check_rgb(images)
        x, _ = pad_to_multiple(images, self.multiple)
        tokens, aux = self.backbone.forward_features(x, self.BACKBONE_TASK, return_aux=True)
        return tokens, (x.shape[-2] // self.multiple, x.shape[-1] // self.multiple), x, aux

    def forward(
        self, images: torch.Tensor, task: str | Sequence[str] | None = "auto", *, return_aux: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[MoEAux]]:
        """images (B, 3, H, W) in [-1, 1] -> restored (B, 3, H, W) in [0, 1] (see :meth:`DeMoE.forward`)."""
        tokens, grid, x, bb_aux = self._tokens(images)
        out, head_aux = self.head(tokens, grid, x, "auto" if task is None else task)
        if not self.training:
            out = out.clamp(0.0, 1.0)
        out = out[..., : images.shape[-2], : images.shape[-1]]
        return (out, head_aux + bb_aux) if return_aux else out

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """The classifier's logits (B, E) over ``self.tasks``."""
        if self.head.classifier is None:
            raise ValueError(f"this model was specialised to {self.tasks[0]!r}: it has no degradation classifier")
        tokens, grid, x, _ = self._tokens(images)
        return self.head.classify(tokens, grid, x)

    def specialize(self, task: str) -> DeMoEViT:
        """The backbone and degradation ``task``'s experts, no classifier: ``specialized(x)`` equals
        ``self(x, task)``."""
        if task not in self.tasks:
            raise ValueError(f"unknown task {task!r}; this model knows {list(self.tasks)}")
        new = copy.copy(self)
        new._modules = dict(self._modules)
        new.backbone = self.backbone.specialize(self.BACKBONE_TASK)
        new.head = self.head.specialize(task)
        new.classifier_routed = False
        new.tasks = (task,)
        return new.train(self.training)


def _check_tasks(tasks: Sequence[str], top_k: int, train_routing: str, dispatcher: str) -> None:
    """The arguments DeMoE and its ViT variant share, checked the same way."""
    if not tasks or isinstance(tasks, str):
        raise ValueError(f"tasks={tasks!r}: expected a list of degradation names")
    bad = [t for t in tasks if t not in DEGRADATIONS]
    if bad:
        raise ValueError(f"unknown degradation {bad[0]!r}; expected some of {list(DEGRADATIONS)}")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"duplicate task names in {list(tasks)}")
    if not 1 <= top_k <= len(tasks):
        raise ValueError(f"top_k={top_k}: expected 1 .. {len(tasks)} (one expert per degradation)")
    if train_routing not in ("forced", "auto"):
        raise ValueError(f"train_routing={train_routing!r}: expected 'forced' or 'auto'")
    if dispatcher not in DISPATCHERS:
        raise ValueError(f"dispatcher={dispatcher!r}: expected one of {list(DISPATCHERS)}")


def _square_stride(backbone: nn.Module) -> int:
    """A ViT backbone's token stride, which must be square (the decoder upsamples both sides alike)."""
    from .moe_vit import token_stride

    stride = token_stride(backbone.patch_embed)
    if stride[0] != stride[1]:
        raise ValueError(f"backbone token stride {tuple(stride)}: expected a square patch")
    return int(stride[0])


def _check_rgb(images: torch.Tensor) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(
            f"images of shape {tuple(images.shape)}: expected (B, 3, H, W) RGB (convert grey or RGBA images to RGB "
            "first)"
        )


def _slot(m: nn.Module, x: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """An MoE block (ExpertBlocks, weighted per image) or the plain block that replaced it (dense twin, specialised)."""
    return m(x, weights) if isinstance(m, ExpertBlocks) else m(x)


def _decoder_levels(
    c: int, blocks: Sequence[int], slot: Any, drop_rate: float
) -> tuple[nn.ModuleList, nn.ModuleList, nn.ModuleList]:
    """NAFNet's decoder from ``c`` channels: per level a 1x1 conv + pixel shuffle halving the channels, ``blocks[i]``
    NAFBlocks, and ``slot(channels)`` (an MoE block or its plain twin). Returns (ups, decoders, slots)."""
    ups, decoders, slots = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
    for n in blocks:
        ups.append(nn.Sequential(nn.Conv2d(c, 2 * c, 1, bias=False), nn.PixelShuffle(2)))
        c //= 2
        decoders.append(nn.Sequential(*[NAFBlock(c, drop_rate=drop_rate) for _ in range(n)]))
        slots.append(slot(c))
    return ups, decoders, slots


def _decode(net: nn.Module, f: torch.Tensor, skips: Sequence[torch.Tensor], weights: torch.Tensor | None):
    """``net``'s decoder levels (``ups``, ``decoders``, ``decoder_moe``) on ``f``, the skips added deepest first."""
    for up, dec, moe, skip in zip(net.ups, net.decoders, net.decoder_moe, reversed(skips)):
        f = _slot(moe, dec(up(f) + skip), weights)
    return f


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
    | {
        f"demoe_vit_{size}": restoration_cfg(
            input_size=(3, 64, 64) if size == "tiny" else (3, 256, 256), first_conv="backbone.patch_embed"
        )
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


# the ViT variant's backbones: the multi-task quickstart's M³ViT (64-d, 4 blocks, 8 experts top-2 in every other
# block, a 16-32-32-64-64 conv stem, tokens of 8 px) and, at the reference size, M³ViT-S (384-d, 12 blocks, 16 px)
_VIT_TINY = dict(
    backbone="m3vit_tiny_patch16_224",
    backbone_kwargs=dict(
        patch_size=8,
        embed_dim=64,
        depth=4,
        num_heads=4,
        num_experts=8,
        top_k=2,
        expert_hidden=128,
        stem_channels=(16, 32, 32, 64, 64),
        stem_strides=(1, 2, 1, 2, 1, 2),
    ),
    width=16,
    dec_blocks=1,
    classifier_hidden=64,
)
_VIT_BASE = dict(backbone="m3vit_small_patch16_224", backbone_kwargs={}, width=32, dec_blocks=2, classifier_hidden=256)


def _vit_model(variant: str, pretrained: bool, base: dict, **kwargs) -> DeMoEViT:
    args = dict(base, **kwargs)
    args["backbone_kwargs"] = dict(base["backbone_kwargs"], **(kwargs.get("backbone_kwargs") or {}))  # key by key
    return create_restoration(DeMoEViT, variant, pretrained, **args)


@register_model
def demoe_vit_tiny(pretrained: bool = False, **kwargs) -> DeMoEViT:
    """DeMoE's MoE decoder as a head on the quickstart's M³ViT (patch 8, 64-d, 4 blocks), the built-in blur types,
    top-1."""
    return _vit_model("demoe_vit_tiny", pretrained, dict(_VIT_TINY, tasks=BLUR_TYPES), **kwargs)


@register_model
def demoe_vit_base(pretrained: bool = False, **kwargs) -> DeMoEViT:
    """DeMoE's MoE decoder (width 32, two NAFBlocks per level) as a head on M³ViT-S (patch 16), top-1."""
    return _vit_model("demoe_vit_base", pretrained, dict(_VIT_BASE, tasks=BLUR_TYPES), **kwargs)
