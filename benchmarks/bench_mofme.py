"""MoFME vs the conventional MoE of the same E and k (MoFME, AAAI 2024: -72 % parameters, -39 % inference time).
Run: ``python benchmarks/bench_mofme.py [--threads 1] [--experts 4 16 64 128] [--top-k 2 4] [--device cuda]``.

At the reference dims (``mofme_base_patch8`` / ``mofme_ffnmoe_base_patch8``: 384-d, 2 blocks of 8 heads x 64,
conv head 32 and tail 128 channels, patch 8), for every E and k:

1. parameters of the MoE layer and of the whole model;
2. inference forward time (eval mode, no grad, batch 1) of one MoE layer on the 900 tokens of a 240 x 240 image,
   and of the whole model on a 240 x 240 image, each model with the ``sort`` dispatcher (only the chosen experts
   run) and the ``dense`` one (every expert on every token, as the reference code computes it); the four variants
   are timed alternately in one run (see ../shared/BENCHMARKS.md) and ratios are medians of per-round ratios;
3. GFLOPs of each whole-model variant (torch.utils.flop_counter; 2 FLOPs per multiply-add).

The paper claims -72 % parameters and -39 % inference time against the conventional MoE. Targets here: parameters
<= 0.28x at E = 128, k = 4; whole-model time <= 0.61x with each model on its fastest path.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import gemm_gflops, machine_info, set_threads, time_alternating  # noqa: E402

import vision_moe  # noqa: E402
from vision_moe.moe import MoEFiLM, MoEMlp  # noqa: E402

DIM, HIDDEN, IMG, PATCH = 384, 1536, 240, 8
KINDS = {"mofme": "mofme_base_patch8", "ffn_moe": "mofme_ffnmoe_base_patch8"}


def _params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _flops(fn) -> float:
    with FlopCounterMode(display=False) as c:
        fn()
    return c.get_total_flops() / 1e9


def _ratio(res: dict, a: str, b: str) -> float:
    return statistics.median(x / y for x, y in zip(res[a]["times"], res[b]["times"]))


def bench(e: int, k: int, rounds: int, device: str = "cpu") -> dict:
    """One (E, k) row. ``device``: where the layers and models run; on a GPU each timed call ends with a
    synchronisation, so that its time is the kernels' and not their launch."""
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    layers = {
        "mofme": MoEFiLM(DIM, HIDDEN, e, k, ()).eval(),
        "ffn_moe": MoEMlp(DIM, HIDDEN, e, k, (), router="shared", router_kwargs=dict(renormalize=True)).eval(),
    }
    models = {kind: vision_moe.create_model(name, num_experts=e, top_k=k).eval() for kind, name in KINDS.items()}
    for m in (*layers.values(), *models.values()):
        m.to(dev)
    tokens = torch.randn(1, (IMG // PATCH) ** 2, DIM, device=dev)
    image = torch.rand(1, 3, IMG, IMG, device=dev) * 2 - 1
    out: dict = dict(experts=e, top_k=k)
    for kind in KINDS:
        out[f"{kind}_layer_params_m"] = _params(layers[kind]) / 1e6
        out[f"{kind}_model_params_m"] = _params(models[kind]) / 1e6
    out["layer_params_ratio"] = out["mofme_layer_params_m"] / out["ffn_moe_layer_params_m"]
    out["model_params_ratio"] = out["mofme_model_params_m"] / out["ffn_moe_model_params_m"]

    def layer_fn(kind, disp):
        def run():
            layers[kind].set_dispatcher(disp)
            with torch.no_grad():
                layers[kind](tokens, None)
            sync()

        return run

    def model_fn(kind, disp):
        def run():
            models[kind].set_dispatcher(disp)
            with torch.no_grad():
                models[kind](image)
            sync()

        return run

    variants = [(kind, disp) for kind in KINDS for disp in ("sort", "dense")]
    for what, fn in (("layer", layer_fn), ("model", model_fn)):
        res = time_alternating(
            {f"{kd}_{d}": fn(kd, d) for kd, d in variants}, baseline="ffn_moe_sort", rounds=rounds, warmup=1
        )
        for name, r in res.items():
            out[f"{what}_{name}_ms"] = r["ms"]
        best = {kind: min(("sort", "dense"), key=lambda d, kind=kind: res[f"{kind}_{d}"]["ms"]) for kind in KINDS}
        out[f"{what}_fastest"] = {kind: best[kind] for kind in KINDS}
        out[f"{what}_time_ratio_fastest"] = _ratio(res, f"mofme_{best['mofme']}", f"ffn_moe_{best['ffn_moe']}")
        out[f"{what}_time_ratio_sort"] = _ratio(res, "mofme_sort", "ffn_moe_sort")
        out[f"{what}_time_ratio_dense"] = _ratio(res, "mofme_dense", "ffn_moe_dense")
    for kind, disp in variants:
        models[kind].set_dispatcher(disp)
        with torch.no_grad():
            out[f"model_{kind}_{disp}_gflops"] = _flops(lambda m=models[kind]: m(image))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--experts", type=int, nargs="+", default=[4, 16, 64, 128])
    ap.add_argument("--top-k", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda: where both models run")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    dev = torch.device(args.device)
    if dev.type not in ("cpu", "cuda"):
        ap.error(f"--device {args.device}: expected cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: no CUDA device is visible to PyTorch here")
    set_threads(args.threads)
    res = dict(machine=machine_info(), gemm_gflops_1024=gemm_gflops(), device=args.device, rows=[])
    if dev.type == "cuda":
        res["device_name"] = torch.cuda.get_device_name(dev)
    print(
        json.dumps(res["machine"]),
        f"| GEMM 1024^3 fp32 (CPU): {res['gemm_gflops_1024']:.1f} GFLOP/s | device: {res.get('device_name', 'cpu')}",
    )
    print(
        f"MoFME / conventional MoE (FFN experts {DIM}->{HIDDEN}->{DIM}), reference dims, inference at {IMG}x{IMG}, "
        f"batch 1; times: median of per-round ratios, {args.rounds} rounds"
    )
    head = (
        f"{'E':>4}{'k':>3}{'params M (MoFME / MoE)':>25}{'ratio':>7}{'layer ms sort/dense MoFME':>27}"
        f"{'MoE':>16}{'layer x':>9}{'model ms sort/dense MoFME':>27}{'MoE':>18}{'model x fastest':>17}"
        f"{'x sort':>8}{'x dense':>9}"
    )
    print(head)
    for e in args.experts:
        for k in args.top_k:
            if k > e:
                continue
            r = bench(e, k, args.rounds, args.device)
            res["rows"].append(r)
            fastest = f"{r['model_fastest']['mofme']}/{r['model_fastest']['ffn_moe']}"
            print(
                f"{e:>4}{k:>3}{r['mofme_model_params_m']:>12.2f} / {r['ffn_moe_model_params_m']:>8.2f}"
                f"{r['model_params_ratio']:>9.3f}"
                f"{r['layer_mofme_sort_ms']:>15.1f} / {r['layer_mofme_dense_ms']:>8.1f}"
                f"{r['layer_ffn_moe_sort_ms']:>8.1f} / {r['layer_ffn_moe_dense_ms']:>7.1f}"
                f"{r['layer_time_ratio_fastest']:>7.2f}"
                f"{r['model_mofme_sort_ms']:>15.1f} / {r['model_mofme_dense_ms']:>8.1f}"
                f"{r['model_ffn_moe_sort_ms']:>9.1f} / {r['model_ffn_moe_dense_ms']:>8.1f}"
                f"{r['model_time_ratio_fastest']:>11.2f} ({fastest})"
                f"{r['model_time_ratio_sort']:>8.2f}{r['model_time_ratio_dense']:>9.2f}",
                flush=True,
            )
    last = next((r for r in res["rows"] if r["experts"] == 128 and r["top_k"] == 4), None)
    if last is not None:
        print(
            f"\nE=128, k=4: parameters {last['model_params_ratio']:.3f}x (target <= 0.28), whole-model time on the "
            f"fastest paths {last['model_time_ratio_fastest']:.2f}x (target <= 0.61)"
        )
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
