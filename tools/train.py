#!/usr/bin/env python
"""Train a multi-task model: ``python tools/train.py --config configs/quickstart.yaml [--set k=v ...] [--resume]``.

Distributed: ``torchrun --nproc_per_node N tools/train.py --config ...``. A user error (config, data, checkpoint,
output folder) ends with one ``error:`` line and exit status 2 (config) or 1; ``VISION_MOE_DEBUG=1`` shows the
traceback instead. Ctrl-C stops the run and prints the last checkpoint and the command that continues from it.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import sys
from pathlib import Path

from vision_moe.cli import tool_parser
from vision_moe.config import ConfigError, load_config
from vision_moe.engine import train
from vision_moe.engine.checkpoint import CheckpointError, latest_checkpoint
from vision_moe.engine.data import TooManyBadSamples

# what bad input raises (the messages name the file / key / value); anything else is a bug and keeps its traceback
USER_ERRORS = (ConfigError, CheckpointError, TooManyBadSamples, ValueError, OSError)


def _discard_run(out: Path) -> None:
    """--overwrite: remove what a previous run wrote into ``out`` (checkpoints, metrics, TensorBoard events)."""
    if not out.is_dir():  # nothing to discard; a file in its place is refused by the trainer
        return
    for name in ("checkpoints", "tb"):
        if (out / name).is_dir():
            shutil.rmtree(out / name)
    for name in ("metrics.json", "metrics.json.unreadable"):
        (out / name).unlink(missing_ok=True)


def build_parser():
    p = tool_parser(__doc__.split("\n\n")[0], prog=Path(__file__).name)
    p.add_argument("--config", required=True, help="YAML experiment config")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value (dotted key, YAML value); repeatable (default: the config's values)",
    )
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument(
        "--overwrite", action="store_true", help="discard the checkpoints and metrics of a previous run in --out"
    )
    p.add_argument("--out", default=None, help="output folder (default: runs/<config file name>)")
    return p


def _interrupted(out: Path, argv: list[str]) -> str:
    """What Ctrl-C prints: where the last checkpoint is and the exact command that continues from it."""
    ckpt = latest_checkpoint(out)
    if ckpt is None:
        return (
            f"interrupted before the first checkpoint: nothing to resume in {out}; run the same command to start over"
        )
    args = [a for a in argv if a not in ("--overwrite", "--resume")] + ["--resume"]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    launcher = ["torchrun", "--nproc_per_node", str(world)] if world > 1 else ["python"]
    ran_as_script = Path(sys.argv[0]).resolve() == Path(__file__).resolve()
    script = sys.argv[0] if ran_as_script else os.path.relpath(__file__)  # as typed; else from here
    cmd = shlex.join([*launcher, script, *args])
    return f"interrupted; the last checkpoint is {ckpt}\ncontinue with: {cmd}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out or Path("runs") / Path(args.config).stem)
    if args.resume and args.overwrite:
        print("error: --resume and --overwrite exclude each other", file=sys.stderr)
        return 2
    main_rank = int(os.environ.get("RANK", "0")) == 0
    try:
        if args.overwrite and main_rank:
            _discard_run(out)
        train(cfg, out, resume=args.resume)
    except KeyboardInterrupt:
        if os.environ.get("VISION_MOE_DEBUG"):
            raise
        if main_rank:
            print(_interrupted(out, argv), file=sys.stderr)
        return 130  # 128 + SIGINT, as a shell reports a Ctrl-C
    except USER_ERRORS as e:
        if os.environ.get("VISION_MOE_DEBUG"):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if isinstance(e, OSError) and e.filename and str(e.filename) not in msg:
            msg = f"{e.filename}: {msg}"
        print(f"error: {msg}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
