// LayerNorm over the embedding dim: exact sum, mean = sum * (1/C), deviations, variance, 1/sqrt by table.
#ifndef VMOE_LAYERNORM_H
#define VMOE_LAYERNORM_H

#include "nonlinear.h"

namespace vmoe {

inline void layernorm(const act_t *x, act_t *y, int rows, int dim, const bias_t *gamma, const bias_t *beta) {
    const inv_t inv_dim = from_raw<inv_t>(wide_t(INV_DIM_RAW));
    const var_t eps = from_raw<var_t>(wide_t(LN_EPS_RAW));
    act_t d[EMBED_DIM];
ln_rows:
    for (int r = 0; r < rows; r++) {
#pragma HLS LOOP_TRIPCOUNT max = NUM_TOKENS
        const act_t *xr = x + r * dim;
        sum_t s = 0;
        for (int c = 0; c < dim; c++) {
#pragma HLS PIPELINE II = 1
            s += xr[c];
        }
        act_t mean = s * inv_dim;
        sqsum_t vs = 0;
        for (int c = 0; c < dim; c++) {
#pragma HLS PIPELINE II = 1
            d[c] = xr[c] - mean;
            sq_t sq = d[c] * d[c];
            vs += sq;
        }
        var_t var = vs * inv_dim;
        var = var + eps;
        rstd_t rs = vrsqrt(var);
        for (int c = 0; c < dim; c++) {
#pragma HLS PIPELINE II = 1
            act_t n = d[c] * rs;
            y[r * dim + c] = n * gamma[c] + beta[c];
        }
    }
}

}  // namespace vmoe
#endif
