"""Write a Vitis HLS project (hls4ml-style layout) for a task-sparse M³ViT and check it against the reference.

Layout of ``out_dir``::

    firmware/<top>.cpp, <top>.h      top function (s_axilite control, m_axi data, debug switch)
    firmware/defines.h               ap_fixed typedefs and fraction widths
    firmware/parameters.h            dimensions, layer list, blob offsets, MoE descriptors
    firmware/tables.h                exp2 / reciprocal / rsqrt / GELU tables
    firmware/vmoe/*.h                the kernel library (copied from hls/include/vmoe)
    firmware/ap_types/               Apache-2.0 ap_int/ap_fixed headers for g++ (Vitis uses its own)
    firmware/weights/weights.bin     weight_t blob (int16 raw, tile-major), biases.bin (bias_t blob)
    <top>_test.cpp                   C-simulation testbench comparing every layer with tb_data/
    tb_data/                         input pixels and golden per-layer outputs per task (int32 raw)
    build_prj.tcl                    vitis_hls -f build_prj.tcl "csim=1 synth=1 cosim=0 export=0"
    Makefile                         g++ C-simulation (make csim, make csim OPT=-O0, make asan)
    link.cfg, host/host.cpp          v++ link configuration and XRT host program for the board
    project.json                     what was generated: tasks, types, layers, footprint, errors, performance
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .config import HLSConfig
from .fixed import to_float
from .ir import ModelSpec, UnsupportedModelError, extract
from .perf import EDGE_MOE_PUBLISHED, PerfReport, estimate
from .reference import QuantModel, RefResult, image_to_pixels, layer_names, quantize_model, run_reference

__all__ = ["HLSProject", "export_hls", "builtin_images", "hls_root", "compile_csim", "run_csim"]

_logger = logging.getLogger(__name__)


def hls_root() -> Path:
    """The repository's ``hls/`` folder (kernel library, templates, vendored ap_types)."""
    root = Path(__file__).resolve().parents[3] / "hls"
    if not (root / "include" / "vmoe").is_dir():
        raise FileNotFoundError(f"HLS kernel library not found at {root}")
    return root


# ---------------------------------------------------------------------------------------------- images
def builtin_images(size: tuple[int, int], count: int = 4) -> list[tuple[str, np.ndarray]]:
    """A few real photographs bundled with scikit-image, resized to ``size`` (uint8 HWC); random images without it."""
    out = []
    try:
        from skimage import data as skd

        names = ["astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry"]
        for n in names[:count]:
            out.append((n, getattr(skd, n)()))
    except ImportError:
        rng = np.random.default_rng(0)
        out = [(f"random{i}", rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for i in range(count)]
    res = []
    for n, img in out:
        t = torch.from_numpy(np.ascontiguousarray(img[..., :3])).permute(2, 0, 1)[None].float()
        s = min(t.shape[2], t.shape[3])
        y0, x0 = (t.shape[2] - s) // 2, (t.shape[3] - s) // 2
        t = t[:, :, y0 : y0 + s, x0 : x0 + s]
        t = torch.nn.functional.interpolate(t, size=size, mode="bilinear", antialias=True, align_corners=False)
        res.append((n, t[0].round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()))
    return res


def _float_forward(model: nn.Module, img: np.ndarray, task: str, spec: ModelSpec) -> np.ndarray:
    x = torch.from_numpy(img).permute(2, 0, 1)[None].double() / 255.0
    mean = torch.tensor(spec.mean, dtype=torch.float64)[None, :, None, None]
    std = torch.tensor(spec.std, dtype=torch.float64)[None, :, None, None]
    x = ((x - mean) / std).float()
    with torch.no_grad():
        y = model(x, task) if spec.head is not None else model.forward_features(x, task)
    return y[0].double().numpy()


# ---------------------------------------------------------------------------------------------- blobs
class _Blob:
    def __init__(self) -> None:
        self.parts: list[np.ndarray] = []
        self.size = 0

    def add(self, a: np.ndarray) -> int:
        off = self.size
        a = np.asarray(a, dtype=np.int64).reshape(-1)
        self.parts.append(a)
        self.size += a.size
        return off

    def array(self) -> np.ndarray:
        return np.concatenate(self.parts) if self.parts else np.zeros(0, dtype=np.int64)


def _tile_major(w: np.ndarray, tile: int) -> np.ndarray:
    """(K, O) -> tiles of TILE output columns, each K x TILE contiguous; the last tile zero-padded."""
    k, o = w.shape
    op = -(-o // tile) * tile
    wp = np.zeros((k, op), dtype=np.int64)
    wp[:, :o] = w
    return wp.reshape(k, op // tile, tile).transpose(1, 0, 2).reshape(-1)


@dataclass
class _Layout:
    weights: np.ndarray
    biases: np.ndarray
    consts: dict[str, int]
    blocks: list[dict]
    moes: list[dict]
    expert_w1: int
    expert_w: int
    expert_b: int


def _layout(qm: QuantModel) -> _Layout:
    sp, t = qm.spec, qm.spec.tile
    wb, bb = _Blob(), _Blob()
    k = {
        "PATCH_W": wb.add(_tile_major(qm.patch_embed.w, t)),
        "PATCH_B": bb.add(qm.patch_embed.b),
        "CLS_POS_B": bb.add(qm.cls_pos),
        "POS_B": bb.add(qm.pos),
    }
    blocks, moes = [], []
    eh = max(sp.expert_hidden, 1)
    e_w1 = sp.dim * (-(-eh // t) * t)
    e_w = e_w1 + eh * (-(-sp.dim // t) * t)
    for qb in qm.blocks:
        d = dict(
            ln1_g=bb.add(qb["ln1"][0]),
            ln1_b=bb.add(qb["ln1"][1]),
            qkv_w=wb.add(_tile_major(qb["qkv"].w, t)),
            qkv_b=bb.add(qb["qkv"].b),
            proj_w=wb.add(_tile_major(qb["proj"].w, t)),
            proj_b=bb.add(qb["proj"].b),
            ln2_g=bb.add(qb["ln2"][0]),
            ln2_b=bb.add(qb["ln2"][1]),
            fc1_w=0,
            fc1_b=0,
            fc2_w=0,
            fc2_b=0,
            moe=-1,
        )
        if "experts" in qb:
            m = dict(gate_w=[], gate_b=[], mask=[], w=[], b=[], num_experts=len(qb["experts"]))
            for glin, mask in qb["gates"]:
                m["gate_w"].append(wb.add(_tile_major(glin.w, t)))
                m["gate_b"].append(bb.add(glin.b))
                m["mask"].append([bool(v) for v in mask])
            for f1, f2 in qb["experts"]:  # fc1 tiles then fc2 tiles: one burst per expert
                m["w"].append(wb.add(np.concatenate([_tile_major(f1.w, t), _tile_major(f2.w, t)])))
                m["b"].append(bb.add(np.concatenate([f1.b, f2.b])))
            d["moe"] = len(moes)
            moes.append(m)
        else:
            d.update(
                fc1_w=wb.add(_tile_major(qb["fc1"].w, t)),
                fc1_b=bb.add(qb["fc1"].b),
                fc2_w=wb.add(_tile_major(qb["fc2"].w, t)),
                fc2_b=bb.add(qb["fc2"].b),
            )
        blocks.append(d)
    k["NORM_G"], k["NORM_B"] = bb.add(qm.norm[0]), bb.add(qm.norm[1])
    if qm.head is not None:
        k["HEAD_W"], k["HEAD_B"] = wb.add(_tile_major(qm.head.w, t)), bb.add(qm.head.b)
    else:
        k["HEAD_W"], k["HEAD_B"] = 0, 0
    return _Layout(wb.array(), bb.array(), k, blocks, moes, e_w1, e_w, eh + sp.dim)


def footprint_bytes(qm: QuantModel) -> int:
    """Bytes of the weight + bias blobs of a quantised model."""
    lay = _layout(qm)
    return lay.weights.size * qm.cfg.weight.width // 8 + lay.biases.size * qm.cfg.bias.width // 8


# ---------------------------------------------------------------------------------------------- C++ text
def _c_array(name: str, ctype: str, values, per_line: int = 12) -> str:
    vals = [str(int(v)) for v in values]
    lines = [", ".join(vals[i : i + per_line]) for i in range(0, len(vals), per_line)]
    return f"static const {ctype} {name}[{len(vals)}] = {{\n    " + ",\n    ".join(lines) + "\n};\n"


def _defines(cfg: HLSConfig) -> str:
    a, w, b, p = cfg.act, cfg.weight, cfg.bias, cfg.pixel
    return f"""// Fixed-point types (generated). Quantisation AP_TRN, overflow AP_WRAP (ap_fixed defaults) throughout;
// the NumPy reference (vision_moe/deploy/hls/reference.py) reproduces exactly these semantics.
#ifndef VMOE_DEFINES_H
#define VMOE_DEFINES_H

#include <ap_fixed.h>
#include <ap_int.h>

typedef {a.cpp()} act_t;      // activations
typedef {w.cpp()} weight_t;   // linear weights
typedef {b.cpp()} bias_t;     // biases, LayerNorm gamma/beta, position embedding
typedef {p.cpp()} pixel_t;    // input pixels: raw byte / 256
typedef {cfg.exp_type.cpp()} exp_t;       // exp() outputs
typedef {cfg.rstd_type.cpp()} rstd_t;     // LayerNorm 1/sqrt(var + eps)
typedef {cfg.sq_type.cpp()} sq_t;         // squared deviations
typedef {cfg.var_type.cpp()} var_t;       // variance
typedef ap_ufixed<{cfg.inv_bits}, 0> inv_t;            // 1/C

static const int F_A = {a.frac}, F_W = {w.frac}, F_B = {b.frac}, F_P = {p.frac};
static const int F_E = {cfg.exp_type.frac}, F_R = {cfg.rstd_type.frac}, F_V = {cfg.var_type.frac};
static const int F_SQ = {cfg.sq_type.frac};
#define TABLE_BITS {cfg.table_bits}
#define TABLE_FRAC {cfg.table_frac}
#define GELU_BITS {cfg.gelu_bits}
#define GELU_RANGE {cfg.gelu_range}

// 64-bit accumulators wide enough to hold every product exactly (so the sum does not depend on its order)
typedef ap_fixed<64, 64 - ({a.frac} + {w.frac})> acc_t;     // activation x weight
typedef ap_fixed<64, 64 - ({p.frac} + {w.frac})> acc_px_t;  // pixel x weight
typedef ap_fixed<64, 64 - 2 * {a.frac}> acc_qk_t;           // query x key
typedef ap_fixed<64, 64 - {a.frac}> sum_t;                  // LayerNorm sum
typedef ap_ufixed<64, 64 - {cfg.sq_type.frac}> sqsum_t;     // LayerNorm sum of squares

#endif
"""


def _parameters(qm: QuantModel, lay: _Layout, names: list[str], sizes: list[int], cfg: HLSConfig) -> str:
    sp = qm.spec
    n_moe = len(lay.moes)
    max_e = max(sp.num_experts, 1)
    n_t = len(sp.tasks)
    big = max(3 * sp.dim, sp.hidden, sp.num_experts, sp.head.w.shape[1] if sp.head is not None else 0)
    max_k = max(3 * sp.patch**2, sp.dim, sp.hidden, sp.expert_hidden)
    max_o = -(-max(3 * sp.dim, sp.hidden, sp.expert_hidden, big) // sp.tile) * sp.tile
    lines = [
        "// Dimensions, layer list, blob offsets (in elements) and MoE descriptors (generated).",
        "#ifndef VMOE_PARAMETERS_H",
        "#define VMOE_PARAMETERS_H",
        "",
        f"// model: {sp.name}; tasks: {', '.join(sp.tasks)}",
        f"#define IMG_H {sp.img_size[0]}",
        f"#define IMG_W {sp.img_size[1]}",
        f"#define IMG_SIZE {3 * sp.img_size[0] * sp.img_size[1]}",
        f"#define PATCH {sp.patch}",
        f"#define GRID_H {sp.grid[0]}",
        f"#define GRID_W {sp.grid[1]}",
        f"#define NUM_PATCHES {sp.grid[0] * sp.grid[1]}",
        f"#define PATCH_K {3 * sp.patch**2}",
        f"#define NUM_TOKENS {sp.num_tokens}",
        f"#define EMBED_DIM {sp.dim}",
        f"#define NUM_HEADS {sp.heads}",
        f"#define HEAD_DIM {sp.head_dim}",
        f"#define MLP_HIDDEN {max(sp.hidden, 1)}",
        f"#define EXPERT_HIDDEN {max(sp.expert_hidden, 1)}",
        f"#define MAX_EXPERTS {max_e}",
        f"#define TOP_K {max(sp.top_k, 1)}",
        f"#define RENORMALIZE {int(sp.renormalize)}",
        f"#define NUM_CLASSES {sp.head.w.shape[1] if sp.head is not None else 0}",
        f"#define NUM_TASKS {n_t}",
        f"#define NUM_BLOCKS {len(sp.blocks)}",
        f"#define NUM_MOE {n_moe}",
        f"#define NUM_LAYERS {len(names)}",
        f"#define BIG_WIDTH {big}",
        f"#define MAX_LAYER_SIZE {max(sizes)}",
        "",
        "// parallelism",
        f"#define TILE {sp.tile}",
        f"#define PAR_IN {cfg.par_in}",
        f"#define ATTN_ROWS {cfg.attn_rows}",
        f"#define ATTN_LANES {cfg.attn_lanes}",
        f"#define MAX_K {max_k}",
        f"#define MAX_O {max_o}",
        "",
        f"#define WEIGHTS_SIZE {lay.weights.size}",
        f"#define BIASES_SIZE {lay.biases.size}",
        f"#define EXPERT_W1_SIZE {lay.expert_w1}",
        f"#define EXPERT_W_SIZE {lay.expert_w}",
        f"#define EXPERT_B_SIZE {lay.expert_b}",
        f"static const long long INV_DIM_RAW = {qm.inv_dim}LL;  // 1/{sp.dim} as inv_t",
        f"static const long long LN_EPS_RAW = {qm.eps}LL;  // {sp.ln_eps:g} as var_t",
        "",
    ]
    lines += [f"static const int {k} = {v};" for k, v in lay.consts.items()]
    lines += [
        "",
        "static const char *const TASK_NAMES[NUM_TASKS] = {" + ", ".join(f'"{t}"' for t in sp.tasks) + "};",
        "static const char *const LAYER_NAMES[NUM_LAYERS] = {",
        *[f'    "{n}",' for n in names],
        "};",
        "static const int LAYER_SIZES[NUM_LAYERS] = {" + ", ".join(map(str, sizes)) + "};",
        "",
        "struct blk_desc {",
        "    int ln1_g, ln1_b, qkv_w, qkv_b, proj_w, proj_b, ln2_g, ln2_b;",
        "    int fc1_w, fc1_b, fc2_w, fc2_b;",
        "    int moe;  // index into MOE, -1 for a dense MLP",
        "};",
        "static const blk_desc BLOCKS[NUM_BLOCKS] = {",
    ]
    keys = [
        "ln1_g",
        "ln1_b",
        "qkv_w",
        "qkv_b",
        "proj_w",
        "proj_b",
        "ln2_g",
        "ln2_b",
        "fc1_w",
        "fc1_b",
        "fc2_w",
        "fc2_b",
        "moe",
    ]
    for d in lay.blocks:
        lines.append("    {" + ", ".join(str(d[k]) for k in keys) + "},")
    lines += [
        "};",
        "",
        "struct moe_desc {",
        "    int num_experts;  // experts held for this layer (reachable by the tasks)",
        "    int gate_w[NUM_TASKS], gate_b[NUM_TASKS];",
        "    bool mask[NUM_TASKS][MAX_EXPERTS];  // experts each task may use",
        "    int w[MAX_EXPERTS], b[MAX_EXPERTS];  // expert blobs: fc1 then fc2 tiles; b1 then b2",
        "    int orig[MAX_EXPERTS];  // index of the expert in the full model",
        "};",
        f"static const moe_desc MOE[{max(n_moe, 1)}] = {{",
    ]
    moe_blocks = [b for b in sp.blocks if b.is_moe]
    for m, b in zip(lay.moes, moe_blocks):
        pad = lambda v, fill=0: list(v) + [fill] * (max_e - len(v))  # noqa: E731
        mask = (
            "{"
            + ", ".join("{" + ", ".join("true" if x else "false" for x in pad(mk, False)) + "}" for mk in m["mask"])
            + "}"
        )
        lines.append(
            f"    {{{m['num_experts']}, {{{', '.join(map(str, m['gate_w']))}}}, "
            f"{{{', '.join(map(str, m['gate_b']))}}}, "
            f"{mask}, {{{', '.join(map(str, pad(m['w'])))}}}, {{{', '.join(map(str, pad(m['b'])))}}}, "
            f"{{{', '.join(map(str, pad(b.expert_ids, -1)))}}}}},  // blocks.{b.index}"
        )
    if not n_moe:
        lines.append("    {0, {" + ", ".join(["0"] * n_t) + "}, {" + ", ".join(["0"] * n_t) + "}, {}, {0}, {0}, {-1}},")
    lines += ["};", "", "#endif", ""]
    return "\n".join(lines)


def _tables(qm: QuantModel) -> str:
    tb = qm.tables
    return (
        "// Lookup tables (generated; identical to vision_moe.deploy.hls.fixed.Tables).\n"
        "#ifndef VMOE_TABLES_H\n#define VMOE_TABLES_H\n\n"
        f"static const long long VMOE_LOG2E = {tb.log2e}LL;  // log2(e) with F_E fraction bits\n"
        + _c_array("VMOE_EXP2", "int", tb.exp2)
        + _c_array("VMOE_RECIP", "int", tb.recip)
        + _c_array("VMOE_RSQRT1", "int", tb.rsqrt1)
        + _c_array("VMOE_RSQRT2", "int", tb.rsqrt2)
        + _c_array("VMOE_GELU", "int", tb.gelu)
        + "\n#endif\n"
    )


def _render(text: str, **kw) -> str:
    for k, v in kw.items():
        text = text.replace(f"@{k}@", str(v))
    return text


# ---------------------------------------------------------------------------------------------- project
@dataclass
class HLSProject:
    """What :func:`export_hls` wrote and measured."""

    out_dir: Path
    top: str
    spec: ModelSpec
    qmodel: QuantModel
    layer_names: list[str]
    references: dict[str, RefResult]  # per task, on the test image
    footprint: int  # bytes of this project's weight + bias blobs
    footprint_full: int  # the same for the full model (all tasks, all experts)
    perf: PerfReport
    accuracy: dict = field(default_factory=dict)

    def summary(self) -> str:
        sp = self.spec
        lines = [
            f"HLS project {self.out_dir} (top {self.top}) for tasks {list(sp.tasks)}: {sp.name}, "
            f"{sp.img_size[0]}x{sp.img_size[1]}, patch {sp.patch}, dim {sp.dim}, depth {len(sp.blocks)}, "
            f"{sp.heads} heads, tile {sp.tile}"
        ]
        for b in sp.blocks:
            if b.is_moe:
                lines.append(f"  blocks.{b.index}: experts kept {b.expert_ids} of {sp.num_experts_full}")
        lines.append(
            f"weight footprint: {self.footprint:,} B for this project vs {self.footprint_full:,} B for the full "
            f"model ({100 * self.footprint / max(self.footprint_full, 1):.1f}%)"
        )
        for t, acc in self.accuracy.items():
            lines.append(
                f"fixed point vs PyTorch float [{t}]: MSE {acc['mse']:.3e}, max abs error {acc['max_abs']:.3e}, "
                f"{acc['metric_name']} {acc['metric']:.3f} on {acc['images']} images"
            )
        sat = {k: v for r in self.references.values() for k, v in r.log.nonzero().items()}
        sat.update(self.qmodel.log.nonzero())
        if sat:
            lines.append("fixed-point overflow (values wrapped or saturated) per tensor:")
            lines += [f"  {k}: {v}" for k, v in sorted(sat.items())]
        else:
            lines.append("fixed-point overflow: none (no tensor wrapped or saturated)")
        lines.append("performance model:")
        lines.append(self.perf.table())
        lines.append("Edge-MoE published: " + "; ".join(f"{k}: {v}" for k, v in EDGE_MOE_PUBLISHED.items()))
        return "\n".join(lines)


def _accuracy(model: nn.Module, qm: QuantModel, tasks: tuple[str, ...], images: list[tuple[str, np.ndarray]]) -> dict:
    sp, fa = qm.spec, qm.cfg.act.frac
    res = {}
    for t in tasks:
        se, mx, n, agree = 0.0, 0.0, 0, 0
        for _, img in images:
            f = _float_forward(model, img, t, sp)
            q = to_float(run_reference(qm, image_to_pixels(img), t).output(), fa).reshape(f.shape)
            se += float(((f - q) ** 2).sum())
            n += f.size
            mx = max(mx, float(np.abs(f - q).max()))
            if sp.head is not None:
                agree += int(np.argmax(f) == np.argmax(q))
            else:
                agree += float((f * q).sum() / (np.linalg.norm(f) * np.linalg.norm(q) + 1e-30))
        res[t] = dict(
            mse=se / n,
            max_abs=mx,
            images=len(images),
            metric=agree / len(images),
            metric_name="top-1 agreement with float" if sp.head is not None else "cosine similarity",
        )
    return res


def export_hls(
    model: nn.Module,
    tasks: str | list[str] | tuple[str, ...],
    out_dir: str | Path,
    cfg: HLSConfig | None = None,
    name: str = "model",
    img_size: tuple[int, int] | None = None,
    num_eval_images: int = 3,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
) -> HLSProject:
    """Generate the HLS project for ``tasks`` of ``model`` into ``out_dir``.

    One task: the project holds ``model.specialize(task)`` (that task's gate, only the experts it can reach).
    Several tasks (or ``'all'``): every listed task's gate and the union of their experts; ``task`` selects at run time.
    ``mean``/``std``: input normalisation (default: the model's pretrained_cfg, else 0.5).
    """
    from ...models.moe_vit import MoEVisionTransformer

    cfg = cfg or HLSConfig()
    if not isinstance(model, MoEVisionTransformer):
        raise UnsupportedModelError(
            f"unsupported model {type(model).__name__}; the HLS kernels run MoEVisionTransformer"
        )
    model = model.eval()
    if isinstance(tasks, str):
        tasks = list(model.tasks) if tasks == "all" else [tasks]
    tasks = tuple(model.resolve_task(t) for t in tasks)
    if not cfg.top.isidentifier():
        raise ValueError(f"top function name {cfg.top!r} is not a C identifier")
    src = model.specialize(tasks[0]).eval() if len(tasks) == 1 else model
    spec = extract(src, tasks, cfg, img_size=img_size, name=name, mean=mean, std=std)
    if len(tasks) == 1:  # specialize() renumbers the kept experts: record their indices in the full model
        layers = [m for _, m in model.moe_layers()]
        for b, layer in zip([b for b in spec.blocks if b.is_moe], layers):
            b.expert_ids = layer.router.reachable_experts(tasks[0]).tolist()
    qm = quantize_model(spec, cfg)
    full_spec = extract(
        model, tuple(model.tasks), cfg, img_size=img_size, name=name, all_experts=True, mean=mean, std=std
    )
    footprint_full = footprint_bytes(quantize_model(full_spec, cfg))
    spec.num_experts_full = full_spec.num_experts_full
    lay = _layout(qm)
    names = layer_names(spec)

    images = builtin_images(spec.img_size, max(1, num_eval_images))
    tb_img = images[0][1]
    pixels = image_to_pixels(tb_img)
    refs = {t: run_reference(qm, pixels, t) for t in tasks}
    sizes = [int(v.size) for v in refs[tasks[0]].layers.values()]
    out = Path(out_dir)
    fw = out / "firmware"
    if fw.exists():
        shutil.rmtree(fw)
    (fw / "weights").mkdir(parents=True)
    root = hls_root()
    shutil.copytree(root / "include" / "vmoe", fw / "vmoe")
    shutil.copytree(root / "third_party" / "ap_types", fw / "ap_types")
    top = cfg.top
    (fw / "defines.h").write_text(_defines(cfg))
    (fw / "parameters.h").write_text(_parameters(qm, lay, names, sizes, cfg))
    (fw / "tables.h").write_text(_tables(qm))
    (fw / f"{top}.cpp").write_text(_render((root / "src" / "top.cpp.in").read_text(), TOP=top))
    (fw / f"{top}.h").write_text(_render((root / "src" / "top.h.in").read_text(), TOP=top, TOP_UPPER=top.upper()))
    lay.weights.astype("<i2").tofile(fw / "weights" / "weights.bin")
    lay.biases.astype("<i2").tofile(fw / "weights" / "biases.bin")
    (out / f"{top}_test.cpp").write_text(_render((root / "src" / "test.cpp.in").read_text(), TOP=top))
    tb = out / "tb_data"
    if tb.exists():
        shutil.rmtree(tb)
    tb.mkdir()
    pixels.astype(np.uint8).tofile(tb / "input_pixels.bin")
    for t, r in refs.items():
        (tb / t).mkdir()
        with open(tb / t / "layers.txt", "w") as f:
            for i, (n, v) in enumerate(r.layers.items()):
                v.astype("<i4").tofile(tb / t / f"layer{i:03d}.bin")
                f.write(f"{i} {n} {v.size}\n")
    b = cfg.board_info
    kw = dict(
        TOP=top,
        PART=b.part,
        PERIOD=f"{1000.0 / cfg.clock:.3f}",
        CLOCK_HZ=int(cfg.clock * 1e6),
        PLATFORM=cfg.platform or b.platform,
        BOARD=b.name,
        IMG_SIZE=3 * spec.img_size[0] * spec.img_size[1],
        OUT_SIZE=max(sizes),
        NUM_TASKS=len(tasks),
    )
    for tpl, dst in [
        ("build_prj.tcl.in", "build_prj.tcl"),
        ("Makefile.in", "Makefile"),
        ("link.cfg.in", "link.cfg"),
        ("host.cpp.in", "host/host.cpp"),
        ("README.md.in", "README.md"),
    ]:
        (out / dst).parent.mkdir(parents=True, exist_ok=True)
        (out / dst).write_text(_render((root / "templates" / tpl).read_text(), **kw))

    perf = estimate(spec, cfg, refs[tasks[0]].queues)
    acc = _accuracy(model, qm, tasks, images[:num_eval_images]) if num_eval_images else {}
    proj = HLSProject(out, top, spec, qm, names, refs, footprint_bytes(qm), footprint_full, perf, acc)
    meta = dict(
        model=name,
        tasks=list(tasks),
        board=b.name,
        part=b.part,
        clock_mhz=cfg.clock,
        top=top,
        types=dict(act=str(cfg.act), weight=str(cfg.weight), bias=str(cfg.bias), pixel=str(cfg.pixel)),
        layers=names,
        layer_sizes=sizes,
        experts={f"blocks.{x.index}": x.expert_ids for x in spec.blocks if x.is_moe},
        footprint_bytes=proj.footprint,
        footprint_full_bytes=footprint_full,
        accuracy=acc,
        overflow={t: r.log.nonzero() for t, r in refs.items()},
        parameter_saturation=qm.log.nonzero(),
        perf=dict(
            cycles=perf.cycles,
            latency_ms=perf.latency_ms,
            dsp=perf.dsp,
            bram18k=perf.bram18k,
            layers=[(x.name, x.cycles) for x in perf.layers],
        ),
        test_image=images[0][0],
    )
    (out / "project.json").write_text(json.dumps(meta, indent=1))
    _logger.info("wrote HLS project %s", out)
    return proj


# ---------------------------------------------------------------------------------------------- g++ C-simulation
def compile_csim(
    project_dir: str | Path, opt: str = "-O2", sanitize: bool = False, exe: str | None = None, cxx: str = "g++"
) -> Path:
    """Compile the project's testbench + top function with g++ (no Vitis); returns the executable."""
    d = Path(project_dir)
    meta = json.loads((d / "project.json").read_text())
    top = meta["top"]
    exe_path = d / (exe or f"{top}_csim")
    # C++20 under the sanitizers: the Xilinx ap_types headers left-shift negative values (UB before C++20).
    flags = ["-std=c++20" if sanitize else "-std=c++14", opt, "-I.", "-Ifirmware", "-Ifirmware/ap_types", "-w"]
    if sanitize:
        flags += ["-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"]
    cmd = [cxx, *flags, f"firmware/{top}.cpp", f"{top}_test.cpp", "-o", str(exe_path.name)]
    r = subprocess.run(cmd, cwd=d, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"g++ failed ({' '.join(cmd)}):\n{r.stderr[-4000:]}")
    return exe_path


def run_csim(
    exe: str | Path, project_dir: str | Path, every: int = 1, timeout: float | None = None
) -> subprocess.CompletedProcess:
    """Run a compiled testbench; returncode 0 means every checked layer was bit-exact."""
    return subprocess.run(
        [str(Path(exe).resolve()), "--every", str(every), "--dir", str(Path(project_dir).resolve())],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
