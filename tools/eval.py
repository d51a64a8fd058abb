#!/usr/bin/env python
"""Evaluate a checkpoint on one task's held-out split and print the metrics the trainer reported for it.

  python tools/eval.py --checkpoint runs/x/checkpoints/step_0001200 --task semseg
  python tools/eval.py --checkpoint CKPT --task semseg --data-root /data/copy_of_the_dataset

The dataset is found where the checkpoint says training read it (an absolute path) or at --data-root; built-in data
that is not there is generated again (deterministic: the same images), with a progress bar.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from vision_moe.cli import tool_parser
from vision_moe.engine import CheckpointError, evaluate_checkpoint
from vision_moe.engine.trainer import resolve_device
from vision_moe.moe.dispatch import resolve_capacity


def build_parser():
    p = tool_parser(__doc__, prog=Path(__file__).name)
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (with model.safetensors + config.json)")
    p.add_argument("--task", required=True, help="task to evaluate (one of the checkpoint's tasks)")
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
        help="evaluate with this per-image expert capacity (what a capacity-bounded export runs) and print the "
        "fraction of dropped expert assignments (default: the checkpoint's own, dropless unless trained with one)",
    )
    p.add_argument(
        "--data-root",
        default=None,
        help="where the task's dataset is now, for a checkpoint trained elsewhere; for the built-in data its folder "
        "or the parent folder (default: the root stored in the checkpoint)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
        metrics = evaluate_checkpoint(
            args.checkpoint,
            args.task,
            args.max_batches,
            args.device,
            args.capacity_factor,
            data_root=args.data_root,
            progress=True,
        )
    except (CheckpointError, ValueError, OSError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if msg.startswith("capacity_factor="):  # the model's own check (no MoE layers), under the flag's name
            msg = f"--capacity-factor {msg.removeprefix('capacity_factor=')}"
        print(f"error: {msg}", file=sys.stderr)
        return 2
    print(json.dumps({args.task: metrics}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
