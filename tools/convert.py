#!/usr/bin/env python
"""Convert weights into and out of vision-moe: one subcommand per source.

  python tools/convert.py to-hub --checkpoint CKPT --out DIR          # training checkpoint -> Hub format
  python tools/convert.py m3vit SRC --out DIR [--tasks semseg,depth]  # M³ViT (FastMoE) checkpoint or shard folder
  python tools/convert.py modsquad SRC.pth --out DIR [--tasks ...]    # Mod-Squad checkpoint
  python tools/convert.py edge-moe-import WEIGHTS_DIR --out DIR        # Edge-MoE's .bin weight folder
  python tools/convert.py edge-moe-export --checkpoint CKPT --out WEIGHTS_DIR [--image IMG]

Every output of vision-moe's side is a folder in the Hub format (config.json + model.safetensors, timm's
push_to_hub layout): ``vision_moe.create_model("local-dir:DIR", pretrained=True)`` or
``timm.create_model("local-dir:DIR", pretrained=True)`` loads it; upload it with ``huggingface_hub.upload_folder``.
Each converter prints what it mapped, what it left out and why; bad input ends with one ``error:`` line.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from vision_moe.engine.checkpoint import CheckpointError
from vision_moe.models.convert import ConversionError


def _tasks(text: str | None) -> list[str] | None:
    if text is None:
        return None
    tasks = [t.strip() for t in text.split(",")]
    if not all(tasks) or len(set(tasks)) != len(tasks):
        raise ValueError(f"--tasks {text!r}: expected distinct comma-separated task names, e.g. semseg,depth")
    return tasks


def _save(conv, out: Path) -> None:
    from vision_moe import save_pretrained

    print(conv.report())
    model = conv.build()
    save_pretrained(model, out)
    print(f"wrote {out} (load it with vision_moe.create_model('local-dir:{out}', pretrained=True))")


def _to_hub(args) -> None:
    from vision_moe import save_pretrained
    from vision_moe.engine.checkpoint import load_model

    model, cfg = load_model(args.checkpoint)
    save_pretrained(model, args.out, config=cfg)
    n = sum(p.numel() for p in model.parameters())
    print(f"{args.checkpoint} -> {args.out}: {cfg['model']['backbone']} with heads for {list(model.tasks)}, "
          f"{n / 1e6:.2f} M parameters (config.json + model.safetensors)")  # fmt: skip


def _m3vit(args) -> None:
    from vision_moe.models.convert import read_m3vit, remap_m3vit

    state = read_m3vit(args.src)
    conv = remap_m3vit(state, str(args.src), _tasks(args.tasks), args.num_heads, args.top_k or 4, args.img_size)
    _save(conv, args.out)


def _modsquad(args) -> None:
    from vision_moe.models.convert import read_modsquad, remap_modsquad

    state = read_modsquad(args.src)
    conv = remap_modsquad(state, str(args.src), _tasks(args.tasks), args.num_heads, args.top_k, args.img_size)
    _save(conv, args.out)


def _edge_import(args) -> None:
    from vision_moe.deploy.edge_moe import read_edge_moe

    _save(read_edge_moe(args.src, _tasks(args.tasks)), args.out)


def _read_image(path: Path):
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return path.name, np.asarray(im.convert("RGB"))
    except (OSError, UnidentifiedImageError) as e:
        raise ValueError(f"{path}: cannot read the image ({e})") from None


def _edge_export(args) -> None:
    from vision_moe.deploy.edge_moe import EDGE_MOE, write_edge_moe

    if bool(args.checkpoint) == bool(args.model):
        raise ValueError("give --checkpoint or --model (a hf-hub: / local-dir: source or a weight tag), not both")
    mean = std = None
    if args.checkpoint:
        from vision_moe.engine.checkpoint import load_model

        model, cfg = load_model(args.checkpoint)
        model = model.backbone
        mean, std = cfg["model"].get("mean"), cfg["model"].get("std")
    else:
        import vision_moe

        model = vision_moe.create_model(args.model, pretrained=True)
        model = getattr(model, "backbone", model)
    if args.image:
        images = [_read_image(p) for p in args.image]
    else:
        from vision_moe.deploy.hls import builtin_images

        images = builtin_images(EDGE_MOE["img"], count=1)
    for line in write_edge_moe(model, args.out, _tasks(args.tasks), mean, std, images):
        print(line)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    hub = sub.add_parser("to-hub", help="a training checkpoint -> the Hub format (with its heads)")
    hub.add_argument(
        "--checkpoint", required=True, type=Path, help="checkpoint folder (config.json + model.safetensors)"
    )
    hub.add_argument("--out", required=True, type=Path)
    for name, help_ in (
        ("m3vit", "M³ViT checkpoint file or folder of <rank>.pth shards"),
        ("modsquad", "Mod-Squad .pth"),
    ):
        s = sub.add_parser(name, help=f"{help_} -> the Hub format (backbone)")
        s.add_argument("src", type=Path, help=help_)
        s.add_argument("--out", required=True, type=Path)
        s.add_argument("--tasks", help="task names in the source's gate order, comma-separated")
        s.add_argument("--num-heads", type=int, help="attention heads (not stored in the checkpoint)")
        s.add_argument("--top-k", type=int, help="experts per token in the MoE MLP (not stored in the checkpoint)")
        s.add_argument("--img-size", type=int, nargs=2, metavar=("H", "W"), help="training image size")
    imp = sub.add_parser("edge-moe-import", help="Edge-MoE's weights/ folder -> the Hub format")
    imp.add_argument("src", type=Path, help="Edge-MoE's weights folder (<name>.float32.bin files)")
    imp.add_argument("--out", required=True, type=Path)
    imp.add_argument("--tasks", help="names of the gates task0, task1 (default semseg,depth)")
    exp = sub.add_parser("edge-moe-export", help="a vision-moe M³ViT-T -> Edge-MoE's weights/ folder")
    exp.add_argument("--checkpoint", type=Path, help="training checkpoint or save_pretrained folder")
    exp.add_argument("--model", help="or: a model source (local-dir:DIR, hf-hub:ORG/NAME) loaded with its weights")
    exp.add_argument("--out", required=True, type=Path, help="the weights folder to write")
    exp.add_argument("--tasks", help="the two tasks whose gates become task0, task1 (default: the model's)")
    exp.add_argument("--image", type=Path, nargs="+", help="128 x 256 test images (default: a scikit-image photograph)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    run = {"to-hub": _to_hub, "m3vit": _m3vit, "modsquad": _modsquad, "edge-moe-import": _edge_import}
    run["edge-moe-export"] = _edge_export
    try:
        run[args.cmd](args)
    except (ConversionError, CheckpointError, ValueError, OSError) as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
