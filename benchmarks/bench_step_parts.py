"""What each exact speed-up of the training step is worth: the step as the project runs it against the same step
with one (or every) speed-up reverted to its textbook form, alternated in one process on the same batches.

The speed-ups change no parameter and no result beyond float rounding (each has an equality test):

- ``gn``: the FCOS towers' GroupNorms run on an NCHW copy (PyTorch's CPU group norm is slow on channels-last);
  reverted: plain ``nn.GroupNorm`` on the channels-last maps.
- ``setr``: SETR-PUP's 1x1 classifier runs before its last 2x upsampling; reverted: upsample, then classify.
- ``fused``: AdamW's fused kernel (``optim.fused``); reverted: the foreach AdamW.
- ``attention``: the attention half of the first MoE block runs once for all tasks; reverted: once per task.

Each variant is a :class:`~vision_moe.engine.trainer.Trainer` built from the config (same seed, so the same
initial weights), stepping forward + backward + clipping + optimizer on batches loaded beforehand (data loading
left out: it runs in a separate process in training). Reports median ms per step and the median per-round ratio
to the project's step, with the machine line.

  python benchmarks/bench_step_parts.py --config configs/quickstart.yaml --rounds 5
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import gemm_gflops, machine_info, set_threads, time_alternating  # noqa: E402

PARTS = ("gn", "setr", "fused", "attention")


def _revert(trainer, parts: set[str]) -> None:
    import torch.nn as nn

    from vision_moe.heads.dense import SetrPupHead, tokens_to_map
    from vision_moe.heads.detection import convert_group_norms

    model = trainer.model
    if "gn" in parts:
        convert_group_norms(model, nn.GroupNorm)
    if "setr" in parts:

        def textbook(self, tokens, grid, image_size):  # upsample to full resolution, then classify
            return self.cls(self.decoder(tokens_to_map(self.ln(tokens), grid, self.num_prefix_tokens)))

        for m in model.modules():
            if isinstance(m, SetrPupHead):
                m.forward = types.MethodType(textbook, m)
    if "attention" in parts:
        backbone = model.backbone
        backbone._shares_attention_of = types.MethodType(lambda self, n: False, backbone)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/quickstart.yaml")
    p.add_argument("--batches", type=int, default=6, help="distinct batches, loaded before timing")
    p.add_argument("--steps", type=int, default=6, help="steps per variant per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    set_threads(args.threads)
    import torch

    from vision_moe.config import load_config
    from vision_moe.engine.trainer import PlanDataset, Trainer, collate_plan

    variants = {"project": set(), **{f"without_{x}": {x} for x in PARTS}, "textbook": set(PARTS)}
    common = ["train.device=cpu", "train.progress=false", "train.tensorboard=false", "data.num_workers=0"]
    common += [f"train.threads={args.threads}"]
    runs = {}
    tmp = tempfile.TemporaryDirectory()
    for name, parts in variants.items():
        sets = common + (["optim.fused=false"] if "fused" in parts else [])
        tr = Trainer(load_config(args.config, sets), Path(tmp.name) / name)
        _revert(tr, parts)
        tr.model.train()
        runs[name] = tr
    first = next(iter(runs.values()))
    entries = first.plan.plan(0, args.batches)
    data = PlanDataset([ds for ds, _ in first.train_sets])
    batches = [(d, collate_plan([data[(d, i, s)] for i, s in zip(idx, seeds)])) for d, idx, seeds in entries]

    def steps(tr):
        def run():
            for j in range(args.steps):
                d, (images, packed, _) = batches[j % len(batches)]
                tasks = tr.train_sets[d][1]
                loss, _, _ = tr.step_module(images.to(memory_format=tr.memory_format), packed.unpack(), tasks)
                tr.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if tr.cfg.optim.clip_grad > 0:
                    torch.nn.utils.clip_grad_norm_(tr.model.parameters(), tr.cfg.optim.clip_grad)
                tr.optimizer.step()

        return run

    res = time_alternating({n: steps(tr) for n, tr in runs.items()}, "project", rounds=args.rounds, warmup=1)
    out = {}
    for name, r in res.items():
        ms = r["ms"] / args.steps
        out[name] = {"reverted": sorted(variants[name]), "ms_per_step": round(ms, 1), "ratio": round(r["ratio"], 3)}
        print(f"{name:20s} {ms:7.1f} ms/step  {r['ratio']:.3f}x the project's step", flush=True)
    machine = {**machine_info(), "threads": args.threads, "gemm_gflops_1024": round(gemm_gflops(), 1)}
    info = {"machine": machine, "config": args.config, "results": out}
    print(json.dumps(info))
    tmp.cleanup()


if __name__ == "__main__":
    main()
