"""Bit-accurate NumPy model of the ap_fixed arithmetic the HLS kernels use.

Values are raw integers (int64 arrays; Python-int object arrays where a product could pass 63 bits) with the
fraction width known by the caller. The rules mirror ap_fixed's: a product or a sum is exact, an assignment to a
type truncates towards minus infinity (AP_TRN) and wraps (AP_WRAP). Every cast that wraps is counted in a
:class:`OverflowLog`, so overflow is reported per tensor instead of passing silently.

The nonlinear functions (exp, reciprocal, 1/sqrt, GELU) are tables with linear interpolation evaluated in integer
arithmetic, written once here and once in ``hls/include/vmoe/nonlinear.h`` with the same operations.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from .config import FxType, HLSConfig

__all__ = [
    "OverflowLog",
    "Tables",
    "quantize",
    "to_float",
    "cast",
    "wrap",
    "exact_matmul",
    "mul_shift",
    "scaled_shift",
    "quantize_per_channel",
    "exp_fx",
    "recip_fx",
    "rsqrt_fx",
    "gelu_fx",
    "msb",
]


@dataclass
class OverflowLog:
    """Number of values that wrapped (or saturated) per tensor name, and how many values each tensor had."""

    counts: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    sizes: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def add(self, name: str, n_over: int, n_total: int) -> None:
        self.counts[name] += int(n_over)
        self.sizes[name] += int(n_total)

    def nonzero(self) -> dict[str, int]:
        return {k: v for k, v in self.counts.items() if v}


def _as_obj(a: np.ndarray) -> np.ndarray:
    return np.asarray(a).astype(object)


def wrap(v: np.ndarray, t: FxType, log: OverflowLog | None = None, name: str = "") -> np.ndarray:
    """Reduce raw integers modulo 2**W into ``t``'s range (AP_WRAP); count the values that were out of range."""
    v = np.asarray(v)
    over = (v < t.lo) | (v > t.hi)
    if log is not None and name:
        log.add(name, int(np.count_nonzero(over)), v.size)
    if not over.any():
        return v.astype(np.int64)
    m = 1 << t.width
    if v.dtype == object:
        r = np.vectorize(lambda x: int(x) % m, otypes=[object])(v)
    else:
        r = np.mod(v, m) if t.width < 63 else v
    if t.signed:
        r = np.where(r > t.hi, r - m, r)
    return np.asarray(r).astype(np.int64)


def cast(v: np.ndarray, frac_from: int, t: FxType, log: OverflowLog | None = None, name: str = "") -> np.ndarray:
    """ap_fixed assignment of raw ``v`` (``frac_from`` fraction bits) to type ``t``: floor, then wrap."""
    s = frac_from - t.frac
    if s > 0:
        v = v >> s
    elif s < 0:
        v = v * (1 << -s)
    return wrap(v, t, log, name)


def quantize(x: np.ndarray, t: FxType, log: OverflowLog | None = None, name: str = "") -> np.ndarray:
    """Float -> raw, round to nearest and saturate (done offline by the generator, so it costs no hardware)."""
    r = np.floor(np.asarray(x, dtype=np.float64) * (2.0**t.frac) + 0.5)
    over = (r < t.lo) | (r > t.hi)
    if log is not None and name:
        log.add(name, int(np.count_nonzero(over)), r.size)
    return np.clip(r, t.lo, t.hi).astype(np.int64)


def to_float(raw: np.ndarray, frac: int) -> np.ndarray:
    return np.asarray(raw, dtype=np.float64) / (2.0**frac)


def mul_shift(a: np.ndarray, b: np.ndarray, shift: int) -> np.ndarray:
    """floor(a * b / 2**shift) exactly; int64 when the product provably fits, Python ints otherwise."""
    a, b = np.asarray(a), np.asarray(b)
    ma = int(np.abs(a).max()) if a.size else 0
    mb = int(np.abs(b).max()) if b.size else 0
    if ma.bit_length() + mb.bit_length() <= 62:
        return (a.astype(np.int64) * b.astype(np.int64)) >> shift
    return np.asarray((_as_obj(a) * _as_obj(b)) >> shift)


def scaled_shift(acc: np.ndarray, scale: np.ndarray, shift: int) -> np.ndarray:
    """floor(acc * scale / 2**shift) modulo 2**64, for int64 ``acc`` and unsigned ``scale`` below 2**31, shift <= 32.

    The C++ computes the product exactly (ap_int<96>) and keeps the low bits, so the low 64 bits agree. With
    acc = hi * 2**32 + lo (0 <= lo < 2**32): acc * s / 2**shift = hi * s * 2**(32 - shift) + lo * s / 2**shift, the
    first term an integer; int64 arithmetic wraps modulo 2**64, which keeps every low bit."""
    if not 0 <= shift <= 32:
        raise ValueError(f"scaled_shift: shift {shift} outside [0, 32]")
    acc = np.asarray(acc, dtype=np.int64)
    s = np.asarray(scale, dtype=np.int64)
    hi, lo = acc >> 32, acc & 0xFFFFFFFF
    with np.errstate(over="ignore"):
        return np.left_shift(hi * s, 32 - shift) + ((lo * s) >> shift)


def quantize_per_channel(
    w: np.ndarray, bits: int, scale_t: FxType, log: OverflowLog | None = None, name: str = ""
) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel quantisation of ``w`` (in, out): raw scales of type ``scale_t`` (round to
    nearest) and integers q in [-(2**(bits-1) - 1), 2**(bits-1) - 1] with w ~ q * scale per column.

    A scale above ``scale_t``'s range raises a one-line ValueError naming ``name``; columns whose scale rounds to
    zero become zero (counted in ``log`` as saturated)."""
    qmax = (1 << (bits - 1)) - 1
    w = np.asarray(w, dtype=np.float64)
    amax = np.abs(w).max(axis=0) if w.size else np.zeros(w.shape[1])
    s = amax / qmax
    limit = scale_t.hi / 2.0**scale_t.frac
    if (s > limit).any():
        o = int(np.argmax(s))
        raise ValueError(
            f"{name}: 8-bit weight scale {s[o]:.4g} (output channel {o}, max |w| {amax[o]:.4g}) overflows the scale "
            f"type {scale_t} (largest {limit:.4g}); pick a scale type with more integer bits (--scale-type)"
        )
    s_raw = np.clip(np.floor(s * 2.0**scale_t.frac + 0.5), 0, scale_t.hi).astype(np.int64)
    sv = s_raw / 2.0**scale_t.frac
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(sv[None, :] > 0, np.floor(w / sv[None, :] + 0.5), 0.0)
    over = (q < -qmax) | (q > qmax) | ((sv[None, :] == 0) & (w != 0))
    if log is not None and name:
        log.add(name, int(np.count_nonzero(over)), q.size)
    return np.clip(q, -qmax, qmax).astype(np.int64), s_raw


def _split16(a: np.ndarray) -> list[np.ndarray]:
    """a = sum_i limbs[i] * 2**(16 i): low limbs in [0, 2**16), the top limb signed; each exact in float64."""
    a = np.asarray(a, dtype=np.int64)
    m = int(np.abs(a).max()) if a.size else 0
    n = max(1, -(-(m.bit_length() + 1) // 16))
    limbs, rest = [], a
    for _ in range(n - 1):
        limbs.append((rest & 0xFFFF).astype(np.float64))
        rest = rest >> 16
    limbs.append(rest.astype(np.float64))
    return limbs


def exact_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Integer matmul ``a @ b`` modulo 2**64 (the 64-bit accumulator's wrap), through exact float64 BLAS products.

    Both operands are split into 16-bit limbs; each limb product sums at most K * 2**32 < 2**53 for K < 2**21,
    so every partial result is an exact integer.
    """
    if a.shape[-1] >= (1 << 21):
        raise ValueError("exact_matmul: inner dimension too large")
    a, b = np.asarray(a), np.asarray(b)
    ma, mb = int(np.abs(a).max(initial=0)), int(np.abs(b).max(initial=0))
    if ma.bit_length() + mb.bit_length() + int(a.shape[-1]).bit_length() <= 53:  # every partial sum is exact
        return np.matmul(a.astype(np.float64), b.astype(np.float64)).astype(np.int64)
    pa, pb = _split16(a), _split16(b)
    out = None
    for i, x in enumerate(pa):
        for j, y in enumerate(pb):
            part = np.matmul(x, y).astype(np.int64)
            sh = 16 * (i + j)
            if sh:
                part = np.left_shift(part, sh) if sh < 64 else np.zeros_like(part)
            out = part if out is None else out + part
    return out


def msb(v: np.ndarray) -> np.ndarray:
    """Index of the highest set bit of positive int64 values (-1 for 0)."""
    v = np.asarray(v, dtype=np.int64)
    out = np.full(v.shape, -1, dtype=np.int64)
    for b in range(63):
        out = np.where((v >> b) & 1 == 1, b, out)
    return out


# ---------------------------------------------------------------------------------------------- tables
@dataclass
class Tables:
    """The lookup tables shared by the NumPy reference and the generated ``tables.h``."""

    exp2: np.ndarray  # 2**(i / 2**TB), i = 0..2**TB, frac table_frac
    recip: np.ndarray  # 1 / (1 + i / 2**TB), frac table_frac
    rsqrt1: np.ndarray  # 1 / sqrt(1 + i / 2**TB)
    rsqrt2: np.ndarray  # 1 / sqrt(2 (1 + i / 2**TB))
    gelu: np.ndarray  # GELU on [-R, R] step 2**-GB, raw activation values
    log2e: int  # log2(e), raw with exp_type.frac fraction bits

    @classmethod
    def build(cls, cfg: HLSConfig, approximate: str = "none") -> Tables:
        n = 1 << cfg.table_bits
        i = np.arange(n + 1, dtype=np.float64) / n
        s = float(1 << cfg.table_frac)
        rnd = lambda x: np.floor(x * s + 0.5).astype(np.int64)  # noqa: E731
        g = np.arange(-cfg.gelu_range * (1 << cfg.gelu_bits), cfg.gelu_range * (1 << cfg.gelu_bits) + 1) / (
            1 << cfg.gelu_bits
        )
        if approximate == "tanh":
            gv = 0.5 * g * (1 + np.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g**3)))
        else:
            gv = 0.5 * g * (1 + np.vectorize(math.erf)(g / math.sqrt(2)))
        return cls(
            exp2=rnd(2.0**i),
            recip=rnd(1.0 / (1.0 + i)),
            rsqrt1=rnd(1.0 / np.sqrt(1.0 + i)),
            rsqrt2=rnd(1.0 / np.sqrt(2.0 * (1.0 + i))),
            gelu=quantize(gv, cfg.act),
            log2e=int(math.floor(math.log2(math.e) * (1 << cfg.exp_type.frac) + 0.5)),
        )


def _interp(table: np.ndarray, idx: np.ndarray, r: np.ndarray, rbits: np.ndarray | int) -> np.ndarray:
    t0, t1 = table[idx], table[idx + 1]
    return t0 + (((t1 - t0) * r) >> rbits)


def exp_fx(x: np.ndarray, cfg: HLSConfig, tab: Tables) -> np.ndarray:
    """exp(x) for raw activations x <= 0 -> raw exp_type values. 2**(x log2 e) = table(frac) >> -floor."""
    fa, fe, tb, tf = cfg.act.frac, cfg.exp_type.frac, cfg.table_bits, cfg.table_frac
    y = (np.asarray(x, dtype=np.int64) * tab.log2e) >> fe  # frac fa, <= 0
    fl = y >> fa  # floor, <= 0
    f = y & ((1 << fa) - 1)  # fraction in [0, 1)
    idx = f >> (fa - tb)
    r = f & ((1 << (fa - tb)) - 1)
    v = _interp(tab.exp2, idx, r, fa - tb)  # frac tf, in [2**tf, 2**(tf+1)]
    sh = -fl + (tf - fe)
    return np.where(sh >= 62, 0, v >> np.minimum(sh, 62))


def _mantissa(v: np.ndarray, b: np.ndarray, tb: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Table index, remainder and remainder width of positive v whose top bit is b."""
    mask = (1 << tb) - 1
    big = b >= tb
    sh = np.where(big, b - tb, 0)
    idx = np.where(big, (v >> sh) & mask, (v << np.where(big, 0, tb - b)) & mask)
    r = np.where(big, v & ((np.int64(1) << sh) - 1), 0)
    return idx, r, sh


def recip_fx(x: np.ndarray, cfg: HLSConfig, tab: Tables, log: OverflowLog | None = None, name: str = "") -> np.ndarray:
    """1/x for raw positive activations -> raw activations, saturating at the type's maximum."""
    fa, tb, tf = cfg.act.frac, cfg.table_bits, cfg.table_frac
    x = np.asarray(x, dtype=np.int64)
    b = msb(x)
    idx, r, sh = _mantissa(x, b, tb)
    v = _interp(tab.recip, idx, r, sh)  # frac tf, (0.5, 1]
    s = 2 * fa - tf - b
    lim = cfg.act.hi
    big = s >= 0
    over = big & (v > (lim >> np.clip(s, 0, 62)))
    if log is not None and name:
        log.add(name, int(np.count_nonzero(over)), x.size)
    out = np.where(big, v << np.clip(s, 0, 62), v >> np.clip(-s, 0, 62))
    return np.where(over, lim, out)


def rsqrt_fx(v: np.ndarray, cfg: HLSConfig, tab: Tables, log: OverflowLog | None = None, name: str = "") -> np.ndarray:
    """1/sqrt(v) for raw positive var_type values -> raw rstd_type values (saturating)."""
    fv, fr, tb, tf = cfg.var_type.frac, cfg.rstd_type.frac, cfg.table_bits, cfg.table_frac
    v = np.asarray(v, dtype=np.int64)
    b = msb(v)
    e = b - fv
    odd = (e & 1) == 1
    idx, r, sh = _mantissa(v, b, tb)
    t = np.where(odd, _interp(tab.rsqrt2, idx, r, sh), _interp(tab.rsqrt1, idx, r, sh))  # frac tf
    ee = np.where(odd, e - 1, e)  # even
    s = fr - tf - ee // 2
    lim = cfg.rstd_type.hi
    big = s >= 0
    over = big & (t > (lim >> np.clip(s, 0, 62)))
    if log is not None and name:
        log.add(name, int(np.count_nonzero(over)), v.size)
    out = np.where(big, t << np.clip(s, 0, 62), t >> np.clip(-s, 0, 62))
    return np.where(over, lim, out)


def gelu_fx(x: np.ndarray, cfg: HLSConfig, tab: Tables) -> np.ndarray:
    """GELU on raw activations: table on [-R, R) with linear interpolation, 0 below, identity above."""
    fa, gb = cfg.act.frac, cfg.gelu_bits
    lim = cfg.gelu_range << fa
    x = np.asarray(x, dtype=np.int64)
    u = np.clip(x + lim, 0, 2 * lim - 1)
    idx = u >> (fa - gb)
    r = u & ((1 << (fa - gb)) - 1)
    v = _interp(tab.gelu, idx, r, fa - gb)
    return np.where(x < -lim, 0, np.where(x >= lim, x, v))
