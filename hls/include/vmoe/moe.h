// The MoE layers, Edge-MoE style: a per-token gate (online softmax over the task's experts, top-k), per-expert
// token queues, then expert by expert: each expert's weights are read from DRAM once per layer, experts without
// tokens are skipped, and the next non-empty expert's weights are loaded while the current one computes
// (explicit ping-pong buffers). The expert outputs are multiplied by the gate score while they are accumulated.
//
// MLP experts (M3ViT, Mod-Squad): fc1 -> GELU -> fc2 on the expert's queue.
// Attention experts (Mod-Squad): each (token, slot) gets its expert's query projection (expert_pass 1), the
// attention over the shared keys/values runs on all slots at once (attention.h), then the expert's output
// projection of each slot is weighted by the gate score and summed (moe_residual, pass 2). The query and the
// output halves of an expert are loaded in the two passes, so each weight is still read once per layer.
#ifndef VMOE_MOE_H
#define VMOE_MOE_H

#include "linear.h"

namespace vmoe {

// Routing state of the current MoE layer (filled by moe_route, read by the expert passes).
struct moe_state {
    int qlen[MAX_EXPERTS];
    int queue[MAX_EXPERTS][NUM_TOKENS];   // tokens routed to each expert, in token order
    int qslot[MAX_EXPERTS][NUM_TOKENS];   // the top-k slot each of them took the expert in
    act_t qscore[MAX_EXPERTS][NUM_TOKENS];  // the gate weight of that slot
    int order[MAX_EXPERTS];               // experts with at least one token, ascending
    int active;
};

inline moe_state &state() {
    static moe_state s;
    return s;
}

// Gate: z (ntok, E) logits -> per-expert queues of (token, slot, weight); top-k experts best first.
inline void moe_route(const act_t *z, int ntok, const moe_desc &md, int task) {
    moe_state &S = state();
    const int E = md.num_experts, K = md.top_k;
    const bool *mask = md.mask[task];
    const exp_t one = 1;
    for (int e = 0; e < E; e++) S.qlen[e] = 0;
route_tokens:
    for (int t = 0; t < ntok; t++) {
#pragma HLS LOOP_TRIPCOUNT max = NUM_TOKENS
        const act_t *zt = z + t * E;
        act_t m = 0, l = 1;
        bool first = true;
    route_softmax:
        for (int e = 0; e < E; e++) {  // single pass: running max and rescaled running sum
#pragma HLS PIPELINE II = 1
#pragma HLS LOOP_TRIPCOUNT max = MAX_EXPERTS
            VMOE_COUNT(CNT_ROUTE);
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
        act_t bv[MAX_TOP_K];
        int bi[MAX_TOP_K];
#pragma HLS ARRAY_PARTITION variable = bv complete
#pragma HLS ARRAY_PARTITION variable = bi complete
        int n = 0;
    route_topk:
        for (int e = 0; e < E; e++) {  // top-k by insertion; the lower index wins ties
#pragma HLS PIPELINE II = 1
#pragma HLS LOOP_TRIPCOUNT max = MAX_EXPERTS
            VMOE_COUNT(CNT_ROUTE);
            if (!mask[e]) continue;
            int pos = n;
            while (pos > 0 && zt[e] > bv[pos - 1]) pos--;
            if (pos < K) {
                for (int q = (n < K - 1 ? n : K - 1); q > pos; q--) {
                    bv[q] = bv[q - 1];
                    bi[q] = bi[q - 1];
                }
                bv[pos] = zt[e];
                bi[pos] = e;
                if (n < K) n++;
            }
        }
        act_t w[MAX_TOP_K];
        act_t tot = 0;
    route_weights:
        for (int s = 0; s < K; s++) {
#pragma HLS PIPELINE II = 1
#pragma HLS LOOP_TRIPCOUNT max = MAX_TOP_K
            VMOE_COUNT(CNT_ROUTE);
            act_t diff = bv[s] - m;
            exp_t ex = vexp(diff);
            w[s] = ex * inv;
            tot = tot + w[s];
        }
        if (md.renorm) {
            act_t rr = vrecip(tot);
        route_renorm:
            for (int s = 0; s < K; s++) {
#pragma HLS PIPELINE II = 1
                VMOE_COUNT(CNT_ROUTE);
                w[s] = w[s] * rr;
            }
        }
    route_queue:
        for (int s = 0; s < K; s++) {  // per-expert queues, in token order
#pragma HLS PIPELINE II = 1
            VMOE_COUNT(CNT_ROUTE);
            const int e = bi[s];
            S.queue[e][S.qlen[e]] = t;
            S.qslot[e][S.qlen[e]] = s;
            S.qscore[e][S.qlen[e]] = w[s];
            S.qlen[e]++;
        }
    }
    S.active = 0;
    for (int e = 0; e < E; e++)
        if (S.qlen[e] > 0) S.order[S.active++] = e;  // experts without tokens are skipped: no weight traffic
}

// One expert's weights / biases / scales, part 1 (fc1 or query), part 2 (fc2 or output) or both (0):
// DRAM -> on-chip buffer, at the same offsets as in the expert's blob.
inline void load_expert(const moe_desc &md, int e, int part, const weight_t *wts, const w8_t *wts8,
                        const scale_t *scales, const bias_t *bias, weight_t *wdst, bias_t *bdst, scale_t *sdst) {
    const int w0 = part == 2 ? md.w1_size : 0, w1 = part == 1 ? md.w1_size : md.w_size;
    const int b0 = part == 2 ? md.hidden : 0, b1 = part == 1 ? md.hidden : md.b_size;
    const int w = md.w[e], b = md.b[e], sc = md.s[e];
    if (md.is8) {
        par_for<LOAD8_PAR, CNT_LOAD>(w1 - w0, [&](int i) { wdst[w0 + i] = from_raw<weight_t>(raw(wts8[w + w0 + i])); });
        par_for<LOAD32_PAR, CNT_LOAD>(b1 - b0, [&](int i) { sdst[b0 + i] = scales[sc + b0 + i]; });
    } else {
        par_for<LOAD16_PAR, CNT_LOAD>(w1 - w0, [&](int i) { wdst[w0 + i] = wts[w + w0 + i]; });
    }
    par_for<LOAD16_PAR, CNT_LOAD>(b1 - b0, [&](int i) { bdst[b0 + i] = bias[b + b0 + i]; });
}

static weight_t ebuf_a[MAX_EXPERT_W], ebuf_b[MAX_EXPERT_W];
static bias_t ebias_a[MAX_EXPERT_B], ebias_b[MAX_EXPERT_B];
static scale_t escale_a[MAX_EXPERT_B], escale_b[MAX_EXPERT_B];

// The computation of one expert on its queue with weights already on chip (pass: 0 MLP, 1 queries, 2 outputs).
inline void expert_compute(const moe_desc &md, int e, int pass, const act_t *in, act_t *out, const weight_t *wb,
                           const bias_t *bb, const scale_t *sb) {
    moe_state &S = state();
    static act_t hid[NUM_TOKENS * EXPERT_HIDDEN];
    const int H = md.hidden, n = S.qlen[e], f8 = (md.is8 ? LIN_W8 : 0) | LIN_ONCHIP;
    if (pass == 0) {  // MLP: fc1 + GELU on the gathered tokens, fc2 scattered with the gate weight
        linear_unit<act_t, acc_t>(in, EMBED_DIM, n, EMBED_DIM, H, wb, 0, sb, bb, hid, H, f8 | LIN_GATHER | LIN_GELU,
                                  S.queue[e], S.qslot[e], S.qscore[e]);
        linear_unit<act_t, acc_t>(hid, H, n, H, EMBED_DIM, wb + md.w1_size, 0, sb + H, bb + H, out, EMBED_DIM,
                                  f8 | LIN_SCATTER_ACC, S.queue[e], S.qslot[e], S.qscore[e]);
    } else if (pass == 1) {  // attention: each slot's query from the slot's expert
        linear_unit<act_t, acc_t>(in, EMBED_DIM, n, EMBED_DIM, H, wb, 0, sb, bb, out, EMBED_DIM,
                                  f8 | LIN_GATHER | LIN_SCATTER_SLOT, S.queue[e], S.qslot[e], S.qscore[e]);
    } else {  // attention: each slot's output projection, weighted and summed over the slots
        linear_unit<act_t, acc_t>(in, EMBED_DIM, n, H, EMBED_DIM, wb + md.w1_size, 0, sb + H, bb + H, out, EMBED_DIM,
                                  f8 | LIN_GATHER | LIN_GATHER_SLOT | LIN_SCATTER_ACC, S.queue[e], S.qslot[e],
                                  S.qscore[e]);
    }
}

// Every active expert in turn, the next one's weights loaded while the current one computes.
inline void expert_pass(const moe_desc &md, int pass, const act_t *in, act_t *out, const weight_t *wts,
                        const w8_t *wts8, const scale_t *scales, const bias_t *bias) {
    moe_state &S = state();
    if (S.active == 0) return;
    load_expert(md, S.order[0], pass, wts, wts8, scales, bias, ebuf_a, ebias_a, escale_a);
expert_loop:
    for (int i = 0; i < S.active; i++) {
#pragma HLS LOOP_TRIPCOUNT max = MAX_EXPERTS
        const int e = S.order[i];
        const bool more = i + 1 < S.active;
        const int nxt = more ? S.order[i + 1] : e;
        if (i & 1) {
            if (more) load_expert(md, nxt, pass, wts, wts8, scales, bias, ebuf_a, ebias_a, escale_a);
            expert_compute(md, e, pass, in, out, ebuf_b, ebias_b, escale_b);
        } else {
            if (more) load_expert(md, nxt, pass, wts, wts8, scales, bias, ebuf_b, ebias_b, escale_b);
            expert_compute(md, e, pass, in, out, ebuf_a, ebias_a, escale_a);
        }
    }
}

// x += the experts' gate-weighted outputs of one pass (0: MLP experts on h; 2: attention output projections of
// each slot's attention output); the queues come from moe_route.
inline void moe_residual(int pass, const act_t *in, act_t *x, const moe_desc &md, const weight_t *wts,
                         const w8_t *wts8, const scale_t *scales, const bias_t *bias) {
    static act_t y[NUM_TOKENS * EMBED_DIM];
    vec_zero(y, NUM_TOKENS * EMBED_DIM);
    expert_pass(md, pass, in, y, wts, wts8, scales, bias);
    vec_add(x, y, NUM_TOKENS * EMBED_DIM);
}

}  // namespace vmoe
#endif
