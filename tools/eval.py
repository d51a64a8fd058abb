#!/usr/bin/env python
"""Evaluate a checkpoint on one task's held-out split: ``python tools/eval.py --checkpoint DIR --task semseg``.

Prints the same metrics the trainer reported for that checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from vision_moe.engine import CheckpointError, evaluate_checkpoint


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (with model.safetensors + config.json)")
    p.add_argument("--task", required=True, help="task to evaluate")
    p.add_argument("--max-batches", type=int, default=None, help="limit the number of batches (default: as trained)")
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--capacity-factor",
        type=float,
        default=None,
        help="evaluate with this per-image expert capacity (what a capacity-bounded export runs); "
        "also prints the fraction of dropped expert assignments",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        metrics = evaluate_checkpoint(args.checkpoint, args.task, args.max_batches, args.device, args.capacity_factor)
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({args.task: metrics}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
