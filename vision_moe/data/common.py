"""Shared pieces of the data layer: task names, bad-sample handling, file readers, collate."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

_logger = logging.getLogger(__name__)

TASKS = ("classification", "detection", "semseg", "human_parts", "saliency", "normals", "edges", "depth")
DENSE_TASKS = ("semseg", "human_parts", "saliency", "normals", "edges", "depth")
IGNORE_INDEX = 255


class BadSampleError(ValueError):
    """A sample whose image or annotation cannot be read; carries the offending path and the reason."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def check_tasks(tasks: Sequence[str] | None, available: Sequence[str], owner: str) -> tuple[str, ...]:
    """Validate a task selection against what a dataset labels; None selects all of them."""
    if tasks is None:
        return tuple(available)
    if isinstance(tasks, str):
        tasks = (tasks,)
    for t in tasks:
        if t not in available:
            raise ValueError(f"{owner}: unknown task {t!r}; expected one of {list(available)}")
    return tuple(tasks)


def _reason(e: BaseException) -> str:
    """One line for an exception: its message (or its type when it has none)."""
    msg = " ".join(str(e).split())
    return msg if msg else type(e).__name__


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as (H, W, 3) uint8 RGB, or raise BadSampleError."""
    try:
        with Image.open(path) as im:
            im.load()  # decode fully here so truncation is caught here, not later
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except FileNotFoundError:
        raise BadSampleError(path, "file not found") from None
    except Exception as e:  # decoders raise many types on a corrupt file: all of them mean a bad sample
        raise BadSampleError(path, f"cannot decode image ({_reason(e)}); expected a readable RGB image") from None


def read_png(path: str | Path, expect_hw: tuple[int, int] | None = None, mode: str | None = None) -> np.ndarray:
    """Read a label/dense PNG as a numpy array (values unchanged; 16-bit stays 16-bit), or raise BadSampleError."""
    try:
        with Image.open(path) as im:
            im.load()
            if mode is not None and im.mode != mode:
                im = im.convert(mode)
            arr = np.asarray(im).copy()
    except FileNotFoundError:
        raise BadSampleError(path, "file not found") from None
    except Exception as e:  # as in read_image
        raise BadSampleError(path, f"cannot decode PNG ({_reason(e)})") from None
    if expect_hw is not None and tuple(arr.shape[:2]) != tuple(expect_hw):
        raise BadSampleError(path, f"size {arr.shape[:2]} does not match image size {tuple(expect_hw)}")
    return arr


def read_npy(path: str | Path, expect_hw: tuple[int, int] | None = None) -> np.ndarray:
    """Read a numeric .npy array, or raise BadSampleError (empty, truncated, .npz, non-numeric: all bad samples)."""
    try:
        arr = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise BadSampleError(path, "file not found") from None
    except Exception as e:  # EOFError on an empty file, ValueError when truncated, ...
        raise BadSampleError(path, f"cannot read .npy ({_reason(e)}); expected an array saved by numpy.save") from None
    if not isinstance(arr, np.ndarray):  # an .npz archive
        arr.close()
        raise BadSampleError(path, "is an .npz archive; expected a single array saved by numpy.save")
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_) or np.iscomplexobj(arr):
        raise BadSampleError(path, f".npy has dtype {arr.dtype}; expected a real numeric array")
    if expect_hw is not None and tuple(arr.shape[:2]) != tuple(expect_hw):
        raise BadSampleError(path, f"size {arr.shape[:2]} does not match image size {tuple(expect_hw)}")
    return arr


def decode_normals_png(arr: np.ndarray) -> np.ndarray:
    """Decode RGB-encoded normals ((n + 1) / 2 * 255) to float unit vectors (H, W, 3); black = invalid = 0."""
    arr = arr[..., :3]
    invalid = np.all(arr == 0, axis=-1)
    n = arr.astype(np.float32) * (2.0 / 255.0) - 1.0
    norm = np.linalg.norm(n, axis=-1, keepdims=True)
    n = np.where(norm > 1e-6, n / np.maximum(norm, 1e-6), 0.0).astype(np.float32)
    n[invalid] = 0.0
    return n


def encode_normals_png(normals: np.ndarray) -> np.ndarray:
    """Encode unit normals (H, W, 3) in [-1, 1] to uint8 RGB; zero vectors (invalid) become black."""
    enc = np.clip(np.round((normals + 1.0) * 127.5), 1, 255).astype(np.uint8)
    enc[np.all(normals == 0, axis=-1)] = 0
    return enc


def finalize_sample(raw: dict[str, Any], transform: Any, tasks: Sequence[str]) -> tuple[torch.Tensor, dict]:
    """Run ``transform`` (default: normalise with mean/std 0.5) on a raw numpy sample; return (image, target)."""
    if transform is None:
        from .transforms import build_transforms

        transform = build_transforms(train=False, img_size=None, tasks=tasks)
    return transform(raw)


class SkipBadSamples(torch.utils.data.Dataset):
    """Wrap a dataset so samples raising BadSampleError come back as None (dropped by collate_multitask).

    ``bad_count`` / ``bad_samples`` count what this process saw (with DataLoader workers, each worker keeps
    its own count; the trainer can also count the samples missing from each batch).
    """

    def __init__(self, dataset: torch.utils.data.Dataset):
        self.dataset = dataset
        self.bad_samples: list[tuple[int, str]] = []
        self._seen = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str) -> Any:
        if name == "dataset":  # not yet set (e.g. during unpickling)
            raise AttributeError(name)
        return getattr(self.dataset, name)

    @property
    def bad_count(self) -> int:
        return len(self.bad_samples)

    @property
    def bad_fraction(self) -> float:
        return self.bad_count / max(self._seen, 1)

    def __getitem__(self, index: int) -> Any:
        self._seen += 1
        try:
            return self.dataset[index]
        except BadSampleError as e:
            self.bad_samples.append((index, str(e)))
            _logger.warning("skipping bad sample %d: %s", index, e)
            return None


def _pad_to(t: torch.Tensor, h: int, w: int, value: float) -> torch.Tensor:
    dh, dw = h - t.shape[-2], w - t.shape[-1]
    return t if dh == 0 and dw == 0 else torch.nn.functional.pad(t, (0, dw, 0, dh), value=value)


def collate_multitask(batch: Sequence[Any]) -> tuple[torch.Tensor, list[dict]]:
    """Stack images (B, 3, H, W) and keep targets as a list of dicts; None samples (bad ones) are dropped.

    Images of different sizes are zero-padded at the bottom/right to the largest one (boxes stay valid).
    """
    batch = [b for b in batch if b is not None]
    if not batch:
        return torch.zeros(0, 3, 1, 1), []
    h = max(b[0].shape[-2] for b in batch)
    w = max(b[0].shape[-1] for b in batch)
    images = torch.stack([_pad_to(b[0], h, w, 0.0) for b in batch])  # (B, 3, H, W)
    return images, [b[1] for b in batch]


def stack_target(targets: Sequence[dict], key: str) -> torch.Tensor:
    """Stack one dense (or scalar) target key across a batch: e.g. 'semseg' -> (B, H, W).

    Maps of different sizes are padded at the bottom/right like the images: label maps with 255 (ignore),
    the others with 0 (invalid / negative).
    """
    missing = [i for i, t in enumerate(targets) if key not in t]
    if missing:
        raise KeyError(f"target key {key!r} missing in batch items {missing}; present: {sorted(targets[0])}")
    items = [t[key] for t in targets]
    if items[0].dim() >= 2:
        h = max(x.shape[-2] for x in items)
        w = max(x.shape[-1] for x in items)
        value = float(IGNORE_INDEX) if key in ("semseg", "human_parts") else 0.0
        items = [_pad_to(x, h, w, value) for x in items]
    return torch.stack(items)


def read_label_png(path: str | Path, expect_hw: tuple[int, int] | None = None) -> np.ndarray:
    """Indexed / grey label PNG -> (H, W) int64 class ids (palette indices are kept as ids)."""
    arr = read_png(path, expect_hw)
    if arr.ndim != 2:
        raise BadSampleError(path, f"label PNG has shape {arr.shape}; expected a single-channel (H, W) map")
    return arr.astype(np.int64)


def read_binary_png(path: str | Path, expect_hw: tuple[int, int] | None = None) -> np.ndarray:
    """Grey PNG (0/255, or soft 0..255) -> (H, W) float32 in {0, 1} thresholded at half range."""
    arr = read_png(path, expect_hw, mode="L")
    return (arr > 127).astype(np.float32)


def read_depth_png(path: str | Path, expect_hw: tuple[int, int] | None = None, scale: float = 1000.0) -> np.ndarray:
    """16-bit PNG depth in millimetres (0 = invalid) -> (H, W) float32 metres."""
    arr = read_png(path, expect_hw)
    if arr.ndim != 2 or arr.dtype not in (np.uint16, np.int32, np.uint8):
        raise BadSampleError(path, f"depth PNG has shape {arr.shape} dtype {arr.dtype}; expected 16-bit grey")
    return arr.astype(np.float32) / scale


def read_normals_png(path: str | Path, expect_hw: tuple[int, int] | None = None) -> np.ndarray:
    """RGB PNG normals ((n + 1) / 2 * 255; black = invalid) -> (H, W, 3) float32 unit vectors."""
    arr = read_png(path, expect_hw, mode="RGB")
    return decode_normals_png(arr)


def content_hash(root: Path) -> str:
    """sha256 over every file's relative path and bytes under ``root`` (``manifest.json`` left out)."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != "manifest.json":
            h.update(str(p.relative_to(root)).encode())
            h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def cached_folder(
    out: Path, params: dict, write: Callable[[Path], dict], verify: bool = True, what: str = "generated data"
) -> Path:
    """The generated-data cache of the built-in sets: ``out`` is reused when its ``manifest.json`` holds ``params``
    and (with ``verify``) the content hash of its files; otherwise it is regenerated by ``write(tmp)``, which
    fills a temporary folder beside ``out`` and returns the manifest's other fields. The manifest is written
    last and the folder renamed into place, so concurrent callers (DDP ranks) never see a half-written copy.
    ``what`` names the data in the log line that says it is being generated (once)."""
    manifest = out / "manifest.json"
    if manifest.exists():
        try:
            m = json.loads(manifest.read_text())
        except json.JSONDecodeError:
            m = {}
        if m.get("params") == params and (not verify or m.get("sha256") == content_hash(out)):
            return out
        _logger.warning("%s: manifest does not match the arguments or the content; regenerating", out)
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _logger.info("generating %s into %s; once: later runs reuse it", what, out)
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name.split('_v')[0]}-", dir=out.parent))
    try:
        extra = write(tmp)
        man = dict(params=params, sha256=content_hash(tmp), **extra)
        man["generation_seconds"] = round(time.perf_counter() - t0, 2)
        (tmp / "manifest.json").write_text(json.dumps(man, indent=1))
        try:
            os.rename(tmp, out)
        except OSError:  # another process finished first: keep its copy
            if not manifest.exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    _logger.info("%s written in %.1f s", out, time.perf_counter() - t0)
    return out
