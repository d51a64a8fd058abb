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
import time
from pathlib import Path

from vision_moe.cli import tool_parser


def build_parser() -> argparse.ArgumentParser:
    p = tool_parser(__doc__, prog=Path(__file__).name)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="checkpoint folder (config.json + model.safetensors)")
    src.add_argument("--model", help="registered model name, with random weights (seeded by --seed)")
    p.add_argument(
        "--tasks-def",
        default=None,
        help="with --model: JSON task -> classes, e.g. '{\"semseg\": 7}', builds a model with a head per task "
        "(default: none: the model is an image classifier routed per task)",
    )
    p.add_argument("--head", default=None, help="with --model and --tasks-def: dense head (default: setr_pup)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="with --model: backbone override, a JSON value; repeatable (default: none)",
    )
    p.add_argument("--seed", type=int, default=0, help="with --model: the seed of the random weights")
    t = p.add_mutually_exclusive_group(required=True)
    t.add_argument("--task", action="append", help="task to export (repeatable)")
    t.add_argument("--all-tasks", action="store_true", help="export every task of the model")
    p.add_argument("--multitask", action="store_true", help="also write multitask.onnx (task as an int64 input)")
    p.add_argument(
        "--format",
        choices=["onnx", "engine"],
        default="onnx",
        help="engine: also build TensorRT engines here (needs TensorRT and a GPU); build_engine.sh is written always",
    )
    p.add_argument("--precision", choices=["fp32", "fp16", "int8"], default="fp32", help="variant written next to fp32")
    p.add_argument(
        "--int8-runtime",
        choices=["tensorrt", "onnxruntime"],
        default=None,
        help="with --precision int8: the file for TensorRT (symmetric int8; T.int8.onnx) or for ONNX Runtime on a "
        "CPU (uint8 activations, 7-bit weights, no saturation on any x86 CPU; T.int8.ort.onnx) (default: tensorrt)",
    )
    p.add_argument(
        "--capacity-factor",
        type=float,
        default=None,
        help="per-image expert capacity (V-MoE inference): the graph runs each expert on at most "
        "factor * tokens * top_k / experts tokens instead of every token (default: the model's own, dropless)",
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
        help="with --precision int8: a folder of images to calibrate on instead (default: the training split of "
        "the labelled data, else scikit-image's bundled photographs)",
    )
    p.add_argument("--calib-images", type=int, default=None, help="INT8 calibration images (default: 16)")
    p.add_argument(
        "--eval-images", type=int, default=None, help="held-out images for the INT8 / FP16 comparison (default: 16)"
    )
    b = p.add_mutually_exclusive_group()
    b.add_argument("--batch", type=int, default=1, help="static batch size of the graphs")
    b.add_argument("--dynamic-batch", action="store_true", help="a symbolic batch dimension instead")
    p.add_argument("--img-size", type=int, nargs=2, metavar=("H", "W"), help="input size (default: the model's)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: 17 with torchscript, 18 with dynamo)")
    p.add_argument("--exporter", choices=["torchscript", "dynamo"], default="torchscript", help="torch.onnx exporter")
    p.add_argument("--out", required=True, help="output folder (new or empty; see --overwrite)")
    p.add_argument(
        "--overwrite", action="store_true", help="replace the contents of a non-empty --out once the export succeeded"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no stage lines, only the summary")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """The command-line values that are wrong whatever the model, or that would be silently ignored: ValueError
    naming the flag, before anything is built or written."""
    if args.img_size and min(args.img_size) < 1:
        raise ValueError(f"--img-size must be positive, got {args.img_size[0]} {args.img_size[1]}")
    if args.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {args.batch}")
    if args.checkpoint:
        for flag, given in (("--tasks-def", args.tasks_def), ("--head", args.head), ("--set", args.set)):
            if given:
                raise ValueError(f"{flag} is for --model; a checkpoint's config.json defines its model and heads")
    elif args.head is not None and not args.tasks_def:
        raise ValueError("--head needs --tasks-def (a model without task heads has no dense head to choose)")
    int8, variant = args.precision == "int8", args.precision in ("fp16", "int8")
    for flag, given, ok, what in (
        ("--int8-runtime", args.int8_runtime, int8, "--precision int8"),
        ("--calib-data", args.calib_data, int8, "--precision int8"),
        ("--calib-images", args.calib_images, int8, "--precision int8"),
        ("--data", args.data, variant, "--precision fp16 or int8 (the fp32 graph is checked against PyTorch)"),
        ("--eval-images", args.eval_images, variant, "--precision fp16 or int8"),
    ):
        if given is not None and not ok:
            raise ValueError(f"{flag} acts only with {what}; got --precision {args.precision}")
    least = args.batch if int8 else 1  # INT8 calibrates / evaluates whole batches
    for flag, v in (("--calib-images", args.calib_images), ("--eval-images", args.eval_images)):
        if v is not None and v < least:
            why = " (--batch: INT8 runs whole batches)" if least > 1 else ""
            raise ValueError(f"{flag} must be >= {least}{why}, got {v}")
    if args.data and not os.path.isfile(args.data):
        raise ValueError(f"--data {args.data}: not a file; expected a training config (YAML)")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out}: exists and is not a folder; expected a folder (created if missing)")
    if os.path.isdir(args.out) and os.listdir(args.out) and not args.overwrite:
        raise ValueError(
            f"--out {args.out}: the folder is not empty; choose a new one, or --overwrite to replace its contents"
        )


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
    import torch

    import vision_moe

    torch.manual_seed(args.seed)  # random weights: the same command writes the same files
    tasks = _tasks_def(args.tasks_def) if args.tasks_def else None
    what = " ".join(f"--set {kv}" for kv in args.set) or "its defaults"
    try:
        if tasks is not None:
            from vision_moe.models.multitask import build_multitask_model

            img = overrides.pop("img_size", tuple(args.img_size) if args.img_size else 224)
            model = build_multitask_model(args.model, tasks, img_size=img, head=args.head or "setr_pup", **overrides)
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
    info = dict(model=args.model, overrides=overrides, weights=f"random init (seed {args.seed})")
    return model, info, mean, std, exp


def _variant_lines(prec: str, entry: dict) -> str:
    """What was measured for an FP16 / INT8 variant, and on what, in plain words."""
    evs = entry["evaluation"]
    evs = {"": evs} if "metric" in evs else evs  # a restoration graph: one evaluation per degradation it serves
    lines = []
    for task, ev in evs.items():
        what = f"{task}: " if task else ""
        lines.append(
            f"    {prec}: {what}{ev['metric']}: fp32 {ev['fp32']:.2f}, {prec} {ev['quantized']:.2f} "
            f"(drop {ev['drop']:.2f})"
        )
    lines.append(f"      measured with {next(iter(evs.values()))['measured_with']}")
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


def _summary(args: argparse.Namespace, report: dict, seconds: float) -> None:
    out = Path(args.out)
    print(f"\nwrote {out} in {seconds:.0f} s ({_size(sum(f.stat().st_size for f in out.iterdir()))}):")
    for e in report["tasks"].values():
        par = max(v["rel"] for v in e["fp32"]["parity"]["outputs"].values())
        line = f"  {e['fp32']['path']:<24} {e['kind']:<14} {e['fp32']['nodes']:>4} nodes, fp32 rel err {par:.2e}"
        if e.get("routing", {}).get("capacity_factor") is not None:
            r = e["routing"]
            line += f", capacity {r['capacity_factor']:g} (dropped {100 * r['dropped_fraction']:.1f}% assignments)"
        if "fp16" in e:
            line += f", fp16 rel err {max(v['rel'] for v in e['fp16']['parity']['outputs'].values()):.2e}"
        print(line)
        for prec in ("fp16", "int8"):
            if "evaluation" in e.get(prec, {}):
                print(_variant_lines(prec, e[prec]))
    if "multitask" in report:
        worst = max(v["rel"] for v in report["multitask"]["vs_per_task_graph"].values())
        print(f"  multitask.onnx  tasks {report['multitask']['tasks']}, max rel diff vs per-task graphs {worst:.2e}")
    built = [e["engine"] for e in report["tasks"].values() if e["engine"]["built"]]
    print("\nnext:")
    if built:
        print(f"  TensorRT engines built here: {', '.join(b['engine'] for b in built)}")
    prec = report["tasks"][next(iter(report["tasks"]))]["engine"]["precision"]
    print(f"  on the Jetson: copy {out} and run: python3 export/build_engine.py {out} --precision {prec}")
    run = "export/restore_images.py" if "multiple" in report["input"] else "export/infer.py"  # restoration graphs
    extra = " --input photos/ --out restored/" if "multiple" in report["input"] else ""
    print(f"               (or: bash {out / 'build_engine.sh'}), then python3 {run} {out} --precision {prec}{extra}")
    print(f"  report: {out / 'export_report.json'}")


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    stages = logging.getLogger("vision_moe.deploy.stages")  # the pipeline's lines: export, parity, variants...
    handler = _Stdout()
    if not args.quiet:
        stages.addHandler(handler)
        stages.setLevel(logging.INFO)
        stages.propagate = False
    try:
        return _run(args)
    finally:
        stages.removeHandler(handler)


class _Stdout(logging.Handler):
    """Stage lines to whatever sys.stdout is when they are emitted, indented."""

    def emit(self, record: logging.LogRecord) -> None:
        print("  " + record.getMessage(), flush=True)


def _run(args: argparse.Namespace) -> int:
    from vision_moe.deploy import ExportConfig, export_model

    t0 = time.perf_counter()
    try:
        check_args(args)
        model, info, mean, std, experiment = build(args)
        tasks = None if args.all_tasks else args.task
        cfg = ExportConfig(
            out_dir=args.out,
            tasks=tasks,
            fmt=args.format,
            precision=args.precision,
            int8_runtime=args.int8_runtime or "tensorrt",
            batch=args.batch,
            dynamic_batch=args.dynamic_batch,
            img_size=tuple(args.img_size) if args.img_size else None,
            opset=args.opset,
            exporter=args.exporter,
            calib_data=args.calib_data,
            experiment=experiment,
            calib_images=args.calib_images or 16,
            eval_images=args.eval_images or 16,
            multitask=args.multitask,
            capacity_factor=args.capacity_factor,
            overwrite=args.overwrite,
            mean=mean,
            std=std,
        )
        report = export_model(model, cfg, info)
    except (ValueError, TypeError, RuntimeError, AssertionError, FileNotFoundError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted: nothing was written to {args.out} (exports are moved into place when done)")
        return 130
    _summary(args, report, time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
