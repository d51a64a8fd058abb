"""ONNX export of task models, graph hygiene (checker, static-shape rule, onnxslim) and ONNX Runtime parity.

The exporter is always chosen explicitly: ``"torchscript"`` (``torch.onnx.export(dynamo=False)``, the tracer) or
``"dynamo"`` (``torch.onnx.export(dynamo=True)``, torch.export). Tests run the one that ships.
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn as nn

__all__ = [
    "MIN_OPSET",
    "MIN_EXPORTER_OPSET",
    "file_opset",
    "check_opset",
    "EXPORTERS",
    "FORBIDDEN_OPS",
    "ExportError",
    "ParityError",
    "export_onnx",
    "check_static_graph",
    "simplify_onnx",
    "op_counts",
    "ort_session",
    "run_onnx",
    "compare_outputs",
]

_logger = logging.getLogger(__name__)

# LayerNormalization (every ViT block) is an ONNX op from opset 17; below it the exporters decompose it into
# ReduceMean/Pow/Sqrt chains that TensorRT cannot fuse into its LayerNorm kernel and that lose fp16 accuracy.
MIN_OPSET = 17
# the dynamo exporter has no implementations below opset 18: asked for 17 it exports 18 and tries a down-conversion
# that fails on these models (printing a traceback) and leaves the file at 18, so it is refused instead
MIN_EXPORTER_OPSET = {"torchscript": MIN_OPSET, "dynamo": 18}
MAX_OPSET = {"torchscript": 20, "dynamo": 23}
EXPORTERS = ("torchscript", "dynamo")
# Ops whose output shape depends on data, or that scatter by data: not allowed in a static-shape edge graph.
FORBIDDEN_OPS = frozenset(
    {
        "NonZero",
        "ScatterND",
        "Unique",
        "Compress",
        "Loop",
        "If",
        "Scan",
        "SequenceConstruct",
        "SplitToSequence",
        "ConcatFromSequence",
        "NonMaxSuppression",
    }
)


class ExportError(RuntimeError):
    """An export produced a graph that breaks the project's rules (data-dependent shapes, forbidden ops)."""


class ParityError(AssertionError):
    """ONNX Runtime's outputs differ from PyTorch's by more than the tolerance."""


class _Outputs(nn.Module):
    """Calls ``module(*inputs)`` and returns a tuple of tensors (the exporters' calling convention)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *inputs: torch.Tensor):
        out = self.module(*inputs)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def check_opset(opset: int, exporter: str) -> None:
    if exporter not in EXPORTERS:
        raise ValueError(f"unknown exporter {exporter!r}; expected one of {list(EXPORTERS)}")
    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset} is too old: LayerNormalization needs opset >= {MIN_OPSET}")
    if opset < MIN_EXPORTER_OPSET[exporter]:
        raise ValueError(
            f"opset {opset}: the {exporter} exporter writes opset {MIN_EXPORTER_OPSET[exporter]} or newer "
            f"(use opset {MIN_EXPORTER_OPSET[exporter]}, or the torchscript exporter for opset {MIN_OPSET})"
        )
    if opset > MAX_OPSET[exporter]:
        raise ValueError(f"opset {opset} is too new for the {exporter} exporter (max {MAX_OPSET[exporter]})")


def export_onnx(
    module: nn.Module,
    inputs: Sequence[torch.Tensor],
    path: str | Path,
    *,
    input_names: Sequence[str],
    output_names: Sequence[str],
    opset: int = 17,
    exporter: str = "torchscript",
    dynamic_batch: bool = False,
    dynamic_hw: bool = False,
) -> onnx.ModelProto:
    """Export ``module(*inputs)`` (eval mode, no grad) to ``path``; returns the loaded, checked model.

    With ``dynamic_batch`` the first dimension of every input named in ``input_names`` whose example has a batch
    axis (rank >= 2) and of every output is the symbol ``batch``. With ``dynamic_hw`` (image-to-image models, the
    torchscript exporter) the last two dimensions of every rank-4 input and of every output are ``height`` and
    ``width``.
    """
    check_opset(opset, exporter)
    if dynamic_hw and exporter != "torchscript":
        raise ValueError(f"a dynamic height and width is exported with the torchscript exporter, not {exporter!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapped = _Outputs(module).eval()
    inputs = tuple(inputs)
    batched = [n for n, x in zip(input_names, inputs) if x.dim() >= 2]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python control flow on constants
        if exporter == "torchscript":
            dyn: dict[str, dict[int, str]] | None = None
            if dynamic_batch or dynamic_hw:
                images = [n for n, x in zip(input_names, inputs) if x.dim() == 4]
                dyn = {n: {} for n in [*batched, *output_names]}
                for n in [*batched, *output_names]:
                    if dynamic_batch:
                        dyn[n][0] = "batch"
                    if dynamic_hw and (n in images or n in output_names):
                        dyn[n].update({2: "height", 3: "width"})
                dyn = {n: d for n, d in dyn.items() if d}
            torch.onnx.export(
                wrapped,
                inputs,
                str(path),
                opset_version=opset,
                dynamo=False,
                input_names=list(input_names),
                output_names=list(output_names),
                dynamic_axes=dyn,
                do_constant_folding=True,
            )
        else:
            shapes = None
            if dynamic_batch:
                b = torch.export.Dim("batch", min=1, max=1024)
                shapes = tuple({0: b} if n in batched else None for n in input_names)
            quiet = logging.getLogger("torch.onnx")
            level = quiet.level
            quiet.setLevel(logging.ERROR)  # its progress lines ("Obtain model graph ...") are not ours to print
            try:
                prog = torch.onnx.export(
                    wrapped,
                    inputs,
                    dynamo=True,
                    opset_version=opset,
                    input_names=list(input_names),
                    output_names=list(output_names),
                    dynamic_shapes=shapes,
                    optimize=True,
                    verbose=False,
                )
            finally:
                quiet.setLevel(level)
            prog.save(str(path))
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    wrapped.module.eval()
    return model


def file_opset(model: onnx.ModelProto) -> int:
    """The default-domain opset the file declares (what TensorRT's parser and the report go by)."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    return dict(sorted(Counter(n.op_type for n in model.graph.node).items()))


def _dims(vi: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in vi.type.tensor_type.shape.dim]


def graph_io(model: onnx.ModelProto) -> dict[str, dict[str, list[int | str]]]:
    """Names and shapes (ints, or symbol names) of the graph's inputs and outputs."""
    inits = {i.name for i in model.graph.initializer}
    return dict(
        inputs={i.name: _dims(i) for i in model.graph.input if i.name not in inits},
        outputs={o.name: _dims(o) for o in model.graph.output},
    )


def check_static_graph(model: onnx.ModelProto, allowed_symbols: Sequence[str] = ("batch",)) -> None:
    """No forbidden (data-dependent) ops, and every declared output dimension is a number or an allowed symbol."""
    bad = sorted({n.op_type for n in model.graph.node if n.op_type in FORBIDDEN_OPS})
    if bad:
        raise ExportError(f"graph contains data-dependent ops {bad}; export with a static-shape dispatcher")
    for name, dims in graph_io(model)["outputs"].items():
        odd = [d for d in dims if isinstance(d, str) and d not in allowed_symbols]
        if odd:
            raise ExportError(f"output {name!r} has data-dependent dimensions {dims}")


def simplify_onnx(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxslim: constant folding, shape-op elimination, dead-code removal; the result is re-checked."""
    import onnxslim

    slim = onnxslim.slim(model)
    onnx.checker.check_model(slim, full_check=True)
    return slim


def session_options(threads: int = 1):
    """ONNX Runtime session options with a fixed thread count (one inter-op thread) and quiet logging."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return so


def ort_session(model: onnx.ModelProto | str | Path, threads: int = 1):
    """A CPU ONNX Runtime session with a fixed thread count. An INT8 file of this project whose integer GEMMs
    can saturate on this CPU is run all the same, with one warning (:func:`.quantize.warn_if_saturating`)."""
    import onnxruntime as ort

    from .quantize import warn_if_saturating

    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    sess = ort.InferenceSession(src, session_options(threads), providers=["CPUExecutionProvider"])
    warn_if_saturating(sess, "the graph" if isinstance(model, onnx.ModelProto) else Path(model).name)
    return sess


def run_onnx(session, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    return session.run(None, inputs)


def compare_outputs(
    got: Sequence[np.ndarray],
    ref: Sequence[np.ndarray],
    names: Sequence[str],
    rtol: float,
    what: str = "onnxruntime vs torch",
) -> dict[str, dict[str, float]]:
    """Max abs error and relative error (max abs error / max |ref|) per output; ParityError past ``rtol``."""
    stats: dict[str, dict[str, float]] = {}
    for name, g, r in zip(names, got, ref):
        g, r = np.asarray(g), np.asarray(r)
        if g.shape != r.shape:
            raise ParityError(f"{what}: output {name!r} shape {list(g.shape)} != {list(r.shape)}")
        if not np.all(np.isfinite(g)):
            raise ParityError(f"{what}: output {name!r} has non-finite values")
        if g.dtype.kind in "iub":
            mism = float(np.mean(g != r))
            stats[name] = dict(
                max_abs=float(np.max(np.abs(g.astype(np.float64) - r))) if g.size else 0.0,
                rel=mism,
                mismatch_fraction=mism,
            )
        else:
            err = float(np.max(np.abs(g.astype(np.float64) - r))) if g.size else 0.0
            scale = float(np.max(np.abs(r))) if r.size else 0.0
            stats[name] = dict(max_abs=err, rel=err / max(scale, 1e-12))
        if stats[name]["rel"] > rtol:
            raise ParityError(
                f"{what}: output {name!r} relative error {stats[name]['rel']:.3g} > {rtol:g} "
                f"(max abs {stats[name]['max_abs']:.3g})"
            )
    return stats
