"""The export pipeline: task model -> ONNX (checked, simplified, verified) -> FP16 / INT8 variants -> TensorRT.

:func:`export_model` writes, per task, ``<task>.onnx`` (fp32, static except an optional ``batch`` symbol) and the
precision variant asked for, plus ``export_report.json`` (shapes, op counts, TensorRT op checks, parity, metric
drops, versions). Every parity check failing its tolerance raises :class:`~.onnx_export.ParityError`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn as nn

from ..config import dataset_tasks
from ..machine import machine_info
from ..models.moe_vit import token_stride
from .multitask_graph import TaskIndexedModel
from .onnx_export import (
    EXPORTERS,
    MIN_EXPORTER_OPSET,
    check_opset,
    check_static_graph,
    compare_outputs,
    export_onnx,
    file_opset,
    graph_io,
    op_counts,
    ort_session,
    simplify_onnx,
)
from .prepost import decode_detections, pad_reflect, sample_images
from .quantize import INT8_RUNTIMES
from .trt_ops import TRT_VERSIONS, check_tensorrt_support

__all__ = ["ExportConfig", "export_model", "task_module", "task_kind", "PRECISIONS", "FORMATS"]

_logger = logging.getLogger(__name__)
# one line per finished stage (export, simplify, parity, variants, evaluation), for tools to show as progress
_stages = logging.getLogger("vision_moe.deploy.stages")


def _mib(path: Path) -> str:
    n = path.stat().st_size
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


PRECISIONS = ("fp32", "fp16", "int8")
FORMATS = ("onnx", "engine")
FP32_RTOL = 1e-4  # the bar for fp32 graphs
FP16_RTOL = 2e-2  # fp16 ONNX variant vs fp32 torch, on the same outputs
# The multi-task graph is not quantised (no QDQ scales): an INT8 request builds its engine with FP16 instead. The
# report carries this map so the Jetson kit (export/build_engine.py, export/infer.py) names and finds the same file.
MULTITASK_ENGINE_PRECISION = {"fp32": "fp32", "fp16": "fp16", "int8": "fp16"}


@dataclass
class ExportConfig:
    """What to export. ``img_size`` (H, W) defaults to the model's; ``batch`` is the static batch (or the example
    batch with ``dynamic_batch``).

    Data for INT8 / FP16: ``experiment`` (a training :class:`~vision_moe.config.Config`, e.g. a checkpoint's own)
    gives labelled data: calibration on its training split, the metric drop on its held-out split through the
    evaluator. ``calib_data``, a folder of images, replaces the calibration images. With neither, calibration uses
    scikit-image's bundled photographs and the "drop" is agreement with the FP32 graph (the report says which)."""

    out_dir: str
    tasks: Sequence[str] | None = None
    fmt: str = "onnx"
    precision: str = "fp32"
    batch: int = 1
    dynamic_batch: bool = False
    img_size: tuple[int, int] | None = None
    opset: int | None = None  # None: the exporter's lowest (torchscript 17, dynamo 18)
    exporter: str = "torchscript"
    calib_data: str | None = None
    experiment: Any = None  # a training Config: labelled data for calibration (train split) and drops (val split)
    calib_images: int = 16
    eval_images: int = 16
    int8_runtime: str = "tensorrt"  # 'tensorrt' (symmetric int8 activations) | 'onnxruntime' (uint8, x86 CPUs)
    multitask: bool = False
    dispatcher: str = "auto"  # 'auto': 'gather' when a capacity applies, else 'dense' (exact, every expert)
    capacity_factor: float | None = None  # per-image expert capacity for the export; None keeps the model's
    trt_versions: Sequence[str] = ("10.3", "10.16")
    parity_images: int = 4
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    overwrite: bool = False  # replace a non-empty out_dir (its old files are removed once the export succeeded)
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if self.fmt not in FORMATS:
            raise ValueError(f"unknown format {self.fmt!r}; expected one of {list(FORMATS)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; expected one of {list(PRECISIONS)}")
        if self.int8_runtime not in INT8_RUNTIMES:
            raise ValueError(f"unknown int8_runtime {self.int8_runtime!r}; expected one of {list(INT8_RUNTIMES)}")
        if self.fmt == "engine" and self.precision == "int8" and self.int8_runtime != "tensorrt":
            raise ValueError("an INT8 TensorRT engine needs int8_runtime='tensorrt' (symmetric int8 activations)")
        if self.batch < 1:
            raise ValueError(f"batch must be >= 1, got {self.batch}")
        if self.img_size is not None and (len(self.img_size) != 2 or min(self.img_size) < 1):
            raise ValueError(f"img_size must be two positive numbers (H, W), got {tuple(self.img_size)}")
        # INT8 calibrates and evaluates in whole batches: fewer images than one batch leave nothing to run
        int8_batch = self.batch if self.precision == "int8" else 1
        for name, least in (("calib_images", int8_batch), ("eval_images", int8_batch), ("parity_images", 1)):
            v = getattr(self, name)
            if v < least:
                why = " (the batch size: INT8 runs whole batches)" if least > 1 else ""
                raise ValueError(f"{name} must be >= {least}{why}, got {v}")
        if self.exporter not in EXPORTERS:
            raise ValueError(f"unknown exporter {self.exporter!r}; expected one of {list(EXPORTERS)}")
        if self.opset is None:
            self.opset = MIN_EXPORTER_OPSET[self.exporter]
        check_opset(self.opset, self.exporter)
        out = Path(self.out_dir)
        if out.exists() and not out.is_dir():
            raise ValueError(f"out_dir {str(out)!r} exists and is not a folder")
        if out.is_dir() and any(out.iterdir()) and not self.overwrite:
            raise ValueError(
                f"out_dir {str(out)!r} is not empty; choose a new folder, or overwrite (--overwrite) to replace "
                "its contents with this export's"
            )
        if self.experiment is not None and not hasattr(self.experiment, "data"):
            raise ValueError(f"experiment must be a training Config (vision_moe.config), got {type(self.experiment)}")
        if self.capacity_factor is not None:  # the MoE layers' own check: a finite number > 0
            from ..moe.dispatch import resolve_capacity

            resolve_capacity(1, 1, 1, capacity_factor=self.capacity_factor)
        if self.dispatcher not in ("auto", "dense", "gather", "einsum"):
            raise ValueError(
                f"dispatcher {self.dispatcher!r} cannot be exported; expected 'auto', 'dense', 'gather' or 'einsum'"
            )
        bad = [v for v in self.trt_versions if v not in TRT_VERSIONS]
        if bad:
            raise ValueError(f"unknown TensorRT versions {bad}; expected some of {sorted(TRT_VERSIONS)}")


# ---------------------------------------------------------------------------------------------- task modules
def _backbone(model: nn.Module) -> nn.Module:
    return model.backbone if hasattr(model, "backbone") and hasattr(model, "heads") else model


def task_kind(model: nn.Module, task: str) -> str:
    """'classification' | 'dense' | 'detection' for ``task`` of ``model`` (a MoE ViT alone is a classifier)."""
    if hasattr(model, "heads") and hasattr(model, "backbone"):
        from ..tasks import get_task

        return get_task(task).kind
    return "classification"


def _check_task(model: nn.Module, task: str) -> None:
    tasks = list(model.tasks)
    if task not in tasks:
        raise ValueError(f"unknown task {task!r}; this model has tasks {tasks}")
    if not (hasattr(model, "heads") and hasattr(model, "backbone")):
        from ..tasks import TASKS

        # a bare MoE ViT is an image classifier whose routers are per task: exporting its task 'semseg' would
        # write a classifier named semseg.onnx
        if task in TASKS and TASKS[task].kind != "classification":
            raise ValueError(
                f"task {task!r}: this model has no task heads (an image classifier with one router per task), so "
                f"its {task!r} graph would be a classifier; build it with heads (tools/export.py --tasks-def "
                f"'{{\"{task}\": N}}') or give its routing tasks names that are not dense tasks"
            )


class _DetectionDecoded(nn.Module):
    """Specialised detector + in-graph FCOS decoding: images -> boxes (B, A, 4), scores (B, A, K).

    The outputs are EfficientNMS_TRT's inputs (box_coding=0 corners, scores per class), so NMS can be appended in
    the graph for TensorRT or run on the host (``export/prepost.py``); points are constants for the input size.
    """

    def __init__(self, model: nn.Module, image_size: tuple[int, int]) -> None:
        super().__init__()
        self.model, self.image_size = model, tuple(image_size)
        self.register_buffer("points", model.anchors(self.image_size).float())  # (A, 4)
        self.num_points, self.num_classes = int(self.points.shape[0]), int(model.head.num_classes)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        boxes, scores = decode_detections(self.model(images), self.points, self.image_size)
        # reshapes to Python-int sizes: with a dynamic batch the exporter could not infer A through the per-level
        # concatenation (the output would be declared (batch, ?, 4)); with constants every dim but batch is fixed
        return boxes.reshape(-1, self.num_points, 4), scores.reshape(-1, self.num_points, self.num_classes)


def _has_capacity(backbone: nn.Module) -> bool:
    layers = _moe_layers(backbone)
    return any(m.capacity is not None or m.capacity_factor is not None for m in layers)


def prepare_copy(
    model: nn.Module, image_size: tuple[int, int], dispatcher: str = "auto", capacity_factor: float | None = None
) -> nn.Module:
    """An eval-mode copy with a static-shape dispatcher and its position embedding resampled to ``image_size``.

    ``capacity_factor`` sets every MoE layer's per-image capacity (None keeps the model's). ``dispatcher='auto'``
    picks ``gather`` when a capacity applies (expert FLOPs ~ factor x the active ones) and ``dense`` otherwise
    (dropless: a static graph must run every reachable expert on every token).

    The backbone resamples ``pos_embed`` inside ``forward`` behind a Python ``if`` on the input size, which a
    trace records as whatever it was at trace time; baking the export size into the copy removes the branch.
    """
    from timm.layers import resample_abs_pos_embed

    m = copy.deepcopy(model).eval()
    bb = _backbone(m)
    if capacity_factor is not None:
        bb.set_capacity(capacity_factor=capacity_factor)
    if dispatcher == "auto":
        dispatcher = "gather" if _has_capacity(bb) else "dense"
    bb.set_dispatcher(dispatcher)
    p = token_stride(bb.patch_embed)
    grid = (image_size[0] // p[0], image_size[1] // p[1])
    if grid != tuple(bb.patch_embed.grid_size):
        with torch.no_grad():
            # old_size given: timm infers a square grid from the token count otherwise
            bb.pos_embed = nn.Parameter(
                resample_abs_pos_embed(
                    bb.pos_embed.detach(),
                    grid,
                    old_size=tuple(bb.patch_embed.grid_size),
                    num_prefix_tokens=bb.num_prefix_tokens,
                )
            )
        bb.patch_embed.set_input_size(img_size=tuple(image_size))
    return m


def task_module(
    model: nn.Module,
    task: str,
    image_size: tuple[int, int],
    dispatcher: str = "auto",
    capacity_factor: float | None = None,
) -> tuple[nn.Module, list[str], dict[str, Any]]:
    """The exportable single-task module for ``task``: ``model.specialize(task)`` with a static-shape dispatcher
    at ``image_size``, its output names, and metadata (kind, detection decoding parameters)."""
    _check_task(model, task)
    m = prepare_copy(model, image_size, dispatcher, capacity_factor)
    spec = m.specialize(task).eval()
    kind = task_kind(model, task)
    meta: dict[str, Any] = {"kind": kind}
    if kind == "detection":
        head = spec.head
        meta.update(
            num_classes=head.num_classes,
            score_thresh=head.score_thresh,
            nms_thresh=head.nms_thresh,
            topk_candidates=head.topk_candidates,
            detections_per_img=head.detections_per_img,
            level_counts=head._level_counts(image_size, head._grid_from(image_size)),
        )
        return _DetectionDecoded(spec, image_size).eval(), ["boxes", "scores"], meta
    return spec, ["logits" if kind == "classification" else "out"], meta


def _routing_info(module: nn.Module, images: np.ndarray) -> dict[str, Any] | None:
    """Dispatcher, per-image capacity and the assignments it drops on ``images`` (None for a model without MoE)."""
    bb = next((m for m in module.modules() if hasattr(m, "moe_layers") and hasattr(m, "forward_features")), None)
    layers = [] if bb is None else [m for _, m in bb.moe_layers()]
    if not layers:
        return None
    with torch.no_grad():
        tokens, aux = bb.forward_features(torch.from_numpy(images), return_aux=True)
    n = tokens.shape[1]
    caps = {name: m.capacity_for(n) for name, m in bb.moe_layers()}
    kept = [a.keep for a in aux if a.keep is not None]
    total = sum(a.expert_index.numel() for a in aux)
    return dict(
        dispatcher=type(layers[0].dispatcher).__name__,
        capacity_factor=layers[0].capacity_factor,
        capacity_per_image=caps,
        tokens_per_image=n,
        dropped_fraction=sum(int((~k).sum()) for k in kept) / max(total, 1),
        images=len(images),
        note="dropless: the graph runs every reachable expert on every token"
        if not kept
        else "capacity-bounded (V-MoE inference): assignments past an expert's per-image capacity are dropped, "
        "exactly as the PyTorch model with the same capacity drops them",
    )


def _versions() -> dict[str, str]:
    import onnxruntime
    import onnxslim

    from .. import __version__

    return dict(
        vision_moe=__version__,
        torch=torch.__version__,
        onnx=onnx.__version__,
        onnxruntime=onnxruntime.__version__,
        onnxslim=onnxslim.__version__,
        python=platform.python_version(),
    )


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _torch_outputs(module: nn.Module, *inputs: torch.Tensor) -> list[np.ndarray]:
    with torch.no_grad():
        out = module(*inputs)
    out = out if isinstance(out, (tuple, list)) else (out,)
    return [o.detach().float().numpy() for o in out]


def _parity(
    session,
    module: nn.Module,
    images: np.ndarray,
    names: list[str],
    rtol: float,
    batch: int,
    extra: dict[str, np.ndarray] | None = None,
    torch_extra: tuple = (),
) -> dict[str, Any]:
    """ORT vs torch over ``images`` in chunks of ``batch``; worst case per output."""
    worst: dict[str, dict[str, float]] = {}
    for i in range(0, len(images) - batch + 1, batch):
        x = images[i : i + batch]
        feeds = {session.get_inputs()[0].name: x, **(extra or {})}
        got = session.run(None, feeds)
        ref = _torch_outputs(module, torch.from_numpy(x), *torch_extra)
        stats = compare_outputs(got, ref, names, rtol)
        for k, v in stats.items():
            if k not in worst or v["rel"] > worst[k]["rel"]:
                worst[k] = v
    return dict(rtol=rtol, images=len(images) - len(images) % batch, batch=batch, outputs=worst)


def _finish_graph(
    model_proto: onnx.ModelProto, path: Path, cfg: ExportConfig, symbols: Sequence[str] = ("batch",)
) -> tuple[onnx.ModelProto, dict]:
    raw_ops = len(model_proto.graph.node)
    slim = simplify_onnx(model_proto)  # its shape inference also resolves dims the exporter left symbolic
    check_static_graph(slim, symbols)
    onnx.save(slim, str(path))
    trt = {v: check_tensorrt_support(slim, v).as_dict() for v in cfg.trt_versions}
    info = dict(
        path=path.name,
        sha256=_sha256(path),
        bytes=path.stat().st_size,
        opset=file_opset(slim),
        exporter=cfg.exporter,
        nodes_before_slim=raw_ops,
        nodes=len(slim.graph.node),
        op_counts=op_counts(slim),
        io=graph_io(onnx.shape_inference.infer_shapes(slim)),
        tensorrt=trt,
    )
    return slim, info


def _variant_data(
    cfg: ExportConfig, tasks: list[str], hw: tuple[int, int], restoration: bool = False, multiple: int = 1
) -> dict[str, Any]:
    """Calibration images per task (INT8) and, without labelled data, the unlabelled images the variants are
    compared on; each with a description of where it came from. ``restoration``: the data's images keep their
    own size (a restoration graph takes any multiple of ``multiple``; the training images calibrate it)."""
    from ..engine.evaluator import task_dataset
    from .evaluate import calibration_images

    data: dict[str, Any] = {"calib": {}, "unreadable": []}
    size = None if restoration else hw
    if cfg.experiment is not None:
        for t in tasks:  # fail now, before any file, on a task the experiment's data does not label
            task_dataset(cfg.experiment, t, "val", img_size=size)
    if cfg.precision != "int8":
        return data
    if cfg.calib_data is not None or cfg.experiment is None:
        unreadable: list[str] = []
        calib = sample_images(cfg.calib_images, hw, cfg.mean, cfg.std, cfg.calib_data, skipped=unreadable)
        where = f"the folder {cfg.calib_data}" if cfg.calib_data else "scikit-image's bundled photographs"
        data["calib"] = {t: (calib, f"{len(calib)} images of {where}") for t in tasks}
        data["unreadable"] = unreadable
        if cfg.experiment is None:  # the images after the calibration ones (and the unreadable files among them)
            data["held"] = sample_images(
                cfg.eval_images, hw, cfg.mean, cfg.std, cfg.calib_data, cfg.calib_images + len(unreadable), unreadable
            )
            data["held_source"] = f"{where}, after the calibration ones"
        return data
    cache: dict[int, tuple[np.ndarray, str]] = {}
    for t in tasks:
        key = id(next(d for d in cfg.experiment.data.datasets if t in dataset_tasks(d, cfg.experiment.tasks)))
        if restoration:  # one restoration set holds every degradation: each calibrates on its own images,
            arr, src = calibration_images(cfg.experiment, t, cfg.calib_images, None)
            h, w = arr.shape[-2:]  # cropped to the graph's multiple (it takes no other size)
            data["calib"][t] = (np.ascontiguousarray(arr[..., : h - h % multiple, : w - w % multiple]), src)
            continue
        if key not in cache:
            cache[key] = calibration_images(cfg.experiment, t, cfg.calib_images, hw)
        data["calib"][t] = cache[key]
    return data


# ---------------------------------------------------------------------------------------------- entry point
def export_model(model: nn.Module, cfg: ExportConfig, model_info: dict[str, Any] | None = None) -> dict[str, Any]:
    """Export ``model`` (MultiTaskModel or MoEVisionTransformer) per ``cfg``; returns and writes the report.

    Everything that can be checked (config, tasks, sizes, calibration data) is checked before ``cfg.out_dir`` is
    created; a failed export removes the folders it created when they are still empty."""
    cfg.validate()
    model = model.eval()
    net = restoration_network(model, cfg.tasks)
    if net is not None:
        tasks, hw = _restoration_plan(net, cfg)
        n_par = max(cfg.parity_images, cfg.batch) // cfg.batch * cfg.batch
        images = sample_images(n_par, hw, cfg.mean, cfg.std)
        m = restoration_multiple(net)
        data = _variant_data(cfg, [t for t in tasks if t != AUTO] or list(net.tasks), hw, True, m)
        if AUTO in tasks and cfg.precision == "int8":  # the auto graph calibrates on every degradation's images
            data["calib"][AUTO] = _mixed_calibration(data["calib"], list(net.tasks), cfg.calib_images)

        def run(stage: Path) -> dict[str, Any]:
            return _export_restoration(net, cfg, model_info, tasks, hw, stage, images, data)

        return _staged(cfg, run)
    tasks = list(cfg.tasks or model.tasks)
    for t in tasks:
        _check_task(model, t)
    bb = _backbone(model)
    hw = tuple(cfg.img_size or bb.patch_embed.img_size)
    p = token_stride(bb.patch_embed)
    if hw[0] % p[0] or hw[1] % p[1]:
        raise ValueError(f"image size {hw} is not a multiple of the patch size {tuple(p)}")
    n_par = max(cfg.parity_images, cfg.batch) // cfg.batch * cfg.batch
    images = sample_images(n_par, hw, cfg.mean, cfg.std)
    data = _variant_data(cfg, tasks, hw)  # read before anything is written: unusable data leaves no folder behind
    if cfg.capacity_factor is not None and not _moe_layers(bb):
        raise ValueError(
            f"capacity_factor {cfg.capacity_factor:g}: this model has no MoE layers (an expert capacity does nothing)"
        )

    def run(stage: Path) -> dict[str, Any]:
        return _export(model, cfg, model_info, tasks, hw, stage, images, data)

    return _staged(cfg, run)


def _staged(cfg: ExportConfig, run) -> dict[str, Any]:
    """``run(stage)`` writes the export into a staging folder beside ``cfg.out_dir``, moved into place once it has
    succeeded; a failed export removes the folders it created when they are still empty."""
    out = Path(cfg.out_dir)
    new_dirs = [d for d in out.parents if not d.exists()]  # what a failed export removes again if empty
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        # everything is written to a sibling folder first and moved into place once the export has succeeded:
        # a failed or interrupted export leaves out_dir as it was (and no half-written file anywhere)
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    except OSError as e:
        raise ValueError(f"out_dir {str(out)!r}: cannot create the folder ({e.strerror or e})") from None
    try:
        report = run(stage)
        _publish(stage, out)
        return report
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        for d in new_dirs:
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()
        raise


def _moe_layers(backbone: nn.Module) -> list:
    return [m for _, m in backbone.moe_layers()] if hasattr(backbone, "moe_layers") else []


def _publish(stage: Path, out: Path) -> None:
    """Move the finished export ``stage`` to ``out``, replacing what ``out`` held (validated: empty, or
    ``overwrite``)."""
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
        os.replace(stage, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(stage, out)


def _report_header(cfg: ExportConfig, model_info: dict[str, Any] | None, shape: list, **input_info) -> dict[str, Any]:
    """The part of ``export_report.json`` every export writes first: the model, the export options, the graphs'
    input (``shape`` and ``input_info``: preprocessing and the like), versions and machine; ``tasks`` to fill."""
    return dict(
        model=model_info or {},
        config={k: v for k, v in asdict(cfg).items() if k not in ("out_dir", "experiment")},
        input=dict(
            name="images",
            shape=shape,
            dtype="float32",
            layout="NCHW",
            mean=list(cfg.mean),
            std=list(cfg.std),
            **input_info,
        ),
        versions=_versions(),
        machine=machine_info(),
        tasks={},
    )


def _int8_file(path: Path, task: str, cfg: ExportConfig, calib: np.ndarray) -> tuple[Path, dict[str, Any]]:
    """Quantise ``path`` for ``cfg.int8_runtime`` (calibrated on ``calib``) beside it; the file and its report
    entry (what it is, its saturation check, the TensorRT op check), without calibration source or evaluation."""
    from .quantize import quantize_int8

    trt = cfg.int8_runtime == "tensorrt"
    p8 = path.with_name(f"{task}.int8.onnx" if trt else f"{task}.int8.ort.onnx")
    saturation = quantize_int8(path, p8, calib, cfg.batch, runtime=cfg.int8_runtime)
    return p8, dict(
        path=p8.name,
        sha256=_sha256(p8),
        runtime=cfg.int8_runtime,
        format="QDQ, per-channel symmetric "
        + (
            "int8 weights, symmetric int8 activations"
            if trt
            else "7-bit weights (-64..64), asymmetric uint8 "
            "activations (ONNX Runtime on x86: saturation-free with and without VNNI)"
        ),
        saturation=saturation,
        tensorrt={v: check_tensorrt_support(onnx.load(str(p8)), v).as_dict() for v in cfg.trt_versions}
        if trt
        else "not for TensorRT (uint8 activations); export with int8_runtime='tensorrt' for TensorRT",
    )


def _engine_source(cfg: ExportConfig, path: Path, task: str) -> tuple[str, Path]:
    """The precision of a task's engine and the graph it is built from. The INT8 file for ONNX Runtime (uint8
    activations) is no TensorRT input: its engine is built with FP16 from the FP32 graph."""
    prec = "fp16" if cfg.precision == "int8" and cfg.int8_runtime != "tensorrt" else cfg.precision
    return prec, (path.with_name(f"{task}.int8.onnx") if prec == "int8" else path)


def _engine(cfg: ExportConfig, onnx_path: Path, engine_path: Path, precision: str, hw: tuple[int, int]) -> dict:
    """``build_engine.sh`` (the exact trtexec lines the device runs) for every export; with ``fmt="engine"`` the
    engine is also built here when TensorRT and a GPU are present."""
    from .tensorrt_build import build_or_script, write_build_script

    if cfg.fmt == "engine":
        return build_or_script(onnx_path, engine_path, precision, hw, cfg.batch, cfg.dynamic_batch)
    script = write_build_script(onnx_path, engine_path, precision, hw, cfg.batch, cfg.dynamic_batch)
    return dict(built=False, reason="format onnx: build on the device", precision=precision, script=script.name)


def _export(
    model: nn.Module,
    cfg: ExportConfig,
    model_info: dict[str, Any] | None,
    tasks: list[str],
    hw: tuple[int, int],
    out: Path,
    images: np.ndarray,
    data: dict[str, Any],
) -> dict[str, Any]:
    from .evaluate import compare_graphs
    from .quantize import convert_fp16

    report = _report_header(
        cfg,
        model_info,
        ["batch" if cfg.dynamic_batch else cfg.batch, 3, *hw],
        preprocess="fit inside (H, W) keeping aspect (bilinear), pad bottom/right with 0, (x/255 - mean) / std",
    )
    for task in tasks:
        t0 = time.perf_counter()
        module, names, meta = task_module(model, task, hw, cfg.dispatcher, cfg.capacity_factor)
        path = out / f"{task}.onnx"
        example = torch.from_numpy(images[: cfg.batch])
        proto = export_onnx(
            module,
            (example,),
            path,
            input_names=["images"],
            output_names=names,
            opset=cfg.opset,
            exporter=cfg.exporter,
            dynamic_batch=cfg.dynamic_batch,
        )
        proto, info = _finish_graph(proto, path, cfg)
        _stages.info(
            "%s: exported %s (%s, opset %d; %d nodes, %d before onnxslim) in %.1f s",
            task,
            path.name,
            _mib(path),
            info["opset"],
            info["nodes"],
            info["nodes_before_slim"],
            time.perf_counter() - t0,
        )
        sess = ort_session(proto)
        entry: dict[str, Any] = dict(meta, fp32=info)
        routing = _routing_info(module, images)
        if routing is not None:
            entry["routing"] = routing
        entry["fp32"]["parity"] = _parity(sess, module, images, names, FP32_RTOL, cfg.batch)
        worst = max(v["rel"] for v in entry["fp32"]["parity"]["outputs"].values())
        _stages.info("%s: ONNX Runtime = PyTorch to %.1e relative on %d images", task, worst, len(images))
        if cfg.dynamic_batch:  # a second batch size through the same graph
            b2 = 1 if cfg.batch > 1 else min(3, len(images))
            entry["fp32"]["parity_batch_" + str(b2)] = _parity(
                sess, module, images[: b2 * (len(images) // b2)], names, FP32_RTOL, b2
            )
        if cfg.precision == "fp16":
            p16 = out / f"{task}.fp16.onnx"
            t1 = time.perf_counter()
            convert_fp16(path, p16)
            entry["fp16"] = dict(
                path=p16.name,
                sha256=_sha256(p16),
                note="FP16 weights and activations, fp32 I/O: "
                "for strongly-typed TensorRT (TensorRT 11); TensorRT 10 builds the fp32 graph with "
                "the FP16 builder flag instead",
                parity=_parity(ort_session(p16), module, images, names, FP16_RTOL, cfg.batch),
                **(
                    {
                        "evaluation": compare_graphs(
                            path, p16, task, meta, "onnxruntime", cfg.experiment, None, cfg.eval_images
                        )
                    }
                    if cfg.experiment is not None
                    else {}
                ),
                tensorrt={v: check_tensorrt_support(onnx.load(str(p16)), v).as_dict() for v in cfg.trt_versions},
            )
            _stages.info("%s: FP16 %s (%s) checked in %.1f s", task, p16.name, _mib(p16), time.perf_counter() - t1)
        if cfg.precision == "int8":
            trt = cfg.int8_runtime == "tensorrt"
            calib, calib_source = data["calib"][task]
            t1 = time.perf_counter()
            p8, int8_file = _int8_file(path, task, cfg, calib)
            _stages.info(
                "%s: INT8 %s (%s) calibrated on %s in %.1f s; evaluating",
                task,
                p8.name,
                _mib(p8),
                calib_source,
                time.perf_counter() - t1,
            )
            entry["int8"] = dict(
                int8_file,
                calibration=dict(
                    source=calib_source,
                    images=len(calib),
                    # files of --calib-data that could not be decoded: skipped, the next readable ones used
                    unreadable_images=len(data["unreadable"]),
                    unreadable_examples=data["unreadable"][:5],
                ),
                evaluation=compare_graphs(
                    path,
                    p8,
                    task,
                    meta,
                    "reference" if trt else "onnxruntime",
                    cfg.experiment,
                    data.get("held"),
                    cfg.eval_images,
                    data.get("held_source", ""),
                ),
            )
        prec, src = _engine_source(cfg, path, task)
        entry["engine"] = _engine(cfg, src, out / f"{task}.{prec}.engine", prec, hw)
        report["tasks"][task] = entry
        if "int8" in entry:
            ev = entry["int8"]["evaluation"]
            _stages.info(
                "%s: INT8 %s: drop %.2f (%d images)", task, ev["metric"].split(" (")[0], ev["drop"], ev["images"]
            )
    if cfg.multitask:
        report["multitask"] = _export_multitask(model, tasks, images, out, cfg)
        prec = MULTITASK_ENGINE_PRECISION[cfg.precision]
        report["multitask"]["engine"] = _engine(cfg, out / "multitask.onnx", out / f"multitask.{prec}.engine", prec, hw)
    (out / "export_report.json").write_text(json.dumps(report, indent=1, default=str))
    return report


def _export_multitask(
    model: nn.Module, tasks: list[str], images: np.ndarray, out: Path, cfg: ExportConfig
) -> dict[str, Any]:
    """One graph, task as an int64 input; verified against torch and against every per-task graph."""
    hw = tuple(images.shape[-2:])
    m = prepare_copy(model, hw, cfg.dispatcher, cfg.capacity_factor)
    mt = TaskIndexedModel(m, tuple(tasks), image_size=hw).eval()
    path = out / "multitask.onnx"
    x = torch.from_numpy(images[: cfg.batch])
    t0 = torch.zeros(1, dtype=torch.int64)
    groups = mt.output_groups(x)
    names = list(groups)  # ordered as forward returns them: rank-2 'logits' before rank-4 'out'
    proto = export_onnx(
        mt,
        (x, t0),
        path,
        input_names=["images", "task"],
        output_names=names,
        opset=cfg.opset,
        exporter=cfg.exporter,
        dynamic_batch=cfg.dynamic_batch,
    )
    proto, info = _finish_graph(proto, path, cfg)
    _stages.info("multitask: exported %s (%s, %d nodes); checking every task", path.name, _mib(path), info["nodes"])
    sess = ort_session(proto)
    has_task = "task" in {i.name for i in sess.get_inputs()}
    if not has_task:  # nothing depends on the task (dense twin with one shared head): the exporter drops the input
        info["note"] = "the graph does not depend on the task; the exporter removed the unused task input"
    info["tasks"] = {t: i for i, t in enumerate(tasks)}
    info["engine_precision"] = dict(MULTITASK_ENGINE_PRECISION)
    # task -> its output name (detection: ["boxes", "scores"], its K real classes on the last axis of scores)
    task_output: dict[str, Any] = {}
    for name, idx in groups.items():
        for i in idx:
            task_output[tasks[i]] = ["boxes", "scores"] if name in ("boxes", "scores") else name
    info["task_output"] = task_output
    info["out_channels"] = dict(zip(tasks, mt.out_channels(x)))
    info["parity"], info["vs_per_task_graph"] = {}, {}
    for i, t in enumerate(tasks):
        ti = np.array([i], dtype=np.int64)
        feed = {"task": ti} if has_task else {}
        info["parity"][t] = _parity(
            sess, mt, images, names, FP32_RTOL, cfg.batch, extra=feed, torch_extra=(torch.from_numpy(ti),)
        )
        per_task = ort_session(out / f"{t}.onnx")
        c = info["out_channels"][t]
        mine = task_output[t] if isinstance(task_output[t], list) else [task_output[t]]
        worst = 0.0
        for j in range(0, len(images) - cfg.batch + 1, cfg.batch):
            xb = images[j : j + cfg.batch]
            got = sess.run(None, {"images": xb, **feed})
            a = [got[names.index(n)] for n in mine]
            a = [o[..., :c] if n == "scores" else o if n == "boxes" else o[:, :c] for n, o in zip(mine, a)]
            b = per_task.run(None, {"images": xb})
            st = compare_outputs(a, b, mine, FP32_RTOL, f"multitask[{t}] vs {t}.onnx")
            worst = max([worst] + [v["rel"] for v in st.values()])
        info["vs_per_task_graph"][t] = dict(rel=worst, rtol=FP32_RTOL)
    return info


# ---------------------------------------------------------------------------------------------- restoration
AUTO = "auto"  # the graph of a classifier-routed restoration model that picks its experts itself


def restoration_network(model: nn.Module, tasks: Sequence[str] | None = None) -> nn.Module | None:
    """The image-to-image network of a restoration model (a ``RestorationModel``'s ``net``, or a restoration
    network itself); of a multi-task model with degradation tasks, when the ``tasks`` to export are degradations
    (or 'auto'), the network they make (``MultiTaskModel.restoration_network``); None for any other model."""
    from ..tasks import is_restoration

    degradations = list(getattr(model, "degradations", ()) or ())
    if degradations:
        wanted = list(tasks or model.tasks)
        restored = [t for t in wanted if t in degradations or t == AUTO]
        if restored and len(restored) != len(wanted):
            other = [t for t in wanted if t not in restored]
            raise ValueError(
                f"tasks {other} and the degradation tasks {restored} export apart (a restoration graph takes any "
                f"image size, the others a fixed one): run once with --task for each of {other}, once for "
                f"{restored}"
            )
        return model.restoration_network() if restored else None
    net = getattr(model, "net", model)
    tasks = list(getattr(net, "tasks", ()) or ())
    return net if tasks and all(is_restoration(t) for t in tasks) else None


def restoration_multiple(net: nn.Module) -> int:
    """The multiple a restoration network's input height and width are padded to (its graph's runtime contract)."""
    return int(getattr(net, "multiple", None) or net.patch_size)


def _restoration_plan(net: nn.Module, cfg: ExportConfig) -> tuple[list[str], tuple[int, int]]:
    """The graphs to write (one per degradation, plus ``auto`` for a classifier-routed network) and the example
    size (a multiple of the network's), checked before anything is written."""
    routed = bool(getattr(net, "classifier_routed", False))
    known = [*net.tasks, *([AUTO] if routed else [])]
    tasks = list(cfg.tasks or known)
    for t in tasks:
        if t not in known:
            raise ValueError(f"unknown task {t!r}; this restoration model exports {known}")
    if cfg.multitask:
        raise ValueError("a restoration model has no multi-task graph; its 'auto' graph routes by its classifier")
    if cfg.dynamic_batch:
        raise ValueError("a restoration graph has a static batch and a dynamic height and width (--batch N)")
    if cfg.exporter != "torchscript":
        raise ValueError(f"exporter {cfg.exporter!r}: restoration graphs (dynamic height and width) use torchscript")
    m = restoration_multiple(net)
    hw = tuple(cfg.img_size or net.pretrained_cfg["input_size"][1:])
    if hw[0] % m or hw[1] % m:
        raise ValueError(
            f"image size {hw}: a restoration graph is exported at a multiple of its {m} (the runtime pads)"
        )
    return tasks, hw


def _mixed_calibration(calib: dict[str, tuple[np.ndarray, str]], tasks: list[str], n: int) -> tuple[np.ndarray, str]:
    """Calibration images of the auto graph: the degradations' own, taken in turn."""
    per = [calib[t][0] for t in tasks if t in calib]
    h, w = min(p.shape[-2] for p in per), min(p.shape[-1] for p in per)  # each a multiple of the graph's
    per = [p[..., :h, :w] for p in per]
    mixed = np.concatenate([p[i : i + 1] for i in range(max(len(p) for p in per)) for p in per if i < len(p)])[:n]
    return np.ascontiguousarray(mixed), f"{len(mixed)} training images, the degradations {tasks} in turn"


class _Restorer(nn.Module):
    """A restoration network's graph: images (B, 3, H, W) in [-1, 1], H and W multiples of the network's (the
    runtime pads by reflection and crops back) -> restored (B, 3, H, W) in [0, 1], routed by ``route``."""

    def __init__(self, net: nn.Module, route: str | None) -> None:
        super().__init__()
        self.net, self.route = net, route

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images) if self.route is None else self.net(images, self.route)


def restoration_module(net: nn.Module, task: str) -> nn.Module:
    """The exportable graph of ``task``: ``net.specialize(task)`` (a degradation), or for ``auto`` the whole
    classifier-routed network with every expert run on every image and the classifier's top-k weights as masks
    (static shapes: no NonZero, If or data-dependent sizes); dense dispatch in both."""
    m = copy.deepcopy(net).eval()
    if hasattr(m, "set_dispatcher") and m.moe_layers():
        m.set_dispatcher("dense")
    if task == AUTO:
        return _Restorer(m, AUTO).eval()
    return _Restorer(m.specialize(task).eval(), None).eval()


def _contract_parity(session, module: nn.Module, net: nn.Module, route, sizes, rtol: float, batch: int) -> dict:
    """ONNX Runtime through the runtime contract (pad, run, crop) against the PyTorch network on the same images,
    at each of ``sizes`` (odd and non-square ones included); worst case per size."""
    m = restoration_multiple(net)
    out: dict[str, Any] = {}
    for hw in sizes:
        x = sample_images(batch, hw, (0.5,) * 3, (0.5,) * 3)
        padded, (h, w) = pad_reflect(x, m)
        got = session.run(None, {session.get_inputs()[0].name: padded})[0][..., :h, :w]
        with torch.no_grad():
            xt = torch.from_numpy(x)
            ref = (net(xt) if route is None else net(xt, route)).numpy()
        out[f"{hw[0]}x{hw[1]}"] = compare_outputs([got], [ref], ["out"], rtol)["out"]
    return dict(rtol=rtol, batch=batch, sizes=out)


def _export_restoration(
    net: nn.Module,
    cfg: ExportConfig,
    model_info: dict[str, Any] | None,
    tasks: list[str],
    hw: tuple[int, int],
    out: Path,
    images: np.ndarray,
    data: dict[str, Any],
) -> dict[str, Any]:
    """Per graph (a degradation's specialised network, or ``auto``): ONNX of dynamic height and width, onnxslim,
    the TensorRT op check, parity with PyTorch (at the export size and, through the runtime's padding, at odd and
    non-square sizes), and the FP16 / INT8 variant with its PSNR drop on the held-out images (the evaluator)."""
    from .evaluate import compare_graphs
    from .quantize import convert_fp16

    m = restoration_multiple(net)
    lo, hi = (m, m), (max(hw[0], 4 * m, 1024), max(hw[1], 4 * m, 1024))
    report = _report_header(
        cfg,
        model_info,
        [cfg.batch, 3, "height", "width"],
        multiple=m,
        preprocess=f"RGB (x/255 - mean) / std; pad bottom/right by reflection to multiples of {m} (the graph "
        "takes only such sizes); crop the output back to the image's size",
        output="restored image (B, 3, H, W) in [0, 1]",
    )
    odd = [(hw[0] + m + 3, hw[1] - m + 5), (hw[0] - 1, hw[1] + 2 * m + 1)]  # odd and non-square, through padding
    for task in tasks:
        t0 = time.perf_counter()
        module = restoration_module(net, task)
        route = AUTO if task == AUTO else None
        path = out / f"{task}.onnx"
        proto = export_onnx(
            module,
            (torch.from_numpy(images[: cfg.batch]),),
            path,
            input_names=["images"],
            output_names=["out"],
            opset=cfg.opset,
            exporter=cfg.exporter,
            dynamic_hw=True,
        )
        _pin_batch(proto, cfg.batch)
        proto, info = _finish_graph(proto, path, cfg, ("height", "width"))
        _stages.info(
            "%s: exported %s (%s, %d nodes) in %.1f s",
            task,
            path.name,
            _mib(path),
            info["nodes"],
            time.perf_counter() - t0,
        )
        meta = dict(kind="restoration", multiple=m, tasks=list(net.tasks) if task == AUTO else [task])
        entry: dict[str, Any] = dict(meta, fp32=info)
        sess = ort_session(proto)
        entry["fp32"]["parity"] = _parity(sess, module, images, ["out"], FP32_RTOL, cfg.batch)
        entry["fp32"]["parity_any_size"] = _contract_parity(
            sess, module, net.specialize(task) if task != AUTO else net, route, odd, FP32_RTOL, cfg.batch
        )
        _stages.info("%s: ONNX Runtime = PyTorch to 1e-4 relative at %s and %s", task, hw, odd)
        variants = []
        if cfg.precision == "fp16":
            p16 = out / f"{task}.fp16.onnx"
            convert_fp16(path, p16)
            entry["fp16"] = dict(
                path=p16.name,
                sha256=_sha256(p16),
                parity=_parity(ort_session(p16), module, images, ["out"], FP16_RTOL, cfg.batch),
                tensorrt={v: check_tensorrt_support(onnx.load(str(p16)), v).as_dict() for v in cfg.trt_versions},
            )
            variants.append(("fp16", p16, "onnxruntime"))
        if cfg.precision == "int8":
            calib, calib_source = data["calib"][task]
            p8, int8_file = _int8_file(path, task, cfg, calib)
            entry["int8"] = dict(int8_file, calibration=dict(source=calib_source, images=len(calib)))
            variants.append(("int8", p8, "reference" if cfg.int8_runtime == "tensorrt" else "onnxruntime"))
        for prec, vpath, runtime in variants:
            if cfg.experiment is not None or data.get("held") is not None:
                entry[prec]["evaluation"] = {
                    t: compare_graphs(
                        path,
                        vpath,
                        t,
                        meta,
                        runtime,
                        cfg.experiment,
                        data.get("held"),
                        cfg.eval_images,
                        data.get("held_source", ""),
                    )
                    for t in meta["tasks"]
                }
                drops = [e["drop"] for e in entry[prec]["evaluation"].values()]
                entry[prec]["drop"] = float(np.mean(drops))
                _stages.info(
                    "%s: %s drop %.3f (%s)",
                    task,
                    prec.upper(),
                    entry[prec]["drop"],
                    next(iter(entry[prec]["evaluation"].values()))["metric"],
                )
        prec, src = _engine_source(cfg, path, task)
        entry["engine"] = _restoration_engine(cfg, src, out / f"{task}.{prec}.engine", prec, hw, (lo, hi))
        report["tasks"][task] = entry
    (out / "export_report.json").write_text(json.dumps(report, indent=1, default=str))
    return report


def _pin_batch(proto: onnx.ModelProto, batch: int) -> None:
    """The graph's static batch written on its outputs: the exporter leaves an output's first dimension symbolic
    where the network reshapes by its input's traced batch size (MoFME's tokens back to pixels)."""
    for vi in proto.graph.output:
        dim = vi.type.tensor_type.shape.dim[0]
        if not dim.HasField("dim_value"):
            dim.dim_value = batch


def _restoration_engine(cfg: ExportConfig, onnx_path: Path, engine_path: Path, precision: str, hw, hw_range) -> dict:
    """``build_engine.sh`` lines for a graph of dynamic height and width (optimised for ``hw``)."""
    from .tensorrt_build import write_build_script

    script = write_build_script(onnx_path, engine_path, precision, hw, cfg.batch, False, hw_range=hw_range)
    return dict(
        built=False,
        reason="built on the device (build_engine.sh)",
        precision=precision,
        script=script.name,
        # the optimisation profile export/build_engine.py gives the engine: smallest, optimised-for, largest (H, W)
        profile=[list(hw_range[0]), list(hw), list(hw_range[1])],
    )
