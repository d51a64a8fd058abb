"""How good an exported graph is: its task metric on labelled held-out data, through the datasets, evaluator and
metrics ``tools/eval.py`` uses (an ONNX Runtime session behind the evaluator's model interface); or, where no
labelled data is given, its agreement with the FP32 graph on unlabelled images (said as such)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import dataset_tasks
from ..tasks import get_task

__all__ = ["OrtTaskModel", "compare_graphs", "calibration_images", "session_for", "RUNTIME_NOTE"]

_logger = logging.getLogger(__name__)

RUNTIME_NOTE = {
    "onnxruntime": "ONNX Runtime {ort} CPU with its integer kernels on this CPU ({kernels})",
    "reference": "estimate: ONNX Runtime {ort} with graph optimisations off (QDQ arithmetic in float, no integer "
    "kernels: what TensorRT's 32-bit integer accumulation computes, up to float rounding); not measured on TensorRT",
}


def session_for(path: str | Path, runtime: str):
    """The session that measures ``path``: ``"onnxruntime"`` as a user's ONNX Runtime runs it, ``"reference"``
    with the QDQ arithmetic emulated (see :func:`.quantize.qdq_reference_session`)."""
    from .onnx_export import ort_session
    from .quantize import qdq_reference_session

    return qdq_reference_session(path) if runtime == "reference" else ort_session(path)


def runtime_note(runtime: str) -> str:
    import onnxruntime

    from ..machine import int8_kernels

    return RUNTIME_NOTE[runtime].format(ort=onnxruntime.__version__, kernels=int8_kernels()["path"])


class OrtTaskModel:
    """An exported task graph with the evaluation interface of :class:`~vision_moe.models.MultiTaskModel`:
    ``model(images, task)`` returns ``{"out": ...}`` (classification logits, dense maps) or, for detection,
    ``{"detections": [...]}`` after the same host-side NMS the Jetson kit runs. Images must have the graph's
    (H, W); a static batch is filled by repeating the last image and the extra outputs are dropped."""

    training = False

    def __init__(self, session, task: str, meta: dict[str, Any]) -> None:
        self.session, self.task, self.meta = session, task, meta
        shape = session.get_inputs()[0].shape  # [batch|'batch', 3, H|'height', W|'width']
        self.batch = shape[0] if isinstance(shape[0], int) else None
        # a restoration graph takes any multiple of meta["multiple"]: images are padded to it and cropped back
        self.multiple = meta.get("multiple") if meta.get("kind") == "restoration" else None
        self.hw = None if self.multiple else (int(shape[2]), int(shape[3]))

    def eval(self) -> OrtTaskModel:
        return self

    def train(self, mode: bool = True) -> OrtTaskModel:
        return self

    def run(self, images: np.ndarray) -> list[np.ndarray]:
        """Raw graph outputs for (N, 3, H, W) float32 images, chunked to the graph's batch."""
        if self.multiple:
            from .prepost import pad_reflect

            padded, (h, w) = pad_reflect(images, self.multiple)
            return [o[..., :h, :w] for o in self._run(padded)]
        if tuple(images.shape[-2:]) != self.hw:
            raise ValueError(f"images of size {tuple(images.shape[-2:])}; the graph takes {self.hw}")
        return self._run(images)

    def _run(self, images: np.ndarray) -> list[np.ndarray]:
        b = self.batch or len(images)
        outs = []
        for i in range(0, len(images), b):
            x = images[i : i + b]
            n = len(x)
            if n < b:
                x = np.concatenate([x, np.repeat(x[-1:], b - n, axis=0)])
            outs.append([o[:n] for o in self.session.run(None, {"images": np.ascontiguousarray(x)})])
        return [np.concatenate([o[j] for o in outs]) for j in range(len(outs[0]))]

    def __call__(self, images: torch.Tensor, task: str) -> dict[str, Any]:
        if task != self.task and task not in self.meta.get("tasks", ()):  # an auto graph serves every degradation
            raise ValueError(f"this graph is task {self.task!r}, asked for {task!r}")
        outs = self.run(images.detach().cpu().float().numpy())
        if self.meta["kind"] != "detection":
            return {"out": torch.from_numpy(outs[0])}
        from .prepost import detection_postprocess

        m = self.meta
        dets = detection_postprocess(
            outs[0],
            outs[1],
            m["level_counts"],
            m["score_thresh"],
            m["nms_thresh"],
            m["topk_candidates"],
            m["detections_per_img"],
        )
        return {"detections": [{k: torch.from_numpy(v) for k, v in d.items()} for d in dets]}


def calibration_images(experiment: Any, task: str, n: int, hw: tuple[int, int]) -> tuple[np.ndarray, str]:
    """The first ``n`` images of the training split of the dataset that labels ``task`` in ``experiment``,
    preprocessed as for evaluation (no augmentation), and a description of where they came from."""
    from ..engine.evaluator import heldout_loader, task_dataset

    ds = task_dataset(experiment, task, "train", img_size=hw)  # hw None: the images at their own size
    images = []
    for x, _ in heldout_loader(experiment, ds, limit=n, workers=0):
        images.append(x.numpy())
    if not images:
        raise ValueError(f"no readable image in the training split of the dataset labelling {task!r}")
    if hw is None:  # images at their own sizes (a restoration set): the top-left crop all of them have
        h, w = min(x.shape[-2] for x in images), min(x.shape[-1] for x in images)
        images = [x[..., :h, :w] for x in images]
    arr = np.ascontiguousarray(np.concatenate(images), dtype=np.float32)
    return arr, f"{len(arr)} images of the training split of {_describe(experiment, task)}"


def _describe(experiment: Any, task: str) -> str:
    for d in experiment.data.datasets:
        if task in dataset_tasks(d, experiment.tasks):
            return f"the {d.format} dataset at {d.root}"
    return "the config's data"


def _points(task: str, metrics: dict[str, float]) -> tuple[str, float]:
    spec = get_task(task)
    v = float(metrics[spec.primary])
    if spec.kind == "restoration":  # PSNR in dB, not a fraction
        return spec.primary, v
    return spec.primary, (100.0 * v if spec.higher_is_better else v)


def compare_graphs(
    ref_path: Path,
    cand_path: Path,
    task: str,
    meta: dict[str, Any],
    runtime: str,
    experiment: Any | None = None,
    images: np.ndarray | None = None,
    limit: int = 16,
    image_source: str = "",
) -> dict[str, Any]:
    """The FP32 graph ``ref_path`` against a variant ``cand_path`` (INT8, FP16) of the same task.

    With ``experiment`` (a training config: the checkpoint's own, or ``--data``): the task's metric on the first
    ``limit`` images of its held-out split with the labels, computed by :func:`~vision_moe.engine.evaluate_task`
    for both graphs, and the drop (points for metrics in [0, 1] where higher is better; the metric's own unit,
    positive = worse, otherwise). Without: agreement with the FP32 graph on ``images`` (FP32 = 100), which says
    how far the variant moves the outputs, not how accurate either is.

    ``runtime`` says how ``cand_path`` is run (:func:`session_for`); the FP32 graph runs in plain ONNX Runtime."""
    ref = OrtTaskModel(session_for(ref_path, "onnxruntime"), task, meta)
    cand = OrtTaskModel(session_for(cand_path, runtime), task, meta)
    out: dict[str, Any] = dict(measured_with=runtime_note(runtime))
    if experiment is not None:
        from ..engine.evaluator import evaluate_task, heldout_loader, task_dataset

        ds = task_dataset(experiment, task, "val", img_size=ref.hw)  # None: a restoration set at its own sizes
        loader = heldout_loader(experiment, ds, limit=limit, workers=0)
        classes = _num_classes(ref, meta)
        m_ref = evaluate_task(ref, task, loader, ds, classes, torch.device("cpu"))
        m_cand = evaluate_task(cand, task, loader, ds, classes, torch.device("cpu"))
        name, f = _points(task, m_ref)
        _, q = _points(task, m_cand)
        spec = get_task(task)
        seen = min(limit, len(ds)) if limit else len(ds)
        out.update(
            metric=f"{name} (labels: {seen - int(m_ref.get('skipped_images', 0))} held-out images of "
            f"{_describe(experiment, task)})",
            labelled=True,
            images=seen - int(m_ref.get("skipped_images", 0)),
            fp32=f,
            quantized=q,
            drop=(f - q) if spec.higher_is_better else (q - f),
            fp32_metrics=m_ref,
            variant_metrics=m_cand,
        )
        return out
    if images is None:
        raise ValueError("compare_graphs needs labelled data (experiment) or images")
    r, g = ref.run(images), cand.run(images)
    kind = meta["kind"]
    if kind == "classification":
        score, name = 100.0 * float(np.mean(g[0].argmax(-1) == r[0].argmax(-1))), "top-1 agreement with FP32"
    elif kind == "dense" and r[0].shape[1] > 1:
        score, name = 100.0 * float(np.mean(g[0].argmax(1) == r[0].argmax(1))), "per-pixel argmax agreement with FP32"
    else:
        i = 1 if kind == "detection" else 0
        err = float(np.mean(np.abs(g[i] - r[i])) / max(float(np.mean(np.abs(r[i]))), 1e-12))
        score, name = 100.0 * (1.0 - err), "100 x (1 - relative L1 error) vs FP32"
    out.update(
        metric=f"{name} (no labels: {len(images)} images, {image_source or 'unlabelled'}; not an accuracy)",
        labelled=False,
        images=len(images),
        fp32=100.0,
        quantized=score,
        drop=100.0 - score,
    )
    return out


def _num_classes(model: OrtTaskModel, meta: dict[str, Any]) -> int | None:
    if meta["kind"] == "detection":
        return meta.get("num_classes")
    return int(model.session.get_outputs()[0].shape[1])
