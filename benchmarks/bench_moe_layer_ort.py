#!/usr/bin/env python
"""One exported MoE MLP layer in ONNX Runtime (CPU) against the dense MLP of the same active width: what a
capacity-bounded task graph pays per MoE block. M³ViT-S shape: dim 384, 16 experts, top-4, expert hidden 384,
one image of 197 tokens; ``gather`` dispatcher (grouped 1x1 Conv experts) at the given capacity factors, and the
exact ``dense`` dispatcher (every expert on every token). BENCHMARKS.md rules: fixed threads, alternating rounds,
median of per-round ratios.

  python benchmarks/bench_moe_layer_ort.py --rounds 40
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, set_threads, time_alternating  # noqa: E402


class _Layer(torch.nn.Module):
    """MoEMlp for one task, output only (the aux record is not part of a graph)."""

    def __init__(self, layer: torch.nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x, "t")[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--capacity-factors", type=float, nargs="*", default=[1.0, 1.25])
    args = p.parse_args()
    set_threads(args.threads)
    from timm.layers import Mlp

    from vision_moe.deploy.onnx_export import export_onnx, ort_session, simplify_onnx
    from vision_moe.moe import MoEMlp

    print("machine:", json.dumps(machine_info()))
    torch.manual_seed(0)
    dim, experts, k, hidden, tokens = 384, 16, 4, 384, 197
    x = torch.randn(1, tokens, dim)
    mods = {"dense_mlp": Mlp(dim, hidden * k).eval()}
    for cf in args.capacity_factors:
        mods[f"moe_gather_capacity_{cf:g}"] = _Layer(
            MoEMlp(dim, hidden, experts, k, ["t"], dispatcher="gather", capacity_factor=cf).eval()
        )
    mods["moe_dense_dispatch_exact"] = _Layer(MoEMlp(dim, hidden, experts, k, ["t"], dispatcher="dense").eval())
    out = Path(tempfile.mkdtemp(prefix="bench_moe_layer_ort_"))
    runs, nodes = {}, {}
    for name, m in mods.items():
        proto = export_onnx(m, (x,), out / f"{name}.onnx", input_names=["x"], output_names=["y"])
        proto = simplify_onnx(proto)
        nodes[name] = len(proto.graph.node)
        sess = ort_session(proto, args.threads)
        runs[name] = lambda s=sess: s.run(None, {"x": x.numpy()})
    res = time_alternating(runs, "dense_mlp", args.rounds, 5)
    print(f"\none image ({tokens} tokens), {args.rounds} alternating rounds, ORT CPU {args.threads} thread(s)")
    print("| graph | nodes | median ms | ratio vs dense MLP |")
    print("|---|---|---|---|")
    for name in mods:
        print(f"| {name} | {nodes[name]} | {res[name]['ms']:.2f} | {res[name]['ratio']:.2f}x |")


if __name__ == "__main__":
    main()
