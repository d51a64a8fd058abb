#!/usr/bin/env python3
"""Run exported TensorRT engines on images on the Jetson: per-task engines or the multi-task engine, switching
task per call. Prints latency mean / p50 / p99 and FPS per task. Needs TensorRT, NumPy and cuda-python (or
PyCUDA) for device memory; images are read with OpenCV or Pillow.

  python3 infer.py artefacts/ --precision fp16 --images photos/ --tasks semseg depth --iters 200
  python3 infer.py artefacts/ --multitask --images photos/
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


class _Cuda:
    """Minimal device-memory helper over cuda-python (preferred) or PyCUDA."""

    def __init__(self) -> None:
        try:
            from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
        except ImportError:
            try:
                from cuda import cudart
            except ImportError:
                cudart = None
        self.cudart = cudart
        if cudart is None:
            import pycuda.autoinit  # noqa: F401
            import pycuda.driver as drv

            self.drv = drv
            self.stream = drv.Stream()
        else:
            self.stream = cudart.cudaStreamCreate()[1]

    def alloc(self, nbytes: int):
        return self.cudart.cudaMalloc(nbytes)[1] if self.cudart else self.drv.mem_alloc(nbytes)

    def h2d(self, dst, arr: np.ndarray) -> None:
        if self.cudart:
            self.cudart.cudaMemcpyAsync(
                dst, arr.ctypes.data, arr.nbytes, self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream
            )
        else:
            self.drv.memcpy_htod_async(dst, arr, self.stream)

    def d2h(self, arr: np.ndarray, src) -> None:
        if self.cudart:
            self.cudart.cudaMemcpyAsync(
                arr.ctypes.data, src, arr.nbytes, self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream
            )
        else:
            self.drv.memcpy_dtoh_async(arr, src, self.stream)

    def handle(self):
        return self.stream if self.cudart else self.stream.handle

    def sync(self) -> None:
        if self.cudart:
            self.cudart.cudaStreamSynchronize(self.stream)
        else:
            self.stream.synchronize()


class Engine:
    """One deserialised engine with host/device buffers for a fixed batch."""

    def __init__(self, path: Path, cuda: _Cuda, batch: int) -> None:
        import tensorrt as trt

        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        self.ctx = self.engine.create_execution_context()
        self.cuda = cuda
        self.io = {}
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            shape = list(self.engine.get_tensor_shape(name))
            if shape and shape[0] == -1:
                shape[0] = batch
            if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                self.ctx.set_input_shape(name, shape)
            dtype = trt.nptype(self.engine.get_tensor_dtype(name))
            host = np.zeros(shape, dtype)
            dev = cuda.alloc(max(host.nbytes, 1))
            self.ctx.set_tensor_address(name, int(dev))
            self.io[name] = (host, dev, self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT)

    def __call__(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        for name, arr in inputs.items():
            host, dev, _ = self.io[name]
            np.copyto(host, arr.astype(host.dtype, copy=False))
            self.cuda.h2d(dev, host)
        self.ctx.execute_async_v3(self.cuda.handle())
        outs = {}
        for name, (host, dev, is_in) in self.io.items():
            if not is_in:
                self.cuda.d2h(host, dev)
                outs[name] = host
        self.cuda.sync()
        return {k: v.copy() for k, v in outs.items()}


def load_images(folder: Path | None, n: int, hw) -> list[np.ndarray]:
    if folder is None:
        rng = np.random.default_rng(0)
        return [rng.integers(0, 256, (hw[0] * 2, hw[1] * 2, 3), dtype=np.uint8) for _ in range(n)]
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp"))[:n]
    try:
        import cv2

        return [cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB) for f in files]
    except ImportError:
        from PIL import Image

        return [np.asarray(Image.open(f).convert("RGB")) for f in files]


def stats(ms: list[float]) -> str:
    a = np.asarray(ms)
    return (
        f"mean {a.mean():.2f} ms  p50 {np.percentile(a, 50):.2f} ms  p99 {np.percentile(a, 99):.2f} ms  "
        f"FPS {1000.0 / a.mean():.1f}"
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", type=Path, help="export folder (export_report.json + engines)")
    p.add_argument("--precision", choices=["fp32", "fp16", "int8"], default="fp16")
    p.add_argument("--tasks", nargs="*", help="tasks to run (default: all in the report)")
    p.add_argument("--multitask", action="store_true", help="use the multi-task engine, task per call")
    p.add_argument("--images", type=Path, help="folder of images (default: random images)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--warmup", type=int, default=20)
    args = p.parse_args(argv)
    report = json.loads((args.src / "export_report.json").read_text())
    inp = report["input"]
    hw = inp["shape"][2:]
    tasks = args.tasks or list(report["multitask"]["tasks"] if args.multitask else report["tasks"])
    batch = args.batch if inp["shape"][0] == "batch" else int(inp["shape"][0])
    x = prepost.preprocess(load_images(args.images, batch, hw), hw, inp["mean"], inp["std"])
    cuda = _Cuda()
    if args.multitask:
        mt = report["multitask"]
        prec = mt.get("engine_precision", {}).get(args.precision, args.precision)  # INT8 request: an FP16 engine
        eng = Engine(args.src / f"multitask.{prec}.engine", cuda, batch)

        def run_task(t):  # the multi-task engine pads channels to the widest task: keep this task's own
            o = eng(images=x, task=np.array([mt["tasks"][t]], np.int64))
            c = mt["out_channels"][t]
            return {k: v[..., :c] if k == "scores" else v[:, :c] if k in ("logits", "out") else v for k, v in o.items()}

        runs = {t: (lambda t=t: run_task(t)) for t in tasks}
    else:
        engines = {t: Engine(args.src / f"{t}.{args.precision}.engine", cuda, batch) for t in tasks}
        runs = {t: (lambda t=t: engines[t](images=x)) for t in tasks}
    times = {t: [] for t in tasks}
    for i in range(args.warmup + args.iters):
        for t in tasks:  # switch task on every call
            t0 = time.perf_counter()
            runs[t]()
            if i >= args.warmup:
                times[t].append(1000.0 * (time.perf_counter() - t0))
    for t in tasks:
        kind = report["tasks"].get(t, {}).get("kind", "?")
        print(f"{t:<16} {kind:<14} batch {batch}  {stats(times[t])}")
        if kind == "classification":
            print("   top-5:", prepost.classify(runs[t]()["logits"])[0])
        elif kind == "detection":
            e = report["tasks"][t]
            o = runs[t]()
            det = prepost.detection_postprocess(
                o["boxes"],
                o["scores"],
                e["level_counts"],
                e["score_thresh"],
                e["nms_thresh"],
                e["topk_candidates"],
                e["detections_per_img"],
            )
            print(f"   {len(det[0]['boxes'])} detections in image 0")
    return 0


if __name__ == "__main__":
    sys.exit(main())
