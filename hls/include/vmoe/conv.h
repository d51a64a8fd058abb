// Convolutional stem (timm ConvStem: 3x3 convolutions, zero padding 1, stride 1 or 2, BatchNorm folded into the
// weights by the generator, ReLU; the last conv projects to the embedding without ReLU). It reuses the unified
// compute unit: a line buffer holds the three input rows an output row needs (rows enter it once per weight tile
// as the output row advances: one per row at stride 1, two at stride 2), the output row's im2col rows (ky, kx, c
// order, zeros outside the image) are read from it, and the linear unit's MAC array computes one weight tile for
// the whole output row. Tiles are the outer loop, so each weight tile is read from DRAM once per stage (the next
// tile is fetched while the current one computes); the line buffer is refilled per tile.
#ifndef VMOE_CONV_H
#define VMOE_CONV_H

#include "linear.h"

namespace vmoe {

#if NUM_STEM > 0
// Pixels (3, H, W) -> normalised (H, W, 3): x = v * a + b per channel (v = raw byte / 256). Not folded into the
// first conv: its zero padding is in normalised units.
inline void stem_input(const pixel_t *img, act_t *fm) {
    par_for<VEC_PAR, CNT_VEC>(IMG_H * IMG_W, [&](int i) {
        for (int c = 0; c < 3; c++) {
#pragma HLS UNROLL
            wide_t t = raw(img[c * IMG_H * IMG_W + i]) * wide_t(STEM_A_RAW[c]) + (wide_t(STEM_B_RAW[c]) << F_P);
            fm[i * 3 + c] = from_raw<act_t>(t >> F_P);
        }
    });
}

// in (H, W, C_in) -> out rows of (H_out, W_out, C_out) with row stride ldo (C_out, or the token stride).
inline void conv_stage(const act_t *in, act_t *out, int ldo, const conv_desc &cd, const weight_t *wts,
                       const w8_t *wts8, const scale_t *scales, const bias_t *bias) {
    static act_t lb[3][STEM_MAX_W * STEM_MAX_C];
    static act_t cols[STEM_MAX_WO * STEM_MAX_K];
    static weight_t wt_a[MAX_K * TILE], wt_b[MAX_K * TILE];
    static bias_t bt_a[TILE], bt_b[TILE];
    static scale_t st_a[TILE], st_b[TILE];
#pragma HLS ARRAY_PARTITION variable = lb dim = 1 complete
    const int K = 9 * cd.cin, rowlen = cd.w * cd.cin;
    const int tiles = (cd.cout + TILE - 1) / TILE;
    const int flags = cd.relu ? LIN_RELU : 0;
    load_tile(wts, wts8, bias, scales, 0, 0, K, cd.cout < TILE ? cd.cout : TILE, false, wt_a, bt_a, st_a);
conv_tiles:
    for (int t = 0; t < tiles; t++) {
        const int o0 = t * TILE, valid = (cd.cout - o0 < TILE) ? cd.cout - o0 : TILE;
        const int n0 = o0 + TILE, nvalid = (cd.cout - n0 < TILE) ? cd.cout - n0 : TILE;
        const bool more = t + 1 < tiles;
        if (more) {
            if (t & 1)
                load_tile(wts, wts8, bias, scales, (t + 1) * K * TILE, n0, K, nvalid, false, wt_a, bt_a, st_a);
            else
                load_tile(wts, wts8, bias, scales, (t + 1) * K * TILE, n0, K, nvalid, false, wt_b, bt_b, st_b);
        }
        const weight_t *wt = (t & 1) ? wt_b : wt_a;
        const bias_t *bt = (t & 1) ? bt_b : bt_a;
        const scale_t *st = (t & 1) ? st_b : st_a;
        int loaded = -1;  // highest input row in the line buffer
    conv_rows:
        for (int oy = 0; oy < cd.ho; oy++) {
            const int last = oy * cd.stride + 1 < cd.h ? oy * cd.stride + 1 : cd.h - 1;
            for (int iy = loaded + 1; iy <= last; iy++)  // one input row into line-buffer slot (row mod 3)
                par_for<VEC_PAR, CNT_VEC>(rowlen, [&](int i) { lb[iy % 3][i] = in[iy * rowlen + i]; });
            if (last > loaded) loaded = last;
            // the output row's im2col rows (ox, ky, kx, c), zeros outside the image: one flattened loop
            const int span = 9 * cd.cin, oy0 = oy * cd.stride - 1;
            par_for<VEC_PAR, CNT_VEC>(cd.wo * span, [&](int e) {
                const int ox = e / span, kk = (e % span) / cd.cin, c = e % cd.cin;
                const int iy = oy0 + kk / 3, ix = ox * cd.stride - 1 + kk % 3;
                const bool inside = iy >= 0 && iy < cd.h && ix >= 0 && ix < cd.w;
                cols[e] = inside ? lb[iy % 3][ix * cd.cin + c] : act_t(0);
            });
            compute_tile<act_t, acc_t>(cols, K, cd.wo, K, cd.cout, wt, bt, st, o0, valid, out + oy * cd.wo * ldo, ldo,
                                       flags, 0, 0, 0);
        }
    }
}
#endif

}  // namespace vmoe
#endif
