"""INT8 (ONNX Runtime static quantisation, QDQ) and FP16 variants of an exported graph.

Two INT8 files, both QDQ with per-channel symmetric int8 weights:

- ``runtime="tensorrt"``: symmetric int8 activations (zero points 0), what TensorRT 10 and 11 take as explicit
  quantisation (no calibration cache). TensorRT accumulates int8 x int8 in 32 bits, so its accuracy is that of
  the QDQ arithmetic itself: on a host without TensorRT the pipeline estimates it by running the file in ONNX
  Runtime with graph optimisations off (:func:`qdq_reference_session`: QuantizeLinear / DequantizeLinear and float
  operators, no integer kernels).
- ``runtime="onnxruntime"``: asymmetric uint8 activations x int8 weights, the pair ONNX Runtime's x86 integer
  GEMMs are built for. Without VNNI those kernels (``vpmaddubsw``) add each two neighbouring u8 x s8 products into
  a saturating int16 (ONNX Runtime's quantisation docs, "When and why do I need to try U8U8?"); 8-bit weights
  saturate there, which cost 6-12 points of top-1 / mIoU / AP50 on an AVX2 CPU while a VNNI CPU lost none. This
  file therefore quantises weights to 7 bits (ONNX Runtime's ``reduce_range``, levels -64..64), so that no two
  products can leave int16 whatever the CPU: 255 * (64 + 64) = 32640 <= 32767. :func:`saturation_check` proves it
  from the file's own weights and is recorded in the file's metadata; :func:`warn_if_saturating` reads it when a
  session is made.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

__all__ = [
    "quantize_int8",
    "convert_fp16",
    "saturation_check",
    "qdq_reference_session",
    "warn_if_saturating",
    "INT8_RUNTIMES",
    "WEIGHT_LEVELS",
]

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
# weight levels per runtime: symmetric int8 (-127..127) for TensorRT (32-bit accumulation), 7 bits (-64..64) for
# ONNX Runtime on x86, where anything wider can saturate the 16-bit pair sums of CPUs without VNNI
WEIGHT_LEVELS = {"tensorrt": 127, "onnxruntime": 64}
INT16_MAX = 32767
META_PREFIX = "vision_moe."


def quantize_int8(
    src: str | Path,
    dst: str | Path,
    calib_images: np.ndarray,
    batch: int = 1,
    op_types: Sequence[str] = ("MatMul", "Gemm", "Conv", "ConvTranspose"),
    runtime: str = "tensorrt",
    *,
    weight_levels: int | None = None,
    unsigned_weights: bool = False,
) -> dict[str, Any]:
    """Static INT8 quantisation with ONNX Runtime's quantiser: QDQ, per-channel symmetric int8 weights (7-bit for
    ``runtime="onnxruntime"``, see the module docstring), MinMax calibration on ``calib_images``. Returns the
    :func:`saturation_check` of the written file (also stored in its metadata).

    ``weight_levels`` (127 or 64) and ``unsigned_weights`` (uint8 weights: ONNX Runtime's U8U8 kernels, which
    widen to 16 bits and cannot saturate) override the runtime's choice; ``benchmarks/bench_int8.py`` compares them.

    Left in float in both: the routers and a restoration model's degradation classifier (:data:`ROUTER_SCOPES`:
    expert choices as in fp32 and as in training, like the FP16 variant),
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
    levels = WEIGHT_LEVELS[runtime] if weight_levels is None else weight_levels
    if levels not in (64, 127):
        raise ValueError(f"weight_levels must be 127 (8 bits) or 64 (7 bits), got {levels}")
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
            reduce_range=levels < 127,  # weights only: -64..64 (activations keep 8 bits)
            activation_type=QuantType.QInt8 if trt else QuantType.QUInt8,
            weight_type=QuantType.QUInt8 if unsigned_weights else QuantType.QInt8,
            op_types_to_quantize=list(op_types),
            nodes_to_exclude=excluded,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"ActivationSymmetric": trt, "WeightSymmetric": True},
        )
    finally:
        pre.unlink(missing_ok=True)
    q = onnx.load(str(dst))
    check = saturation_check(q)
    if not unsigned_weights and check["max_weight_level"] > levels:
        dst.unlink(missing_ok=True)
        raise RuntimeError(
            f"{dst.name}: a quantised weight reached level {check['max_weight_level']}, past the {levels} asked of "
            "the quantiser"
        )
    onnx.helper.set_model_props(
        q,
        {
            META_PREFIX + "int8_runtime": runtime,
            META_PREFIX + "int8_weight_levels": "uint8" if unsigned_weights else str(levels),
            META_PREFIX + "u8s8_saturation_free": str(check["saturation_free"]).lower(),
        },
    )
    onnx.checker.check_model(q, full_check=True)
    onnx.save(q, str(dst))
    if stacked:
        _logger.info("%s: %d MatMuls on stacked (E, in, out) expert weights left in float", dst.name, len(stacked))
    return check


def _initializer_consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for x in n.input:
            out.setdefault(x, []).append(n)
    return out


def saturation_check(model: onnx.ModelProto, activation_max: int = 255) -> dict[str, Any]:
    """Can any integer GEMM of this QDQ file leave int16 in ONNX Runtime's x86 kernels without VNNI?

    Those kernels (``vpmaddubsw``) multiply uint8 activations (signed int8 ones are shifted to uint8 first) by int8
    weights and add two products of neighbouring reduction indices into a saturating int16. Which two neighbour
    depends on how the kernel packs the weights, so this checks the worst pair of any two weights of an output
    channel: ``activation_max * (w_a + w_b)`` for its two largest positive and its two most negative weights.
    A file passes when no channel of any weight can reach past [-32768, 32767] for any activation values.
    Computed from the quantised weights alone: the same answer on every machine.
    """
    inits = {i.name: i for i in model.graph.initializer}
    consumers = _initializer_consumers(model)
    layers: list[dict[str, Any]] = []
    max_level = 0
    for dq in (n for n in model.graph.node if n.op_type == "DequantizeLinear"):
        w = inits.get(dq.input[0])
        if w is None or w.data_type != onnx.TensorProto.INT8:
            continue
        users = [u for u in consumers.get(dq.output[0], []) if u.op_type in ("MatMul", "Gemm", "Conv", "ConvTranspose")]
        if not users:
            continue
        q = onnx.numpy_helper.to_array(w).astype(np.int64)
        max_level = max(max_level, int(np.abs(q).max(initial=0)))
        u = users[0]
        axis = {"MatMul": q.ndim - 1, "Conv": 0, "ConvTranspose": 1 if q.ndim > 1 else 0}.get(u.op_type)
        if u.op_type == "Gemm":
            trans_b = next((a.i for a in u.attribute if a.name == "transB"), 0)
            axis = 0 if trans_b else q.ndim - 1
        chans = np.moveaxis(q, axis, 0).reshape(q.shape[axis], -1)  # (out channels, reduction)
        pos = np.sort(np.clip(chans, 0, None), axis=1)[:, -2:].sum(1) * activation_max
        neg = np.sort(np.clip(chans, None, 0), axis=1)[:, :2].sum(1) * activation_max
        risky = int(((pos > INT16_MAX) | (neg < -INT16_MAX - 1)).sum())
        if risky:
            layers.append(dict(node=u.name, weight=w.name, channels=int(chans.shape[0]), channels_at_risk=risky))
    return dict(
        saturation_free=not layers,
        max_weight_level=max_level,
        bound=f"{activation_max} x (two largest same-sign int8 weights of a channel) within int16",
        layers_at_risk=layers,
    )


def qdq_reference_session(path: str | Path, threads: int = 1):
    """ONNX Runtime with graph optimisations off: QuantizeLinear / DequantizeLinear and the float operators run
    as written, with no fused integer kernels. That is the QDQ arithmetic TensorRT implements with 32-bit integer
    accumulation, up to float rounding, on any CPU: how the TensorRT file's accuracy is estimated on a host."""
    import onnxruntime as ort

    from .onnx_export import session_options

    so = session_options(threads)
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def warn_if_saturating(session, name: str) -> bool:
    """Log one warning when ``session`` holds an INT8 file of this project whose u8 x s8 GEMMs can saturate
    (8-bit weights) and this CPU runs them with the saturating kernels (x86 without VNNI). True if it warned."""
    from ..machine import int8_kernels

    meta = session.get_modelmeta().custom_metadata_map
    if meta.get(META_PREFIX + "u8s8_saturation_free") != "false":
        return False
    kernels = int8_kernels()
    if not kernels["saturates"]:
        return False
    _logger.warning(
        "%s: its 8-bit weights can saturate ONNX Runtime's integer GEMMs on this CPU (%s), which costs accuracy; "
        "for ONNX Runtime on a CPU export with --int8-runtime onnxruntime (7-bit weights, saturation-free)",
        name,
        kernels["path"],
    )
    return True


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


# the scopes of the nodes that choose experts: the token routers (``/router/``) and a restoration model's degradation
# classifier (``/classifier/``: DeMoE's, the image's router), its blur statistics included: log energies of small
# band-passed values, which 8-bit activations (or fp16's range: 1e-8 underflows) turn into different expert choices
ROUTER_SCOPES = ("/router/", "/classifier/")


def router_nodes(model: onnx.ModelProto) -> list[str]:
    """The routers' nodes (exported under a :data:`ROUTER_SCOPES` scope)."""
    return [n.name for n in model.graph.node if any(s in n.name for s in ROUTER_SCOPES)]


def _drop_fp16_round_trips(model: onnx.ModelProto, fp32_nodes: set[str]) -> None:
    """Remove the converter's fp32 -> fp16 -> fp32 Cast pairs in place.

    ``convert_float_to_float16`` casts every fp32 output of a blocked node to fp16 and casts it back at the input of
    the next blocked node, so a chain of fp32 nodes (a router, the classifier and its statistics) still passes its
    tensors through fp16 between two of its ops, and a blocked node reading the fp32 graph input reads it rounded.
    onnxslim rightly keeps such pairs (they are not the identity). Here a Cast to fp32 whose input is a Cast to
    fp16 of a tensor that is fp32 (an output of a node in ``fp32_nodes`` or an fp32 graph input) is bypassed: its
    readers read that tensor itself; the fp16 Cast stays for its other readers and is dropped when none is left."""
    g = model.graph
    fp32_inputs = {i.name for i in g.input if i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    graph_outputs = {o.name for o in g.output}
    made_by = {o: n for n in g.node for o in n.output}

    def to(n: onnx.NodeProto) -> int:
        return next(a.i for a in n.attribute if a.name == "to")

    bypass: dict[str, str] = {}  # a round trip's fp32 output -> the fp32 tensor it started from
    for n in g.node:
        if n.op_type != "Cast" or to(n) != onnx.TensorProto.FLOAT:
            continue
        half = made_by.get(n.input[0])
        if half is None or half.op_type != "Cast" or to(half) != onnx.TensorProto.FLOAT16:
            continue
        src = half.input[0]
        if src in fp32_inputs or (src in made_by and made_by[src].name in fp32_nodes):
            bypass[n.output[0]] = src
    for reader in g.node:
        for k, x in enumerate(reader.input):
            if x in bypass:
                reader.input[k] = bypass[x]
    for n in [n for n in g.node if n.op_type == "Cast" and n.output[0] in bypass.keys() - graph_outputs]:
        g.node.remove(n)
    read = {x for n in g.node for x in n.input} | graph_outputs
    for n in [
        n for n in g.node if n.op_type == "Cast" and to(n) == onnx.TensorProto.FLOAT16 and n.output[0] not in read
    ]:
        g.node.remove(n)


def convert_fp16(src: str | Path, dst: str | Path) -> Path:
    """FP16 weights and compute with fp32 inputs/outputs; the routers (gate GEMM, softmax, top-k; a degradation
    classifier, :data:`ROUTER_SCOPES`) stay fp32, as in training (routers run with autocast off), so expert choices
    match the fp32 model's."""
    import onnxslim
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    block = {*router_nodes(model), *(n.name for n in model.graph.node if n.op_type == "TopK")}
    m = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=False, node_block_list=sorted(block))
    _drop_fp16_round_trips(m, block)
    m = onnxslim.slim(m)  # the converter appends its Casts at the end: re-sort (and fold Cast pairs)
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, str(dst))
    return Path(dst)
