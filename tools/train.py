#!/usr/bin/env python
"""Train a multi-task model: ``python tools/train.py --config configs/quickstart.yaml [--set k=v ...] [--resume]``.

Distributed: ``torchrun --nproc_per_node N tools/train.py --config ...``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from vision_moe.config import ConfigError, load_config
from vision_moe.engine import train


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="YAML experiment config")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value (dotted key, YAML value); repeatable",
    )
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--out", default=None, help="output folder (default: runs/<config name>)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    out = args.out or str(Path("runs") / Path(args.config).stem)
    train(cfg, out, resume=args.resume)
    return 0


if __name__ == "__main__":
    sys.exit(main())
