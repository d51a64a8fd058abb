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
import json
import logging
import os
import socket
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
    "hf_cache_dir",
    "is_offline",
    "sha256_file",
    "check_plain_filename",
    "download_url",
    "resolve_weights",
    "fetch_weights",
    "save_pretrained",
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
        if self.sha256 is not None:
            object.__setattr__(self, "sha256", _check_sha256(self.sha256))


def _check_sha256(sha256: str) -> str:
    """``sha256`` as 64 lowercase hex digits (either case accepted), or a ValueError."""
    norm = sha256.strip().lower() if isinstance(sha256, str) else ""
    if len(norm) != 64 or any(c not in "0123456789abcdef" for c in norm):
        raise ValueError(f"sha256 must be 64 hex digits, got {sha256!r}")
    return norm


def check_plain_filename(name: str, what: str = "filename") -> str:
    """``name`` if it is a bare file name (no folder part, not '.' or '..'), else a ValueError."""
    if not name or name in (".", "..") or any(sep in name for sep in ("/", "\\", "\0")):
        raise ValueError(f"{what} must be a plain file name, got {name!r}")
    return name


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
    return Path(os.environ.get("VISION_MOE_CACHE") or Path.home() / ".cache" / "vision_moe")


def _offline_var() -> str | None:
    """The environment variable that turns offline mode on, if one does."""
    for v in ("VISION_MOE_OFFLINE", "HF_HUB_OFFLINE"):
        if os.environ.get(v, "").lower() in ("1", "true", "yes"):
            return v
    return None


def is_offline() -> bool:
    return _offline_var() is not None


def _cache_error(folder: Path, e: OSError, in_cache: bool) -> OSError:
    env = os.environ.get("VISION_MOE_CACHE")
    if not in_cache:
        where = f"{folder}: cannot create or write the download folder"
    elif env:
        where = f"VISION_MOE_CACHE={env}: cannot create or write the weights cache {folder}"
    else:
        where = f"{folder}: cannot create or write the weights cache (set VISION_MOE_CACHE to use another folder)"
    return OSError(f"{where} ({e.strerror or e}); expected a writable directory")


def _one_line(e: BaseException) -> str:
    """The root cause of ``e`` (through ``raise ... from``) as one line."""
    seen = {id(e)}
    while (nxt := e.__cause__ or (None if e.__suppress_context__ else e.__context__)) and id(nxt) not in seen:
        seen.add(id(nxt))
        e = nxt
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def _check_reachable(url: str, missing: str, folder: Path, download_args: str, timeout: float = 5.0) -> None:
    """One TCP connection to the host of ``url`` (or to the proxy the environment names for it); if it fails, a
    ConnectionError at once that says how to work offline (huggingface_hub would retry an unreachable host for
    about half a minute). ``missing``: what is not in the cache ``folder``; ``download_args``: tools/download.py's
    arguments that fetch it."""
    u = urlparse(url)
    if u.scheme not in ("http", "https") or not u.hostname:
        return
    proxy = urllib.request.getproxies().get(u.scheme)
    if proxy and not urllib.request.proxy_bypass(u.hostname):
        u = urlparse(proxy if "://" in proxy else f"http://{proxy}")
    host, port = u.hostname, u.port or (443 if u.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        reason = "timed out" if isinstance(e, TimeoutError) else e.strerror or _one_line(e)
        raise ConnectionError(
            f"cannot connect to {host}:{port} ({reason}) and {missing} is not in the cache {folder}; to work "
            f"offline, run 'python tools/download.py {download_args}' where there is network access, copy that "
            "cache folder here (VISION_MOE_CACHE names it) and set VISION_MOE_OFFLINE=1"
        ) from None


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
    check_plain_filename(name)
    sha256 = None if sha256 is None else _check_sha256(sha256)
    folder = dest or cache_dir()
    target = folder / name
    if target.is_file():
        if sha256 is None or sha256_file(target) == sha256:
            return target
        _logger.warning("cached %s does not match sha256 %s; downloading again", target, sha256)
    offline = _offline_var()
    if offline:
        raise FileNotFoundError(
            f"offline ({offline}={os.environ[offline]}): {url} is not in the cache as {target}; download it once "
            f"with network access or unset {offline}"
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _cache_error(folder, e, in_cache=dest is None) from None
    _check_reachable(url, url, folder, f"--url {url}" + (f" --sha256 {sha256}" if sha256 else ""))
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".part")
    except OSError as e:
        raise _cache_error(folder, e, in_cache=dest is None) from None
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


def hf_cache_dir() -> Path:
    """Where Hugging Face Hub files are cached: ``$VISION_MOE_CACHE/hf`` when that is set, else huggingface_hub's
    own cache (``HF_HUB_CACHE``, by default ``~/.cache/huggingface/hub``), which timm and transformers share."""
    if os.environ.get("VISION_MOE_CACHE"):
        return cache_dir() / "hf"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def fetch_weights(
    name_or_entry: str | WeightsEntry,
    progress: bool = False,
    cache_dir: str | Path | None = None,
    name: str | None = None,
) -> Path:
    """Local path of the weights, downloading into the cache if needed (never in offline mode).

    Hub files go through ``huggingface_hub.hf_hub_download`` into :func:`hf_cache_dir` (or ``cache_dir``); a
    ``hf_hub_id`` may name a revision as ``org/repo@rev``. ``name`` is the tag shown in messages."""
    name = name or (name_or_entry if isinstance(name_or_entry, str) else "<weights name>")
    entry = resolve_weights(name_or_entry) if isinstance(name_or_entry, str) else name_or_entry
    if entry.url:
        return download_url(entry.url, sha256=entry.sha256, filename=entry.filename, progress=progress)
    from huggingface_hub import hf_hub_download, hf_hub_url
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    repo, _, revision = entry.hf_hub_id.partition("@")
    fname = entry.filename or "model.safetensors"
    folder = Path(cache_dir) if cache_dir else hf_cache_dir()
    offline = _offline_var()
    if not offline:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _cache_error(folder, e, in_cache=True) from None
    url = hf_hub_url(repo, fname, revision=revision or None)
    unreachable = None
    if offline is None:
        try:
            _check_reachable(url, f"{repo}/{fname}", folder, name)
        except ConnectionError as e:  # a cached copy still serves, as huggingface_hub's own fallback would
            unreachable = e
    # huggingface_hub verifies the LFS sha256 itself and honours HF_HUB_OFFLINE; our flag is passed through.
    # Its errors name neither the file nor the cache (and span several lines): each becomes one line that does.
    try:
        local_only = offline is not None or unreachable is not None
        path = hf_hub_download(
            repo, fname, revision=revision or None, cache_dir=str(folder), local_files_only=local_only
        )
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:  # not cached, and the network failed or is off
        if offline:
            raise FileNotFoundError(
                f"offline ({offline}={os.environ[offline]}): {entry.hf_hub_id}/{fname} is not in the cache {folder}; "
                f"download it once with network access (python tools/download.py {name}) or unset {offline}"
            ) from None
        if unreachable is not None:
            raise unreachable from None
        raise ConnectionError(f"cannot download {url} ({_one_line(e)}) and it is not in the cache {folder}") from None
    except Exception as e:  # unknown repo / file (HTTP 401, 404), a full disk, ...
        raise OSError(f"cannot fetch {url} into the cache {folder}: {_one_line(e)}") from None
    path = Path(path)
    if entry.sha256 is not None and sha256_file(path) != entry.sha256:
        raise ValueError(f"checksum mismatch for {entry.hf_hub_id}/{entry.filename}: expected sha256 {entry.sha256}")
    return path


# ---------------------------------------------------------------------- the Hub format (timm's push_to_hub layout)
HUB_CONFIG, HUB_WEIGHTS = "config.json", "model.safetensors"


def save_pretrained(
    model,
    directory: str | Path,
    config: dict | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
) -> Path:
    """Write ``model`` in the layout timm's ``push_to_hub`` / ``save_for_hf`` write: ``config.json`` (architecture,
    ``model_args``, ``pretrained_cfg`` with mean/std/input size) and ``model.safetensors``.

    ``model`` is a backbone (``MoEVisionTransformer``) or a multi-task model (``.backbone`` + ``.heads``). The
    backbone's tensors keep timm's names, so ``timm.create_model("hf-hub:ORG/NAME", pretrained=True)`` (or
    ``local-dir:DIR``) loads the backbone; the heads are stored as ``heads.<task>.*`` and ``config`` (a training
    checkpoint's config.json: its ``model`` section rebuilds the heads, ``experiment`` the held-out data) goes into
    config.json too, so ``vision_moe.create_model("hf-hub:ORG/NAME", pretrained=True)``, ``tools/eval.py`` and
    ``tools/export.py`` rebuild the whole model. The weights are written first and config.json last (with the
    weights' sha256), each atomically: a complete config.json means complete weights. Upload the folder with
    ``huggingface_hub.upload_folder``.
    """
    from safetensors.torch import save_file
    from timm.models import save_for_hf

    from .engine.checkpoint import atomic_write_text

    backbone = getattr(model, "backbone", model)
    heads = getattr(model, "heads", None)
    config = dict(config or {})
    section = config.get("model") or {}
    if heads is not None and not section:
        raise ValueError(
            "save_pretrained: a multi-task model needs config= with its 'model' section (the checkpoint's "
            "config.json) so its heads can be rebuilt"
        )
    pcfg = dict(getattr(backbone, "pretrained_cfg", None) or {})
    h, w = backbone.patch_embed.img_size
    pcfg.update(
        mean=tuple(mean or section.get("mean") or pcfg.get("mean") or (0.5,) * 3),
        std=tuple(std or section.get("std") or pcfg.get("std") or (0.5,) * 3),
        input_size=(3, int(h), int(w)),
    )
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    saved = getattr(backbone, "pretrained_cfg", None)
    weights = out / HUB_WEIGHTS
    with tempfile.TemporaryDirectory(dir=out, prefix=".save_pretrained.") as tmp:
        backbone.pretrained_cfg = pcfg  # timm writes the pretrained_cfg (mean, std, input size) of the model given
        try:
            save_for_hf(backbone, tmp, safe_serialization=True)
        finally:
            backbone.pretrained_cfg = saved
        hub_cfg = json.loads((Path(tmp) / HUB_CONFIG).read_text())
        if heads is not None:  # the backbone's file plus the heads
            state = {k: v.detach().contiguous().cpu() for k, v in backbone.state_dict().items()}
            state.update({f"heads.{k}": v.detach().contiguous().cpu() for k, v in heads.state_dict().items()})
            save_file(state, str(Path(tmp) / HUB_WEIGHTS), metadata={"format": "pt"})
        os.replace(Path(tmp) / HUB_WEIGHTS, weights)
    for key in ("model", "experiment"):
        if key in config:
            hub_cfg[key] = config[key]
    hub_cfg["weights_sha256"] = sha256_file(weights)
    atomic_write_text(out / HUB_CONFIG, json.dumps(hub_cfg, indent=2))
    return out
