"""Pretrained weights: where they come from, download with sha256 check, cache, offline mode.

Sources are named like timm's weights, ``arch.tag``. Two kinds are known:

- vision-moe's own entries in :data:`WEIGHTS` (``url`` + ``sha256``, or ``hf_hub_id`` + ``filename``);
  users add theirs with :func:`register_weights`.
- any timm weight tag (``vit_small_patch16_224.augreg_in21k_ft_in1k``): the dense ViT checkpoints that
  sparse upcycling starts from; timm's pretrained config says where they live.

Downloads stream to a temporary file, are checked (size and sha256) and then renamed into the cache, so
a broken or tampered download never lands. ``VISION_MOE_OFFLINE=1`` (or ``HF_HUB_OFFLINE=1``) forbids
the network: only cached files are used.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

__all__ = [
    "WeightsEntry",
    "WEIGHTS",
    "register_weights",
    "cache_dir",
    "is_offline",
    "sha256_file",
    "download_url",
    "resolve_weights",
    "fetch_weights",
]

_logger = logging.getLogger(__name__)
_CHUNK = 1 << 20


@dataclass(frozen=True)
class WeightsEntry:
    """Where one set of weights lives. Give ``url`` (+ ``sha256``) or ``hf_hub_id`` (+ ``filename``)."""

    url: str | None = None
    sha256: str | None = None
    hf_hub_id: str | None = None
    filename: str | None = None
    license: str | None = None
    notes: str = ""

    def __post_init__(self) -> None:
        if bool(self.url) == bool(self.hf_hub_id):
            raise ValueError("a weights entry needs exactly one of url= or hf_hub_id=")
        if self.sha256 is not None and (
            len(self.sha256) != 64 or any(c not in "0123456789abcdef" for c in self.sha256)
        ):
            raise ValueError(f"sha256 must be 64 lowercase hex digits, got {self.sha256!r}")


# vision-moe has published no trained weights yet; entries are added here as they are released (with sha256).
WEIGHTS: dict[str, WeightsEntry] = {}


def register_weights(name: str, entry: WeightsEntry, overwrite: bool = False) -> None:
    """Add a named weights source (``arch.tag``)."""
    if "." not in name:
        raise ValueError(f"weights name {name!r} must be 'arch.tag'")
    if name in WEIGHTS and not overwrite:
        raise ValueError(f"weights {name!r} already registered")
    WEIGHTS[name] = entry


def cache_dir() -> Path:
    """``$VISION_MOE_CACHE`` or ``~/.cache/vision_moe``."""
    return Path(os.environ.get("VISION_MOE_CACHE", Path.home() / ".cache" / "vision_moe"))


def is_offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("VISION_MOE_OFFLINE", "HF_HUB_OFFLINE"))


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def download_url(
    url: str,
    sha256: str | None = None,
    filename: str | None = None,
    dest: Path | None = None,
    progress: bool = False,
    timeout: float = 60.0,
) -> Path:
    """Download ``url`` into the cache (or ``dest``) and return the path.

    A cached file is reused when its sha256 matches (or no sha256 is given). The download goes to a
    temporary file in the same folder and is renamed only after its length and sha256 are checked.
    """
    name = filename or Path(urlparse(url).path).name
    if not name:
        raise ValueError(f"cannot tell a file name from {url!r}; pass filename=")
    folder = dest or cache_dir()
    target = folder / name
    if target.exists():
        if sha256 is None or sha256_file(target) == sha256:
            return target
        _logger.warning("cached %s does not match sha256 %s; downloading again", target, sha256)
    if is_offline():
        raise FileNotFoundError(f"offline mode: {target} is not cached (source {url})")
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".part")
    try:
        h = hashlib.sha256()
        got = 0
        with os.fdopen(fd, "wb") as out:
            try:
                resp = urllib.request.urlopen(url, timeout=timeout)  # noqa: S310 (http/https/file URLs by design)
            except urllib.error.URLError as e:
                raise ConnectionError(f"cannot download {url}: {e.reason}") from e
            with resp:
                total = int(resp.headers.get("Content-Length") or 0)
                bar = None
                if progress:
                    from tqdm import tqdm

                    bar = tqdm(total=total or None, unit="B", unit_scale=True, desc=name)
                for chunk in iter(lambda: resp.read(_CHUNK), b""):
                    out.write(chunk)
                    h.update(chunk)
                    got += len(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
                if bar is not None:
                    bar.close()
        if total and got != total:
            raise OSError(f"download of {url} truncated: got {got} of {total} bytes")
        digest = h.hexdigest()
        if sha256 is not None and digest != sha256:
            raise ValueError(f"checksum mismatch for {url}: expected sha256 {sha256}, got {digest}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def resolve_weights(name: str) -> WeightsEntry:
    """The source of ``name``: a vision-moe entry, or a timm weight tag (url / hf_hub_id from timm)."""
    if name in WEIGHTS:
        return WEIGHTS[name]
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(name, allow_unregistered=False)
    except (RuntimeError, KeyError) as e:
        cfg = None
        _logger.debug("timm has no weights %s: %s", name, e)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        known = sorted(WEIGHTS)
        raise ValueError(
            f"unknown weights {name!r}: not a vision-moe entry {known} nor a timm weight tag "
            "with a download source (try 'vit_small_patch16_224.augreg_in21k_ft_in1k')"
        )
    if cfg.hf_hub_id:
        return WeightsEntry(
            hf_hub_id=cfg.hf_hub_id, filename=cfg.hf_hub_filename or "model.safetensors", license=cfg.license
        )
    return WeightsEntry(url=cfg.url, license=cfg.license)


def fetch_weights(name_or_entry: str | WeightsEntry, progress: bool = False) -> Path:
    """Local path of the weights, downloading into the cache if needed (never in offline mode)."""
    entry = resolve_weights(name_or_entry) if isinstance(name_or_entry, str) else name_or_entry
    if entry.url:
        return download_url(entry.url, sha256=entry.sha256, filename=entry.filename, progress=progress)
    from huggingface_hub import hf_hub_download

    # huggingface_hub verifies the LFS sha256 itself and honours HF_HUB_OFFLINE; our flag is passed through.
    path = Path(
        hf_hub_download(
            entry.hf_hub_id,
            entry.filename or "model.safetensors",
            cache_dir=str(cache_dir() / "hf"),
            local_files_only=is_offline(),
        )
    )
    if entry.sha256 is not None and sha256_file(path) != entry.sha256:
        raise ValueError(f"checksum mismatch for {entry.hf_hub_id}/{entry.filename}: expected sha256 {entry.sha256}")
    return path
