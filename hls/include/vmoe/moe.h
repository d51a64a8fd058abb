// The MoE layer, Edge-MoE style: a per-patch gate (online softmax over the task's experts, top-k), per-expert
// patch queues, then expert by expert: each expert's weights are read from DRAM once per layer, experts without
// patches are skipped, and the next non-empty expert's weights are loaded while the current one computes
// (ping-pong buffers). The expert outputs are multiplied by the gate score while they are accumulated.
#ifndef VMOE_MOE_H
#define VMOE_MOE_H

#include "linear.h"
#include "sim_stream.h"

namespace vmoe {

// Gate: z (ntok, E) logits -> idx (ntok, TOP_K) experts best first, w (ntok, TOP_K) softmax probabilities.
inline void route(const act_t *z, int ntok, int E, const bool *mask, int *idx, act_t *w) {
    const exp_t one = 1;
route_tokens:
    for (int t = 0; t < ntok; t++) {
#pragma HLS LOOP_TRIPCOUNT max = NUM_TOKENS
        const act_t *zt = z + t * E;
        act_t m = 0, l = 1;
        bool first = true;
        for (int e = 0; e < E; e++) {  // single pass: running max and rescaled running sum
#pragma HLS LOOP_TRIPCOUNT max = MAX_EXPERTS
            if (!mask[e]) continue;
            if (first) {
                m = zt[e];
                l = 1;
                first = false;
                continue;
            }
            const bool up = zt[e] > m;
            act_t diff = up ? act_t(m - zt[e]) : act_t(zt[e] - m);
            exp_t ex = vexp(diff);
            exp_t alpha = up ? ex : one;
            exp_t p = up ? one : ex;
            if (up) m = zt[e];
            l = l * alpha + p;
        }
        act_t inv = vrecip(l);
        act_t bv[TOP_K];
        int bi[TOP_K];
        int n = 0;
        for (int e = 0; e < E; e++) {  // top-k by insertion; the lower index wins ties
#pragma HLS LOOP_TRIPCOUNT max = MAX_EXPERTS
            if (!mask[e]) continue;
            int pos = n;
            while (pos > 0 && zt[e] > bv[pos - 1]) pos--;
            if (pos < TOP_K) {
                for (int q = (n < TOP_K - 1 ? n : TOP_K - 1); q > pos; q--) {
                    bv[q] = bv[q - 1];
                    bi[q] = bi[q - 1];
                }
                bv[pos] = zt[e];
                bi[pos] = e;
                if (n < TOP_K) n++;
            }
        }
        for (int s = 0; s < TOP_K; s++) {
            act_t diff = bv[s] - m;
            exp_t ex = vexp(diff);
            act_t ws = ex * inv;
            w[t * TOP_K + s] = ws;
            idx[t * TOP_K + s] = bi[s];
        }
        if (RENORMALIZE) {
            act_t tot = 0;
            for (int s = 0; s < TOP_K; s++) tot = tot + w[t * TOP_K + s];
            act_t rr = vrecip(tot);
            for (int s = 0; s < TOP_K; s++) w[t * TOP_K + s] = w[t * TOP_K + s] * rr;
        }
    }
}

// One expert's weights (fc1 tiles then fc2 tiles) and biases (b1 then b2): DRAM -> stream -> on-chip buffer.
inline void load_expert(const weight_t *wsrc, const bias_t *bsrc, weight_t *wdst, bias_t *bdst) {
    hls::stream<weight_t> s;
#pragma HLS STREAM variable = s depth = 64
    for (int i = 0; i < EXPERT_W_SIZE; i++) {
#pragma HLS PIPELINE II = 1
        s.write(wsrc[i]);
        wdst[i] = s.read();
    }
    for (int i = 0; i < EXPERT_B_SIZE; i++) {
#pragma HLS PIPELINE II = 1
        bdst[i] = bsrc[i];
    }
}

// x += MoE(h): md describes the layer, gate_w/gate_b are the selected task's gate, mask its experts.
inline void moe_layer(const act_t *h, act_t *x, act_t *z, int ntok, const moe_desc &md, int task,
                      const weight_t *wts, const bias_t *bias) {
    static int idx[NUM_TOKENS * TOP_K];
    static act_t wgt[NUM_TOKENS * TOP_K];
    static int queue[MAX_EXPERTS][NUM_TOKENS];
    static act_t qscore[MAX_EXPERTS][NUM_TOKENS];
    static act_t hid[NUM_TOKENS * EXPERT_HIDDEN];
    static act_t y[NUM_TOKENS * EMBED_DIM];
    static weight_t ebuf[2][EXPERT_W_SIZE];
    static bias_t ebias[2][EXPERT_B_SIZE];
    int qlen[MAX_EXPERTS];
    int order[MAX_EXPERTS];
    const int E = md.num_experts;
    route(z, ntok, E, md.mask[task], idx, wgt);
    for (int e = 0; e < E; e++) qlen[e] = 0;
    for (int t = 0; t < ntok; t++) {  // per-expert patch queues, in patch order
        for (int s = 0; s < TOP_K; s++) {
            const int e = idx[t * TOP_K + s];
            queue[e][qlen[e]] = t;
            qscore[e][qlen[e]] = wgt[t * TOP_K + s];
            qlen[e]++;
        }
    }
    for (int i = 0; i < ntok * EMBED_DIM; i++) y[i] = 0;
    int active = 0;
    for (int e = 0; e < E; e++)
        if (qlen[e] > 0) order[active++] = e;  // experts without patches are skipped: no weight traffic
    if (active > 0) load_expert(wts + md.w[order[0]], bias + md.b[order[0]], ebuf[0], ebias[0]);
expert_loop:
    for (int i = 0; i < active; i++) {
#pragma HLS LOOP_TRIPCOUNT max = MAX_EXPERTS
        const int e = order[i], cur = i & 1;
        if (i + 1 < active)  // prefetch the next expert while this one computes
            load_expert(wts + md.w[order[i + 1]], bias + md.b[order[i + 1]], ebuf[cur ^ 1], ebias[cur ^ 1]);
        linear_unit<act_t, acc_t>(h, EMBED_DIM, qlen[e], EMBED_DIM, EXPERT_HIDDEN, ebuf[cur], ebias[cur], hid,
                                  EXPERT_HIDDEN, LIN_GATHER | LIN_GELU, queue[e], 0);
        linear_unit<act_t, acc_t>(hid, EXPERT_HIDDEN, qlen[e], EXPERT_HIDDEN, EMBED_DIM, ebuf[cur] + EXPERT_W1_SIZE,
                                  ebias[cur] + EXPERT_HIDDEN, y, EMBED_DIM, LIN_SCATTER_ACC, queue[e], qscore[e]);
    }
    for (int i = 0; i < ntok * EMBED_DIM; i++) x[i] = x[i] + y[i];
}

}  // namespace vmoe
#endif
