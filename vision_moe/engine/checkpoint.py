"""Checkpoints: weights as safetensors + a JSON config that rebuilds the model, plus the training state
(optimizer / scheduler / sampler / RNG) as a ``torch.save`` file read back with ``weights_only=True``.
Every file is written atomically (temp file in the same folder, then ``os.replace``); loading never
unpickles code."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

__all__ = [
    "build_model",
    "save_checkpoint",
    "load_model",
    "load_train_state",
    "latest_checkpoint",
    "read_config",
    "build_from_config",
    "is_hub_format",
    "CheckpointError",
    "atomic_write_bytes",
    "atomic_write_text",
]

_logger = logging.getLogger(__name__)
WEIGHTS, CONFIG, STATE = "model.safetensors", "config.json", "train_state.pt"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file."""


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    _atomic(Path(path), lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint(
    directory: str | Path, model: nn.Module, config: dict[str, Any], train_state: dict[str, Any] | None = None
) -> Path:
    """Write ``model.safetensors``, ``config.json`` (``config`` + the weights' sha256) and, if given,
    ``train_state.pt`` into ``directory``; config.json goes last so a complete config means complete weights."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    _atomic(d / WEIGHTS, lambda tmp: save_file(sd, tmp, metadata={"format": "pt"}))
    if train_state is not None:
        _atomic(d / STATE, lambda tmp: torch.save(train_state, tmp))
    cfg = dict(config, weights_sha256=_sha256(d / WEIGHTS))
    # not sorted: model.tasks keeps its order, which task-conditioned routers (M³ViT's task embedding, MoFME's
    # degradation embedding, DeMoE's classifier logits) index by
    atomic_write_text(d / CONFIG, json.dumps(cfg, indent=2))
    return d


def _resolve_dir(path: str | Path) -> Path:
    """The checkpoint folder ``path`` names: the folder itself, or the folder of one of its files (its weights,
    config.json or training state); any other file is refused, naming it."""
    p = Path(path)
    if p.is_file():
        if p.name not in (WEIGHTS, CONFIG, STATE) or not (p.parent / CONFIG).is_file():
            raise CheckpointError(
                f"{p}: a file, not a checkpoint folder; expected a folder with {CONFIG} and {WEIGHTS} (a training "
                "checkpoint, e.g. runs/quickstart/checkpoints/step_0002400, or a save_pretrained folder); bare "
                "weights load with create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file=PATH))"
            )
        p = p.parent
    if not (p / CONFIG).is_file():
        raise CheckpointError(f"{p / CONFIG}: not found; expected a checkpoint folder with {CONFIG} and {WEIGHTS}")
    return p


def _json_type(v: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(v), "a number")


def read_config(path: str | Path, require: Sequence[str] = (), why: str = "") -> dict[str, Any]:
    """The ``config.json`` of a checkpoint folder (or of its weights file) as a dict.

    A file that cannot be read, is not UTF-8, is not JSON or is not a JSON object, or lacks one of the
    ``require``-d sections (each a JSON object; ``why`` says what needs it) raises :class:`CheckpointError`
    naming the file."""
    d = _resolve_dir(path)
    f = d / CONFIG
    try:
        text = f.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{f}: not a UTF-8 JSON file (undecodable byte at offset {e.start})") from None
    except OSError as e:
        raise CheckpointError(f"{f}: cannot read ({e.strerror or e})") from None
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f}: invalid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{f}: expected a JSON object with a 'model' section, got {_json_type(cfg)}")
    for key in require:
        if not isinstance(cfg.get(key), dict):
            what = f"no {key!r} section" if key not in cfg else f"the {key!r} section is {_json_type(cfg[key])}"
            raise CheckpointError(f"{f}: {what}; expected a JSON object" + (f" ({why})" if why else ""))
    return cfg


def build_model(m: dict[str, Any], losses: dict | None = None) -> nn.Module:
    """The model a ``config.json`` "model" section describes: a :class:`MultiTaskModel` (a ViT backbone and one
    head per task) or, with ``"kind": "restoration"``, a :class:`RestorationModel` (``losses``: its per-task
    losses, for training)."""
    if m.get("kind", "multitask") == "restoration":
        from ..models.restoration import build_restoration_model

        return build_restoration_model(
            m["backbone"],
            list(m["tasks"]),
            img_size=m.get("img_size", 64),
            losses=losses,
            **(m.get("backbone_kwargs") or {}),
        )
    from ..models.multitask import build_multitask_model

    return build_multitask_model(
        m["backbone"],
        m["tasks"],
        img_size=m.get("img_size", 224),
        head=m.get("head", "setr_pup"),
        head_kwargs=m.get("head_kwargs") or {},
        losses=losses,
        **(m.get("backbone_kwargs") or {}),
    )


def is_hub_format(cfg: dict[str, Any]) -> bool:
    """Whether a config.json was written by :func:`vision_moe.hub.save_pretrained` (timm's Hub layout)."""
    return "architecture" in cfg and "pretrained_cfg" in cfg


def build_from_config(path: str | Path, cfg: dict[str, Any]):
    """The model a checkpoint's config.json describes (its ``model`` section, see :func:`build_model`), not
    loaded."""
    d = Path(path)
    m = cfg.get("model")
    if not isinstance(m, dict) or "backbone" not in m or "tasks" not in m:
        raise CheckpointError(f"{d / CONFIG}: no 'model' section with backbone and tasks")
    for key in ("tasks", "head_kwargs", "backbone_kwargs"):
        if not isinstance(m.get(key) or {}, dict):
            raise CheckpointError(f"{d / CONFIG}: model.{key} must be a JSON object, got {_json_type(m[key])}")
    try:
        return build_model(m)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{d / CONFIG}: cannot build the model ({e})") from None


def load_model(path: str | Path, verify: bool = True, require: Sequence[str] = (), why: str = ""):
    """Rebuild the model of a checkpoint folder (or its weights file) (see :func:`build_model`) and load its
    weights.

    Returns ``(model, config)``. A truncated file, a checksum mismatch or weights that do not fit the config
    raise :class:`CheckpointError` naming the file; so does a config without the ``require``-d sections (see
    :func:`read_config`), before the weights are read.
    """
    d = _resolve_dir(path)
    cfg = read_config(d, require, why)
    wpath = d / WEIGHTS
    if not wpath.is_file():
        raise CheckpointError(f"{wpath}: not found")
    if verify and "weights_sha256" in cfg and _sha256(wpath) != cfg["weights_sha256"]:
        raise CheckpointError(f"{wpath}: sha256 does not match {CONFIG} (truncated or modified file)")
    try:
        sd = load_file(str(wpath))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{wpath}: cannot read safetensors ({e})") from None
    model = build_from_config(d, cfg)
    if is_hub_format(cfg):  # timm's names for the backbone, heads.* for the heads (hub.save_pretrained)
        sd = {k if k.startswith("heads.") else f"backbone.{k}": v for k, v in sd.items()}
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    bad_shape = [k for k in own if k in sd and own[k].shape != sd[k].shape]
    if missing or unexpected or bad_shape:
        raise CheckpointError(
            f"{wpath}: weights do not match {CONFIG}: missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}, shape mismatch {bad_shape[:3]}"
        )
    model.load_state_dict(sd)
    return model, cfg


def load_train_state(path: str | Path) -> dict[str, Any]:
    """The optimizer / scheduler / sampler / RNG state of a checkpoint (``weights_only=True``)."""
    f = _resolve_dir(path) / STATE
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{f}: not found; this checkpoint holds no training state") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{f}: cannot read training state ({str(e).splitlines()[0]})") from None


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete ``checkpoints/step_*`` folder under ``out_dir``."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return None
    done = [p for p in root.glob("step_*") if (p / CONFIG).is_file() and (p / STATE).is_file()]
    return max(done, key=lambda p: int(p.name.split("_")[1])) if done else None
