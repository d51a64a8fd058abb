#!/usr/bin/env python
"""DeMoE's exported graphs in ONNX Runtime on this CPU (ratios measured in one run, BENCHMARKS.md):

- a per-degradation graph (``specialize(d)``) against the dense NAFNet of the same active width (``nafnet_*``);
- the static-shape "auto" graph (classifier + every expert run and masked) against the per-degradation graph;
- the INT8 per-degradation graph (QDQ, 7-bit weights, ONNX Runtime's integer kernels) against its FP32 graph, and,
  with ``--checkpoint``, its PSNR drop on the checkpoint's held-out images through the shared evaluator.

  python benchmarks/bench_demoe.py --size 256 --rounds 15
  python benchmarks/bench_demoe.py --checkpoint runs/quickstart_deblur/checkpoints/step_0000700 --size 256

Without ``--checkpoint`` the graphs are random-init ``demoe_tiny`` / ``nafnet_tiny`` (``--model`` for another
size): speed only. Batch 1, one thread unless ``--threads``, median of per-round ratios.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import gemm_gflops, machine_info, paired_ratio, set_threads, time_alternating  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="a trained DeMoE checkpoint (INT8 PSNR drop on its data)")
    p.add_argument("--model", default="demoe_tiny", help="DeMoE entry point without --checkpoint (demoe_tiny)")
    p.add_argument("--size", type=int, default=256, help="square input size in pixels (default 256)")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime / torch threads (default 1)")
    p.add_argument("--rounds", type=int, default=15, help="alternating timing rounds (default 15)")
    p.add_argument("--eval-images", type=int, default=40, help="held-out images per degradation for the drop")
    args = p.parse_args(argv)
    set_threads(args.threads)
    import numpy as np
    import torch

    import vision_moe
    from vision_moe.deploy import ExportConfig, export_model
    from vision_moe.deploy.onnx_export import ort_session
    from vision_moe.deploy.pipeline import restoration_network

    print("machine:", json.dumps(machine_info()))
    print(f"threads {args.threads}, GEMM ceiling {gemm_gflops():.1f} GFLOP/s (fp32 1024^3)")
    exp = None
    if args.checkpoint:
        from vision_moe.config import config_from_dict
        from vision_moe.deploy.source import load_checkpoint_source

        model, cfg, _, _ = load_checkpoint_source(args.checkpoint)
        net = restoration_network(model)
        exp = config_from_dict(dict(cfg["experiment"]), args.checkpoint)
        dense_name = cfg["model"]["backbone"].replace("demoe", "nafnet")
        kwargs = dict(cfg["model"]["backbone_kwargs"])
    else:
        torch.manual_seed(0)
        net = vision_moe.create_model(args.model)
        dense_name, kwargs = args.model.replace("demoe", "nafnet"), {}
    if not getattr(net, "classifier_routed", False):
        print(f"error: {args.checkpoint or args.model} is not a classifier-routed DeMoE model", file=sys.stderr)
        return 2
    keep = ("width", "enc_blocks", "middle_blocks", "dec_blocks")
    dense = vision_moe.create_model(
        dense_name, tasks=list(net.tasks), **{k: v for k, v in kwargs.items() if k in keep}
    ).eval()
    task = net.tasks[0]
    hw = (args.size, args.size)
    out = Path(tempfile.mkdtemp(prefix="bench_demoe_"))
    common = dict(img_size=hw, parity_images=1, calib_images=16, eval_images=args.eval_images)
    rep = export_model(
        net,
        ExportConfig(
            out_dir=str(out / "demoe"), precision="int8", int8_runtime="onnxruntime", experiment=exp, **common
        ),
    )
    export_model(dense, ExportConfig(out_dir=str(out / "dense"), tasks=[task], **common))
    sessions = {
        "per_degradation": ort_session(out / "demoe" / f"{task}.onnx", args.threads),
        "dense_nafnet": ort_session(out / "dense" / f"{task}.onnx", args.threads),
        "auto": ort_session(out / "demoe" / "auto.onnx", args.threads),
        "int8": ort_session(out / "demoe" / f"{task}.int8.ort.onnx", args.threads),
    }
    x = np.random.default_rng(0).uniform(-1, 1, (1, 3, *hw)).astype(np.float32)
    res = time_alternating(
        {k: (lambda s=s: s.run(None, {"images": x})) for k, s in sessions.items()}, "dense_nafnet", rounds=args.rounds
    )
    params = {
        "per_degradation": sum(p.numel() for p in net.specialize(task).parameters()),
        "dense_nafnet": sum(p.numel() for p in dense.parameters()),
        "auto (whole model)": sum(p.numel() for p in net.parameters()),
    }
    print(f"\n{task} graphs at {hw[0]}x{hw[1]}, batch 1 (ms: median; ratio: median of per-round ratios)")
    for k, r in res.items():
        print(f"  {k:<16} {r['ms']:8.2f} ms")
    print(f"  per-degradation / dense NAFNet : {paired_ratio(res, 'per_degradation', 'dense_nafnet'):.3f}")
    print(f"  auto / per-degradation         : {paired_ratio(res, 'auto', 'per_degradation'):.3f}")
    print(f"  INT8 / FP32 per-degradation    : {paired_ratio(res, 'int8', 'per_degradation'):.3f}")
    print("  parameters (M): " + ", ".join(f"{k} {v / 1e6:.3f}" for k, v in params.items()))
    if exp is not None:
        print("\nINT8 PSNR drop (dB) through the evaluator on the held-out images:")
        for t, e in rep["tasks"].items():
            for d, ev in e["int8"]["evaluation"].items():
                name = f"{t}.int8"
                print(f"  {name:<16} {d:<10} fp32 {ev['fp32']:.2f}  int8 {ev['quantized']:.2f}  drop {ev['drop']:+.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
