// The unified matrix compute unit: every linear layer (patch embedding, QKV, projection, MLP, gate, experts, head)
// runs through linear_unit.
//
//   y[r][o] = act_t(b[o] + sum_k x[r][k] * W[k][o])        (TAcc: ap_fixed<64, .> holding exact products)
//
// Weights are tile-major: tile t holds K rows of TILE output columns (the last tile zero-padded), contiguous, so
// one burst fetches a tile; each tile is fetched once per call and used for every row (patch), and the next tile
// is fetched while the current one computes (ping-pong buffer). Flags:
//   LIN_GELU        fused GELU on the outputs
//   LIN_GATHER      input row r is x[queue[r]] (only the patches routed to one expert)
//   LIN_SCATTER_ACC y[queue[r]][o] += act_t(score[r] * out): multiply by the gate score while accumulating
//   LIN_RESIDUAL    y[r][o] += out (residual connection)
#ifndef VMOE_LINEAR_H
#define VMOE_LINEAR_H

#include "nonlinear.h"

namespace vmoe {

enum { LIN_GELU = 1, LIN_GATHER = 2, LIN_SCATTER_ACC = 4, LIN_RESIDUAL = 8 };

inline void load_tile(const weight_t *src, weight_t *dst, int n) {
load_tile_loop:
    for (int i = 0; i < n; i++) {
#pragma HLS PIPELINE II = 1
#pragma HLS LOOP_TRIPCOUNT max = MAX_K * TILE
        dst[i] = src[i];
    }
}

template <class TIn, class TAcc>
void linear_unit(const TIn *x, int ldx, int rows, int K, int O, const weight_t *w, const bias_t *b, act_t *y,
                 int ldy, int flags, const int *queue, const act_t *score) {
    static weight_t wtile[2][MAX_K * TILE];
#pragma HLS ARRAY_PARTITION variable = wtile dim = 2 cyclic factor = TILE
    const int tiles = (O + TILE - 1) / TILE;
    load_tile(w, wtile[0], K * TILE);
tile_loop:
    for (int t = 0; t < tiles; t++) {
#pragma HLS LOOP_TRIPCOUNT max = MAX_O / TILE
        const int cur = t & 1;
        if (t + 1 < tiles) load_tile(w + (t + 1) * K * TILE, wtile[cur ^ 1], K * TILE);  // prefetch next tile
        const int o0 = t * TILE;
        const int valid = (O - o0 < TILE) ? O - o0 : TILE;
    row_loop:
        for (int r = 0; r < rows; r++) {
#pragma HLS LOOP_TRIPCOUNT max = NUM_TOKENS
            const int src = (flags & LIN_GATHER) ? queue[r] : r;
            const TIn *xr = x + src * ldx;
            TAcc acc[TILE];
#pragma HLS ARRAY_PARTITION variable = acc complete
            for (int j = 0; j < TILE; j++) {
#pragma HLS UNROLL
                acc[j] = (j < valid) ? TAcc(b[o0 + j]) : TAcc(0);
            }
        k_loop:
            for (int k0 = 0; k0 < K; k0 += PAR_IN) {  // PAR_IN inputs x TILE columns of MACs per cycle
#pragma HLS LOOP_TRIPCOUNT max = MAX_K / PAR_IN
#pragma HLS PIPELINE II = 1
                for (int p = 0; p < PAR_IN; p++) {
#pragma HLS UNROLL
                    const int k = k0 + p;
                    if (k >= K) break;
                    const TIn xv = xr[k];
                    for (int j = 0; j < TILE; j++) {
#pragma HLS UNROLL
                        acc[j] += xv * wtile[cur][k * TILE + j];
                    }
                }
            }
            for (int j = 0; j < valid; j++) {
#pragma HLS PIPELINE II = 1
                act_t v = acc[j];
                if (flags & LIN_GELU) v = vgelu(v);
                const int o = o0 + j;
                if (flags & LIN_SCATTER_ACC) {
                    act_t wv = score[r] * v;
                    act_t &dst = y[queue[r] * ldy + o];
                    dst = dst + wv;
                } else if (flags & LIN_RESIDUAL) {
                    y[r * ldy + o] = y[r * ldy + o] + v;
                } else {
                    y[r * ldy + o] = v;
                }
            }
        }
    }
}

}  // namespace vmoe
#endif
