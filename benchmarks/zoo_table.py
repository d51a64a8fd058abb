"""README's zoo table: every weight tag with its dense source, licence, parameters and FLOPs per task.

    python benchmarks/zoo_table.py > zoo.md

Parameters and FLOPs (torch.utils.flop_counter, 2 per multiply-add) of the backbone each tag builds (its
architecture; tasks semseg and depth, no classifier, 224 x 224, one image, one task), counted once per distinct
architecture. No weights are downloaded: the counts depend on the architecture only.
"""

from __future__ import annotations

import sys

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import vision_moe
from vision_moe.models.moe_vit import ZOO

TASKS = ("semseg", "depth")


def costs(tag: str) -> tuple[float, float]:
    """(parameters in M, GFLOPs for one task) of ``tag``'s backbone."""
    torch.manual_seed(0)
    model = vision_moe.create_model(tag, tasks=TASKS, num_classes=0).eval()
    x = torch.randn(1, 3, 224, 224)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model.forward_features(x, task=TASKS[0])
    return sum(p.numel() for p in model.parameters()) / 1e6, fc.get_total_flops() / 1e9


def main(argv: list[str] | None = None) -> int:
    import argparse

    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    torch.set_num_threads(1)
    seen: dict[str, tuple[float, float]] = {}
    print("| tag (load: `vision_moe.create_model(TAG, pretrained=True)`) | dense source (timm, Hugging Face Hub) "
          "| licence | params (M) | GFLOPs / task | exact at init |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for tag, z in ZOO.items():
        arch = tag.split(".")[0] + repr(sorted(z.model_args.items()))
        if arch not in seen:
            seen[arch] = costs(tag)
        params, gflops = seen[arch]
        cfg = timm.models.get_pretrained_cfg(tag)
        exact = "yes" if z.exact else "no"
        print(f"| `{tag}` | [{cfg.hf_hub_id}](https://huggingface.co/{cfg.hf_hub_id}) | {cfg.license} | {params:.2f} "
              f"| {gflops:.2f} | {exact} |")  # fmt: skip
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
