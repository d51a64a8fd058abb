"""Training-step time of a config under variants, run one after another in one process on one device.

Each variant is a set of ``--set`` overrides on the config; each trains ``--steps`` steps with the real
:class:`~vision_moe.engine.trainer.Trainer` (data loading, all tasks, optimizer; the end-of-run evaluation limited
to one batch) and reports wall ms per step and its ratio to the first variant. The first variant runs again last,
so the spread between its two runs says how far one run can be trusted on that machine.

  python benchmarks/bench_train_step.py --device cuda --steps 300                       # fp32 / bf16 / fp16 AMP
  python benchmarks/bench_train_step.py --device cuda --variant "w4:data.num_workers=4"  # add a variant
  python benchmarks/bench_train_step.py --device cpu --steps 150 --variant "quickstart:" --variant \
    "former:model.det_channels=64,model.det_num_convs=2,model.backbone_kwargs.stem_channels=[24,48,48,96,96]"
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import gemm_gflops, machine_info  # noqa: E402

DEFAULT_VARIANTS = [
    "fp32:",
    "bf16:train.amp=true,train.amp_dtype=bf16",
    "fp16:train.amp=true,train.amp_dtype=fp16",
]


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``NAME:key=value,key=value`` -> (NAME, [key=value, ...]); commas inside [...] belong to a list value."""
    name, _, sets = text.partition(":")
    if not name:
        raise SystemExit(f"--variant {text!r}: expected NAME:key=value,key=value")
    out, depth, cur = [], 0, ""
    for ch in sets:
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return name, [s for s in [*out, cur] if s]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/quickstart.yaml")
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--variant", action="append", default=None, help="NAME:key=value,...; repeatable")
    args = p.parse_args()
    import torch

    from vision_moe.config import load_config
    from vision_moe.engine.trainer import Trainer

    variants = [parse_variant(v) for v in (args.variant or DEFAULT_VARIANTS)]
    variants.append((variants[0][0] + "_again", variants[0][1]))
    common = [f"train.steps={args.steps}", f"train.device={args.device}", "train.progress=false"]
    common += ["train.tensorboard=false", "train.ckpt_every=0", "train.eval_every=0", "train.eval_max_batches=1"]
    res: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, sets in variants:
            cfg = load_config(args.config, sets + common)
            tr = Trainer(cfg, Path(tmp) / name)
            t = time.perf_counter()
            tr.fit()
            ms = 1000 * (time.perf_counter() - t) / args.steps
            res[name] = {"sets": sets, "ms_per_step": round(ms, 1)}
            print(f"{name:14s} {ms:7.1f} ms/step  ({', '.join(sets) or 'config as is'})", flush=True)
    base = res[variants[0][0]]["ms_per_step"]
    for r in res.values():
        r["ratio"] = round(r["ms_per_step"] / base, 3)
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    machine = {**machine_info(), "device": dev, "gemm_gflops_1024": round(gemm_gflops(), 1)}  # the core's fp32 ceiling
    print(json.dumps({"machine": machine, "config": args.config, "results": res}))


if __name__ == "__main__":
    main()
