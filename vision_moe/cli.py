"""``vision-moe`` console script: small commands that need no data (the tools/ scripts do the real jobs)."""

from __future__ import annotations

import argparse
import os
import sys

import torch

from . import create_model, list_models


def _demo(args: argparse.Namespace) -> int:
    """Build an M³ViT, route one batch per task, print each task's expert usage per MoE layer."""
    torch.manual_seed(args.seed)
    tasks = [t.strip() for t in args.tasks.split(",")]
    if not all(tasks) or len(set(tasks)) != len(tasks):
        raise ValueError(f"--tasks {args.tasks!r}: expected distinct comma-separated task names, e.g. semseg,depth")
    model = create_model(args.model, tasks=tasks, img_size=args.img_size, num_classes=0).eval()
    patch = model.patch_embed.patch_size[0]
    if args.img_size % patch:
        raise ValueError(f"--img-size {args.img_size}: expected a multiple of {args.model}'s patch size {patch}")
    x = torch.randn(args.batch, 3, args.img_size, args.img_size)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.model}: {n_params / 1e6:.1f} M parameters, MoE blocks {list(model.moe_block_idx)}, tasks {tasks}")
    with torch.no_grad():
        for task in tasks:
            _, aux = model.forward_features(x, task=task, return_aux=True)
            spec = model.specialize(task)
            same = torch.allclose(spec(x), model(x, task=task), atol=1e-5)
            print(
                f"\ntask {task!r}: share of assignments per expert (rows: MoE layers; specialised model equal: {same})"
            )
            for (name, _), a in zip(model.moe_layers(), aux):
                share = a.expert_load.float() / a.expert_load.sum()
                print(f"  {name:<18}" + " ".join(f"{v:4.2f}" for v in share.tolist()))
    return 0


def _baseline(args: argparse.Namespace) -> int:
    """Linear classifier on raw pixels of the built-in data: the floor the quickstart must clear."""
    from .data.builtin import linear_probe_baseline, prepare_builtin

    root = prepare_builtin(
        args.root, seed=args.seed, num_train=args.num_train, num_val=args.num_val, img_size=args.img_size
    )
    r = linear_probe_baseline(root)
    print(
        f"built-in data {root}: linear probe on raw pixels, held-out top-1 {r['top1']:.3f} "
        f"(chance {r['chance_top1']:.3f})"
    )
    return 0


def _models(args: argparse.Namespace) -> int:
    for name in list_models(args.pattern):
        print(name)
    return 0


def _at_least(lo: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {v}")
        return v

    return parse


def main(argv: list[str] | None = None) -> int:
    """Bad arguments end with one ``error:`` line (exit 2); ``VISION_MOE_DEBUG=1`` shows the traceback instead."""
    parser = argparse.ArgumentParser(prog="vision-moe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help=_demo.__doc__)
    demo.add_argument("--model", default="m3vit_tiny_patch16_224", choices=list_models(family="vit"))
    demo.add_argument("--tasks", default="semseg,depth,normals")
    demo.add_argument("--img-size", type=_at_least(1), default=224)
    demo.add_argument("--batch", type=_at_least(1), default=2)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(fn=_demo)
    base = sub.add_parser("baseline", help=_baseline.__doc__)
    base.add_argument("--root", default="data_cache/builtin")
    base.add_argument("--seed", type=int, default=0)
    base.add_argument("--num-train", type=_at_least(1), default=4000)
    base.add_argument("--num-val", type=_at_least(1), default=300)
    base.add_argument("--img-size", type=_at_least(32), default=64)
    base.set_defaults(fn=_baseline)
    models = sub.add_parser("models", help="list the registered models")
    models.add_argument("pattern", nargs="?", default="*")
    models.set_defaults(fn=_models)
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, OSError) as e:  # bad input: the messages name the value / file
        if os.environ.get("VISION_MOE_DEBUG"):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
        print(f"vision-moe {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
