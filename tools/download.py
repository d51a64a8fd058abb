#!/usr/bin/env python
"""Download pretrained weights into the cache, checked by sha256, and print the local path.

  python tools/download.py vit_small_patch16_224.augreg_in21k_ft_in1k      # a timm dense ViT to upcycle
  python tools/download.py --url https://host/m3vit.safetensors --sha256 <64 hex>
  python tools/download.py --list

The cache is ~/.cache/vision_moe (or $VISION_MOE_CACHE); VISION_MOE_OFFLINE=1 uses only what is in it. Then upcycle
or load: ``vision_moe.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=PATH))``.
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
    ap.add_argument("--list", action="store_true", help="list vision-moe's registered weights and exit")
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.list:
        if args.name or args.url:
            ap.error("--list lists the registered weights; give it alone, without a name or --url")
        for name, entry in sorted(WEIGHTS.items()):
            print(name, entry.url or entry.hf_hub_id)
        if not WEIGHTS:
            print("(no vision-moe weights published yet; any timm weight tag can be fetched for upcycling)")
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
        src = WeightsEntry(url=args.url, sha256=args.sha256, filename=args.filename) if args.url else args.name
        print(fetch_weights(src, progress=True))
    except (ValueError, OSError, ConnectionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
