// The unified matrix compute unit: every linear layer (patch embedding, stem convolutions through im2col rows, QKV,
// projection, MLP, gates, experts, head) runs on its TILE x PAR_IN array of MACs.
//
//   y[r][o] = act_t(b[o] + sum_k x[r][k] * W[k][o])                 16-bit weights (weight_t)
//   y[r][o] = act_t(s[o] * sum_k x[r][k] * q[k][o] + b[o])          8-bit weights (w8_t) with a per-channel scale
//
// The accumulators are ap_fixed<64, .> holding the exact products, so the sum does not depend on its order.
// Weights are tile-major: tile t holds K rows of TILE output columns (the last tile zero-padded), contiguous, so a
// tile is one burst of ceil(K * TILE / LOAD_PAR) beats (LOAD_PAR weights per AXI beat: AXI_BITS / weight bits).
// Each tile is fetched once per call and used for every row; the next tile is fetched into the other buffer while
// the current one computes (explicit ping-pong: the two calls touch disjoint arrays, so they can run concurrently).
// 8-bit tiles are widened to weight_t on chip (the raw integer q), so one MAC array serves both widths; the scale
// is applied once per output in the epilogue.
// Per row: ceil(K / PAR_IN) cycles of MACs, overlapped with the previous row's ceil(valid / OUT_PAR) cycles of
// epilogue.
// Flags:
//   LIN_GELU / LIN_RELU   activation on the outputs
//   LIN_GATHER            input row r is x[queue[r]] (only the tokens routed to one expert)
//   LIN_GATHER_SLOT       ... starting at column slot[r] * K (Mod-Squad: the slot's attention output)
//   LIN_SCATTER_SLOT      y[queue[r]][slot[r] * O + o] = out (Mod-Squad: the slot's query)
//   LIN_SCATTER_ACC       y[queue[r]][o] += act_t(score[r] * out): multiply by the gate score while accumulating
//   LIN_RESIDUAL          y[r][o] += out (residual connection)
//   LIN_W8                8-bit weights with per-output-channel scales
//   LIN_ONCHIP            w16 / b / scale point at on-chip buffers holding every tile (an expert loaded once)
#ifndef VMOE_LINEAR_H
#define VMOE_LINEAR_H

#include "nonlinear.h"

namespace vmoe {

enum {
    LIN_GELU = 1,
    LIN_RELU = 2,
    LIN_GATHER = 4,
    LIN_GATHER_SLOT = 8,
    LIN_SCATTER_SLOT = 16,
    LIN_SCATTER_ACC = 32,
    LIN_RESIDUAL = 64,
    LIN_W8 = 128,
    LIN_ONCHIP = 256
};

// One weight tile (K x TILE, starting at weight offset wo) with its biases and scales (starting at output o0):
// DRAM -> on-chip buffers.
inline void load_tile(const weight_t *w16, const w8_t *w8, const bias_t *b, const scale_t *sc, int wo, int o0, int K,
                      int valid, bool is8, weight_t *wt, bias_t *bt, scale_t *st) {
    if (is8)
        par_for<LOAD8_PAR, CNT_LOAD>(K * TILE, [&](int i) { wt[i] = from_raw<weight_t>(raw(w8[wo + i])); });
    else
        par_for<LOAD16_PAR, CNT_LOAD>(K * TILE, [&](int i) { wt[i] = w16[wo + i]; });
    par_for<LOAD16_PAR, CNT_LOAD>(valid, [&](int j) { bt[j] = b[o0 + j]; });
    if (is8) par_for<LOAD32_PAR, CNT_LOAD>(valid, [&](int j) { st[j] = sc[o0 + j]; });
}

// act_t(acc * scale + bias) for 8-bit weights: acc holds sum x * q exactly (q as the raw of a weight_t), so
// raw(acc) * raw(scale) >> F_S has F_A fraction bits; the product is exact (96 bits), the result wraps like
// every assignment to act_t.
template <class TAcc>
inline act_t scale_out(const TAcc &acc, const scale_t &s, const bias_t &b) {
    ap_int<96> p = ap_int<96>(raw(acc)) * ap_int<96>(raw(s));
    ap_int<96> t = (p >> F_S) + (ap_int<96>(raw(b)) << (F_A - F_B));
    return from_raw<act_t>(wide_t(t));
}

// One tile of output columns [o0, o0 + valid) for every row. The epilogue of row r - 1 (OUT_PAR outputs per cycle,
// from a latched copy of its accumulators) runs during the MACs of row r (PAR_IN inputs per cycle), so a row costs
// max(ceil(K / PAR_IN), ceil(valid / OUT_PAR)) cycles; the inputs and outputs of every call are distinct arrays.
template <class TIn, class TAcc>
void compute_tile(const TIn *x, int ldx, int rows, int K, int O, const weight_t *wt, const bias_t *bt,
                  const scale_t *st, int o0, int valid, act_t *y, int ldy, int flags, const int *queue,
                  const int *slot, const act_t *score) {
    const bool is8 = flags & LIN_W8;
    const int ki = (K + PAR_IN - 1) / PAR_IN, oi = (valid + OUT_PAR - 1) / OUT_PAR;
    const int step = ki > oi ? ki : oi;
    TAcc acc[TILE], lat[TILE];
#pragma HLS ARRAY_PARTITION variable = acc complete
#pragma HLS ARRAY_PARTITION variable = lat complete
    const TIn *xr = x;
    int lr = -1;  // row whose accumulators are latched for the epilogue
row_step_loop:
    for (int it = 0; it < (rows + 1) * step; it++) {
#pragma HLS LOOP_TRIPCOUNT max = (NUM_TOKENS + 1) * MAX_K / PAR_IN
#pragma HLS PIPELINE II = 1
        const int r = it / step, s = it % step;
        if (s == 0) {
            if (r > 0) {
                for (int j = 0; j < TILE; j++) {
#pragma HLS UNROLL
                    lat[j] = acc[j];
                }
                lr = r - 1;
            }
            if (r < rows) {
                const int src = (flags & LIN_GATHER) ? queue[r] : r;
                const int col = (flags & LIN_GATHER_SLOT) ? slot[r] * K : 0;
                xr = x + src * ldx + col;
                for (int j = 0; j < TILE; j++) {
#pragma HLS UNROLL
                    acc[j] = (j < valid && !is8) ? TAcc(bt[j]) : TAcc(0);
                }
            }
        }
        if (r < rows && s < ki) {  // PAR_IN inputs x TILE columns of MACs
            VMOE_COUNT(CNT_MAC);
            for (int p = 0; p < PAR_IN; p++) {
#pragma HLS UNROLL
                const int k = s * PAR_IN + p;
                if (k < K) {
                    const TIn xv = xr[k];
                    for (int j = 0; j < TILE; j++) {
#pragma HLS UNROLL
                        acc[j] += xv * wt[k * TILE + j];
                    }
                }
            }
        }
        if (lr >= 0 && s < oi) {  // OUT_PAR outputs of the latched row
            VMOE_COUNT(CNT_OUT);
            for (int q = 0; q < OUT_PAR; q++) {
#pragma HLS UNROLL
                const int j = s * OUT_PAR + q;
                if (j >= valid) continue;
                act_t v = is8 ? scale_out(lat[j], st[j], bt[j]) : act_t(lat[j]);
                if (flags & LIN_GELU) v = vgelu(v);
                if ((flags & LIN_RELU) && v < 0) v = 0;
                const int o = o0 + j;
                if (flags & LIN_SCATTER_ACC) {
                    act_t wv = score[lr] * v;
                    act_t &dst = y[queue[lr] * ldy + o];
                    dst = dst + wv;
                } else if (flags & LIN_SCATTER_SLOT) {
                    y[queue[lr] * ldy + slot[lr] * O + o] = v;
                } else if (flags & LIN_RESIDUAL) {
                    y[lr * ldy + o] = y[lr * ldy + o] + v;
                } else {
                    y[lr * ldy + o] = v;
                }
            }
        }
    }
}

template <class TIn, class TAcc>
void linear_unit(const TIn *x, int ldx, int rows, int K, int O, const weight_t *w16, const w8_t *w8,
                 const scale_t *sc, const bias_t *b, act_t *y, int ldy, int flags, const int *queue, const int *slot,
                 const act_t *score) {
    static weight_t wt_a[MAX_K * TILE], wt_b[MAX_K * TILE];
    static bias_t bt_a[TILE], bt_b[TILE];
    static scale_t st_a[TILE], st_b[TILE];
#pragma HLS ARRAY_PARTITION variable = wt_a cyclic factor = TILE
#pragma HLS ARRAY_PARTITION variable = wt_b cyclic factor = TILE
    const int tiles = (O + TILE - 1) / TILE;
    const bool is8 = flags & LIN_W8;
    if (rows <= 0) return;
    if (flags & LIN_ONCHIP) {  // every tile is already on chip (an expert loaded once per layer)
    onchip_tiles:
        for (int t = 0; t < tiles; t++) {
            const int o0 = t * TILE, valid = (O - o0 < TILE) ? O - o0 : TILE;
            compute_tile<TIn, TAcc>(x, ldx, rows, K, O, w16 + t * K * TILE, b + o0, sc + o0, o0, valid, y, ldy,
                                    flags, queue, slot, score);
        }
        return;
    }
    const int valid0 = (O < TILE) ? O : TILE;
    load_tile(w16, w8, b, sc, 0, 0, K, valid0, is8, wt_a, bt_a, st_a);
tile_loop:
    for (int t = 0; t < tiles; t++) {
#pragma HLS LOOP_TRIPCOUNT max = MAX_O / TILE
        const int o0 = t * TILE, valid = (O - o0 < TILE) ? O - o0 : TILE;
        const int n0 = o0 + TILE, nvalid = (O - n0 < TILE) ? O - n0 : TILE;
        const bool more = t + 1 < tiles;
        const int off = (t + 1) * K * TILE;
        if (t & 1) {
            if (more) load_tile(w16, w8, b, sc, off, n0, K, nvalid, is8, wt_a, bt_a, st_a);
            compute_tile<TIn, TAcc>(x, ldx, rows, K, O, wt_b, bt_b, st_b, o0, valid, y, ldy, flags, queue, slot,
                                    score);
        } else {
            if (more) load_tile(w16, w8, b, sc, off, n0, K, nvalid, is8, wt_b, bt_b, st_b);
            compute_tile<TIn, TAcc>(x, ldx, rows, K, O, wt_a, bt_a, st_a, o0, valid, y, ldy, flags, queue, slot,
                                    score);
        }
    }
}

// One linear layer described by its wref (parameters.h): 16-bit weights in wts, or 8-bit ones in wts8.
template <class TIn, class TAcc>
void linear_layer(const TIn *x, int ldx, int rows, int K, int O, const wref &L, const weight_t *wts,
                  const w8_t *wts8, const scale_t *scales, const bias_t *bias, act_t *y, int ldy, int flags) {
    if (L.is8)
        linear_unit<TIn, TAcc>(x, ldx, rows, K, O, wts, wts8 + L.w, scales + L.s, bias + L.b, y, ldy, flags | LIN_W8,
                               0, 0, 0);
    else
        linear_unit<TIn, TAcc>(x, ldx, rows, K, O, wts + L.w, wts8, scales, bias + L.b, y, ldy, flags, 0, 0, 0);
}

// Element-wise y[i] += a[i] over n values, VEC_PAR per cycle (the MoE residual).
inline void vec_add(act_t *y, const act_t *a, int n) {
    par_for<VEC_PAR, CNT_VEC>(n, [&](int i) { y[i] = y[i] + a[i]; });
}

// y[i] = 0 over n values, VEC_PAR per cycle.
inline void vec_zero(act_t *y, int n) {
    par_for<VEC_PAR, CNT_VEC>(n, [&](int i) { y[i] = 0; });
}

}  // namespace vmoe
#endif
