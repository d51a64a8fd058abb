"""Fixed-point types, parallelism factors and boards for the HLS generator."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = ["FxType", "HLSConfig", "BOARDS", "Board", "parse_fx"]


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


@dataclass
class HLSConfig:
    """Everything the generator needs besides the model. Defaults follow Edge-MoE's fixed-point choices."""

    act: FxType = field(default_factory=lambda: FxType(32, 10))  # activations
    weight: FxType = field(default_factory=lambda: FxType(16, 2))  # linear weights
    bias: FxType = field(default_factory=lambda: FxType(16, 5))  # biases, norm gamma/beta, position embedding
    pixel: FxType = field(default_factory=lambda: FxType(8, 0, signed=False))  # input pixels (raw byte / 256)
    board: str = "zcu102"
    clock_mhz: float | None = None  # None: the board's
    platform: str | None = None  # None: the board's
    tile: int | None = None  # output features per weight tile = MAC columns; None: chosen from the model
    par_in: int = 4  # input features consumed per cycle by each MAC column
    attn_rows: int = 4  # query rows processed in parallel by the attention unit
    attn_lanes: int = 16  # head-dim lanes of the attention unit
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
        if a.frac + self.weight.frac > 60 or 2 * a.frac > 60:
            raise ValueError(f"activation {a} x weight {self.weight} products are too wide for the 64-bit accumulators")
        for name in ("par_in", "attn_rows", "attn_lanes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def board_info(self) -> Board:
        return BOARDS[self.board]

    @property
    def clock(self) -> float:
        return self.clock_mhz or self.board_info.clock_mhz
