#!/usr/bin/env python
"""Generate a Vitis HLS project (hls4ml layout) for task-sparse M³ViT inference on an FPGA, checked by C-simulation.

  python tools/export_hls.py --checkpoint runs/x/ckpt --task semseg --board zcu102 --out hls_prj/
  python tools/export_hls.py --model m3vit_tiny_patch16_224 --set img_size=32 --set patch_size=8 --set depth=2 \\
      --set embed_dim=32 --set num_heads=2 --set num_experts=4 --set top_k=2 --set expert_hidden=32 \\
      --task semseg --board kv260 --out /tmp/prj --csim
"""

from __future__ import annotations

import argparse
import logging
import sys


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--checkpoint", help="checkpoint folder (config.json + model.safetensors); its backbone is exported"
    )
    src.add_argument("--model", help="registered model name (random weights)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="model override (JSON value)")
    p.add_argument(
        "--task",
        action="append",
        required=True,
        help="task (repeat for a multi-task build selected by a task argument; 'all' for every task)",
    )
    p.add_argument("--board", default="zcu102", help="zcu102 | zcu104 | kv260")
    p.add_argument("--out", required=True)
    p.add_argument("--img-size", type=int, nargs=2, metavar=("H", "W"))
    p.add_argument("--tile", type=int, help="output columns per weight tile (must divide dim; heads must divide it)")
    p.add_argument("--par-in", type=int, default=4)
    p.add_argument("--attn-rows", type=int, default=4, help="query rows processed in parallel")
    p.add_argument("--clock-mhz", type=float)
    p.add_argument("--platform", help="Vitis platform for v++ (default: the board's base platform)")
    p.add_argument("--top", default="vmoe_top", help="top function name")
    for t, d in [
        ("act", "ap_fixed<32,10>"),
        ("weight", "ap_fixed<16,2>"),
        ("bias", "ap_fixed<16,5>"),
        ("pixel", "ap_ufixed<8,0>"),
    ]:
        p.add_argument(f"--{t}-type", default=d, help=f"default {d}")
    p.add_argument(
        "--prune-unused",
        action="store_true",
        help="keep only the experts the task uses on the built-in images (Mod-Squad pruning) before export",
    )
    p.add_argument("--eval-images", type=int, default=3, help="built-in images for the fixed-point vs float report")
    p.add_argument("--csim", action="store_true", help="compile with g++ and run the C-simulation testbench")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def build(args: argparse.Namespace):
    """(backbone, name, mean, std) from the arguments."""
    from vision_moe.deploy.source import load_checkpoint_source, parse_overrides

    overrides = parse_overrides(args.set)
    if args.checkpoint:
        model, _, mean, std = load_checkpoint_source(args.checkpoint, overrides)
        return getattr(model, "backbone", model), args.checkpoint, mean, std
    import vision_moe

    if args.model not in vision_moe.list_models(family="vit"):
        raise ValueError(f"unknown model {args.model!r}; expected one of {vision_moe.list_models(family='vit')}")
    model = vision_moe.create_model(args.model, **overrides)
    return model, args.model, None, None


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    from vision_moe.deploy.hls import HLSConfig, builtin_images, compile_csim, export_hls, parse_fx, run_csim

    try:
        cfg = HLSConfig(
            act=parse_fx(args.act_type),
            weight=parse_fx(args.weight_type),
            bias=parse_fx(args.bias_type),
            pixel=parse_fx(args.pixel_type),
            board=args.board,
            clock_mhz=args.clock_mhz,
            platform=args.platform,
            tile=args.tile,
            par_in=args.par_in,
            attn_rows=args.attn_rows,
            top=args.top,
        )
        model, name, mean, std = build(args)
        model.eval()
        tasks = args.task if args.task != ["all"] else "all"
        if args.prune_unused:
            import torch

            size = tuple(args.img_size) if args.img_size else tuple(model.patch_embed.img_size)
            imgs = torch.stack(
                [torch.from_numpy(i).permute(2, 0, 1).float() / 127.5 - 1.0 for _, i in builtin_images(size, 4)]
            )
            for t in model.tasks if tasks == "all" else tasks:
                model.prune_experts(t, imgs)  # keep the experts the task uses (at least top_k)
        proj = export_hls(
            model,
            tasks,
            args.out,
            cfg,
            name=name,
            img_size=tuple(args.img_size) if args.img_size else None,
            num_eval_images=args.eval_images,
            mean=mean,
            std=std,
        )
    except (ValueError, TypeError, RuntimeError, FileNotFoundError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 2
    print(proj.summary())
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
