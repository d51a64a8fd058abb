#!/usr/bin/env python
"""Evaluate a checkpoint on its held-out split(s) and print the metrics the trainer reported for it, as JSON.

  python tools/eval.py --checkpoint runs/x/checkpoints/step_0001200                 # every task of the checkpoint
  python tools/eval.py --checkpoint CKPT --task semseg --data-root /data/copy_of_the_dataset

One entry per task (every task of the checkpoint unless --task names one); for restoration tasks also ``mean``, over
all their held-out images. The dataset is found where the checkpoint says training read it (an absolute path) or
at --data-root; built-in data that is not there is generated again (deterministic: the same images), with a
progress bar.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from vision_moe.cli import tool_parser
from vision_moe.engine import CheckpointError
from vision_moe.engine.trainer import evaluate_checkpoint_tasks, resolve_device
from vision_moe.metrics import restoration_summary
from vision_moe.moe.dispatch import resolve_capacity
from vision_moe.tasks import is_restoration


def build_parser():
    p = tool_parser(__doc__, prog=Path(__file__).name)
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (with model.safetensors + config.json)")
    p.add_argument("--task", default=None, help="task to evaluate (default: every task of the checkpoint)")
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
        tasks = None if args.task is None else [args.task]
        metrics = evaluate_checkpoint_tasks(
            args.checkpoint,
            tasks,
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
    if all(is_restoration(t) for t in metrics):
        metrics["mean"] = restoration_summary(metrics)
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
