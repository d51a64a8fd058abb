#!/usr/bin/env python3
"""Restore images or a folder of images with an exported restoration graph on the Jetson (TensorRT engine) or on
any machine with ONNX Runtime (``--runtime onnxruntime``): pads each image (or tile) by reflection to the graph's
multiple, crops back, optional overlapping tiles with blended seams (the rule of ``tools/restore.py``), writes PNGs
with the same names and prints each image's latency. Needs NumPy, Pillow and TensorRT (+ cuda-python or PyCUDA) or
ONNX Runtime; not vision_moe.

  python3 restore_images.py artefacts/ --input photos/ --out restored/ --task auto --precision fp16
  python3 restore_images.py artefacts/ --input photo.png --out restored/ --task deblur --tile 256 --tile-overlap 32 \\
      --runtime onnxruntime
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import prepost  # noqa: E402

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class TrtRunner:
    """A TensorRT engine of dynamic height and width: input shape set per call, buffers per shape."""

    def __init__(self, path: Path) -> None:
        import tensorrt as trt
        from infer import _Cuda

        self.trt, self.cuda = trt, _Cuda()
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        self.ctx = self.engine.create_execution_context()
        self.buffers: dict[tuple, dict] = {}

    def __call__(self, x: np.ndarray) -> np.ndarray:
        trt, key = self.trt, tuple(x.shape)
        self.ctx.set_input_shape("images", key)
        if key not in self.buffers:
            self.buffers[key] = {}
            for i in range(self.engine.num_io_tensors):
                name = self.engine.get_tensor_name(i)
                shape = tuple(self.ctx.get_tensor_shape(name))
                host = np.zeros(shape, trt.nptype(self.engine.get_tensor_dtype(name)))
                self.buffers[key][name] = (host, self.cuda.alloc(max(host.nbytes, 1)))
        io = self.buffers[key]
        for name, (_host, dev) in io.items():
            self.ctx.set_tensor_address(name, int(dev))
        host, dev = io["images"]
        np.copyto(host, x.astype(host.dtype, copy=False))
        self.cuda.h2d(dev, host)
        self.ctx.execute_async_v3(self.cuda.handle())
        host, dev = io["out"]
        self.cuda.d2h(host, dev)
        self.cuda.sync()
        return host.astype(np.float32).copy()


class OrtRunner:
    """The ONNX graph in ONNX Runtime on the CPU (one thread by default)."""

    def __init__(self, path: Path, threads: int = 1) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"images": x})[0]


def image_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"--input {path}: no such file or folder; expected an image or a folder of images")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in EXTENSIONS)
    if not files:
        raise FileNotFoundError(f"--input {path}: no images ({', '.join(EXTENSIONS)}) in the folder")
    return files


def read_rgb(path: Path) -> np.ndarray:
    """uint8 (H, W, 3); grey and RGBA images converted to RGB."""
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def graph_file(src: Path, report: dict, task: str, precision: str, runtime: str) -> Path:
    if task not in report["tasks"]:
        raise ValueError(f"--task {task}: not in {src / 'export_report.json'}; it has {sorted(report['tasks'])}")
    if runtime == "tensorrt":
        return src / f"{task}.{precision}.engine"
    name = {"fp32": f"{task}.onnx", "fp16": f"{task}.fp16.onnx", "int8": f"{task}.int8.ort.onnx"}[precision]
    return src / name


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", type=Path, help="export folder (export_report.json + graphs / engines)")
    p.add_argument("--input", type=Path, required=True, help="an image or a folder of images")
    p.add_argument("--out", type=Path, required=True, help="folder for the restored PNGs (same names)")
    p.add_argument("--task", default=None, help="'auto' or a degradation (default: auto if exported, else the first)")
    p.add_argument("--precision", choices=["fp32", "fp16", "int8"], default="fp16")
    p.add_argument("--runtime", choices=["tensorrt", "onnxruntime"], default="tensorrt")
    p.add_argument("--tile", type=int, default=None, help="tile size in pixels (default: whole images)")
    p.add_argument("--tile-overlap", type=int, default=32, help="overlap of neighbouring tiles in pixels")
    args = p.parse_args(argv)
    try:
        report = json.loads((args.src / "export_report.json").read_text())
        inp = report["input"]
        if "multiple" not in inp:
            raise ValueError(f"{args.src}: not a restoration export (its graphs are not image-to-image)")
        task = args.task or ("auto" if "auto" in report["tasks"] else next(iter(report["tasks"])))
        path = graph_file(args.src, report, task, args.precision, args.runtime)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found (build engines with build_engine.py, or pick --runtime)")
        if args.tile is not None and args.tile <= args.tile_overlap:
            raise ValueError(f"--tile {args.tile} must be larger than --tile-overlap {args.tile_overlap}")
        files = image_files(args.input)
        run = TrtRunner(path) if args.runtime == "tensorrt" else OrtRunner(path)
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    mean = np.asarray(inp["mean"], np.float32).reshape(3, 1, 1)
    std = np.asarray(inp["std"], np.float32).reshape(3, 1, 1)
    from PIL import Image

    times = []
    for f in files:
        try:
            rgb = read_rgb(f)
        except OSError as e:
            print(f"skipped {f.name}: unreadable ({e})")
            continue
        x = ((rgb.transpose(2, 0, 1).astype(np.float32) / 255.0 - mean) / std)[None]
        t0 = time.perf_counter()
        try:
            y = prepost.restore_image(run, x, int(inp["multiple"]), args.tile, args.tile_overlap)
        except ValueError as e:
            print(f"skipped {f.name}: {e}")
            continue
        ms = 1000.0 * (time.perf_counter() - t0)
        times.append(ms)
        Image.fromarray(prepost.to_image(y[0])).save(args.out / f"{f.stem}.png")
        print(f"{f.name:<32} {rgb.shape[1]}x{rgb.shape[0]}  {ms:8.1f} ms")
    if times:
        print(f"{len(times)} images, task {task}, {args.precision} {args.runtime}: mean {np.mean(times):.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
