"""TensorRT engines: built with the TensorRT Python API when it is importable and a GPU is present, otherwise
the exact ``trtexec`` command and a ``build_engine.sh`` are written next to the ONNX file. No build is faked.

TensorRT cannot be installed from PyPI alone (its wheels fetch their libraries from NVIDIA's index) and engines
are not portable across GPUs or TensorRT versions, so the usual path is to build on the Jetson itself
(``export/build_engine.py``). Precision per TensorRT line:

- TensorRT 10.x (JetPack 6.x: 10.3; JetPack 7.2: 10.16): fp32 graph + ``--fp16`` builder flag (weakly typed);
  INT8 from the QDQ graph (explicit quantisation) with ``--int8`` (plus ``--fp16`` for the unquantised layers).
- TensorRT 11 (strongly typed only): the precision comes from the graph: ``<task>.fp16.onnx`` / ``<task>.int8.onnx``
  built with ``--stronglyTyped``.
"""

from __future__ import annotations

import logging
import shlex
from pathlib import Path
from typing import Any

__all__ = ["trtexec_command", "write_build_script", "build_engine", "build_or_script", "tensorrt_available"]

_logger = logging.getLogger(__name__)

WORKSPACE_MIB = 2048
_SCRIPT_HEAD = """#!/usr/bin/env bash
# Build TensorRT engines on the target device (engines are not portable across GPUs or TensorRT versions).
# JetPack 6.x: TensorRT 10.3; JetPack 7.2: TensorRT 10.16.
set -euo pipefail
cd "$(dirname "$0")"
TRTEXEC=${TRTEXEC:-/usr/src/tensorrt/bin/trtexec}
"""
MAX_DYNAMIC_BATCH = 8


def _shape(b: int, hw: tuple[int, int]) -> str:
    return f"images:{b}x3x{hw[0]}x{hw[1]}"


def trtexec_command(
    onnx_path: str | Path,
    engine_path: str | Path,
    precision: str,
    hw: tuple[int, int],
    batch: int = 1,
    dynamic_batch: bool = False,
    strongly_typed: bool = False,
    workspace_mib: int = WORKSPACE_MIB,
    timing_cache: str | None = "timing.cache",
    hw_range: tuple[tuple[int, int], tuple[int, int]] | None = None,
) -> list[str]:
    """The ``trtexec`` argument list that builds ``engine_path`` from ``onnx_path``; ``hw_range`` (the smallest and
    largest (H, W)) for a graph of dynamic height and width, ``hw`` then being the size it is optimised for."""
    if precision not in ("fp32", "fp16", "int8"):
        raise ValueError(f"unknown precision {precision!r}; expected fp32, fp16 or int8")
    cmd = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={engine_path}", f"--memPoolSize=workspace:{workspace_mib}M"]
    if strongly_typed:
        cmd.append("--stronglyTyped")
    elif precision == "fp16":
        cmd.append("--fp16")
    elif precision == "int8":
        cmd += ["--int8", "--fp16"]
    if dynamic_batch or hw_range is not None:  # the optimisation profile (hw_range: an image-to-image graph)
        lo, hi = hw_range or (hw, hw)
        opt = max(1, batch)
        cmd += [
            f"--minShapes={_shape(1 if dynamic_batch else batch, lo)}",
            f"--optShapes={_shape(opt, hw)}",
            f"--maxShapes={_shape(max(opt, MAX_DYNAMIC_BATCH) if dynamic_batch else batch, hi)}",
        ]
    if timing_cache:
        cmd.append(f"--timingCacheFile={timing_cache}")
    return cmd


def write_build_script(
    onnx_path: str | Path,
    engine_path: str | Path,
    precision: str,
    hw: tuple[int, int],
    batch: int = 1,
    dynamic_batch: bool = False,
    hw_range: tuple[tuple[int, int], tuple[int, int]] | None = None,
) -> Path:
    """``build_engine.sh`` next to the ONNX (appended to when several graphs share a folder)."""
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    script = onnx_path.parent / "build_engine.sh"
    cmd = trtexec_command(onnx_path.name, engine_path.name, precision, hw, batch, dynamic_batch, hw_range=hw_range)
    if not script.exists():
        script.write_text(_SCRIPT_HEAD)
    with script.open("a") as f:
        f.write('"$TRTEXEC" ' + shlex.join(cmd[1:]) + "\n")
    script.chmod(0o755)
    return script


def tensorrt_available() -> tuple[bool, str]:
    """(True, version) when ``tensorrt`` imports and a CUDA GPU is visible, else (False, why)."""
    try:
        import tensorrt as trt
    except ImportError:
        return False, "tensorrt is not installed"
    try:
        import torch

        if not torch.cuda.is_available():
            return False, "no CUDA GPU"
    except ImportError:
        pass
    return True, trt.__version__


def build_engine(
    onnx_path: str | Path,
    engine_path: str | Path,
    precision: str,
    hw: tuple[int, int],
    batch: int = 1,
    dynamic_batch: bool = False,
    workspace_mib: int = WORKSPACE_MIB,
    timing_cache: str | Path | None = None,
) -> dict[str, Any]:
    """Build with the TensorRT Python API (explicit batch, optimisation profile, timing cache, workspace limit)."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errs}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    if precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)  # QDQ graph: explicit quantisation, no calibrator
    if dynamic_batch:
        profile = builder.create_optimization_profile()
        shape = lambda b: (b, 3, hw[0], hw[1])  # noqa: E731
        profile.set_shape("images", shape(1), shape(max(1, batch)), shape(max(batch, MAX_DYNAMIC_BATCH)))
        config.add_optimization_profile(profile)
    cache = None
    if timing_cache is not None:
        tc = Path(timing_cache)
        cache = config.create_timing_cache(tc.read_bytes() if tc.exists() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path}")
    Path(engine_path).write_bytes(bytes(serialized))
    if cache is not None:
        Path(timing_cache).write_bytes(bytes(cache.serialize()))
    return dict(built=True, engine=str(Path(engine_path).name), tensorrt=trt.__version__, precision=precision)


def build_or_script(
    onnx_path: Path, engine_path: Path, precision: str, hw: tuple[int, int], batch: int, dynamic_batch: bool
) -> dict[str, Any]:
    """Build here when possible; always write ``build_engine.sh`` (the on-device path)."""
    script = write_build_script(onnx_path, engine_path, precision, hw, batch, dynamic_batch)
    cmd = shlex.join(trtexec_command(onnx_path.name, engine_path.name, precision, hw, batch, dynamic_batch))
    ok, why = tensorrt_available()
    if not ok:
        _logger.warning("no engine built (%s): run %s (in the export folder) on the device", why, script.name)
        return dict(built=False, reason=why, precision=precision, trtexec=cmd, script=script.name)
    res = build_engine(
        onnx_path, engine_path, precision, hw, batch, dynamic_batch, timing_cache=onnx_path.parent / "timing.cache"
    )
    return dict(res, trtexec=cmd, script=script.name)  # res holds built, engine, precision
