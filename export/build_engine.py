#!/usr/bin/env python3
"""Build TensorRT engines on the Jetson from the exported ONNX files (engines are not portable across GPUs or
TensorRT versions). Needs only TensorRT's Python bindings (JetPack ships them).

  python3 build_engine.py artefacts/ --precision fp16            # every graph listed in export_report.json
  python3 build_engine.py artefacts/semseg.int8.onnx --precision int8

Precision: TensorRT 10 (JetPack 6.x: 10.3, JetPack 7.2: 10.16) builds the fp32 graph with the FP16 flag, and the
QDQ ``*.int8.onnx`` with INT8 (+FP16) flags. TensorRT 11 is strongly typed: pass ``--strongly-typed`` with the
``*.fp16.onnx`` / ``*.int8.onnx`` file and the graph's own types decide.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

MAX_DYNAMIC_BATCH = 8


def build(
    onnx_path: Path,
    engine_path: Path,
    precision: str,
    strongly_typed: bool,
    workspace_mib: int,
    timing_cache: Path | None,
    max_batch: int,
    hw_profile: list | None = None,
) -> None:
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise SystemExit(f"error: TensorRT could not parse {onnx_path}: {errs}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    if not strongly_typed and precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
    if not strongly_typed and precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
    inp = network.get_input(0)
    if hw_profile is not None and -1 in tuple(inp.shape)[2:]:  # a restoration graph: dynamic height and width
        profile = builder.create_optimization_profile()
        b, c = inp.shape[0], inp.shape[1]
        profile.set_shape(inp.name, *[(b, c, int(h), int(w)) for h, w in hw_profile])
        config.add_optimization_profile(profile)
    elif inp.shape[0] == -1:  # dynamic batch: one optimisation profile 1..max_batch
        profile = builder.create_optimization_profile()
        c, h, w = inp.shape[1:]
        profile.set_shape(inp.name, (1, c, h, w), (1, c, h, w), (max_batch, c, h, w))
        for i in range(1, network.num_inputs):  # the multi-task graph's task index
            t = network.get_input(i)
            profile.set_shape(t.name, tuple(t.shape), tuple(t.shape), tuple(t.shape))
        config.add_optimization_profile(profile)
    cache = None
    if timing_cache is not None:
        cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.exists() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    data = builder.build_serialized_network(network, config)
    if data is None:
        raise SystemExit(f"error: TensorRT failed to build {onnx_path}")
    engine_path.write_bytes(bytes(data))
    if cache is not None:
        timing_cache.write_bytes(bytes(cache.serialize()))
    print(f"built {engine_path} (TensorRT {trt.__version__}, {precision})")


def graphs(src: Path, precision: str) -> list[tuple[Path, str, list | None]]:
    """(ONNX file, precision to build it with, the (H, W) optimisation profile of a restoration graph or None) for
    every graph of an export folder (or one file)."""
    if src.is_file():
        return [(src, precision, None)]
    report = json.loads((src / "export_report.json").read_text())
    suffix = {"fp32": ".onnx", "fp16": ".onnx", "int8": ".int8.onnx"}[precision]
    out = [(src / f"{t}{suffix}", precision, e.get("engine", {}).get("profile")) for t, e in report["tasks"].items()]
    if "multitask" in report:  # not quantised: the report says what an INT8 request builds it with (FP16)
        mt_prec = report["multitask"].get("engine_precision", {}).get(precision, precision)
        out.append((src / "multitask.onnx", mt_prec, None))
    return [(p, prec, prof) for p, prec, prof in out if p.exists()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", type=Path, help="an .onnx file or an export folder with export_report.json")
    p.add_argument("--precision", choices=["fp32", "fp16", "int8"], default="fp16")
    p.add_argument("--strongly-typed", action="store_true", help="TensorRT 11: types come from the graph")
    p.add_argument("--workspace-mib", type=int, default=2048)
    p.add_argument("--max-batch", type=int, default=MAX_DYNAMIC_BATCH)
    p.add_argument("--timing-cache", type=Path, default=Path("timing.cache"))
    args = p.parse_args(argv)
    for g, precision, profile in graphs(args.src, args.precision):
        stem = g.name[: -len(".onnx")]
        stem = stem.split(".")[0]
        engine = g.with_name(f"{stem}.{precision}.engine")
        build(g, engine, precision, args.strongly_typed, args.workspace_mib, args.timing_cache, args.max_batch, profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
