"""``vision-moe`` console script: small commands that need no data (the tools/ scripts do the real jobs)."""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch

from . import __version__, create_model, list_models

__all__ = ["main", "tool_parser", "HelpFormatter"]


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description as written (examples keep their lines); an option that takes a value shows its default,
    unless the default is None or empty (the help then says in words what happens without it)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        empty = action.default in (None, "", [], (), argparse.SUPPRESS)
        if action.nargs != 0 and not action.required and not empty and "(default" not in text:
            text += " (default: %(default)s)"
        return text

    def _expand_help(self, action: argparse.Action) -> str:
        if isinstance(action.default, list | tuple) and action.default:  # "--img-size 224 224", as it is typed
            action = copy.copy(action)
            action.default = " ".join(map(str, action.default))
        return super()._expand_help(action)


def tool_parser(doc: str, prog: str | None = None) -> argparse.ArgumentParser:
    """The argument parser of a vision-moe command (tools/*.py and ``vision-moe``): ``doc`` as the description,
    each option's default in its help, and ``--version``."""
    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=HelpFormatter)
    p.add_argument("--version", action="version", version=f"vision-moe {__version__}")
    return p


def _demo(args: argparse.Namespace) -> int:
    """Build an M³ViT, route one batch per task, print each task's expert usage per MoE layer."""
    from .tasks import TASKS, is_restoration

    torch.manual_seed(args.seed)
    tasks = [t.strip() for t in args.tasks.split(",")]
    if not all(tasks) or len(set(tasks)) != len(tasks):
        raise ValueError(f"--tasks {args.tasks!r}: expected distinct comma-separated task names, e.g. semseg,depth")
    vit_tasks = sorted(t for t in TASKS if not is_restoration(t))  # degradations belong to restoration models
    unknown = [t for t in tasks if t not in vit_tasks]
    if unknown:
        raise ValueError(f"--tasks {args.tasks!r}: unknown task {unknown[0]!r}; expected names from {vit_tasks}")
    h, w = args.img_size
    model = create_model(args.model, tasks=tasks, img_size=(h, w), num_classes=0).eval()
    stride = model.feature_info[-1]["reduction"]  # the patch size, or a convolutional stem's total stride
    if h % stride or w % stride:
        raise ValueError(f"--img-size {h} {w}: expected multiples of {args.model}'s patch size {stride}")
    x = torch.randn(args.batch, 3, h, w)
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
            if not model.moe_layers():
                print(f"  (none: {args.model} has no MoE layers; every token goes through the same MLP)")
    return 0


def _baseline(args: argparse.Namespace) -> int:
    """Linear classifier on raw pixels of the built-in data: the floor the quickstart must clear."""
    from .data.builtin import linear_probe_baseline, prepare_builtin

    h, w = args.img_size
    if h != w:
        raise ValueError(f"--img-size {h} {w}: the built-in data is square; expected two equal sizes, e.g. 64 64")
    root = prepare_builtin(
        args.root, seed=args.seed, num_train=args.num_train, num_val=args.num_val, img_size=h, progress=True
    )
    r = linear_probe_baseline(root)
    print(
        f"built-in data {root}: linear probe on raw pixels, held-out top-1 {r['top1']:.3f} "
        f"(chance {r['chance_top1']:.3f})"
    )
    return 0


def _models(args: argparse.Namespace) -> int:
    names = list_models(args.pattern)
    if not names:
        raise ValueError(f"no model matches {args.pattern!r}; the models are {list_models()}")
    for name in names:
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


def build_parser() -> argparse.ArgumentParser:
    parser = tool_parser(
        "Small vision-moe commands that need no data; tools/*.py train, evaluate, export and download.",
        prog="vision-moe",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fmt = dict(formatter_class=HelpFormatter)
    demo = sub.add_parser("demo", help=_demo.__doc__, description=_demo.__doc__, **fmt)
    demo.add_argument(
        "--model", default="m3vit_tiny_patch16_224", choices=list_models(family="vit"), help="registered model"
    )
    demo.add_argument("--tasks", default="semseg,depth,normals", help="comma-separated task names, one router each")
    demo.add_argument(
        "--img-size", type=_at_least(1), nargs=2, default=[224, 224], metavar=("H", "W"), help="input height, width"
    )
    demo.add_argument("--batch", type=_at_least(1), default=2, help="images per task")
    demo.add_argument("--seed", type=int, default=0, help="seed of the weights and the random images")
    demo.set_defaults(fn=_demo)
    base = sub.add_parser("baseline", help=_baseline.__doc__, description=_baseline.__doc__, **fmt)
    base.add_argument(
        "--root", default="data_cache/builtin", help="folder of the built-in data, generated on first use"
    )
    base.add_argument("--seed", type=int, default=0, help="built-in data seed")
    base.add_argument("--num-train", type=_at_least(1), default=4000, help="training images")
    base.add_argument("--num-val", type=_at_least(1), default=300, help="held-out images")
    base.add_argument(
        "--img-size",
        type=_at_least(32),
        nargs=2,
        default=[64, 64],
        metavar=("H", "W"),
        help="image size; the built-in data is square",
    )
    base.set_defaults(fn=_baseline)
    models_doc = "List the registered models (every one is also a timm model)."
    models = sub.add_parser("models", help=models_doc, description=models_doc, **fmt)
    models.add_argument("pattern", nargs="?", default="*", help="glob over the model names")
    models.set_defaults(fn=_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Bad arguments end with one ``error:`` line (exit 2); ``VISION_MOE_DEBUG=1`` shows the traceback instead."""
    args = build_parser().parse_args(argv)
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
