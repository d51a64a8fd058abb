#!/usr/bin/env python
"""ONNX Runtime CPU latency of a specialised M³ViT task model (exact dropless graph, and capacity-bounded graphs)
vs the dense ViT of the same active width vs PyTorch eager, the Mod-Squad-pruned task model, and INT8 vs FP32
(speed-up and metric drop). BENCHMARKS.md rules: fixed
threads, alternating A/B pairs after warm-up, median of per-pair ratios, machine info and a GEMM ceiling.

  python benchmarks/bench_export.py --model small --pairs 10
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import gemm_gflops, machine_info, paired_ratio, set_threads, time_alternating  # noqa: E402


def flops(module: torch.nn.Module, x: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc, torch.no_grad():
        module(x)
    return float(fc.get_total_flops())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="small", choices=["tiny", "small", "base"])
    p.add_argument("--img", type=int, default=224)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--pairs", type=int, default=10)
    p.add_argument("--calib", type=int, default=8)
    p.add_argument(
        "--capacity-factors", type=float, nargs="*", default=[1.0, 1.25], help="capacity-bounded graphs to time"
    )
    args = p.parse_args()
    set_threads(args.threads)
    import vision_moe
    from vision_moe.deploy import ExportConfig, export_model, ort_session
    from vision_moe.deploy.prepost import sample_images
    from vision_moe.deploy.quantize import quantize_int8

    print("machine:", json.dumps(machine_info()))
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
    pruned = vision_moe.create_model(f"m3vit_{args.model}_patch16_224", tasks=tasks, num_classes=1000).eval()
    pruned.load_state_dict(moe.state_dict())
    pruned.prune_experts("semseg", torch.from_numpy(images[: args.calib]), keep=moe.moe_layers()[0][1].top_k)
    out = Path(tempfile.mkdtemp(prefix="bench_export_"))
    cfg = dict(tasks=["semseg"], img_size=hw, parity_images=1)
    rm = export_model(  # INT8 for ONNX Runtime on this CPU (uint8 activations) ...
        moe,
        ExportConfig(
            out_dir=str(out / "moe"),
            precision="int8",
            int8_runtime="onnxruntime",
            calib_images=args.calib,
            eval_images=args.calib,
            **cfg,
        ),
    )
    # ... and the TensorRT file (symmetric int8 activations), timed here for information only
    quantize_int8(out / "moe/semseg.onnx", out / "moe/semseg.int8.onnx", images[: args.calib], runtime="tensorrt")
    export_model(dense, ExportConfig(out_dir=str(out / "dense"), **cfg))
    export_model(pruned, ExportConfig(out_dir=str(out / "pruned"), **cfg))
    dropped = {}
    for cf in args.capacity_factors:  # per-image expert capacity: the gather dispatcher (grouped Conv experts)
        r = export_model(moe, ExportConfig(out_dir=str(out / f"cap{cf:g}"), capacity_factor=cf, **cfg))
        dropped[cf] = r["tasks"]["semseg"]["routing"]["dropped_fraction"]
    s_moe = ort_session(out / "moe/semseg.onnx", args.threads)
    s_int8 = ort_session(out / "moe/semseg.int8.ort.onnx", args.threads)
    s_int8_trt = ort_session(out / "moe/semseg.int8.onnx", args.threads)
    s_dense = ort_session(out / "dense/semseg.onnx", args.threads)
    s_pruned = ort_session(out / "pruned/semseg.onnx", args.threads)
    spec = moe.specialize("semseg").eval()  # eager, default sort dispatcher
    ort = lambda s: lambda x: s.run(None, {"images": x})  # noqa: E731

    def eager(x):
        with torch.inference_mode():
            spec(torch.from_numpy(x))

    cands = {
        "ort_moe_dense_dispatch": ort(s_moe),
        "ort_dense_vit": ort(s_dense),
        **{
            f"ort_moe_capacity_{cf:g}": ort(ort_session(out / f"cap{cf:g}/semseg.onnx", args.threads)) for cf in dropped
        },
        "torch_eager_moe": eager,
        "ort_moe_pruned_topk": ort(s_pruned),
        "ort_moe_int8": ort(s_int8),
        "ort_moe_int8_tensorrt_qdq": ort(s_int8_trt),
    }
    res = time_alternating({n: (lambda f=f: f(x1)) for n, f in cands.items()}, "ort_dense_vit", args.pairs, 3)
    int8_speedup = paired_ratio(res, "ort_moe_dense_dispatch", "ort_moe_int8")
    int8_trt_speedup = paired_ratio(res, "ort_moe_dense_dispatch", "ort_moe_int8_tensorrt_qdq")
    fl_dense = flops(dense.specialize("semseg").eval(), torch.from_numpy(x1))
    print(f"\nbatch 1, {hw[0]}x{hw[1]}, {args.pairs} alternating rounds, median ms (info) and median per-round ratios")
    print(f"dense ViT FLOPs {fl_dense / 1e9:.2f} GFLOP")
    print("| graph | median ms | ratio vs dense ViT (ORT) | achieved GFLOP/s (dense-equivalent) |")
    print("|---|---|---|---|")
    for n in cands:
        ms = res[n]["ms"]
        print(
            f"| {n} | {ms:.1f} | {res[n]['ratio']:.2f}x | {fl_dense / (ms / 1000) / 1e9:.1f} "
            f"({fl_dense / (ms / 1000) / 1e9 / ceiling:.0%} of GEMM) |"
        )
    ev = rm["tasks"]["semseg"]["int8"]["evaluation"]
    print(
        f"\nINT8 (ONNX Runtime file, uint8 activations) vs FP32 (M³ViT task model, ORT): speed-up {int8_speedup:.2f}x; "
        f"{ev['metric']} fp32 {ev['fp32']:.2f} int8 {ev['quantized']:.2f} drop {ev['drop']:.2f} points "
        f"({ev['images']} held-out images)"
    )
    print(
        f"INT8 TensorRT file (symmetric int8 activations) on ONNX Runtime CPU: {int8_trt_speedup:.2f}x "
        "(information: its speed belongs to TensorRT on the Jetson)"
    )
    for cf, d in dropped.items():
        print(
            f"capacity factor {cf:g}: {100 * d:.1f}% of expert assignments dropped on {cfg['parity_images']} image "
            "(random weights; the quality effect on a trained model: tools/eval.py --capacity-factor)"
        )
    pr = np.concatenate(s_pruned.run(None, {"images": x1}))
    full = np.concatenate(s_moe.run(None, {"images": x1}))
    print(f"pruned-vs-full output agreement (argmax, 1 image): {100 * np.mean(pr.argmax(1) == full.argmax(1)):.1f}%")


if __name__ == "__main__":
    main()
