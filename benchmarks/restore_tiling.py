"""Tiled against whole-image restoration on the held-out photographs at full size.
Run: ``python benchmarks/restore_tiling.py --checkpoint CKPT [--tile 128 --tile-overlap 32]``.

For each held-out photograph of the built-in restoration data (coffee, chelsea, camera; full size) and each
degradation the checkpoint serves, the photograph is degraded as the built-in data does, restored whole and in
tiles (``vision_moe.engine.inference.restore``), and the script prints the PSNR of each against the clean
photograph and the PSNR between the two outputs (how much tiling changes the result), with the largest pixel
difference. A convolutional network gives identical outputs when the overlap is four times its receptive radius
(tests/test_restoration_train.py); a network with global attention sees only its tile.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, set_threads  # noqa: E402

from vision_moe.data.builtin_restore import DEGRADE, HELD_OUT_PHOTOS, load_photo  # noqa: E402
from vision_moe.engine import load_model  # noqa: E402
from vision_moe.engine.inference import restore  # noqa: E402
from vision_moe.metrics import psnr  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--tile", type=int, default=128)
    ap.add_argument("--tile-overlap", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    set_threads(args.threads)
    model, _ = load_model(args.checkpoint)
    net = model.net.eval()
    print(json.dumps(machine_info()), f"| tile {args.tile}, overlap {args.tile_overlap}; PSNR RGB, crop border 0")
    rows = []
    widths = {"photo": -10, "degradation": -12, "size": 10, "input": 8, "whole": 8, "tiled": 8}
    widths.update({"whole vs tiled": 16, "max |d|": 9})
    print("".join(f"{h:<{-w}}" if w < 0 else f"{h:>{w}}" for h, w in widths.items()))
    for name in HELD_OUT_PHOTOS:
        clean = load_photo(name).astype(np.float32) / 255.0
        for i, deg in enumerate(net.tasks):
            if deg not in DEGRADE:
                continue
            lq, _ = DEGRADE[deg](clean, np.random.default_rng([7, i]))
            lq = np.clip(np.round(lq * 255.0), 0, 255) / 255.0
            x = torch.from_numpy(lq.transpose(2, 0, 1)).float()[None] * 2 - 1
            task = deg if net.task_conditioned else None
            whole = restore(net, x, task)[0].clamp(0, 1)
            tiled = restore(net, x, task, args.tile, args.tile_overlap)[0].clamp(0, 1)
            r = dict(
                photo=name,
                degradation=deg,
                size=list(clean.shape[:2]),
                input_psnr=psnr(lq, clean),
                whole_psnr=psnr(whole, torch.from_numpy(clean.transpose(2, 0, 1))),
                tiled_psnr=psnr(tiled, torch.from_numpy(clean.transpose(2, 0, 1))),
                whole_vs_tiled_psnr=psnr(tiled, whole),
                max_abs_diff=float((tiled - whole).abs().max()),
            )
            rows.append(r)
            print(
                f"{name:<10}{deg:<12}{'x'.join(map(str, r['size'])):>10}{r['input_psnr']:>8.2f}{r['whole_psnr']:>8.2f}"
                f"{r['tiled_psnr']:>8.2f}{r['whole_vs_tiled_psnr']:>16.2f}{r['max_abs_diff']:>9.3f}",
                flush=True,
            )
    mean = {k: float(np.mean([r[k] for r in rows])) for k in ("whole_psnr", "tiled_psnr", "whole_vs_tiled_psnr")}
    print(
        f"mean: whole {mean['whole_psnr']:.2f} dB, tiled {mean['tiled_psnr']:.2f} dB, "
        f"whole vs tiled {mean['whole_vs_tiled_psnr']:.2f} dB"
    )
    if args.json:
        args.json.write_text(json.dumps(dict(machine=machine_info(), rows=rows, mean=mean), indent=2))


if __name__ == "__main__":
    main()
