#!/usr/bin/env python
"""INT8 on this CPU: which weight quantisation ONNX Runtime's integer kernels run without saturating, what each
variant costs in accuracy on a trained checkpoint's held-out data, and its speed against the FP32 graph.

  python benchmarks/bench_int8.py --checkpoint runs/quickstart/checkpoints/step_0002400 --eval-images 300

Variants of each task graph (QDQ, per-channel symmetric weights, the same calibration images):

- ``u8s8-8bit``: uint8 activations x 8-bit int8 weights (the ONNX Runtime file before 7-bit weights: its integer
  GEMMs saturate on x86 without VNNI);
- ``u8s8-7bit``: the same with weights on -64..64 (``--int8-runtime onnxruntime``: cannot saturate);
- ``u8u8``: uint8 weights (ONNX Runtime's U8U8 kernels widen to 16 bits: cannot saturate either);
- ``s8s8-tensorrt``: the TensorRT file (symmetric int8 activations, 8-bit weights).

Each is scored twice with the task's metric through the evaluator: as ONNX Runtime runs it on this CPU (its integer
kernels) and with the QDQ reference arithmetic (graph optimisations off: what a CPU that cannot saturate, or
TensorRT, computes). Speed: batch 1, alternating rounds, median of per-round ratios against FP32 (BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, paired_ratio, set_threads, time_alternating  # noqa: E402

VARIANTS = {  # name: (runtime, weight_levels, unsigned_weights)
    "u8s8-8bit": ("onnxruntime", 127, False),
    "u8s8-7bit": ("onnxruntime", 64, False),
    "u8u8": ("onnxruntime", 127, True),
    "s8s8-tensorrt": ("tensorrt", 127, False),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="training checkpoint (its config gives the labelled data)")
    p.add_argument("--tasks", nargs="*", default=None, help="tasks to measure (default: all of the checkpoint's)")
    p.add_argument("--calib-images", type=int, default=128, help="calibration images, training split (default 128)")
    p.add_argument("--eval-images", type=int, default=300, help="held-out images scored (default 300)")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime / torch threads (default 1)")
    p.add_argument("--rounds", type=int, default=30, help="alternating timing rounds (default 30)")
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS), help="variants to run")
    args = p.parse_args(argv)
    set_threads(args.threads)
    from vision_moe.config import config_from_dict
    from vision_moe.deploy import ExportConfig, export_model, ort_session
    from vision_moe.deploy.evaluate import calibration_images, compare_graphs
    from vision_moe.deploy.quantize import quantize_int8
    from vision_moe.deploy.source import load_checkpoint_source

    print("machine:", json.dumps(machine_info()))
    model, cfg, mean, std = load_checkpoint_source(args.checkpoint)
    exp = config_from_dict(dict(cfg["experiment"]), args.checkpoint)
    tasks = args.tasks or list(model.tasks)
    out = Path(tempfile.mkdtemp(prefix="bench_int8_")) / "graphs"
    rep = export_model(model, ExportConfig(out_dir=str(out), tasks=tasks, parity_images=1, mean=mean, std=std))
    rows = []
    for task in tasks:
        meta = rep["tasks"][task]
        fp32 = out / f"{task}.onnx"
        hw = tuple(rep["input"]["shape"][2:])
        calib, _ = calibration_images(exp, task, args.calib_images, hw)
        sessions = {"fp32": ort_session(fp32, args.threads)}
        for name in args.variants:
            runtime, levels, unsigned = VARIANTS[name]
            path = out / f"{task}.{name}.onnx"
            sat = quantize_int8(fp32, path, calib, runtime=runtime, weight_levels=levels, unsigned_weights=unsigned)
            scores = {
                how: compare_graphs(fp32, path, task, meta, how, exp, limit=args.eval_images)
                for how in ("onnxruntime", "reference")
            }
            sessions[name] = ort_session(path, args.threads)
            rows.append(dict(task=task, variant=name, saturation_free=sat["saturation_free"], **scores))
        feed = {"images": calib[:1]}
        fns = {n: (lambda s=s: s.run(None, feed)) for n, s in sessions.items()}  # noqa: B023 (used in this loop)
        res = time_alternating(fns, "fp32", args.rounds, 3)
        for r in rows:
            if r["task"] == task:
                r["speedup"] = paired_ratio(res, "fp32", r["variant"])
                r["ms"] = res[r["variant"]]["ms"]
        print(f"{task}: fp32 {res['fp32']['ms']:.2f} ms per image (batch 1)", flush=True)
    print(f"\n{args.eval_images} held-out images, {args.calib_images} calibration images, {args.threads} thread(s)")
    print("| task | variant | saturation-free (weights) | metric | fp32 | this CPU's kernels (drop) "
          "| QDQ reference (drop) | speed-up vs fp32 |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        o, q = r["onnxruntime"], r["reference"]
        print(
            f"| {r['task']} | {r['variant']} | {'yes' if r['saturation_free'] else 'no'} | "
            f"{o['metric'].split(' (')[0]} | {o['fp32']:.2f} | {o['quantized']:.2f} ({o['drop']:+.2f}) | "
            f"{q['quantized']:.2f} ({q['drop']:+.2f}) | {r['speedup']:.2f}x |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
