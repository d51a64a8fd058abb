#!/usr/bin/env python
"""How a multi-task MoE model routes, as one page: ``report.html`` (self-contained), ``heatmap_<layer>.png``,
``routing.json``.

  python tools/analyze_routing.py --checkpoint runs/quickstart/checkpoints/step_0002400 --out runs/routing
  python tools/analyze_routing.py --model m3vit_tiny_patch16_224 --data configs/quickstart.yaml --out runs/routing

Per MoE layer: a task x expert heatmap and table of the per-expert load, the task-expert mutual information, the
experts each task needs for 90 % / 99 % of its assignments; per task: parameters and FLOPs (torch.utils.flop_counter)
of the full, specialised and Mod-Squad-pruned models. Routed images: the held-out split of the checkpoint's
training config (or of --data).
"""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="checkpoint folder (its config.json's experiment section gives the data)")
    p.add_argument("--model", help="or: a model name / weight tag / hf-hub: / local-dir: source, with --data")
    p.add_argument("--data", help="with --model: the YAML experiment config whose held-out data is routed")
    p.add_argument("--pretrained", action="store_true", help="with --model: load its pretrained weights")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--max-images", type=int, default=64, help="held-out images routed per task (default 64)")
    p.add_argument("--device", default="cpu", help="'cpu', 'cuda', 'cuda:N' or 'auto'")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from vision_moe.config import ConfigError, config_from_dict, load_config
    from vision_moe.engine.checkpoint import CheckpointError, load_model
    from vision_moe.engine.routing import collect_routing, held_out_batches, task_costs, write_report
    from vision_moe.engine.trainer import resolve_device

    try:
        if args.max_images < 1:
            raise ValueError(f"--max-images must be >= 1, got {args.max_images}")
        if bool(args.checkpoint) == bool(args.model) or bool(args.model) != bool(args.data):
            raise ValueError("give --checkpoint CKPT, or --model NAME with --data CONFIG")
        dev = resolve_device(args.device, "--device")
        if args.checkpoint:
            model, mc = load_model(
                args.checkpoint, require=("experiment",), why="its held-out data is what the report routes"
            )
            cfg = config_from_dict(dict(mc["experiment"]), str(args.checkpoint))
            tasks, title = list(model.tasks), f"routing of {args.checkpoint}"
        else:
            import vision_moe

            cfg = load_config(args.data)
            tasks = list(cfg.tasks)
            model = vision_moe.create_model(
                args.model, tasks=tasks, num_classes=0, img_size=cfg.model.img_size, pretrained=args.pretrained
            )
            title = f"routing of {args.model} on {args.data}"
        model.to(dev).eval()
        backbone = getattr(model, "backbone", model)
        if not backbone.moe_layers():
            raise ValueError(f"{args.checkpoint or args.model}: the model has no MoE layers to analyse")
        batches = list(held_out_batches(cfg, tasks, args.max_images))
        stats = collect_routing(backbone, batches, dev)
        costs = task_costs(model.cpu(), stats, batches[0][1][0])
        page = write_report(args.out, stats, costs, title)
    except (ConfigError, CheckpointError, ValueError, OSError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    s = stats.summary()
    for row in s["per_layer"]:
        print(f"{row['layer']}: MI {row['mutual_information_bits']:.3f} bits; experts for 90 % / 99 %: "
              + ", ".join(f"{t} {n['0.9']}/{n['0.99']}" for t, n in row["experts_needed"].items()))  # fmt: skip
    print(f"wrote {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
