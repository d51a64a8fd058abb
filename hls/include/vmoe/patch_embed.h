// Patch embedding: gather each patch's pixels (c, ky, kx order, like the conv weight) and run the unified linear
// unit on them (input normalisation is folded into the weights by the generator), then add the position embedding
// and put the class token (+ its position embedding) in row 0.
#ifndef VMOE_PATCH_EMBED_H
#define VMOE_PATCH_EMBED_H

#include "linear.h"

namespace vmoe {

inline void patch_embed(const pixel_t *img, act_t *x, const weight_t *w, const bias_t *b, const bias_t *cls_pos,
                        const bias_t *pos) {
    static pixel_t patches[NUM_PATCHES * PATCH_K];
patch_gather:
    for (int py = 0; py < GRID_H; py++)
        for (int px = 0; px < GRID_W; px++)
            for (int c = 0; c < 3; c++)
                for (int ky = 0; ky < PATCH; ky++)
                    for (int kx = 0; kx < PATCH; kx++) {
#pragma HLS PIPELINE II = 1
                        patches[(py * GRID_W + px) * PATCH_K + (c * PATCH + ky) * PATCH + kx] =
                            img[(c * IMG_H + py * PATCH + ky) * IMG_W + px * PATCH + kx];
                    }
    linear_unit<pixel_t, acc_px_t>(patches, PATCH_K, NUM_PATCHES, PATCH_K, EMBED_DIM, w, b, x + EMBED_DIM, EMBED_DIM,
                                   0, 0, 0);
    for (int c = 0; c < EMBED_DIM; c++) x[c] = cls_pos[c];
    for (int i = 0; i < NUM_PATCHES * EMBED_DIM; i++) {
#pragma HLS PIPELINE II = 1
        x[EMBED_DIM + i] = x[EMBED_DIM + i] + pos[i];
    }
}

}  // namespace vmoe
#endif
