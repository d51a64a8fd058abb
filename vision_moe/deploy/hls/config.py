"""Fixed-point types, parallelism factors and boards for the HLS generator."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = ["FxType", "HLSConfig", "BOARDS", "Board", "parse_fx", "WEIGHT8_CHOICES", "PARALLELISM", "PRESETS", "Preset"]


@dataclass(frozen=True)
class FxType:
    """An ``ap_fixed<W, I>`` / ``ap_ufixed<W, I>`` type (quantisation AP_TRN, overflow AP_WRAP: the ap defaults)."""

    width: int
    int_bits: int
    signed: bool = True

    @property
    def frac(self) -> int:
        return self.width - self.int_bits

    @property
    def lo(self) -> int:  # smallest raw value
        return -(1 << (self.width - 1)) if self.signed else 0

    @property
    def hi(self) -> int:  # largest raw value
        return (1 << (self.width - 1)) - 1 if self.signed else (1 << self.width) - 1

    def cpp(self) -> str:
        return f"ap_{'' if self.signed else 'u'}fixed<{self.width}, {self.int_bits}>"

    def __str__(self) -> str:
        return self.cpp()


def parse_fx(text: str) -> FxType:
    """``'ap_fixed<32,10>'`` / ``'ap_ufixed<8,0>'`` -> FxType; anything else is a one-line ValueError."""
    m = re.fullmatch(r"\s*ap_(u?)fixed\s*<\s*(\d+)\s*,\s*(-?\d+)\s*>\s*", text)
    if not m:
        raise ValueError(f"cannot parse fixed-point type {text!r}; expected 'ap_fixed<W,I>' or 'ap_ufixed<W,I>'")
    t = FxType(int(m.group(2)), int(m.group(3)), m.group(1) == "")
    if not 2 <= t.width <= 32:
        raise ValueError(f"fixed-point type {text!r}: width must be in [2, 32] (C-simulation raw values are int32)")
    return t


@dataclass(frozen=True)
class Board:
    name: str
    part: str
    platform: str  # Vitis embedded platform for v++ --platform
    clock_mhz: float
    dsp: int
    bram18k: int  # 18 Kb block RAMs
    uram: int
    axi_bits: int  # data width of one m_axi port
    note: str = ""


# Device totals from the AMD/Xilinx Zynq UltraScale+ MPSoC product tables (ZU9EG, ZU7EV, K26 SOM).
BOARDS: dict[str, Board] = {
    "zcu102": Board(
        "zcu102",
        "xczu9eg-ffvb1156-2-e",
        "xilinx_zcu102_base_202320_1",
        300.0,
        2520,
        1824,
        0,
        128,
        "Edge-MoE's board (300 MHz)",
    ),
    "zcu104": Board("zcu104", "xczu7ev-ffvc1156-2-e", "xilinx_zcu104_base_202320_1", 300.0, 1728, 624, 96, 128),
    "kv260": Board(
        "kv260",
        "xck26-sfvc784-2LV-c",
        "xilinx_kv260_base_202320_1",
        250.0,
        1248,
        288,
        64,
        128,
        "KV260 has no AMD base platform in every release; pass --platform for your own",
    ),
}


WEIGHT8_CHOICES = ("none", "experts", "all")
# the parallelism factors: HLSConfig fields, written into parameters.h, read by the performance model
PARALLELISM = ("tile", "par_in", "out_par", "attn_rows", "attn_lanes", "vec_par", "axi_bits")


@dataclass
class HLSConfig:
    """Everything the generator needs besides the model. Defaults follow Edge-MoE's fixed-point choices.

    The parallelism factors (``tile`` x ``par_in`` MACs of the linear unit, ``out_par`` outputs written per cycle,
    ``attn_rows`` x ``attn_lanes`` of the attention unit, ``vec_par`` LayerNorm and element-wise lanes,
    ``axi_bits`` per weight beat) are written into ``parameters.h``, where the kernels' loops read them, and the
    performance model (:mod:`.perf`) reads the same values from here.
    """

    act: FxType = field(default_factory=lambda: FxType(32, 10))  # activations
    weight: FxType = field(default_factory=lambda: FxType(16, 2))  # linear weights
    bias: FxType = field(default_factory=lambda: FxType(16, 5))  # biases, norm gamma/beta, position embedding
    pixel: FxType = field(default_factory=lambda: FxType(8, 0, signed=False))  # input pixels (raw byte / 256)
    board: str = "zcu102"
    clock_mhz: float | None = None  # None: the board's
    platform: str | None = None  # None: the board's
    tile: int | None = None  # output features per weight tile = MAC columns; None: chosen from the model
    par_in: int = 4  # input features consumed per cycle by each MAC column
    out_par: int = 4  # outputs the linear unit's epilogue (bias/scale, GELU, residual, gate score) writes per cycle
    attn_rows: int = 4  # query rows processed in parallel by the attention unit
    attn_lanes: int = 16  # head-dim lanes of the attention unit
    vec_par: int = 8  # lanes of the LayerNorm and element-wise loops (values per cycle)
    axi_bits: int | None = None  # bits per cycle of a weight read port; None: the board's
    weight8: str = "none"  # ap_int<8> weights with a per-output-channel scale: 'none', 'experts' or 'all'
    scale: FxType = field(default_factory=lambda: FxType(24, 0, signed=False))  # per-output-channel scale of 8-bit
    top: str = "vmoe_top"

    # fixed internal formats (documented in docs/hls.md); not user options
    exp_type: FxType = FxType(18, 1, signed=False)  # exp() outputs, in (0, 1]
    rstd_type: FxType = FxType(32, 12, signed=False)  # LayerNorm 1/sqrt(var + eps)
    sq_type: FxType = FxType(50, 22, signed=False)  # squared deviations
    var_type: FxType = FxType(48, 20, signed=False)  # variance
    table_frac: int = 20  # fraction bits of the exp2 / reciprocal / rsqrt tables
    table_bits: int = 8  # log2 of the interpolation intervals of those tables
    gelu_range: int = 8  # GELU table covers [-gelu_range, gelu_range)
    gelu_bits: int = 6  # GELU table step is 2**-gelu_bits
    inv_bits: int = 32  # fraction bits of the 1/C constants

    def __post_init__(self) -> None:
        if self.board not in BOARDS:
            raise ValueError(f"unknown board {self.board!r}; expected one of {sorted(BOARDS)}")
        a = self.act
        if not a.signed or not self.weight.signed or not self.bias.signed:
            raise ValueError("activation, weight and bias types must be signed ap_fixed")
        if self.bias.frac > a.frac:
            raise ValueError(f"bias type {self.bias} has more fraction bits than the activation type {a}")
        if a.frac < self.gelu_bits or a.frac < self.table_bits:
            raise ValueError(f"activation type {a} needs at least {max(self.gelu_bits, self.table_bits)} fraction bits")
        if a.int_bits < 5:
            raise ValueError(
                f"activation type {a} needs at least 5 integer bits (GELU table range +-{self.gelu_range})"
            )
        if self.weight.width > 16 or self.bias.width > 16 or self.pixel.width > 8:
            raise ValueError(
                f"weight {self.weight} / bias {self.bias} types must be at most 16 bits and the pixel type "
                f"{self.pixel} at most 8 (the blobs hold int16 and uint8 words)"
            )
        if a.frac + self.weight.frac > 60 or 2 * a.frac > 60:
            raise ValueError(f"activation {a} x weight {self.weight} products are too wide for the 64-bit accumulators")
        for name in ("par_in", "out_par", "attn_rows", "attn_lanes", "vec_par"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if self.tile is not None and (isinstance(self.tile, bool) or not isinstance(self.tile, int) or self.tile < 1):
            raise ValueError(f"tile must be an integer >= 1, got {self.tile!r}")
        if self.clock_mhz is not None and not (self.clock_mhz > 0 and self.clock_mhz < 2000):
            raise ValueError(f"clock_mhz must be in (0, 2000) MHz, got {self.clock_mhz!r}")
        if self.axi_bits is not None and (self.axi_bits not in (32, 64, 128, 256, 512)):
            raise ValueError(f"axi_bits must be one of 32, 64, 128, 256, 512, got {self.axi_bits!r}")
        if self.weight8 not in WEIGHT8_CHOICES:
            raise ValueError(f"weight8 must be one of {list(WEIGHT8_CHOICES)}, got {self.weight8!r}")
        s = self.scale
        if s.signed or not 2 <= s.width <= 31 or not 0 <= s.frac <= 32:
            raise ValueError(f"scale type {s}: expected an unsigned ap_ufixed of width 2..31 with 0..32 fraction bits")

    @property
    def board_info(self) -> Board:
        return BOARDS[self.board]

    @property
    def clock(self) -> float:
        return self.clock_mhz or self.board_info.clock_mhz

    @property
    def axi(self) -> int:
        """Bits per cycle of a weight read port (``axi_bits`` or the board's)."""
        return self.axi_bits or self.board_info.axi_bits

    def is8(self, kind: str) -> bool:
        """Whether layers of ``kind`` hold 8-bit weights: 'expert' (MoE experts, MLP and attention) with
        weight8 'experts' or 'all'; 'dense' (QKV, projections, dense MLP, MoE attention key/value, head) with
        'all'. Gates and the first layer (patch embedding / stem) always keep ``weight``."""
        if kind == "expert":
            return self.weight8 in ("experts", "all")
        if kind == "dense":
            return self.weight8 == "all"
        return False

    def load_par(self, bits: int) -> int:
        """Weights of ``bits`` bits a weight port delivers per cycle."""
        return max(1, self.axi // bits)


@dataclass(frozen=True)
class Preset:
    """A published configuration: the model to build, the generator's settings, the tasks."""

    model: str
    model_kwargs: dict
    hls: dict
    tasks: tuple[str, ...]
    source: str


# Edge-MoE (Sarkar et al., ICCAD 2023), from its include/model.hpp, datatypes.hpp and hardware.hpp: M³ViT-T,
# dim 192, 12 layers, 3 heads, 128 x 256 input (8 x 16 patches of 16 + class token), MoE MLP in the odd layers with
# 16 experts, top-2, expert hidden 384, dense MLP 768, two tasks, ap_fixed<32,10> activations, ap_fixed<16,2>
# weights, 256-bit AXI, ZCU102 at 300 MHz. The parallelism is this generator's, chosen so that its DSP estimate
# stays below the estimate of Edge-MoE's own units (perf.estimate_edge_moe).
PRESETS: dict[str, Preset] = {
    "edge-moe": Preset(
        model="m3vit_tiny_patch16_224",
        model_kwargs=dict(
            tasks=["semseg", "depth"],
            num_classes=0,
            img_size=[128, 256],
            patch_size=16,
            embed_dim=192,
            depth=12,
            num_heads=3,
            mlp_ratio=4.0,
            moe_blocks="every2",
            num_experts=16,
            top_k=2,
            expert_hidden=384,
        ),
        hls=dict(
            board="zcu102",
            clock_mhz=300.0,
            axi_bits=256,
            tile=96,
            par_in=4,
            out_par=8,
            attn_rows=4,
            attn_lanes=8,
            vec_par=8,
        ),
        tasks=("semseg", "depth"),
        source="sharc-lab/Edge-MoE include/model.hpp, include/hardware.hpp",
    )
}
