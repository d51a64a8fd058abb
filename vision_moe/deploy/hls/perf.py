"""Analytical performance model of the generated kernels and of Edge-MoE's design: cycles, DSP, BRAM, weight bytes.

No synthesis was run: these are estimates from the loop structure, stated with their assumptions.

**This generator** (``hls/include/vmoe``): every time-consuming loop is pipelined at II=1 and counts its iterations
in C-simulation (``VMOE_COUNT``), per kind: ``mac`` (linear unit, ceil(K / PAR_IN) per row and tile), ``out``
(epilogue, ceil(valid / OUT_PAR) per row and tile, overlapped with the next row's MACs: a tile of R rows takes
(R + 1) x max of the two), ``load`` (DRAM beats of weights, biases and scales:
AXI_BITS / bits per beat), ``attn`` (attention: per block of ATTN_ROWS queries and head, ceil(D / ATTN_LANES) for
the queries, (N + 1) x ceil(D / ATTN_LANES) for the keys, ceil(D / ATTN_LANES) for the output), ``vec``
(LayerNorm and element-wise loops, VEC_PAR values per cycle), ``route`` (gate: 2 E + (2 + renorm) k per token).
:func:`estimate` predicts exactly those counts per layer from the parameters the kernels are compiled with (a test
compares them with the C-simulation's), and turns them into cycles with these assumptions:

- a weight tile's (or an expert's) load runs concurrently with the previous tile's (expert's) compute: the
  explicit ping-pong buffers are disjoint, so Vitis HLS may schedule the two calls in parallel; the first load of
  a layer is exposed; each DRAM burst costs ``AXI_LATENCY`` cycles before its beats;
- pipeline fill: ``TILE_FILL`` cycles per tile of the linear unit, ``LN_ROW_FILL`` per LayerNorm
  row (three loops and the 1/sqrt), ``HEAD_FILL`` per attention block and head, ``ROUTE_FILL`` per token of a
  gate, ``VEC_FILL`` per element-wise loop;
- the attention key loop needs ``SOFTMAX_LATENCY`` cycles between keys (compare, exp, rescale), so a key costs
  max(ceil(D / ATTN_LANES), SOFTMAX_LATENCY) cycles;
- MoE costs use the routing of the reference run (tokens per expert).

**Edge-MoE** (Sarkar et al., ICCAD 2023; github.com/sharc-lab/Edge-MoE ``include/hardware.hpp``, ``src/*.cpp``):
:func:`estimate_edge_moe` counts the pipelined iterations of its loops: one 16 x 16 linear unit
(LINEAR_IN_SIZE = LINEAR_OUT_SIZE = 2 x 256 / 32) that streams activations from DRAM in 8-value blocks
(``compute_linear``: length x ceil(O / 16) x ceil(K / 16)); weights loaded 16 per 256-bit beat into ping/pong
buffers before each linear (``load_linear_weights``: O x ceil(K / 16)); attention as two dataflow passes, Q K^T
then softmax x V, 4 query rows x 8 dims per cycle (``ATTN_MATMUL_PARALLEL``; ceil((N + 3) / 4) x N x C / 8 each);
LayerNorm 8 values per cycle, two passes per token; residual adds N x C / 8; gate per token: C / 8 + 3 E (softmax
II = 3) + E (top-k) cycles; experts expert by expert with their weights loaded once (fc1, fc2) while the previous
computation runs. Assumptions beyond the code: each weight load overlaps the operation just before it in program
order (the ping/pong alternation allows it; this favours Edge-MoE), the same ``AXI_LATENCY`` per burst, the same
fills per token as above where its loops are not flattened; its hls_math cores (exp, recip, sqrt) count 0 DSP
(which favours Edge-MoE in the DSP column).

DSP per multiplier (DSP48E2, 27 x 18): 32 x 16 bits 2, 32 x 32 bits 4, 8 x 16 bits 1, 64 x 24 bits 6.
BRAM18K per array: ceil(width / 36) x ceil(depth / 512) (reshaped to the width read per cycle), 0 below 1 Kbit.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from .config import HLSConfig
from .ir import ConvSpec, ModelSpec, MoESpec

__all__ = [
    "LayerPerf",
    "PerfReport",
    "estimate",
    "estimate_edge_moe",
    "compare_table",
    "EDGE_MOE_PUBLISHED",
    "COUNT_KINDS",
    "KIND_LABELS",
]

AXI_LATENCY = 64  # cycles before the first beat of a DRAM burst (the m_axi latency build_prj.tcl configures)
TILE_FILL = 12  # per tile of the linear unit (one flattened pipelined loop): MACs, then the epilogue (GELU, scale)
LN_ROW_FILL = 20  # per LayerNorm row: three loop fills and the 1/sqrt
HEAD_FILL = 16  # per attention block and head: loop fills and the reciprocal
SOFTMAX_LATENCY = 8  # cycles from a key's last score to the next key's output update (compare, exp, rescale)
ROUTE_FILL = 24  # per token of a gate: loop fills, exp and reciprocal
VEC_FILL = 3  # per element-wise loop
COUNT_KINDS = ("mac", "out", "load", "attn", "vec", "route")  # the C-simulation's counters, in its order
KIND_LABELS = {
    "embed": "patch embedding / stem, position",
    "norm": "LayerNorm (+ residual adds, task embedding)",
    "attn_linear": "attention projections (QKV, proj)",
    "attention": "attention (scores, softmax, x V)",
    "mlp": "dense MLP",
    "moe_gate": "MoE gate and routing",
    "moe_experts": "MoE experts (loads + compute)",
    "head": "classifier head",
}
# Published facts about Edge-MoE (Sarkar et al., ICCAD 2023, arXiv:2305.18691), shown beside the model's figures:
# the paper's abstract and the authors' repository (github.com/sharc-lab/Edge-MoE, prebuilt ZCU102 bitstream).
EDGE_MOE_PUBLISHED = {
    "board": "AMD/Xilinx ZCU102 (prebuilt bitstream in the authors' repository)",
    "energy efficiency": "2.24x vs GPU, 4.90x vs CPU (paper abstract)",
}


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pad(n: int, t: int) -> int:
    return _cdiv(n, t) * t


def _bram(depth: int, width: int, parts: int = 1) -> int:
    """BRAM18K blocks of an array of ``depth`` words of ``width`` bits, split in ``parts`` partitions."""
    d = _cdiv(depth, parts)
    if d * width < 1024:
        return 0  # LUTRAM / registers
    return parts * _cdiv(width, 36) * _cdiv(d, 512) if width >= 36 else parts * _cdiv(d * width, 18432)


@dataclass
class LayerPerf:
    name: str
    cycles: int
    macs: int
    weight_bytes: int  # DRAM weight / bias / scale traffic of this layer
    counts: dict[str, int] = field(default_factory=dict)  # pipelined-loop iterations per kind (COUNT_KINDS)
    parts: dict[str, int] = field(default_factory=dict)  # cycles per kind of work (KIND_LABELS)


@dataclass
class PerfReport:
    layers: list[LayerPerf]
    clock_mhz: float
    dsp: dict[str, int]  # per unit
    bram: dict[str, int]  # per array
    board: str
    board_dsp: int
    board_bram18k: int
    design: str = "this generator"
    notes: list[str] = field(default_factory=list)

    @property
    def cycles(self) -> int:
        return sum(layer.cycles for layer in self.layers)

    @property
    def latency_ms(self) -> float:
        return self.cycles / (self.clock_mhz * 1e3)

    @property
    def dsp_total(self) -> int:
        return sum(self.dsp.values())

    @property
    def bram18k(self) -> int:
        return sum(self.bram.values())

    @property
    def weight_bytes(self) -> int:
        return sum(x.weight_bytes for x in self.layers)

    def kind_cycles(self) -> dict[str, int]:
        out: Counter = Counter()
        for layer in self.layers:
            out.update(layer.parts)
        return {k: out[k] for k in KIND_LABELS if out.get(k)}

    def table(self) -> str:
        w = max(len(layer.name) for layer in self.layers)
        lines = [f"{'layer':<{w}}  {'cycles':>12}  {'MACs':>12}  {'weights':>10}"]
        for layer in self.layers:
            lines.append(f"{layer.name:<{w}}  {layer.cycles:>12,}  {layer.macs:>12,}  {layer.weight_bytes:>9,}B")
        lines.append(
            f"{'total':<{w}}  {self.cycles:>12,}  {sum(x.macs for x in self.layers):>12,}  {self.weight_bytes:>9,}B"
        )
        lines.append(
            f"latency {self.latency_ms:.3f} ms at {self.clock_mhz:g} MHz ({1e3 / self.latency_ms:.1f} frames/s)"
        )
        lines.append(
            f"DSP ~{self.dsp_total} of {self.board_dsp} ({100 * self.dsp_total / self.board_dsp:.0f}%), "
            f"BRAM18K ~{self.bram18k} of {self.board_bram18k} ({100 * self.bram18k / self.board_bram18k:.0f}%) "
            f"on {self.board}"
        )
        lines.extend(self.notes)
        return "\n".join(lines)


class _Cost:
    """Cycles, counted iterations, MACs and weight bytes of a piece of work (added up per layer)."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self.parts: Counter = Counter()
        self.macs = 0
        self.bytes = 0

    def add(self, other: _Cost) -> _Cost:
        self.counts.update(other.counts)
        self.parts.update(other.parts)
        self.macs += other.macs
        self.bytes += other.bytes
        return self

    @property
    def cycles(self) -> int:
        return sum(self.parts.values())

    def layer(self, name: str) -> LayerPerf:
        return LayerPerf(
            name,
            self.cycles,
            self.macs,
            self.bytes,
            {k: self.counts.get(k, 0) for k in COUNT_KINDS},
            dict(self.parts),
        )


def _pingpong(works: list[_Cost], loads: list[_Cost], kind: str) -> _Cost:
    """Work items that each need one load, the next one's load concurrent with the current work (explicit
    ping-pong buffers): the first load is exposed, then max(work i, load i + 1) per item. No loads: the sum."""
    total = _Cost()
    cyc = loads[0].cycles if loads else 0
    for i, work in enumerate(works):
        cyc += max(work.cycles, loads[i + 1].cycles if i + 1 < len(loads) else 0)
        total.add(work)
    for ld in loads:
        total.add(ld)
    total.parts = Counter({kind: cyc})
    return total


class _Design:
    """The loop counts of hls/include/vmoe for one model and configuration."""

    def __init__(self, spec: ModelSpec, cfg: HLSConfig) -> None:
        self.sp, self.cfg, self.t = spec, cfg, spec.tile
        self.lp16, self.lp8, self.lp32 = cfg.load_par(16), cfg.load_par(8), cfg.load_par(32)

    def vec(self, n: int, kind: str, entries: int = 1) -> _Cost:
        c = _Cost()
        it = _cdiv(n, self.cfg.vec_par) * entries
        c.counts["vec"] = it
        c.parts[kind] = it + VEC_FILL * entries
        return c

    def load_tile(self, k: int, valid: int, is8: bool) -> _Cost:
        c = _Cost()
        beats = _cdiv(k * self.t, self.lp8 if is8 else self.lp16) + _cdiv(valid, self.lp16)
        if is8:
            beats += _cdiv(valid, self.lp32)
        c.counts["load"] = beats
        c.bytes = k * self.t * (1 if is8 else 2) + valid * 2 + (valid * 4 if is8 else 0)
        c.parts["load"] = beats + AXI_LATENCY
        return c

    def compute_tile(self, rows: int, k: int, valid: int) -> _Cost:
        c = _Cost()
        ki, oi = _cdiv(k, self.cfg.par_in), _cdiv(valid, self.cfg.out_par)
        c.counts["mac"], c.counts["out"] = rows * ki, rows * oi
        c.parts["compute"] = (rows + 1) * max(ki, oi) + TILE_FILL if rows else 0
        c.macs = rows * k * valid
        return c

    def linear(self, rows: int, k: int, o: int, is8: bool, kind: str, onchip: bool = False) -> _Cost:
        """linear_unit: tiles loaded once (or on chip), the next load concurrent with the current compute."""
        if rows <= 0:
            return _Cost()
        t = self.t
        valids = [min(t, o - i * t) for i in range(_cdiv(o, t))]
        loads = [] if onchip else [self.load_tile(k, v, is8) for v in valids]
        return _pingpong([self.compute_tile(rows, k, v) for v in valids], loads, kind)

    def layernorm(self, rows: int) -> _Cost:
        c = _Cost()
        it = rows * 3 * _cdiv(self.sp.dim, self.cfg.vec_par)
        c.counts["vec"] = it
        c.parts["norm"] = it + rows * LN_ROW_FILL
        return c

    def attention(self, ntok: int, q_heads: int) -> _Cost:
        c = _Cost()
        ch = _cdiv(self.sp.head_dim, self.cfg.attn_lanes)
        blocks = _cdiv(ntok, self.cfg.attn_rows) * q_heads
        c.counts["attn"] = blocks * (ch * (ntok + 1) + 2 * ch)
        c.parts["attention"] = blocks * (2 * ch + (ntok + 1) * max(ch, SOFTMAX_LATENCY) + HEAD_FILL)
        c.macs = 2 * ntok * ntok * q_heads * self.sp.head_dim
        return c

    def route(self, ntok: int, m: MoESpec) -> _Cost:
        c = _Cost()
        per = 2 * m.num_experts + m.top_k * (2 + int(m.renormalize))
        c.counts["route"] = ntok * per
        c.parts["moe_gate"] = ntok * (per + ROUTE_FILL)
        return c

    def load_expert(self, m: MoESpec, part: int, is8: bool) -> _Cost:
        dim, t, h = self.sp.dim, self.t, m.hidden
        w1, wall = dim * _pad(h, t), dim * _pad(h, t) + h * _pad(dim, t)
        wn = {0: wall, 1: w1, 2: wall - w1}[part]
        bn = {0: h + dim, 1: h, 2: dim}[part]
        c = _Cost()
        beats = _cdiv(wn, self.lp8 if is8 else self.lp16) + _cdiv(bn, self.lp16) + (_cdiv(bn, self.lp32) if is8 else 0)
        c.counts["load"] = beats
        c.bytes = wn * (1 if is8 else 2) + bn * 2 + (bn * 4 if is8 else 0)
        c.parts["load"] = beats + AXI_LATENCY
        return c

    def expert_pass(self, m: MoESpec, part: int, queue: list[int]) -> _Cost:
        """Active experts in order, each loaded once, the next one's load concurrent with this one's compute."""
        dim, h = self.sp.dim, m.hidden
        is8 = self.cfg.is8("expert")
        active = [q for q in queue if q > 0]
        works = []
        for rows in active:
            comp = _Cost()
            if part in (0, 1):
                comp.add(self.linear(rows, dim, h, is8, "moe_experts", onchip=True))
            if part in (0, 2):
                comp.add(self.linear(rows, h, dim, is8, "moe_experts", onchip=True))
            works.append(comp)
        return _pingpong(works, [self.load_expert(m, part, is8) for _ in active], "moe_experts")

    def conv(self, cs: ConvSpec) -> _Cost:
        """A stem stage: per weight tile, the line buffer refilled, im2col and compute per output row."""
        t = self.t
        k = 9 * cs.c_in
        tiles = _cdiv(cs.c_out, t)
        (h, w), (ho, wo) = cs.in_size, cs.out_size
        vp = self.cfg.vec_par
        works = []
        for i in range(tiles):
            work = _Cost()
            valid = min(t, cs.c_out - i * t)
            work.counts["vec"] = h * _cdiv(w * cs.c_in, vp) + ho * _cdiv(wo * 9 * cs.c_in, vp)
            work.parts["embed"] = work.counts["vec"] + (h + ho) * VEC_FILL
            for _ in range(ho):
                work.add(self.compute_tile(wo, k, valid))
            works.append(work)
        loads = [self.load_tile(k, min(t, cs.c_out - i * t), False) for i in range(tiles)]
        return _pingpong(works, loads, "embed")


def estimate(spec: ModelSpec, cfg: HLSConfig, queues: list[list[int]] | None = None) -> PerfReport:
    """Per-layer cycles (one entry per checkpoint layer, ``layer_names`` order), DSP, BRAM and weight traffic of
    the generated design; ``queues`` (tokens per expert per MoE layer, from the reference) set the MoE costs."""
    from .reference import layer_names

    d = _Design(spec, cfg)
    n, c = spec.num_tokens, spec.dim
    names = iter(layer_names(spec))
    layers: list[LayerPerf] = []
    moe_i = 0

    def qsizes(m: MoESpec) -> list[int]:
        nonlocal moe_i
        q = (
            queues[moe_i]
            if queues is not None and moe_i < len(queues)
            else [n * m.top_k // m.num_experts] * m.num_experts
        )
        moe_i += 1
        return q

    def emit(cost: _Cost) -> None:
        layers.append(cost.layer(next(names)))

    if spec.stem:
        first = d.vec(spec.img_size[0] * spec.img_size[1], "embed")
        for i, cs in enumerate(spec.stem):
            cost = d.conv(cs)
            if i == 0:
                cost.add(first)
            if i < len(spec.stem) - 1:
                emit(cost)
            else:
                last = cost
        embed = last
    else:
        p = spec.patch
        embed = d.vec(p, "embed", entries=spec.grid[0] * spec.grid[1] * 3 * p)
        embed.add(d.linear(n - 1, 3 * p * p, c, False, "embed"))
    embed.add(d.vec(c, "embed")).add(d.vec((n - 1) * c, "embed"))
    emit(embed)
    dense8 = cfg.is8("dense")
    for b in spec.blocks:
        cost = d.layernorm(n)
        if b.task_embed is not None:
            cost.add(d.vec(n * c, "norm"))
        emit(cost)
        if b.attn_is_moe:
            m = b.attn_moe
            emit(d.linear(n, c, m.num_experts, False, "moe_gate"))
            q = qsizes(m)
            emit(d.route(n, m).add(d.linear(n, c, 2 * m.hidden, dense8, "attn_linear")))
            emit(d.expert_pass(m, 1, q))
            emit(d.attention(n, spec.heads))
            emit(d.vec(n * c, "moe_experts").add(d.expert_pass(m, 2, q)).add(d.vec(n * c, "moe_experts")))
        else:
            emit(d.linear(n, c, 3 * c, dense8, "attn_linear"))
            emit(d.attention(n, spec.heads))
            emit(d.linear(n, c, c, dense8, "attn_linear"))
        emit(d.layernorm(n))
        if b.is_moe:
            m = b.mlp_moe
            emit(d.linear(n, c, m.num_experts, False, "moe_gate"))
            q = qsizes(m)
            cost = d.route(n, m).add(d.vec(n * c, "moe_experts")).add(d.expert_pass(m, 0, q))
            emit(cost.add(d.vec(n * c, "moe_experts")))
        else:
            emit(d.linear(n, c, spec.hidden, dense8, "mlp"))
            emit(d.linear(n, spec.hidden, c, dense8, "mlp"))
    emit(d.layernorm(n))
    if spec.head is not None:
        emit(d.linear(1, c, spec.head.w.shape[1], dense8, "head"))
    bi = cfg.board_info
    notes = [
        f"parallelism: linear unit TILE={spec.tile} x PAR_IN={cfg.par_in} MACs, OUT_PAR={cfg.out_par}; attention "
        f"{cfg.attn_rows} rows x {cfg.attn_lanes} lanes; VEC_PAR={cfg.vec_par}; {cfg.axi}-bit weight beats"
        + (f"; 8-bit weights: {cfg.weight8}" if cfg.weight8 != "none" else "")
    ]
    return PerfReport(
        layers, cfg.clock, _dsp(spec, cfg), _bram_ours(spec, cfg), bi.name, bi.dsp, bi.bram18k, notes=notes
    )


def _dsp(spec: ModelSpec, cfg: HLSConfig) -> dict[str, int]:
    """DSP48E2 per unit of the generated design (multipliers the unrolled loops instantiate)."""
    lanes = cfg.attn_rows * cfg.attn_lanes
    out = {
        "linear unit (TILE x PAR_IN MACs, 32 x 16)": spec.tile * cfg.par_in * 2,
        "epilogue (OUT_PAR x gate score, GELU, 8-bit scale)": cfg.out_par * (4 + 2 + 6),
        "attention (rows x lanes x (q.k, rescale, p.v, 1/l))": lanes * 12 + cfg.attn_rows * 8,
        "LayerNorm (VEC_PAR lanes) and 1/sqrt": cfg.vec_par * 10 + 14,
        "gate softmax / top-k": 12,
    }
    if spec.stem:
        out["stem input normalisation"] = cfg.vec_par * 3 * 2
    return out


def _bram_ours(spec: ModelSpec, cfg: HLSConfig) -> dict[str, int]:
    from .generator import _sizes

    s = _sizes(spec, cfg)
    n, c, t = spec.num_tokens, spec.dim, spec.tile
    aw, ww = cfg.act.width, 16
    f = max(cfg.par_in, cfg.out_par, cfg.vec_par, cfg.attn_lanes)
    out = {
        "activations x, h (N x C)": 2 * _bram(n * c // f, aw * f),
        "big (N x BIG_WIDTH)": _bram(n * s["BIG_WIDTH"] // f, aw * f),
        "weight tiles (2 x MAX_K x TILE)": 2 * _bram(s["MAX_K"] // cfg.par_in, ww * t * cfg.par_in),
    }
    if spec.moe_layers:
        out["expert buffers (2 x one expert)"] = 2 * _bram(s["MAX_EXPERT_W"] // (t * cfg.par_in), ww * t * cfg.par_in)
        out["expert hidden, MoE sum (N x H, N x C)"] = _bram(n * s["EXPERT_HIDDEN"] // f, aw * f) + _bram(
            n * c // f, aw * f
        )
        out["routing queues"] = _bram(spec.num_experts * n, 32 + 32 + aw)
    if spec.stem:
        out["stem feature maps (2 x MAX_FMAP)"] = 2 * _bram(s["MAX_FMAP"] // f, aw * f)
        out["stem line buffer, im2col row"] = 3 * _bram(s["STEM_MAX_W"] * s["STEM_MAX_C"], aw) + _bram(
            s["STEM_MAX_WO"] * s["STEM_MAX_K"] // cfg.par_in, aw * cfg.par_in
        )
    if spec.patch_embed is not None:
        out["patches"] = _bram((n - 1) * 3 * spec.patch**2, cfg.pixel.width)
    out["tables"] = 4 * _bram(257, 32) + _bram((2 * cfg.gelu_range << cfg.gelu_bits) + 1, aw)
    return out


# ---------------------------------------------------------------------------------------------- Edge-MoE
@dataclass(frozen=True)
class EdgeMoEDesign:
    """Edge-MoE's hardware parameters, as in its include/hardware.hpp and datatypes.hpp."""

    axi_bits: int = 256  # AXI_XFER_BIT_WIDTH
    fm_bits: int = 32  # fm_t = ap_fixed<32, 10>
    wt_bits: int = 16  # wt_linear_t = ap_fixed<16, 2>
    attn_parallel: int = 4  # ATTN_MATMUL_PARALLEL
    clock_mhz: float = 300.0

    @property
    def fblock(self) -> int:  # FEATURE_BLOCK_SIZE: activations per beat
        return self.axi_bits // self.fm_bits

    @property
    def lin(self) -> int:  # LINEAR_IN_SIZE = LINEAR_OUT_SIZE
        return 2 * self.fblock

    @property
    def wblock(self) -> int:  # weights per beat
        return self.axi_bits // self.wt_bits


def estimate_edge_moe(
    spec: ModelSpec, queues: list[list[int]] | None = None, hw: EdgeMoEDesign | None = None
) -> PerfReport:
    """Edge-MoE's design on ``spec``'s dimensions (an M³ViT: patch embedding, dense attention, MoE MLP), per
    block and kind of work; see the module docstring for the loops counted and the assumptions."""
    hw = hw or EdgeMoEDesign()
    n, c, fb, li = spec.num_tokens, spec.dim, hw.fblock, hw.lin
    cb = _cdiv(c, fb)
    P = hw.attn_parallel
    if spec.stem or any(b.attn_is_moe or b.task_embed is not None for b in spec.blocks):
        raise ValueError("Edge-MoE's design runs M³ViT (patch embedding, dense attention, MoE MLP)")

    def lin_cycles(rows: int, k: int, o: int) -> int:  # compute_linear: dataflow read / compute / write
        comp = rows * _cdiv(o, li) * _cdiv(k, li)
        return max(comp, rows * _cdiv(k, fb), rows * _cdiv(o, fb)) + TILE_FILL  # one flattened loop per call

    def load_cycles(k: int, o: int) -> tuple[int, int]:  # load_linear_weights + load_linear_bias
        beats = o * _cdiv(k, hw.wblock) + _cdiv(o, hw.wblock)
        return beats + 2 * AXI_LATENCY, k * o * hw.wt_bits // 8 + o * 2

    layers: list[LayerPerf] = []

    def seq(ops: list[tuple[str, int, int, int, int]]) -> tuple[Counter, int, int]:
        """(kind, cycles, load cycles issued just before, load bytes, MACs): each load overlaps the previous op."""
        parts: Counter = Counter()
        prev, nbytes, macs = 0, 0, 0
        for kind, cyc, load, by, mc in ops:
            parts["load"] += max(0, load - prev)
            parts[kind] += cyc
            prev, nbytes, macs = cyc, nbytes + by, macs + mc
        return parts, nbytes, macs

    h_img, w_img = spec.img_size
    p = spec.patch
    img_block = hw.axi_bits // 8
    pe = (h_img // p) * (3 * p * _cdiv(w_img, img_block) * cb + (w_img // p) * cb)
    layers.append(
        LayerPerf("patch_embed", pe, (n - 1) * 3 * p * p * c, (n - 1) * c * hw.fm_bits // 8, {}, {"embed": pe})
    )
    ln = n * (2 * cb + LN_ROW_FILL)
    add = n * cb
    mi = 0
    for b in spec.blocks:
        ops: list[tuple[str, int, int, int, int]] = [("norm", 4 * cb, 0, 0, 0), ("norm", ln, 0, 4 * c * 2, 0)]
        for _ in range(3):  # Q, K, V (separate weights); the two attention passes between K and V
            lc, lb = load_cycles(c, c)
            ops.append(("attn_linear", lin_cycles(n, c, c), lc, lb, n * c * c))
            if _ == 1:
                qk = ((n + P - 1) // P * n + (n + P - 1) % P) * cb
                ops.append(("attention", qk, 0, 0, n * n * c))
        ops.append(("attention", ((n + P - 1) // P * n + (n + P - 1) % P) * cb, 0, 0, n * n * c))
        lc, lb = load_cycles(c, c)
        ops += [("attn_linear", lin_cycles(n, c, c), lc, lb, n * c * c), ("norm", add, 0, 0, 0), ("norm", ln, 0, 0, 0)]
        if b.is_moe:
            m = b.mlp_moe
            e, k, eh = m.num_experts, m.top_k, m.hidden
            q = queues[mi] if queues is not None and mi < len(queues) else [n * k // e] * e
            mi += 1
            gate = n * (cb + 3 * e + e + ROUTE_FILL)
            ops.append(("moe_gate", gate, e * cb + AXI_LATENCY, e * c * 2, n * c * e))
            ops.append(("moe_experts", add, 0, 0, 0))  # zero_output
            for rows in (x for x in q if x > 0):
                l1, b1 = load_cycles(c, eh)
                ops.append(("moe_experts", lin_cycles(rows, c, eh), l1, b1, rows * c * eh))
                l2, b2 = load_cycles(eh, c)
                ops.append(("moe_experts", lin_cycles(rows, eh, c), l2, b2, rows * c * eh))
        else:
            lc1, lb1 = load_cycles(c, spec.hidden)
            lc2, lb2 = load_cycles(spec.hidden, c)
            ops += [
                ("mlp", lin_cycles(n, c, spec.hidden), lc1, lb1, n * c * spec.hidden),
                ("mlp", lin_cycles(n, spec.hidden, c), lc2, lb2, n * c * spec.hidden),
            ]
        ops.append(("norm", add, 0, 0, 0))
        parts, nbytes, macs = seq(ops)
        if parts.get("load"):
            parts["moe_experts" if b.is_moe else "attn_linear"] += parts.pop("load")
        layers.append(LayerPerf(f"blocks.{b.index}", sum(parts.values()), macs, nbytes, {}, dict(parts)))
    dsp = {
        "linear unit (16 x 16, 32 x 16)": li * li * 2,
        "gate (E x 8, 32 x 16)": spec.num_experts * fb * 2,
        "patch embedding (8 x 2 x 16, 8 x 16)": fb * (img_block // p) * p,
        "attention (Q K^T, scale, softmax, x V; 32 x 32)": P * fb * 4 + P * 4 + 3 * 4 + P * fb * 4 + P * spec.heads * 4,
        "LayerNorm (8 lanes)": fb * (4 + 4) + fb * (4 + 2) + 4,
        "MoE score x output (8 lanes)": fb * 4,
    }
    eh = spec.expert_hidden
    bram = {
        "linear weights ping/pong": 2 * _bram(_cdiv(max(spec.hidden, eh) * c, li * li), li * li * hw.wt_bits),
        "load_linear_weights cache": li * _bram(_cdiv(max(spec.hidden, eh, c), li), hw.axi_bits),
        "patch embedding weights": _bram(c // fb * 3 * p, fb * p * 16),
        "gate weights": _bram(cb, spec.num_experts * fb * hw.wt_bits),
        "expert queues and scores": 2 * spec.num_experts * _bram(n, 32),
        "attention row buffers": 2 * P * _bram(cb, hw.axi_bits),
        "linear input blocks": _bram(_cdiv(max(spec.hidden, eh), li), li * hw.fm_bits),
        "patch rows": _bram((w_img // p) * cb, hw.axi_bits),
    }
    b = EDGE_BOARD
    return PerfReport(layers, hw.clock_mhz, dsp, bram, b[0], b[1], b[2], design="Edge-MoE (modelled)")


EDGE_BOARD = ("zcu102", 2520, 1824)


def compare_table(ours: PerfReport, edge: PerfReport, extra: PerfReport | None = None, extra_name: str = "") -> str:
    """The two designs side by side (cycles per kind of work, latency, DSP, BRAM, weight bytes per frame)."""
    cols = [("Edge-MoE (modelled)", edge), ("this generator", ours)] + ([(extra_name, extra)] if extra else [])
    ke, ko = edge.kind_cycles(), ours.kind_cycles()
    kx = extra.kind_cycles() if extra else {}
    kinds = [k for k in KIND_LABELS if k in ke or k in ko or k in kx]
    w = max(len(KIND_LABELS[k]) for k in kinds) + 2
    head = f"{'cycles per frame':<{w}}" + "".join(f"{name:>22}" for name, _ in cols)
    lines = [head, "-" * len(head)]
    for k in kinds:
        vals = [ke.get(k, 0), ko.get(k, 0)] + ([kx.get(k, 0)] if extra else [])
        lines.append(f"{KIND_LABELS[k]:<{w}}" + "".join(f"{v:>22,}" for v in vals))
    lines.append(f"{'total cycles':<{w}}" + "".join(f"{r.cycles:>22,}" for _, r in cols))
    lines.append(f"{'latency (ms) at ' + format(edge.clock_mhz, 'g') + ' MHz':<{w}}" + "".join(
        f"{r.cycles / (edge.clock_mhz * 1e3):>22.2f}" for _, r in cols))  # fmt: skip
    lines.append(f"{'speed-up vs Edge-MoE':<{w}}" + "".join(f"{edge.cycles / r.cycles:>21.2f}x" for _, r in cols))
    lines.append(f"{'DSP48E2 (estimate)':<{w}}" + "".join(f"{r.dsp_total:>22,}" for _, r in cols))
    lines.append(f"{'BRAM18K (estimate)':<{w}}" + "".join(f"{r.bram18k:>22,}" for _, r in cols))
    lines.append(f"{'weight bytes per frame':<{w}}" + "".join(f"{r.weight_bytes:>22,}" for _, r in cols))
    lines += [
        "assumptions (no synthesis was run; see vision_moe/deploy/hls/perf.py and docs/hls.md):",
        f"  both: pipelined loops at II=1, {AXI_LATENCY} cycles of AXI latency per burst, pipeline fills per tile /",
        "  row / token, the same routing (tokens per expert); Edge-MoE's 256-bit beats, this design's AXI_BITS;",
        "  Edge-MoE: each weight load overlaps the operation before it (its ping/pong order allows it), its",
        "  activations stream from DRAM 8 per cycle, its hls_math cores count 0 DSP (both in its favour);",
        "  this generator: the next tile's / expert's load overlaps the current compute (explicit ping-pong), its",
        f"  attention needs {SOFTMAX_LATENCY} cycles between keys at least; DSP: 2 per 32x16 multiplier, 4 per 32x32.",
    ]
    return "\n".join(lines)
