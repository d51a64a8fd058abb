#!/usr/bin/env python
"""Generate a Vitis HLS project (hls4ml layout) for task-sparse M³ViT / Mod-Squad inference on an FPGA, checked by
C-simulation.

  python tools/export_hls.py --checkpoint runs/quickstart/checkpoints/step_0002400 --task semseg --out hls_prj/ --csim
  python tools/export_hls.py --model m3vit_tiny_patch16_224 --set img_size=32 --set patch_size=8 --set depth=2 \\
      --set embed_dim=32 --set num_heads=2 --set num_experts=4 --set top_k=2 --set expert_hidden=32 \\
      --task semseg --board kv260 --out /tmp/prj --csim
  python tools/export_hls.py --preset edge-moe --out /tmp/edge_moe --eval-images 0
"""

from __future__ import annotations

import argparse
import logging
import sys

PRESET_NAMES = ("edge-moe",)


def check_flags(args: argparse.Namespace) -> None:
    """Values argparse lets through but the generator cannot use: one ValueError line naming the flag."""
    if args.img_size is not None and min(args.img_size) < 1:
        raise ValueError(f"--img-size: expected two positive integers H W, got {args.img_size[0]} {args.img_size[1]}")
    for flag in ("tile", "par_in", "out_par", "attn_rows", "attn_lanes", "vec_par"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            raise ValueError(f"--{flag.replace('_', '-')}: expected a positive integer, got {v}")
    if args.clock_mhz is not None and not 0 < args.clock_mhz < 2000:
        raise ValueError(f"--clock-mhz: expected a clock in (0, 2000) MHz, got {args.clock_mhz:g}")
    if args.eval_images < 0:
        raise ValueError(f"--eval-images: expected an integer >= 0, got {args.eval_images}")
    if args.checkpoint and args.set:
        raise ValueError("--set cannot change a checkpoint's architecture; its config.json defines the model")
    if args.seed is not None and args.checkpoint:
        raise ValueError("--seed seeds the random weights of --model / --preset; a checkpoint brings its own")
    if args.eval_weight8 and not args.checkpoint:
        raise ValueError("--eval-weight8 scores held-out images with a checkpoint's heads: it needs --checkpoint")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--checkpoint",
        help="training checkpoint folder (config.json + model.safetensors); its backbone is exported and its task "
        "heads score the fixed-point model on its held-out images (default: none)",
    )
    src.add_argument("--model", help="registered model name, random weights seeded by --seed (default: none)")
    src.add_argument(
        "--preset",
        choices=PRESET_NAMES,
        help="a published configuration: 'edge-moe' is Edge-MoE's M³ViT-T (192-d, 12 layers, 3 heads, 128 x 256, "
        "16 experts top-2, two tasks) and prints both designs side by side (default: none)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="model override (JSON value) for --model / --preset, repeatable (default: none)",
    )
    p.add_argument(
        "--task",
        action="append",
        help="task; repeat for a multi-task build selected by a task argument; 'all' for every task "
        "(default: the preset's first task; required otherwise)",
    )
    p.add_argument("--board", default=None, help="zcu102 | zcu104 | kv260 (default: zcu102)")
    p.add_argument("--out", required=True, help="project folder, new or empty (required)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace what a previous export wrote into --out (default: off: a non-empty --out is refused)",
    )
    p.add_argument("--img-size", type=int, nargs=2, metavar=("H", "W"), help="input size (default: the model's)")
    p.add_argument(
        "--tile", type=int, help="output columns per weight tile (default: chosen from the model; must divide "
        "the embedding dim, and the head count must divide it)"
    )  # fmt: skip
    p.add_argument("--par-in", type=int, default=None, help="inputs per cycle of each MAC column (default: 4)")
    p.add_argument("--out-par", type=int, default=None, help="outputs per cycle of the epilogue (default: 4)")
    p.add_argument("--attn-rows", type=int, default=None, help="query rows in parallel (default: 4)")
    p.add_argument("--attn-lanes", type=int, default=None, help="head-dim lanes of attention (default: 16)")
    p.add_argument("--vec-par", type=int, default=None, help="LayerNorm / element-wise lanes (default: 8)")
    p.add_argument(
        "--axi-bits", type=int, choices=(32, 64, 128, 256, 512), default=None, help="bits per weight beat (default: "
        "the board's, 128)"
    )  # fmt: skip
    p.add_argument("--clock-mhz", type=float, default=None, help="clock (default: the board's, 300 on zcu102)")
    p.add_argument("--platform", help="Vitis platform for v++ (default: the board's base platform)")
    p.add_argument("--top", default="vmoe_top", help="top function name (default: vmoe_top)")
    for t, d in [
        ("act", "ap_fixed<32,10>"),
        ("weight", "ap_fixed<16,2>"),
        ("bias", "ap_fixed<16,5>"),
        ("pixel", "ap_ufixed<8,0>"),
        ("scale", "ap_ufixed<24,0>"),
    ]:
        p.add_argument(f"--{t}-type", default=d, help=f"{t} fixed-point type (default: {d})")
    p.add_argument(
        "--weight8",
        choices=("none", "experts", "all"),
        default="none",
        help="ap_int<8> weights with a per-output-channel scale (--scale-type): 'experts' for the MoE experts, "
        "'all' also the dense linear layers (default: none)",
    )
    p.add_argument(
        "--prune-unused",
        action="store_true",
        help="keep only the experts the task uses on the built-in images (Mod-Squad pruning) before export "
        "(default: off)",
    )
    p.add_argument(
        "--eval-images",
        type=int,
        default=3,
        help="images for the fixed-point vs float report: up to 5 built-in photographs (output error); with "
        "--checkpoint also the first held-out images scored by the task heads (rounded up to whole evaluation "
        "batches); 0 skips both (default: 3)",
    )
    p.add_argument(
        "--eval-weight8",
        action="store_true",
        help="with --checkpoint: also score 8-bit expert weights on the held-out images, to report their metric "
        "cost (default: off)",
    )
    p.add_argument(
        "--compare-edge-moe",
        action="store_true",
        help="print this design beside Edge-MoE's on the exported configuration (default: on with --preset "
        "edge-moe, off otherwise)",
    )
    p.add_argument("--seed", type=int, default=None, help="seed of --model / --preset random weights (default: 0)")
    p.add_argument("--csim", action="store_true", help="compile with g++ and run the C-simulation (default: off)")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress (default: off)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def build(args: argparse.Namespace):
    """(backbone, name, mean, std, experiment config or None) from the arguments."""
    import torch

    from vision_moe.deploy.hls.config import PRESETS
    from vision_moe.deploy.source import load_checkpoint_source, parse_overrides

    overrides = parse_overrides(args.set)
    if args.checkpoint:
        model, cfg, mean, std = load_checkpoint_source(args.checkpoint, overrides)
        return getattr(model, "backbone", model), args.checkpoint, mean, std, cfg
    import vision_moe

    torch.manual_seed(0 if args.seed is None else args.seed)  # the same command writes the same files
    if args.preset:
        pr = PRESETS[args.preset]
        return vision_moe.create_model(pr.model, **dict(pr.model_kwargs, **overrides)), args.preset, None, None, None
    if args.model not in vision_moe.list_models(family="vit"):
        raise ValueError(f"--model {args.model!r}: unknown; expected one of {vision_moe.list_models(family='vit')}")
    model = vision_moe.create_model(args.model, **overrides)
    return model, args.model, None, None, None


def hls_config(args: argparse.Namespace):
    """HLSConfig from the flags (and the preset's values for the flags not given)."""
    from vision_moe.deploy.hls import HLSConfig, parse_fx
    from vision_moe.deploy.hls.config import PARALLELISM, PRESETS

    base = dict(PRESETS[args.preset].hls) if args.preset else {}
    given = {k: getattr(args, k) for k in ("board", "clock_mhz", "platform", *PARALLELISM)}
    base.update({k: v for k, v in given.items() if v is not None})
    return HLSConfig(
        act=parse_fx(args.act_type),
        weight=parse_fx(args.weight_type),
        bias=parse_fx(args.bias_type),
        pixel=parse_fx(args.pixel_type),
        scale=parse_fx(args.scale_type),
        weight8=args.weight8,
        top=args.top,
        **base,
    )


def _heldout_report(args, proj, tasks) -> list[str]:
    """Task metrics of the float model and of the fixed-point one(s) on held-out images, and their agreement."""
    import dataclasses

    from vision_moe.deploy.hls.evaluate import evaluate_fixed_point
    from vision_moe.deploy.hls.reference import quantize_model

    w8 = proj.qmodel.cfg.weight8
    qms = {"fixed point" + (f", 8-bit {w8}" if w8 != "none" else ""): proj.qmodel}
    if args.eval_weight8 and w8 == "none":
        qms["fixed point, 8-bit experts"] = quantize_model(
            proj.spec, dataclasses.replace(proj.qmodel.cfg, weight8="experts")
        )
    res = evaluate_fixed_point(args.checkpoint, qms, tasks, args.eval_images)
    lines = [f"held-out images ({args.eval_images} requested, whole evaluation batches), task heads on the host:"]
    for t, by in res.items():
        for name, m in by.items():
            keys = [k for k in m if not k.startswith("agreement_") and k != "skipped_images"]
            txt = ", ".join(f"{k} {m[k]:.4f}" for k in keys)
            agree = ", ".join(f"{k[10:]} {v:.4f}" for k, v in m.items() if k.startswith("agreement_"))
            lines.append(f"  {t:<15} {name:<30} {txt}" + (f"; agreement with float: {agree}" if agree else ""))
        fl = by["float"]
        for name, m in by.items():
            if name != "float":
                diff = {k: round(m[k] - fl[k], 4) + 0.0 for k in fl if k in m and not k.startswith("agreement_")}
                cost = ", ".join(f"{k} {v:+.4f}" for k, v in diff.items())
                lines.append(f"  {t:<15} {'cost of ' + name:<30} {cost}")
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    from vision_moe.deploy.hls import builtin_images, compile_csim, export_hls, run_csim
    from vision_moe.deploy.hls.config import PRESETS
    from vision_moe.deploy.hls.generator import check_out_dir

    try:
        check_flags(args)
        check_out_dir(args.out, args.overwrite, flag="--out")
        cfg = hls_config(args)
        model, name, mean, std, _ = build(args)
        model.eval()
        task_args = args.task or ([PRESETS[args.preset].tasks[0]] if args.preset else None)
        if not task_args:
            raise ValueError("--task: required (a task the model routes, repeatable, or 'all')")
        tasks = task_args if task_args != ["all"] else "all"
        size = tuple(args.img_size) if args.img_size else None
        if args.prune_unused:
            import torch

            isz = size or tuple(model.patch_embed.img_size)
            imgs = torch.stack(
                [torch.from_numpy(i).permute(2, 0, 1).float() / 127.5 - 1.0 for _, i in builtin_images(isz, 4)]
            )
            for t in model.tasks if tasks == "all" else tasks:
                model.prune_experts(t, imgs)  # keep the experts the task uses (at least top_k)
        proj = export_hls(
            model,
            tasks,
            args.out,
            cfg,
            name=name,
            img_size=size,
            num_eval_images=args.eval_images,
            mean=mean,
            std=std,
            overwrite=args.overwrite,
            compare_edge_moe=args.compare_edge_moe or args.preset == "edge-moe",
        )
    except (ValueError, TypeError, RuntimeError, OSError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 2
    print(proj.summary())
    if args.checkpoint and args.eval_images:
        print("\n".join(_heldout_report(args, proj, list(proj.spec.tasks))))
    if args.csim:
        try:
            exe = compile_csim(args.out)
        except RuntimeError as e:
            print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
            return 1
        r = run_csim(exe, args.out)
        print(r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr)
        return 0 if r.returncode == 0 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
