#!/usr/bin/env python
"""Download pretrained weights into the cache, checked by sha256, and print the local path.

  python tools/download.py --list                                          # every weight tag and its source
  python tools/download.py m3vit_small_patch16_224.augreg_in21k_ft_in1k     # a zoo tag: its dense timm ViT
  python tools/download.py vit_small_patch16_224.augreg_in21k_ft_in1k      # any timm weight tag
  python tools/download.py hf-hub:ORG/NAME                                  # a model saved by save_pretrained
  python tools/download.py --url https://host/m3vit.safetensors --sha256 <64 hex>

Hub files go into the Hugging Face cache (HF_HUB_CACHE, or $VISION_MOE_CACHE/hf), where
``vision_moe.create_model(TAG, pretrained=True)`` finds them, also offline (HF_HUB_OFFLINE=1 or VISION_MOE_OFFLINE=1).
--url downloads go to ~/.cache/vision_moe (or $VISION_MOE_CACHE).
"""

import sys
from pathlib import Path

from vision_moe.cli import tool_parser
from vision_moe.hub import WEIGHTS, WeightsEntry, check_plain_filename, fetch_weights

EXAMPLE = "vit_small_patch16_224.augreg_in21k_ft_in1k"


def build_parser():
    ap = tool_parser(__doc__, prog=Path(__file__).name)
    ap.add_argument(
        "name",
        nargs="?",
        help="weights name: a vision-moe entry or a timm weight tag, arch.tag (default: none, with --url or --list)",
    )
    ap.add_argument("--url", help="download this URL instead of a named entry (default: none, with a NAME)")
    ap.add_argument(
        "--sha256", help="expected sha256 of the file (with --url; 64 hex digits, either case; default: not checked)"
    )
    ap.add_argument("--filename", help="file name in the cache (with --url; default: the URL's last part)")
    ap.add_argument("--list", action="store_true", help="list every weight tag, its source and licence, and exit")
    return ap


def _list() -> None:
    import timm

    from vision_moe.models.moe_vit import ZOO

    rows = [("tag", "source", "licence", "exact at init")]
    for tag, z in ZOO.items():
        cfg = timm.models.get_pretrained_cfg(tag)
        rows.append((tag, f"{cfg.hf_hub_id} (dense, upcycled on load)", cfg.license or "-", "yes" if z.exact else "no"))
    for name, entry in sorted(WEIGHTS.items()):
        rows.append((name, entry.url or entry.hf_hub_id, entry.license or "-", "-"))
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, width)) + "  " + r[3])


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.list:
        if args.name or args.url:
            ap.error("--list lists the weight tags; give it alone, without a name or --url")
        _list()
        return 0
    if not args.name and not args.url:
        ap.error(f"expected a weights NAME (e.g. {EXAMPLE}), --url URL or --list")
    if args.name and args.url:
        ap.error("give a weights name or --url, not both")
    for flag, value in (("--sha256", args.sha256), ("--filename", args.filename)):
        if value is not None and not args.url:
            ap.error(f"{flag} applies to --url downloads only; a named entry brings its own")
    if args.filename is not None:
        try:
            check_plain_filename(args.filename, "--filename")
        except ValueError as e:
            ap.error(str(e))
    try:
        if args.name and args.name.startswith("hf-hub:"):  # config.json and the weights, as create_model reads them
            repo = args.name.removeprefix("hf-hub:")
            for f in ("config.json", "model.safetensors"):
                path = fetch_weights(WeightsEntry(hf_hub_id=repo, filename=f), progress=True, name=args.name)
            print(path.parent)
            return 0
        src = WeightsEntry(url=args.url, sha256=args.sha256, filename=args.filename) if args.url else args.name
        print(fetch_weights(src, progress=True))
    except (ValueError, OSError, ConnectionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
