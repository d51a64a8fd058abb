"""Restoring image files with a restoration network: whole or in overlapping tiles with blended seams.

Tiling (Restormer's ``--tile`` / ``--tile_overlap``, the feature users of restoration models ask for most): tiles
of ``tile`` pixels start every ``tile - overlap`` pixels, the last one flush with the image's end. Each tile is
restored on its own (the network pads it to its multiple) and the tiles are averaged with weights that, across
each overlap, are 0 for the outer quarter of the overlap next to the tile's inner edge, then rise linearly to 1
at three quarters of it (:func:`tile_weights`): two neighbours' weights sum to 1 there, so the seam is blended,
and no pixel takes anything from within ``overlap / 4`` of a tile's inner edge. A network whose output at a pixel
depends only on inputs within ``overlap / 4`` of it (a convolutional one) therefore gives exactly its untiled
output. A network with global attention (MoFME) sees only its tile, so its tiled output differs from the
untiled one everywhere a little; ``docs/restoration.md`` has the measured difference.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

__all__ = ["tile_starts", "tile_weights", "restore", "restore_files", "image_files"]


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of the tiles covering ``size`` pixels: every ``tile - overlap``, the last flush with the end."""
    if tile <= overlap:
        raise ValueError(f"tile {tile} must be larger than the overlap {overlap}")
    if size <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride))
    return starts + [size - tile]


def _ramp(length: int, lo_edge: bool, hi_edge: bool, overlap: int) -> torch.Tensor:
    """1-D weights of a tile of ``length`` px: ramps at the edges that face another tile (``*_edge``)."""
    w = torch.ones(length, dtype=torch.float64)
    if overlap <= 0:
        return w
    d = torch.arange(length, dtype=torch.float64) + 0.5  # distance of each pixel centre from the low edge
    ramp = lambda dist: ((dist - overlap / 4) / (overlap / 2)).clamp(0, 1)  # noqa: E731
    if lo_edge:
        w = w * ramp(d)
    if hi_edge:
        w = w * ramp(length - d)
    return w


def tile_weights(starts_y: Sequence[int], starts_x: Sequence[int], tile_h: int, tile_w: int, overlap: int):
    """For each tile (row-major), its (tile_h, tile_w) blending weight (see the module docstring)."""
    out = []
    for i, _ in enumerate(starts_y):
        wy = _ramp(tile_h, i > 0, i < len(starts_y) - 1, overlap)
        for j, _ in enumerate(starts_x):
            wx = _ramp(tile_w, j > 0, j < len(starts_x) - 1, overlap)
            out.append(wy[:, None] * wx[None, :])
    return out


@torch.no_grad()
def restore(
    net: nn.Module, images: torch.Tensor, task: str | None = None, tile: int | None = None, overlap: int = 32
) -> torch.Tensor:
    """(B, 3, H, W) input as the network takes it -> (B, 3, H, W) output, whole or tiled (``tile`` pixels)."""
    h, w = images.shape[-2:]
    if not tile or (h <= tile and w <= tile):
        return net(images, task)
    if overlap < 0:
        raise ValueError(f"tile overlap must be >= 0, got {overlap}")
    th, tw = min(tile, h), min(tile, w)
    ys, xs = tile_starts(h, th, overlap), tile_starts(w, tw, overlap)
    weights = tile_weights(ys, xs, th, tw, overlap)
    out = acc = None
    k = 0
    for y in ys:
        for x in xs:
            r = net(images[..., y : y + th, x : x + tw], task).double()
            if out is None:
                out = r.new_zeros(*r.shape[:2], h, w)
                acc = r.new_zeros(1, 1, h, w)
            wt = weights[k].to(r.device)
            out[..., y : y + th, x : x + tw] += r * wt
            acc[..., y : y + th, x : x + tw] += wt
            k += 1
    return (out / acc).to(images.dtype)


def image_files(path: str | Path) -> list[Path]:
    """The image files of ``path``: itself if it is a file, else the images directly inside it (sorted)."""
    from ..data.restoration import IMAGE_EXTENSIONS

    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: no such file or folder; expected an image or a folder of images")
    files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"{p}: no images ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
    return files


def restore_files(
    net: nn.Module,
    files: Sequence[Path],
    out_dir: str | Path,
    task: str | None = None,
    tile: int | None = None,
    overlap: int = 32,
    device: torch.device | str = "cpu",
    gt_dir: str | Path | None = None,
    crop_border: int = 0,
) -> Iterator[dict[str, Any]]:
    """Restore each file into ``out_dir/<stem>.png``; yields one record per file: ``file``, ``out`` (or ``error``)
    and, with ``gt_dir`` holding an image of the same stem, ``psnr`` / ``ssim`` (RGB) of output and input.

    Grey and RGBA images are converted to RGB; an unreadable file or a ground truth of another size gives a record
    with ``error`` (one line) and the next file is restored."""
    from ..data import BadSampleError
    from ..data.common import read_image
    from ..metrics.restoration import psnr, ssim

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    gts = {p.stem: p for p in image_files(gt_dir)} if gt_dir is not None else {}
    net = net.eval()
    for f in files:
        rec: dict[str, Any] = {"file": str(f)}
        try:
            img = read_image(f)
        except BadSampleError as e:
            yield {**rec, "error": str(e)}
            continue
        x = torch.from_numpy(img).permute(2, 0, 1).float().div(255.0)[None]  # (1, 3, H, W) in [0, 1]
        try:
            y = restore(net, (x * 2 - 1).to(device), task, tile, overlap)[0].clamp(0, 1).cpu()
        except ValueError as e:  # e.g. an image smaller than the network's multiple
            yield {**rec, "error": f"{f}: {e}"}
            continue
        out8 = (y.permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)
        dest = out_dir / f"{f.stem}.png"
        Image.fromarray(out8).save(dest)
        rec["out"] = str(dest)
        gt_path = gts.get(f.stem)
        if gt_path is not None:
            try:
                gt = read_image(gt_path)
            except BadSampleError as e:
                rec["gt_error"] = str(e)
            else:
                if gt.shape != img.shape:
                    rec["gt_error"] = (
                        f"{gt_path}: size {gt.shape[1]}x{gt.shape[0]} differs from {img.shape[1]}x{img.shape[0]}"
                    )
                else:
                    g, o, i = gt / 255.0, out8 / 255.0, img / 255.0
                    rec.update(
                        psnr=psnr(o, g, crop_border),
                        ssim=ssim(o, g, crop_border),
                        input_psnr=psnr(i, g, crop_border),
                        input_ssim=ssim(i, g, crop_border),
                    )
        elif gt_dir is not None:
            rec["gt_error"] = f"no ground truth {f.stem}.* in {gt_dir}"
        yield rec
