"""Experiment configs: YAML validated against typed dataclasses, one level of ``_base_``, ``--set`` overrides.

Any unknown key, wrong type or unknown task name raises :class:`ConfigError` with one line naming the file,
the key and the value, before anything is built.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .tasks import DENSE_HEADS, RESTORATION_LOSSES, TASKS, is_restoration

__all__ = [
    "ConfigError",
    "Config",
    "ModelConfig",
    "TaskConfig",
    "DatasetConfig",
    "DataConfig",
    "OptimConfig",
    "SchedConfig",
    "TrainConfig",
    "MoELossConfig",
    "load_config",
    "yaml_load",
    "config_from_dict",
    "config_to_dict",
    "dataset_tasks",
    "RESTORATION_HEAD_KEYS",
]


RESTORATION_FORMATS = ("builtin_restore", "paired", "allweather", "gopro", "all_in_one")
# builtin_restore's motion-blur kernels (vision_moe.data.builtin_restore.MOTION_KERNELS, checked equal in a test)
MOTION_KERNELS = ("trajectory", "linear")
# model.restoration_head: the MoE decoder head of a multi-task model's degradation tasks (MoEDecoderHead's
# arguments, and train_routing: 'forced' = each training image routed to its own degradation's experts, 'auto')
RESTORATION_HEAD_KEYS = (
    "width",
    "dec_blocks",
    "top_k",
    "classifier_hidden",
    "classifier_stats",
    "classifier_spectrum",
    "dispatcher",
    "drop_rate",
    "train_routing",
)


def dataset_tasks(ds: DatasetConfig, tasks: Any) -> list[str]:
    """The tasks dataset ``ds`` labels among the experiment's ``tasks``: its own ``tasks`` list, else every task of
    its kind (a restoration format: the degradations; any other format: the perception tasks), so one config can
    train a multi-task model on labelled images and on restoration pairs."""
    if ds.tasks:
        return list(ds.tasks)
    restoring = ds.format in RESTORATION_FORMATS
    return [t for t in tasks if is_restoration(t) == restoring]


class ConfigError(ValueError):
    """A config problem, reported as one line: ``file: key: message (got value)``."""


@dataclass
class ModelConfig:
    # a registered model: a ViT backbone (made into a multi-task model, one head per task) or, when the tasks are
    # degradations, a restoration network (vision_moe.list_models(family="restoration"))
    backbone: str = "m3vit_tiny_patch16_224"
    img_size: int = 224
    head: str = "setr_pup"  # dense head: 'setr_pup' | 'linear'
    head_channels: int = 256  # SETR-PUP conv width (256 in M³ViT)
    head_norm: str = "bn"
    det_channels: int = 256  # detection pyramid / FCOS tower width
    det_num_convs: int = 4
    det_scale_factors: list[float] = field(default_factory=lambda: [4.0, 2.0, 1.0, 0.5])
    cls_pool: str = "token"
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)  # create_model overrides (depth, patch_size...)
    # a ViT multi-task model with degradation tasks: their shared MoE decoder head (DeMoE's, routed per image by a
    # degradation classifier; vision_moe.models.demoe.MoEDecoderHead): width, dec_blocks, top_k, classifier_hidden,
    # dispatcher, drop_rate, train_routing
    restoration_head: dict[str, Any] = field(default_factory=dict)
    pretrained: bool = False  # start from the weight tag's pretrained weights (backbone: arch.tag), upcycled


@dataclass
class TaskConfig:
    weight: float = 1.0  # loss weight
    num_classes: int | None = None  # None: taken from the dataset (or the task's fixed channels)
    # restoration tasks only: 'l1' | 'charbonnier' ('default': l1), plus a VGG16 perceptual term of this weight
    # (runs only when the VGG16 weights are in the torch hub cache; MoFME's recipe: 0.04)
    loss: str = "default"
    perceptual_weight: float = 0.0


@dataclass
class DatasetConfig:
    # builtin | coco | ade20k | imagenet_folder | pascal_context | nyud; restoration (pairs of degraded input and
    # ground truth): builtin_restore | paired | allweather | gopro | all_in_one (vision_moe/data/restoration.py)
    format: str = "builtin"
    root: str = "data/builtin"
    tasks: list[str] = field(default_factory=list)  # empty = every task the dataset labels that the config trains
    train_split: str = "train"
    val_split: str = "val"
    sample_weight: float = 1.0
    # built-in data only (vision_moe.data.builtin.prepare_builtin; builtin_restore: crops per degradation)
    num_train: int = 2000
    num_val: int = 200
    seed: int = 0
    ann_file: str = ""  # COCO: annotation JSON (relative to root), if not the default layout
    val_ann_file: str = ""
    # builtin_restore only: how the deblur crops are blurred, 'trajectory' (a random walk, the default) | 'linear'
    motion_kernel: str = "trajectory"
    # builtin_restore only: also make deraindrop crops (adherent raindrops; a data folder of its own)
    raindrops: bool = False
    lq_dir: str = "lq"  # paired: the degraded-input and ground-truth folders under root/<split>/
    gt_dir: str = "gt"


@dataclass
class DataConfig:
    datasets: list[DatasetConfig] = field(default_factory=lambda: [DatasetConfig()])
    sampling: str = "round_robin"  # 'round_robin' | 'weighted' over datasets, one dataset per step
    batch_size: int = 16
    eval_batch_size: int = 32
    num_workers: int = 0
    max_bad_fraction: float = 0.01  # stop training when more than this fraction of samples is unreadable
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    augment: bool = True
    crop_scale: list[float] = field(default_factory=lambda: [0.5, 1.0])  # RandomResizedCrop scale range
    crop_border: int = 0  # restoration metrics: pixels cut from each side before PSNR / SSIM (BasicSR's)
    # restoration sets: each training batch draws from all their degradations (all-in-one training); false: one
    # degradation per step, round-robin (as multi-task steps run one dataset)
    mixed_batches: bool = True
    # progressive resizing (fast.ai, FFCV, EfficientNetV2's progressive learning): [[from_step, size], ...], the
    # training crop size from each step on (steps increasing; before the first one, model.img_size). Evaluation
    # and export stay at model.img_size. Empty: model.img_size throughout
    size_schedule: list[list[int]] = field(default_factory=list)


@dataclass
class OptimConfig:
    name: str = "adamw"  # 'adamw' | 'sgd'
    lr: float = 1e-3
    weight_decay: float = 0.05
    momentum: float = 0.9
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    clip_grad: float = 1.0  # 0 = off
    head_lr_mult: float = 1.0
    # AdamW with PyTorch's fused kernel (one pass over each parameter instead of a chain of foreach ops): 0.98x the
    # quickstart's CPU step (benchmarks/bench_step_parts.py); false = foreach AdamW (same update to float rounding)
    fused: bool = True


@dataclass
class SchedConfig:
    name: str = "cosine"  # 'cosine' | 'poly' | 'constant'
    warmup_steps: int = 0
    warmup_start_factor: float = 0.01
    min_lr_factor: float = 0.0
    power: float = 0.9  # poly


@dataclass
class MoELossConfig:
    aux_loss: str = "importance_load"  # 'importance_load' (M³ViT cv²) | 'switch' | 'none'
    aux_weight: float = 0.01
    mi_weight: float = 0.0  # Mod-Squad mutual information across the tasks of a step (0.005 in the paper)
    # tasks not in a step (one dataset per step) enter the MI loss through a moving average of their mean routing
    # probabilities with this momentum (detached); tasks that share a step's images are always live
    mi_momentum: float = 0.9
    z_weight: float = 0.0
    # classifier-routed restoration models (DeMoE): weight of the degradation classifier's cross-entropy
    classifier_weight: float = 0.1


@dataclass
class TrainConfig:
    steps: int = 1000
    seed: int = 0
    eval_every: int = 0  # 0 = only at the end
    ckpt_every: int = 0  # 0 = only at the end
    log_every: int = 10
    amp: bool = False  # autocast (amp_dtype; auto = bf16 on CPU and bf16-capable GPUs, else fp16 + GradScaler)
    amp_dtype: str = "auto"  # 'auto' | 'bf16' | 'fp16'
    threads: int = 0  # torch.set_num_threads; 0 = leave as is
    channels_last: bool = False  # NHWC memory format for the convolutions (stem, heads): faster on CPU (oneDNN)
    uncertainty_weighting: bool = False  # learned per-task log-variance weights (Kendall / Mod-Squad)
    device: str = "auto"
    tensorboard: bool = True
    progress: bool = True
    eval_max_batches: int = 0  # 0 = the whole split


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    tasks: dict[str, TaskConfig] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    moe: MoELossConfig = field(default_factory=MoELossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    name: str = "experiment"


_CHOICES = {
    "model.head": DENSE_HEADS,
    "model.head_norm": ("bn", "gn", "none"),
    "model.cls_pool": ("token", "avg"),
    "data.sampling": ("round_robin", "weighted"),
    "optim.name": ("adamw", "sgd"),
    "sched.name": ("cosine", "poly", "constant"),
    "moe.aux_loss": ("importance_load", "switch", "none"),
    "train.amp_dtype": ("auto", "bf16", "fp16"),
    "data.datasets.format": (
        "builtin",
        "coco",
        "ade20k",
        "imagenet_folder",
        "pascal_context",
        "nyud",
        *RESTORATION_FORMATS,
    ),
}


def _err(src: str, key: str, msg: str, value: Any) -> ConfigError:
    return ConfigError(f"{src}: {key}: {msg} (got {value!r})")


def _convert(tp: Any, value: Any, key: str, src: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, key, src)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _err(src, key, f"expected a mapping for {tp.__name__}", value)
        return _build(tp, value, key, src)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise _err(src, key, "expected a list", value)
        (item,) = typing.get_args(tp)
        return [_convert(item, v, f"{key}[{i}]", src) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _err(src, key, "expected a mapping", value)
        _, vt = typing.get_args(tp)
        return {str(k): _convert(vt, v, f"{key}.{k}", src) for k, v in value.items()}
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _err(src, key, "expected a number", value)
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _err(src, key, "expected an integer", value)
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise _err(src, key, "expected true/false", value)
        return value
    if tp is str:
        if not isinstance(value, str):
            raise _err(src, key, "expected a string", value)
        return value
    raise _err(src, key, f"unsupported type {tp}", value)


def _build(cls: type, data: dict, prefix: str, src: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            raise _err(src, key, f"unknown key; {cls.__name__} keys are {sorted(names)}", v)
        kwargs[k] = _convert(hints[k], v, key, src)
        choices = _CHOICES.get(_generic_key(key))
        if choices is not None and kwargs[k] not in choices:
            raise _err(src, key, f"expected one of {list(choices)}", v)
    return cls(**kwargs)


def _generic_key(key: str) -> str:
    return re.sub(r"\[\d+\]", "", key)


def _validate(cfg: Config, src: str) -> Config:
    if not cfg.tasks:
        raise _err(src, "tasks", "at least one task is required", cfg.tasks)
    for t in cfg.tasks:
        if t not in TASKS:
            raise _err(src, f"tasks.{t}", f"unknown task; expected one of {sorted(TASKS)}", t)
    for i, ds in enumerate(cfg.data.datasets):
        for t in ds.tasks:
            if t not in TASKS:
                raise _err(src, f"data.datasets[{i}].tasks", f"unknown task; expected one of {sorted(TASKS)}", t)
            if t not in cfg.tasks:
                raise _err(src, f"data.datasets[{i}].tasks", "task not listed under tasks:", t)
    if not cfg.data.datasets:
        raise _err(src, "data.datasets", "at least one dataset is required", cfg.data.datasets)
    if not 0.0 <= cfg.data.max_bad_fraction <= 1.0:
        raise _err(src, "data.max_bad_fraction", "must be in [0, 1]", cfg.data.max_bad_fraction)
    _check_ranges(cfg, src)
    from ._factory import list_models, list_pretrained

    if cfg.model.backbone not in list_models() + list_pretrained():
        raise _err(
            src,
            "model.backbone",
            f"unknown backbone; expected one of {list_models()} or a weight tag (tools/download.py --list)",
            cfg.model.backbone,
        )
    if cfg.model.pretrained and "." not in cfg.model.backbone:
        raise _err(
            src,
            "model.pretrained",
            "needs a weight tag as model.backbone (e.g. m3vit_small_patch16_224.augreg_in21k_ft_in1k): the tag fixes "
            "the architecture, so a resumed or reloaded run builds the same one",
            cfg.model.pretrained,
        )
    _check_restoration(cfg, src)
    _check_backbone(cfg, src)
    return cfg


def _check_restoration(cfg: Config, src: str) -> None:
    """Restoration tasks, models and data formats go together; their options are checked here."""
    from ._factory import model_family

    restoring = [t for t in cfg.tasks if is_restoration(t)]
    other = [t for t in cfg.tasks if not is_restoration(t)]
    family = model_family(cfg.model.backbone)
    if restoring and other and family != "vit":
        raise _err(
            src,
            "tasks",
            f"restoration tasks {restoring} with {other} in one model need a ViT backbone (a multi-task model whose "
            "degradations share an MoE decoder head)",
            cfg.model.backbone,
        )
    if restoring and not other and family != "restoration":
        raise _err(
            src,
            "model.backbone",
            f"the tasks are degradations: expected a restoration model ({_restorers()})",
            cfg.model.backbone,
        )
    if not restoring and family == "restoration":
        raise _err(
            src,
            "model.backbone",
            "a restoration model needs degradation tasks (derain, denoise, ...)",
            cfg.model.backbone,
        )
    for i, ds in enumerate(cfg.data.datasets):
        pairs = ds.format in RESTORATION_FORMATS
        kind = "restoration pairs" if pairs else "labelled images"
        labels = dataset_tasks(ds, cfg.tasks)
        if not labels:
            raise _err(
                src, f"data.datasets[{i}].format", f"{kind} label none of the tasks {list(cfg.tasks)}", ds.format
            )
        wrong = [t for t in labels if is_restoration(t) != pairs]
        if wrong:
            raise _err(src, f"data.datasets[{i}].tasks", f"{kind} ({ds.format}) do not label these tasks", wrong)
        if ds.motion_kernel != "trajectory" and ds.format != "builtin_restore":
            raise _err(
                src, f"data.datasets[{i}].motion_kernel", "is an option of the builtin_restore data", ds.motion_kernel
            )
        if ds.raindrops and ds.format != "builtin_restore":
            raise _err(src, f"data.datasets[{i}].raindrops", "is an option of the builtin_restore data", ds.raindrops)
        if ds.motion_kernel not in MOTION_KERNELS:
            raise _err(
                src, f"data.datasets[{i}].motion_kernel", f"expected one of {list(MOTION_KERNELS)}", ds.motion_kernel
            )
    head = cfg.model.restoration_head
    if head and not (restoring and other):
        raise _err(
            src,
            "model.restoration_head",
            "is the MoE decoder head of a multi-task model that also has degradation tasks",
            head,
        )
    bad = sorted(set(head) - set(RESTORATION_HEAD_KEYS))
    if bad:
        raise _err(
            src,
            f"model.restoration_head.{bad[0]}",
            f"unknown key; expected some of {list(RESTORATION_HEAD_KEYS)}",
            head[bad[0]],
        )
    for t, tc in cfg.tasks.items():
        if not is_restoration(t) and (tc.loss != "default" or tc.perceptual_weight):
            raise _err(src, f"tasks.{t}.loss", "loss and perceptual_weight are options of restoration tasks", tc.loss)
        if is_restoration(t) and tc.loss not in ("default", *RESTORATION_LOSSES):
            raise _err(src, f"tasks.{t}.loss", f"expected one of {['default', *RESTORATION_LOSSES]}", tc.loss)
        if not (math.isfinite(tc.perceptual_weight) and tc.perceptual_weight >= 0):
            raise _err(src, f"tasks.{t}.perceptual_weight", "must be a finite number >= 0", tc.perceptual_weight)
    if restoring and (cfg.data.mean != [0.5] * 3 or cfg.data.std != [0.5] * 3):
        raise _err(
            src,
            "data.mean",
            "restoration models take their input in [-1, 1]: data.mean and data.std must be 0.5",
            [cfg.data.mean, cfg.data.std],
        )
    if cfg.data.crop_border < 0:
        raise _err(src, "data.crop_border", "must be >= 0", cfg.data.crop_border)
    if restoring and cfg.data.mixed_batches and cfg.moe.mi_weight:
        raise _err(
            src,
            "moe.mi_weight",
            "the task-expert MI needs one degradation per step: set data.mixed_batches: false",
            cfg.moe.mi_weight,
        )


def _restorers() -> list[str]:
    from ._factory import list_models

    return list_models(family="restoration")


def _check_ranges(cfg: Config, src: str) -> None:
    """Numbers whose wrong value would otherwise surface deep inside training as a library error."""
    at_least = {
        "train.steps": (cfg.train.steps, 1),
        "data.batch_size": (cfg.data.batch_size, 1),
        "data.eval_batch_size": (cfg.data.eval_batch_size, 1),
        "model.img_size": (cfg.model.img_size, 1),
        "model.head_channels": (cfg.model.head_channels, 1),
        "model.det_num_convs": (cfg.model.det_num_convs, 0),
        "data.num_workers": (cfg.data.num_workers, 0),
        "train.threads": (cfg.train.threads, 0),
        "train.eval_every": (cfg.train.eval_every, 0),
        "train.ckpt_every": (cfg.train.ckpt_every, 0),
        "train.log_every": (cfg.train.log_every, 0),
        "train.eval_max_batches": (cfg.train.eval_max_batches, 0),
        "sched.warmup_steps": (cfg.sched.warmup_steps, 0),
    }
    for i, ds in enumerate(cfg.data.datasets):
        at_least[f"data.datasets[{i}].num_train"] = (ds.num_train, 1)
        at_least[f"data.datasets[{i}].num_val"] = (ds.num_val, 1)
    for key, (v, lo) in at_least.items():
        if v < lo:
            raise _err(src, key, f"must be >= {lo}", v)
    non_negative = {
        "optim.weight_decay": cfg.optim.weight_decay,
        "optim.clip_grad": cfg.optim.clip_grad,
        "moe.aux_weight": cfg.moe.aux_weight,
        "moe.mi_weight": cfg.moe.mi_weight,
        "moe.z_weight": cfg.moe.z_weight,
        **{f"tasks.{t}.weight": tc.weight for t, tc in cfg.tasks.items()},
        **{f"data.datasets[{i}].sample_weight": ds.sample_weight for i, ds in enumerate(cfg.data.datasets)},
    }
    for key, v in non_negative.items():
        if not (math.isfinite(v) and v >= 0):
            raise _err(src, key, "must be a finite number >= 0", v)
    for key, v in {"optim.lr": cfg.optim.lr, "optim.head_lr_mult": cfg.optim.head_lr_mult}.items():
        if not (math.isfinite(v) and v > 0):
            raise _err(src, key, "must be a finite number > 0", v)
    for t, tc in cfg.tasks.items():
        if tc.num_classes is not None and tc.num_classes < 1:
            raise _err(src, f"tasks.{t}.num_classes", "must be >= 1 (or null: taken from the dataset)", tc.num_classes)
    lo, hi = (cfg.data.crop_scale + [None, None])[:2]
    if len(cfg.data.crop_scale) != 2 or not 0 < lo <= hi <= 1:
        raise _err(src, "data.crop_scale", "expected [min, max] with 0 < min <= max <= 1", cfg.data.crop_scale)
    for key, v in {"data.mean": cfg.data.mean, "data.std": cfg.data.std}.items():
        if len(v) != 3:
            raise _err(src, key, "expected 3 values (R, G, B)", v)
    _check_size_schedule(cfg.data.size_schedule, src)
    if any(v <= 0 for v in cfg.data.std):
        raise _err(src, "data.std", "must be > 0", cfg.data.std)
    if len(cfg.optim.betas) != 2 or not all(0 <= b < 1 for b in cfg.optim.betas):
        raise _err(src, "optim.betas", "expected [beta1, beta2] in [0, 1)", cfg.optim.betas)
    if not 0 <= cfg.moe.mi_momentum < 1:
        raise _err(src, "moe.mi_momentum", "must be in [0, 1)", cfg.moe.mi_momentum)
    if "detection" in cfg.tasks:
        if cfg.model.det_channels < 32 or cfg.model.det_channels % 32:
            raise _err(
                src, "model.det_channels", "must be a multiple of 32 (FCOS uses GroupNorm(32))", cfg.model.det_channels
            )
        if not cfg.model.det_scale_factors or any(f <= 0 for f in cfg.model.det_scale_factors):
            raise _err(
                src,
                "model.det_scale_factors",
                "expected a non-empty list of positive factors",
                cfg.model.det_scale_factors,
            )
    dev = cfg.train.device
    if dev != "auto":
        import torch

        try:
            torch.device(dev)
        except RuntimeError:
            raise _err(src, "train.device", "expected 'auto', 'cpu', 'cuda' or 'cuda:N'", dev) from None


def _check_size_schedule(schedule: list[list[int]], src: str) -> None:
    last = -1
    for i, pair in enumerate(schedule):
        if len(pair) != 2 or pair[0] <= last or pair[1] < 1:
            raise _err(
                src,
                f"data.size_schedule[{i}]",
                "expected [from_step, size] with from_step >= 0 increasing along the list and size >= 1",
                pair,
            )
        last = pair[0]


def _check_backbone(cfg: Config, src: str) -> None:
    """Build the backbone on the meta device (no memory, no init cost) so that a wrong ``model.backbone_kwargs``
    entry fails here, naming the key, rather than after the data is prepared."""
    import torch

    from ._factory import create_model, model_family

    kw = dict(cfg.model.backbone_kwargs)
    if model_family(cfg.model.backbone) == "vit":
        kw["num_classes"] = 0
    try:
        with torch.device("meta"):
            m = create_model(cfg.model.backbone, tasks=list(cfg.tasks), img_size=cfg.model.img_size, **kw)
    except (TypeError, ValueError, AssertionError, RuntimeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise _err(
            src, "model.backbone_kwargs", f"{cfg.model.backbone} cannot be built with these: {msg}", kw
        ) from None
    # timm's feature_info 'reduction' is the token stride: the patch size, or the product of a convolutional stem's
    # strides (the stem's HybridEmbed infers its ratio from img_size itself, so a non-multiple gets a wrong one)
    stride = (getattr(m, "feature_info", None) or [{}])[-1].get("reduction")
    sizes = {"model.img_size": cfg.model.img_size}
    sizes.update({f"data.size_schedule[{i}][1]": s for i, (_, s) in enumerate(cfg.data.size_schedule)})
    for key, size in sizes.items():
        if stride and size % stride:
            raise _err(src, key, f"must be a multiple of {cfg.model.backbone}'s patch size {stride}", size)


def _deep_merge(base: dict, over: dict) -> dict:
    """Merge ``over`` into ``base`` recursively; a mapping holding ``_delete_: true`` replaces instead (as mmcv)."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and v.get("_delete_") is True:
            out[k] = {kk: vv for kk, vv in v.items() if kk != "_delete_"}
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's floats: PyYAML implements YAML 1.1, where a float needs a dot and a
    signed exponent, so ``2e-4``, ``5e-4`` or ``1.0e3`` would be strings and ``optim.lr: 5e-4`` a type error.
    The extra resolver only matches exponent forms; every other scalar resolves as before."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"),
)


def yaml_load(text: str) -> Any:
    """Parse YAML as every config file and ``--set`` value is parsed (safe, with YAML 1.2 exponent floats)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (_Loader is a SafeLoader)


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder; expected a YAML file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file; expected YAML") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror or e})") from None
    except yaml.MarkedYAMLError as e:  # line:column of the problem, as compilers print it
        where = f"{path}:{e.problem_mark.line + 1}:{e.problem_mark.column + 1}" if e.problem_mark else str(path)
        raise ConfigError(f"{where}: invalid YAML: {e.problem or e.context or 'syntax error'}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping (got {type(data).__name__})")
    return data


def _apply_set(data: dict, item: str, src: str) -> None:
    if "=" not in item:
        raise ConfigError(f"{src}: --set {item!r}: expected key=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml_load(raw)
    except yaml.YAMLError:
        value = raw
    parts = key.strip().split(".")
    node = data
    for p in parts[:-1]:
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"{src}: {key}: cannot set inside a non-mapping value (got {nxt!r})")
        node = nxt
    node[parts[-1]] = value


def config_from_dict(data: dict, src: str = "<dict>") -> Config:
    """Validate a plain dict (as read from YAML) into a :class:`Config`."""
    return _validate(_build(Config, data, "", src), src)


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read ``path`` (merging its ``_base_`` file, one level, relative to it), apply ``key=value`` overrides
    (values parsed as YAML) and validate."""
    path = Path(path)
    data = _read_yaml(path)
    base = data.pop("_base_", None)
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"{path}: _base_: expected a file name (got {base!r})")
        base_data = _read_yaml(path.parent / base)
        if "_base_" in base_data:
            raise ConfigError(f"{path.parent / base}: _base_: only one level of _base_ is supported")
        data = _deep_merge(base_data, data)
    for item in overrides or []:
        _apply_set(data, item, f"{path} --set")
    return config_from_dict(data, str(path))


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)
