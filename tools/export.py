#!/usr/bin/env python
"""Export task-specialised ONNX graphs (and TensorRT engines or their build scripts) with verified parity.

python tools/export.py --checkpoint runs/x/checkpoints/step_0002900 --task semseg --precision int8 --out out/
python tools/export.py --model m3vit_tiny_patch16_224 --set depth=2 --all-tasks --multitask --out out/
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="checkpoint folder (config.json + model.safetensors)")
    src.add_argument("--model", help="registered model name (random weights unless --checkpoint)")
    p.add_argument(
        "--tasks-def",
        default=None,
        help="with --model: JSON task -> classes, e.g. '{\"semseg\": 7}' builds "
        "a MultiTaskModel; without it the model's own classifier serves its tasks",
    )
    p.add_argument("--head", default="setr_pup", help="with --model and --tasks-def: dense head")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="backbone override (JSON value)")
    t = p.add_mutually_exclusive_group(required=True)
    t.add_argument("--task", action="append", help="task to export (repeatable)")
    t.add_argument("--all-tasks", action="store_true")
    p.add_argument("--multitask", action="store_true", help="also write multitask.onnx (task as an int64 input)")
    p.add_argument("--format", choices=["onnx", "engine"], default="onnx")
    p.add_argument("--precision", choices=["fp32", "fp16", "int8"], default="fp32")
    p.add_argument(
        "--int8-runtime",
        choices=["tensorrt", "onnxruntime"],
        default="tensorrt",
        help="INT8 file for TensorRT (symmetric int8 activations; T.int8.onnx) or for ONNX Runtime on an x86 CPU "
        "(uint8 activations; T.int8.ort.onnx)",
    )
    p.add_argument(
        "--capacity-factor",
        type=float,
        default=None,
        help="per-image expert capacity (V-MoE inference): the graph runs each expert on at most "
        "factor * tokens * top_k / experts tokens instead of every token; default: the model's own (dropless)",
    )
    p.add_argument(
        "--data",
        default=None,
        metavar="CONFIG",
        help="training config (YAML) whose datasets give labelled data: INT8 calibration on the training split, "
        "the INT8 / FP16 metric drop on the held-out split (default: a checkpoint's own training config; with "
        "--model and no --data the drop is agreement with the FP32 graph on unlabelled photographs)",
    )
    p.add_argument(
        "--calib-data",
        default=None,
        metavar="DIR",
        help="folder of images to calibrate INT8 on instead (default: the training split of the labelled data, "
        "else scikit-image's bundled photographs)",
    )
    p.add_argument("--calib-images", type=int, default=16, help="INT8 calibration images (default 16)")
    p.add_argument(
        "--eval-images", type=int, default=16, help="held-out images for the INT8 / FP16 metric drop (default 16)"
    )
    b = p.add_mutually_exclusive_group()
    b.add_argument("--batch", type=int, default=1)
    b.add_argument("--dynamic-batch", action="store_true")
    p.add_argument("--img-size", type=int, nargs=2, metavar=("H", "W"))
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--exporter", choices=["torchscript", "dynamo"], default="torchscript")
    p.add_argument("--out", required=True)
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """The command-line values that are wrong whatever the model: ValueError naming the flag, before anything is
    built or written."""
    if args.img_size and min(args.img_size) < 1:
        raise ValueError(f"--img-size must be positive, got {args.img_size[0]} {args.img_size[1]}")
    if args.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {args.batch}")
    least = args.batch if args.precision == "int8" else 1  # INT8 calibrates / evaluates whole batches
    for flag, v in (("--calib-images", args.calib_images), ("--eval-images", args.eval_images)):
        if v < least:
            why = " (--batch: INT8 runs whole batches)" if least > 1 else ""
            raise ValueError(f"{flag} must be >= {least}{why}, got {v}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out}: exists and is not a folder; expected a folder (created if missing)")


def _tasks_def(text: str) -> dict:
    try:
        tasks = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--tasks-def {text!r}: not valid JSON ({e}); expected e.g. '{{\"semseg\": 7}}'") from None
    if not isinstance(tasks, dict) or not tasks:
        raise ValueError(
            f"--tasks-def {text!r}: expected a non-empty JSON object task -> classes, e.g. '{{\"semseg\": 7}}'"
        )
    for task, n in tasks.items():
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"--tasks-def: task {task!r} has {n!r} classes; expected an integer >= 1 or null")
    return tasks


def experiment_config(args: argparse.Namespace, checkpoint_cfg: dict | None):
    """The training config whose datasets give labelled data: --data, else the checkpoint's own, else None."""
    from vision_moe.config import config_from_dict, load_config

    if args.data:
        return load_config(args.data)
    if checkpoint_cfg and checkpoint_cfg.get("experiment"):
        return config_from_dict(dict(checkpoint_cfg["experiment"]), args.checkpoint)
    return None


def build(args: argparse.Namespace):
    """(model, info, mean, std, experiment) from the arguments."""
    from vision_moe.deploy.source import load_checkpoint_source, parse_overrides

    overrides = parse_overrides(args.set)
    if args.checkpoint:
        model, cfg, mean, std = load_checkpoint_source(args.checkpoint, overrides)
        info = dict(checkpoint=args.checkpoint, config=cfg.get("model"))
        return model, info, mean, std, experiment_config(args, cfg)
    import vision_moe

    tasks = _tasks_def(args.tasks_def) if args.tasks_def else None
    what = " ".join(f"--set {kv}" for kv in args.set) or "its defaults"
    try:
        if tasks is not None:
            from vision_moe.models.multitask import build_multitask_model

            img = overrides.pop("img_size", tuple(args.img_size) if args.img_size else 224)
            model = build_multitask_model(args.model, tasks, img_size=img, head=args.head, **overrides)
        else:
            if args.img_size and "img_size" not in overrides:
                overrides["img_size"] = tuple(args.img_size)
            model = vision_moe.create_model(args.model, **overrides)
    except (TypeError, ValueError, KeyError, AttributeError, RuntimeError) as e:
        if isinstance(e, ValueError) and str(e).startswith("unknown "):  # model / task / head: already one line
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        src = f"--tasks-def {args.tasks_def!r} " if tasks is not None else ""
        raise ValueError(
            f"--model {args.model} {src}with {what}: cannot build the model ({msg}); "
            "--set values are JSON (numbers, lists, true/false)"
        ) from None
    exp = experiment_config(args, None)
    mean, std = (tuple(exp.data.mean), tuple(exp.data.std)) if exp is not None else ((0.5,) * 3, (0.5,) * 3)
    return model, dict(model=args.model, overrides=overrides, weights="random init"), mean, std, exp


def _variant_lines(prec: str, entry: dict) -> str:
    """What was measured for an FP16 / INT8 variant, and on what, in plain words."""
    ev = entry["evaluation"]
    lines = [
        f"    {prec}: {ev['metric']}: fp32 {ev['fp32']:.2f}, {prec} {ev['quantized']:.2f} (drop {ev['drop']:.2f})",
        f"      measured with {ev['measured_with']}",
    ]
    cal = entry.get("calibration")
    if cal:
        lines.append(f"      calibrated on {cal['source']}")
        if cal.get("unreadable_images"):
            lines.append(f"      ({cal['unreadable_images']} unreadable image(s) in --calib-data skipped)")
    sat = entry.get("saturation")
    if sat is not None and not sat["saturation_free"]:
        from vision_moe.machine import int8_kernels

        k = int8_kernels()
        where = "this CPU" if k["saturates"] else "x86 CPUs without VNNI"
        lines.append(
            f"      warning: 8-bit weights can saturate ONNX Runtime's integer GEMMs on {where} "
            f"({len(sat['layers_at_risk'])} layers); this file is for TensorRT"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    from vision_moe.deploy import ExportConfig, export_model

    try:
        check_args(args)
        model, info, mean, std, experiment = build(args)
        tasks = None if args.all_tasks else args.task
        cfg = ExportConfig(
            out_dir=args.out,
            tasks=tasks,
            fmt=args.format,
            precision=args.precision,
            int8_runtime=args.int8_runtime,
            batch=args.batch,
            dynamic_batch=args.dynamic_batch,
            img_size=tuple(args.img_size) if args.img_size else None,
            opset=args.opset,
            exporter=args.exporter,
            calib_data=args.calib_data,
            experiment=experiment,
            calib_images=args.calib_images,
            eval_images=args.eval_images,
            multitask=args.multitask,
            capacity_factor=args.capacity_factor,
            mean=mean,
            std=std,
        )
        report = export_model(model, cfg, info)
    except (ValueError, TypeError, RuntimeError, AssertionError, FileNotFoundError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}/export_report.json")
    for task, e in report["tasks"].items():
        par = max(v["rel"] for v in e["fp32"]["parity"]["outputs"].values())
        line = f"  {task:<16} {e['kind']:<14} nodes {e['fp32']['nodes']:>4}  fp32 rel err {par:.2e}"
        if e.get("routing", {}).get("capacity_factor") is not None:
            r = e["routing"]
            line += f"  capacity {r['capacity_factor']:g} (dropped {100 * r['dropped_fraction']:.1f}% assignments)"
        if "fp16" in e:
            line += f"  fp16 rel err {max(v['rel'] for v in e['fp16']['parity']['outputs'].values()):.2e}"
        for prec in ("fp16", "int8"):
            if "evaluation" in e.get(prec, {}):
                line += "\n" + _variant_lines(prec, e[prec])
        if "engine" in e:
            line += "  engine built" if e["engine"]["built"] else f"  engine: run {e['engine']['script']}"
        print(line)
    if "multitask" in report:
        worst = max(v["rel"] for v in report["multitask"]["vs_per_task_graph"].values())
        print(f"  multitask.onnx  tasks {report['multitask']['tasks']}  max rel diff vs per-task graphs {worst:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
