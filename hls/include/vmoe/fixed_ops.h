// Raw-bit helpers: the nonlinear functions work on the integer behind an ap_fixed, like the NumPy reference
// (vision_moe/deploy/hls/fixed.py) does.
#ifndef VMOE_FIXED_OPS_H
#define VMOE_FIXED_OPS_H

#include <ap_fixed.h>
#include <ap_int.h>

namespace vmoe {

typedef ap_int<64> wide_t;

// Pipelined-loop iteration counters, C-simulation only: every II=1 loop that takes time in hardware adds one per
// iteration to its kind, so the testbench can report, per layer, the counts the performance model
// (vision_moe/deploy/hls/perf.py) predicts from the same parameters. Compiled out under Vitis HLS.
enum { CNT_MAC, CNT_OUT, CNT_LOAD, CNT_ATTN, CNT_VEC, CNT_ROUTE, CNT_KINDS };
#if defined(__SYNTHESIS__)
#define VMOE_COUNT(kind)
#define VMOE_COUNT_K(k)
#else
struct counters_t {
    long long n[CNT_KINDS];
};
inline counters_t &counters() {
    static counters_t c = {{0}};
    return c;
}
#define VMOE_COUNT(kind) (vmoe::counters().n[vmoe::kind]++)
#define VMOE_COUNT_K(k) (vmoe::counters().n[k]++)
#endif

// for i in [0, n): body(i), P at a time: one pipelined iteration per P values (P lanes of hardware), counted as
// KIND. The element-wise, copy and burst loops of the kernels are all of this form.
template <int P, int KIND, class F>
inline void par_for(int n, F body) {
par_for_loop:
    for (int i0 = 0; i0 < n; i0 += P) {
#pragma HLS PIPELINE II = 1
        VMOE_COUNT_K(KIND);
        for (int p = 0; p < P; p++) {
#pragma HLS UNROLL
            if (i0 + p < n) body(i0 + p);
        }
    }
}

template <int W, int I, ap_q_mode Q, ap_o_mode O, int N>
inline wide_t raw(const ap_fixed<W, I, Q, O, N> &x) {
    ap_int<W> r;
    r.range(W - 1, 0) = x.range(W - 1, 0);
    return wide_t(r);
}

template <int W, int I, ap_q_mode Q, ap_o_mode O, int N>
inline wide_t raw(const ap_ufixed<W, I, Q, O, N> &x) {
    ap_uint<W> r;
    r.range(W - 1, 0) = x.range(W - 1, 0);
    return wide_t(r);
}

template <int W>
inline wide_t raw(const ap_int<W> &x) {
    return wide_t(x);
}

// The type T holding raw bits v (the low T::width bits: what an assignment that wraps keeps).
template <class T>
inline T from_raw(const wide_t &v) {
    T t;
    t.range(T::width - 1, 0) = v.range(T::width - 1, 0);
    return t;
}

// Index of the highest set bit of a positive value (a priority encoder in hardware).
inline int msb(const wide_t &v) {
    int b = -1;
    for (int i = 0; i < 63; i++) {
#pragma HLS UNROLL
        if (v[i]) b = i;
    }
    return b;
}

// Linear interpolation between table[idx] and table[idx + 1]; r has rbits bits.
inline wide_t interp(const int *table, int idx, const wide_t &r, int rbits) {
    wide_t t0 = table[idx], t1 = table[idx + 1];
    wide_t d = t1 - t0;
    wide_t p = d * r;
    return t0 + (p >> rbits);
}

}  // namespace vmoe
#endif
