// Multi-head self-attention with a single-pass (online) softmax.
//
// ATTN_ROWS query rows are processed together, ATTN_LANES head-dim values per cycle. For each key j the key/value
// row of the head is read once and consumed by all ATTN_ROWS rows (Edge-MoE's constant-bandwidth reordering). Each
// (row, head) keeps a running max m, running sum l and running output o; a new score s rescales them by
// exp(m_old - m_new), so the softmax needs no second pass over the scores and no N x N score matrix.
// The key loop is software-pipelined: iteration j computes the scores of key j and, on separate multipliers,
// folds key j - 1 into the outputs, so a key costs ceil(HEAD_DIM / ATTN_LANES) cycles (plus one drain iteration).
// The 1/sqrt(head_dim) scale is folded into the query projection by the generator.
//
// Query head h reads key/value head h % kv_heads: kv_heads = q_heads for dense attention; Mod-Squad's MoE
// attention has top_k slots per token, each an expert's expert_heads query heads over the shared key/value heads.
#ifndef VMOE_ATTENTION_H
#define VMOE_ATTENTION_H

#include "nonlinear.h"

namespace vmoe {

inline void attention(const act_t *q, int ldq, const act_t *k, const act_t *v, int ldkv, act_t *out, int ldo,
                      int ntok, int q_heads, int kv_heads) {
    const int D = HEAD_DIM;
    const exp_t one = 1;
    act_t m[ATTN_ROWS], l[ATTN_ROWS], o[ATTN_ROWS][HEAD_DIM], qr[ATTN_ROWS][HEAD_DIM], inv[ATTN_ROWS];
    acc_qk_t sacc[ATTN_ROWS];
    exp_t alpha[ATTN_ROWS], pw[ATTN_ROWS];
#pragma HLS ARRAY_PARTITION variable = m complete
#pragma HLS ARRAY_PARTITION variable = l complete
#pragma HLS ARRAY_PARTITION variable = sacc complete
#pragma HLS ARRAY_PARTITION variable = alpha complete
#pragma HLS ARRAY_PARTITION variable = pw complete
#pragma HLS ARRAY_PARTITION variable = o dim = 1 complete
#pragma HLS ARRAY_PARTITION variable = o dim = 2 cyclic factor = ATTN_LANES
#pragma HLS ARRAY_PARTITION variable = qr dim = 1 complete
#pragma HLS ARRAY_PARTITION variable = qr dim = 2 cyclic factor = ATTN_LANES
attn_block:
    for (int i0 = 0; i0 < ntok; i0 += ATTN_ROWS) {
#pragma HLS LOOP_TRIPCOUNT max = NUM_TOKENS / ATTN_ROWS
    attn_head:
        for (int h = 0; h < q_heads; h++) {
            const int hk = h % kv_heads;
            par_for<ATTN_LANES, CNT_ATTN>(D, [&](int d) {  // the block's query rows
                for (int r = 0; r < ATTN_ROWS; r++) {
#pragma HLS UNROLL
                    qr[r][d] = (i0 + r < ntok) ? q[(i0 + r) * ldq + h * D + d] : act_t(0);
                    o[r][d] = 0;
                }
            });
            for (int r = 0; r < ATTN_ROWS; r++) {
#pragma HLS UNROLL
                sacc[r] = 0;
                m[r] = 0;
                l[r] = 0;
                alpha[r] = 0;
                pw[r] = 0;
            }
        attn_key:
            for (int j = 0; j <= ntok; j++) {  // scores of key j, output update with key j - 1
#pragma HLS LOOP_TRIPCOUNT max = NUM_TOKENS + 1
                par_for<ATTN_LANES, CNT_ATTN>(D, [&](int d) {
                    if (j < ntok) {
                        const act_t kd = k[j * ldkv + hk * D + d];
                        for (int r = 0; r < ATTN_ROWS; r++) {
#pragma HLS UNROLL
                            sacc[r] += qr[r][d] * kd;
                        }
                    }
                    if (j > 0) {
                        const act_t vd = v[(j - 1) * ldkv + hk * D + d];
                        for (int r = 0; r < ATTN_ROWS; r++) {
#pragma HLS UNROLL
                            o[r][d] = o[r][d] * alpha[r] + pw[r] * vd;
                        }
                    }
                });
                if (j < ntok) {
                    for (int r = 0; r < ATTN_ROWS; r++) {  // online softmax state after key j
#pragma HLS UNROLL
                        const act_t s = sacc[r];
                        sacc[r] = 0;
                        if (j == 0) {  // first key: m = s, l = 1, o = v_0 (alpha 0, weight 1)
                            m[r] = s;
                            l[r] = 1;
                            alpha[r] = 0;
                            pw[r] = one;
                            continue;
                        }
                        const bool up = s > m[r];
                        act_t diff = up ? act_t(m[r] - s) : act_t(s - m[r]);
                        exp_t e = vexp(diff);
                        alpha[r] = up ? e : one;
                        pw[r] = up ? one : e;
                        if (up) m[r] = s;
                        l[r] = l[r] * alpha[r] + pw[r];
                    }
                }
            }
            for (int r = 0; r < ATTN_ROWS; r++) {
#pragma HLS UNROLL
                inv[r] = vrecip(l[r]);
            }
            par_for<ATTN_LANES, CNT_ATTN>(D, [&](int d) {
                for (int r = 0; r < ATTN_ROWS; r++) {
#pragma HLS UNROLL
                    if (i0 + r < ntok) out[(i0 + r) * ldo + h * D + d] = o[r][d] * inv[r];
                }
            });
        }
    }
}

}  // namespace vmoe
#endif
