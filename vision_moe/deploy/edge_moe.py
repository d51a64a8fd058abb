"""Edge-MoE's weight folder (sharc-lab/Edge-MoE, the published FPGA accelerator for M³ViT), both directions.

Edge-MoE's testbench (``testbench/e2e.cpp``) reads one raw float32 file per tensor from ``weights/``, and
``weights/scripts/prepare_for_onboard.py`` stacks the same files for the board. Its model (``include/model.hpp``)
is a fixed M³ViT-T: dim 192, 12 layers, 3 heads, 128 x 256 input, patch 16; dense MLP 768 in even layers, MoE MLP
in odd layers with 16 experts of hidden 384, top-2, one gate per task (two tasks). Layouts, as those files read them:

- ``patch_embed_weight`` (192, 3, 16, 16), ``patch_embed_bias`` (192), ``pos_embed`` (129, 192);
- per layer L: ``lL_qkv_weight`` (576, 192) and ``lL_attn_proj_weight`` (192, 192) as torch's Linear (out, in),
  their biases, ``lL_norm{1,2}_{weight,bias}`` (192);
- even L: ``lL_fc1_weight`` (768, 192), ``lL_fc2_weight`` (192, 768) and biases;
- odd L: FastMoE's ``lL_htoh4_weight`` (16, 384, 192), ``lL_h4toh_weight`` (16, 192, 384) (experts, out, in), their
  biases (16, 384) / (16, 192), ``lL_w_gate_T_task{t}`` (16, 192) (the gate transposed);
- ``image`` (3, 128, 256) pixels in [0, 1) and the reference output ``l11_x_post_moe`` (129, 192).

What its C++ does with them (read in its source; running it unmodified agrees): the patch kernel has
no class-token parameter (token 0 is ``pos_embed[0]``), so the class token is folded into ``pos_embed[0]``; the
pixels reach it as ``ap_ufixed<8,0>`` with no normalisation, so mean/std are folded into the patch embedding; the
testbench converts float to fixed by plain assignment (``ap_fixed``'s default truncation, and wrap-around on
overflow), so the weights are written already rounded to nearest on each type's grid (``include/datatypes.hpp``:
ap_fixed<16,2> linear and gate weights, <16,7> qkv/proj biases, <16,5> other biases and LayerNorm, <16,0> patch
weights, <32,10> activations) and a value outside a type's range is refused; its output is the tokens after
block 11 without a final LayerNorm; its gate is a softmax over all 16 experts, top-2, not renormalised, as
vision-moe's. Two defects of its kernel a user of the bitstream can hit: an expert that receives every token of an
image breaks its expert path (an index stream that is never filled), so the exporter warns, naming the layer, when
that happens on the given images; its top-k reads uninitialised values unless ``moe.cpp`` is built at -O0.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..models.convert import Conversion, ConversionError, vit_args
from ..moe import MoEAttention, MoEMlp, MultiGateRouter
from .hls.config import FxType
from .hls.fixed import OverflowLog, quantize, to_float

__all__ = ["EDGE_MOE", "EDGE_MOE_TASKS", "edge_moe_files", "read_edge_moe", "write_edge_moe"]

_logger = logging.getLogger(__name__)

# include/model.hpp
EDGE_MOE = dict(dim=192, depth=12, heads=3, experts=16, top_k=2, expert_hidden=384, mlp_hidden=768, img=(128, 256))
PATCH = 16
TOKENS = (EDGE_MOE["img"][0] // PATCH) * (EDGE_MOE["img"][1] // PATCH) + 1
# M³ViT's Cityscapes ViT-T config (configs/cityscapes/pup_vit_tiny_deit_multi_task_baseline.yml: 128 x 256, moe
# top-2, expert ratio 2) trains semseg then depth: task 0 and task 1 of Edge-MoE's gates
EDGE_MOE_TASKS = ("semseg", "depth")
# include/datatypes.hpp
LINEAR, ATTN_BIAS, BIAS, PATCH_W, FM = FxType(16, 2), FxType(16, 7), FxType(16, 5), FxType(16, 0), FxType(32, 10)
PIXEL = FxType(8, 0, signed=False)
# a model input x = (byte / 255 - mean) / std; Edge-MoE's pixel port holds byte / 256, so an imported model is
# normalised with mean 0 and std 256 / 255 (x = byte / 256 exactly)
IMPORT_MEAN, IMPORT_STD = (0.0, 0.0, 0.0), (256 / 255,) * 3


def edge_moe_files(num_tasks: int = 2) -> dict[str, tuple[tuple[int, ...], FxType]]:
    """Every weight file of the folder (name without ``.float32.bin``) -> (shape, fixed-point type)."""
    d, hid, eh, e = EDGE_MOE["dim"], EDGE_MOE["mlp_hidden"], EDGE_MOE["expert_hidden"], EDGE_MOE["experts"]
    files = {
        "patch_embed_weight": ((d, 3, PATCH, PATCH), PATCH_W),
        "patch_embed_bias": ((d,), BIAS),
        "pos_embed": ((TOKENS, d), FM),
    }
    for layer in range(EDGE_MOE["depth"]):
        p = f"l{layer}_"
        files.update(
            {
                p + "qkv_weight": ((3 * d, d), LINEAR),
                p + "qkv_bias": ((3 * d,), ATTN_BIAS),
                p + "attn_proj_weight": ((d, d), LINEAR),
                p + "attn_proj_bias": ((d,), ATTN_BIAS),
                **{f"{p}norm{n}_{t}": ((d,), BIAS) for n in (1, 2) for t in ("weight", "bias")},
            }
        )
        if layer % 2 == 0:
            files.update(
                {
                    p + "fc1_weight": ((hid, d), LINEAR),
                    p + "fc1_bias": ((hid,), BIAS),
                    p + "fc2_weight": ((d, hid), LINEAR),
                    p + "fc2_bias": ((d,), BIAS),
                }
            )
        else:
            files.update(
                {
                    p + "htoh4_weight": ((e, eh, d), LINEAR),
                    p + "htoh4_bias": ((e, eh), BIAS),
                    p + "h4toh_weight": ((e, d, eh), LINEAR),
                    p + "h4toh_bias": ((e, d), BIAS),
                    **{f"{p}w_gate_T_task{t}": ((e, d), LINEAR) for t in range(num_tasks)},
                }
            )
    return files


def _model_args(tasks: Sequence[str]) -> dict:
    d = EDGE_MOE["dim"]
    args = vit_args(
        EDGE_MOE["img"], PATCH, d, EDGE_MOE["depth"], EDGE_MOE["heads"], EDGE_MOE["mlp_hidden"], list(tasks)
    )
    args.update(moe_blocks="every2", num_experts=EDGE_MOE["experts"], top_k=EDGE_MOE["top_k"])
    args["expert_hidden"] = EDGE_MOE["expert_hidden"]
    return args


def _read_bin(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    n = int(np.prod(shape))
    if not path.is_file():
        raise ConversionError(
            f"{path}: missing; expected {n * 4} bytes ({shape} float32) as Edge-MoE's testbench reads"
        )
    size = path.stat().st_size
    if size != n * 4:
        raise ConversionError(f"{path}: {size} bytes, expected {n * 4} ({shape} float32)")
    return np.fromfile(path, dtype="<f4").reshape(shape)


# ---------------------------------------------------------------------- Edge-MoE -> vision-moe
def read_edge_moe(folder: str | Path, tasks: Sequence[str] | None = None) -> Conversion:
    """Edge-MoE's weight folder as a vision-moe M³ViT-T (its ``tasks`` name the gates ``task0``, ``task1``, ...;
    default :data:`EDGE_MOE_TASKS` for two). The folder's class token is already in ``pos_embed[0]`` (cls_token
    0) and its patch embedding reads pixels as they are (the model's mean 0, std 256/255: x = byte / 256)."""
    root = Path(folder)
    if not root.is_dir():
        raise ConversionError(f"{root}: not a folder; expected Edge-MoE's weights/ folder of <name>.float32.bin files")
    n_tasks = len(list(root.glob("l1_w_gate_T_task*.float32.bin")))
    if not n_tasks:
        raise ConversionError(f"{root / 'l1_w_gate_T_task0.float32.bin'}: missing; expected one gate file per task")
    tasks = list(tasks) if tasks else list(EDGE_MOE_TASKS if n_tasks == 2 else [f"task{t}" for t in range(n_tasks)])
    if len(tasks) != n_tasks:
        raise ConversionError(f"{root}: the folder has gates for {n_tasks} tasks, got {len(tasks)} names {tasks}")
    arr = {name: _read_bin(root / f"{name}.float32.bin", shape) for name, (shape, _) in edge_moe_files(n_tasks).items()}
    t = {k: torch.from_numpy(v.copy()) for k, v in arr.items()}
    d = EDGE_MOE["dim"]
    sd: dict[str, torch.Tensor] = {
        "patch_embed.proj.weight": t["patch_embed_weight"],
        "patch_embed.proj.bias": t["patch_embed_bias"],
        "cls_token": torch.zeros(1, 1, d),
        "pos_embed": t["pos_embed"][None],
        "norm.weight": torch.ones(d),
        "norm.bias": torch.zeros(d),
    }
    for layer in range(EDGE_MOE["depth"]):
        p, b = f"l{layer}_", f"blocks.{layer}."
        sd.update(
            {
                b + "attn.qkv.weight": t[p + "qkv_weight"],
                b + "attn.qkv.bias": t[p + "qkv_bias"],
                b + "attn.proj.weight": t[p + "attn_proj_weight"],
                b + "attn.proj.bias": t[p + "attn_proj_bias"],
                **{f"{b}norm{n}.{w}": t[f"{p}norm{n}_{w}"] for n in (1, 2) for w in ("weight", "bias")},
            }
        )
        if layer % 2 == 0:
            sd.update({f"{b}mlp.fc{n}.{w}": t[f"{p}fc{n}_{w}"] for n in (1, 2) for w in ("weight", "bias")})
        else:
            sd.update(
                {
                    b + "mlp.experts.fc1.weight": t[p + "htoh4_weight"].transpose(1, 2).contiguous(),
                    b + "mlp.experts.fc1.bias": t[p + "htoh4_bias"],
                    b + "mlp.experts.fc2.weight": t[p + "h4toh_weight"].transpose(1, 2).contiguous(),
                    b + "mlp.experts.fc2.bias": t[p + "h4toh_bias"],
                    **{
                        f"{b}mlp.router.gates.{name}.proj.weight": t[f"{p}w_gate_T_task{i}"]
                        for i, name in enumerate(tasks)
                    },
                }
            )
    c = Conversion("m3vit_tiny_patch16_224", _model_args(tasks), sd, mean=IMPORT_MEAN, std=IMPORT_STD)
    c.mapped = [
        "patch_embed_{weight,bias} -> patch_embed.proj.*; pos_embed (129, 192) -> pos_embed (its row 0 holds the "
        "class token: cls_token = 0)",
        "lL_{qkv,attn_proj}_* -> blocks.L.attn.{qkv,proj}.*; lL_norm{1,2}_* -> blocks.L.norm{1,2}.*",
        "lL_fc{1,2}_* (even L) -> blocks.L.mlp.fc{1,2}.*",
        "lL_{htoh4,h4toh}_weight (experts, out, in) (odd L) -> blocks.L.mlp.experts.fc{1,2}.weight (experts, in, out)",
        f"lL_w_gate_T_task<t> (16, 192) -> blocks.L.mlp.router.gates.<task>.proj.weight, tasks {tasks}",
    ]
    c.left_out = [
        f"{n}.float32.bin: test data, not weights"
        for n in ("image", "l11_x_post_moe")
        if (root / f"{n}.float32.bin").is_file()
    ]
    c.notes = [
        "norm: Edge-MoE's output is the tokens after block 11 with no final LayerNorm; set to weight 1, bias 0 "
        "(forward_intermediates(norm=False) gives Edge-MoE's output)",
        "input: pixels as Edge-MoE reads them (byte / 256): the model's mean 0, std 256/255",
    ]
    return c


# ---------------------------------------------------------------------- vision-moe -> Edge-MoE
def _check_model(model: nn.Module, tasks: Sequence[str]) -> None:
    """One line naming what the model has that Edge-MoE's fixed M³ViT-T cannot run."""
    from timm.layers import PatchEmbed

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise ValueError(f"Edge-MoE cannot run this model: {what}")

    d = EDGE_MOE["dim"]
    need(
        isinstance(model.patch_embed, PatchEmbed),
        f"a {type(model.patch_embed).__name__} stem (a 16x16 patch embedding only)",
    )
    need(
        tuple(model.patch_embed.patch_size) == (PATCH, PATCH),
        f"patch size {tuple(model.patch_embed.patch_size)}, expected 16",
    )
    need(model.embed_dim == d, f"embed_dim {model.embed_dim}, expected {d}")
    need(len(model.blocks) == EDGE_MOE["depth"], f"{len(model.blocks)} blocks, expected {EDGE_MOE['depth']}")
    need(model.cls_token is not None, "no class token (Edge-MoE's token 0 is the class token)")
    need(model.task_embed is None, "task embeddings added before the blocks (Mod-Squad's task_embed_blocks)")
    need(
        len(tasks) == 2,
        f"{len(tasks)} tasks {list(tasks)}; Edge-MoE's folder holds the gates of two (pass --tasks A,B)",
    )
    for i, blk in enumerate(model.blocks):
        at, mlp = blk.attn, blk.mlp
        need(not isinstance(at, MoEAttention), f"blocks.{i}.attn is MoE attention (Edge-MoE's attention is dense)")
        need(
            at.num_heads == EDGE_MOE["heads"] and at.head_dim * at.num_heads == d,
            f"blocks.{i}.attn: {at.num_heads} heads, expected 3 of 64",
        )
        need(at.qkv.bias is not None, f"blocks.{i}.attn.qkv has no bias")
        need(
            isinstance(at.q_norm, nn.Identity) and isinstance(at.norm, nn.Identity), f"blocks.{i}.attn has extra norms"
        )
        need(isinstance(blk.ls1, nn.Identity) and isinstance(blk.ls2, nn.Identity), f"blocks.{i} has layer scale")
        if i % 2 == 0:
            need(not isinstance(mlp, MoEMlp), f"blocks.{i}.mlp is MoE (Edge-MoE: dense MLP in even blocks)")
            need(
                mlp.fc1.out_features == EDGE_MOE["mlp_hidden"],
                f"blocks.{i}.mlp hidden {mlp.fc1.out_features}, expected 768",
            )
            continue
        need(isinstance(mlp, MoEMlp), f"blocks.{i}.mlp is dense (Edge-MoE: MoE MLP in odd blocks)")
        r, ex = mlp.router, mlp.experts
        need(isinstance(r, MultiGateRouter), f"blocks.{i}.mlp.router is {type(r).__name__} (one gate per task only)")
        need(
            (ex.num_experts, mlp.top_k, ex.hidden) == (16, 2, 384),
            f"blocks.{i}.mlp: {ex.num_experts} experts, top-{mlp.top_k}, hidden {ex.hidden}; expected 16, top-2, 384",
        )
        need(
            mlp.capacity is None and mlp.capacity_factor is None,
            f"blocks.{i}.mlp has an expert capacity (Edge-MoE is dropless)",
        )
        for t in tasks:
            g = r.gates[t]
            need(
                not g.renormalize, f"blocks.{i}.mlp.router.gates.{t} renormalises its top-k weights (Edge-MoE does not)"
            )
            need(
                g.proj.bias is None or not g.proj.bias.any(),
                f"blocks.{i}.mlp.router.gates.{t} has a bias (Edge-MoE's gate has none)",
            )
            need(bool(g.expert_mask.all()), f"blocks.{i}.mlp.router.gates.{t} has pruned experts (Edge-MoE scores 16)")


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().cpu().numpy()


@torch.no_grad()
def _tensors(model: nn.Module, tasks: Sequence[str], mean, std) -> dict[str, np.ndarray]:
    """The folder's tensors in float64, before rounding: class token and normalisation folded in."""
    from timm.layers import resample_abs_pos_embed

    pe = model.patch_embed
    w = _np(pe.proj.weight)  # (192, 3, 16, 16)
    # x = (v * 256/255 - mean) / std for the pixel v = byte / 256 Edge-MoE reads
    scale = np.array([256.0 / (255.0 * s) for s in std])
    shift = np.array([m / s for m, s in zip(mean, std)])
    out = {
        "patch_embed_weight": w * scale[None, :, None, None],
        "patch_embed_bias": _np(pe.proj.bias) - np.einsum("ocyx,c->o", w, shift),
    }
    grid = (EDGE_MOE["img"][0] // PATCH, EDGE_MOE["img"][1] // PATCH)
    pos = model.pos_embed
    if tuple(pe.grid_size) != grid:
        pos = resample_abs_pos_embed(pos, grid, num_prefix_tokens=model.num_prefix_tokens)
    pos = _np(pos)[0]
    pos[0] += _np(model.cls_token)[0, 0]
    out["pos_embed"] = pos
    for i, blk in enumerate(model.blocks):
        p = f"l{i}_"
        out[p + "qkv_weight"], out[p + "qkv_bias"] = _np(blk.attn.qkv.weight), _np(blk.attn.qkv.bias)
        out[p + "attn_proj_weight"], out[p + "attn_proj_bias"] = _np(blk.attn.proj.weight), _np(blk.attn.proj.bias)
        for n, norm in ((1, blk.norm1), (2, blk.norm2)):
            out[f"{p}norm{n}_weight"], out[f"{p}norm{n}_bias"] = _np(norm.weight), _np(norm.bias)
        mlp = blk.mlp
        if i % 2 == 0:
            for n, fc in ((1, mlp.fc1), (2, mlp.fc2)):
                out[f"{p}fc{n}_weight"], out[f"{p}fc{n}_bias"] = _np(fc.weight), _np(fc.bias)
        else:
            ex = mlp.experts
            out[p + "htoh4_weight"] = _np(ex.fc1.weight).transpose(0, 2, 1)
            out[p + "htoh4_bias"] = _np(ex.fc1.bias)
            out[p + "h4toh_weight"] = _np(ex.fc2.weight).transpose(0, 2, 1)
            out[p + "h4toh_bias"] = _np(ex.fc2.bias)
            for t, name in enumerate(tasks):
                out[f"{p}w_gate_T_task{t}"] = _np(mlp.router.gates[name].proj.weight)
    return out


def _round(values: dict[str, np.ndarray], types: dict[str, tuple[tuple[int, ...], FxType]]) -> dict[str, np.ndarray]:
    """Round to nearest on each file's grid; a value outside its type's range is refused, naming the file."""
    log, out = OverflowLog(), {}
    for name, v in values.items():
        shape, fx = types[name]
        if v.shape != shape:  # a bug in the tensor extraction, not bad input
            raise RuntimeError(f"{name}: shape {v.shape}, expected {shape}")
        out[name] = to_float(quantize(v, fx, log, name), fx.frac).astype("<f4")
    over = log.nonzero()
    if over:
        name = next(iter(over))
        fx = types[name][1]
        lim = 2.0 ** (fx.int_bits - 1)
        raise ValueError(
            f"{name}.float32.bin: {over[name]} of {values[name].size} values (max |v| = "
            f"{float(np.abs(values[name]).max()):.4g}) outside {fx.cpp()}'s range [-{lim:g}, {lim:g}) that "
            "Edge-MoE reads it as; it would wrap around" + (f" (also: {sorted(over)[1:4]})" if len(over) > 1 else "")
        )
    return out


@torch.no_grad()
def _tokens_after_last_block(model: nn.Module, x: torch.Tensor, task: str) -> tuple[torch.Tensor, list]:
    """Edge-MoE's output: every token after the last block, before the final norm (B, 1 + N, C); and the aux."""
    feats, aux = model.forward_intermediates(
        x, task, indices=1, output_fmt="NLC", intermediates_only=True, return_prefix_tokens=True, return_aux=True
    )
    spatial, prefix = feats[0]
    return torch.cat([prefix, spatial], dim=1), aux


def write_edge_moe(
    model: nn.Module,
    folder: str | Path,
    tasks: Sequence[str] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    images: Sequence[tuple[str, np.ndarray]] | None = None,
) -> list[str]:
    """Write ``model`` (a vision-moe M³ViT-T in Edge-MoE's shape) as Edge-MoE's weight folder; returns report lines.

    ``tasks``: the two tasks whose gates become ``task0`` / ``task1`` (default: the model's two). ``mean``/``std``:
    the normalisation the model was trained with (default: its pretrained_cfg), folded into the patch embedding.
    ``images``: (name, uint8 HWC 128 x 256) images; the first is written as ``image.float32.bin`` with the model's
    output on it for task 0 as ``l11_x_post_moe.float32.bin`` (what Edge-MoE's testbench compares), and every image is
    routed for every task to find experts that receive all its tokens (a warning naming the layer). Everything is
    computed and checked before the first file is written."""
    model = model.eval()
    tasks = list(tasks or model.tasks)
    for t in tasks:
        if t not in model.tasks:
            raise ValueError(f"unknown task {t!r}; this model has {list(model.tasks)}")
    _check_model(model, tasks)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean = tuple(float(v) for v in (mean or cfg.get("mean") or (0.5,) * 3))
    std = tuple(float(v) for v in (std or cfg.get("std") or (0.5,) * 3))
    types = edge_moe_files(len(tasks))
    files = _round(_tensors(model, tasks, mean, std), types)
    report = [f"{len(files)} weight files (rounded to nearest on Edge-MoE's fixed-point grids), tasks {tasks}"]
    h, w = EDGE_MOE["img"]
    for name, img in images or ():
        if img.shape != (h, w, 3) or img.dtype != np.uint8:
            raise ValueError(f"image {name}: {img.shape} {img.dtype}, expected ({h}, {w}, 3) uint8 (Edge-MoE's input)")
    m = torch.tensor(mean, dtype=torch.float64)[:, None, None]
    s = torch.tensor(std, dtype=torch.float64)[:, None, None]
    n_tokens = TOKENS
    for idx, (name, img) in enumerate(images or ()):
        byte = torch.from_numpy(img).permute(2, 0, 1).double()
        x = ((byte / 255.0 - m) / s).float()[None]
        for t in tasks:
            tokens, aux = _tokens_after_last_block(model, x, t)
            for (layer, _), a in zip(model.moe_layers(), aux):
                full = torch.nonzero(a.expert_load >= n_tokens).flatten().tolist()
                for e in full:
                    msg = (
                        f"{layer}: expert {e} receives every token of image {name!r} for task {t!r}; Edge-MoE's kernel "
                        "breaks its expert path then (an index stream that is never filled)"
                    )
                    _logger.warning(msg)
                    report.append("warning: " + msg)
            if idx == 0 and t == tasks[0]:
                files["image"] = (byte / 256.0).numpy().astype("<f4")  # exact on ap_ufixed<8,0>
                ref = tokens[0].double().numpy()
                files["l11_x_post_moe"] = to_float(quantize(ref, FM), FM.frac).astype("<f4")
                report.append(f"image.float32.bin: {name}; l11_x_post_moe.float32.bin: the model's output for {t!r}")
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    for name, arr in files.items():
        arr.tofile(out / f"{name}.float32.bin")
    report.append(f"written to {out}")
    return report
