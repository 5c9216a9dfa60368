// E-Att attention (L1 or Hamming alignment) with a streaming softmax, for CuPy.
//
// Grid (ceil(Nq / blockDim.x), BH); one thread per query row, as exact.cu. The block
// walks over tiles of TILE keys, staged in shared memory by all its threads; each thread
// scores its row against the tile without a multiplication and updates its running max
// m, running sum l and unnormalised output acc.
//   L1 (hamming == 0): q and k arrive scaled by `scale` (s|a - b| = |s a - s b|), the
//     score is -sum_c |q_ic - k_jc|.
//   Hamming (hamming == 1): qc, kc are the packed sign codes ([BH, N, words] uint64); the
//     score is neg_table[popcount(qc xor kc)], neg_table[h] = -scale * h (d + 1 entries).
// Rows with no visible key return zeros.
//
// Layout (C-contiguous): q [BH, Nq, d], k [BH, Nk, d], qc [BH, Nq, words],
// kc [BH, Nk, words], v [BH, Nk, dv], out [BH, Nq, dv], bias [M, bias_rows, Nk] chosen per
// batch row by mask_index [BH]. Requires d, dv <= MAXD and words <= MAXW.
#include "common.cuh"

template <typename T, int MAXD, int MAXW, int TILE>
__device__ void mcattn_eatt_forward(const T* __restrict__ q, const T* __restrict__ k,
                                    const unsigned long long* __restrict__ qc,
                                    const unsigned long long* __restrict__ kc,
                                    const T* __restrict__ neg_table, const T* __restrict__ v,
                                    T* __restrict__ out, const T* __restrict__ bias,
                                    const long long* __restrict__ mask_index, int nq, int nk,
                                    int d, int words, int dv, int has_bias, int bias_rows,
                                    int is_causal, int hamming) {
    __shared__ T k_tile[TILE * MAXD];
    __shared__ unsigned long long c_tile[TILE * MAXW];
    __shared__ T v_tile[TILE * MAXD];
    const long long bh = blockIdx.y;
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    const bool active = i < nq;
    const T neg_inf = mcattn_neg_inf<T>();

    T q_row[MAXD], acc[MAXD], scores[TILE];
    unsigned long long q_code[MAXW];
    if (hamming) {
        for (int w = 0; w < words; ++w) q_code[w] = active ? qc[(bh * nq + i) * words + w] : 0ULL;
    } else {
        for (int c = 0; c < d; ++c) q_row[c] = active ? q[(bh * nq + i) * d + c] : T(0);
    }
    for (int c = 0; c < dv; ++c) acc[c] = T(0);
    T m = neg_inf, l = T(0);

    const T* bias_row = mcattn_bias_row(bias, mask_index, bh, i, bias_rows, nk, has_bias && active);
    const int key_end = mcattn_block_key_end(nq, nk, is_causal);
    for (int j0 = 0; j0 < key_end; j0 += TILE) {
        const int tile = mcattn_min(TILE, key_end - j0);
        if (hamming) {
            for (int e = threadIdx.x; e < tile * words; e += blockDim.x)
                c_tile[(e / words) * MAXW + e % words] = kc[(bh * nk + j0 + e / words) * words + e % words];
        } else {
            mcattn_load_tile(k_tile, MAXD, k, bh * nk + j0, tile, d, T(1));
        }
        mcattn_load_tile(v_tile, MAXD, v, bh * nk + j0, tile, dv, T(1));
        __syncthreads();
        if (active) {
            T top = m;
            for (int r = 0; r < tile; ++r) {
                const int j = j0 + r;
                T s;
                if (hamming) {
                    int h = 0;
                    for (int w = 0; w < words; ++w) h += mcattn_popcll(q_code[w] ^ c_tile[r * MAXW + w]);
                    s = neg_table[h];
                } else {
                    T dist = T(0);
                    for (int c = 0; c < d; ++c) dist += mcattn_abs(q_row[c] - k_tile[r * MAXD + c]);
                    s = -dist;
                }
                if (has_bias) s += bias_row[j];
                if (is_causal && j > i) s = neg_inf;
                scores[r] = s;
                top = mcattn_max(top, s);
            }
            mcattn_softmax_tile(scores, tile, top, v_tile, MAXD, dv, m, l, acc);
        }
        __syncthreads();
    }
    if (active) {
        const T inv = l > T(0) ? T(1) / l : T(0);
        for (int c = 0; c < dv; ++c) out[(bh * nq + i) * dv + c] = acc[c] * inv;
    }
}

#define MCATTN_EATT_ARGS(T)                                                                    \
    const T *q, const T *k, const unsigned long long *qc, const unsigned long long *kc,       \
        const T *neg_table, const T *v, T *out, const T *bias, const long long *mask_index,   \
        int nq, int nk, int d, int words, int dv, int has_bias, int bias_rows, int is_causal, \
        int hamming
#define MCATTN_EATT_PASS q, k, qc, kc, neg_table, v, out, bias, mask_index, nq, nk, d, words, \
    dv, has_bias, bias_rows, is_causal, hamming

extern "C" __global__ void mcattn_eatt_forward_f32(MCATTN_EATT_ARGS(float)) {
    mcattn_eatt_forward<float, 128, 2, 32>(MCATTN_EATT_PASS);
}
extern "C" __global__ void mcattn_eatt_forward_f64(MCATTN_EATT_ARGS(double)) {
    mcattn_eatt_forward<double, 128, 2, 16>(MCATTN_EATT_PASS);
}
