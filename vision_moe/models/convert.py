"""Converters from the reference repositories' checkpoints: one remap function per source.

- :func:`remap_m3vit`: M³ViT's released training code (VITA-Group/M3ViT, FastMoE experts; :func:`read_m3vit` merges
  its per-rank checkpoint shards);
- :func:`remap_modsquad`: Mod-Squad (UMass-Foundation-Model/Mod-Squad, ``ParallelExperts`` / ``TaskMoE``);
- Edge-MoE's ``.bin`` weight folder, both directions: :mod:`vision_moe.deploy.edge_moe`.

Each returns a :class:`Conversion`: the vision-moe architecture the weights need (a registered name and its
constructor arguments), the state dict in vision-moe's names, and what was mapped, left out and assumed, so the
tool can print it. A missing or mis-shaped key raises :class:`ConversionError`, one line naming the key, the shape
found and the shape expected. The source layouts were read from the reference code (see each function).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = [
    "vit_args",
    "Conversion",
    "ConversionError",
    "SourceDict",
    "read_m3vit",
    "remap_m3vit",
    "read_modsquad",
    "remap_modsquad",
]


class ConversionError(ValueError):
    """A source that cannot be converted; the message is one line naming the file and the key."""


@dataclass
class Conversion:
    """The result of a remap: build the model with :meth:`build`, then save it with ``vision_moe.save_pretrained``."""

    arch: str
    model_args: dict
    state_dict: dict[str, torch.Tensor]
    mapped: list[str] = field(default_factory=list)  # "source key(s) -> vision-moe key"
    left_out: list[str] = field(default_factory=list)  # "source key(s): why"
    notes: list[str] = field(default_factory=list)  # assumptions and computational differences
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)

    def build(self) -> torch.nn.Module:
        """The vision-moe backbone with the converted weights (every tensor of the model set; strict)."""
        from .._factory import create_model

        model = create_model(self.arch, num_classes=0, **self.model_args)
        own = model.state_dict()
        state = dict(self.state_dict)
        for k in own:
            if k.endswith("expert_mask") and k not in state:  # no source restricts experts: all reachable
                state[k] = torch.ones_like(own[k])
        missing = sorted(set(own) - set(state))
        if missing:  # a converter bug, not bad input: every model tensor must come from the source or a rule
            raise RuntimeError(f"conversion left model tensors unset: {missing[:5]}")
        model.load_state_dict(state, strict=True)
        model.pretrained_cfg = dict(model.pretrained_cfg, mean=self.mean, std=self.std)
        return model

    def report(self) -> str:
        lines = [f"architecture: {self.arch} with {self.model_args}"]
        lines += [f"mapped ({len(self.mapped)}):"] + [f"  {m}" for m in self.mapped]
        lines += [f"left out ({len(self.left_out)}):"] + [f"  {m}" for m in self.left_out]
        lines += ["notes:"] + [f"  {m}" for m in self.notes]
        return "\n".join(lines)


def _shape(t: torch.Tensor | Sequence[int]) -> tuple[int, ...]:
    return tuple(int(v) for v in (t.shape if isinstance(t, torch.Tensor) else t))


class SourceDict:
    """A source state dict whose tensors are taken with their expected shapes; the rest is reported as left out."""

    def __init__(self, where: str, state: dict[str, torch.Tensor]) -> None:
        self.where = where
        self.state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        self.taken: set[str] = set()

    def has(self, key: str) -> bool:
        return key in self.state

    def shape(self, key: str) -> tuple[int, ...]:
        return _shape(self.state[key])

    def take(self, key: str, shape: Sequence[int]) -> torch.Tensor:
        if key not in self.state:
            raise ConversionError(f"{self.where}: {key} is missing (expected shape {_shape(shape)})")
        v = self.state[key]
        if _shape(v) != _shape(shape):
            raise ConversionError(f"{self.where}: {key} has shape {_shape(v)}, expected {_shape(shape)}")
        self.taken.add(key)
        return v.detach().float().clone()

    def rest(self) -> list[str]:
        return [k for k in self.state if k not in self.taken]


def _torch_load(path: Path) -> dict:
    """A checkpoint read with ``weights_only=True`` (no code is unpickled; an argparse Namespace, which the reference
    scripts store next to the weights, is allowed as plain data)."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConversionError(f"{path}: not found") from None
    except Exception as e:  # pickle / zip errors come in many types
        msg = " ".join(str(e).split()).split(" Check the doc")[0]
        raise ConversionError(f"{path}: cannot read a torch checkpoint ({msg[:300]})") from None
    if not isinstance(obj, dict):
        raise ConversionError(f"{path}: expected a dict (a state dict or a checkpoint holding one), got {type(obj)}")
    return obj


def _state_of(obj: dict, where: str, keys: Sequence[str]) -> dict[str, torch.Tensor]:
    for k in keys:
        if isinstance(obj.get(k), dict):
            return obj[k]
    if any(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    raise ConversionError(f"{where}: no state dict in it (looked for {list(keys)} or tensors at the top level)")


def _strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v for k, v in state.items()}


def _arch(family: str, dim: int) -> str:
    size = {192: "tiny", 384: "small", 768: "base"}.get(dim, "small")
    if family == "modsquad" and size == "tiny":
        size = "small"
    return f"{family}_{size}_patch16_224"


def _grid(where: str, n_patches: int, patch: int, img_size) -> tuple[int, int]:
    if img_size is not None:
        h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if (h // patch) * (w // patch) != n_patches or h % patch or w % patch:
            raise ConversionError(
                f"{where}: pos_embed has {n_patches} patch positions, img_size {h}x{w} with patch {patch} gives "
                f"{(h // patch) * (w // patch)}"
            )
        return h, w
    side = round(n_patches**0.5)
    if side * side != n_patches:
        raise ConversionError(
            f"{where}: pos_embed has {n_patches} patch positions, not a square grid; give the training image size "
            "(--img-size H W)"
        )
    return side * patch, side * patch


def _task_names(where: str, given, found: list[str], n_tasks: int, what: str) -> list[str]:
    """The task names: ``given``, else the ones the source names (``found``), else task0, task1, ..."""
    tasks = list(given) if given else (found or [f"task{t}" for t in range(n_tasks)])
    if len(tasks) != n_tasks:
        raise ConversionError(f"{where}: {what} {n_tasks} tasks, got {len(tasks)} names {tasks}")
    return tasks


def vit_args(img_size, patch: int, dim: int, depth: int, heads: int, mlp_hidden: int, tasks: list[str]) -> dict:
    """Constructor arguments of the dense ViT frame every source shares."""
    return dict(
        img_size=img_size,
        patch_size=patch,
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
        mlp_ratio=mlp_hidden / dim,
        tasks=tasks,
    )


def _vit_common(src: SourceDict, out: dict, c: Conversion, depth: int, dim: int, patch: int, n_tokens: int) -> None:
    """The parts every source shares with timm's ViT names: patch embedding, tokens, norms."""
    for k, shape in (
        ("patch_embed.proj.weight", (dim, 3, patch, patch)),
        ("patch_embed.proj.bias", (dim,)),
        ("cls_token", (1, 1, dim)),
        ("pos_embed", (1, n_tokens, dim)),
    ):
        out[k] = src.take(k, shape)
        c.mapped.append(f"{k} -> {k}")
    for i in range(depth):
        for n in ("norm1", "norm2"):
            for t in ("weight", "bias"):
                k = f"blocks.{i}.{n}.{t}"
                out[k] = src.take(k, (dim,))
        c.mapped.append(f"blocks.{i}.norm{{1,2}}.* -> blocks.{i}.norm{{1,2}}.*")


def _dense_attn(src: SourceDict, out: dict, c: Conversion, i: int, dim: int, inner: int) -> None:
    p = f"blocks.{i}.attn."
    for k, shape in (("qkv.weight", (3 * inner, dim)), ("qkv.bias", (3 * inner,)), ("proj.weight", (dim, inner))):
        out[p + k] = src.take(p + k, shape)
    out[p + "proj.bias"] = src.take(p + "proj.bias", (dim,))
    c.mapped.append(f"{p}{{qkv,proj}}.* -> {p}{{qkv,proj}}.*")


def _dense_mlp(src: SourceDict, out: dict, c: Conversion, i: int, dim: int, hidden: int) -> None:
    p = f"blocks.{i}.mlp."
    out[p + "fc1.weight"], out[p + "fc1.bias"] = (
        src.take(p + "fc1.weight", (hidden, dim)),
        src.take(p + "fc1.bias", (hidden,)),
    )
    out[p + "fc2.weight"], out[p + "fc2.bias"] = (
        src.take(p + "fc2.weight", (dim, hidden)),
        src.take(p + "fc2.bias", (dim,)),
    )
    c.mapped.append(f"{p}fc{{1,2}}.* -> {p}fc{{1,2}}.*")


def _blocks(state: dict[str, torch.Tensor]) -> int:
    idx = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    return max(idx) + 1 if idx else 0


def _final_norm(out: dict, c: Conversion, dim: int, why: str) -> None:
    out["norm.weight"], out["norm.bias"] = torch.ones(dim), torch.zeros(dim)
    c.notes.append(
        f"norm: {why}; set to weight 1, bias 0 (forward_intermediates(norm=False) gives the un-normed tokens)"
    )


# ---------------------------------------------------------------------- M³ViT (VITA-Group/M3ViT)
def read_m3vit(path: str | Path) -> dict[str, torch.Tensor]:
    """The model state of an M³ViT checkpoint: one ``.pth`` file, or the folder ``train_fastmoe.py`` writes with
    ``save_moe_model_to_dir``: one ``{rank}.pth`` per rank, rank 0 holding every tensor and its own experts, every
    other rank only its experts' ``mlp.experts.htoh4`` / ``h4toh`` tensors; the experts of all ranks are
    concatenated along dim 0 in rank order, as the reference's evaluation does when it merges them."""
    p = Path(path)
    if p.is_file():
        return dict(_state_of(_torch_load(p), str(p), ("state_dict", "model")))
    if not p.is_dir():
        raise ConversionError(f"{p}: not found; expected an M³ViT checkpoint file or its folder of <rank>.pth shards")
    shards = sorted((f for f in p.glob("*.pth") if f.stem.isdigit()), key=lambda f: int(f.stem))
    if not shards or shards[0].stem != "0" or [int(f.stem) for f in shards] != list(range(len(shards))):
        raise ConversionError(
            f"{p}: expected shards 0.pth, 1.pth, ... (one per rank), found {[f.name for f in shards]}"
        )
    state = dict(_state_of(_torch_load(shards[0]), str(shards[0]), ("state_dict", "model")))
    for f in shards[1:]:
        part = _state_of(_torch_load(f), str(f), ("state_dict", "model"))
        for k, v in part.items():
            if "mlp.experts.htoh4" not in k and "mlp.experts.h4toh" not in k:
                raise ConversionError(f"{f}: {k}: a rank > 0 shard should hold only its experts' tensors")
            if k not in state:
                raise ConversionError(f"{f}: {k} is not in 0.pth; expected every rank to hold the same expert keys")
            state[k] = torch.cat([state[k], v], dim=0)
    return state


def remap_m3vit(
    state: dict[str, torch.Tensor],
    where: str = "M³ViT checkpoint",
    tasks: Sequence[str] | None = None,
    num_heads: int | None = None,
    top_k: int = 4,
    img_size: int | tuple[int, int] | None = None,
) -> Conversion:
    """M³ViT's ``VisionTransformerMoE`` (models/vision_transformer_moe.py, custom_moe_layer.py, noisy_gate_vmoe.py)
    onto vision-moe's M³ViT.

    Source layout (verified in the reference code): keys ``module.backbone.*`` (DDP + ``MultiTaskModel``); timm's
    ViT names for everything dense; MoE blocks (``i % 2 == 1``) hold FastMoE's ``mlp.experts.htoh4.weight``
    ``(E, h, d)`` / ``.bias`` ``(E, h)`` and ``mlp.experts.h4toh.weight`` ``(E, d, h)`` / ``.bias`` ``(E, d)``
    (``FMoELinear``: ``(experts, out, in)``), and either one V-MoE gate per task ``mlp.gate.{t}.w_gate`` ``(d, E)``
    (``multi_gate``) or one gate ``mlp.gate.w_gate`` ``(d + task_dim, E)`` fed the output of
    ``backbone.gate_task_represent`` (Linear T->task_dim, GELU, Linear, LayerNorm) on the task's one-hot vector. The
    gate is a softmax over all experts, top-k, not renormalised, noise std ``noise_std / E`` (as vision-moe's).
    Not in the state dict, so given here: the head count (default: M³ViT's configs, 3 for d=192, 12 otherwise),
    top_k (default 4, M³ViT-S; the Cityscapes ViT-T config uses 2) and, for a non-square grid, the image size.
    """
    state = _strip(state, "module.")
    if not any(k.startswith("backbone.") for k in state) and "patch_embed.proj.weight" in state:
        state = {f"backbone.{k}": v for k, v in state.items()}  # a bare backbone state dict
    bb = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    if not any(".mlp.experts.htoh4.weight" in k for k in bb):
        hint = " (a Mod-Squad checkpoint: use 'convert.py modsquad')" if any(".f_gate." in k for k in state) else ""
        raise ConversionError(
            f"{where}: not an M³ViT FastMoE checkpoint: no 'backbone.blocks.N.mlp.experts.htoh4.weight'{hint}"
        )
    src = SourceDict(where, bb)
    dim, _, patch, _ = src.shape("patch_embed.proj.weight")
    depth = _blocks(bb)
    n_tokens = src.shape("pos_embed")[1] if src.has("pos_embed") else 0
    h_img, w_img = _grid(where, n_tokens - 1, patch, img_size)
    moe = [i for i in range(depth) if src.has(f"blocks.{i}.mlp.experts.htoh4.weight")]
    e, hidden = src.shape(f"blocks.{moe[0]}.mlp.experts.htoh4.weight")[:2]
    dense = [i for i in range(depth) if i not in moe]
    mlp_hidden = src.shape(f"blocks.{dense[0]}.mlp.fc1.weight")[0] if dense else 4 * dim
    decoders = list(dict.fromkeys(m.group(1) for k in state if (m := re.match(r"decoders\.([^.]+)\.", k))))
    multi = src.has(f"blocks.{moe[0]}.mlp.gate.0.w_gate")
    n_tasks = (
        len({k.split(".")[4] for k in bb if re.match(rf"blocks\.{moe[0]}\.mlp\.gate\.\d+\.w_gate$", k)})
        if multi
        else src.shape("gate_task_represent.fc1.weight")[1]
        if src.has("gate_task_represent.fc1.weight")
        else 0
    )
    if not n_tasks:
        raise ConversionError(
            f"{where}: blocks.{moe[0]}.mlp.gate: neither per-task gates 'gate.<t>.w_gate' nor a task-conditioned "
            "gate with 'backbone.gate_task_represent' (a single-task gate has no task to route)"
        )
    tasks = _task_names(where, tasks, decoders if len(decoders) == n_tasks else [], n_tasks, "the gates serve")
    heads = num_heads or (3 if dim == 192 else 12)
    args = vit_args((h_img, w_img), patch, dim, depth, heads, mlp_hidden, tasks)
    args.update(moe_blocks=moe, num_experts=e, top_k=top_k, expert_hidden=hidden)
    args["router"] = "multi_gate" if multi else "task_embed"
    c = Conversion(_arch("m3vit", dim), args, {})
    out: dict[str, torch.Tensor] = {}
    _vit_common(src, out, c, depth, dim, patch, n_tokens)
    for i in range(depth):
        _dense_attn(src, out, c, i, dim, dim)
        if i in dense:
            _dense_mlp(src, out, c, i, dim, mlp_hidden)
            continue
        p = f"blocks.{i}.mlp."
        out[p + "experts.fc1.weight"] = src.take(p + "experts.htoh4.weight", (e, hidden, dim)).transpose(1, 2)
        out[p + "experts.fc1.bias"] = src.take(p + "experts.htoh4.bias", (e, hidden))
        out[p + "experts.fc2.weight"] = src.take(p + "experts.h4toh.weight", (e, dim, hidden)).transpose(1, 2)
        out[p + "experts.fc2.bias"] = src.take(p + "experts.h4toh.bias", (e, dim))
        c.mapped.append(f"{p}experts.{{htoh4,h4toh}}.* (experts, out, in) -> {p}experts.fc{{1,2}}.* (experts, in, out)")
        if multi:
            for t, name in enumerate(tasks):
                out[f"{p}router.gates.{name}.proj.weight"] = src.take(f"{p}gate.{t}.w_gate", (dim, e)).t()
            c.mapped.append(f"{p}gate.<t>.w_gate (d, E) -> {p}router.gates.<task>.proj.weight (E, d)")
        else:
            td = src.shape("gate_task_represent.fc1.weight")[0]
            out[f"{p}router.gate.proj.weight"] = src.take(f"{p}gate.w_gate", (dim + td, e)).t()
            out[f"{p}router.task_embed.weight"] = _m3vit_task_vectors(src, n_tasks, td)
            args["router_kwargs"] = dict(task_dim=td)
            c.mapped.append(f"{p}gate.w_gate (d + task_dim, E) -> {p}router.gate.proj.weight (E, d + task_dim)")
    if not multi:
        c.mapped.append("gate_task_represent(one-hot task) -> blocks.N.mlp.router.task_embed.weight (same rows)")
    _final_norm(out, c, dim, "M³ViT's backbone has none (its decoders read the block outputs)")
    c.state_dict = out
    for k in src.rest():
        why = (
            "the gate's noise / decoupled-activation weights (vision-moe's gate uses V-MoE's fixed noise)"
            if re.search(r"\.gate\..*(w_noise|_aux)", k)
            else "not part of the backbone"
        )
        c.left_out.append(f"backbone.{k}: {why}")
    others = sorted({k.split(".")[0] + ".*" for k in state if not k.startswith("backbone.")})
    c.left_out += [f"{k}: the reference's task decoders (vision-moe's heads differ; train new ones)" for k in others]
    c.notes.append(f"num_heads={heads}, top_k={top_k} are not in the checkpoint: given or M³ViT's config defaults")
    c.notes.append(f"tasks {tasks}" + (" (from the decoders' order)" if tasks == decoders else ""))
    return c


@torch.no_grad()
def _m3vit_task_vectors(src: SourceDict, n_tasks: int, task_dim: int) -> torch.Tensor:
    """M³ViT's ``gate_task_represent(one_hot(t))`` (Linear, GELU, Linear, LayerNorm eps 1e-6) for every task."""
    g = "gate_task_represent."
    w1, b1 = src.take(g + "fc1.weight", (task_dim, n_tasks)), src.take(g + "fc1.bias", (task_dim,))
    w2, b2 = src.take(g + "fc2.weight", (task_dim, task_dim)), src.take(g + "fc2.bias", (task_dim,))
    gn, bn = src.take(g + "norm.weight", (task_dim,)), src.take(g + "norm.bias", (task_dim,))
    h = F.linear(F.gelu(F.linear(torch.eye(n_tasks), w1, b1)), w2, b2)
    return F.layer_norm(h, (task_dim,), gn, bn, eps=1e-6)


# ---------------------------------------------------------------------- Mod-Squad (UMass-Foundation-Model/Mod-Squad)
def read_modsquad(path: str | Path) -> dict[str, torch.Tensor]:
    """The model state of a Mod-Squad checkpoint (``util/misc.save_model``: ``{'model': state, 'optimizer', 'epoch',
    'scaler', 'args'}``)."""
    p = Path(path)
    if p.is_dir():
        raise ConversionError(f"{p}: a folder; expected a Mod-Squad checkpoint file (checkpoint-<epoch>.pth)")
    return dict(_state_of(_torch_load(p), str(p), ("model", "state_dict")))


def remap_modsquad(
    state: dict[str, torch.Tensor],
    where: str = "Mod-Squad checkpoint",
    tasks: Sequence[str] | None = None,
    num_heads: int | None = None,
    top_k: int | None = None,
    img_size: int | tuple[int, int] | None = None,
) -> Conversion:
    """Mod-Squad's ``MTVisionTransformerMoETaskGating`` (models_mt.py, models_moe.py, parallel_experts/moe.py) onto
    vision-moe's Mod-Squad.

    Source layout (verified in the reference code): timm's ViT names for the dense parts (``attn.qkv`` / ``proj`` of
    ``num_heads`` heads of ``head_dim``, ``mlp.fc1`` / ``fc2``); ``task_embedding`` ``(1, T, d)`` added before every
    block; MoE attention ``attn.q_proj.experts.w`` ``(E, d, head_dim)`` (one query head per expert, top-k = the
    head count), ``attn.q_proj.output_experts.w`` ``(E, head_dim, d)``, one shared key/value head ``attn.kv_proj.0``
    ``(2 head_dim, d)``; MoE MLP ``mlp.experts.w`` / ``.b`` ``(E, d, h)`` / ``(E, h)`` and ``mlp.output_experts.w`` /
    ``.b`` (``ParallelExperts``: ``(experts, in, out)``, as vision-moe's); per-task gates ``f_gate.{t}.0.weight``
    ``(E, d)``, or ``(2E, d)`` with the learned noise scale in the second half. The gate is a softmax (+ 1e-4) over
    all experts, top-k, not renormalised.
    """
    state = _strip(_strip(state, "module."), "backbone.")
    if "task_embedding" not in state or not any(".f_gate." in k for k in state):
        hint = " (an M³ViT checkpoint: use 'convert.py m3vit')" if any("experts.htoh4" in k for k in state) else ""
        raise ConversionError(f"{where}: not a Mod-Squad checkpoint: no 'task_embedding' and 'f_gate' keys{hint}")
    src = SourceDict(where, state)
    dim, _, patch, _ = src.shape("patch_embed.proj.weight")
    depth = _blocks(state)
    n_tokens = src.shape("pos_embed")[1]
    h_img, w_img = _grid(where, n_tokens - 1, patch, img_size)
    n_tasks = src.shape("task_embedding")[1]
    moe_attn = [i for i in range(depth) if src.has(f"blocks.{i}.attn.q_proj.experts.w")]
    moe_mlp = [i for i in range(depth) if src.has(f"blocks.{i}.mlp.experts.w")]
    dense_attn = [i for i in range(depth) if i not in moe_attn]
    dense_mlp = [i for i in range(depth) if i not in moe_mlp]
    if not moe_attn or not moe_mlp:
        raise ConversionError(f"{where}: expected MoE attention and MoE MLP blocks (q_proj.experts.w, mlp.experts.w)")
    ea, _, head_dim = src.shape(f"blocks.{moe_attn[0]}.attn.q_proj.experts.w")
    em, _, hidden = src.shape(f"blocks.{moe_mlp[0]}.mlp.experts.w")
    notes = []
    if dense_attn:
        heads = src.shape(f"blocks.{dense_attn[0]}.attn.qkv.weight")[0] // (3 * head_dim)
        if num_heads not in (None, heads):
            raise ConversionError(
                f"{where}: the dense attention has {heads} heads of {head_dim}, got --num-heads {num_heads}"
            )
    elif num_heads is None:
        raise ConversionError(f"{where}: no dense attention block to count the heads from; give --num-heads")
    else:
        heads = num_heads
    mlp_hidden = src.shape(f"blocks.{dense_mlp[0]}.mlp.fc1.weight")[0] if dense_mlp else 4 * dim
    k = top_k or mlp_hidden // hidden  # TaskMoE(dim, mlp_hidden // ffd_heads, E, k=ffd_heads)
    notes.append(f"MLP top_k={k}" + ("" if top_k else f" = MLP hidden {mlp_hidden} / expert hidden {hidden}"))
    tasks = _task_names(where, tasks, [], n_tasks, "task_embedding has")
    args = vit_args((h_img, w_img), patch, dim, depth, heads, mlp_hidden, tasks)
    args.update(attn_head_dim=head_dim, moe_blocks=moe_mlp, moe_attn_blocks=moe_attn, num_experts=em, top_k=k)
    args.update(expert_hidden=hidden, attn_num_experts=ea, attn_top_k=heads, expert_heads=1, task_embed_blocks=True)
    c = Conversion(_arch("modsquad", dim), args, {}, notes=notes)
    out: dict[str, torch.Tensor] = {}
    _vit_common(src, out, c, depth, dim, patch, n_tokens)
    emb = src.take("task_embedding", (1, n_tasks, dim))
    out["task_embed"] = emb.expand(depth, -1, -1).clone()
    c.mapped.append("task_embedding (1, T, d) -> task_embed (depth, T, d): the same vector before every block")
    out["norm.weight"], out["norm.bias"] = src.take("norm.weight", (dim,)), src.take("norm.bias", (dim,))
    c.mapped.append("norm.* -> norm.* (the dense tasks' norm)")
    noisy = False
    for i in range(depth):
        p = f"blocks.{i}."
        if i in dense_attn:
            _dense_attn(src, out, c, i, dim, heads * head_dim)
        else:
            a = p + "attn."
            out[a + "q_experts.weight"] = src.take(a + "q_proj.experts.w", (ea, dim, head_dim))
            out[a + "o_experts.weight"] = src.take(a + "q_proj.output_experts.w", (ea, head_dim, dim))
            for part, n_out in (("experts", head_dim), ("output_experts", dim)):
                key = f"{a}q_proj.{part}.b"
                mine = a + ("q_experts.bias" if part == "experts" else "o_experts.bias")
                out[mine] = src.take(key, (ea, n_out)) if src.has(key) else torch.zeros(ea, n_out)
            out[a + "kv.weight"] = src.take(a + "kv_proj.0.weight", (2 * head_dim, dim))
            out[a + "kv.bias"] = src.take(a + "kv_proj.0.bias", (2 * head_dim,))
            noisy |= _modsquad_gates(src, out, a + "q_proj.", a + "router.", tasks, ea, dim)
            c.mapped.append(f"{a}q_proj.{{experts,output_experts}}.w, kv_proj.0 -> {a}{{q_experts,o_experts,kv}}")
        if i in dense_mlp:
            _dense_mlp(src, out, c, i, dim, mlp_hidden)
        else:
            m = p + "mlp."
            out[m + "experts.fc1.weight"] = src.take(m + "experts.w", (em, dim, hidden))
            out[m + "experts.fc1.bias"] = src.take(m + "experts.b", (em, hidden))
            out[m + "experts.fc2.weight"] = src.take(m + "output_experts.w", (em, hidden, dim))
            out[m + "experts.fc2.bias"] = src.take(m + "output_experts.b", (em, dim))
            noisy |= _modsquad_gates(src, out, m, m + "router.", tasks, em, dim)
            c.mapped.append(f"{m}{{experts,output_experts}}.{{w,b}} -> {m}experts.fc{{1,2}}.*")
    c.mapped.append("blocks.N.*.f_gate.<t>.0.weight[:E] -> blocks.N.*.router.gates.<task>.proj.weight")
    c.state_dict = out
    if noisy:
        c.notes.append("the gates' learned noise scale (f_gate rows E..2E) is left out: vision-moe's gate adds V-MoE's "
                       "fixed training noise")  # fmt: skip
    c.notes.append("Mod-Squad adds 1e-4 to the gate probabilities; vision-moe does not (combine weights differ by "
                   "<= 1e-4 per expert)")  # fmt: skip
    c.notes.append(f"tasks {tasks} (Mod-Squad's img_types order; name them with --tasks)")
    for key in src.rest():
        why = "the classification head's norm" if key.startswith("fc_norm.") else "not part of the backbone"
        c.left_out.append(f"{key}: {why}")
    return c


def _modsquad_gates(src: SourceDict, out: dict, gate: str, router: str, tasks: list[str], e: int, dim: int) -> bool:
    """Per-task gates ``{gate}f_gate.{t}.0.weight`` -> ``{router}gates.<task>.proj.weight``; True if noisy."""
    noisy = False
    for t, name in enumerate(tasks):
        key = f"{gate}f_gate.{t}.0.weight"
        rows = src.shape(key)[0] if src.has(key) else e
        noisy |= rows == 2 * e
        w = src.take(key, (2 * e if rows == 2 * e else e, dim))
        out[f"{router}gates.{name}.proj.weight"] = w[:e].clone()
    return noisy
