#!/usr/bin/env python
"""Restore images with a restoration model: ``python tools/restore.py --checkpoint DIR --input IMG|DIR --out DIR``.

``--model NAME`` instead of ``--checkpoint`` runs a registered restoration model with its initial weights (to try
the pipeline; vision-moe publishes no trained restoration weights yet). ``--tile 256 --tile-overlap 32`` restores
large images in overlapping tiles with blended seams. Outputs are PNGs named after the inputs (``x.jpg`` ->
``x.png``); with ``--gt DIR`` (ground truths of the same names) each image's PSNR / SSIM (RGB, [0, 1]) is printed,
of the output and of the input. Bad input (an unreadable file, a missing ground truth) gives one line and the next
image is restored; the exit status is 1 when no image could be restored, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import torch


def _load(args: argparse.Namespace):
    from vision_moe import create_model
    from vision_moe._factory import model_family
    from vision_moe.engine import load_model

    if args.checkpoint:
        model, _ = load_model(args.checkpoint)
        if hasattr(model, "net"):
            return model.net
        if getattr(model, "degradations", ()):  # a multi-task model: its degradation tasks as one network
            return model.restoration_network().eval()
        raise ValueError(f"{args.checkpoint}: not a restoration checkpoint (its tasks are {list(model.tasks)})")
    if model_family(args.model) != "restoration":
        raise ValueError(f"--model {args.model}: not a restoration model; expected one of the restoration family")
    return create_model(args.model)


def _task(net, name: str) -> str | None:
    if name == "auto":
        if getattr(net, "task_conditioned", False) and len(net.tasks) > 1:
            raise ValueError(
                f"--task auto: this model routes by degradation and has no classifier; give one of {list(net.tasks)}"
            )
        return None
    if name not in net.tasks:
        raise ValueError(f"--task {name}: unknown degradation; this model serves {list(net.tasks)} (or 'auto')")
    return name


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--checkpoint", help="checkpoint folder of a trained restoration model (or a multi-task model's degradations)"
    )
    src.add_argument("--model", help="a registered restoration model (initial weights)")
    p.add_argument("--input", required=True, help="an image file or a folder of images")
    p.add_argument("--out", required=True, help="output folder (PNGs named after the inputs)")
    p.add_argument("--task", default="auto", help="degradation to route by ('auto': as the model decides)")
    p.add_argument("--tile", type=int, default=0, help="restore in tiles of this many pixels (0: whole images)")
    p.add_argument("--tile-overlap", type=int, default=32, help="pixels shared by neighbouring tiles")
    p.add_argument("--gt", default=None, help="folder of ground truths (same names): print PSNR / SSIM")
    p.add_argument("--crop-border", type=int, default=0, help="pixels cut from each side before PSNR / SSIM")
    p.add_argument("--device", default="auto", help="'auto' (CUDA if available), 'cpu', 'cuda', 'cuda:N' or 'mps'")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from tqdm import tqdm

    from vision_moe.engine.inference import image_files, restore_files
    from vision_moe.engine.trainer import resolve_device

    try:
        if args.tile < 0 or args.tile_overlap < 0 or args.crop_border < 0:
            raise ValueError("--tile, --tile-overlap and --crop-border must be >= 0")
        if args.tile and args.tile <= args.tile_overlap:
            raise ValueError(f"--tile {args.tile} must be larger than --tile-overlap {args.tile_overlap}")
        if args.threads:
            torch.set_num_threads(args.threads)
        device = resolve_device(args.device, "--device")
        files = image_files(args.input)
        if args.gt is not None:
            image_files(args.gt)  # checked before anything is restored
        net = _load(args).to(device)
        task = _task(net, args.task)
    except (ValueError, OSError) as e:
        if os.environ.get("VISION_MOE_DEBUG"):
            raise
        print(f"error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    done, scores = 0, []
    bar = tqdm(files, desc="restore", unit="image", dynamic_ncols=True)
    for rec in restore_files(
        net, files, args.out, task, args.tile or None, args.tile_overlap, device, args.gt, args.crop_border
    ):
        bar.update(1)
        if "error" in rec:
            bar.write(f"skipped: {rec['error']}")
            continue
        done += 1
        if "psnr" in rec:
            scores.append(rec)
            bar.write(
                f"{os.path.basename(rec['file'])}: PSNR {rec['psnr']:.2f} dB (input {rec['input_psnr']:.2f}), "
                f"SSIM {rec['ssim']:.4f} (input {rec['input_ssim']:.4f})"
            )
        elif "gt_error" in rec:
            bar.write(f"{os.path.basename(rec['file'])}: no score ({rec['gt_error']})")
    bar.close()
    print(f"restored {done} of {len(files)} image(s) into {args.out}")
    if scores:
        mean = {k: sum(r[k] for r in scores) / len(scores) for k in ("psnr", "ssim", "input_psnr", "input_ssim")}
        print(
            f"mean over {len(scores)} image(s), RGB, crop border {args.crop_border}: PSNR {mean['psnr']:.2f} dB "
            f"(input {mean['input_psnr']:.2f}), SSIM {mean['ssim']:.4f} (input {mean['input_ssim']:.4f})"
        )
    return 0 if done else 1


if __name__ == "__main__":
    sys.exit(main())
