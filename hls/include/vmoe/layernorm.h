// LayerNorm over the embedding dim, VEC_PAR channels per cycle: exact sum, mean = sum * (1/C), deviations,
// variance, 1/sqrt by table. Three passes of ceil(C / VEC_PAR) cycles per row. The sums are exact (wide fixed
// point), so the lane split does not change the result.
#ifndef VMOE_LAYERNORM_H
#define VMOE_LAYERNORM_H

#include "nonlinear.h"

namespace vmoe {

inline void layernorm(const act_t *x, act_t *y, int rows, int dim, const bias_t *gamma, const bias_t *beta) {
    const inv_t inv_dim = from_raw<inv_t>(wide_t(INV_DIM_RAW));
    const var_t eps = from_raw<var_t>(wide_t(LN_EPS_RAW));
    act_t d[EMBED_DIM];
#pragma HLS ARRAY_PARTITION variable = d cyclic factor = VEC_PAR
ln_rows:
    for (int r = 0; r < rows; r++) {
#pragma HLS LOOP_TRIPCOUNT max = NUM_TOKENS
        const act_t *xr = x + r * dim;
        sum_t s = 0;  // exact: the lanes' order does not matter
        par_for<VEC_PAR, CNT_VEC>(dim, [&](int c) { s += xr[c]; });
        act_t mean = s * inv_dim;
        sqsum_t vs = 0;
        par_for<VEC_PAR, CNT_VEC>(dim, [&](int c) {
            d[c] = xr[c] - mean;
            sq_t sq = d[c] * d[c];
            vs += sq;
        });
        var_t var = vs * inv_dim;
        var = var + eps;
        rstd_t rs = vrsqrt(var);
        par_for<VEC_PAR, CNT_VEC>(dim, [&](int c) {
            act_t n = d[c] * rs;
            y[r * dim + c] = n * gamma[c] + beta[c];
        });
    }
}

}  // namespace vmoe
#endif
