"""HLS C++ generation for task-sparse M³ViT inference on FPGAs (Edge-MoE style), verified by g++ C-simulation.

``export_hls(model, task, out_dir, HLSConfig(board='zcu102'))`` writes an hls4ml-style Vitis HLS project; the
bit-accurate NumPy reference (:mod:`.reference`) produces its golden outputs layer by layer.
"""

from .config import BOARDS, FxType, HLSConfig, parse_fx
from .generator import HLSProject, builtin_images, compile_csim, export_hls, read_counts, run_csim
from .ir import UnsupportedModelError
from .perf import EDGE_MOE_PUBLISHED, compare_table, estimate, estimate_edge_moe
from .reference import quantize_model, run_reference

__all__ = [
    "BOARDS",
    "FxType",
    "HLSConfig",
    "parse_fx",
    "HLSProject",
    "builtin_images",
    "compile_csim",
    "export_hls",
    "run_csim",
    "read_counts",
    "UnsupportedModelError",
    "EDGE_MOE_PUBLISHED",
    "estimate",
    "estimate_edge_moe",
    "compare_table",
    "quantize_model",
    "run_reference",
]
