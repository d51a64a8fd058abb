"""MoE layer and model benchmark. Run: ``python benchmarks/bench_moe.py [--threads 1]``.

1. MoE MLP layer forward+backward at the M³ViT-S shape (dim 384, 16 experts, top-4, expert hidden 384,
   batch 8 x 197 tokens) against a dense MLP of hidden 1536 (same active FLOPs) and the naive
   boolean-mask loop over experts, timed alternately in one run; ratios are medians of per-round ratios.
   Also the floor any dispatcher has: the sort layer's expert GEMMs alone (fc1, GELU, fc2 per expert) on
   token rows already grouped by expert, with the router's own per-expert counts for this input: no
   routing, gather, scatter or combine.
2. Parameters of every registered model, full and specialised to one task, and per-task GFLOPs
   (torch.utils.flop_counter; 2 FLOPs per multiply-add) at 224x224.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from timm.layers import Mlp
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import gemm_gflops, machine_info, set_threads, time_alternating  # noqa: E402

import vision_moe  # noqa: E402
from vision_moe.moe import MoEMlp  # noqa: E402


def bench_layer(rounds: int) -> dict:
    torch.manual_seed(0)
    dim, experts, k, hidden, batch, tokens = 384, 16, 4, 384, 8, 197
    x = torch.randn(batch, tokens, dim, requires_grad=True)
    dense = Mlp(dim, k * hidden)  # hidden 1536: the same active FLOPs as top-4 experts of hidden 384
    layers = {name: MoEMlp(dim, hidden, experts, k, ["t"], dispatcher=name) for name in ("sort", "naive", "dense")}
    for layer in layers.values():  # the same weights in every variant
        layer.load_state_dict(layers["sort"].state_dict())

    def step(fn):
        def run():
            y = fn()
            y.square().mean().backward()

        return run

    fns = {"dense_mlp_1536": step(lambda: dense(x))}
    for name, layer in layers.items():
        fns[f"moe_{name}"] = step(lambda layer=layer: layer(x, "t")[0])
    sort = layers["sort"]
    with torch.no_grad():
        idx = sort.router(x.reshape(-1, dim), "t").expert_index
    counts = torch.bincount(idx.reshape(-1), minlength=experts).tolist()
    grouped = torch.randn(sum(counts), dim, requires_grad=True)  # k rows per token, already sorted by expert
    fns["experts_only"] = step(lambda: torch.cat(sort.experts.forward_split(grouped, counts)))
    res = time_alternating(fns, baseline="dense_mlp_1536", rounds=rounds)
    res["naive_over_sort"] = res["moe_naive"]["ratio"] / res["moe_sort"]["ratio"]
    res["naive_over_floor"] = res["moe_naive"]["ratio"] / res["experts_only"]["ratio"]
    flops = 3 * 2 * batch * tokens * (dim * 1536 * 2)  # fwd + bwd ~ 3x fwd, two GEMMs
    res["dense_achieved_gflops"] = flops / (res["dense_mlp_1536"]["ms"] / 1e3) / 1e9
    res["moe_sort_achieved_gflops"] = flops / (res["moe_sort"]["ms"] / 1e3) / 1e9
    return res


def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def model_table(img: int) -> list[dict]:
    rows = []
    tasks = ("semseg", "depth")
    x = torch.randn(1, 3, img, img)
    for name in vision_moe.list_models(family="vit"):
        model = vision_moe.create_model(name, tasks=tasks, num_classes=0).eval()
        spec = model.specialize("semseg")
        with torch.no_grad():
            gf_full = count_flops(lambda m=model: m(x, task="semseg")) / 1e9
            gf_spec = count_flops(lambda m=spec: m(x)) / 1e9
        moe_exp = sum(m.experts.fc1.weight.numel() for _, m in model.moe_layers() if hasattr(m, "experts"))
        rows.append(
            dict(
                model=name,
                params_m=sum(p.numel() for p in model.parameters()) / 1e6,
                specialized_params_m=sum(p.numel() for p in spec.parameters()) / 1e6,
                gflops_per_task=gf_full,
                specialized_gflops=gf_spec,
                has_moe=moe_exp > 0,
            )
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--img", type=int, default=224)
    ap.add_argument("--skip-models", action="store_true")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    set_threads(args.threads)
    out = dict(machine=machine_info(), gemm_gflops_1024=gemm_gflops())
    print(json.dumps(out["machine"]), f"| GEMM 1024^3 fp32: {out['gemm_gflops_1024']:.1f} GFLOP/s")
    out["layer"] = layer = bench_layer(args.rounds)
    print("\nMoE MLP layer fwd+bwd, dim 384, 16 experts top-4, hidden 384, 8x197 tokens")
    print(f"{'variant':<16}{'ms (median)':>12}{'x dense':>10}")
    for name in ("dense_mlp_1536", "moe_sort", "moe_naive", "moe_dense", "experts_only"):
        print(f"{name:<16}{layer[name]['ms']:>12.1f}{layer[name]['ratio']:>10.2f}")
    print(f"naive loop / sort dispatcher: {layer['naive_over_sort']:.2f}x")
    print(f"naive loop / expert GEMMs alone (the most any dispatcher can gain): {layer['naive_over_floor']:.2f}x")
    frac = layer["moe_sort_achieved_gflops"] / out["gemm_gflops_1024"]
    print(
        f"achieved: dense {layer['dense_achieved_gflops']:.1f} GFLOP/s, "
        f"moe_sort {layer['moe_sort_achieved_gflops']:.1f} GFLOP/s ({frac:.0%} of the GEMM rate)"
    )
    if not args.skip_models:
        out["models"] = rows = model_table(args.img)
        print(f"\nModels at {args.img}x{args.img} (tasks semseg, depth; no classifier); GFLOPs = 2 x MACs")
        print(f"{'model':<30}{'params M':>10}{'spec. M':>10}{'GFLOPs/task':>13}{'spec. GFLOPs':>14}")
        for r in rows:
            print(
                f"{r['model']:<30}{r['params_m']:>10.2f}{r['specialized_params_m']:>10.2f}"
                f"{r['gflops_per_task']:>13.2f}{r['specialized_gflops']:>14.2f}"
            )
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
