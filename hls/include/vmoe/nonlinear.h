// exp, reciprocal, 1/sqrt and GELU as tables + linear interpolation in integer arithmetic (no hls_math), so
// g++ C-simulation is bit-exact with synthesis and with the NumPy reference (fixed.py: exp_fx, recip_fx, ...).
// Needs defines.h (types and F_* constants) and tables.h (VMOE_* tables) included before.
#ifndef VMOE_NONLINEAR_H
#define VMOE_NONLINEAR_H

#include "fixed_ops.h"

namespace vmoe {

// exp(x) for x <= 0: 2^(x log2 e) = 2^frac (table) >> -floor.
inline exp_t vexp(const act_t &x) {
    wide_t y = (raw(x) * wide_t(VMOE_LOG2E)) >> F_E;  // x log2(e), F_A fraction bits, <= 0
    wide_t fl = y >> F_A;                               // floor, <= 0
    wide_t f = y & wide_t((1LL << F_A) - 1);            // fraction in [0, 1)
    int idx = (f >> (F_A - TABLE_BITS)).to_int();
    wide_t r = f & wide_t((1LL << (F_A - TABLE_BITS)) - 1);
    wide_t v = interp(VMOE_EXP2, idx, r, F_A - TABLE_BITS);  // [1, 2], TABLE_FRAC fraction bits
    wide_t sh = -fl + (TABLE_FRAC - F_E);
    wide_t res = 0;
    if (sh < 62) res = v >> sh.to_int();
    return from_raw<exp_t>(res);
}

// Table index, remainder and remainder width of a positive value whose top bit is b.
inline void mantissa(const wide_t &v, int b, int &idx, wide_t &r, int &sh) {
    const wide_t mask = (1 << TABLE_BITS) - 1;
    if (b >= TABLE_BITS) {
        sh = b - TABLE_BITS;
        idx = ((v >> sh) & mask).to_int();
        r = v & ((wide_t(1) << sh) - 1);
    } else {
        sh = 0;
        idx = ((v << (TABLE_BITS - b)) & mask).to_int();
        r = 0;
    }
}

// v << s saturating at lim for s >= 0, v >> -s otherwise.
inline wide_t shift_sat(const wide_t &v, int s, const wide_t &lim) {
    if (s >= 0) return (v > (lim >> s)) ? lim : wide_t(v << s);
    return v >> (-s);
}

// 1/x for x > 0 (values <= 0 are treated as the smallest positive value), saturating.
inline act_t vrecip(const act_t &x) {
    wide_t v = raw(x);
    if (v < 1) v = 1;
    int b = msb(v), idx, sh;
    wide_t r;
    mantissa(v, b, idx, r, sh);
    wide_t t = interp(VMOE_RECIP, idx, r, sh);  // 1 / mantissa, TABLE_FRAC fraction bits
    const wide_t lim = (wide_t(1) << (act_t::width - 1)) - 1;
    return from_raw<act_t>(shift_sat(t, 2 * F_A - TABLE_FRAC - b, lim));
}

// 1/sqrt(v) for the LayerNorm variance, saturating.
inline rstd_t vrsqrt(const var_t &x) {
    wide_t v = raw(x);
    if (v < 1) v = 1;
    int b = msb(v), idx, sh;
    wide_t r;
    mantissa(v, b, idx, r, sh);
    int e = b - F_V;
    bool odd = (e & 1) != 0;
    wide_t t = odd ? interp(VMOE_RSQRT2, idx, r, sh) : interp(VMOE_RSQRT1, idx, r, sh);
    int ee = odd ? e - 1 : e;
    const wide_t lim = (wide_t(1) << rstd_t::width) - 1;
    return from_raw<rstd_t>(shift_sat(t, F_R - TABLE_FRAC - ee / 2, lim));
}

// GELU: table on [-R, R) step 2^-GELU_BITS with linear interpolation, 0 below, identity above.
inline act_t vgelu(const act_t &x) {
    wide_t xr = raw(x);
    const wide_t lim = wide_t(GELU_RANGE) << F_A;
    if (xr < -lim) return act_t(0);
    if (xr >= lim) return x;
    wide_t u = xr + lim;
    int idx = (u >> (F_A - GELU_BITS)).to_int();
    wide_t r = u & wide_t((1LL << (F_A - GELU_BITS)) - 1);
    return from_raw<act_t>(interp(VMOE_GELU, idx, r, F_A - GELU_BITS));
}

}  // namespace vmoe
#endif
