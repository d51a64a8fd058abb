"""Analytical performance model of the generated kernels: cycles per layer, latency, DSP and BRAM estimates.

Derived from the kernels' loop structure (hls/include/vmoe/*.h) and the parallelism factors in HLSConfig:

- linear unit: per weight tile, ``rows * ceil(K / par_in)`` cycles (TILE x par_in MACs per cycle, II=1) plus
  pipeline depth; the next tile's load (``K * TILE * 16 / axi_bits`` cycles) overlaps the current tile's compute,
  so a tile costs max(compute, load); output writes are assumed overlapped (output buffer partitioned by TILE).
- attention: per block of ``attn_rows`` query rows, per head, per key: ``2 * ceil(D / attn_lanes)`` cycles (score,
  then the online-softmax update of the output row); K/V traffic per cycle is independent of ``attn_rows``.
- LayerNorm: 3 passes over C per token; gate routing: E cycles per token plus top-k insertion.
- MoE: every non-empty expert's weights are loaded once (overlapped with the previous expert's compute), and the
  expert runs on its queue only; routing (queue sizes) comes from the reference run on the test image.
DSP: a 32x16-bit MAC takes 2 DSP48E2, a 32x32-bit multiply 4. BRAM: ceil(bits / 18 Kb) per array partition.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .config import HLSConfig
from .ir import ModelSpec

__all__ = ["LayerPerf", "PerfReport", "estimate", "EDGE_MOE_PUBLISHED"]

PIPE_DEPTH = 8  # cycles to fill the MAC pipeline per row
# Published facts about Edge-MoE (Sarkar et al., ICCAD 2023, arXiv:2305.18691), shown beside the model's figures:
# the paper's abstract and the authors' repository (github.com/sharc-lab/Edge-MoE, prebuilt ZCU102 bitstream).
EDGE_MOE_PUBLISHED = {
    "board": "AMD/Xilinx ZCU102 (prebuilt bitstream in the authors' repository)",
    "energy efficiency": "2.24x vs GPU, 4.90x vs CPU (paper abstract)",
}


@dataclass
class LayerPerf:
    name: str
    cycles: int
    macs: int
    weight_bytes: int  # DRAM weight traffic of this layer


@dataclass
class PerfReport:
    layers: list[LayerPerf]
    clock_mhz: float
    dsp: int
    bram18k: int
    board: str
    board_dsp: int
    board_bram18k: int
    notes: list[str] = field(default_factory=list)

    @property
    def cycles(self) -> int:
        return sum(layer.cycles for layer in self.layers)

    @property
    def latency_ms(self) -> float:
        return self.cycles / (self.clock_mhz * 1e3)

    def table(self) -> str:
        w = max(len(layer.name) for layer in self.layers)
        lines = [f"{'layer':<{w}}  {'cycles':>12}  {'MACs':>12}  {'weights':>10}"]
        for layer in self.layers:
            lines.append(f"{layer.name:<{w}}  {layer.cycles:>12,}  {layer.macs:>12,}  {layer.weight_bytes:>9,}B")
        lines.append(
            f"{'total':<{w}}  {self.cycles:>12,}  {sum(x.macs for x in self.layers):>12,}  "
            f"{sum(x.weight_bytes for x in self.layers):>9,}B"
        )
        lines.append(
            f"latency {self.latency_ms:.3f} ms at {self.clock_mhz:g} MHz ({1e3 / self.latency_ms:.1f} frames/s)"
        )
        lines.append(
            f"DSP ~{self.dsp} of {self.board_dsp} ({100 * self.dsp / self.board_dsp:.0f}%), "
            f"BRAM18K ~{self.bram18k} of {self.board_bram18k} ({100 * self.bram18k / self.board_bram18k:.0f}%) "
            f"on {self.board}"
        )
        lines.extend(self.notes)
        return "\n".join(lines)


def _pad(n: int, t: int) -> int:
    return -(-n // t) * t


def _linear(name: str, rows: int, k: int, o: int, cfg: HLSConfig, tile: int) -> LayerPerf:
    tiles = -(-o // tile)
    load = math.ceil(k * tile * cfg.weight.width / cfg.board_info.axi_bits)
    comp = rows * (math.ceil(k / cfg.par_in) + 2) + PIPE_DEPTH if rows else 0
    cycles = load + tiles * max(comp, load) if rows else 0
    return LayerPerf(name, cycles, rows * k * o, k * _pad(o, tile) * cfg.weight.width // 8)


def estimate(spec: ModelSpec, cfg: HLSConfig, queues: list[list[int]] | None = None) -> PerfReport:
    """Cycle / resource estimate; ``queues`` (patches per expert per MoE layer, from the reference) sets MoE costs."""
    n, c, t = spec.num_tokens, spec.dim, spec.tile
    d = spec.head_dim
    rows_par, lanes = cfg.attn_rows, cfg.attn_lanes
    layers = [_linear("patch_embed", n - 1, 3 * spec.patch**2, c, cfg, t)]
    ln_cycles = n * (3 * c + 12)
    mi = 0
    for b in spec.blocks:
        p = f"blocks.{b.index}."
        layers.append(LayerPerf(p + "norm1", ln_cycles, 0, 0))
        layers.append(_linear(p + "qkv", n, c, 3 * c, cfg, t))
        att = math.ceil(n / rows_par) * spec.heads * n * (2 * math.ceil(d / lanes) + 2)
        layers.append(LayerPerf(p + "attn", att, 2 * n * n * c, 0))
        layers.append(_linear(p + "proj", n, c, c, cfg, t))
        layers.append(LayerPerf(p + "norm2", ln_cycles, 0, 0))
        if b.is_moe:
            e = len(b.experts)
            layers.append(_linear(p + "gate", n, c, e, cfg, t))
            q = queues[mi] if queues is not None and mi < len(queues) else [n * spec.top_k // e] * e
            mi += 1
            route = n * (e + spec.top_k * 4 + 8)
            eh = spec.expert_hidden
            w_words = c * _pad(eh, t) + eh * _pad(c, t)
            load = math.ceil(w_words * cfg.weight.width / cfg.board_info.axi_bits)
            active = [x for x in q if x > 0]
            cyc, macs = route, 0
            for i, rows in enumerate(active):
                f1 = _linear("", rows, c, eh, cfg, t)
                f2 = _linear("", rows, eh, c, cfg, t)
                compute = f1.cycles + f2.cycles
                cyc += max(compute, load) if i else load + compute  # the first expert's load is exposed
                macs += f1.macs + f2.macs
            layers.append(
                LayerPerf(
                    p + f"moe ({len(active)}/{e} experts)",
                    cyc + n * c,
                    macs,
                    len(active) * w_words * cfg.weight.width // 8,
                )
            )
        else:
            layers.append(_linear(p + "fc1", n, c, spec.hidden, cfg, t))
            layers.append(_linear(p + "fc2", n, spec.hidden, c, cfg, t))
    layers.append(LayerPerf("norm", ln_cycles, 0, 0))
    if spec.head is not None:
        layers.append(_linear("head", 1, c, spec.head.w.shape[1], cfg, t))

    # DSP: the linear unit's TILE x par_in MACs, attention's rows x lanes multipliers for scores and for the
    # output update, and a few for the interpolating tables / LayerNorm.
    dsp_mac = 2 if cfg.act.width <= 27 + 18 and cfg.weight.width <= 18 else 4
    dsp = t * cfg.par_in * dsp_mac + rows_par * lanes * 2 * 4 + 16
    # BRAM: on-chip buffers (bits, partitions)
    eh = max(spec.expert_hidden, 1)
    big = max(3 * c, spec.hidden, spec.num_experts, spec.head.w.shape[1] if spec.head is not None else 0)
    max_k = max(3 * spec.patch**2, c, spec.hidden, spec.expert_hidden)
    aw = cfg.act.width
    arrays = [
        (n * c * aw, 1),
        (n * c * aw, 1),
        (n * big * aw, 1),  # x, h, big
        ((n - 1) * 3 * spec.patch**2 * cfg.pixel.width, 1),  # patches
        (max_k * cfg.weight.width, 2 * t),  # weight tile ping-pong, partitioned by TILE
        (n * spec.top_k * (aw + 32), 1),  # routing
    ]
    if spec.num_experts:
        e = spec.num_experts
        arrays += [
            (n * eh * aw, 1),
            (n * c * aw, 1),
            (e * n * (aw + 32), 1),  # hid, y, queues
            ((c * _pad(eh, t) + eh * c) * cfg.weight.width, 2),
        ]  # expert ping-pong
    arrays += [(257 * 32, 4), (((2 * cfg.gelu_range) << cfg.gelu_bits) * aw, 1)]  # tables
    bram = sum(parts * max(1, math.ceil(bits / parts / 18432)) for bits, parts in arrays)
    bi = cfg.board_info
    notes = [
        f"parallelism: TILE={t} x par_in={cfg.par_in} MACs, attention {rows_par} rows x {lanes} lanes; "
        f"AXI {bi.axi_bits} bits/cycle per port"
    ]
    return PerfReport(layers, cfg.clock, dsp, bram, bi.name, bi.dsp, bi.bram18k, notes)
