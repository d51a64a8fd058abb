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
from vision_moe.engine.trainer import resolve_device
from vision_moe.moe.dispatch import resolve_capacity


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (with model.safetensors + config.json)")
    p.add_argument("--task", required=True, help="task to evaluate")
    p.add_argument(
        "--max-batches",
        type=int,
        default=None,
        help="evaluate at most this many batches; 0 = the whole split (default: as trained, train.eval_max_batches)",
    )
    p.add_argument("--device", default="auto", help="'auto' (CUDA if available), 'cpu', 'cuda', 'cuda:N' or 'mps'")
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
        # the command-line values first: nothing is loaded for a run that cannot start
        if args.max_batches is not None and args.max_batches < 0:
            raise ValueError(f"--max-batches must be >= 0 (0 = the whole split), got {args.max_batches}")
        if args.capacity_factor is not None:
            try:  # the MoE layers' own rule (as ExportConfig.validate checks it), reported under the flag's name
                resolve_capacity(1, 1, 1, capacity_factor=args.capacity_factor)
            except ValueError as e:
                raise ValueError(f"--capacity-factor{str(e).removeprefix('capacity_factor')}") from None
        resolve_device(args.device, "--device")
        metrics = evaluate_checkpoint(args.checkpoint, args.task, args.max_batches, args.device, args.capacity_factor)
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({args.task: metrics}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
