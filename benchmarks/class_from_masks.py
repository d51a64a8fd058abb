#!/usr/bin/env python
"""How far a built-in-data checkpoint's classification is from what its segmentation already knows.

The built-in image class is the class covering the most visible pixels, so it can also be read off a segmentation:
the most frequent predicted object class of each held-out image. This prints three top-1 figures on the held-out
split: the classification head, that read-out of the semseg head's prediction, and the same read-out of the true
masks (1.0 by construction: a check that the label definition and this script agree). Then the same figures per
margin of the true label: the runner-up class's pixels over the dominant class's (data v3 keeps every scene
at 0.5 or below, the first row; data v2 had scenes up to 1.0, near coin flips, where most errors were).

  python benchmarks/class_from_masks.py --checkpoint runs/quickstart/checkpoints/step_0002400
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from vision_moe.config import config_from_dict
    from vision_moe.data import collate_multitask
    from vision_moe.engine.checkpoint import load_model
    from vision_moe.engine.data import build_dataset

    model, mc = load_model(args.checkpoint)
    model.eval()
    missing = {"classification", "semseg"} - set(model.tasks)
    if missing:
        raise SystemExit(f"{args.checkpoint}: the model has no {sorted(missing)} head; it has {list(model.tasks)}")
    cfg = config_from_dict(dict(mc["experiment"]), args.checkpoint)
    d = next(d for d in cfg.data.datasets if d.format == "builtin")
    ds = build_dataset(d, cfg, d.val_split, train=False, tasks=["classification", "semseg"])
    loader = torch.utils.data.DataLoader(ds, batch_size=cfg.data.eval_batch_size, collate_fn=collate_multitask)
    hits = {"classification head": 0, "semseg prediction, most frequent class": 0, "true masks (check)": 0}
    n = 0
    bins = (0.0, 0.5, 0.7, 0.8, 0.9, 1.0)
    per_bin = [[0, 0, 0] for _ in bins[:-1]]  # images, head hits, read-out hits

    def class_counts(maps: torch.Tensor, k: int) -> torch.Tensor:  # (B, H, W) labels, 0 = background, 255 ignored
        return torch.stack([torch.bincount(m[(m > 0) & (m < k)].flatten() - 1, minlength=k - 1) for m in maps])

    def dominant(maps: torch.Tensor, k: int) -> torch.Tensor:
        return class_counts(maps, k).argmax(1)

    with torch.inference_mode():
        for images, targets in loader:
            y = torch.stack([t["class_label"] for t in targets])
            seg = model(images, "semseg")["out"]
            k = seg.shape[1]
            head = model(images, "classification")["out"].argmax(1) == y
            readout = dominant(seg.argmax(1), k) == y
            true = class_counts(torch.stack([t["semseg"] for t in targets]), k).float()
            hits["classification head"] += int(head.sum())
            hits["semseg prediction, most frequent class"] += int(readout.sum())
            hits["true masks (check)"] += int((true.argmax(1) == y).sum())
            top2 = true.topk(2, dim=1).values
            margin = top2[:, 1] / top2[:, 0].clamp_min(1)
            for i, m in enumerate(margin.tolist()):
                b = next(j for j in range(len(bins) - 1) if m <= bins[j + 1] or j == len(bins) - 2)
                per_bin[b][0] += 1
                per_bin[b][1] += int(head[i])
                per_bin[b][2] += int(readout[i])
            n += len(y)
    print(f"{args.checkpoint}: held-out top-1 over {n} images")
    for name, h in hits.items():
        print(f"  {name:40s} {h / n:.4f}")
    print("by margin (runner-up class pixels / dominant class pixels, true masks):")
    print(f"  {'margin':12s} {'images':>6s} {'head':>6s} {'read-out':>8s}")
    for (lo, hi), (c, h, r) in zip(zip(bins[:-1], bins[1:]), per_bin):
        if c:
            print(f"  {'[' if lo == 0 else '('}{lo:.1f}, {hi:.1f}]{'':2s} {c:6d} {h / c:6.3f} {r / c:8.3f}")


if __name__ == "__main__":
    main()
