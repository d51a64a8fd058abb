"""``create_model`` / ``list_models`` over the models this package registers with timm."""

from __future__ import annotations

import difflib
import fnmatch
import json
from collections.abc import Sequence
from pathlib import Path

import timm
import torch.nn as nn

from . import models  # noqa: F401  (registers the entry points)

__all__ = ["create_model", "list_models", "list_pretrained", "model_family", "FAMILIES"]

_SOURCES = ("hf-hub:", "local-dir:")

# model family -> the modules of vision_moe.models whose entry points belong to it. 'vit': task-routed ViT
# backbones (made into multi-task models with one head per task); 'restoration': image-to-image networks whose
# tasks are degradations (models/restoration.py wraps them for the engine).
FAMILIES: dict[str, tuple[str, ...]] = {"vit": ("moe_vit",), "restoration": ("mofme", "demoe")}


def list_models(pattern: str = "*", family: str | None = None) -> list[str]:
    """Names of vision-moe's registered models (a subset of ``timm.list_models()``), filtered by a glob and,
    optionally, by family (``'vit'`` or ``'restoration'``)."""
    if family is not None and family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {sorted(FAMILIES)}")
    modules = [m for f, ms in FAMILIES.items() if family in (None, f) for m in ms]
    names = sorted(n for m in modules for n in timm.list_models(module=m))
    return [n for n in names if fnmatch.fnmatch(n, pattern)]


def model_family(name: str) -> str:
    """The family of a registered model or weight tag (``arch.tag``): ``'vit'`` or ``'restoration'``."""
    arch = name.partition(".")[0]
    for family in FAMILIES:
        if arch in list_models(family=family):
            return family
    raise ValueError(f"unknown model {name!r}; vision-moe models are {list_models()}")


def list_pretrained(pattern: str = "*") -> list[str]:
    """vision-moe's weight tags (``arch.tag``), filtered by a glob."""
    from .models.moe_vit import ZOO

    return [n for n in ZOO if fnmatch.fnmatch(n, pattern)]


def _hub_folder(name: str, pretrained: bool) -> Path:
    """The local folder of ``hf-hub:ORG/NAME[@REV]`` (config.json, and the weights when ``pretrained``, fetched
    through the Hugging Face cache) or ``local-dir:PATH``."""
    from .hub import HUB_CONFIG, HUB_WEIGHTS, WeightsEntry, fetch_weights

    src, _, ident = name.partition(":")
    if src == "local-dir":
        folder = Path(ident)
        if not (folder / HUB_CONFIG).is_file():
            raise FileNotFoundError(f"{folder / HUB_CONFIG}: not found; expected a folder written by save_pretrained")
        return folder
    cfg = fetch_weights(WeightsEntry(hf_hub_id=ident, filename=HUB_CONFIG), name=name)
    if pretrained:
        fetch_weights(WeightsEntry(hf_hub_id=ident, filename=HUB_WEIGHTS), name=name)
    return cfg.parent


def create_model(name: str, tasks: Sequence[str] | None = None, pretrained: bool = False, **overrides) -> nn.Module:
    """Build a registered model. ``tasks`` names the tasks its routers serve; any constructor argument
    can be overridden.

    ``name`` is an architecture (``m3vit_small_patch16_224``), a weight tag (``arch.tag``: with ``pretrained=True``
    the dense timm ViT it names is fetched through the Hugging Face cache and upcycled on load), or a model in the
    Hub format (``hf-hub:ORG/NAME`` or ``local-dir:PATH``, see :func:`vision_moe.hub.save_pretrained`): one saved
    with its task heads comes back whole (a ``MultiTaskModel``), a backbone alone as the backbone.
    ``pretrained_cfg_overlay=dict(file=PATH)`` with ``pretrained=True`` loads (and, for a dense timm ViT file,
    upcycles) local weights, as in timm."""
    if isinstance(tasks, str):  # tuple("depth") would be five one-letter tasks
        raise ValueError(f"tasks={tasks!r}: expected a list of task names, e.g. tasks=[{tasks!r}]")
    if name.startswith(_SOURCES):
        folder = _hub_folder(name, pretrained)
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        if isinstance(cfg.get("model"), dict) and "heads" not in overrides:  # saved with its heads
            if tasks is not None or overrides:
                raise ValueError(
                    f"{name}: a model saved with its heads is rebuilt from its config.json; got arguments "
                    f"{sorted([*overrides, *(['tasks'] if tasks is not None else [])])}"
                )
            from .engine.checkpoint import build_from_config, load_model

            return load_model(folder)[0] if pretrained else build_from_config(folder, cfg)
    else:
        known = list_models()
        arch, _, tag = name.partition(".")
        if arch not in known:
            near = difflib.get_close_matches(name, known + list_pretrained(), n=5, cutoff=0.6)
            raise ValueError(f"unknown model {name!r}; close matches: {near}; vision-moe models are {known}")
        if tag and name not in list_pretrained():
            from .models.moe_vit import unknown_tag_error

            raise unknown_tag_error(name)
    if tasks is not None:
        overrides["tasks"] = tuple(tasks)
    return timm.create_model(name, pretrained=pretrained, **overrides)
