// The online softmax and O += P V of a warp's 16 query rows on tensor cores, for kernels
// that compute their scores their own way (latte_mma.cu, eatt_mma.cu) and then share
// FlashAttention-2's second half (exact_mma.cu states the recipe).
//
// A lane holds rows g and g + 8 (g = lane / 4, t = lane % 4) of G key groups of 8 keys in
// the mma C/D layout: s[n][i] is the score of row (i < 2 ? g : g + 8), key 8 n + 2 t +
// (i & 1), in log2 units (already times log2 e), -inf where the key is not visible or
// not kept. m, l: the rows' running maxima and this lane's share of the running sums;
// o: the output accumulators [D / 8][4]. vt: the V^T tile in shared memory, [D][LD]
// words of two 16-bit codes (keys 2p, 2p + 1 in word p); the G groups start at word kp0.
#ifndef MCATTN_MMA_SOFTMAX_CUH
#define MCATTN_MMA_SOFTMAX_CUH

#include "warp.cuh"

// o += P V for a warp's P in the mma C/D layout (p[n][i]: row (i < 2 ? g : g + 8), key
// 8 n + 2 t + (i & 1); G even): P's fragments of key groups 2 kk and 2 kk + 1, rounded to
// the 16-bit type, are the A fragment of their 16 keys. vt as above, D columns.
template <class Ops, int D, int G, int LD>
__device__ __forceinline__ void mcattn_mma_pv(float (&o)[D / 8][4], const float (&p)[G][4],
                                              const unsigned (*vt)[LD], int kp0, int g, int t) {
#pragma unroll
    for (int kk = 0; kk < G / 2; ++kk) {
        const unsigned pa[4] = {
            mcattn_pack16(Ops::round(p[2 * kk][0]), Ops::round(p[2 * kk][1])),
            mcattn_pack16(Ops::round(p[2 * kk][2]), Ops::round(p[2 * kk][3])),
            mcattn_pack16(Ops::round(p[2 * kk + 1][0]), Ops::round(p[2 * kk + 1][1])),
            mcattn_pack16(Ops::round(p[2 * kk + 1][2]), Ops::round(p[2 * kk + 1][3]))};
        const int kp = kp0 + 8 * kk;
#pragma unroll
        for (int n = 0; n < D / 8; ++n) {
            const unsigned b[2] = {vt[8 * n + g][kp + t], vt[8 * n + g][kp + 4 + t]};
            Ops::mma(o[n], pa, b);
        }
    }
}

template <class Ops, int D, int G, int LD>
__device__ __forceinline__ void mcattn_mma_softmax_pv(float (&s)[G][4], float (&m)[2], float (&l)[2],
                                                      float (&o)[D / 8][4], const unsigned (*vt)[LD],
                                                      int kp0, int g, int t) {
    const float neg_inf = mcattn_neg_inf<float>();
    float tmax[2] = {neg_inf, neg_inf};
#pragma unroll
    for (int n = 0; n < G; ++n)
#pragma unroll
        for (int i = 0; i < 4; ++i) tmax[i >> 1] = mcattn_max(tmax[i >> 1], s[n][i]);
    float alpha[2], base[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {  // the row's 4 lanes meet
        tmax[h] = mcattn_max(tmax[h], __shfl_xor_sync(0xffffffffu, tmax[h], 1));
        tmax[h] = mcattn_max(tmax[h], __shfl_xor_sync(0xffffffffu, tmax[h], 2));
        const float m_new = mcattn_max(m[h], tmax[h]);
        base[h] = m_new == neg_inf ? 0.0f : m_new;  // nothing visible yet: p = 0
        alpha[h] = exp2f(m[h] - base[h]);           // 0 on the first visible tile
        m[h] = m_new;
        l[h] *= alpha[h];
    }
#pragma unroll
    for (int n = 0; n < D / 8; ++n)
#pragma unroll
        for (int i = 0; i < 4; ++i) o[n][i] *= alpha[i >> 1];
#pragma unroll
    for (int n = 0; n < G; ++n)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            s[n][i] = exp2f(s[n][i] - base[i >> 1]);
            l[i >> 1] += s[n][i];
        }
    mcattn_mma_pv<Ops, D, G, LD>(o, s, vt, kp0, g, t);
}

// The rows' sums over their 4 lanes, then out = o / l for the rows below nq (zeros for a
// row with nothing visible); out points at [rows, D] of this batch row.
template <int D>
__device__ __forceinline__ void mcattn_mma_store_rows(float* out, const float (&o)[D / 8][4], float (&l)[2],
                                                      const int (&rows)[2], int nq, int t) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
        l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        if (rows[h] >= nq) continue;
        const float inv = l[h] > 0.0f ? 1.0f / l[h] : 0.0f;
        float* orow = out + (long long)rows[h] * D;
#pragma unroll
        for (int n = 0; n < D / 8; ++n)
#pragma unroll
            for (int i = 0; i < 2; ++i) orow[8 * n + 2 * t + i] = o[n][2 * h + i] * inv;
    }
}

#endif  // MCATTN_MMA_SOFTMAX_CUH
