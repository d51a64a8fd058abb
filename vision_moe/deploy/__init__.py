"""Deployment: task-specialised ONNX with verified parity, a multi-task graph, INT8/FP16 variants, TensorRT."""

from .multitask_graph import TaskIndexedModel
from .onnx_export import (
    EXPORTERS,
    MIN_OPSET,
    ExportError,
    ParityError,
    check_static_graph,
    compare_outputs,
    export_onnx,
    ort_session,
    simplify_onnx,
)
from .pipeline import ExportConfig, export_model, task_module
from .trt_ops import TensorRTSupportError, check_tensorrt_support

__all__ = [
    "EXPORTERS",
    "MIN_OPSET",
    "ExportConfig",
    "ExportError",
    "ParityError",
    "TaskIndexedModel",
    "TensorRTSupportError",
    "check_static_graph",
    "check_tensorrt_support",
    "compare_outputs",
    "export_model",
    "export_onnx",
    "ort_session",
    "simplify_onnx",
    "task_module",
]
