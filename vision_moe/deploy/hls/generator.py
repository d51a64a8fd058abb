"""Write a Vitis HLS project (hls4ml-style layout) for a task-sparse M³ViT / Mod-Squad backbone and check it against
the reference.

Layout of ``out_dir``::

    firmware/<top>.cpp, <top>.h      top function (s_axilite control, m_axi data, debug switch)
    firmware/defines.h               ap_fixed typedefs and fraction widths
    firmware/parameters.h            dimensions, layer list, blob offsets, MoE descriptors
    firmware/tables.h                exp2 / reciprocal / rsqrt / GELU tables
    firmware/vmoe/*.h                the kernel library (copied from hls/include/vmoe)
    firmware/ap_types/               Apache-2.0 ap_int/ap_fixed headers for g++ (Vitis uses its own)
    firmware/weights/weights.bin     weight_t blob (int16 raw, tile-major); weights8.bin (8-bit weights, tile-major),
                                     scales.bin (their per-channel scales, int32 raw), biases.bin (bias_t blob)
    <top>_test.cpp                   C-simulation testbench comparing every layer with tb_data/
    tb_data/                         input pixels and golden per-layer outputs per task (int32 raw)
    build_prj.tcl                    vitis_hls -f build_prj.tcl "csim=1 synth=1 cosim=0 export=0"
    Makefile                         g++ C-simulation (make csim, make csim OPT=-O0, make asan)
    link.cfg, host/host.cpp          v++ link configuration and XRT host program for the board
    project.json                     what was generated: tasks, types, layers, footprint, errors, performance
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .config import PARALLELISM, HLSConfig
from .fixed import to_float
from .ir import ModelSpec, UnsupportedModelError, extract
from .perf import EDGE_MOE_PUBLISHED, PerfReport, estimate
from .reference import QLinear, QuantModel, RefResult, image_to_pixels, layer_names, quantize_model, run_reference

__all__ = [
    "HLSProject",
    "export_hls",
    "builtin_images",
    "hls_root",
    "check_out_dir",
    "compile_csim",
    "run_csim",
    "read_counts",
]

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


def _pad(n: int, t: int) -> int:
    return -(-n // t) * t


@dataclass
class _Layout:
    w16: _Blob  # 16-bit weights (weight_t raw), tile-major
    w8: _Blob  # 8-bit weights, tile-major
    scales: _Blob  # per-output-channel scales of the 8-bit layers (scale_t raw)
    biases: _Blob  # biases, norms, position / task embeddings (bias_t raw)
    consts: dict[str, int]
    wrefs: dict[str, tuple[int, int, int, int]]  # PATCH_W, HEAD_W
    stem: list[dict]
    blocks: list[dict]
    moes: list[dict]  # in execution order (spec.moe_layers)

    @property
    def footprint(self) -> int:
        """Bytes of the four blobs."""
        return self.w16.size * 2 + self.w8.size + self.scales.size * 4 + self.biases.size * 2


def _layout(qm: QuantModel) -> _Layout:
    sp, t = qm.spec, qm.spec.tile
    lay = _Layout(_Blob(), _Blob(), _Blob(), _Blob(), {}, {}, [], [], [])
    bb = lay.biases

    def lin(q: QLinear) -> tuple[int, int, int, int]:
        if q.is8:
            return lay.w8.add(_tile_major(q.w, t)), bb.add(q.b), lay.scales.add(q.scale), 1
        return lay.w16.add(_tile_major(q.w, t)), bb.add(q.b), 0, 0

    none = (0, 0, 0, 0)
    if qm.patch_embed is not None:
        lay.wrefs["PATCH_W"] = lin(qm.patch_embed)
    for c, q in zip(sp.stem, qm.stem):
        w, b, _, _ = lin(q)
        lay.stem.append(
            dict(h=c.in_size[0], w=c.in_size[1], cin=c.c_in, ho=c.out_size[0], wo=c.out_size[1], cout=c.c_out,
                 stride=c.stride, relu=int(c.relu), lin=(w, b, 0, 0), name=c.name)
        )  # fmt: skip
    lay.consts["CLS_POS_B"] = bb.add(qm.cls_pos)
    lay.consts["POS_B"] = bb.add(qm.pos)

    def moe(qmoe) -> int:
        m = qmoe.spec
        d = dict(
            num_experts=m.num_experts,
            top_k=m.top_k,
            renorm=int(m.renormalize),
            hidden=m.hidden,
            is8=int(qmoe.experts[0][0].is8) if qmoe.experts else 0,
            gate_w=[],
            gate_b=[],
            mask=[],
            w=[],
            b=[],
            s=[],
            orig=list(m.expert_ids),
            w1_size=sp.dim * _pad(m.hidden, t),
            w_size=sp.dim * _pad(m.hidden, t) + m.hidden * _pad(sp.dim, t),
            b_size=m.hidden + sp.dim,
        )
        for glin, mask in qmoe.gates:
            d["gate_w"].append(lay.w16.add(_tile_major(glin.w, t)))
            d["gate_b"].append(bb.add(glin.b))
            d["mask"].append([bool(v) for v in mask])
        for f1, f2 in qmoe.experts:  # first-layer tiles then second-layer tiles: one burst per expert
            blob = lay.w8 if d["is8"] else lay.w16
            d["w"].append(blob.add(np.concatenate([_tile_major(f1.w, t), _tile_major(f2.w, t)])))
            d["b"].append(bb.add(np.concatenate([f1.b, f2.b])))
            d["s"].append(lay.scales.add(np.concatenate([f1.scale, f2.scale])) if d["is8"] else 0)
        lay.moes.append(d)
        return len(lay.moes) - 1

    for b, qb in zip(sp.blocks, qm.blocks):
        d = dict(
            ln1_g=bb.add(qb["ln1"][0]),
            ln1_b=bb.add(qb["ln1"][1]),
            qkv=none,
            proj=none,
            kv=none,
            eheads=b.expert_heads,
            ln2_g=0,
            ln2_b=0,
            fc1=none,
            fc2=none,
            amoe=-1,
            moe=-1,
            temb=[bb.add(v) for v in qb["task_embed"]] if "task_embed" in qb else [-1] * len(sp.tasks),
        )
        if b.attn_is_moe:
            d["kv"] = lin(qb["kv"])
            d["amoe"] = moe(qb["attn_moe"])
        else:
            d["qkv"], d["proj"] = lin(qb["qkv"]), lin(qb["proj"])
        d["ln2_g"], d["ln2_b"] = bb.add(qb["ln2"][0]), bb.add(qb["ln2"][1])
        if b.is_moe:
            d["moe"] = moe(qb["mlp_moe"])
        else:
            d["fc1"], d["fc2"] = lin(qb["fc1"]), lin(qb["fc2"])
        lay.blocks.append(d)
    lay.consts["NORM_G"], lay.consts["NORM_B"] = bb.add(qm.norm[0]), bb.add(qm.norm[1])
    lay.wrefs["HEAD_W"] = lin(qm.head) if qm.head is not None else none
    if qm.patch_embed is None:
        lay.wrefs["PATCH_W"] = none
    return lay


def footprint_bytes(qm: QuantModel) -> int:
    """Bytes of the weight, scale and bias blobs of a quantised model."""
    return _layout(qm).footprint


# ---------------------------------------------------------------------------------------------- C++ text
def _c_array(name: str, ctype: str, values, per_line: int = 12) -> str:
    vals = [str(int(v)) for v in values]
    lines = [", ".join(vals[i : i + per_line]) for i in range(0, len(vals), per_line)]
    return f"static const {ctype} {name}[{len(vals)}] = {{\n    " + ",\n    ".join(lines) + "\n};\n"


def _defines(cfg: HLSConfig) -> str:
    a, w, b, p, s = cfg.act, cfg.weight, cfg.bias, cfg.pixel, cfg.scale
    return f"""// Fixed-point types (generated). Quantisation AP_TRN, overflow AP_WRAP (ap_fixed defaults) throughout;
// the NumPy reference (vision_moe/deploy/hls/reference.py) reproduces exactly these semantics.
#ifndef VMOE_DEFINES_H
#define VMOE_DEFINES_H

#include <ap_fixed.h>
#include <ap_int.h>

typedef {a.cpp()} act_t;      // activations
typedef {w.cpp()} weight_t;   // linear weights (8-bit weights are widened to this type on chip)
typedef ap_int<8> w8_t;               // 8-bit weights (per-output-channel scale)
typedef {s.cpp()} scale_t;    // per-output-channel scale of the 8-bit weights
typedef {b.cpp()} bias_t;     // biases, LayerNorm gamma/beta, position and task embeddings
typedef {p.cpp()} pixel_t;    // input pixels: raw byte / 256
typedef {cfg.exp_type.cpp()} exp_t;       // exp() outputs
typedef {cfg.rstd_type.cpp()} rstd_t;     // LayerNorm 1/sqrt(var + eps)
typedef {cfg.sq_type.cpp()} sq_t;         // squared deviations
typedef {cfg.var_type.cpp()} var_t;       // variance
typedef ap_ufixed<{cfg.inv_bits}, 0> inv_t;            // 1/C

static const int F_A = {a.frac}, F_W = {w.frac}, F_B = {b.frac}, F_P = {p.frac}, F_S = {s.frac};
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


def _sizes(sp: ModelSpec, cfg: HLSConfig) -> dict[str, int]:
    """Buffer dimensions the kernels are compiled with (shared by parameters.h and the performance model)."""
    moes = sp.moe_layers
    attn_moes = [m for m in moes if m.kind == "attn"]
    mlp_moes = [m for m in moes if m.kind == "mlp"]
    classes = sp.head.w.shape[1] if sp.head is not None else 0
    dense_attn = any(not b.attn_is_moe for b in sp.blocks)
    big = max(
        [sp.dim, sp.hidden, sp.num_experts, classes]
        + ([3 * sp.dim] if dense_attn else [])
        + [2 * m.hidden + sp.dim for m in attn_moes]
    )
    ks = [sp.dim, sp.hidden] + [m.hidden for m in moes] + [9 * c.c_in for c in sp.stem]
    if sp.patch_embed is not None:
        ks.append(3 * sp.patch**2)
    os_ = [big, max((m.hidden for m in moes), default=0)] + [c.c_out for c in sp.stem]
    out = dict(
        BIG_WIDTH=big,
        MAX_K=max(ks),
        MAX_O=_pad(max(os_), sp.tile),
        EXPERT_HIDDEN=max((m.hidden for m in mlp_moes), default=1),
        MAX_TOP_K=max(sp.top_k, 1),
        MAX_EXPERT_W=max(
            (sp.dim * _pad(m.hidden, sp.tile) + m.hidden * _pad(sp.dim, sp.tile) for m in moes), default=1
        ),
        MAX_EXPERT_B=max((m.hidden + sp.dim for m in moes), default=1),
    )
    if sp.stem:
        out.update(
            STEM_MAX_W=max(c.in_size[1] for c in sp.stem),
            STEM_MAX_C=max(c.c_in for c in sp.stem),
            STEM_MAX_WO=max(c.out_size[1] for c in sp.stem),
            STEM_MAX_K=max(9 * c.c_in for c in sp.stem),
            MAX_FMAP=max(
                [sp.img_size[0] * sp.img_size[1] * 3] + [c.out_size[0] * c.out_size[1] * c.c_out for c in sp.stem[:-1]]
            ),
        )
    return out


def _parameters(qm: QuantModel, lay: _Layout, names: list[str], sizes: list[int], cfg: HLSConfig) -> str:
    sp = qm.spec
    n_moe = len(lay.moes)
    max_e = max(sp.num_experts, 1)
    n_t = len(sp.tasks)
    dims = _sizes(sp, cfg)
    w16, w8, sc, bb = lay.w16.size, lay.w8.size, lay.scales.size, lay.biases.size
    lines = [
        "// Dimensions, layer list, blob offsets (in elements) and layer descriptors (generated).",
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
        f"#define MAX_EXPERTS {max_e}",
        f"#define NUM_CLASSES {sp.head.w.shape[1] if sp.head is not None else 0}",
        f"#define NUM_TASKS {n_t}",
        f"#define NUM_BLOCKS {len(sp.blocks)}",
        f"#define NUM_MOE {n_moe}",
        f"#define NUM_STEM {len(sp.stem)}",
        f"#define NUM_LAYERS {len(names)}",
        f"#define MAX_LAYER_SIZE {max(sizes)}",
        *[f"#define {k} {v}" for k, v in dims.items()],
        "",
        "// parallelism (the performance model, vision_moe/deploy/hls/perf.py, reads the same values)",
        f"#define TILE {sp.tile}",
        f"#define PAR_IN {cfg.par_in}",
        f"#define OUT_PAR {cfg.out_par}",
        f"#define ATTN_ROWS {cfg.attn_rows}",
        f"#define ATTN_LANES {cfg.attn_lanes}",
        f"#define VEC_PAR {cfg.vec_par}",
        f"#define AXI_BITS {cfg.axi}",
        f"#define LOAD16_PAR {cfg.load_par(16)}",
        f"#define LOAD8_PAR {cfg.load_par(8)}",
        f"#define LOAD32_PAR {cfg.load_par(32)}",
        "",
        "// blobs (a blob with no content still has one element: C arrays cannot be empty)",
        f"#define WEIGHTS_FILE_SIZE {w16}",
        f"#define WEIGHTS_SIZE {max(w16, 1)}",
        f"#define WEIGHTS8_FILE_SIZE {w8}",
        f"#define WEIGHTS8_SIZE {max(w8, 1)}",
        f"#define SCALES_FILE_SIZE {sc}",
        f"#define SCALES_SIZE {max(sc, 1)}",
        f"#define BIASES_FILE_SIZE {bb}",
        f"#define BIASES_SIZE {max(bb, 1)}",
        f"static const long long INV_DIM_RAW = {qm.inv_dim}LL;  // 1/{sp.dim} as inv_t",
        f"static const long long LN_EPS_RAW = {qm.eps}LL;  // {sp.ln_eps:g} as var_t",
        "",
        "// one linear layer: weights at w (in wts, or in wts8 when is8), biases at b, per-channel scales at s",
        "struct wref {",
        "    int w, b, s, is8;",
        "};",
        "",
    ]
    lines += [f"static const int {k} = {v};" for k, v in lay.consts.items()]
    lines += [f"static const wref {k} = {{{', '.join(map(str, v))}}};" for k, v in lay.wrefs.items()]
    if qm.stem_norm is not None:
        a, b = qm.stem_norm
        lines += [
            f"static const long long STEM_A_RAW[3] = {{{', '.join(f'{int(v)}LL' for v in a)}}};  // 256 / (255 std)",
            f"static const long long STEM_B_RAW[3] = {{{', '.join(f'{int(v)}LL' for v in b)}}};  // -mean / std",
        ]
    lines += [
        "",
        "static const char *const TASK_NAMES[NUM_TASKS] = {" + ", ".join(f'"{t}"' for t in sp.tasks) + "};",
        "static const char *const LAYER_NAMES[NUM_LAYERS] = {",
        *[f'    "{n}",' for n in names],
        "};",
        "static const int LAYER_SIZES[NUM_LAYERS] = {" + ", ".join(map(str, sizes)) + "};",
        "",
        "// stem convolutions (3x3, padding 1): input h x w x cin -> output ho x wo x cout",
        "struct conv_desc {",
        "    int h, w, cin, ho, wo, cout, stride, relu;",
        "    wref lin;",
        "};",
    ]
    wr = lambda v: "{" + ", ".join(map(str, v)) + "}"  # noqa: E731
    if lay.stem:
        lines.append("static const conv_desc STEM[NUM_STEM] = {")
        for d in lay.stem:
            vals = [d[k] for k in ("h", "w", "cin", "ho", "wo", "cout", "stride", "relu")]
            lines.append(f"    {{{', '.join(map(str, vals))}, {wr(d['lin'])}}},  // {d['name']}")
        lines.append("};")
    lines += [
        "",
        "struct blk_desc {",
        "    int ln1_g, ln1_b;",
        "    wref qkv, proj;  // dense attention",
        "    wref kv;         // MoE attention: shared key/value projection",
        "    int eheads;      // MoE attention: heads per expert",
        "    int ln2_g, ln2_b;",
        "    wref fc1, fc2;   // dense MLP",
        "    int amoe, moe;   // MoE attention / MoE MLP: index into MOE, -1 for dense",
        "    int temb[NUM_TASKS];  // Mod-Squad task embedding of each task (bias offset), -1 for none",
        "};",
        "static const blk_desc BLOCKS[NUM_BLOCKS] = {",
    ]
    for b, d in zip(sp.blocks, lay.blocks):
        lines.append(
            f"    {{{d['ln1_g']}, {d['ln1_b']}, {wr(d['qkv'])}, {wr(d['proj'])}, {wr(d['kv'])}, {d['eheads']}, "
            f"{d['ln2_g']}, {d['ln2_b']}, {wr(d['fc1'])}, {wr(d['fc2'])}, {d['amoe']}, {d['moe']}, "
            f"{wr(d['temb'])}}},  // blocks.{b.index}"
        )
    lines += [
        "};",
        "",
        "struct moe_desc {",
        "    int num_experts;  // experts held for this layer (reachable by the tasks)",
        "    int top_k, renorm;",
        "    int hidden;  // expert hidden width (MLP) or inner width expert_heads x head_dim (attention)",
        "    int is8;     // 8-bit expert weights (in wts8) with per-channel scales",
        "    int gate_w[NUM_TASKS], gate_b[NUM_TASKS];",
        "    bool mask[NUM_TASKS][MAX_EXPERTS];  // experts each task may use",
        "    int w[MAX_EXPERTS], b[MAX_EXPERTS], s[MAX_EXPERTS];  // expert blobs: first then second layer",
        "    int orig[MAX_EXPERTS];  // index of the expert in the full model",
        "    int w1_size, w_size, b_size;  // first-layer weights, all weights, all biases of one expert",
        "};",
        f"static const moe_desc MOE[{max(n_moe, 1)}] = {{",
    ]
    for m, ms in zip(lay.moes, sp.moe_layers):
        pad = lambda v, fill=0: list(v) + [fill] * (max_e - len(v))  # noqa: E731
        mask = "{" + ", ".join(wr(["true" if x else "false" for x in pad(mk, False)]) for mk in m["mask"]) + "}"
        lines.append(
            f"    {{{m['num_experts']}, {m['top_k']}, {m['renorm']}, {m['hidden']}, {m['is8']}, {wr(m['gate_w'])}, "
            f"{wr(m['gate_b'])}, {mask}, {wr(pad(m['w']))}, {wr(pad(m['b']))}, {wr(pad(m['s']))}, "
            f"{wr(pad(m['orig'], -1))}, {m['w1_size']}, {m['w_size']}, {m['b_size']}}},  // {ms.kind}"
        )
    if not n_moe:
        zeros = wr([0] * n_t)
        lines.append(f"    {{0, 1, 0, 1, 0, {zeros}, {zeros}, {{}}, {{0}}, {{0}}, {{0}}, {{-1}}, 0, 0, 0}},")
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
# what an export writes into its folder (besides the C-simulation executables), removed by overwrite=True
_GENERATED = ("firmware", "tb_data", "host", "build_prj.tcl", "Makefile", "link.cfg", "README.md", "project.json")


def _generated_paths(out: Path, top: str) -> list[Path]:
    names = list(_GENERATED) + [f"{top}_test.cpp", f"{top}_csim", f"{top}_asan", "counts.txt"]
    return [out / n for n in names] + sorted(out.glob("tb_*"))


def check_out_dir(out_dir: str | Path, overwrite: bool = False, flag: str = "out_dir") -> Path:
    """The project folder: new, or empty, or (``overwrite``) one to refill. One-line ValueError otherwise."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{flag} {out}: is a file; expected a folder for the HLS project (new or empty)")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        n = len(list(out.iterdir()))
        raise ValueError(
            f"{flag} {out}: not empty ({n} entries); expected a new or empty folder, or --overwrite to replace "
            "the files a previous export wrote there"
        )
    return out


@dataclass
class HLSProject:
    """What :func:`export_hls` wrote and measured."""

    out_dir: Path
    top: str
    spec: ModelSpec
    qmodel: QuantModel
    layer_names: list[str]
    references: dict[str, RefResult]  # per task, on the test image
    footprint: int  # bytes of this project's weight + scale + bias blobs
    footprint_full: int  # the same for the full model (all tasks, all experts, 16-bit weights)
    perf: PerfReport
    accuracy: dict = field(default_factory=dict)
    comparison: str | None = None  # side-by-side with Edge-MoE's design (compare_edge_moe=True)

    @property
    def output_name(self) -> str:
        sp = self.spec
        if sp.head is not None:
            return f"{sp.head.w.shape[1]} logits of the model's own classifier 'head' (shared by every task)"
        return f"final tokens ({sp.num_tokens} x {sp.dim}, the backbone output; the task heads run on the host)"

    def summary(self) -> str:
        sp = self.spec
        stem = f"conv stem {len(sp.stem)} stages" if sp.stem else f"patch {sp.patch}"
        lines = [
            f"HLS project {self.out_dir} (top {self.top}) for tasks {list(sp.tasks)}: {sp.name}, "
            f"{sp.img_size[0]}x{sp.img_size[1]}, {stem}, dim {sp.dim}, depth {len(sp.blocks)}, "
            f"{sp.heads} heads, tile {sp.tile}",
            f"output: {self.output_name}",
        ]
        for b in sp.blocks:
            for m in b.moes:
                where = "attn" if m.kind == "attn" else "mlp"
                lines.append(
                    f"  blocks.{b.index}.{where}: experts kept {m.expert_ids} of {m.num_experts_full}"
                    + (" (8-bit weights)" if self.qmodel.cfg.is8("expert") else "")
                )
        lines.append(
            f"weight footprint: {self.footprint:,} B for this project vs {self.footprint_full:,} B for the full "
            f"model ({100 * self.footprint / max(self.footprint_full, 1):.1f}%)"
        )
        for t, acc in self.accuracy.items():
            lines.append(
                f"fixed point vs PyTorch float, task {t}, {acc['output']}: MSE {acc['mse']:.3e}, max abs error "
                f"{acc['max_abs']:.3e}, {acc['metric_name']} {acc['metric']:.3f} on {acc['images']} images"
            )
        sat = {k: v for r in self.references.values() for k, v in r.log.nonzero().items()}
        sat.update(self.qmodel.log.nonzero())
        if sat:
            lines.append("fixed-point overflow (values wrapped or saturated) per tensor:")
            lines += [f"  {k}: {v}" for k, v in sorted(sat.items())]
        else:
            lines.append("fixed-point overflow: none (no tensor wrapped or saturated)")
        lines.append("performance model (analytical, no synthesis run):")
        lines.append(self.perf.table())
        if self.comparison:
            lines.append("side by side with Edge-MoE's design on this configuration (analytical, no synthesis run):")
            lines.append(self.comparison)
        lines.append("Edge-MoE published: " + "; ".join(f"{k}: {v}" for k, v in EDGE_MOE_PUBLISHED.items()))
        return "\n".join(lines)


def _accuracy(model: nn.Module, qm: QuantModel, tasks: tuple[str, ...], images: list[tuple[str, np.ndarray]]) -> dict:
    """Fixed point vs float on ``images``, named after what the output is: a classifier head's logits (top-1
    agreement) or the backbone's tokens (cosine similarity) - never a task metric the output does not carry."""
    sp, fa = qm.spec, qm.cfg.act.frac
    res = {}
    for t in tasks:
        se, mx, n, agree = 0.0, 0.0, 0, 0.0
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
            output="classifier-head logits" if sp.head is not None else "backbone tokens",
            metric_name="classifier-head top-1 agreement" if sp.head is not None else "cosine similarity",
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
    overwrite: bool = False,
    compare_edge_moe: bool = False,
) -> HLSProject:
    """Generate the HLS project for ``tasks`` of ``model`` (an M³ViT or Mod-Squad backbone) into ``out_dir``.

    One task: the project holds ``model.specialize(task)`` (that task's gate, only the experts it can reach).
    Several tasks (or ``'all'``): every listed task's gate and the union of their experts; ``task`` selects at run time.
    ``mean``/``std``: input normalisation (default: the model's pretrained_cfg, else 0.5). ``out_dir`` must be new or
    empty unless ``overwrite`` (which replaces what a previous export wrote). Everything is checked and computed
    before the first file is written. ``compare_edge_moe``: also model Edge-MoE's design on this configuration.
    """
    from ...models.moe_vit import MoEVisionTransformer
    from .perf import compare_table, estimate_edge_moe

    cfg = cfg or HLSConfig()
    out = check_out_dir(out_dir, overwrite)
    if not isinstance(model, MoEVisionTransformer):
        raise UnsupportedModelError(
            f"unsupported model {type(model).__name__}; the HLS kernels run MoEVisionTransformer"
        )
    if img_size is not None and (
        len(tuple(img_size)) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in img_size)
    ):
        raise ValueError(f"img_size must be two positive integers (H, W), got {img_size!r}")
    if isinstance(num_eval_images, bool) or not isinstance(num_eval_images, int) or num_eval_images < 0:
        raise ValueError(f"num_eval_images must be an integer >= 0, got {num_eval_images!r}")
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
        for m, layer in zip(spec.moe_layers, layers):
            m.expert_ids = layer.router.reachable_experts(tasks[0]).tolist()
    qm = quantize_model(spec, cfg)
    full_cfg = dataclasses.replace(cfg, weight8="none")
    full_spec = extract(
        model, tuple(model.tasks), full_cfg, img_size=img_size, name=name, all_experts=True, mean=mean, std=std
    )
    footprint_full = footprint_bytes(quantize_model(full_spec, full_cfg))
    for m, mf in zip(spec.moe_layers, full_spec.moe_layers):
        m.num_experts_full = mf.num_experts_full
    lay = _layout(qm)
    names = layer_names(spec)

    images = builtin_images(spec.img_size, max(1, num_eval_images))
    tb_img = images[0][1]
    pixels = image_to_pixels(tb_img)
    refs = {t: run_reference(qm, pixels, t) for t in tasks}
    if list(refs[tasks[0]].layers) != names:
        raise RuntimeError("internal error: the reference's layers differ from the layer list")
    sizes = [int(v.size) for v in refs[tasks[0]].layers.values()]
    perf = estimate(spec, cfg, refs[tasks[0]].queues)
    comparison = None
    if compare_edge_moe:
        edge = estimate_edge_moe(spec, refs[tasks[0]].queues)
        extra = None
        if cfg.weight8 == "none":
            extra = estimate(spec, dataclasses.replace(cfg, weight8="experts"), refs[tasks[0]].queues)
        comparison = compare_table(perf, edge, extra, "8-bit experts")
    acc = _accuracy(model, qm, tasks, images[:num_eval_images]) if num_eval_images else {}
    texts = _project_files(qm, lay, names, sizes, cfg, spec, len(tasks))

    # ---- everything is computed: write
    if out.is_dir():
        for p in _generated_paths(out, cfg.top):
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    fw = out / "firmware"
    (fw / "weights").mkdir(parents=True)
    root = hls_root()
    shutil.copytree(root / "include" / "vmoe", fw / "vmoe")
    shutil.copytree(root / "third_party" / "ap_types", fw / "ap_types")
    for rel, text in texts.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text(text)
    lay.w16.array().astype("<i2").tofile(fw / "weights" / "weights.bin")
    lay.w8.array().astype("<i1").tofile(fw / "weights" / "weights8.bin")
    lay.scales.array().astype("<i4").tofile(fw / "weights" / "scales.bin")
    lay.biases.array().astype("<i2").tofile(fw / "weights" / "biases.bin")
    tb = out / "tb_data"
    tb.mkdir()
    pixels.astype(np.uint8).tofile(tb / "input_pixels.bin")
    for t, r in refs.items():
        (tb / t).mkdir()
        with open(tb / t / "layers.txt", "w") as f:
            for i, (n, v) in enumerate(r.layers.items()):
                v.astype("<i4").tofile(tb / t / f"layer{i:03d}.bin")
                f.write(f"{i} {n} {v.size}\n")
    proj = HLSProject(out, cfg.top, spec, qm, names, refs, lay.footprint, footprint_full, perf, acc, comparison)
    b = cfg.board_info
    meta = dict(
        model=name,
        tasks=list(tasks),
        board=b.name,
        part=b.part,
        clock_mhz=cfg.clock,
        top=cfg.top,
        output=proj.output_name,
        types=dict(
            act=str(cfg.act), weight=str(cfg.weight), bias=str(cfg.bias), pixel=str(cfg.pixel), scale=str(cfg.scale)
        ),
        weight8=cfg.weight8,
        parallelism={k: getattr(cfg, k) for k in PARALLELISM} | dict(tile=spec.tile, axi_bits=cfg.axi),
        layers=names,
        layer_sizes=sizes,
        experts={f"blocks.{x.index}.{m.kind}": m.expert_ids for x in spec.blocks for m in x.moes},
        footprint_bytes=proj.footprint,
        footprint_full_bytes=footprint_full,
        accuracy=acc,
        overflow={t: r.log.nonzero() for t, r in refs.items()},
        parameter_saturation=qm.log.nonzero(),
        perf=dict(
            cycles=perf.cycles,
            latency_ms=perf.latency_ms,
            dsp=perf.dsp_total,
            bram18k=perf.bram18k,
            weight_bytes_per_frame=perf.weight_bytes,
            layers=[dict(name=x.name, cycles=x.cycles, counts=x.counts) for x in perf.layers],
        ),
        edge_moe_comparison=comparison,
        test_image=images[0][0],
    )
    (out / "project.json").write_text(json.dumps(meta, indent=1))
    _logger.info("wrote HLS project %s", out)
    return proj


def _project_files(
    qm: QuantModel, lay: _Layout, names: list[str], sizes: list[int], cfg: HLSConfig, spec: ModelSpec, n_tasks: int
) -> dict[str, str]:
    """The text files of the project (relative path -> content)."""
    root = hls_root()
    top = cfg.top
    b = cfg.board_info
    kw = dict(
        TOP=top,
        TOP_UPPER=top.upper(),
        PART=b.part,
        PERIOD=f"{1000.0 / cfg.clock:.3f}",
        CLOCK_HZ=int(cfg.clock * 1e6),
        PLATFORM=cfg.platform or b.platform,
        BOARD=b.name,
        IMG_SIZE=3 * spec.img_size[0] * spec.img_size[1],
        OUT_SIZE=max(sizes),
        NUM_TASKS=n_tasks,
    )
    files = {
        "firmware/defines.h": _defines(cfg),
        "firmware/parameters.h": _parameters(qm, lay, names, sizes, cfg),
        "firmware/tables.h": _tables(qm),
        f"firmware/{top}.cpp": _render((root / "src" / "top.cpp.in").read_text(), **kw),
        f"firmware/{top}.h": _render((root / "src" / "top.h.in").read_text(), **kw),
        f"{top}_test.cpp": _render((root / "src" / "test.cpp.in").read_text(), **kw),
    }
    for tpl, dst in [
        ("build_prj.tcl.in", "build_prj.tcl"),
        ("Makefile.in", "Makefile"),
        ("link.cfg.in", "link.cfg"),
        ("host.cpp.in", "host/host.cpp"),
        ("README.md.in", "README.md"),
    ]:
        files[dst] = _render((root / "templates" / tpl).read_text(), **kw)
    return files


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
    exe: str | Path,
    project_dir: str | Path,
    every: int = 0,
    timeout: float | None = None,
    counts: str | Path | None = None,
) -> subprocess.CompletedProcess:
    """Run a compiled testbench: every layer through the checkpoint hook in one run, and the debug switch on every
    ``every``-th layer (0: the last layer only); returncode 0 means every checked output was bit-exact.
    ``counts``: write the pipelined-loop iteration counts of every layer there (see :func:`read_counts`)."""
    cmd = [str(Path(exe).resolve()), "--every", str(every), "--dir", str(Path(project_dir).resolve())]
    if counts is not None:
        cmd += ["--counts", str(Path(counts).resolve())]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def read_counts(path: str | Path) -> dict[tuple[int, int], dict[str, int]]:
    """The testbench's --counts file: (task index, layer index) -> iterations per kind (perf.COUNT_KINDS)."""
    lines = Path(path).read_text().split("\n")
    kinds = lines[0].split()[2:]
    out = {}
    for line in lines[1:]:
        if line.strip():
            v = [int(x) for x in line.split()]
            out[(v[0], v[1])] = dict(zip(kinds, v[2:]))
    return out
