// Patch embedding: gather each patch's pixels (c, ky, kx order, like the conv weight) and run the unified linear
// unit on them (input normalisation is folded into the weights by the generator), then add the position embedding
// and put the class token (+ its position embedding) in row 0.
#ifndef VMOE_PATCH_EMBED_H
#define VMOE_PATCH_EMBED_H

#include "linear.h"

namespace vmoe {

#if NUM_STEM == 0
inline void patch_embed(const pixel_t *img, act_t *x, const wref &L, const weight_t *wts, const w8_t *wts8,
                        const scale_t *scales, const bias_t *bias) {
    static pixel_t patches[NUM_PATCHES * PATCH_K];
patch_gather:
    for (int py = 0; py < GRID_H; py++)
        for (int px = 0; px < GRID_W; px++)
            for (int c = 0; c < 3; c++)
                for (int ky = 0; ky < PATCH; ky++) {
                    pixel_t *dst = patches + (py * GRID_W + px) * PATCH_K + (c * PATCH + ky) * PATCH;
                    const pixel_t *src = img + (c * IMG_H + py * PATCH + ky) * IMG_W + px * PATCH;
                    par_for<VEC_PAR, CNT_VEC>(PATCH, [&](int kx) { dst[kx] = src[kx]; });
                }
    linear_layer<pixel_t, acc_px_t>(patches, PATCH_K, NUM_PATCHES, PATCH_K, EMBED_DIM, L, wts, wts8, scales, bias,
                                    x + EMBED_DIM, EMBED_DIM, 0);
}
#endif

// Row 0: class token + its position embedding; rows 1..: the patch tokens + their position embeddings.
inline void add_position(act_t *x, const bias_t *cls_pos, const bias_t *pos) {
    par_for<VEC_PAR, CNT_VEC>(EMBED_DIM, [&](int c) { x[c] = cls_pos[c]; });
    act_t *t = x + EMBED_DIM;
    par_for<VEC_PAR, CNT_VEC>(NUM_PATCHES * EMBED_DIM, [&](int i) { t[i] = t[i] + pos[i]; });
}

// Mod-Squad: x += the task's embedding of this block, on every token.
inline void add_task_embed(act_t *x, const bias_t *te) {
    par_for<VEC_PAR, CNT_VEC>(NUM_TOKENS * EMBED_DIM, [&](int i) { x[i] = x[i] + te[i % EMBED_DIM]; });
}

}  // namespace vmoe
#endif
