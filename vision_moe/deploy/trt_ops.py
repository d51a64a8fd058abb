"""TensorRT's ONNX operator support, as data, and a static checker for ONNX graphs.

Source: onnx-tensorrt ``docs/operators.md`` ("Supported ONNX Operators"), the table that ships with the
ONNX parser of each TensorRT release (https://github.com/onnx/onnx-tensorrt/blob/main/docs/operators.md).
Encoded here for the two TensorRT lines this project targets:

- ``"10.3"``: JetPack 6.x (TensorRT 10.3), ONNX opsets 9..20.
- ``"10.16"``: JetPack 7.2 (TensorRT 10.16), ONNX opsets 9..24 (the 10.15 table; no change for the ops used here).

Only the documented restrictions that can be checked statically on the graph are checked
(``TopK`` K < 3840 and sorted=1, Q/DQ zero points zero, ``Resize`` modes, constant ``axes``...);
the rest is carried as text in the report. Ops marked unsupported, or absent, are errors.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

__all__ = [
    "TRT_VERSIONS",
    "TRT_SUPPORTED_OPS",
    "TRT_UNSUPPORTED_OPS",
    "TrtSupportReport",
    "check_tensorrt_support",
    "TensorRTSupportError",
]

SOURCE = "onnx-tensorrt docs/operators.md (Supported ONNX Operators), TensorRT 10.x tables"

# TensorRT version -> (min opset, max opset) of its ONNX parser.
TRT_VERSIONS: dict[str, tuple[int, int]] = {"10.3": (9, 20), "10.16": (9, 24)}

# op -> documented restriction (empty string: none). Supported in every TensorRT 10.x listed above unless in
# _SINCE. Types are not encoded: every op here is used with FP32/FP16 (or INT64 indices) tensors.
TRT_SUPPORTED_OPS: dict[str, str] = {
    **{
        op: ""
        for op in (
            "Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh BatchNormalization BlackmanWindow Cast CastLike "
            "Ceil Celu Clip Concat ConstantOfShape Conv ConvTranspose Cos Cosh DepthToSpace Div Einsum Elu Equal Erf Exp "
            "Expand Flatten Floor Gather GatherElements GatherND Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater "
            "GreaterOrEqual GroupNormalization HammingWindow HannWindow HardSigmoid HardSwish Identity ImageScaler "
            "InstanceNormalization IsInf IsNaN LeakyRelu Less LessOrEqual Log LogSoftmax LRN LpNormalization MatMul Max "
            "Mean MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression Not Or Pad ParametricSoftplus Pow PRelu "
            "Range Reciprocal Relu Reshape ReverseSequence Round ScaledTanh Scan Scatter ScatterElements Selu Shape Shrink "
            "Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Sub Sum Tan Tanh "
            "ThresholdedRelu Tile Transpose Trilu Upsample Where Xor"
        ).split()
    },
    "AveragePool": "2D or 3D pooling only; dilations empty or all ones",
    "Constant": "sparse_value, value_string, value_strings unsupported",
    "CumSum": "axis must be a build-time constant",
    "DequantizeLinear": "x_zero_point must be zero",
    "QuantizeLinear": "y_zero_point must be 0",
    "Dropout": "is_training must be an initializer evaluating to False",
    "EyeLike": "input must have static dimensions",
    "Gelu": "",
    "GridSample": "input must be 4D",
    "Hardmax": "axis dimension must be a build-time constant",
    "If": "both branches' outputs must have the same rank and different names",
    "LayerNormalization": "only the first output Y is supported",
    "Loop": "scan output length cannot be dynamic",
    "MaxPool": "2D or 3D pooling only; Indices output unsupported; dilations empty or all ones",
    "NonZero": "data-dependent output shape (rejected by this project's static-shape rule anyway)",
    "OneHot": "depth must be a build-time constant",
    "ReduceL1": "axes must be an initializer",
    "ReduceL2": "axes must be an initializer",
    "ReduceLogSum": "axes must be an initializer",
    "ReduceLogSumExp": "axes must be an initializer",
    "ReduceMax": "axes must be an initializer",
    "ReduceMean": "axes must be an initializer",
    "ReduceMin": "axes must be an initializer",
    "ReduceProd": "axes must be an initializer",
    "ReduceSum": "axes must be an initializer",
    "ReduceSumSquare": "axes must be an initializer",
    "Resize": "modes nearest/linear; coordinate modes half_pixel, pytorch_half_pixel, tf_half_pixel_for_nn, "
    "asymmetric, align_corners; no antialias",
    "RoiAlign": "",
    "ScatterND": "reduction other than none unsupported (rejected by this project's static-shape rule anyway)",
    "Squeeze": "axes must be resolvable to a constant",
    "Unsqueeze": "axes must be resolvable to a constant",
    "TopK": "sorted must be 1; K must be less than 3840",
}
# Ops added to the parser after TensorRT 10.3 (JetPack 6): unsupported there.
_SINCE: dict[str, str] = {
    "Attention": "10.16",
    "RMSNormalization": "10.16",
    "RotaryEmbedding": "10.16",
    "TensorScatter": "10.16",
}
TRT_SUPPORTED_OPS.update({op: f"TensorRT >= {v}" for op, v in _SINCE.items()})

TRT_UNSUPPORTED_OPS = frozenset(
    "AffineGrid Bernoulli BitShift BitwiseAnd BitwiseNot BitwiseOr BitwiseXor Col2Im CenterCropPad Compress "
    "ConcatFromSequence ConvInteger DFT Det DynamicQuantizeLinear ImageDecoder MatMulInteger MaxRoiPool MaxUnpool "
    "MelWeightMatrix Multinomial NegativeLogLikelihoodLoss Optional OptionalGetElement OptionalHasElement QLinearConv "
    "QLinearMatMul RegexFullMatch SequenceAt SequenceConstruct SequenceEmpty SequenceErase SequenceInsert "
    "SequenceLength SequenceMap SoftmaxCrossEntropyLoss SplitToSequence StringConcat StringNormalizer StringSplit "
    "TfIdfVectorizer Unique".split()
)
# TensorRT plugins an ONNX graph may reference by op type (custom domain): EfficientNMS_TRT ships with TensorRT.
TRT_PLUGINS = frozenset({"EfficientNMS_TRT"})


class TensorRTSupportError(ValueError):
    """An ONNX graph uses an op (or an op setting) TensorRT's ONNX parser does not support."""


@dataclass
class TrtSupportReport:
    trt_version: str
    opset: int
    op_counts: dict[str, int]
    restrictions: dict[str, str] = field(default_factory=dict)  # op -> documented restriction, for ops used
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return dict(
            trt_version=self.trt_version,
            opset=self.opset,
            source=SOURCE,
            op_counts=self.op_counts,
            restrictions=self.restrictions,
            errors=self.errors,
            ok=not self.errors,
        )


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.split("."))


def _const_values(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    vals = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    vals[n.output[0]] = numpy_helper.to_array(a.t)
                elif a.name in ("value_int", "value_ints"):
                    vals[n.output[0]] = np.array(onnx.helper.get_attribute_value(a))
    return vals


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            v = onnx.helper.get_attribute_value(a)
            return v.decode() if isinstance(v, bytes) else v
    return default


def _check_node(node: onnx.NodeProto, consts: dict[str, np.ndarray], opset: int) -> list[str]:
    errs: list[str] = []
    op, name = node.op_type, node.name or node.output[0]
    if op == "TopK":
        if _attr(node, "sorted", 1) != 1:
            errs.append(f"TopK {name}: sorted must be 1")
        k = consts.get(node.input[1]) if len(node.input) > 1 else None
        if k is None:
            errs.append(f"TopK {name}: K must be a build-time constant")
        elif int(np.asarray(k).reshape(-1)[0]) >= 3840:
            errs.append(f"TopK {name}: K={int(np.asarray(k).reshape(-1)[0])} must be < 3840")
    elif op in ("QuantizeLinear", "DequantizeLinear"):
        if len(node.input) > 2 and node.input[2]:
            zp = consts.get(node.input[2])
            if zp is None or np.any(np.asarray(zp) != 0):
                errs.append(f"{op} {name}: zero point must be a constant zero (symmetric quantisation)")
    elif op == "Resize":
        if _attr(node, "mode", "nearest") not in ("nearest", "linear"):
            errs.append(f"Resize {name}: mode {_attr(node, 'mode')!r} unsupported (nearest, linear)")
        ctm = _attr(node, "coordinate_transformation_mode", "half_pixel")
        if ctm not in ("half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"):
            errs.append(f"Resize {name}: coordinate_transformation_mode {ctm!r} unsupported")
        if _attr(node, "antialias", 0):
            errs.append(f"Resize {name}: antialias unsupported")
    elif op == "LayerNormalization":
        if sum(1 for o in node.output if o) > 1:
            errs.append(f"LayerNormalization {name}: only output Y is supported")
    elif op in ("MaxPool", "AveragePool"):
        if len(node.output) > 1 and node.output[1]:
            errs.append(f"{op} {name}: Indices output unsupported")
        d = _attr(node, "dilations")
        if d and any(v != 1 for v in d):
            errs.append(f"{op} {name}: dilations must be all ones")
    elif op == "CumSum":
        if node.input[1] not in consts:
            errs.append(f"CumSum {name}: axis must be a build-time constant")
    elif op.startswith("Reduce") and opset >= 18 and len(node.input) > 1 and node.input[1]:
        if node.input[1] not in consts:
            errs.append(f"{op} {name}: axes must be an initializer")
    elif op == "OneHot":
        if node.input[1] not in consts:
            errs.append(f"OneHot {name}: depth must be a build-time constant")
    return errs


def check_tensorrt_support(
    model: onnx.ModelProto, trt_version: str = "10.3", raise_on_error: bool = True
) -> TrtSupportReport:
    """Check every op of ``model`` (and its opset) against TensorRT ``trt_version``'s ONNX parser table."""
    if trt_version not in TRT_VERSIONS:
        raise ValueError(f"unknown TensorRT version {trt_version!r}; expected one of {sorted(TRT_VERSIONS)}")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    lo, hi = TRT_VERSIONS[trt_version]
    counts = Counter(n.op_type for n in model.graph.node)
    rep = TrtSupportReport(trt_version, opset, dict(sorted(counts.items())))
    if not lo <= opset <= hi:
        rep.errors.append(f"opset {opset} outside TensorRT {trt_version}'s range {lo}..{hi}")
    consts = _const_values(model)
    for node in model.graph.node:
        op = node.op_type
        if node.domain not in ("", "ai.onnx"):
            if op not in TRT_PLUGINS:
                rep.errors.append(f"{op} (domain {node.domain!r}) is neither an ONNX op nor a TensorRT plugin")
            continue
        if op in TRT_UNSUPPORTED_OPS or op not in TRT_SUPPORTED_OPS:
            rep.errors.append(f"{op} is not supported by TensorRT {trt_version}'s ONNX parser")
            continue
        since = _SINCE.get(op)
        if since and _version_tuple(trt_version) < _version_tuple(since):
            rep.errors.append(f"{op} needs TensorRT >= {since}, not {trt_version}")
            continue
        if TRT_SUPPORTED_OPS[op]:
            rep.restrictions[op] = TRT_SUPPORTED_OPS[op]
        rep.errors.extend(_check_node(node, consts, opset))
    rep.errors = list(dict.fromkeys(rep.errors))
    if rep.errors and raise_on_error:
        raise TensorRTSupportError(
            f"graph not buildable by TensorRT {trt_version}: {rep.errors[0]}"
            + (f" (+{len(rep.errors) - 1} more)" if len(rep.errors) > 1 else "")
        )
    return rep
