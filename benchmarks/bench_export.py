#!/usr/bin/env python
"""ONNX Runtime CPU latency of a specialised M³ViT task model vs the dense ViT of the same active width vs PyTorch
eager, the Mod-Squad-pruned task model, and INT8 vs FP32 (speed-up and metric drop). BENCHMARKS.md rules: fixed
threads, alternating A/B pairs after warm-up, median of per-pair ratios, machine info and a GEMM ceiling.

  python benchmarks/bench_export.py --model small --pairs 10
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def gemm_gflops(n: int = 1024, reps: int = 20) -> float:
    """Best of ``reps`` timed 1024^3 fp32 matmuls after warm-up."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def flops(module: torch.nn.Module, x: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc, torch.no_grad():
        module(x)
    return float(fc.get_total_flops())


def timer(fn, x):
    def run() -> float:
        t = time.perf_counter()
        fn(x)
        return time.perf_counter() - t
    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="small", choices=["tiny", "small", "base"])
    p.add_argument("--img", type=int, default=224)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--pairs", type=int, default=10)
    p.add_argument("--calib", type=int, default=8)
    args = p.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)
    import onnxruntime

    import vision_moe
    from vision_moe.deploy import ExportConfig, export_model, ort_session
    from vision_moe.deploy.prepost import sample_images

    print(f"machine: {platform.processor() or platform.machine()} | {_cpu()} | threads {args.threads} | torch "
          f"{torch.__version__} | onnxruntime {onnxruntime.__version__}")
    ceiling = gemm_gflops()
    print(f"GEMM ceiling (1024^3 fp32 matmul): {ceiling:.1f} GFLOP/s")
    hw = (args.img, args.img)
    torch.manual_seed(0)
    tasks = ("semseg", "depth")
    moe = vision_moe.create_model(f"m3vit_{args.model}_patch16_224", tasks=tasks, num_classes=1000).eval()
    dense = vision_moe.create_model(f"vit_mtl_{args.model}_patch16_224", tasks=tasks, num_classes=1000).eval()
    images = sample_images(args.calib * 2, hw, (0.5,) * 3, (0.5,) * 3)
    x1 = images[:1]
    # Mod-Squad pruning: keep each layer's top_k most used experts for the task on calibration images
    usage = moe.expert_usage(torch.from_numpy(images[: args.calib]), "semseg")
    pruned = vision_moe.create_model(f"m3vit_{args.model}_patch16_224", tasks=tasks, num_classes=1000).eval()
    pruned.load_state_dict(moe.state_dict())
    k = moe.moe_layers()[0][1].top_k
    masks = [torch.zeros_like(u, dtype=torch.bool).scatter_(0, u.topk(k).indices, True) for u in usage]
    pruned.restrict_experts("semseg", masks)
    out = Path(tempfile.mkdtemp(prefix="bench_export_"))
    cfg = dict(tasks=["semseg"], img_size=hw, parity_images=1)
    rm = export_model(moe, ExportConfig(out_dir=str(out / "moe"), precision="int8", calib_images=args.calib,
                                        eval_images=args.calib, **cfg))
    export_model(dense, ExportConfig(out_dir=str(out / "dense"), **cfg))
    export_model(pruned, ExportConfig(out_dir=str(out / "pruned"), **cfg))
    s_moe = ort_session(out / "moe/semseg.onnx", args.threads)
    s_int8 = ort_session(out / "moe/semseg.int8.onnx", args.threads)
    s_dense = ort_session(out / "dense/semseg.onnx", args.threads)
    s_pruned = ort_session(out / "pruned/semseg.onnx", args.threads)
    spec = moe.specialize("semseg").eval()  # eager, default sort dispatcher
    ort = lambda s: (lambda x: s.run(None, {"images": x}))  # noqa: E731

    def eager(x):
        with torch.inference_mode():
            spec(torch.from_numpy(x))

    cands = {"ort_moe_dense_dispatch": ort(s_moe), "ort_dense_vit": ort(s_dense), "torch_eager_moe": eager,
             "ort_moe_pruned_topk": ort(s_pruned), "ort_moe_int8": ort(s_int8)}
    for f in cands.values():
        for _ in range(3):
            f(x1)
    times = {n: [] for n in cands}
    for _ in range(args.pairs):  # alternate every candidate within each round
        for n, f in cands.items():
            times[n].append(timer(f, x1)())
    ratio = lambda a, b: statistics.median(x / y for x, y in zip(times[a], times[b]))  # noqa: E731
    fl_dense = flops(dense.specialize("semseg").eval(), torch.from_numpy(x1))
    print(f"\nbatch 1, {hw[0]}x{hw[1]}, {args.pairs} alternating rounds, median ms (info) and median per-round ratios")
    print(f"dense ViT FLOPs {fl_dense / 1e9:.2f} GFLOP")
    print("| graph | median ms | ratio vs dense ViT (ORT) | achieved GFLOP/s (dense-equivalent) |")
    print("|---|---|---|---|")
    for n in cands:
        ms = 1000 * statistics.median(times[n])
        print(f"| {n} | {ms:.1f} | {ratio(n, 'ort_dense_vit'):.2f}x | {fl_dense / (ms / 1000) / 1e9:.1f} "
              f"({fl_dense / (ms / 1000) / 1e9 / ceiling:.0%} of GEMM) |")
    ev = rm["tasks"]["semseg"]["int8"]["evaluation"]
    print(f"\nINT8 vs FP32 (M³ViT task model, ORT): speed-up {ratio('ort_moe_dense_dispatch', 'ort_moe_int8'):.2f}x; "
          f"{ev['metric']} fp32 {ev['fp32']:.2f} int8 {ev['quantized']:.2f} drop {ev['drop']:.2f} points "
          f"({ev['images']} held-out images)")
    pr = np.concatenate(s_pruned.run(None, {"images": x1}))
    full = np.concatenate(s_moe.run(None, {"images": x1}))
    print(f"pruned-vs-full output agreement (argmax, 1 image): {100 * np.mean(pr.argmax(1) == full.argmax(1)):.1f}%")


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


if __name__ == "__main__":
    main()
