// Multi-head self-attention with a single-pass (online) softmax.
//
// Reordering (Edge-MoE's idea of constant bandwidth): ATTN_ROWS query rows are processed together; for each key
// j the key/value row of the head is read ONCE and consumed by all ATTN_ROWS rows, so the K/V traffic per cycle
// does not grow with the number of query rows processed in parallel. Each (row, head) keeps a running max m,
// running sum l and running output o; a new score s rescales them by exp(m_old - m_new), so the softmax needs no
// second pass over the scores. The 1/sqrt(head_dim) scale is folded into the query projection by the generator.
#ifndef VMOE_ATTENTION_H
#define VMOE_ATTENTION_H

#include "nonlinear.h"

namespace vmoe {

inline void attention(const act_t *qkv, act_t *out, int ntok) {
    const int C = EMBED_DIM, D = HEAD_DIM;
    const exp_t one = 1;
    act_t m[ATTN_ROWS], l[ATTN_ROWS], o[ATTN_ROWS][HEAD_DIM];
#pragma HLS ARRAY_PARTITION variable = m complete
#pragma HLS ARRAY_PARTITION variable = l complete
#pragma HLS ARRAY_PARTITION variable = o dim = 1 complete
    act_t kj[HEAD_DIM], vj[HEAD_DIM];
attn_block:
    for (int i0 = 0; i0 < ntok; i0 += ATTN_ROWS) {
#pragma HLS LOOP_TRIPCOUNT max = NUM_TOKENS / ATTN_ROWS
    attn_head:
        for (int h = 0; h < NUM_HEADS; h++) {
        attn_key:
            for (int j = 0; j < ntok; j++) {
#pragma HLS LOOP_TRIPCOUNT max = NUM_TOKENS
                for (int d = 0; d < D; d++) {  // one read of key/value row j for all rows of the block
#pragma HLS PIPELINE II = 1
                    kj[d] = qkv[j * 3 * C + C + h * D + d];
                    vj[d] = qkv[j * 3 * C + 2 * C + h * D + d];
                }
            attn_row:
                for (int r = 0; r < ATTN_ROWS; r++) {
#pragma HLS UNROLL
                    const int i = i0 + r;
                    if (i >= ntok) continue;
                    acc_qk_t acc = 0;
                    for (int d = 0; d < D; d++) {
#pragma HLS PIPELINE II = 1
                        acc += qkv[i * 3 * C + h * D + d] * kj[d];
                    }
                    act_t s = acc;
                    if (j == 0) {
                        m[r] = s;
                        l[r] = 1;
                        for (int d = 0; d < D; d++) o[r][d] = vj[d];
                        continue;
                    }
                    const bool up = s > m[r];
                    act_t diff = up ? act_t(m[r] - s) : act_t(s - m[r]);
                    exp_t e = vexp(diff);
                    exp_t alpha = up ? e : one;
                    exp_t p = up ? one : e;
                    if (up) m[r] = s;
                    l[r] = l[r] * alpha + p;
                    for (int d = 0; d < D; d++) {
#pragma HLS PIPELINE II = 1
                        o[r][d] = o[r][d] * alpha + p * vj[d];
                    }
                }
            }
            for (int r = 0; r < ATTN_ROWS; r++) {
                const int i = i0 + r;
                if (i >= ntok) continue;
                act_t inv = vrecip(l[r]);
                for (int d = 0; d < D; d++) {
#pragma HLS PIPELINE II = 1
                    out[i * C + h * D + d] = o[r][d] * inv;
                }
            }
        }
    }
}

}  // namespace vmoe
#endif
