"""INT8 (ONNX Runtime static quantisation, QDQ) and FP16 variants of an exported graph, and their metric drop.

QDQ with symmetric int8 (zero points 0, per-channel weights) is what TensorRT 10 and 11 consume as explicit
quantisation, so no TensorRT calibration cache is involved. ONNX Runtime runs that file on a CPU too, but its fast
x86 integer kernels want uint8 activations: ``runtime="onnxruntime"`` writes that variant.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from .onnx_export import ort_session

__all__ = ["quantize_int8", "convert_fp16", "evaluate_drop", "heldout_images", "INT8_RUNTIMES"]

_logger = logging.getLogger(__name__)


class _Reader:
    """onnxruntime.quantization.CalibrationDataReader over a preprocessed (N, 3, H, W) array, ``batch`` at a time."""

    def __init__(self, images: np.ndarray, batch: int) -> None:
        self.chunks = [images[i : i + batch] for i in range(0, len(images) - batch + 1, batch)]
        self.i = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.i >= len(self.chunks):
            return None
        self.i += 1
        return {"images": self.chunks[self.i - 1]}

    def rewind(self) -> None:
        self.i = 0


INT8_RUNTIMES = ("tensorrt", "onnxruntime")


def quantize_int8(
    src: str | Path,
    dst: str | Path,
    calib_images: np.ndarray,
    batch: int = 1,
    op_types: Sequence[str] = ("MatMul", "Gemm", "Conv", "ConvTranspose"),
    runtime: str = "tensorrt",
) -> Path:
    """Static INT8 quantisation with ONNX Runtime's quantiser: QDQ, per-channel symmetric int8 weights, MinMax
    calibration on ``calib_images``. ``runtime`` picks the activation type:

    - ``"tensorrt"``: symmetric int8 activations (zero point 0), the only kind TensorRT's explicit quantisation
      takes; ONNX Runtime's CPU kernels have no fast signed x signed path on x86, so on a CPU this file is slow.
    - ``"onnxruntime"``: asymmetric uint8 activations x int8 weights, the pair ONNX Runtime's x86 integer GEMMs
      (AVX2 / AVX-512 VNNI) are built for. Not for TensorRT.

    Left in float in both: the routers (expert choices as in fp32 and as in training, like the FP16 variant),
    MatMuls of two activations (attention's QK^T and AV: quantising them makes ONNX Runtime fuse the softmax
    between them into a QLinearSoftmax that cost more than the int8 GEMMs saved), and the experts' stacked
    (E, in, out) weights (:func:`stacked_weight_nodes`). The graph is not re-optimised before quantising: ONNX
    Runtime's MatMul+Add fusion would turn the experts' second GEMM, whose bias is an activation (the gate-weighted
    sum of the expert biases), into a Gemm no integer kernel takes, which then ran in float on dequantised inputs.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if runtime not in INT8_RUNTIMES:
        raise ValueError(f"unknown INT8 runtime {runtime!r}; expected one of {list(INT8_RUNTIMES)}")
    src, dst = Path(src), Path(dst)
    pre = dst.with_suffix(".pre.onnx")
    quant_pre_process(str(src), str(pre), skip_optimization=True, skip_onnx_shape=False, skip_symbolic_shape=True)
    try:
        graph = onnx.load(str(pre))
        stacked = stacked_weight_nodes(graph)
        excluded = sorted({*stacked, *activation_matmul_nodes(graph), *router_nodes(graph)})
        trt = runtime == "tensorrt"
        quantize_static(
            str(pre),
            str(dst),
            _Reader(calib_images, batch),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QInt8 if trt else QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=list(op_types),
            nodes_to_exclude=excluded,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"ActivationSymmetric": trt, "WeightSymmetric": True},
        )
    finally:
        pre.unlink(missing_ok=True)
    q = onnx.load(str(dst))
    onnx.checker.check_model(q, full_check=True)
    if stacked:
        _logger.info("%s: %d MatMuls on stacked (E, in, out) expert weights left in float", dst.name, len(stacked))
    return dst


def stacked_weight_nodes(model: onnx.ModelProto) -> list[str]:
    """MatMul nodes whose weight is a stacked (E, in, out) initializer (the experts' batched GEMMs).

    Per-channel QDQ on a 3-D MatMul weight gives a zero point ONNX Runtime's QLinearMatMul rejects (it needs a
    scalar or (..., 1, N) zero point), and per-tensor would share one scale across all experts, so these stay in
    float; the attention projections, dense MLP, patch-embedding and head GEMMs are quantised.
    """
    ranks = {i.name: len(i.dims) for i in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and any(ranks.get(x, 0) >= 3 for x in n.input)]


def activation_matmul_nodes(model: onnx.ModelProto) -> list[str]:
    """MatMul nodes with no initializer input: products of two activations (attention's QK^T and AV)."""
    inits = {i.name for i in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and not any(x in inits for x in n.input)]


def router_nodes(model: onnx.ModelProto) -> list[str]:
    """The routers' nodes (exported under a ``/router/`` scope)."""
    return [n.name for n in model.graph.node if "/router/" in n.name]


def convert_fp16(src: str | Path, dst: str | Path) -> Path:
    """FP16 weights and compute with fp32 inputs/outputs; the routers (gate GEMM, softmax, top-k) stay fp32, as
    in training (routers run with autocast off), so expert choices match the fp32 model's."""
    import onnxslim
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    router_nodes = [n.name for n in model.graph.node if "/router/" in n.name or n.op_type == "TopK"]
    m = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=False, node_block_list=router_nodes)
    m = onnxslim.slim(m)  # the converter appends its Casts at the end: re-sort (and fold Cast pairs)
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, str(dst))
    return Path(dst)


def _is_builtin(root: str | Path | None) -> bool:
    return root is not None and (Path(root) / "manifest.json").is_file() and (Path(root) / "val").is_dir()


def heldout_images(
    calib_data: str | Path | None, task: str, n: int, hw: tuple[int, int], mean, std, offset: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """Held-out images (and class labels when the data has them): a built-in dataset's ``val`` split, else the
    images after the calibration ones."""
    from .prepost import preprocess, sample_images

    if _is_builtin(calib_data) and task == "classification":
        from ..data.builtin import BuiltinDataset

        ds = BuiltinDataset(calib_data, split="val", tasks=["classification"])
        raws = [ds.load_raw(i) for i in range(min(n, len(ds)))]
        return preprocess([r["image"] for r in raws], hw, mean, std), np.array([r["class_label"] for r in raws])
    return sample_images(n, hw, mean, std, calib_data, offset=offset), None


def _builtin_val(calib_data: str | Path | None, task: str, n: int, hw: tuple[int, int]):
    """The built-in dataset's ``val`` split for ``task`` ('semseg' or 'detection') when its images are already
    ``hw`` (labels then need no resizing): (dataset, raw samples), else None."""
    if not _is_builtin(calib_data) or task not in ("semseg", "detection"):
        return None
    from ..data.builtin import BuiltinDataset

    ds = BuiltinDataset(calib_data, split="val", tasks=[task])
    raws = [ds.load_raw(i) for i in range(min(n, len(ds)))]
    if not raws or any(tuple(r["image"].shape[:2]) != tuple(hw) for r in raws):
        return None
    return ds, raws


def _run(path: Path, images: np.ndarray, batch: int) -> list[np.ndarray]:
    sess = ort_session(path)
    outs = [sess.run(None, {"images": images[i : i + batch]}) for i in range(0, len(images) - batch + 1, batch)]
    return [np.concatenate([o[j] for o in outs]) for j in range(len(outs[0]))]


def evaluate_drop(
    fp32_path: Path,
    q_path: Path,
    images: np.ndarray,
    meta: dict[str, Any],
    batch: int,
    calib_data: str | None,
    task: str,
    hw,
    mean,
    std,
) -> dict[str, Any]:
    """The task metric of the fp32 and quantised graphs on held-out images, and the drop (points).

    On a built-in dataset (its held-out ``val`` split, images already at the export size) the metric is the task's
    own against the labels: classification top-1, semseg mIoU, detection COCO AP50 (host-side NMS as on the
    device). Otherwise agreement with fp32 (fp32 = 100): classification top-1 agreement; dense per-pixel argmax
    agreement (multi-channel) or 100 * (1 - relative L1 error); detection 100 * (1 - relative L1 error) of the
    decoded scores.
    """
    from .prepost import preprocess

    labels = None
    if _is_builtin(calib_data) and meta["kind"] == "classification":
        images, labels = heldout_images(calib_data, task, len(images), hw, mean, std, 0)
    val = _builtin_val(calib_data, task, len(images), hw) if meta["kind"] != "classification" else None
    if val is not None:
        images = preprocess([r["image"] for r in val[1]], hw, mean, std)
    n = len(images) - len(images) % batch
    images = images[:n]
    ref, got = _run(fp32_path, images, batch), _run(q_path, images, batch)
    kind = meta["kind"]
    if val is not None and kind == "dense":  # semseg mIoU against the held-out masks
        from ..metrics.dense import SegmentationMetric

        def miou(out: np.ndarray) -> float:
            m = SegmentationMetric(out.shape[1])
            m.update(torch.from_numpy(out.argmax(1)), torch.from_numpy(np.stack([r["semseg"] for r in val[1][:n]])))
            return 100.0 * float(m.compute()["mIoU"])

        f, q, name = miou(ref[0]), miou(got[0]), "mIoU (held-out masks)"
    elif val is not None and kind == "detection":  # COCO AP50 against the held-out annotations
        from ..metrics.detection import CocoDetectionMetric
        from .prepost import detection_postprocess

        ds, raws = val

        def ap50(out: list[np.ndarray]) -> float:
            dets = detection_postprocess(
                out[0],
                out[1],
                meta["level_counts"],
                meta["score_thresh"],
                meta["nms_thresh"],
                meta["topk_candidates"],
                meta["detections_per_img"],
            )
            m = CocoDetectionMetric(ds.coco, ds.contiguous_to_cat_id)
            m.update(dets, [{"image_id": r["image_id"]} for r in raws[:n]])
            return 100.0 * float(m.compute()["AP50"])

        f, q, name = ap50(ref), ap50(got), "COCO AP50 (held-out annotations)"
    elif kind == "classification":
        if labels is not None:
            labels = labels[:n]
            f = 100.0 * float(np.mean(ref[0].argmax(-1) == labels))
            q = 100.0 * float(np.mean(got[0].argmax(-1) == labels))
            name = "top1 accuracy (labels)"
        else:
            f, q, name = 100.0, 100.0 * float(np.mean(got[0].argmax(-1) == ref[0].argmax(-1))), "top1 agreement"
    elif kind == "dense" and ref[0].shape[1] > 1:
        f, q = 100.0, 100.0 * float(np.mean(got[0].argmax(1) == ref[0].argmax(1)))
        name = "per-pixel argmax agreement with fp32"
    else:
        i = 1 if kind == "detection" else 0
        err = float(np.mean(np.abs(got[i] - ref[i])) / max(float(np.mean(np.abs(ref[i]))), 1e-12))
        f, q, name = 100.0, 100.0 * (1.0 - err), "100 x (1 - relative L1 error) vs fp32"
    return dict(metric=name, images=n, fp32=f, quantized=q, drop=f - q)
